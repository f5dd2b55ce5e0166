"""pretrain.hf_import: transformers models load next to this project's `kernels` package, also
where Hugging Face's hub `kernels` package (a transformers 5 dependency) is installed."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter (no conftest), the project first on the path as in `python -m pretrain...`.
SCRIPT = """
import sys, torch
from pretrain.hf_import import import_transformers
transformers = import_transformers()
import kernels
assert hasattr(kernels, "group_attention"), kernels.__file__  # still ours
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1])
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(tuple(model(torch.tensor([[1, 2, 3]])).logits.shape))
"""


def test_a_llama_saves_loads_and_runs_beside_our_kernels(tmp_path):
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "(1, 3, 50)"
