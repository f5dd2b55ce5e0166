"""Group-causal two-stream attention (docs/design.md, "Visibility rule"). Imports nothing from the project.

Sharing the name `kernels`: Hugging Face's `kernels` distribution (a dependency of transformers
since 5.25) has the same import name. Wherever this package is the `kernels` that Python imported
(from the repository root, and always through `pretrain`, whose __init__ makes sure of it), it
also serves that distribution's API, so transformers' `from kernels import LayerRepository` keeps
working: any name not defined here is read from its __init__, run on first use, and its folder
then joins __path__ (its submodules, `_internals` and `_rust`, never clash with ours).
"""
import functools
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from .dispatch import check_attention_inputs, group_attention, two_stream_attention
from .reference import INVALID_GROUP, attention_plan, planned_attention, reference_attention, visibility

__all__ = ["INVALID_GROUP", "visibility", "group_attention", "two_stream_attention",
           "reference_attention", "check_attention_inputs", "attention_plan", "planned_attention"]


def _hub_kernels_dir() -> str | None:
    """The folder of Hugging Face's `kernels` package when that distribution is installed (and its
    files were not overwritten by a wheel of this project), else None."""
    try:
        init = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(init.parent) if init.is_file() and init != Path(__file__).resolve() else None


@functools.cache
def _hub_kernels_api():
    """Their package's __init__, run once on first use (never at import: finding the distribution
    reads the metadata on sys.path), with their folder joined to __path__ first, so that its
    absolute `from kernels._internals... import` resolve to their files. None when not installed."""
    folder = _hub_kernels_dir()
    if folder is None:
        return None
    __path__.append(folder)
    spec = importlib.util.spec_from_file_location(f"{__name__}._hub_api", Path(folder) / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def __getattr__(name: str):
    hub = None if name.startswith("__") else _hub_kernels_api()
    if hub is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(hub, name)
