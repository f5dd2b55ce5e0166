"""Big learning: model, objectives, trainer, inference and fine-tuning (docs/design.md).

Importing `pretrain` makes this project's `kernels` package the module named `kernels`. Hugging
Face's `kernels` (a dependency of transformers since 5.25) has the same import name and, outside
the repository root, comes first on sys.path, ahead of an editable install's finder; ours serves
its API as well (kernels/__init__.py), so both users of the name get what they import.
"""
import importlib.util
import sys
from pathlib import Path


def _import_our_kernels() -> None:
    ours = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    loaded = sys.modules.get("kernels")
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "").resolve() == ours:
        return
    spec = importlib.util.spec_from_file_location("kernels", ours, submodule_search_locations=[str(ours.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules["kernels"]
        raise
    if not hasattr(module, "group_attention"):
        del sys.modules["kernels"]
        raise ImportError(f"{ours} is not this project's attention package but another `kernels` installed over it "
                          f"(Hugging Face's shares the name); reinstall this project with `pip install -e .`")


_import_our_kernels()
