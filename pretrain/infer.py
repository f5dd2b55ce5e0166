"""Inference with a big-learned model: exact scoring, gap completion, classification.

log p(x_T | x_S) for one prediction order is a single forward pass: every target gets its
own group, so target k sees S and the targets before it, which is the chain rule
sum_k log p(x_{t_k} | x_S, x_{t_<k}) (seed 000 eq. 6).

Completion decodes T one target per step. A decoded target joins as the next EARLIER TARGET
GROUP (never as a source token), so step k computes exactly the k-th term of `score` for the
order it produced. With the key/value cache (BigLearner.decode_step) a step costs one content
row plus the query rows of its candidates; a decoded row's keys/values never change, because
a content row only sees groups <= its own.

CLI: `python -m pretrain.infer {score,complete,classify} --help`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kernels import INVALID_GROUP

from .collate import collate
from .errors import UserError, add_debug_flag, cli_main
from .objectives import TASKS, SplitSpec

STRATEGIES = ("left_to_right", "random", "confident")


def split_spec(length: int, source_positions, target_positions, task: str = "biglearn") -> SplitSpec:
    """SplitSpec with S = source_positions and targets predicted one by one in the given order."""
    source = np.asarray(source_positions, dtype=np.int64).reshape(-1)
    targets = np.asarray(target_positions, dtype=np.int64).reshape(-1)
    if len(targets) == 0:
        raise UserError("target_positions must not be empty")
    chosen = np.concatenate([source, targets])
    if chosen.min() < 0 or chosen.max() >= length:
        raise UserError(f"positions must lie in [0, {length}); got min {chosen.min()}, max {chosen.max()}")
    if len(np.unique(chosen)) != len(chosen):
        raise UserError("source_positions and target_positions must be distinct and disjoint")
    rest = np.setdiff1d(np.arange(length), chosen)
    order = np.concatenate([np.sort(source), targets, rest]).astype(np.int32)
    return SplitSpec(order=order, n_source=len(source), n_target=len(targets),
                     target_groups=np.arange(1, len(targets) + 1, dtype=np.int32), task_id=TASKS.index(task))


def _check_length(model, length: int) -> None:
    if length > model.config.max_seq_len:
        raise UserError(f"sequence of {length} tokens (text plus gaps) is longer than the model's maximum "
                         f"length max_seq_len={model.config.max_seq_len}")


def _eval_forward(model, batch):
    was_training = model.training
    model.eval()
    try:
        return model(batch)
    finally:
        model.train(was_training)


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) of every target row [B, Nt]; padding rows (IGNORE_LABEL) read token 0 and
    must be masked by the caller with batch.target_mask."""
    return logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]


@torch.no_grad()
def score(model, tokens, source_positions, target_positions, order=None, *, pad_id: int = 0,
          return_steps: bool = False):
    """Exact log p(x_T | x_S) for each sample of a batch, for one prediction order.

    tokens: [B, L] ints (or one sequence [L]); source_positions / target_positions: one
    sequence of positions per sample (or a single one for [L] input). Targets are predicted in
    the order listed, unless `order` gives, per sample, the target positions in prediction order.
    Returns log-probabilities [B] (and the per-step terms [B, Nt] with return_steps=True).
    """
    tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    single = tokens.ndim == 1
    if single:
        tokens, source_positions, target_positions = tokens[None], [source_positions], [target_positions]
        order = None if order is None else [order]
    if order is not None:
        for b, (given, ordered) in enumerate(zip(target_positions, order)):
            if sorted(np.asarray(given).tolist()) != sorted(np.asarray(ordered).tolist()):
                raise UserError(f"sample {b}: order must be a permutation of target_positions")
        target_positions = order
    specs = [split_spec(tokens.shape[1], s, t) for s, t in zip(source_positions, target_positions)]
    device = next(model.parameters()).device
    batch = collate(tokens, specs, pad_id).to_torch(device)
    logits = _eval_forward(model, batch)
    log_probs = label_log_probs(logits.double(), batch.labels)
    steps = torch.where(batch.target_mask, log_probs, torch.zeros_like(log_probs))
    total = steps.sum(-1)
    if single:
        total, steps = total[0], steps[0]
    return (total, steps) if return_steps else total


def score_orders(model, tokens, source_positions, target_positions, n_orders: int, seed: int | None = None,
                 *, pad_id: int = 0):
    """log p(x_T | x_S) of one sample under n_orders random prediction orders (one batched pass).

    Returns (per_order [n_orders] float64, log_mean_exp, orders). A perfectly learned model is
    order-consistent, so the spread across orders measures how far it is from that; the
    log-mean-exp is the estimate that averages the orders' probabilities.
    """
    if n_orders < 1:
        raise UserError(f"n_orders must be >= 1; got {n_orders}")
    rng = np.random.default_rng(seed)
    targets = np.asarray(target_positions).reshape(-1)
    orders = [rng.permutation(targets) for _ in range(n_orders)]
    tokens = np.asarray(tokens).reshape(1, -1).repeat(n_orders, axis=0)
    per_order = score(model, tokens, [source_positions] * n_orders, orders, pad_id=pad_id).numpy()
    log_mean_exp = float(np.logaddexp.reduce(per_order) - math.log(n_orders))
    return per_order, log_mean_exp, orders


# --------------------------------------------------------------------------- sampling

def sample_from_logits(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None):
    """One token per row of logits [..., V]: greedy when temperature == 0, else softmax(logits /
    temperature) restricted to the top_k tokens (0 = all) and the smallest set of mass >= top_p."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise UserError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.double() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        sorted_logits, index = logits.sort(-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        sorted_logits = sorted_logits.masked_fill(before >= top_p, -math.inf)  # keeps the top token
        logits = torch.full_like(logits, -math.inf).scatter(-1, index, sorted_logits)
    probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])


@dataclass
class Completion:
    tokens: np.ndarray          # [B, L] with every target filled in
    orders: list[np.ndarray]    # per sample: target positions in the order they were decoded
    log_probs: np.ndarray       # [B] sum of log p(chosen token), untempered (renormalised over allowed_tokens)


def _pad_rows(rows: list, fill: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, :len(row)] = torch.as_tensor(np.asarray(row, dtype=np.int64))
    return out


def _full_pass_logits(model, tokens, sources, decoded, candidates, pad_id):
    """Reference step without a cache: one full forward over S, the decoded targets as groups
    1..k-1 and every candidate in group k. Returns logits [B, C, V] (rows past a sample's
    candidates are unused)."""
    active = [b for b in range(len(candidates)) if len(candidates[b])]
    specs = []
    for b in active:
        targets = np.concatenate([decoded[b], candidates[b]]).astype(np.int64)
        groups = np.concatenate([np.arange(1, len(decoded[b]) + 1), np.full(len(candidates[b]), len(decoded[b]) + 1)])
        rest = np.setdiff1d(np.arange(tokens.shape[1]), np.concatenate([sources[b], targets]))
        order = np.concatenate([np.sort(sources[b]), targets, rest]).astype(np.int32)
        specs.append(SplitSpec(order, len(sources[b]), len(targets), groups.astype(np.int32), 0))
    device = next(model.parameters()).device
    batch = collate(tokens[active], specs, pad_id).to_torch(device)
    logits = _eval_forward(model, batch)
    width = max(len(c) for c in candidates)
    out = logits.new_zeros(len(candidates), width, logits.shape[-1])
    for row, b in enumerate(active):
        start = len(decoded[b])
        out[b, :len(candidates[b])] = logits[row, start:start + len(candidates[b])]
    return out


@torch.no_grad()
def complete(model, tokens, source_positions, target_positions, *, strategy: str = "left_to_right",
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             allowed_tokens=None, use_cache: bool = True, pad_id: int = 0) -> Completion:
    """Sample x_T ~ p(x_T | x_S) one target at a time, for a batch of samples.

    tokens [B, L] (values at target positions are ignored); per sample, source positions and the
    target positions to fill. strategy: "left_to_right" (ascending positions), "random" (a random
    order), "confident" (each step scores every remaining target as one group and decodes the
    one whose predictive distribution has the highest top probability). `allowed_tokens`: an
    optional bool [V] mask of tokens that may be generated. Tokens at source positions are
    never changed. Plain continuation is S = prompt, T = the next n positions.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    tokens = np.array(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.int64)
    if tokens.ndim != 2:
        raise UserError(f"tokens must be [B, L]; got shape {tokens.shape}")
    batch_size, length = tokens.shape
    _check_length(model, length)
    if len(source_positions) != batch_size or len(target_positions) != batch_size:
        raise UserError("source_positions and target_positions need one entry per sample")
    for b in range(batch_size):
        split_spec(length, source_positions[b], target_positions[b])  # validates positions
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(int(np.random.default_rng(seed).integers(1 << 62)))
    rng = np.random.default_rng(seed)
    sources = [np.sort(np.asarray(s, dtype=np.int64).reshape(-1)) for s in source_positions]
    targets = [np.asarray(t, dtype=np.int64).reshape(-1) for t in target_positions]
    if strategy == "left_to_right":
        plans = [np.sort(t) for t in targets]
    elif strategy == "random":
        plans = [rng.permutation(t) for t in targets]
    else:
        plans = None
    remaining = [list(t) for t in targets]
    decoded = [np.zeros(0, dtype=np.int64) for _ in range(batch_size)]
    log_probs = np.zeros(batch_size)
    mask = None if allowed_tokens is None else torch.as_tensor(allowed_tokens, dtype=torch.bool, device=device)
    if mask is not None and not mask.any():
        raise UserError("allowed_tokens allows no token")

    was_training = model.training
    model.eval()
    if use_cache:
        capacity = max(len(s) + len(t) for s, t in zip(sources, targets)) + max(1, max(map(len, sources)))
        cache = model.new_cache(batch_size, capacity)
        new_rows = sources  # the first call writes S (group 0)
        new_groups = [np.zeros(len(s), dtype=np.int64) for s in sources]
    try:
        for step in range(1, max(map(len, targets)) + 1):
            candidates = [[] if not remaining[b] else (list(remaining[b]) if plans is None else [int(plans[b][step - 1])])
                          for b in range(batch_size)]
            if use_cache:
                valid = _pad_rows(new_groups, -1)
                rows = _pad_rows(new_rows, 0)
                row_tokens = torch.from_numpy(np.take_along_axis(tokens, rows.numpy(), axis=1))
                query = _pad_rows(candidates, -1)
                query_groups = torch.where(query >= 0, step, INVALID_GROUP)
                logits = model.decode_step(
                    cache, row_tokens.to(device), rows.to(device),
                    torch.where(valid >= 0, valid, INVALID_GROUP).to(device),
                    query.clamp(min=0).to(device), query_groups.to(device))
            else:
                logits = _full_pass_logits(model, tokens, sources, decoded, candidates, pad_id)
            logits = logits.double()
            if mask is not None:
                logits = logits.masked_fill(~mask, -math.inf)
            model_log_probs = logits.log_softmax(-1)
            new_rows, new_groups = [], []
            for b in range(batch_size):
                if not candidates[b]:
                    new_rows.append([])
                    new_groups.append([])
                    continue
                pick = 0
                if plans is None:  # most confident first: the highest top probability wins
                    pick = int(model_log_probs[b, :len(candidates[b])].max(-1).values.argmax())
                token = int(sample_from_logits(logits[b, pick], temperature=temperature, top_k=top_k,
                                               top_p=top_p, generator=generator))
                position = candidates[b][pick]
                tokens[b, position] = token
                log_probs[b] += float(model_log_probs[b, pick, token])
                decoded[b] = np.append(decoded[b], position)
                remaining[b].remove(position)
                new_rows.append([position])
                new_groups.append([step])
    finally:
        model.train(was_training)
    return Completion(tokens=tokens, orders=decoded, log_probs=log_probs)


@torch.no_grad()
def classify(model, samples, label_position, label_token_ids, *, pad_id: int = 0):
    """p(y | x) from the label slot: S = every other position of the sample, T = {label slot}.

    samples: token sequences (lengths may differ; the label slot's content is ignored);
    label_position: one int for all or one per sample; label_token_ids: the C label tokens.
    Returns probabilities [B, C] renormalised over the label tokens, and the model's total mass
    on them [B] (near 1 for a model trained with the label slot).
    """
    samples = [np.asarray(s, dtype=np.int64).reshape(-1) for s in samples]
    if not samples or min(len(s) for s in samples) < 2:
        raise UserError("classify needs at least one sample, each with a label slot and >= 1 other token")
    positions = np.broadcast_to(np.asarray(label_position, dtype=np.int64), (len(samples),))
    label_ids = torch.as_tensor(np.asarray(label_token_ids, dtype=np.int64))
    if label_ids.numel() < 2 or int(label_ids.min()) < 0 or int(label_ids.max()) >= model.config.vocab_size:
        raise UserError(f"label_token_ids must name >= 2 tokens in [0, {model.config.vocab_size}); got {label_ids.tolist()}")
    for s in samples:
        _check_length(model, len(s))
    specs = [split_spec(len(s), np.setdiff1d(np.arange(len(s)), [p]), [p]) for s, p in zip(samples, positions)]
    device = next(model.parameters()).device
    logits = _eval_forward(model, collate(samples, specs, pad_id).to_torch(device))[:, 0].double()
    log_probs = logits.log_softmax(-1)[:, label_ids.to(device)]
    return log_probs.softmax(-1).cpu(), log_probs.exp().sum(-1).cpu()


# --------------------------------------------------------------------------- loading + CLI

def load_model(path, device="cpu", tokenizer_sha256: str | None = None, trust_checkpoint: bool = False):
    """(model in eval mode, metadata) from an exported directory, or with trust_checkpoint=True a
    DeepSpeed checkpoint / run directory (pretrain.checkpoint.load_for_inference). Refuses a
    model whose recorded tokenizer differs from `tokenizer_sha256`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model path {path} does not exist")
    from .checkpoint import load_for_inference
    model, meta = load_for_inference(path, device=device, trust_checkpoint=trust_checkpoint)
    recorded = meta.get("tokenizer_sha256")
    if tokenizer_sha256 is not None:
        if recorded is None:
            print(f"warning: {path} records no tokenizer_sha256; cannot check it matches the tokenizer", file=sys.stderr)
        elif recorded != tokenizer_sha256:
            raise UserError(f"{path} was trained with tokenizer sha256 {recorded}, but the given tokenizer has "
                             f"sha256 {tokenizer_sha256}: token ids would not match")
    return model, meta


GAP = re.compile(r"\[_+(?::(\d+))?\]")


def parse_gaps(text: str, encode, gap_len: int, pad_id: int = 0):
    """Token ids and gap positions of `text` in which each `[___]` (or `[___:n]`) is a gap of
    gap_len (or n) tokens. `encode` maps a string to token ids."""
    ids, gaps, start = [], [], 0
    for match in GAP.finditer(text):
        ids += encode(text[start:match.start()]) if text[start:match.start()].strip() else []
        n = int(match.group(1)) if match.group(1) else gap_len
        if n < 1:
            raise UserError(f"gap {match.group(0)!r} must have length >= 1")
        gaps += range(len(ids), len(ids) + n)
        ids += [pad_id] * n
        start = match.end()
    ids += encode(text[start:]) if text[start:].strip() else []
    return ids, gaps


def insert_gaps(ids, spec: str, pad_id: int = 0):
    """Insert gaps given as 'POS:LEN,...' (token offsets into ids) -> (ids, gap positions)."""
    ids, gaps, shift = list(ids), [], 0
    try:
        pairs = sorted((int(p), int(n)) for p, n in (item.split(":") for item in spec.split(",")))
    except ValueError:
        raise UserError(f"--gaps must look like 'POS:LEN,POS:LEN'; got {spec!r}") from None
    for pos, n in pairs:
        if not 0 <= pos <= len(ids) - shift or n < 1:
            raise UserError(f"--gaps {pos}:{n}: position must lie in [0, {len(ids) - shift}] and length be >= 1")
        at = pos + shift
        ids[at:at] = [pad_id] * n
        gaps += range(at, at + n)
        shift += n
    return ids, gaps


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
    _check_length(model, len(ids))
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
    if args.continue_n:
        ids = tokenizer.encode(args.text) if args.text.strip() else []
        gaps = list(range(len(ids), len(ids) + args.continue_n))
        ids += [pad] * args.continue_n
    elif args.gaps:
        ids, gaps = insert_gaps(tokenizer.encode(args.text), args.gaps, pad)
    else:
        ids, gaps = parse_gaps(args.text, tokenizer.encode, args.gap_len, pad)
    if not gaps:
        raise UserError("nothing to complete: mark gaps with [___] or [___:n], or pass --gaps / --continue")
    _check_length(model, len(ids))
    source = [p for p in range(len(ids)) if p not in set(gaps)]
    tokens = np.asarray([ids] * args.num_samples)
    result = complete(model, tokens, [source] * args.num_samples, [gaps] * args.num_samples,
                      strategy=args.strategy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      seed=args.seed, use_cache=not args.no_cache, pad_id=pad)
    for row, lp in zip(result.tokens, result.log_probs):
        print(json.dumps({"text": tokenizer.decode(row), "filled": tokenizer.decode(row[gaps]), "log_prob": float(lp),
                          "ids": row.tolist(), "gaps": gaps}))


def _cmd_classify(args, model, tokenizer, meta):
    from .finetune import LabelLayout, read_examples
    if "label_layout" not in meta:
        raise UserError(f"{args.model} has no label_layout in its metadata: classify needs a model fine-tuned "
                         "with pretrain.finetune")
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


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.infer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True,
                        help="exported model directory (model.safetensors), or a run dir holding export/")
    common.add_argument("--trust-checkpoint", action="store_true",
                        help="also read a DeepSpeed checkpoint (run dir, checkpoints/ or step_* dir) when no export "
                             "exists; its .pt files are pickles, read weights-only (docs/reliability.md)")
    add_debug_flag(common)
    common.add_argument("--tokenizer", help="tokenizer directory (data_pipeline); its sha256 must match the model's")
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
    p.add_argument("--strategy", choices=STRATEGIES, default="left_to_right")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1, help="completions, decoded as one batch")
    p.add_argument("--no-cache", action="store_true", help="full forward pass per token (reference, slow)")
    p = sub.add_parser("classify", parents=[common], help="p(y | x) from a fine-tuned model's label slot")
    p.add_argument("--input", required=True, help="JSONL ({text, [text_pair], [label]}) or TSV (text[, text_pair][, label])")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
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


def main(argv=None) -> int:
    return cli_main(_main, "python -m pretrain.infer", argv)


if __name__ == "__main__":
    raise SystemExit(main())
