"""Does a big learner learn the exact conditionals? Model NLL vs exact conditional entropy.

Trains a tiny BigLearner on a random first-order Markov chain (pretrain.experiments.synthetic) and prints,
for each evaluation task, the model's NLL per target token next to the exact value
E[-log q(x_t | x_S, x_{T_<g})] computed by the forward algorithm on the same samples and splits.

    python bench/groundtruth.py                 # ~5 min on 2 CPU cores
    python bench/groundtruth.py --streams 1 2   # both attention modes, same data and steps, compared
    python bench/groundtruth.py --quick         # seconds; checks the script runs
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from pretrain.model import ModelConfig
from pretrain.objectives import EVAL_TASKS, ObjectiveConfig, ObjectiveSampler, eval_split
from pretrain.experiments.synthetic import MarkovSource, fit, model_target_log_probs


def compare(model, source: MarkovSource, length: int, n_samples: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed + 1)
    x = source.sample(n_samples, length, rng)
    rows = []
    for task in EVAL_TASKS:
        specs = [eval_split(task, length, rng) for _ in range(n_samples)]
        exact = -np.concatenate(source.target_log_probs(x, specs)).mean()
        learned = -np.concatenate(model_target_log_probs(model, x, specs)).mean()
        rows.append({"task": task, "exact_nll": float(exact), "model_nll": float(learned),
                     "ratio": float(learned / exact)})
    return rows


def model_config(source: MarkovSource, streams: int) -> ModelConfig:
    """pretrain.experiments.synthetic.fit's small model in either mode. The chain's states use every token id,
    so the START row gets one more id of its own, as a tokenizer keeps BOS apart from text."""
    return ModelConfig(vocab_size=source.vocab_size + 1, bos_id=source.vocab_size, d_model=64, n_layers=2,
                       n_heads=4, ffn_hidden=128, attention_backend="torch", streams=streams)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--states", type=int, default=8, help="Markov chain alphabet size")
    parser.add_argument("--concentration", type=float, default=0.3, help="Dirichlet concentration of transition rows")
    parser.add_argument("--length", type=int, default=32, help="sequence length")
    parser.add_argument("--steps", type=int, default=800, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--samples", type=int, default=512, help="evaluation samples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--streams", type=int, nargs="+", choices=(1, 2), default=[1],
                        help="model.streams of the model(s) to train; with 1 2 both train on the same data and "
                             "steps and a last table compares them")
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--json", help="write the rows as JSON to this path")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.samples, args.length = 5, 16, 12
    if args.threads:
        torch.set_num_threads(args.threads)
    source = MarkovSource.random(args.states, args.concentration, seed=args.seed)
    # Train on big learning plus the two classic special cases the table reports.
    sampler = ObjectiveSampler(ObjectiveConfig(name="mixture", mixture={"biglearn": 0.6, "clm": 0.2, "mlm": 0.2}))
    rows = []
    for streams in args.streams:
        model = fit(source, sampler, length=args.length, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed, model_config=model_config(source, streams), progress=True)
        mine = [r | {"streams": streams} for r in compare(model, source, args.length, args.samples, args.seed)]
        print(f"\nMarkov chain: {args.states} states, L={args.length}, {args.steps} steps x {args.batch_size}, "
              f"model.streams={streams}")
        print(f"{'task':<15}{'exact NLL':>12}{'model NLL':>12}{'ratio':>8}")
        for row in mine:
            print(f"{row['task']:<15}{row['exact_nll']:>12.4f}{row['model_nll']:>12.4f}{row['ratio']:>8.3f}")
        rows += mine
    if len(args.streams) == 2:
        print(f"\n{'task':<15}{'NLL streams=1':>15}{'NLL streams=2':>15}{'1 / 2':>8}")
        for one, two in zip(rows[:len(EVAL_TASKS)], rows[len(EVAL_TASKS):]):
            print(f"{one['task']:<15}{one['model_nll']:>15.4f}{two['model_nll']:>15.4f}"
                  f"{one['model_nll'] / two['model_nll']:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
