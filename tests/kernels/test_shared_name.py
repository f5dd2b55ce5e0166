"""This project's `kernels` and Hugging Face's `kernels` (a dependency of transformers >= 5.25)
share an import name. Whichever one Python finds first, our model gets our attention and
transformers gets Hugging Face's API (kernels/__init__.py, pretrain/__init__.py).

Each case runs in a fresh interpreter started outside the repository, with the checkout at the
END of sys.path, as an editable install's finder puts it (after site-packages); the script then
imports in the given order."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.path[:] = [p for p in sys.path if p not in ("", {root!r})] + [{root!r}]
import torch
order = {order!r}
if order == "hf kernels first":
    import kernels
    assert not hasattr(kernels, "group_attention"), kernels.__file__  # Hugging Face's was found first
import pretrain.model
import kernels
q = torch.randn(1, 2, 5, 8)
groups = torch.tensor([[0, 1, 1, 2, 3]], dtype=torch.int32)
out = kernels.group_attention(q, q, q, groups, groups, strict=False, backend="torch")
ref = kernels.reference_attention(q, q, q, groups, groups, strict=False)
assert torch.equal(out, ref)
print(kernels.__file__)
if {hub!r}:
    from kernels import LayerRepository  # what transformers' hub_kernels imports
    print(LayerRepository.__module__)
"""


def hub_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("order", ["pretrain first", "hf kernels first"])
def test_pretrain_gets_our_kernels_wherever_it_runs(tmp_path, order):
    if order == "hf kernels first" and not hub_kernels_installed():
        pytest.skip("Hugging Face's kernels distribution is not installed")
    script = SCRIPT.format(root=str(ROOT), order=order, hub=hub_kernels_installed())
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split()
    assert Path(lines[0]).resolve() == ROOT / "kernels" / "__init__.py"
    if hub_kernels_installed():
        assert lines[1].startswith("kernels._internals")  # Hugging Face's class, served through ours


LLAMA = """
import sys, torch
import kernels
assert hasattr(kernels, "group_attention"), kernels.__file__  # ours: the repository root comes first
import transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1])
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(tuple(model(torch.tensor([[1, 2, 3]])).logits.shape))
"""


def test_transformers_models_load_beside_our_kernels(tmp_path):
    """From the repository root (`python -m pretrain...`) our `kernels` is imported first; transformers'
    modelling code, which imports Hugging Face's kernels API by that name, must still load and run."""
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "-c", LLAMA, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "(1, 3, 50)"
