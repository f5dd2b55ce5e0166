import runpy
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench_script(monkeypatch):
    """bench/<name>.py loaded as `python bench/<name>.py` sees itself (its own folder first on
    sys.path, where sibling scripts import each other from), without running its main."""
    def load(name: str) -> dict:
        monkeypatch.syspath_prepend(str(BENCH_DIR))
        return runpy.run_path(str(BENCH_DIR / f"{name}.py"))
    return load
