"""bench/throughput.py --quick runs end to end and reports a finite row per length (never speed)."""
import json
import math
import runpy
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "throughput.py"


def test_quick_throughput_table_has_every_length(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = runpy.run_path(str(BENCH))["main"](["--quick", "--json", str(out)])
    assert [r["seq_len"] for r in rows] == [16, 32]
    for row in rows:
        assert row["system"] == "ours" and row["preset"] == "biglearn" and row["batch_size"] == 2
        for key in ("tokens_per_s", "predicted_per_s", "step_s", "cpu_s"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        # predicted tokens are a subset of the window's B x L tokens
        assert 1 <= row["predicted_per_step"] <= row["batch_size"] * row["seq_len"]
        assert math.isclose(row["tokens_per_s"] * row["step_s"], row["batch_size"] * row["seq_len"])
    assert json.loads(out.read_text()) == rows
    table = capsys.readouterr().out
    assert "tokens/s" in table and "nan" not in table.lower()
