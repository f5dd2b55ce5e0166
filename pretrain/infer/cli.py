"""Command line of inference: `python -m pretrain.infer {score,complete,classify} --help`.

Text with gaps (`[___]`, `[___:n]`) or explicit positions becomes token ids and (S, T)
positions here; the work is done by scoring, decoding and classification.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from data_pipeline.errors import UserError, add_debug_flag, cli_main

from ..checkpoint.loading import bundled_tokenizer, load_model
from .classification import LabelLayout, classify, read_examples
from .decoding import CACHED, SCHEDULES, STRATEGIES, complete
from .scoring import check_length, score, score_orders
from .text import gapped_ids


def parse_positions(spec: str | None, length: int) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7] (order kept); None -> []."""
    if not spec:
        return []
    out = []
    for item in spec.split(","):
        low, _, high = item.partition("-")
        out += range(int(low), int(high or low) + 1)
    if any(not 0 <= p < length for p in out):
        raise UserError(f"positions {spec!r} must lie in [0, {length})")
    return out


def _load_tokenizer(path):
    if path is None:
        return None
    from data_pipeline.tokenizer import Tokenizer
    try:
        return Tokenizer.load(path)
    except ValueError as err:  # a missing or inconsistent tokenizer directory: the message names the file
        raise UserError(f"--tokenizer: {err}") from None


def _cmd_score(args, model, tokenizer):
    ids = tokenizer.encode(args.text) if args.text is not None else [int(t) for t in args.ids.split()]
    if not ids:
        raise UserError("the text to score is empty")
    check_length(model, len(ids))
    source = parse_positions(args.source, len(ids))
    target = parse_positions(args.target, len(ids)) or [p for p in range(len(ids)) if p not in set(source)]
    total, steps = score(model, np.asarray(ids), source, target, return_steps=True)
    result = {"n_source": len(source), "n_target": len(target), "log_prob": float(total),
              "steps": [round(float(s), 6) for s in steps]}
    if args.orders:
        per_order, lme, _ = score_orders(model, ids, source, target, args.orders, args.seed)
        result.update(per_order=[round(float(v), 6) for v in per_order], log_mean_exp=lme)
    print(json.dumps(result))


def _cmd_complete(args, model, tokenizer):
    pad = tokenizer.pad_id
    ids, gaps = gapped_ids(tokenizer, args.text, gap_len=args.gap_len, gaps=args.gaps, continue_n=args.continue_n)
    check_length(model, len(ids))
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1; got {args.num_samples}")
    source = [p for p in range(len(ids)) if p not in set(gaps)]
    tokens = np.asarray([ids] * args.num_samples)
    result = complete(model, tokens, [source] * args.num_samples, [gaps] * args.num_samples,
                      strategy=args.strategy, group_size=args.group_size, schedule=args.schedule, steps=args.steps,
                      block_size=args.block_size, draft=args.draft, adaptive_draft=args.adaptive_draft,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      use_cache=not args.no_cache, pad_id=pad)
    for b, (row, lp) in enumerate(zip(result.tokens, result.log_probs)):
        line = {"text": tokenizer.decode(row), "filled": tokenizer.decode(row[gaps]), "log_prob": float(lp),
                "ids": row.tolist(), "gaps": gaps, "passes": int(result.passes[b])}
        if result.accepted is not None:
            line.update(drafted=int(result.drafted[b]), accepted=int(result.accepted[b]))
        print(json.dumps(line))


def _cmd_classify(args, model, tokenizer, meta):
    if "label_layout" not in meta:
        raise UserError(f"{args.model} has no label_layout in its metadata: classify needs a model fine-tuned "
                         "with `biglearn finetune` (pretrain.finetune)")
    layout = LabelLayout(**meta["label_layout"])
    try:
        examples = read_examples(args.input, layout, require_labels=False)
    except ValueError as err:  # the message names the file and line
        raise UserError(f"--input: {err}") from None
    samples = [layout.encode(tokenizer, ex.text, ex.text_pair) for ex in examples]
    probs, mass = classify(model, samples, 0, layout.label_token_ids, pad_id=tokenizer.pad_id)
    correct = 0
    for ex, p, m in zip(examples, probs, mass):
        pred = layout.labels[int(p.argmax())]
        correct += ex.label == pred
        print(json.dumps({"prediction": pred, "probs": dict(zip(layout.labels, map(float, p))),
                          "label_mass": float(m), **({"label": ex.label} if ex.label is not None else {})}))
    if all(ex.label is not None for ex in examples):
        print(json.dumps({"accuracy": correct / len(examples), "n": len(examples)}))


def _main(argv: list[str], prog: str = "python -m pretrain.infer") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True,
                        help="exported model directory (model.safetensors), or a run dir holding export/")
    common.add_argument("--trust-checkpoint", action="store_true",
                        help="also read a DeepSpeed checkpoint (run dir, checkpoints/ or step_* dir) when no export "
                             "exists; its .pt files are pickles, read weights-only (docs/reliability.md)")
    add_debug_flag(common)
    common.add_argument("--tokenizer", help="tokenizer: ours (a directory), an HF tokenizer.json or a sentencepiece "
                        ".model; default: the one an exported --model carries. Its sha256 must match the model's")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("score", parents=[common], help="exact log p(x_T | x_S) for a target order")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="text to score (needs --tokenizer)")
    text.add_argument("--ids", help="space-separated token ids to score")
    p.add_argument("--source", help="source positions, e.g. '0-4,9' (default: none)")
    p.add_argument("--target", help="target positions IN PREDICTION ORDER (default: the rest, left to right)")
    p.add_argument("--orders", type=int, default=0, help="also score K random orders; prints each and the log-mean-exp")
    p = sub.add_parser("complete", parents=[common], help="fill gaps: 'The [___] sat on the [___:3]'")
    p.add_argument("--text", required=True, help="text with gaps [___] (gap-len tokens) or [___:n]")
    p.add_argument("--gap-len", type=int, default=2, help="tokens per [___] gap")
    p.add_argument("--gaps", help="instead of markers: insert gaps 'POS:LEN,...' at token offsets of --text")
    p.add_argument("--continue", dest="continue_n", type=int, default=0, help="plain continuation of n tokens")
    p.add_argument("--strategy", choices=STRATEGIES, default="left_to_right",
                   help=f"decoding order; with the key/value cache: {', '.join(CACHED)}; a full forward pass per "
                        "step (masked diffusion, as LLaDA): remask_low_confidence, remask_random, block. "
                        "speculative samples exactly what sequential decoding of its order samples, in fewer passes")
    p.add_argument("--group-size", type=int, default=4,
                   help="group_parallel: tokens decided per step, sampled independently and cached as one group; "
                        "with --schedule strided (group_parallel, speculative): the runs of the order")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="group_parallel (default strided): which tokens each step decides (strided: the targets cut "
                        "into --group-size runs decoded left to right side by side; or the most confident; or the next "
                        "of a fixed order); speculative (default left_to_right): the order, one of the fixed ones")
    p.add_argument("--draft", type=int,
                   help="speculative: targets drafted per model pass, judged under the chain rule (default 4); the "
                        "samples follow sequential decoding's law exactly")
    p.add_argument("--adaptive-draft", action="store_true",
                   help="speculative: grow the draft by one after a pass that accepts it all, shrink it by one after "
                        "one that rejects its first token, within [1, 2 x --draft]")
    p.add_argument("--steps", type=int, help="remask_*, block: denoising steps, 1..tokens to fill (default: one per token)")
    p.add_argument("--block-size", type=int, help="block: tokens per semi-autoregressive block; must divide the tokens to fill")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1, help="completions, decoded as one batch")
    p.add_argument("--no-cache", action="store_true",
                   help="cached strategies: a full forward pass per step instead (reference, slow)")
    p = sub.add_parser("classify", parents=[common], help="p(y | x) from a fine-tuned model's label slot")
    p.add_argument("--input", required=True, help="JSONL ({text, [text_pair], [label]}) or TSV (text[, text_pair][, label])")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.tokenizer is None and (Path(args.model) / "model_config.json").is_file():
        args.tokenizer = bundled_tokenizer(Path(args.model))
    tokenizer = _load_tokenizer(args.tokenizer)
    if tokenizer is None and (args.command != "score" or args.text is not None):
        parser.error(f"{args.command} needs --tokenizer")
    model, meta = load_model(args.model, args.device, tokenizer.sha256 if tokenizer else None,
                             trust_checkpoint=args.trust_checkpoint)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                         f"({model.config.vocab_size})")
    if args.command == "score":
        _cmd_score(args, model, tokenizer)
    elif args.command == "complete":
        _cmd_complete(args, model, tokenizer)
    else:
        _cmd_classify(args, model, tokenizer, meta)


def main(argv=None, prog: str = "python -m pretrain.infer") -> int:
    return cli_main(lambda args: _main(args, prog), prog, argv)
