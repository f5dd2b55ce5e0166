"""What the single-stream first-query rule costs a training step (issue 26, docs/benchmarks.md).

Since issue 26 the first target after a non-empty S is predicted by a query row, not by START
(docs/design.md, "Stream modes"). This times a forward + backward step on the SAME big-learning
batch under both rules, interleaved in one process: the new rule as collate writes it, and the
old one emulated by handing each such first target back to START (a layout the model accepts).

    python bench/first_query_cost.py              # L=512, bench/peers.py's tiny shape
    python bench/first_query_cost.py --length 1024
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import torch

from pretrain.layout import QUERY_PREDICTOR, START_PREDICTOR, collate
from pretrain.model import BigLearner, ModelConfig
from pretrain.objectives import ObjectiveSampler


def step_seconds(model, batch) -> float:
    """Process CPU seconds of one forward + backward."""
    start = time.process_time()
    loss, _ = model.loss(batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--length", type=int, default=512, help="window length L")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per rule, in turns")
    parser.add_argument("--preset", default="biglearn", help="objective preset of the batch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=8000, d_model=256, n_layers=4, n_heads=4, ffn_hidden=1024,
                         max_seq_len=args.length, streams=1)
    model = BigLearner(config)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, config.vocab_size, (args.batch_size, args.length))
    specs = [ObjectiveSampler(args.preset)(args.length, rng) for _ in range(args.batch_size)]
    new = collate(windows, specs, pad_id=0).to_torch()
    after_source = (new.n_source > 0) & (new.predictor[:, 0] == QUERY_PREDICTOR)
    old = replace(new, predictor=new.predictor.clone())
    old.predictor[:, 0] = torch.where(after_source, START_PREDICTOR, old.predictor[:, 0])
    print(f"{int(after_source.sum())} of {args.batch_size} samples have a first-target query row", flush=True)
    rules = {"first query (new)": new, "START (old)": old}
    for batch in rules.values():  # warm-up
        step_seconds(model, batch)
    times = {name: [] for name in rules}
    for r in range(args.rounds):
        for name in (list(rules) if r % 2 == 0 else list(rules)[::-1]):
            times[name].append(step_seconds(model, rules[name]))
        print(f"round {r + 1}/{args.rounds}", flush=True)
    median = {name: float(np.median(t)) for name, t in times.items()}
    ratio = median["first query (new)"] / median["START (old)"]
    for name, seconds in median.items():
        print(f"{name:>18}: {seconds:.3f} s per step (median)")
    print(f"new / old = {ratio:.3f}   (L={args.length}, B={args.batch_size}, 1-minute load {os.getloadavg()[0]:.1f})")
    return {"median_s": median, "ratio": ratio}


if __name__ == "__main__":
    main()
