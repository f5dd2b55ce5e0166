"""bench/decode.py: the --quick run has every sampler row, finite speeds and exact quality figures."""
import json
import math


def test_quick_decode_bench_has_every_row(tmp_path, capsys, bench_script):
    out = tmp_path / "decode.json"
    rows = bench_script("decode")["main"](["--quick", "--no-tiny", "--batch-sizes", "1", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    systems = {r["system"] for r in rows}
    assert {"sequential", "group_parallel k=4 random", "group_parallel k=2 confidence", "remask K=6",
            "hf-xlnet generate", "speculative k=2", "speculative k=4 adaptive"} <= systems
    exact = {r["system"]: r for r in rows if r["table"] == "exactness"}
    assert set(exact) == {"sequential", "speculative k=4", "group_parallel k=4 strided"}
    for row in exact.values():
        assert row["n_samples"] == 16 and 0 < row["nll_per_token"] < 20 and row["standard_error"] > 0
    rows = [r for r in rows if r["table"] != "exactness"]
    for row in rows:
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert 1 <= row["tokens_per_pass"] <= (5 if row["system"].startswith("speculative k=4") else 8)
        if row["system"] == "sequential":
            assert row["vs_sequential"] == 1.0 and row["quality_vs_sequential"] == 1.0
        if row["system"] != "hf-xlnet generate":
            # -log q per token of sequences from an 8-state chain: between 0 and a generous bound
            # (an untrained model's samples cost up to ~ -log min transition probability).
            assert 0 < row["nll_per_token"] < 20 and 0 <= row["position_entropy"] <= math.log(8) + 1e-9
    printed = capsys.readouterr().out
    assert "goals:" in printed and "group_parallel k=4 random, B=2" in printed and "nan" not in printed.lower()
    assert "speculative k=4, B=1:" in printed and "[exactness] speculative k=4: -log q" in printed
