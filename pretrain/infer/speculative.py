"""Speculative any-order decoding: the model drafts several targets at once and judges them
under its own chain rule, so the samples follow EXACTLY the law of sequential decoding in the
chosen order, with fewer model passes.

Sequential decoding of the order t_1, t_2, ... writes every decided target as the next
singleton group, so target i is predicted from S and t_<i (`score`'s chain rule). A big-learned
model can also predict several targets at once from the same prefix (query rows of one group:
each sees S and the decided targets, not the others), which is a draft q; standard speculative
sampling ("Fast Inference from Transformers via Speculative Decoding"; "Accelerating Large
Language Model Decoding with Speculative Sampling") then accepts draft i with probability
min(1, p_i / q_i) and, at the first rejection, draws from the normalised residual max(0, p - q),
which makes every emitted token follow p_i exactly. Here draft and judge are the same model.

One model pass per step, for each sample whose first a targets are cached (groups 1..a):

    content rows  z_1 (the pending token: drawn from the exact p at the last step) and the drafts
                  z_2..z_m, as singleton groups a+1..a+m (written into the KV cache; in
                  single-stream mode each told the position it predicts, as in `score`)
    predictors    of order index a+j for j = 1..m, seeing groups <= a+j: the content row of
                  z_j in single-stream mode (as sequential decoding reads it), else a query row
                  of group a+j+1. They give p for drafts z_2..z_m, and for the target after them
    next drafts   for EVERY outcome j (z_1..z_j accepted), query rows of group a+j+1 for the next
                  targets a+j+1, ...: they see exactly the accepted prefix, so whichever j the
                  acceptance gives, the next step's drafts are already computed. Without them a
                  step would need a second pass to draft (with the exact conditionals of
                  bench/decode.py's chain, 1.6 instead of 2.4 tokens per pass at k=4:
                  docs/benchmarks.md, speculative decoding). The drafts do not
                  see the token drawn at order index a+j (the correction or bonus), which is what
                  a draft may ignore: any draft law keeps the output exact, only the acceptance
                  rate depends on it.

Rejected drafts' content rows are already in the cache after the pass; `KVCache.truncate` takes
them back (their groups become INVALID, so nothing sees them and the next pass overwrites them).
Writing only accepted rows would need a second pass to write them, which is the cost avoided.
Only the rows a step reads are projected onto the vocabulary (the predictors, and the drafts
of the outcome that happened); at d=256 with 8000 tokens the head costs more than the blocks.

temperature / top-k / top-p / allowed tokens filter p and q alike (Sampling.probs), so the law
is the filtered sequential law; temperature 0 puts all mass on the argmax, which makes this
"accept while the draft is the argmax of p, else take that argmax": greedy sequential decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..layout import INVALID_GROUP
from ..model import NO_TARGET, START_POSITION
from .sampling import Sampling


@dataclass
class SpeculativeCounts:
    """Per sample: model passes that decided its targets, drafted tokens judged, those accepted."""
    passes: np.ndarray
    drafted: np.ndarray
    accepted: np.ndarray


def _padded(rows: list[np.ndarray], width: int, fill: int) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for b, row in enumerate(rows):
        out[b, :len(row)] = row
    return out


class _DraftLength:
    """Draft length per sample: fixed, or adaptive (grow by one after a step that accepted every
    draft, shrink by one after a step that rejected the first one, within [1, maximum]), as
    assisted generation in Hugging Face transformers adapts its assistant's length."""

    def __init__(self, batch_size: int, draft: int, adaptive: bool):
        self.adaptive = adaptive
        self.maximum = 2 * draft if adaptive else draft
        self.current = np.full(batch_size, draft)

    def after(self, n_drafts: np.ndarray, n_outcomes: int) -> np.ndarray:
        """[B, J] (fixed: [B, 1], the same for every c) the length of the next draft if c =
        0..J-1 of this step's n_drafts [B] drafts are accepted."""
        current = self.current[:, None]
        if not self.adaptive:
            return current
        accepted, n_drafts = np.arange(n_outcomes), n_drafts[:, None]
        full = (accepted == n_drafts) & (n_drafts == current)
        early = (accepted == 0) & (n_drafts > 0)
        return np.where(full, np.minimum(current + 1, self.maximum), np.where(early, np.maximum(current - 1, 1), current))


@torch.inference_mode()
def speculative_decode(model, tokens: np.ndarray, sources: list[np.ndarray], plans: list[np.ndarray], draft: int,
                       adaptive: bool, sampling: Sampling) -> tuple[np.ndarray, SpeculativeCounts]:
    """Fill tokens[b, plans[b]] (in place), decided in the order plans[b] given tokens[b, sources[b]].
    Returns the log-probability [B] of each sample's decided tokens (untempered, renormalised over
    the allowed tokens) and the pass counts.

    The bookkeeping (where each sample stands, which rows a pass holds) is numpy on [B]-sized
    arrays, and only the vocabulary-sized work is torch: on CPU a torch call on a few numbers
    costs ~5 us against ~1 us for numpy, and a pass at bench/decode.py's trained dims takes
    about a millisecond in all (docs/benchmarks.md)."""
    device = next(model.parameters()).device
    single = model.config.streams == 1
    batch_size, length = tokens.shape
    every = np.arange(batch_size)
    n = np.array([len(p) for p in plans])
    lengths = _DraftLength(batch_size, draft, adaptive)
    # Order index i of sample b is position plan[b, i]; past n[b], a spare column `length` of
    # `filled`, so that rows that do not exist are read and written without masks.
    plan = _padded(plans, n.max() + 2 * lengths.maximum + 3, length)
    filled = np.concatenate([tokens, np.zeros((batch_size, 1), dtype=np.int64)], 1)
    base = np.array([len(s) + single for s in sources])  # cached rows before the targets: S (and START)
    cache = model.new_cache(batch_size, int((base + n).max()) + lengths.maximum + 2)
    decoding_weights = model.decoding_weights()  # complete() never changes them between passes
    head = decoding_weights[1]

    def tensor(x):  # from_numpy: about a third of as_tensor's cost on CPU (it shares the memory)
        return None if x is None else torch.from_numpy(x).to(device)

    every_index = tensor(every)

    committed = np.zeros(batch_size, dtype=np.int64)  # targets cached, as groups 1..a
    written = np.zeros(batch_size, dtype=np.int64)  # rows the pass writes: the pending token and the drafts
    active = np.ones(batch_size, dtype=bool)
    q = None  # [B, drafts, V]: the law each draft the pass writes was drawn from
    log_probs = np.zeros(batch_size)
    passes, drafted, accepted = (np.zeros(batch_size, dtype=np.int64) for _ in range(3))
    start_predicts = np.array([single and len(s) == 0 for s in sources])  # START predicts order index 0
    content = _source_rows(model, tokens, sources, plan)
    first_outcome = 0  # the first pass writes S (and START): its one outcome is j = 0
    while True:
        n_outcomes = max(1, written.max())
        outcomes = np.arange(first_outcome, first_outcome + n_outcomes)  # j: z_1..z_j accepted
        n_drafts = np.maximum(written - 1, 0)
        # [B, J]; -1: an outcome that cannot happen
        next_length = np.where(outcomes > written[:, None], -1, lengths.after(n_drafts, n_outcomes))
        # Query rows [B, J, R] of group a+j+1: outcome j's predictor (r = 0, two streams) and drafts (r >= 1).
        # Single stream: the content rows predict, except order index 0 after a non-empty S (a
        # query row, as in training: pretrain.layout.single_stream_predictors), so the first pass
        # has the r = 0 column too.
        lead = int(single and first_outcome > 0 or single and start_predicts.all())
        offsets = np.arange(lead, next_length.max() + 1)
        group = committed[:, None] + outcomes + 1
        index = group[:, :, None] - 1 + offsets  # order index a+j+r
        query_positions = np.take_along_axis(plan, index.reshape(batch_size, -1), 1)
        query_groups = np.where((offsets <= next_length[:, :, None]) & (index < n[:, None, None]), group[:, :, None],
                                INVALID_GROUP).reshape(batch_size, -1)
        states = model.decode_step(cache, *map(tensor, content[:3]), tensor(query_positions), tensor(query_groups),
                                   target_positions=tensor(content[3]), check_groups=False, weights=decoding_weights,
                                   head=False)
        passes += active
        grid = states[:, states.shape[1] - query_positions.shape[1]:].unflatten(1, (n_outcomes, len(offsets)))
        # Predictor of outcome j (order index a + j): the content row of z_j (START first) or a query row.
        if not single:
            predictor_states = grid[:, :, 0]
        elif lead:
            predictor_states = states[:, :n_outcomes]
        else:  # the first pass of a single-stream batch with a non-empty S: START or the r = 0 query row
            predictor_states = torch.where(tensor(start_predicts)[:, None, None], states[:, :1], grid[:, :, 0])
        target_log_probs = sampling.log_probs(predictor_states @ head)  # [B, J, V]
        # The judging is numpy on the few numbers it reads (on CPU .numpy() is a view, no copy).
        log_p = target_log_probs.cpu().numpy()
        p = sampling.probs(target_log_probs).cpu().numpy()
        # Every uniform of the pass in one call: the judging of the drafts, then the draws.
        n_draws = 1 + max(next_length.max(), 0)  # the next token and the next drafts
        u = torch.rand((batch_size, n_outcomes - 1 + n_draws), generator=sampling.generator,
                       dtype=torch.float64).numpy()

        # Judge drafts z_2..z_m (content rows 1..m-1): draft i by outcome i's predictor, grid row i - 1.
        n_accepted = np.zeros(batch_size, dtype=np.int64)
        if n_outcomes > 1:
            column = np.arange(n_outcomes - 1)
            drafts = every[:, None], column, content[0][:, 1:n_outcomes]
            keeps = (u[:, :n_outcomes - 1] * q[drafts] < p[drafts]) & (column < n_drafts[:, None])
            kept = np.logical_and.accumulate(keeps, 1)  # up to the first rejection
            n_accepted = kept.sum(1)
            log_probs += np.where(kept, log_p[drafts], 0).sum(1)
        drafted += n_drafts
        accepted += n_accepted
        # The token at order index a + j: from p, less the draft's q after a rejection (the residual).
        next_probs = p[every, n_accepted]
        rejected = n_accepted < n_drafts
        if rejected.any():
            residual = np.maximum(next_probs - rejected[:, None] * q[every, np.minimum(n_accepted, q.shape[1] - 1)], 0)
            # A rejection means q(z) > p(z), so the residual has mass, unless p and q differ only by
            # rounding (a rejection of probability ~1e-7): then p itself.
            next_probs = np.where(residual.sum(-1, keepdims=True) > 0, residual, next_probs)
        at = np.where(active, committed + first_outcome + n_accepted, committed)
        if (at < committed + written).any():  # rejected drafts' rows leave the cache
            cache.truncate(tensor(base + at), check=False)
        committed, decided, active = at, active & (at < n), active & (at < n - 1)
        weights = next_probs[:, None]
        if active.any():  # next drafts: outcome j's query rows past its predictor, filtered as p is
            draft_states = grid[every_index, tensor(n_accepted), 1 - lead:]
            q = sampling.probs(sampling.log_probs(draft_states @ head)).cpu().numpy()
            weights = np.concatenate([weights, q], 1)
        drawn = inverse_cdf(weights, u[:, n_outcomes - 1:n_outcomes - 1 + weights.shape[1]])
        token = drawn[:, 0]
        log_probs += np.where(decided, log_p[every, n_accepted, token], 0)
        filled[every, np.where(decided, plan[every, at], length)] = token
        if not active.any():
            break
        chosen_length = next_length[every, n_accepted]
        lengths.current = np.where(active, chosen_length, lengths.current)
        n_next = np.where(active, np.minimum(chosen_length, n - at - 1), 0)
        is_draft = np.arange(drawn.shape[1] - 1) < n_next[:, None]
        draft_positions = plan[every[:, None], at[:, None] + np.arange(1, drawn.shape[1])]
        filled[every[:, None], np.where(is_draft, draft_positions, length)] = drawn[:, 1:]
        written = np.where(active, 1 + n_next, 0)
        first_outcome = 1
        content = _target_rows(plan, filled, n, committed, written, single)
    tokens[:] = filled[:, :length]
    return log_probs, SpeculativeCounts(passes, drafted, accepted)


def inverse_cdf(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """sampling.inverse_cdf on the host, with the uniforms [...] given: one token per row of
    unnormalised probabilities weights [..., V], the first whose cumulative weight exceeds
    uniform x total (a zero-probability token adds no width). A pass's draws are a few rows that
    its bookkeeping reads as numpy anyway: at V = 8 this took a third of sampling.inverse_cdf's
    time, at V = 8000 the same (the cumulative sum by torch: numpy's took twice as long there,
    and the first exceeding token by argmax, which stops at it, where counting did not)."""
    cdf = torch.from_numpy(weights).cumsum(-1).numpy()
    above = cdf > (uniforms[..., None] * cdf[..., -1:]).astype(cdf.dtype)  # compared in the weights' precision
    above[..., -1] = True  # where rounding puts u x total at the total: the last token, as sampling's clamp
    return above.argmax(-1)


def _source_rows(model, tokens, sources, plan):
    """The first pass's content rows: S in group 0, and in single-stream mode START first (the
    BOS token at START_POSITION, group 0), which predicts order index 0 when S is empty. (tokens, positions,
    groups, readers or None), numpy [B, width]."""
    single = model.config.streams == 1
    start = ([model.config.bos_id], [START_POSITION]) if single else ([], [])
    positions = [np.r_[start[1], s].astype(np.int64) for s in sources]
    width = max(map(len, positions))
    groups = _padded([np.zeros(len(p), dtype=np.int64) for p in positions], width, INVALID_GROUP)
    readers = None
    if single:
        readers = np.full(groups.shape, NO_TARGET)
        readers[:, 0] = np.where([len(s) == 0 for s in sources], plan[:, 0], NO_TARGET)  # after S: a query row
    return (_padded([np.r_[start[0], tokens[b, s]] for b, s in enumerate(sources)], width, 0),
            _padded(positions, width, 0), groups, readers)


def _target_rows(plan, filled, n, committed, written, single: bool):
    """Content rows of a pass: each sample's pending token (order index a) and drafts, groups
    a+1..a+m; in single-stream mode each row predicts the next order index (readers)."""
    columns = np.arange(written.max())
    index = committed[:, None] + columns
    rows = np.arange(len(plan))[:, None]
    positions = plan[rows, index]
    real = columns < written[:, None]
    readers = np.where(real & (index + 1 < n[:, None]), plan[rows, index + 1], NO_TARGET) if single else None
    return filled[rows, positions], positions, np.where(real, index + 1, INVALID_GROUP), readers
