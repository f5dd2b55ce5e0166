"""Any-order decoding: sample x_T ~ p(x_T | x_S), one or several targets per step.

Every strategy decides targets step by step; the targets decided at step k form GROUP k
(`Completion.groups`). What a step conditions on and whether it uses the key/value cache:

| strategy | per step | cache |
|---|---|---|
| left_to_right, random | the next target of a fixed order | yes |
| confident | the remaining target with the highest top probability | yes (scores all remaining) |
| group_parallel | k targets, by confidence or a fixed schedule (left_to_right, random, strided), written as ONE next group | yes |
| remask_low_confidence, remask_random | every masked target predicted, n_k kept (masked diffusion) | no |
| block | semi-autoregressive blocks, remask_low_confidence inside each | no |
| speculative | up to k next targets of a fixed order drafted in parallel, judged under the chain rule: exactly sequential decoding's law (pretrain/infer/speculative.py) | yes |

The cached strategies let a decided target join as the next EARLIER TARGET GROUP (never as a
source token), so step k computes exactly the k-th term of `score` for the grouping it produced,
and with BigLearner.decode_step a step costs its k new content rows plus the query rows of its
candidates: a decided row's keys/values never change, because a content row only sees groups
<= its own. Earlier tokens are never recomputed. The k targets of a group are sampled
independently given the earlier groups, which is what the `group_ar` objective trains.

Single-stream models (docs/model.md): the cache holds the START row; a fixed order reads a
singleton group after a singleton from the content row just written (one row per step for a
one-token order, as a GPT with a cache); an adaptive order ("confident", group_parallel by
confidence) scores its candidates with query rows and its decided rows predict nothing, and the
reference without a cache forces query rows to match.

The remasking strategies follow "Large Language Diffusion Models" (LLaDA):
decided tokens join S, where every row sees every other, so each step is a full forward pass.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.errors import UserError

from ..layout import INVALID_GROUP, QUERY_PREDICTOR, collate, make_split
from ..model import NO_TARGET, START_POSITION
from .sampling import Sampling
from .speculative import speculative_decode
from .scoring import check_length, eval_forward, split_spec

SEQUENTIAL = ("left_to_right", "random", "confident")
SCHEDULES = ("confidence", "left_to_right", "random", "strided")
REMASKING = ("remask_low_confidence", "remask_random", "block")
STRATEGIES = SEQUENTIAL + ("group_parallel", "speculative") + REMASKING
CACHED = SEQUENTIAL + ("group_parallel", "speculative")
DEFAULT_SCHEDULE = {"group_parallel": "strided", "speculative": "left_to_right"}
DEFAULT_DRAFT = 4


@dataclass
class Completion:
    tokens: np.ndarray          # [B, L] with every target filled in
    orders: list[np.ndarray]    # per sample: target positions in the order they were decided
    log_probs: np.ndarray       # [B] sum of log p(chosen token), untempered (renormalised over allowed_tokens)
    groups: list[np.ndarray] | None = None  # per sample, aligned with orders: the step that decided each target
    # (speculative: one group per target, the chain rule it samples, whichever pass decided it)
    passes: np.ndarray | None = None    # [B] model passes (steps) that decided each sample's targets
    drafted: np.ndarray | None = None   # [B] speculative: drafted tokens judged
    accepted: np.ndarray | None = None  # [B] speculative: drafted tokens accepted

    @property
    def tokens_per_pass(self) -> np.ndarray:
        """[B] targets decided per model pass: 1 for sequential decoding, k for group_parallel."""
        return np.array([len(o) for o in self.orders]) / self.passes


def _pad_rows(rows: list, fill: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for b, row in enumerate(rows):
        out[b, :len(row)] = row
    return torch.from_numpy(out)


def target_logits(model, tokens, sources, targets, groups, pad_id, all_query: bool = False):
    """One full forward pass per sample with S = sources[b] and T = targets[b] in `groups[b]`
    (every target predicted by a query row with all_query=True, for single-stream models);
    samples with no target are skipped. Returns logits [B, max targets, V] (rows past a sample's
    targets, and skipped samples, are zero)."""
    active = [b for b in range(len(targets)) if len(targets[b])]
    specs = [make_split(tokens.shape[1], sources[b], targets[b], groups[b]) for b in active]
    batch = collate(tokens[active], specs, pad_id)
    if all_query:
        batch.predictor[:] = QUERY_PREDICTOR
    device = next(model.parameters()).device
    logits = eval_forward(model, batch.to_torch(device))
    out = logits.new_zeros(len(targets), max(map(len, targets)), logits.shape[-1])
    for row, b in enumerate(active):
        out[b, :len(targets[b])] = logits[row, :len(targets[b])]
    return out


class _Cache:
    """The key/value cache of a batch decoded group by group (BigLearner.decode_step).

    Each call writes the rows decided at the previous step (first: S, and in single-stream mode
    the START row) and predicts the candidates of this step. With a fixed order, predictor rows
    follow the model's rule (docs/model.md): with model.streams=1 a candidate that forms a
    singleton group after a singleton group (or as the first group when S is empty) is read from
    the content row just written (the START row first), as a GPT with a cache; every other
    candidate gets a query row. An adaptive order (`query_only`) learns which candidate it decides only after
    the rows were written, so its rows predict nothing and every candidate gets a query row."""

    def __init__(self, model, tokens, sources, targets, group_size, query_only: bool):
        self.model, self.tokens = model, tokens
        self.single = model.config.streams == 1
        self.by_rows = self.single and not query_only
        # Each call writes as many rows as the widest sample, the narrower ones padded past their
        # length: room for one such padded write after the last real row, and for START.
        capacity = (max(len(s) + len(t) for s, t in zip(sources, targets)) + max(group_size, *map(len, sources))
                    + self.single)
        self.cache = model.new_cache(len(tokens), capacity)
        self.weights = model.decoding_weights()  # complete() never changes them between steps
        self.device = next(model.parameters()).device
        start = ([model.config.bos_id], [START_POSITION]) if self.single else ([], [])
        self.rows = [(np.r_[start[0], tokens[b, s]], np.r_[start[1], s], np.zeros(len(s) + self.single))
                     for b, s in enumerate(sources)]

    def _tensor(self, rows, fill):
        return _pad_rows(rows, fill).to(self.device)

    def logits(self, candidates, step):
        """Logits [B, C, V] of each sample's candidates, all in group `step`."""
        # A single candidate is read from the one row just written: START alone (step 1, S empty) or
        # the previous singleton group's target; after a non-empty S it gets a query row.
        by_row = [self.by_rows and len(c) == 1 and len(r[0]) == 1 for c, r in zip(candidates, self.rows)]
        tokens, positions, groups = (self._tensor([r[i] for r in self.rows], fill) for i, fill in ((0, 0), (1, 0), (2, -1)))
        groups = torch.where(groups >= 0, groups, INVALID_GROUP)
        query = self._tensor([[] if row else c for c, row in zip(candidates, by_row)], -1)
        query_groups = torch.where(query >= 0, step, INVALID_GROUP)
        if not any(by_row):
            return self.model.decode_step(self.cache, tokens, positions, groups, query.clamp(min=0), query_groups,
                                          check_groups=False, weights=self.weights)
        # The START row is row 0 of the first call; later the single row of the previous group.
        readers = self._tensor([[c[0]] + [NO_TARGET] * (len(r[0]) - 1) if row else [] for c, r, row
                                in zip(candidates, self.rows, by_row)], NO_TARGET)
        readers = torch.nn.functional.pad(readers, (0, tokens.shape[1] - readers.shape[1]), value=NO_TARGET)
        from_rows = self.model.decode_step(self.cache, tokens, positions, groups, target_positions=readers,
                                           check_groups=False, weights=self.weights)[:, :1]
        if not (query >= 0).any():
            return from_rows
        from_queries = self.model.decode_step(self.cache, query_positions=query.clamp(min=0), query_groups=query_groups,
                                              weights=self.weights)
        return torch.where(torch.tensor(by_row, device=self.device)[:, None, None], from_rows, from_queries)

    def write(self, rows, step):
        """The rows decided at `step` enter the cache as group `step` with the next call."""
        self.rows = [(self.tokens[b, r], np.asarray(r, dtype=np.int64), np.full(len(r), step)) for b, r in enumerate(rows)]


def _uncached_logits(model, tokens, sources, decoded, decoded_groups, candidates, step, pad_id, all_query):
    """Reference step without a cache: S, the decided targets in their groups, and every
    candidate in group `step`. Returns the candidates' logits [B, C, V]."""
    full = target_logits(model, tokens, sources, [np.array(d + c, dtype=np.int64) for d, c in zip(decoded, candidates)],
                         [g + [step] * len(c) for g, c in zip(decoded_groups, candidates)], pad_id, all_query)
    out = full.new_zeros(len(candidates), max(1, max(map(len, candidates))), full.shape[-1])
    for b, (d, c) in enumerate(zip(decoded, candidates)):
        out[b, :len(c)] = full[b, len(d):len(d) + len(c)]
    return out


def _strided(targets, group_size: int) -> np.ndarray:
    """The targets, sorted, cut into `group_size` contiguous chunks (sizes differing by at most
    one, larger first) and interleaved: step s decides the s-th target of every chunk, so each
    step's targets lie far apart and each one's left neighbour (within its chunk) is decided."""
    chunks = np.array_split(np.sort(targets), group_size)
    return np.array([c[s] for s in range(len(chunks[0])) for c in chunks if s < len(c)], dtype=np.int64)


def _decode_groups(model, tokens, sources, targets, plans, group_size, sampling: Sampling, use_cache, pad_id):
    """Decide `group_size` targets per step: the next ones of `plans[b]`, or (plans None) the
    remaining targets with the highest top probability; each step's targets become one group."""
    batch_size = len(tokens)
    remaining = [list(t) for t in targets]
    decoded = [[] for _ in range(batch_size)]
    decoded_groups = [[] for _ in range(batch_size)]
    log_probs = np.zeros(batch_size)
    cache = _Cache(model, tokens, sources, targets, group_size, query_only=plans is None) if use_cache else None
    for step in range(1, -(-max(map(len, targets)) // group_size) + 1):
        if plans is None:
            candidates = [list(r) for r in remaining]
        else:
            candidates = [list(p[(step - 1) * group_size:step * group_size]) for p in plans]
        if use_cache:
            logits = cache.logits(candidates, step)
        else:
            logits = _uncached_logits(model, tokens, sources, decoded, decoded_groups, candidates, step, pad_id,
                                      all_query=plans is None)
        model_log_probs = sampling.log_probs(logits)
        picks = []  # (sample, candidate index) of every target decided at this step
        for b in range(batch_size):
            count = min(group_size, len(candidates[b]))
            order = range(count)
            if plans is None and count:  # most confident first: the highest top probabilities win
                # Compared in float32: candidates tied up to rounding (e.g. several that see nothing
                # yet) keep their order, so the cached and the uncached pass pick the same one.
                top = model_log_probs[b, :len(candidates[b])].max(-1).values.float()
                order = top.argsort(descending=True, stable=True)[:count].tolist()
            picks += [(b, i) for i in order]
        if len(picks) == model_log_probs.shape[0] * model_log_probs.shape[1] and plans is not None:
            chosen_log_probs = model_log_probs.flatten(0, 1)  # every row, in order: no copy
        else:
            rows, index = torch.tensor(picks, dtype=torch.long).reshape(-1, 2).unbind(1)
            chosen_log_probs = model_log_probs[rows, index]
        drawn = sampling.draw(chosen_log_probs)  # one draw for the whole step
        gained = chosen_log_probs.gather(-1, drawn[:, None])[:, 0].tolist()
        picked_rows = [[] for _ in range(batch_size)]
        for (b, i), token, gain in zip(picks, drawn.tolist(), gained):
            position = candidates[b][i]
            tokens[b, position] = token
            log_probs[b] += gain
            if plans is None:  # only the adaptive order reads what remains (a list removal is O(L))
                remaining[b].remove(position)
            decoded[b].append(position)
            decoded_groups[b].append(step)
            picked_rows[b].append(position)
        if use_cache:
            cache.write(picked_rows, step)
    return decoded, decoded_groups, log_probs


def _split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` integers differing by at most one, larger first (LLaDA's schedule of
    how many tokens each step unmasks)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _remask_plan(n_targets: int, steps: int | None, block_size: int | None) -> list[tuple[int, int]]:
    """(block, tokens to unmask) for every step: the steps shared out between the blocks, and
    each block's tokens between its steps."""
    block_size = block_size or n_targets
    n_blocks = n_targets // block_size
    per_block = _split_evenly(steps or n_targets, n_blocks)
    return [(block, count) for block, block_steps in enumerate(per_block)
            for count in _split_evenly(block_size, block_steps)]


def _remask(model, tokens, sources, targets, steps, block_size, *, order_rng, sampling: Sampling, pad_id):
    """Masked-diffusion decoding as LLaDA samples ("Large Language Diffusion Models", its reverse
    process with low-confidence or random remasking, and semi-autoregressive blocks): each step
    predicts every still-masked target of the current block from S and the tokens decided so far
    (all in S, seen bidirectionally; later blocks absent, as `block_mdm` trains), samples all of
    them, keeps the `count` with the highest model probability of the sampled token (or `count`
    at random, from `order_rng`; None: by confidence), and masks the others again. The random
    choice has its own stream, apart from the token draws, so that the tokens a seed gives do
    not depend on how many uniforms the draws took (greedy takes none). No cache: S changes
    every step."""
    plans = [_remask_plan(len(t), steps, block_size) for t in targets]
    blocks = [np.sort(t).reshape(-1, block_size or max(1, len(t))) for t in targets]
    known = [list(s) for s in sources]
    decided = [[] for _ in targets]
    decided_groups = [[] for _ in targets]
    log_probs = np.zeros(len(targets))
    for step in range(max(map(len, plans))):
        masked = [[] if step >= len(plan) else [p for p in block[plan[step][0]] if p not in known_set]
                  for plan, block, known_set in zip(plans, blocks, map(set, known))]
        logits = target_logits(model, tokens, [np.array(k, dtype=np.int64) for k in known],
                               [np.array(m, dtype=np.int64) for m in masked], [np.ones(len(m)) for m in masked], pad_id)
        model_log_probs = sampling.log_probs(logits)
        for b, candidates in enumerate(masked):
            if not candidates:
                continue
            rows = model_log_probs[b, :len(candidates)]
            drawn = sampling.draw(rows)
            if order_rng is not None:
                confidence = torch.from_numpy(order_rng.random(len(candidates)))
            else:
                confidence = rows.gather(-1, drawn[:, None])[:, 0]
            for i in confidence.argsort(descending=True, stable=True)[:plans[b][step][1]].tolist():
                position, token = candidates[i], int(drawn[i])
                tokens[b, position] = token
                log_probs[b] += float(rows[i, token])
                decided[b].append(position)
                decided_groups[b].append(step + 1)
                known[b].append(position)
    return decided, decided_groups, log_probs


def _is_count(value) -> bool:
    """An integer >= 1 (numpy integers too; not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_options(strategy, targets, group_size, schedule, steps, block_size, temperature, top_k, top_p, draft,
                   adaptive_draft, use_cache):
    """One-line errors that name the command-line flag of each bad option."""
    if not temperature >= 0:  # NaN too
        raise UserError(f"--temperature must be >= 0 (0 = greedy); got {temperature!r}")
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise UserError(f"--top-k must be an integer >= 0 (0 = every token); got {top_k!r}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must lie in (0, 1]; got {top_p!r}")
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {STRATEGIES}; got {strategy!r}")
    if strategy == "group_parallel":
        if not _is_count(group_size):
            raise UserError(f"--group-size must be an integer >= 1; got {group_size!r}")
        if schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {SCHEDULES}; got {schedule!r}")
    if strategy != "speculative" and (draft is not None or adaptive_draft):
        raise UserError(f"--draft and --adaptive-draft apply to --strategy speculative; got --strategy {strategy}")
    if strategy == "speculative":
        _check_speculative(group_size, schedule, steps, block_size, draft, use_cache)
    if strategy not in REMASKING:
        return
    if steps is not None:
        if not _is_count(steps):
            raise UserError(f"--steps must be an integer >= 1; got {steps!r}")
        for b, t in enumerate(targets):
            if steps > len(t):
                raise UserError(f"--steps {steps} exceeds the {len(t)} masked tokens of sample {b}")
    if strategy == "block":
        if not _is_count(block_size):
            raise UserError(f"--block-size must be an integer >= 1 for strategy 'block'; got {block_size!r}")
        for b, t in enumerate(targets):
            if len(t) % block_size:
                raise UserError(f"--block-size {block_size} does not divide the {len(t)} tokens to fill of sample {b}")
            if steps is not None and steps < len(t) // block_size:
                raise UserError(f"--steps {steps} is fewer than the {len(t) // block_size} blocks of sample {b} "
                                 f"(--block-size {block_size}): each block needs a step")


def _check_speculative(group_size, schedule, steps, block_size, draft, use_cache):
    if not _is_count(draft):
        raise UserError(f"--draft must be an integer >= 1 (targets drafted per pass); got {draft!r}")
    fixed = tuple(s for s in SCHEDULES if s != "confidence")
    if schedule not in fixed:
        raise UserError(f"--strategy speculative decodes a fixed order: --schedule must be one of {fixed}; got "
                         f"{schedule!r}")
    if schedule == "strided" and not _is_count(group_size):
        raise UserError(f"--group-size must be an integer >= 1 (the strided order's runs); got {group_size!r}")
    if steps is not None or block_size is not None:
        raise UserError("--steps and --block-size belong to the remasking strategies, not --strategy speculative")
    if not use_cache:
        raise UserError("--no-cache: --strategy speculative runs on the key/value cache (it takes back the rows of "
                         "rejected drafts)")


@torch.inference_mode()  # no autograd bookkeeping at all: ~14% of a small model's decoding step
def complete(model, tokens, source_positions, target_positions, *, strategy: str = "left_to_right",
             group_size: int = 4, schedule: str | None = None, steps: int | None = None,
             block_size: int | None = None, draft: int | None = None, adaptive_draft: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             allowed_tokens=None, use_cache: bool = True, pad_id: int = 0) -> Completion:
    """Sample x_T ~ p(x_T | x_S) for a batch of samples, with one of STRATEGIES (module docstring).

    tokens [B, L] (values at target positions are ignored); per sample, source positions and the
    target positions to fill. Sequential strategies: "left_to_right" (ascending positions),
    "random" (a random order), "confident" (the remaining target whose predictive distribution
    has the highest top probability). "group_parallel": `group_size` targets per step, chosen by
    `schedule` ("strided": the sorted targets cut into `group_size` chunks decoded left to right
    side by side, the default, whose samples are closest to left-to-right decoding's on a known
    source (docs/benchmarks.md); "confidence"; or the fixed "left_to_right" / "random" orders),
    sampled independently and cached as one group. "speculative": the fixed order of `schedule`
    ("left_to_right", the default, "random" or "strided") sampled EXACTLY as sequential decoding
    samples it, up to `draft` (default 4) drafted targets judged per model pass
    (`adaptive_draft`: the length moves within [1, 2 * draft] with the acceptance);
    Completion.passes / accepted report the passes saved. "remask_low_confidence" / "remask_random": `steps`
    steps (default: one per target) that each predict every masked target and keep the most
    confident (or random) share of them. "block": targets cut left to right into blocks of
    `block_size`, decoded one after the other with remask_low_confidence (the steps shared out
    between blocks). `use_cache=False` computes the cached strategies with full forward passes
    (the reference; the remasking strategies never use the cache). `allowed_tokens`: optional
    bool [V] mask of tokens that may be generated. Tokens at source positions never change.
    """
    tokens = np.array(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.int64)
    if tokens.ndim != 2:
        raise UserError(f"tokens must be [B, L]; got shape {tokens.shape}")
    batch_size, length = tokens.shape
    check_length(model, length)
    if len(source_positions) != batch_size or len(target_positions) != batch_size:
        raise UserError("source_positions and target_positions need one entry per sample")
    for b in range(batch_size):
        split_spec(length, source_positions[b], target_positions[b])  # validates positions
    sources = [np.sort(np.asarray(s, dtype=np.int64).reshape(-1)) for s in source_positions]
    targets = [np.asarray(t, dtype=np.int64).reshape(-1) for t in target_positions]
    schedule = DEFAULT_SCHEDULE.get(strategy) if schedule is None else schedule
    draft = DEFAULT_DRAFT if strategy == "speculative" and draft is None else draft
    _check_options(strategy, targets, group_size, schedule, steps, block_size, temperature, top_k, top_p, draft,
                   adaptive_draft, use_cache)
    device = next(model.parameters()).device
    allowed = None if allowed_tokens is None else torch.as_tensor(allowed_tokens, dtype=torch.bool, device=device)
    if allowed is not None and not allowed.any():
        raise UserError("allowed_tokens allows no token")
    generator = torch.Generator(device="cpu").manual_seed(int(np.random.default_rng(seed).integers(1 << 62)))
    sampling = Sampling(temperature, top_k, top_p, generator, allowed)
    rng = np.random.default_rng(seed)
    if strategy in SEQUENTIAL:
        group_size, schedule = 1, {"confident": "confidence"}.get(strategy, strategy)
    plans = None
    if schedule == "left_to_right":
        plans = [np.sort(t) for t in targets]
    elif schedule == "random":
        plans = [rng.permutation(t) for t in targets]
    elif schedule == "strided":
        plans = [_strided(t, group_size) for t in targets]

    was_training = model.training
    model.eval()
    counts = None
    try:
        if strategy == "speculative":
            log_probs, counts = speculative_decode(model, tokens, sources, plans, draft, adaptive_draft, sampling)
            orders, groups = plans, [np.arange(1, len(p) + 1) for p in plans]
        elif strategy in REMASKING:
            orders, groups, log_probs = _remask(
                model, tokens, sources, targets, steps, block_size if strategy == "block" else None,
                order_rng=rng if strategy == "remask_random" else None, sampling=sampling, pad_id=pad_id)
        else:
            orders, groups, log_probs = _decode_groups(model, tokens, sources, targets, plans, group_size,
                                                       sampling, use_cache, pad_id)
    finally:
        model.train(was_training)
    groups = [np.array(g, dtype=np.int64) for g in groups]
    return Completion(tokens=tokens, orders=[np.array(o, dtype=np.int64) for o in orders], log_probs=log_probs,
                      groups=groups, passes=np.array([g.max() for g in groups]) if counts is None else counts.passes,
                      drafted=None if counts is None else counts.drafted,
                      accepted=None if counts is None else counts.accepted)
