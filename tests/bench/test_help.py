"""Every bench script runs as the docs write it, `python bench/<name>.py`, from the repository root
in a fresh interpreter (no path edits: the installed packages and the script's own folder)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py"))


def test_every_bench_script_is_listed():
    assert len(SCRIPTS) >= 10 and "shootout.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_from_the_root(script):
    done = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout
