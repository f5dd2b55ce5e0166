"""Installable anywhere: `pip install .` into a fresh virtual environment, then `biglearn train
experiment=smoke` from another directory finds its configs in the installed package (slow).

The fresh environment borrows the dependencies of the running one through a .pth line, so the test
needs no download; a .pth line does not run the running environment's own .pth files, so the
editable install of the checkout stays invisible and only the installed wheel can be imported."""
import json
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_then_biglearn_train_from_another_directory(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    target_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                      capture_output=True, text=True, check=True).stdout.strip())
    (target_site / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-build-isolation", "--no-index", "-q", str(ROOT)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import pretrain.train.config as c, biglearn_kernels as k; print(c.__file__); "
                            "print(c.CONFIG_DIR); print(k.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(env_dir) for p in where), where
    # beside transformers: `kernels` stays Hugging Face's, the wheel wrote nothing over it
    hub = subprocess.run([python, "-c", "import kernels; print(kernels.__file__, hasattr(kernels, 'group_attention'))"],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    if hub.returncode == 0:
        assert not Path(hub.stdout.split()[0]).is_relative_to(env_dir) and hub.stdout.split()[1] == "False", hub.stdout
    assert (Path(where[1]) / "experiment" / "smoke.yaml").is_file()
    biglearn = env_dir / "bin" / "biglearn"
    assert subprocess.run([biglearn, "train", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          check=True).stdout.startswith("usage: biglearn train")
    train = subprocess.run(
        [biglearn, "train", "experiment=smoke", "deepspeed=cpu", "data.demo_max_files=40", "data.demo_vocab_size=512",
         "trainer.max_steps=3", "trainer.save_every=3", "trainer.progress=false", "trainer.loggers=[jsonl]",
         "eval.batches=1", "eval.plot=false", "trainer.export_at_end=false", "run_dir=run"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads(train.stdout[train.stdout.index("{"):])
    assert summary["step"] == 3 and (elsewhere / "run" / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
