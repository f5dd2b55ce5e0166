"""Any-order decoding: sample x_T ~ p(x_T | x_S) one target at a time.

A decoded target joins as the next EARLIER TARGET GROUP (never as a source token), so step k
computes exactly the k-th term of `score` for the order it produced. With the key/value cache
(BigLearner.decode_step) a step costs one content row plus the query rows of its candidates; a
decoded row's keys/values never change, because a content row only sees groups <= its own.

Single-stream models (docs/model.md): a fixed order (left to right, or random drawn up front)
decodes one row per step, as a GPT with a cache: the START row, then each decoded token's row,
carries the offset to the next planned position and its output predicts it. The adaptive order
("confident") scores its candidates with query rows; its decoded rows predict nothing, so they
carry no offset term, and the reference without a cache asks for query rows throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..collate import INVALID_GROUP, QUERY_PREDICTOR, collate, make_split
from ..model import NO_TARGET, START_POSITION
from .scoring import check_length, eval_forward, split_spec

STRATEGIES = ("left_to_right", "random", "confident")


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


def _full_pass_logits(model, tokens, sources, decoded, candidates, pad_id, all_query: bool = False):
    """Reference step without a cache: one full forward over S, the decoded targets as groups
    1..k-1 and every candidate in group k (all predicted by query rows with all_query=True).
    Returns logits [B, C, V] (rows past a sample's candidates are unused)."""
    active = [b for b in range(len(candidates)) if len(candidates[b])]
    specs = []
    for b in active:
        targets = np.concatenate([decoded[b], candidates[b]]).astype(np.int64)
        groups = np.concatenate([np.arange(1, len(decoded[b]) + 1), np.full(len(candidates[b]), len(decoded[b]) + 1)])
        specs.append(make_split(tokens.shape[1], sources[b], targets, groups))
    device = next(model.parameters()).device
    batch = collate(tokens[active], specs, pad_id)
    if all_query:
        batch.predictor[:] = QUERY_PREDICTOR
    logits = eval_forward(model, batch.to_torch(device))
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
    check_length(model, length)
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
    single = model.config.streams == 1
    if use_cache:
        capacity = max(len(s) + len(t) for s, t in zip(sources, targets)) + max(1, max(map(len, sources))) + single
        cache = model.new_cache(batch_size, capacity)
        # The first call writes S (group 0), after the START row in single-stream mode.
        new_rows = [np.concatenate([[START_POSITION] * single, s]) for s in sources]
        new_groups = [np.zeros(len(r), dtype=np.int64) for r in new_rows]
    try:
        for step in range(1, max(map(len, targets)) + 1):
            candidates = [[] if not remaining[b] else (list(remaining[b]) if plans is None else [int(plans[b][step - 1])])
                          for b in range(batch_size)]
            if use_cache:
                valid = _pad_rows(new_groups, -1)
                rows = _pad_rows(new_rows, 0)
                row_tokens = np.take_along_axis(tokens, rows.clamp(min=0).numpy(), axis=1)
                row_tokens = torch.from_numpy(np.where(rows.numpy() == START_POSITION, model.config.bos_id, row_tokens))
                row_groups = torch.where(valid >= 0, valid, INVALID_GROUP).to(device)
                if single and plans is not None:  # the first new row (START, or the last decoded) reads the next target
                    reads = torch.full_like(rows, NO_TARGET)
                    reads[:, 0] = torch.tensor([c[0] if c else NO_TARGET for c in candidates])
                    logits = model.decode_step(cache, row_tokens.to(device), rows.to(device), row_groups,
                                               target_positions=reads.to(device))[:, :1]
                else:
                    query = _pad_rows(candidates, -1)
                    query_groups = torch.where(query >= 0, step, INVALID_GROUP)
                    logits = model.decode_step(cache, row_tokens.to(device), rows.to(device), row_groups,
                                               query.clamp(min=0).to(device), query_groups.to(device))
            else:
                logits = _full_pass_logits(model, tokens, sources, decoded, candidates, pad_id,
                                           all_query=single and plans is None)
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


