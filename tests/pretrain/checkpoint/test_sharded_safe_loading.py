"""A downloaded checkpoint cannot run code: a run directory whose DeepSpeed and trainer files are
crafted pickles is refused by inference, export and resume, and the payload's marker file is
never created. The same payload does create it under a plain torch.load, so the test can fail."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.__main__ import main as export_main
from pretrain.checkpoint.sharded import CheckpointError, rank_file, weights_only_loading
from pretrain.infer import main as infer_main
from pretrain.model import ModelConfig

REPO = Path(__file__).resolve().parents[3]


class Payload:
    """Unpickling this calls open(marker, "w"): arbitrary code, made visible by a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted_run(root: Path, marker: Path) -> Path:
    """A run dir with one complete-looking ZeRO-1 checkpoint whose every .pt file is the payload."""
    tag = root / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    model = ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, max_seq_len=512).to_dict()  # resumable here
    (tag / "meta.json").write_text(json.dumps({"config": {"model": model}, "world_size": 1,
                                               "progress": {"step": 1}}))
    (tag / "COMPLETE").write_text("")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": Payload(marker), "optimizer_state_dict": Payload(marker)}, tag / name)
    torch.save({"data": Payload(marker), "rng": Payload(marker)}, rank_file(tag, 0))
    return root


def cli(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_payload_runs_under_a_plain_unpickler(tmp_path):
    marker = tmp_path / "pwned"
    run = crafted_run(tmp_path / "run", marker)
    torch.load(run / "checkpoints" / "step_00000001" / "rank_00000.pt", weights_only=False)
    assert marker.exists()


def test_crafted_checkpoint_runs_no_code_anywhere(tmp_path, manifest, capsys):
    marker = tmp_path / "pwned"
    run = crafted_run(tmp_path / "run", marker)
    tag = run / "checkpoints" / "step_00000001"

    # Inference without --trust-checkpoint does not open a single pickle.
    assert infer_main(["score", "--model", str(run), "--ids", "1 2 3", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust-checkpoint" in err, err
    # With it, the weights-only unpickler refuses the payload and names the file and the global.
    for main, args in ((infer_main, ["score", "--model", str(run), "--ids", "1 2 3", "--device", "cpu",
                                     "--trust-checkpoint"]),
                       (export_main, [str(run), str(tmp_path / "export"), "--trust-checkpoint"])):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "refused to load" in err and "io.open" in err and str(tag) in err, err
    # Resuming from it (resume=PATH) fails the same way, before any training step.
    result = cli("-m", "pretrain.train", "deepspeed=cpu", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                 "data.kind=manifest", f"data.manifest={manifest}", "trainer.progress=false", "trainer.loggers=[jsonl]", f"run_dir={tmp_path / 'fresh'}",
                 f"resume={tag}")
    assert result.returncode != 0 and "refused to load" in result.stderr, result.stderr[-3000:]
    # The trainer's own per-rank file goes through the same restricted load.
    with pytest.raises(CheckpointError, match="io.open"), weights_only_loading():
        torch.load(rank_file(tag, 0))
    assert not marker.exists()
