"""The Makefile's set-up logic: which Python makes .venv and where torch comes from.

`make -n` prints the commands it would run without running them, so the selection logic is
checked with fake executables on a PATH that holds nothing else (no network, nothing installed).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="GNU make is not installed")


def fake_bin(directory: Path, name: str, exit_code: int = 0) -> None:
    """An executable that exits with `exit_code` whatever it is asked (e.g. the version check)."""
    path = directory / name
    path.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    path.chmod(0o755)


def make(tmp_path: Path, *args: str, dry_run: bool = True) -> subprocess.CompletedProcess:
    env = {"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path)}
    command = [MAKE, "--no-print-directory", "-C", str(REPO)] + (["-n"] if dry_run else [])
    return subprocess.run(command + [f"VENV={tmp_path / 'venv'}", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def bin_dir(tmp_path):
    (tmp_path / "bin").mkdir()
    return tmp_path / "bin"


def test_newest_python_at_least_3_10_is_chosen(tmp_path, bin_dir):
    fake_bin(bin_dir, "python3.10")
    fake_bin(bin_dir, "python3.12")
    fake_bin(bin_dir, "python3.13", exit_code=1)  # present but fails the version check
    out = make(tmp_path, "install")
    assert out.returncode == 0, out.stderr
    assert "python3.12 -m venv" in out.stdout
    assert "python3.10 -m venv" not in out.stdout


def test_plain_python3_is_the_fallback(tmp_path, bin_dir):
    fake_bin(bin_dir, "python3")
    out = make(tmp_path, "install")
    assert out.returncode == 0, out.stderr
    assert "python3 -m venv" in out.stdout


def test_python_variable_overrides_the_search(tmp_path, bin_dir):
    fake_bin(bin_dir, "python3.12")
    out = make(tmp_path, "install", "PYTHON=/opt/custom/bin/python3.11")
    assert out.returncode == 0, out.stderr
    assert "/opt/custom/bin/python3.11 -m venv" in out.stdout
    assert "python3.12 -m venv" not in out.stdout


def test_no_suitable_python_fails_with_one_line(tmp_path, bin_dir):
    fake_bin(bin_dir, "python3", exit_code=1)  # e.g. a python3 that is 3.9
    out = make(tmp_path, "install", dry_run=False)
    assert out.returncode != 0
    assert "error: no Python >= 3.10 found on PATH; run with PYTHON=" in out.stderr
    assert not (tmp_path / "venv").exists()


def fake_venv(tmp_path: Path, probe_exit: int, install_seconds: float = 0.0) -> Path:
    """A .venv whose python logs every call to calls.log and succeeds, except the index probe
    (`python -c ...`), which exits with `probe_exit`; `pip install` takes install_seconds.
    The PATH gets the few real tools a recipe uses besides the shell's builtins."""
    log = tmp_path / "calls.log"
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncase "$1" in -c) exit {probe_exit};; esac\n'
                      f'case "$*" in *" install "*) sleep {install_seconds};; esac\nexit 0\n')
    python.chmod(0o755)
    for tool in ("sleep", "touch"):
        (tmp_path / "bin" / tool).symlink_to(shutil.which(tool))
    return log


@pytest.mark.parametrize("reachable", [True, False])
def test_cpu_machine_probes_the_cpu_index_once_then_installs_torch(tmp_path, bin_dir, reachable):
    """Reachable: torch from the CPU index. Not: one line saying so, and torch from pip's own index
    configuration (this machine's pip finds CPU wheels on disk) instead of a minute of retries."""
    log = fake_venv(tmp_path, probe_exit=0 if reachable else 1)
    out = make(tmp_path, "install", dry_run=False)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    probes = [c for c in calls if c.startswith("-c ")]
    assert len(probes) == 1 and probes[0].endswith("https://download.pytorch.org/whl/cpu/torch/ 5")
    torch = [c for c in calls if "torch==" in c]
    if reachable:
        assert torch == ["-m pip install -q --index-url https://download.pytorch.org/whl/cpu torch==2.13.0"]
    else:
        assert torch == ["-m pip install -q torch==2.13.0"]
        said = [line for line in out.stdout.splitlines() if "did not answer" in line]
        assert len(said) == 1 and "https://download.pytorch.org/whl/cpu did not answer within 5 s" in said[0]
    assert "-m pip install -q triton==3.6.0" in calls
    assert (tmp_path / "venv" / ".installed").is_file()


def test_every_install_step_says_something_while_it_works(tmp_path, bin_dir):
    """pip -q is silent while it builds or unpacks: each step prints a line every BEAT_S seconds."""
    fake_venv(tmp_path, probe_exit=0, install_seconds=2.5)
    out = make(tmp_path, "install", "BEAT_S=1", dry_run=False)
    assert out.returncode == 0, out.stderr
    for what in ("setuptools and wheel", "torch", "triton", "DeepSpeed", "biglearn"):
        assert f"  ... installing {what} (2 s)" in out.stdout, (what, out.stdout)


def test_a_failing_install_step_fails_make(tmp_path, bin_dir):
    log = fake_venv(tmp_path, probe_exit=0)
    python = tmp_path / "venv" / "bin" / "python"
    python.write_text(python.read_text().replace('exit 0\n', 'case "$*" in *deepspeed*) exit 3;; esac\nexit 0\n'))
    out = make(tmp_path, "install", dry_run=False)
    assert out.returncode != 0 and not (tmp_path / "venv" / ".installed").exists()
    assert not any("-e ." in call for call in log.read_text().splitlines())


def test_gpu_machine_keeps_the_default_torch_build(tmp_path, bin_dir):
    fake_bin(bin_dir, "python3.11")
    fake_bin(bin_dir, "nvidia-smi")  # `nvidia-smi -L` succeeds: a driver and a GPU
    out = make(tmp_path, "install")
    assert out.returncode == 0, out.stderr
    assert "download.pytorch.org" not in out.stdout
    assert not any("torch==" in line for line in out.stdout.splitlines())


def test_broken_nvidia_smi_counts_as_no_gpu(tmp_path, bin_dir):
    fake_bin(bin_dir, "python3.11")
    fake_bin(bin_dir, "nvidia-smi", exit_code=9)  # driver present, no usable GPU
    out = make(tmp_path, "install")
    assert "--index-url https://download.pytorch.org/whl/cpu" in out.stdout


def test_demo_installs_no_test_or_benchmark_extras(tmp_path, bin_dir):
    fake_bin(bin_dir, "python3.11")
    demo = make(tmp_path, "demo").stdout
    assert "pretrain.experiments.demo" in demo
    assert ".[dev]" not in demo and ".[bench]" not in demo
    assert ".[dev]" in make(tmp_path, "test").stdout
    assert ".[bench]" in make(tmp_path, "bench").stdout


def test_torch_index_can_be_overridden(tmp_path, bin_dir):
    log = fake_venv(tmp_path, probe_exit=0)
    out = make(tmp_path, "install", "TORCH_INDEX=https://mirror.example/whl/cpu", dry_run=False)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    assert any(c.startswith("-c ") and "https://mirror.example/whl/cpu/torch/" in c for c in calls)
    assert "-m pip install -q --index-url https://mirror.example/whl/cpu torch==2.13.0" in calls
