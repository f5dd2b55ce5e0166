"""The attention kernels import as `biglearn_kernels`; the name `kernels` stays Hugging Face's.

The top-level folder kernels/ has no __init__.py (setuptools maps kernels/biglearn_kernels to
the import name biglearn_kernels), so it can never shadow Hugging Face's `kernels` distribution,
a dependency of transformers. Each case runs in a fresh interpreter, from the repository root
and from another directory, in both import orders, as a user's process would."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib.metadata, sys
from pathlib import Path
order = sys.argv[1]
if order == "project first":
    import pretrain.model, pretrain.train.run  # everything of ours that uses the kernels
import kernels
import biglearn_kernels
import pretrain.model
import torch
print(Path(kernels.__file__).resolve())
print(Path(biglearn_kernels.__file__).resolve())
print(hasattr(kernels, "group_attention"))
q = torch.randn(1, 2, 5, 8)
groups = torch.tensor([[0, 1, 1, 2, 3]], dtype=torch.int32)
out = biglearn_kernels.group_attention(q, q, q, groups, groups, strict=False, backend="torch")
assert torch.equal(out, biglearn_kernels.reference_attention(q, q, q, groups, groups, strict=False))
from kernels import LayerRepository  # what transformers' hub_kernels imports
print(LayerRepository.__module__)
"""


def hub_kernels_init() -> Path:
    return Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()


@pytest.mark.parametrize("where", ["root", "elsewhere"])
@pytest.mark.parametrize("order", ["project first", "hub first"])
def test_kernels_is_hugging_faces_and_ours_imports_under_its_own_name(tmp_path, where, order):
    try:
        hub = hub_kernels_init()
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels distribution is not installed (transformers < 5.25)")
    cwd = ROOT if where == "root" else tmp_path
    done = subprocess.run([sys.executable, "-c", SCRIPT, order], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels_file, ours, has_ours, repository_module = done.stdout.split()
    assert Path(kernels_file) == hub and has_ours == "False"
    assert Path(ours) == ROOT / "kernels" / "biglearn_kernels" / "__init__.py"
    assert repository_module.startswith("kernels.")


def test_no_package_folder_shadows_another_distribution():
    """kernels/ holds no __init__.py, and no code edits sys.meta_path, sys.modules or sys.path."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    offenders = []
    for folder in ("pretrain", "kernels", "data_pipeline", "launch", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("sys.meta_path", "sys.modules[", "sys.path.insert", "sys.path.append", "sys.path[:]"):
                if needle in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert offenders == []
