"""DeepSpeed config from the Hydra config, optimizer groups, FLOP counting, and real ZeRO 1/2/3
training on 2 CPU processes (gloo): loss decreases, checkpoints save, load and consolidate."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.layout import collate
from pretrain.train.config import load_config
from pretrain.train.engine import deepspeed_config, param_groups, precision
from pretrain.train.task import LossModel
from pretrain.model import BigLearner, ModelConfig
from pretrain.objectives import ObjectiveConfig, ObjectiveSampler
from pretrain.train.task import step_flops

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("preset, stage, offload", [("zero1", 1, False), ("zero2", 2, False), ("zero3", 3, False),
                                                    ("zero3_offload", 3, True), ("cpu", 1, False)])
def test_deepspeed_config_follows_the_hydra_config(preset, stage, offload):
    config = load_config([f"deepspeed={preset}", "data.batch_size=6", "trainer.grad_accum=3", "trainer.grad_clip=0.5",
                          "trainer.lr=2e-4", "trainer.warmup_steps=7", "trainer.max_steps=99", "trainer.min_lr_ratio=0.2"])
    ds = deepspeed_config(config.deepspeed, config.trainer, config.data.batch_size, world_size=4, on_cpu=preset == "cpu")
    assert ds["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload == ("offload_param" in ds["zero_optimization"])
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 6 * 3 * 4 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 2e-4
    assert ds["optimizer"]["params"].get("torch_adam", False) == (not offload)  # GPU offload uses DeepSpeed's CPU Adam
    assert "scheduler" not in ds  # build_engine's WarmupCosine (tests/pretrain/test_schedule.py)
    if preset == "cpu":
        assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_precision_choice():
    assert precision(load_config(["deepspeed.precision=auto"]).deepspeed, on_cpu=True) == "fp32"
    assert precision(load_config(["deepspeed.precision=bf16"]).deepspeed, on_cpu=True) == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        precision(load_config(["deepspeed.precision=fp16"]).deepspeed, on_cpu=True)
    config = load_config(["deepspeed.precision=fp16"])
    ds = deepspeed_config(config.deepspeed, config.trainer, config.data.batch_size, 1, on_cpu=False)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]


def test_param_groups_cover_every_parameter_once_and_decay_only_matrices():
    model = LossModel(BigLearner(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2)))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(ids) == sorted({id(p) for p in model.parameters()}) and len(ids) == len(set(ids))
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])


@pytest.mark.parametrize("streams", [1, 2])
def test_flop_count_matches_a_brute_force_count(streams):
    """step_flops against a per-row count of what the model computes in each mode: every weight
    matrix a row passes through (2 FLOPs per multiply-add) and 4 * head_dim * heads per visible
    (row, key) pair, times 3 for training. Content rows of the last target group are read by
    nobody and not computed; single stream adds START and keeps only the query rows it needs."""
    config = ModelConfig(vocab_size=97, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, streams=streams)
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 97, size=int(n)) for n in rng.integers(6, 20, size=6)]
    sampler = ObjectiveSampler(ObjectiveConfig(name="mixture", mixture={"biglearn": 1, "mlm": 1, "semi_ar": 1}))
    batch = collate(windows, [sampler(len(w), rng) for w in windows], 0)
    d, hd, f = config.d_model, config.head_dim, config.ffn_hidden
    weights = {"wq": d * 4 * hd, "wkv": d * 2 * 2 * hd, "wo": 4 * hd * d, "mlp": 3 * d * f}
    total = 0
    for b in range(len(windows)):
        n_target = batch.n_target[b]
        targets = batch.target_groups[b][:n_target]
        groups = [g for g in batch.groups[b][:batch.n_source[b] + n_target] if g < max(targets)]
        groups = [0] * (streams == 1) + groups  # START
        queries = [g for g, p in zip(targets, batch.predictor[b]) if streams == 2 or p == -2]
        for layer in range(config.n_layers):
            last = layer == config.n_layers - 1
            for g in groups:  # content rows: only K/V in the last layer
                total += 2 * (weights["wkv"] if last else sum(weights.values()))
                if not last:
                    total += 4 * 4 * hd * sum(1 for k in groups if k <= g)
            for g in targets if last else queries:  # query rows; in the last layer every predictor row
                total += 2 * (weights["wq"] + weights["wo"] + weights["mlp"])
                total += 4 * 4 * hd * sum(1 for k in groups if k < g)
        total += 2 * d * config.vocab_size * n_target
    assert step_flops(config, batch) == pytest.approx(3 * total, rel=1e-12)


# --------------------------------------------------------------------------- 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(run_dir, manifest, *overrides):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "pretrain.train", "deepspeed=cpu", "model.d_model=32", "model.n_layers=2",
               "model.n_heads=2", "data.batch_size=8", "trainer.progress=false", "trainer.loggers=[jsonl]",
               "trainer.warmup_steps=2", "trainer.lr=1e-2", "trainer.log_every=1", "eval.batches=2", "eval.plot=false",
               "trainer.eval_every=0", "data.kind=manifest", f"data.manifest={manifest}", f"run_dir={run_dir}",
               *overrides]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_on_two_cpu_processes(tmp_path, manifest, stage):
    from pretrain.checkpoint.loading import load_for_inference
    from pretrain.checkpoint.sharded import find_checkpoint
    from pretrain.train.evaluate import EvalConfig
    from pretrain.train.evaluate import eval_batches, evaluate, validation_windows

    run_dir = tmp_path / "run"
    torchrun(run_dir, manifest, f"deepspeed.zero_stage={stage}", "trainer.max_steps=16", "trainer.save_every=8")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 16 and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == stage
    tag = find_checkpoint(run_dir)
    assert tag.name == "step_00000016" and len(list(tag.glob("rank_*.pt"))) == 2

    # Consolidated fp32 weights (from the ZeRO shards) score exactly what the engine scored.
    model, meta = load_for_inference(tag, trust_checkpoint=True)
    config = EvalConfig(batches=2)
    batches = eval_batches(validation_windows(manifest, 2, 8), config, pad_id=0)
    offline = evaluate(model.loss, batches, torch.device("cpu"))
    online = [r for r in records if r["kind"] == "eval"][-1]["tasks"]
    for task, row in online.items():
        assert offline[task]["nll"] == pytest.approx(row["nll"], rel=1e-5), task

    # Load: resume=auto restores engine + data and goes on.
    resumed = torchrun(run_dir, manifest, f"deepspeed.zero_stage={stage}", "trainer.max_steps=18",
                       "trainer.save_every=8")
    assert "resumed from" in resumed.stderr and "step_00000016" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 19))


@pytest.mark.slow
def test_activation_checkpointing_under_zero3_gives_the_same_losses(tmp_path, manifest):
    """Recomputing each block in the backward pass changes memory, not the numbers."""
    losses = {}
    for flag in ("false", "true"):
        run_dir = tmp_path / flag
        command = [sys.executable, "-m", "pretrain.train", "deepspeed=cpu", "deepspeed.zero_stage=3", "model.d_model=32",
                   "model.n_layers=2", "model.n_heads=2", "data.batch_size=4", "trainer.progress=false",
                   "trainer.loggers=[jsonl]", "trainer.max_steps=4", "trainer.log_every=1", "trainer.lr=1e-2",
                   "trainer.warmup_steps=1", "eval.batches=1", "eval.plot=false", "trainer.export_at_end=false",
                   f"model.activation_checkpointing={flag}", "data.kind=manifest", f"data.manifest={manifest}",
                   f"run_dir={run_dir}"]
        result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses["true"]) == 4
    np.testing.assert_allclose(losses["true"], losses["false"], rtol=1e-6)


def test_a_command_leaves_its_process_group_before_exiting():
    """`python -m pretrain.train` / `pretrain.finetune` destroy the group after main() returns
    (engine.leave_process_group); a second call, and a process without a group, are no-ops."""
    script = ("import torch.distributed as dist\n"
              "from pretrain.train.engine import leave_process_group\n"
              "leave_process_group()\n"
              "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
              "assert dist.is_initialized()\n"
              "leave_process_group()\n"
              "assert not dist.is_initialized()\n"
              "leave_process_group()\n"
              "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    for module in ("pretrain.train", "pretrain.finetune"):
        main = Path(__import__(module, fromlist=["__main__"]).__file__).with_name("__main__.py").read_text()
        assert main.index("main()") < main.index("leave_process_group()") < main.index("sys.exit")
