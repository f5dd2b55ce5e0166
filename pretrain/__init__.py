"""Big learning: model, objectives, trainer, inference and fine-tuning (docs/design.md).

Importing `pretrain` makes `import kernels` find this project's attention package, wherever the
process runs. Hugging Face's `kernels` (a dependency of transformers since 5.25) has the same
import name and, outside the repository root, comes first on sys.path, ahead of an editable
install's finder. Ours serves its API as well (kernels/__init__.py), so both users of the name
get what they import. The finder below only names the file: nothing is imported until someone
imports `kernels` (the data pipeline imports pretrain.errors and must not pull in torch).
"""
import importlib.abc
import importlib.util
import sys
from pathlib import Path

_OUR_KERNELS = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"


class _OurKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds the top-level module `kernels` at this project's folder; its submodules resolve
    through the package's own __path__."""

    def find_spec(self, name, path=None, target=None):
        if name != "kernels":
            return None
        if "group_attention" not in _OUR_KERNELS.read_text(encoding="utf-8", errors="replace"):
            raise ImportError(f"{_OUR_KERNELS} is another package named `kernels` installed over this project's "
                              f"(Hugging Face's shares the name); reinstall this project with `pip install -e .`")
        return importlib.util.spec_from_file_location(name, _OUR_KERNELS,
                                                      submodule_search_locations=[str(_OUR_KERNELS.parent)])


def _prefer_our_kernels() -> None:
    if not any(isinstance(finder, _OurKernelsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OurKernelsFinder())
    loaded = sys.modules.get("kernels")
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "").resolve() != _OUR_KERNELS:
        # Hugging Face's, imported earlier: whoever holds it keeps it; the name now goes to ours.
        del sys.modules["kernels"]


_prefer_our_kernels()
