"""Data pipeline throughput: shard building, and reader + objective sampler + collator.

Rows (one table, markdown):
- shard build: tokens/s per tokenizer worker (tokenize + cut windows + write tar), on the
  built-in stdlib corpus, and the wall-clock rate of the whole build (reading sources included);
- reader: ready TaskBatches/s per worker (in-process) at L=512, B=8 for biglearn and plm, and
  for biglearn with 2 worker processes (wall clock);
- sampler + collate only, on in-memory windows (plm);
- Hugging Face DataCollatorForPermutationLanguageModeling on the same windows, and the speedups.

The per-worker rows and the HF row are timed in the same process, in interleaved rounds, in
CPU time (one thread each, as in a loader worker): on a shared machine their ratio is steadier
than wall-clock rates taken one after another.

    python bench/data.py            # full demo corpus (a few minutes on 2 cores)
    python bench/data.py --quick    # 40 stdlib modules, fewer batches (~30 s)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_pipeline import ShardConfig, SourceConfig, Tokenizer, build_demo, build_shards
from data_pipeline.manifest import load_manifest, shard_file
from data_pipeline.shard_format import read_shard
from pretrain.layout import collate
from pretrain.data import BatchStream
from pretrain.objectives import ObjectiveSampler

ROWS = ("shard build, tokens/s per worker", "shard build, wall tokens/s (all workers, reading included)",
        "reader biglearn, batches/s per worker", "reader plm, batches/s per worker",
        "reader biglearn, batches/s with 2 worker processes (wall)", "sampler+collate plm (in memory), batches/s",
        "HF DataCollatorForPermutationLanguageModeling, batches/s",
        "speedup: reader plm / HF", "speedup: reader biglearn / HF", "speedup: sampler+collate plm / HF")


def bench_build(tokenizer_dir: Path, out: Path, seq_len: int, workers: int, stdlib_limit) -> tuple[float, float]:
    config = ShardConfig(seq_len=seq_len, shard_size_mb=0.125, val_fraction=0.05, num_workers=workers)
    started = time.perf_counter()
    manifest = json.loads(build_shards(["stdlib"], tokenizer_dir, out, config, SourceConfig(stdlib_limit=stdlib_limit),
                                       progress=False).read_text())
    wall = time.perf_counter() - started
    tokens = sum(s["tokens"] for s in manifest["shards"])
    return manifest["build"]["tokens_per_second_per_worker"], tokens / wall


def reader_batches(manifest: Path, objective: str, num_workers: int = 0):
    """An endless iterator of ready batches, warmed up (first block read, workers started), and its stream."""
    stream = BatchStream(manifest, sampler=ObjectiveSampler(objective), batch_size=8, num_workers=num_workers, seed=0)
    iterator = iter(stream)
    for _ in range(3 if num_workers == 0 else 10):
        next(iterator)
    return iterator, stream


def bench_workers(manifest: Path, n_batches: int) -> float:
    """Wall-clock batches/s of biglearn with 2 worker processes (CPU time would miss the workers)."""
    iterator, stream = reader_batches(manifest, "biglearn", num_workers=2)
    started = time.perf_counter()
    for _ in range(n_batches):
        next(iterator)
    elapsed = time.perf_counter() - started
    stream.close()
    return n_batches / elapsed


def load_windows(manifest_path: Path, n: int) -> list[np.ndarray]:
    manifest = load_manifest(manifest_path)
    windows = []
    for entry in manifest["shards"]:
        for sample in read_shard(shard_file(manifest, entry), np.dtype(manifest["token_dtype"])):
            if len(sample.tokens) == manifest["seq_len"]:
                windows.append(sample.tokens.astype(np.int64))
            if len(windows) == n:
                return windows
    raise ValueError(f"{manifest_path}: fewer than {n} full windows")


def collate_batches(windows, batches: list, pad_id: int):
    """Endless sampler + collate (plm) on in-memory windows, cycling through `batches`."""
    sampler, rng = ObjectiveSampler("plm"), np.random.default_rng(0)
    while True:
        for batch in batches:
            yield collate([windows[i] for i in batch], [sampler(len(windows[i]), rng) for i in batch], pad_id)


def hf_batches(tokenizer: Tokenizer, windows, batches: list):
    """Endless Hugging Face PLM collator (span targets of at most 5 tokens, 1/6 of the tokens:
    what our plm predicts) on the same windows, warmed up."""
    from transformers import DataCollatorForPermutationLanguageModeling, XLNetTokenizer
    import torch

    processor = tokenizer.processor
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    hf_tokenizer = XLNetTokenizer(vocab=vocab, unk_id=tokenizer.unk_id, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>", mask_token="<sentinel_0>")
    collator = DataCollatorForPermutationLanguageModeling(tokenizer=hf_tokenizer, plm_probability=1 / 6,
                                                          max_span_length=5)
    examples = [torch.from_numpy(w) for w in windows]
    collator([examples[i] for i in batches[0]])

    def run():
        while True:
            for batch in batches:
                yield collator([examples[i] for i in batch])
    return run()


def interleaved_rates(sources: dict, per_round: dict, rounds: int, progress: bool) -> dict:
    """Batches per CPU second of each iterator, timed in `rounds` interleaved rounds of
    `per_round[name]` batches each (so every row sees the same mix of machine load)."""
    seconds = dict.fromkeys(sources, 0.0)
    for r in range(rounds):
        for name, iterator in sources.items():
            started = time.process_time()
            for _ in range(per_round[name]):
                next(iterator)
            seconds[name] += time.process_time() - started
        if progress:
            print(f"\rtiming round {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return {name: rounds * per_round[name] / seconds[name] for name in sources}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small corpus and few batches (for tests)")
    parser.add_argument("--cache", default="runs/bench_data", help="where the demo tokenizer/shards are kept")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes for the build")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 20, quick 2)")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # one thread per loader worker, as torch's DataLoader workers run
    limit = 40 if args.quick else None
    rounds = args.rounds or (2 if args.quick else 20)
    ours, hf = (10, 2) if args.quick else (100, 8)  # batches per round: ~equal time for each row
    seq_len = 512

    cache = Path(args.cache) / ("quick" if args.quick else "full")
    manifest = build_demo(cache, vocab_size=400 if args.quick else 8000, seq_len=seq_len, stdlib_limit=limit,
                          num_workers=args.workers, progress=False)
    tokenizer_dir = cache / "tokenizer"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results[ROWS[0]], results[ROWS[1]] = bench_build(tokenizer_dir, Path(tmp), seq_len, args.workers, limit)
    results[ROWS[4]] = bench_workers(manifest, ours * rounds // 4)
    windows = load_windows(manifest, 64)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(windows), 8, replace=False) for _ in range(ours)]
    (biglearn, biglearn_stream), (plm, plm_stream) = reader_batches(manifest, "biglearn"), reader_batches(manifest, "plm")
    load_before = os.getloadavg()[0]
    rates = interleaved_rates(
        {"biglearn": biglearn, "plm": plm, "collate": collate_batches(windows, batches, load_manifest(manifest)["pad_id"]),
         "hf": hf_batches(Tokenizer.load(tokenizer_dir), windows, batches)},
        {"biglearn": ours, "plm": ours, "collate": ours, "hf": hf}, rounds, progress=not args.quick)
    biglearn_stream.close()
    plm_stream.close()
    results[ROWS[2]], results[ROWS[3]], results[ROWS[5]], results[ROWS[6]] = (
        rates["biglearn"], rates["plm"], rates["collate"], rates["hf"])
    results[ROWS[7]] = rates["plm"] / rates["hf"]
    results[ROWS[8]] = rates["biglearn"] / rates["hf"]
    results[ROWS[9]] = rates["collate"] / rates["hf"]

    print(f"data pipeline, L={seq_len}, B=8, corpus: stdlib docstrings{' (first 40 modules)' if args.quick else ''}, "
          f"{args.workers} build workers, {os.cpu_count()} CPUs; per-worker rows: CPU time, {rounds} interleaved "
          f"rounds; load average before/after timing: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    print("| measurement | value |\n|---|---|")
    for row in ROWS:
        value = results[row]
        print(f"| {row} | {value:,.0f} |" if value >= 100 else f"| {row} | {value:.1f} |")
    if args.json:
        print(json.dumps(results))
    assert all(math.isfinite(v) for v in results.values())
    return results


if __name__ == "__main__":
    main()
