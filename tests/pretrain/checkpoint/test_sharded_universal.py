"""A run saved on 2 ranks resumes on 1 and on 3 (DeepSpeed ZeRO stages 1-3 on CPU/gloo; the Trainer
loads a universal checkpoint it converts on the fly): the weights and Adam moments after loading equal
the saved ones, the original checkpoint is untouched, and the epoch continues with every
remaining sample exactly once (sample keys logged by each rank)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.manifest import FORMAT, FORMAT_VERSION
from data_pipeline.shard_format import write_shard
from pretrain.checkpoint.sharded import consolidated_state_dict, universal_copy, weights_only_loading

REPO = Path(__file__).resolve().parents[3]
SHARDS, PER_SHARD, BATCH, SAVED_AT = 4, 12, 2, 6  # 48 samples; 2 ranks x 6 steps x 2 leave 24: 12 on 1 rank, 4 on 3
RUN = ["deepspeed=cpu", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", f"data.batch_size={BATCH}",
       "data.kind=manifest", "data.num_workers=0", "trainer.progress=false", "trainer.loggers=[jsonl]",
       "trainer.warmup_steps=2", "trainer.lr=3e-3", "trainer.eval_every=0", "trainer.export_at_end=false",
       "trainer.log_sample_keys=true", "eval.batches=1", "eval.plot=false"]


def _dataset(root: Path) -> Path:
    """SHARDS train shards of PER_SHARD random 16-token windows and one val shard."""
    rng, entries = np.random.default_rng(), []
    for split, stem in [*(("train", f"train-{i:06d}") for i in range(SHARDS)), ("val", "val-000000")]:
        info = write_shard(root / f"{stem}.tar", stem, [rng.integers(4, 50, size=16) for _ in range(PER_SHARD)],
                           np.uint16)
        entries.append({**info, "path": f"{stem}.tar", "split": split, "documents": PER_SHARD})
    tokenizer = {"sha256": "0" * 64, "vocab_size": 50, "pad_id": 0, "bos_id": 2, "eos_id": 3}
    (root / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "version": FORMAT_VERSION, "seq_len": 16, "mode": "concat", "token_dtype": "<u2",
        "pad_id": 0, "eos_id": 3, "vocab_size": 50, "tokenizer": tokenizer, "shards": entries}))
    return root / "manifest.json"


def _train(nproc: int, run_dir: Path, manifest: Path, *overrides: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "pretrain.train", *RUN, f"data.manifest={manifest}",
                           f"run_dir={run_dir}", *overrides],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _keys(run_dir: Path) -> list[list[str]]:
    """Per rank, the keys of every micro-batch it trained on, in order."""
    files = sorted((run_dir / "sample_keys").glob("rank_*.jsonl"))
    return [[key for line in f.read_text().splitlines() for key in json.loads(line)["keys"]] for f in files]


def _adam_steps(tag: Path) -> set[float]:
    """The Adam step counts of every rank and parameter group of a ZeRO-1/2 checkpoint."""
    with weights_only_loading():
        states = [torch.load(f, map_location="cpu")["optimizer_state_dict"] for f in tag.glob("*optim_states.pt")]
    return {float(group["step"]) for s in states for group in s["base_optimizer_state"]["state"].values()}


def _per_parameter_state(tag: Path) -> list[dict[str, torch.Tensor]]:
    """Per parameter, its fp32 weights and Adam moments, as DeepSpeed's converter (ds_to_universal)
    consolidates them from the ranks' partitions. Not the ranks' flat partitions concatenated: a
    checkpoint saved after a universal load stores its last partition without the padding that
    its `group_paddings` still counts (DeepSpeed 0.19), so cutting that padding drops real values."""
    zero = universal_copy(tag, tag.parent.parent / "consolidated", saved_world=0) / "zero"
    with weights_only_loading():
        # A tied weight (the head, shared with the embedding) has its fp32 copy only. The
        # converter writes a ZeRO-1/2 state as {"param": tensor, "cat_dim": ...}, a ZeRO-3 one as the tensor.
        states = [{state: torch.load(param / f"{state}.pt") for state in ("fp32", "exp_avg", "exp_avg_sq")
                   if (param / f"{state}.pt").exists()} for param in sorted(zero.iterdir()) if param.is_dir()]
    return [{name: t["param"] if isinstance(t, dict) else t for name, t in state.items()} for state in states]


def _digest(directory: Path) -> dict[str, str]:
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob("*")) if f.is_file()}


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("stage, new_world", [(1, 1), (1, 3), (2, 3), (3, 3)])
def test_a_run_saved_on_two_ranks_resumes_on_another_world_size(tmp_path, stage, new_world):
    data = tmp_path / "data"
    data.mkdir()
    manifest = _dataset(data)
    saved = tmp_path / "saved"
    _train(2, saved, manifest, f"trainer.max_steps={SAVED_AT}", f"deepspeed.zero_stage={stage}")
    tag = saved / "checkpoints" / f"step_{SAVED_AT:08d}"
    before = _digest(tag)

    # Load on the new world size and save at once (no step): the state must come through unchanged.
    loaded = tmp_path / f"loaded_on_{new_world}"
    out = _train(new_world, loaded, manifest, f"resume={tag}", f"trainer.max_steps={SAVED_AT}",
                 f"deepspeed.zero_stage={stage}")
    assert f"was saved by 2 ranks and this run has {new_world}" in out and "universal checkpoint" in out
    assert _digest(tag) == before  # the original checkpoint is untouched
    again = loaded / "checkpoints" / tag.name
    weights, weights_again = consolidated_state_dict(tag), consolidated_state_dict(again)
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
    state, state_again = _per_parameter_state(tag), _per_parameter_state(again)
    assert [sorted(p) for p in state] == [sorted(p) for p in state_again]
    assert sum("exp_avg" in p for p in state) >= len(state) - 1  # every parameter but a tied one
    for param, param_again in zip(state, state_again, strict=True):
        for name in param:
            assert torch.equal(param[name], param_again[name]), name
    assert all(p["exp_avg_sq"].abs().sum() > 0 for p in state if "exp_avg_sq" in p)  # trained, not a fresh state
    if stage < 3:
        assert _adam_steps(tag) == _adam_steps(again) == {float(SAVED_AT)}

    # Continue on the new world size to the end of the epoch: every sample exactly once.
    remaining = SHARDS * PER_SHARD - 2 * SAVED_AT * BATCH
    steps = remaining // (new_world * BATCH)
    _train(new_world, loaded, manifest, "resume=auto", f"trainer.max_steps={SAVED_AT + steps}",
           f"deepspeed.zero_stage={stage}")
    first = [key for rank in _keys(saved) for key in rank]
    rest = _keys(loaded)
    assert len(rest) == new_world and {len(rank) for rank in rest} == {steps * BATCH}
    rest = [key for rank in rest for key in rank]
    every = {f"train-{i:06d}-{j:07d}" for i in range(SHARDS) for j in range(PER_SHARD)}
    assert len(first) == 2 * SAVED_AT * BATCH and len(set(first + rest)) == len(first + rest)  # none repeated
    assert set(first + rest) == every  # none skipped
    records = [json.loads(line) for line in (loaded / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["kind"] == "train"][-1]["epoch"] == 1  # the epoch ended exactly at the last step
