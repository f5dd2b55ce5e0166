"""Behaviour is pinned: the per-step losses of a fixed 20-step run (seeded Markov data, tiny model,
DeepSpeed on CPU in fp32, the Trainer's train_step) equal the values recorded before the code was
restructured (main at d86f6d1, with the engine driven by hand). Any change to the model, the objectives, the layout, the engine or the training step
that alters the numbers fails here; an intended change must re-record them and say why."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PINNED = [2.7975406646728516, 2.7676138877868652, 2.817058801651001, 2.789181709289551, 2.725562810897827,
          2.771944999694824, 2.7539658546447754, 2.701878547668457, 2.7124526500701904, 2.7626566886901855,
          2.7594094276428223, 2.736903667449951, 2.7413551807403564, 2.681849718093872, 2.7437093257904053,
          2.8081626892089844, 2.6944050788879395, 2.6784262657165527, 2.722860336303711, 2.7393109798431396]

SCRIPT = """
import json, sys
import torch
from pretrain.config import load_config
from pretrain.engine import build_engine, init_distributed
from pretrain.model import BigLearner
from pretrain.objectives import ObjectiveSampler
from pretrain.synthetic import MarkovSource, SourceStream
from pretrain.train import PretrainTask, settings_of
from pretrain.trainer import Trainer
config = load_config(["deepspeed=cpu", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=16",
                      "model.attention_backend=torch", "data.batch_size=4", "trainer.max_steps=20",
                      "trainer.warmup_steps=2", "trainer.lr=3e-3", "trainer.seed=0", "trainer.progress=false"])
_, world, _ = init_distributed(True)
torch.manual_seed(0)
task = PretrainTask(config.model, 24, None, True, world)
engine, _ = build_engine(config, task.module(BigLearner(config.model)), world, True)
stream = SourceStream(MarkovSource.random(n_states=16, seed=0), ObjectiveSampler(config.objective), length=24,
                      batch_size=4, seed=0)
trainer = Trainer(engine, stream, task, settings_of(config.trainer), sys.argv[1], meta={})
losses = []
for step in range(20):
    trainer.train_step()
    losses.append(trainer.log_window()["loss"])
print("LOSSES", json.dumps(losses))
"""


def test_per_step_losses_of_a_fixed_run_are_unchanged(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("LOSSES "))
    assert json.loads(line[len("LOSSES "):]) == pytest.approx(PINNED, rel=1e-5, abs=1e-6)
