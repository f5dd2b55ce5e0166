"""The sorted layout (docs/design.md, "Sorted layout"): (S, T) draws and windows -> one batch.

The layout module of the project: numpy only, no torch, so data-loader workers, objectives and
inference share it without importing the model. Each sample's positions are ordered
[S ascending | T in prediction order | the dropped rest] by `make_split`, the one place that
builds this order; `collate` reorders the windows accordingly and trims every row to the
longest S ∪ T in the batch, so dropped tokens cost nothing. Tokens keep their original
positions for RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

# Group of padding and dropped rows: above every real group, so rows stay sorted. kernels/
# defines the same value for itself (it imports nothing from the project); a test checks they agree.
INVALID_GROUP = 2**31 - 1
IGNORE_LABEL = -100  # label of padding target rows (torch cross_entropy's ignore_index)
# TaskBatch.predictor values that are not a row of the sorted layout (docs/design.md, single stream).
START_PREDICTOR = -1  # the START row (the BOS token, group 0, one position left of the window)
QUERY_PREDICTOR = -2  # a query-stream row


@dataclass
class SplitSpec:
    """One sample's (S, T) draw in the sorted layout."""
    order: np.ndarray  # int32 [L]: S ascending, T in prediction order, then the dropped rest
    n_source: int
    n_target: int
    target_groups: np.ndarray  # int32 [n_target], 1..G non-decreasing
    task_id: int
    # Loss weighting (docs/design.md, "Losses and statistics"): the sample adds
    # sum_k target_weights[k] * nll_k to the batch's numerator and loss_norm to its denominator.
    # None means weight 1 per target and loss_norm = n_target (the mean over targets).
    target_weights: np.ndarray | None = None  # float [n_target]
    loss_norm: float | None = None


def make_split(length: int, source, targets, groups=None, weights=None, norm=None, *, task_id: int = 0) -> SplitSpec:
    """SplitSpec of a window of `length` positions: S = `source` (any order), T = `targets` in
    prediction order with `groups` (default: one group per target, 1..n), the rest dropped;
    optional per-target loss `weights` and the sample's loss normaliser `norm`."""
    source = np.asarray(source, dtype=np.int64).reshape(-1)
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if groups is None:
        groups = np.arange(1, len(targets) + 1)
    role = np.zeros(length, dtype=np.int8)  # 0: dropped, 1: source, 2: target (sorts S without a sort)
    role[source] = 1
    role[targets] = 2
    sorted_source, dropped = (role == 1).nonzero()[0], (role == 0).nonzero()[0]
    if len(sorted_source) != len(source) or len(sorted_source) + len(targets) + len(dropped) != length:
        raise ValueError(f"make_split: source ({len(source)}) and targets ({len(targets)}) must be distinct positions "
                         f"of the window of {length}")
    order = np.concatenate([sorted_source, targets, dropped], dtype=np.int32)
    return SplitSpec(order=order, n_source=len(sorted_source), n_target=len(targets),
                     target_groups=np.asarray(groups, dtype=np.int32), task_id=task_id,
                     target_weights=None if weights is None else np.asarray(weights, dtype=np.float32),
                     loss_norm=norm)


@dataclass
class TaskBatch:
    tokens: np.ndarray         # [B, N] int64, sorted layout, pad_id beyond S ∪ T
    positions: np.ndarray      # [B, N] int64 original positions (0 for padding)
    groups: np.ndarray         # [B, N] int32: 0 for S, 1..G for T, INVALID for padding
    target_index: np.ndarray   # [B, Nt] int64 row of each target in the sorted layout
    target_groups: np.ndarray  # [B, Nt] int32, INVALID for padding
    labels: np.ndarray         # [B, Nt] int64 token to predict, IGNORE_LABEL for padding
    target_mask: np.ndarray    # [B, Nt] bool
    n_source: np.ndarray       # [B] int64
    n_target: np.ndarray       # [B] int64
    task_id: np.ndarray        # [B] int64 index into objectives.TASKS
    segments: np.ndarray | None = None  # [B, N] int64 segment id of each token, if given
    # Per-target loss weights (docs/design.md): loss = sum(target_weights * nll) / sum(loss_norm).
    target_weights: np.ndarray | None = None  # [B, Nt] float32, 0 for padding; None = 1 per target
    loss_norm: np.ndarray | None = None       # [B] float32 the objective's normaliser; None = n_target
    # [B, Nt] int64: the row whose state predicts each target in single-stream mode
    # (ModelConfig.streams=1): a row of the sorted layout, START_PREDICTOR or QUERY_PREDICTOR.
    # Two-stream mode predicts every target with a query row and ignores it.
    predictor: np.ndarray | None = None

    def to_torch(self, device=None, non_blocking: bool = False) -> "TaskBatch":
        """Same batch with every array as a torch tensor on `device`."""
        import torch

        def convert(value):
            if value is None:
                return None
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            return tensor.to(device, non_blocking=non_blocking) if device is not None else tensor

        return TaskBatch(**{f.name: convert(getattr(self, f.name)) for f in fields(self)})

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])


def collate(windows, specs: list[SplitSpec], pad_id: int, segments=None) -> TaskBatch:
    """Build a TaskBatch. `windows`: a [B, L] array or a list of 1-D token arrays (one per spec,
    lengths may differ); `segments`: optional segment ids aligned with `windows`."""
    if len(windows) != len(specs) or len(specs) == 0:
        raise ValueError(f"collate needs one spec per window and at least one window; "
                         f"got {len(windows)} windows and {len(specs)} specs")
    for b, (window, spec) in enumerate(zip(windows, specs)):
        window_len = len(window)
        if len(spec.order) != window_len:
            raise ValueError(f"sample {b}: spec.order has {len(spec.order)} positions but the window has {window_len}")
        if spec.n_target < 1 or spec.n_source + spec.n_target > window_len:
            raise ValueError(f"sample {b}: n_source={spec.n_source}, n_target={spec.n_target} invalid for length {window_len}")
        if spec.target_weights is not None and len(spec.target_weights) != spec.n_target:
            raise ValueError(f"sample {b}: target_weights has {len(spec.target_weights)} entries, n_target={spec.n_target}")
        if len(spec.target_groups) != spec.n_target:
            raise ValueError(f"sample {b}: target_groups has {len(spec.target_groups)} entries, n_target={spec.n_target}")
    batch = len(specs)
    n_source = np.array([s.n_source for s in specs], dtype=np.int64)
    n_target = np.array([s.n_target for s in specs], dtype=np.int64)
    width, n_targets_max = int((n_source + n_target).max()), int(n_target.max())

    # One row at a time with slices (a batch holds few rows): each row's kept prefix of the
    # sorted layout is its order's first n_source + n_target positions; the rest is padding.
    tokens = np.full((batch, width), pad_id, dtype=np.int64)
    positions = np.zeros((batch, width), dtype=np.int64)
    groups = np.full((batch, width), INVALID_GROUP, dtype=np.int32)
    target_groups = np.full((batch, n_targets_max), INVALID_GROUP, dtype=np.int32)
    labels = np.full((batch, n_targets_max), IGNORE_LABEL, dtype=np.int64)
    target_weights = np.zeros((batch, n_targets_max), dtype=np.float32)
    sorted_segments = None if segments is None else np.zeros((batch, width), dtype=np.int64)
    for b, (window, spec) in enumerate(zip(windows, specs)):
        ns, nt = spec.n_source, spec.n_target
        order = spec.order[:ns + nt]
        positions[b, :ns + nt] = order
        tokens[b, :ns + nt] = np.asarray(window)[order]
        labels[b, :nt] = tokens[b, ns:ns + nt]
        groups[b, :ns] = 0
        groups[b, ns:ns + nt] = target_groups[b, :nt] = spec.target_groups
        target_weights[b, :nt] = 1.0 if spec.target_weights is None else spec.target_weights
        if segments is not None:
            sorted_segments[b, :ns + nt] = np.asarray(segments[b])[order]
    decreasing = (target_groups[:, 1:] < target_groups[:, :-1]).any(axis=1)  # padding (INVALID_GROUP) sorts last
    bad = np.flatnonzero((target_groups[:, 0] < 1) | decreasing)
    if len(bad):
        raise ValueError(f"sample {bad[0]}: target_groups must be >= 1 and non-decreasing")
    target_mask = np.arange(n_targets_max)[None, :] < n_target[:, None]
    target_index = np.where(target_mask, n_source[:, None] + np.arange(n_targets_max)[None, :], 0)
    loss_norm = np.array([s.n_target if s.loss_norm is None else s.loss_norm for s in specs], dtype=np.float32)

    return TaskBatch(
        tokens=tokens, positions=positions, groups=groups,
        target_index=target_index, target_groups=target_groups, labels=labels,
        target_mask=target_mask, n_source=n_source, n_target=n_target,
        task_id=np.array([s.task_id for s in specs], dtype=np.int64), segments=sorted_segments,
        target_weights=target_weights, loss_norm=loss_norm,
        predictor=single_stream_predictors(target_groups, target_mask, n_source),
    )


def single_stream_predictors(target_groups: np.ndarray, target_mask: np.ndarray, n_source: np.ndarray) -> np.ndarray:
    """TaskBatch.predictor: a target of a singleton group whose previous group is a singleton is
    predicted by that group's content row, and a singleton first group of a sample with an empty
    S by the START row: that row sees exactly the groups below the target's, what a predictor of
    it may see. Every other target gets a query row, the first one after a non-empty S included:
    START carried that case for every split of a sample and learned it worse than a query row
    (docs/model.md, "Single stream"). Groups are sorted, so a singleton differs from both
    neighbours."""
    n_targets = target_groups.shape[1]
    changes = target_groups[:, 1:] != target_groups[:, :-1]
    singleton = target_mask.copy()
    singleton[:, 0] &= target_groups[:, 0] != 0  # the group before the first is the START row's 0
    singleton[:, 1:] &= changes
    singleton[:, :-1] &= changes
    singleton[:, -1] &= target_groups[:, -1] != INVALID_GROUP  # the group after the last is padding's
    predicted_by_row = singleton.copy()
    predicted_by_row[:, 1:] &= singleton[:, :-1]
    predicted_by_row[:, 0] &= n_source == 0
    row = n_source[:, None] + np.arange(-1, n_targets - 1)
    row[:, 0] = START_PREDICTOR
    return np.where(predicted_by_row, row, QUERY_PREDICTOR)
