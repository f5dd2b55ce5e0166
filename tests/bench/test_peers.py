"""bench/peers.py: the --quick run has every row, finite; helpers checked against closed forms."""
import json
import math

import numpy as np
import pytest


@pytest.fixture
def peers(bench_script):
    return bench_script("peers")


def test_quick_peers_has_every_row_and_a_plot(tmp_path, capsys, peers):
    out = tmp_path / "peers.json"
    systems = ["ours", "hf-xlnet", "hf-llama", "ours-1-clm"]  # every kind of worker, fewer processes
    rows = peers["main"](["--quick", "--json", str(out), "--systems", *systems, "--interleaved"])
    assert json.loads(out.read_text()) == rows
    compared = [r for r in rows if r["table"] == "peers"]
    assert [(r["system"], r["seq_len"]) for r in compared] == [(s, 32) for s in systems]
    objective = [r for r in rows if r["table"] == "objective"]
    assert [(r["streams"], r["preset"]) for r in objective] == [(s, p) for s in (1, 2) for p in ("clm", "mlm", "plm", "biglearn")]
    for row in compared + objective:
        assert "error" not in row, row.get("error")
        for key in ("tokens_per_s", "predicted_per_s", "step_s", "cpu_s", "peak_mem_bytes"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert 1 <= row["predicted_per_step"] <= row["batch_size"] * row["seq_len"]
    assert compared[2]["predicted_per_step"] == 2 * 31  # Llama predicts L - 1 tokens per window
    assert compared[3]["predicted_per_step"] == 2 * 32  # ours from the START row on
    assert objective[0]["vs_clm"] == 1.0 and objective[4]["vs_clm"] == 1.0
    # single-stream clm computes one row per predicted token, two streams 2 - 1/L
    assert objective[0]["rows_per_pred"] == 1.0 and objective[4]["rows_per_pred"] == pytest.approx(2 - 1 / 32)
    # --interleaved: the same systems timed in one process, with the same predicted tokens per step
    interleaved = {r["system"]: r for r in rows if r["table"] == "interleaved"}
    assert sorted(interleaved) == sorted(systems)
    for row in compared:
        assert interleaved[row["system"]]["predicted_per_step"] == row["predicted_per_step"]
        assert math.isfinite(interleaved[row["system"]]["cpu_s"]) and interleaved[row["system"]]["cpu_s"] > 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower() and "hf-xlnet" in printed and "hf-llama" in printed


def test_yardstick_ratios_against_llama(peers):
    rng = np.random.default_rng()
    llama_step, ours_step, pred = rng.uniform(0.1, 1), rng.uniform(0.1, 1), rng.uniform(10, 100)
    rows = [{"system": "hf-llama", "seq_len": 64, "step_s": llama_step, "predicted_per_step": 2 * pred,
             "peak_mem_bytes": 4e6, "load_1min": 1.0},
            {"system": "ours-1-biglearn", "seq_len": 64, "step_s": ours_step, "predicted_per_step": pred,
             "peak_mem_bytes": 1e6, "load_1min": 1.0}]
    llama, got = peers["yardstick_rows"](rows)
    assert llama["step_vs_llama"] == llama["per_pred_vs_llama"] == llama["mem_vs_llama"] == 1
    assert got["step_vs_llama"] == pytest.approx(ours_step / llama_step)
    assert got["per_pred_vs_llama"] == pytest.approx(2 * ours_step / llama_step)
    assert got["mem_vs_llama"] == pytest.approx(0.25)


def test_interleaved_ratios_against_llama_and_xlnet(peers):
    rng = np.random.default_rng()
    cpu = dict(zip(("hf-llama", "ours-1-clm", "ours", "hf-xlnet"), rng.uniform(0.1, 5, 4)))
    predicted = {"hf-llama": 63.0, "ours-1-clm": 64.0, "ours": 11.0, "hf-xlnet": 11.0}
    rows = [{"system": s, "seq_len": 32, "cpu_s": cpu[s], "predicted_per_step": predicted[s], "load_1min": 1.0}
            for s in cpu]
    got = {r["system"]: r for r in peers["interleaved_rows"](rows)}
    assert got["hf-llama"]["cpu_vs_llama"] == got["hf-llama"]["per_pred_vs_llama"] == 1
    assert got["ours-1-clm"]["cpu_vs_llama"] == pytest.approx(cpu["ours-1-clm"] / cpu["hf-llama"])
    assert got["ours-1-clm"]["per_pred_vs_llama"] == pytest.approx(cpu["ours-1-clm"] / cpu["hf-llama"] * 63 / 64)
    assert got["ours"]["speed_vs_xlnet"] == pytest.approx(cpu["hf-xlnet"] / cpu["ours"])
    assert "cpu_vs_llama" not in got["ours"] and "speed_vs_xlnet" not in got["ours-1-clm"]


def test_scaling_exponents_match_a_power_law(peers):
    """step time ~ L^1.5 and memory ~ L^1 give those exponents and per-token ratios 2^0.5."""
    rng = np.random.default_rng()
    a_time, a_mem = rng.uniform(1, 2), rng.uniform(0.5, 1.5)
    rows = [{"system": "ours", "seq_len": n, "batch_size": 8, "step_s": 0.01 * n**a_time,
             "cpu_s": 0.02 * n**a_time, "peak_mem_bytes": 1e6 * n**a_mem} for n in (128, 256, 512, 1024)]
    got = peers["scaling_rows"](rows)
    assert [r["seq_len"] for r in got] == [128, 256, 512, 1024]
    for r in got:
        assert r["time_exponent"] == pytest.approx(a_time) and r["mem_exponent"] == pytest.approx(a_mem)
        assert r["cpu_time_exponent"] == pytest.approx(a_time)
    for r in got[1:]:
        assert r["per_token_vs_prev"] == pytest.approx(2 ** (a_time - 1))
        assert r["mem_vs_prev"] == pytest.approx(2**a_mem)


def test_both_systems_predict_the_same_share_of_tokens(peers, bench_script):
    """Our plm preset (span=True) and HF's PLM collator draw the same q(S, T): ~1/6 predicted, in
    spans of mean length 3 (U[1, 5]); compared over fresh random draws."""
    import torch

    length, batch = 600, 48
    hf = peers["xlnet_collator"](8000)([torch.randint(5, 8000, (length,)) for _ in range(batch)])
    hf_targets = (hf["labels"] != -100).numpy()
    throughput = bench_script("throughput")
    ours = throughput["batch_maker"]("plm", length, batch, 8000, int(np.random.default_rng().integers(1 << 30)))(0)
    our_targets = np.zeros((batch, length), dtype=bool)
    for b in range(batch):
        rows = ours.target_index[b][ours.target_mask[b]]
        our_targets[b, ours.positions[b, rows].numpy()] = True

    def mean_run_length(mask):
        starts = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]
        return mask.sum() / starts.sum()

    assert hf_targets.mean() == pytest.approx(our_targets.mean(), rel=0.12)
    assert mean_run_length(hf_targets) == pytest.approx(mean_run_length(our_targets), rel=0.12)
