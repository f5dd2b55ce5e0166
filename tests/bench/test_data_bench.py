import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "data.py"


def test_quick_benchmark_prints_every_row(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_data", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--cache", str(tmp_path), "--workers", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    values = dict(re.findall(r"^\| (.+?) \| ([^|]+) \|$", result.stdout, flags=re.M))
    for row in module.ROWS:
        value = float(values[row].replace(",", ""))
        assert math.isfinite(value) and value > 0, row
