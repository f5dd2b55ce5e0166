"""bench/gan.py as a user types it: --quick trains both arms, measures and draws, with every
advertised JSON key; a bad configuration is one line and exit status 2."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "bench/gan.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_quick_run_writes_every_key(tmp_path):
    out = tmp_path / "metrics.json"
    done = run("--quick", "--json", str(out), "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(out.read_text())
    arms = {"gan", "biglearn_gan"}
    assert set(metrics["frechet"]) == set(metrics["class_coverage"]) == set(metrics["params"]) == arms
    assert set(metrics["class_consistency"]) == set(metrics["class_consistency_nearest"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}
    assert metrics["params"]["gan"] == metrics["params"]["biglearn_gan"]
    assert all(math.isfinite(v) and v >= 0 for v in metrics["frechet"].values())
    assert all(0 <= v <= math.log(10) + 1e-9 for v in metrics["class_coverage"].values())
    assert all(0 <= v <= 1 for v in [*metrics["class_consistency"].values(), *metrics["class_consistency_nearest"].values(),
                                     metrics["classifier_accuracy"]])
    assert metrics["classifier_accuracy"] > 0.8
    assert all(len(curve) >= 2 for curve in metrics["curves"].values())
    for name in ("gan_joint.png", "gan_completion.png", "gan_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| BigLearn-GAN (universal, eq. 8) |" in done.stdout


def test_chimera_probe_trains_only_a_discriminator(tmp_path):
    out = tmp_path / "probe.json"
    done = run("--quick", "--chimera-probe", "12", "--json", str(out), "train.r1_every=2", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    points = json.loads(out.read_text())["chimera_probe"]
    assert [p["step"] for p in points] == [12] and all(0 < p["d_loss"] < 10 for p in points)
    assert "| 12 |" in done.stdout and "BigLearn-GAN" not in done.stdout


def test_a_negative_penalty_is_one_line_and_exit_2():
    done = run("--no-figures", "train.r1_weight=-1", timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == "bench/gan.py: error: train.r1_weight must be a number >= 0; got -1.0\n"


@pytest.mark.parametrize("args, message", [
    (["eval.completion_ratios=[0.5,1.5]"], "eval.completion_ratios must be S-ratios in [0, 1]"),
    (["--arms", "gan,wgan"], "--arms: unknown arm 'wgan'; choose from gan, biglearn_gan"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--chimera-probe", "-1"], "--chimera-probe must be >= 0, got -1"),
    (["train.no_such_key=1"], "no_such_key"),
])
def test_bad_configuration_is_one_line_and_exit_2(bench_script, capsys, args, message):
    """The same checks in process (each subprocess costs a torch import): cli_main's exit status
    and the parser's."""
    from data_pipeline.errors import cli_main
    gan = bench_script("gan")
    try:
        status = cli_main(gan["main"], "bench/gan.py", ["--no-figures", *args])
    except SystemExit as stop:  # the argument parser exits itself
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and message in err, err
