"""Layers point one way (docs/design.md, "Package map"): every import of a project module (inside
functions too) must follow an arrow of LAYERS, nothing imports research code, and no import cycle.

LAYERS is the rule table: a layer and the layers it may import, besides itself. A module belongs
to the longest layer name that prefixes it. The fake graphs below show that the check fails when
an arrow is added against the rules.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (folder, import name) of every project package: kernels/ holds biglearn_kernels.
PACKAGES = (("pretrain", "pretrain"), ("kernels/biglearn_kernels", "biglearn_kernels"),
            ("data_pipeline", "data_pipeline"), ("launch", "launch"))

BASE = ("data_pipeline",)  # torch-free file I/O and the one error style: every layer may use them
LAYERS = {
    "biglearn_kernels": (),
    "data_pipeline": (),
    "pretrain.layout": BASE,
    "pretrain.objectives": (*BASE, "pretrain.layout"),
    "pretrain.model": (*BASE, "biglearn_kernels", "pretrain.layout"),
    "pretrain.data": (*BASE, "pretrain.layout", "pretrain.objectives"),
    "pretrain.checkpoint": (*BASE, "pretrain.model"),
    "pretrain.train": (*BASE, "pretrain.layout", "pretrain.objectives", "pretrain.model", "pretrain.data",
                       "pretrain.checkpoint"),
    "pretrain.infer": (*BASE, "pretrain.layout", "pretrain.objectives", "pretrain.model", "pretrain.checkpoint"),
    "pretrain.finetune": (*BASE, "pretrain.layout", "pretrain.objectives", "pretrain.model", "pretrain.checkpoint",
                          "pretrain.train", "pretrain.infer"),
    "pretrain.hf": (*BASE, "pretrain.model", "pretrain.checkpoint"),
    # The command line dispatches by module name (importlib), importing no layer itself.
    "pretrain.cli": (),
    "pretrain.__main__": ("pretrain.cli",),
    "pretrain": (),  # the package's __init__: a docstring
    "pretrain.experiments": (*BASE, "biglearn_kernels", "pretrain.layout", "pretrain.objectives", "pretrain.model",
                             "pretrain.data", "pretrain.checkpoint", "pretrain.train", "pretrain.infer",
                             "pretrain.finetune", "pretrain.hf"),
    "launch": (*BASE,),
}
RESEARCH = "pretrain.experiments"  # imported by nothing but itself (and bench/, tests/)
ROOT_MODULES = {"pretrain", "pretrain.__main__", "pretrain.cli", "pretrain.layout", "pretrain.objectives"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, name in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            parts = (name, *path.relative_to(ROOT / folder).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """Project modules `name` imports anywhere in its body (`from pkg import mod` counts as pkg.mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def layer_of(module: str) -> str:
    candidates = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    if not candidates:
        raise AssertionError(f"{module} belongs to no layer of LAYERS: add it to the rule table and docs/design.md")
    return max(candidates, key=len)


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that no arrow of LAYERS allows."""
    found = []
    for module, imported in sorted(graph.items()):
        mine = layer_of(module)
        for target in sorted(imported):
            theirs = layer_of(target)
            if theirs != mine and theirs not in LAYERS[mine]:
                found.append(f"{module} -> {target} ({mine} may not import {theirs})")
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def project_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_walk_sees_real_imports():
    graph = project_graph()
    assert "pretrain.infer.classification" in graph["pretrain.finetune.run"] or \
        "pretrain.infer" in graph["pretrain.finetune.run"]
    assert "biglearn_kernels" in graph["pretrain.model.transformer"]


def test_every_import_follows_an_arrow_of_the_rule_table():
    assert violations(project_graph()) == []


def test_an_arrow_against_the_rules_is_caught():
    graph = project_graph()
    for module, target in (("pretrain.model.transformer", "pretrain.train.trainer"),  # model -> train
                           ("biglearn_kernels.dispatch", "pretrain.layout"),  # kernels -> project
                           ("data_pipeline.shards", "pretrain.data.stream"),  # data pipeline -> pretrain
                           ("pretrain.infer.text", "pretrain.finetune.run"),  # inference -> fine-tuning
                           ("pretrain.train.run", "pretrain.experiments.demo")):  # library -> research code
        faked = {**graph, module: graph[module] | {target}}
        assert any(v.startswith(f"{module} -> {target} ") for v in violations(faked)), (module, target)


def test_nothing_imports_research_code():
    for module, imported in project_graph().items():
        if not (module == RESEARCH or module.startswith(RESEARCH + ".")):
            assert not any(t == RESEARCH or t.startswith(RESEARCH + ".") for t in imported), module


def test_no_import_cycle_between_project_modules():
    graph = project_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_pretrain_keeps_only_entry_points_and_the_layout_modules_outside_subpackages():
    flat = {name for name, path in project_modules().items() if name.startswith("pretrain")
            and name.count(".") <= 1 and path.name != "__init__.py"}
    flat |= {"pretrain"}
    assert flat == ROOT_MODULES, flat ^ ROOT_MODULES


def test_design_page_lists_every_module():
    """docs/design.md's package map names every module of the project by its path (one line each)."""
    page = (ROOT / "docs" / "design.md").read_text()
    missing = [str(path.relative_to(ROOT)) for path in project_modules().values()
               if path.name not in ("__init__.py", "__main__.py") and str(path.relative_to(ROOT)) not in page]
    assert not missing, missing
