"""Checkpoint discovery (completion marker), retention, resume=auto and loading for inference."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.loading import load_for_inference
from pretrain.checkpoint.sharded import COMPLETE, META, complete_checkpoints, file_sizes, find_checkpoint
from pretrain.checkpoint.export import load_exported

REPO = Path(__file__).resolve().parents[3]
TINY = ["deepspeed=cpu", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.batch_size=4",
        "trainer.progress=false", "trainer.warmup_steps=2", "trainer.lr=3e-3",
        "eval.batches=1", "eval.plot=false", "trainer.eval_every=0", "trainer.log_every=1"]


def train(run_dir, manifest, *overrides, expect=0):
    result = subprocess.run([sys.executable, "-m", "pretrain.train", *TINY, "data.kind=manifest",
                             f"data.manifest={manifest}", f"run_dir={run_dir}", *overrides],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def fake_tag(root: Path, step: int, complete: bool) -> Path:
    """A tag directory as save_checkpoint leaves it (COMPLETE records its files' sizes), without weights."""
    tag = root / "checkpoints" / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / META).write_text(json.dumps({"world_size": 1, "progress": {"step": step}, "config": {"model": {}}}))
    if complete:
        (tag / COMPLETE).write_text(json.dumps({"files": file_sizes(tag)}))
    return tag


def test_only_complete_checkpoints_are_found_newest_first(tmp_path):
    assert find_checkpoint(tmp_path) is None
    fake_tag(tmp_path, 5, True)
    newest_complete = fake_tag(tmp_path, 20, True)
    interrupted = fake_tag(tmp_path, 30, False)  # killed mid-write: no marker
    fake_tag(tmp_path, 100, False)
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000005", "step_00000020"]
    for where in (tmp_path, tmp_path / "checkpoints", newest_complete):
        assert find_checkpoint(where) == newest_complete
    assert find_checkpoint(interrupted) is None
    with pytest.raises(ValueError, match="no exported model"):
        load_for_inference(interrupted)


def test_retention_resume_and_every_inference_path_agree(tmp_path, manifest):
    run_dir = tmp_path / "run"
    train(run_dir, manifest, "trainer.max_steps=3", "trainer.save_every=1", "trainer.keep_last=2")
    tags = complete_checkpoints(run_dir / "checkpoints")
    assert [t.name for t in tags] == ["step_00000002", "step_00000003"]  # keep_last=2
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    meta = json.loads((tags[-1] / META).read_text())
    assert meta["progress"]["step"] == 3 and meta["world_size"] == 1
    assert meta["config"]["model"]["d_model"] == 32 and "git_revision" in meta

    from_run, _ = load_for_inference(run_dir / "checkpoints", trust_checkpoint=True)
    from_tag, _ = load_for_inference(tags[-1], trust_checkpoint=True)
    exported, export_meta = load_exported(run_dir / "export")
    from_export, _ = load_for_inference(run_dir / "export")
    assert export_meta["progress"]["step"] == 3
    tokenizer_hash = json.loads(Path(manifest).read_text())["tokenizer"]["sha256"]
    assert meta["tokenizer_sha256"] == export_meta["tokenizer_sha256"] == tokenizer_hash
    reference = from_run.state_dict()
    for model in (from_tag, exported, from_export):
        for key, value in model.state_dict().items():
            assert torch.equal(value, reference[key]), key
    # The DeepSpeed model file holds the trained weights too (stage 1 keeps full weights per rank).
    module = torch.load(tags[-1] / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert torch.equal(module["model.embed.weight"].float(), reference["embed.weight"])

    # TensorBoard holds the same training scalars as metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(train_losses, rel=1e-6)
    assert "eval/tasks/joint" in events.Tags()["scalars"]

    # The command-line export of a checkpoint gives the same weights.
    cli = subprocess.run([sys.executable, "-m", "pretrain.checkpoint", str(tags[0]), str(tmp_path / "step2"),
                          "--trust-checkpoint"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    step2, step2_meta = load_exported(tmp_path / "step2")
    assert step2_meta["progress"]["step"] == 2
    assert not torch.equal(step2.embed.weight, from_run.embed.weight)

    # A checkpoint whose marker is missing (killed mid-write) is skipped by resume=auto and replaced.
    (tags[-1] / COMPLETE).unlink()
    model, meta = load_for_inference(run_dir / "checkpoints", trust_checkpoint=True)
    assert meta["progress"]["step"] == 2
    result = train(run_dir, manifest, "trainer.max_steps=4", "trainer.save_every=1", "trainer.keep_last=2")
    assert "resumed from" in result.stderr and "step_00000002" in result.stderr
    assert [t.name for t in complete_checkpoints(run_dir / "checkpoints")] == ["step_00000003", "step_00000004"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # the interrupted attempt's step-3 record was replaced, not duplicated

    # Resuming with data settings that change the sample order fails with a clear way out.
    changed = train(run_dir, manifest, "trainer.max_steps=5", "data.batch_size=2", expect=2)
    assert "batch_size" in changed.stderr and "resume=never" in changed.stderr
