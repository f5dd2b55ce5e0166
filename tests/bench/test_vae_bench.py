"""bench/vae.py --quick: both VAEs train, evaluate and draw; every advertised JSON key is there."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_every_key_finite(tmp_path):
    out = tmp_path / "metrics.json"
    done = subprocess.run([sys.executable, "bench/vae.py", "--quick", "--json", str(out), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert set(metrics["joint_elbo"]) == set(metrics["params"]) == {"vae", "biglearn_vae"}
    assert set(metrics["probe_accuracy"]) == {"0.1", "0.2", "0.4", "0.6", "0.8", "1.0"}
    assert metrics["params"]["vae"] == metrics["params"]["biglearn_vae"]
    values = [*metrics["joint_elbo"].values(), *metrics["probe_accuracy"].values()]
    assert all(math.isfinite(v) for v in values)
    assert all(0 <= v <= 1 for v in metrics["probe_accuracy"].values())
    for name in ("vae_inference.png", "vae_inpainting.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| BigLearn-VAE (universal, eq. 7) |" in done.stdout
