"""(Source, target) samplers: one draw of q(S, T) and a prediction order per sample.

Every preset is a way of filling the sorted layout (docs/design.md, "Sorted layout"):

    order = [ S positions (ascending) | T positions in prediction order | dropped positions ]

with `target_groups` (1..G, non-decreasing) saying which targets are predicted jointly.
The model then maximises sum_g log p(x_{T_g} | x_S, x_{T_<g}), the maximum-likelihood form of
big learning ("Big Learning" eq. 6, "Big Cooperative Learning" eq. 15). MLM, causal LM and XLNet's
permutation LM are particular choices of q(S, T) and of the grouping.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_pipeline.errors import UserError

from .layout import SplitSpec, make_split

# Task ids index this tuple (TaskBatch.task_id, per-task loss statistics).
TASKS = ("biglearn", "mlm", "clm", "plm", "prefix_lm", "span", "semi_ar", "mdm", "block_mdm", "group_ar")
PRESETS = TASKS + ("mixture",)


@dataclass
class BigLearnConfig:
    """S ratio ~ Beta(source_alpha, source_beta); T ratio of the rest ~ Beta(target_alpha, target_beta)."""
    source_alpha: float = 0.5
    source_beta: float = 3.0
    target_alpha: float = 3.0
    target_beta: float = 0.5


@dataclass
class MLMConfig:
    ratio: float = 0.15  # fraction of tokens predicted, all in one group (conditionally independent)


@dataclass
class PLMConfig:
    """XLNet partial prediction: the last 1/k of a random permutation is predicted."""
    k: int = 6
    span: bool = False  # XLNet/HF-style span targets instead of single tokens
    max_span: int = 5


@dataclass
class PrefixLMConfig:
    min_prefix_ratio: float = 0.0  # prefix length ~ U[min, max] x L, at least 1 token each side
    max_prefix_ratio: float = 1.0


@dataclass
class SpanConfig:
    """T5-style noise spans: lengths ~ Poisson(mean_span) covering `ratio` of the tokens."""
    ratio: float = 0.15
    mean_span: float = 3.0


@dataclass
class SemiARConfig:
    """A big-learning (S, T) draw whose targets are predicted in `chunks` joint steps."""
    chunks: int = 4


@dataclass
class MDMConfig:
    """Masked diffusion ("Large Language Diffusion Models" (LLaDA) and "Simple and Effective Masked
    Diffusion Language Models" (MDLM)): t ~ U(eps, 1), each token masked independently with
    probability t, every masked token a target of the ONE group 1 with loss weight 1/t, and the
    sample's weighted sum normalised by its window length L. A batch of such samples has loss

        (1 / sum_b L_b) * sum_b (1 / t_b) * sum_{i masked in b} -log p(x_i | unmasked tokens of b)

    which for equal lengths is LLaDA's pre-training loss (its eq. 3 estimated with a batch, divided
    by B x L) and MDLM's continuous-time NELBO (its eq. 10 for a linear schedule) per token: an
    upper bound on -log p(x) / L. eps keeps 1/t finite; LLaDA uses 1e-3."""
    eps: float = 1e-3


@dataclass
class BlockMDMConfig:
    """Semi-autoregressive masked diffusion, as LLaDA samples: the window is cut into blocks of
    `block_size` tokens; one block is drawn uniformly, every earlier block joins S, later blocks
    are dropped, and inside the block the `mdm` draw applies (same eps), normalised by the block's
    length."""
    block_size: int = 32


@dataclass
class GroupARConfig:
    """Any-order any-subset AR ("Autoregressive Models Rival Diffusion Models at Any-Order
    Generation", A3): a big-learning (S, T) draw whose targets, in random order, are cut into
    consecutive groups whose sizes are drawn uniformly from `sizes`. Groups of k tokens are what a
    decoder that writes k tokens per step into its key/value cache asks the model for."""
    sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])


@dataclass
class SegmentRule:
    """Modality-level incompleteness ("Big Cooperative Learning" Remark 5): the whole segment is forced into S,
    into T, or dropped with these probabilities; otherwise it joins the preset's random split."""
    p_source: float = 0.0
    p_target: float = 0.0
    p_drop: float = 0.0


@dataclass
class ObjectiveConfig:
    name: str = "biglearn"  # one of PRESETS
    biglearn: BigLearnConfig = field(default_factory=BigLearnConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    plm: PLMConfig = field(default_factory=PLMConfig)
    prefix_lm: PrefixLMConfig = field(default_factory=PrefixLMConfig)
    span: SpanConfig = field(default_factory=SpanConfig)
    semi_ar: SemiARConfig = field(default_factory=SemiARConfig)
    mdm: MDMConfig = field(default_factory=MDMConfig)
    block_mdm: BlockMDMConfig = field(default_factory=BlockMDMConfig)
    group_ar: GroupARConfig = field(default_factory=GroupARConfig)
    mixture: dict[str, float] = field(default_factory=dict)  # preset name -> weight, per sample
    segments: list[SegmentRule] = field(default_factory=list)  # one rule per segment, if any

    def __post_init__(self):
        _validate(self)


# --------------------------------------------------------------------------- validation

def _check_beta(name: str, value: float) -> None:
    if not (np.isfinite(value) and value > 0):
        raise UserError(f"objective.{name} must be a positive number; got {value!r}")


def _check_ratio(name: str, value: float, *, allow_zero: bool = False, allow_one: bool = True) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    high_ok = value <= 1 if allow_one else value < 1
    if not (np.isfinite(value) and low_ok and high_ok):
        raise UserError(f"objective.{name} must be a ratio in {'[' if allow_zero else '('}0, 1{']' if allow_one else ')'}; got {value!r}")


def _validate(config: ObjectiveConfig) -> None:
    """UserError naming the first bad field (ObjectiveConfig checks itself when made)."""
    if config.name not in PRESETS:
        raise UserError(f"objective.name must be one of {PRESETS}; got {config.name!r}")
    for key in ("source_alpha", "source_beta", "target_alpha", "target_beta"):
        _check_beta(f"biglearn.{key}", getattr(config.biglearn, key))
    _check_ratio("mlm.ratio", config.mlm.ratio)
    if int(config.plm.k) != config.plm.k or config.plm.k < 1:
        raise UserError(f"objective.plm.k must be an integer >= 1; got {config.plm.k!r}")
    if config.plm.max_span < 1:
        raise UserError(f"objective.plm.max_span must be >= 1; got {config.plm.max_span!r}")
    _check_ratio("prefix_lm.min_prefix_ratio", config.prefix_lm.min_prefix_ratio, allow_zero=True)
    _check_ratio("prefix_lm.max_prefix_ratio", config.prefix_lm.max_prefix_ratio, allow_zero=True)
    if config.prefix_lm.min_prefix_ratio > config.prefix_lm.max_prefix_ratio:
        raise UserError("objective.prefix_lm.min_prefix_ratio must not exceed max_prefix_ratio")
    _check_ratio("span.ratio", config.span.ratio)
    if not config.span.mean_span >= 1:
        raise UserError(f"objective.span.mean_span must be >= 1; got {config.span.mean_span!r}")
    if int(config.semi_ar.chunks) != config.semi_ar.chunks or config.semi_ar.chunks < 1:
        raise UserError(f"objective.semi_ar.chunks must be an integer >= 1; got {config.semi_ar.chunks!r}")
    if not (np.isfinite(config.mdm.eps) and 0 < config.mdm.eps < 1):
        raise UserError(f"objective.mdm.eps must lie in (0, 1); got {config.mdm.eps!r}")
    if int(config.block_mdm.block_size) != config.block_mdm.block_size or config.block_mdm.block_size < 1:
        raise UserError(f"objective.block_mdm.block_size must be an integer >= 1; got {config.block_mdm.block_size!r}")
    sizes = list(config.group_ar.sizes)
    if not sizes or any(int(k) != k or k < 1 for k in sizes):
        raise UserError(f"objective.group_ar.sizes must be a non-empty list of integers >= 1; got {sizes!r}")
    if config.name == "mixture":
        if not config.mixture:
            raise UserError("objective.mixture must name at least one preset with a weight")
        for preset, weight in config.mixture.items():
            if preset not in TASKS:
                raise UserError(f"objective.mixture: unknown preset {preset!r}; choose from {TASKS}")
            if not (np.isfinite(weight) and weight >= 0):
                raise UserError(f"objective.mixture.{preset} must be a weight >= 0; got {weight!r}")
        if sum(config.mixture.values()) <= 0:
            raise UserError("objective.mixture weights must not all be zero")
    for i, rule in enumerate(config.segments):
        for key in ("p_source", "p_target", "p_drop"):
            _check_ratio(f"segments[{i}].{key}", getattr(rule, key), allow_zero=True)
        if rule.p_source + rule.p_target + rule.p_drop > 1 + 1e-9:
            raise UserError(f"objective.segments[{i}]: p_source + p_target + p_drop must be <= 1")


# --------------------------------------------------------------------------- presets
# Each takes n >= 1 free positions 0..n-1 and returns (source in any order (make_split sorts it),
# targets in prediction order, target groups), plus (target weights, loss normaliser) for the weighted ones. Positions not
# returned are dropped (absent from the sample).

def _biglearn(n, rng, cfg: BigLearnConfig):
    n_source = min(n - 1, int(round(rng.beta(cfg.source_alpha, cfg.source_beta) * n)))
    rest = n - n_source
    n_target = min(rest, max(1, int(round(rng.beta(cfg.target_alpha, cfg.target_beta) * rest))))
    perm = rng.permutation(n)
    source = perm[:n_source]
    targets = perm[n_source:n_source + n_target]  # random prediction order
    return source, targets, np.arange(1, n_target + 1)


def _mlm(n, rng, cfg: MLMConfig):
    n_target = min(n, max(1, int(round(cfg.ratio * n))))
    perm = rng.permutation(n)
    targets = np.sort(perm[:n_target])
    return perm[n_target:], targets, np.ones(n_target, dtype=np.int64)


def _clm(n, rng, cfg=None):
    return np.arange(0), np.arange(n), np.arange(1, n + 1)


def _span_targets(n, rng, max_span: int, k: int):
    """XLNet/HF span selection: a span of length U[1, max_span] per context of span_len * k."""
    is_target = np.zeros(n, dtype=bool)
    cursor = 0
    while cursor < n:
        span_len = int(rng.integers(1, max_span + 1))
        context = max(span_len, int(span_len * k))
        start = cursor + int(rng.integers(0, context - span_len + 1))
        is_target[start:min(n, start + span_len)] = True
        cursor += context
    if not is_target.any():
        is_target[rng.integers(n)] = True
    return np.flatnonzero(is_target)


def _plm(n, rng, cfg: PLMConfig):
    if cfg.span:
        targets = rng.permutation(_span_targets(n, rng, cfg.max_span, cfg.k))
        source = np.setdiff1d(np.arange(n), targets)
    else:
        n_target = min(n, max(1, int(round(n / cfg.k))))
        perm = rng.permutation(n)
        source, targets = perm[:n - n_target], perm[n - n_target:]
    return source, targets, np.arange(1, len(targets) + 1)


def _prefix_lm(n, rng, cfg: PrefixLMConfig):
    if n == 1:
        return _clm(n, rng)
    low = max(1, int(np.floor(cfg.min_prefix_ratio * n)))
    high = min(n - 1, max(low, int(np.floor(cfg.max_prefix_ratio * n))))
    n_source = int(rng.integers(low, high + 1))
    return np.arange(n_source), np.arange(n_source, n), np.arange(1, n - n_source + 1)


def _span(n, rng, cfg: SpanConfig):
    n_noise = min(n, max(1, int(round(cfg.ratio * n))))
    lengths = []
    while sum(lengths) < n_noise:
        lengths.append(max(1, int(rng.poisson(cfg.mean_span))))
    lengths[-1] -= sum(lengths) - n_noise
    # Random placement: split the n - n_noise kept tokens into len(lengths) + 1 gaps.
    cuts = np.sort(rng.integers(0, n - n_noise + 1, size=len(lengths)))
    gaps = np.diff(np.concatenate([[0], cuts]))
    starts = np.cumsum(gaps) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    spans = [np.arange(s, s + length) for s, length in zip(starts, lengths)]
    span_order = rng.permutation(len(spans))  # spans in random order, left to right inside
    targets = np.concatenate([spans[i] for i in span_order])
    source = np.setdiff1d(np.arange(n), targets)
    return source, targets, np.arange(1, n_noise + 1)


def _semi_ar(n, rng, cfg: SemiARConfig, biglearn: BigLearnConfig):
    source, targets, _ = _biglearn(n, rng, biglearn)
    chunks = min(cfg.chunks, len(targets))
    groups = 1 + (np.arange(len(targets)) * chunks) // len(targets)
    return source, targets, groups


def _mdm(n, rng, cfg: MDMConfig):
    t = rng.uniform(cfg.eps, 1.0)
    masked = rng.random(n) < t
    targets = np.flatnonzero(masked)
    weights = np.full(len(targets), 1.0 / t)
    if len(targets) == 0:
        # Nothing masked: the sample's term of the estimator is exactly 0 but still counts L in
        # the normaliser. The layout needs one target, so one token is predicted with weight 0.
        targets, weights = rng.integers(n, size=1), np.zeros(1)
    source = np.setdiff1d(np.arange(n), targets)
    return source, targets, np.ones(len(targets), dtype=np.int64), weights, float(n)


def _block_mdm(n, rng, cfg: BlockMDMConfig, mdm: MDMConfig):
    start = cfg.block_size * int(rng.integers(-(-n // cfg.block_size)))
    stop = min(n, start + cfg.block_size)
    source, targets, groups, weights, norm = _mdm(stop - start, rng, mdm)
    return np.concatenate([np.arange(start), start + source]), start + targets, groups, weights, norm


def _group_ar(n, rng, cfg: GroupARConfig, biglearn: BigLearnConfig):
    source, targets, _ = _biglearn(n, rng, biglearn)
    sizes = rng.choice(np.asarray(cfg.sizes), size=len(targets))  # more than enough groups
    groups = np.repeat(np.arange(1, len(targets) + 1), sizes)[:len(targets)]
    return source, targets, groups


def _draw(name: str, n: int, rng: np.random.Generator, config: ObjectiveConfig):
    """(source, targets, groups, target weights or None, loss normaliser or None)."""
    if name == "mdm":
        return _mdm(n, rng, config.mdm)
    if name == "block_mdm":
        return _block_mdm(n, rng, config.block_mdm, config.mdm)
    return (*_unweighted(name, n, rng, config), None, None)


def _unweighted(name: str, n: int, rng: np.random.Generator, config: ObjectiveConfig):
    if name == "group_ar":
        return _group_ar(n, rng, config.group_ar, config.biglearn)
    if name == "biglearn":
        return _biglearn(n, rng, config.biglearn)
    if name == "mlm":
        return _mlm(n, rng, config.mlm)
    if name == "clm":
        return _clm(n, rng)
    if name == "plm":
        return _plm(n, rng, config.plm)
    if name == "prefix_lm":
        return _prefix_lm(n, rng, config.prefix_lm)
    if name == "span":
        return _span(n, rng, config.span)
    return _semi_ar(n, rng, config.semi_ar, config.biglearn)


# --------------------------------------------------------------------------- sampler

class ObjectiveSampler:
    """Draws one SplitSpec per sample from q(S, T); reproducible given the numpy Generator."""

    def __init__(self, config: ObjectiveConfig | str = "biglearn"):
        if isinstance(config, str):
            config = ObjectiveConfig(name=config)
        self.config = config
        if config.name == "mixture":
            names = [k for k, w in config.mixture.items() if w > 0]
            weights = np.array([config.mixture[k] for k in names], dtype=np.float64)
            self._mixture = (names, weights / weights.sum())
        else:
            self._mixture = None

    def __call__(self, length: int, rng: np.random.Generator, segment_lengths=None) -> SplitSpec:
        if length < 2:
            raise ValueError(f"length must be >= 2 to split a sample into source and target; got {length}")
        if self._mixture is None:
            name = self.config.name
        else:
            names, probs = self._mixture
            name = names[int(rng.choice(len(names), p=probs))]
        if not self.config.segments:
            return make_split(length, *_draw(name, length, rng, self.config), task_id=TASKS.index(name))
        return self._segmented(name, length, rng, segment_lengths)

    def _segmented(self, name, length, rng, segment_lengths) -> SplitSpec:
        rules = self.config.segments
        if segment_lengths is None or len(segment_lengths) != len(rules):
            raise ValueError(f"segment_lengths must give one length per objective.segments rule "
                             f"({len(rules)}); got {segment_lengths!r}")
        if sum(segment_lengths) != length or min(segment_lengths) < 0:
            raise ValueError(f"segment_lengths {list(segment_lengths)} must be >= 0 and sum to length {length}")
        bounds = np.concatenate([[0], np.cumsum(segment_lengths)])
        for _ in range(100):  # redraw the rare case where every segment avoided T
            forced_source, forced_target, free = [], [], []
            for rule, start, stop in zip(rules, bounds[:-1], bounds[1:]):
                fate = rng.random()
                positions = np.arange(start, stop)
                if fate < rule.p_source:
                    forced_source.append(positions)
                elif fate < rule.p_source + rule.p_target:
                    forced_target.append(positions)
                elif fate >= rule.p_source + rule.p_target + rule.p_drop:
                    free.append(positions)
            free = np.concatenate(free) if free else np.arange(0)
            forced_target = np.concatenate(forced_target) if forced_target else np.arange(0)
            if len(free) == 0 and len(forced_target) == 0:
                continue
            if len(free):
                source, targets, groups, weights, norm = _draw(name, len(free), rng, self.config)
                source, targets = free[source], free[targets]
            else:
                source, targets, groups, weights, norm = np.arange(0), np.arange(0), np.arange(0), None, None
            # Forced targets are predicted after the free ones, left to right, one group each,
            # with weight 1 and one unit each in the normaliser.
            last = int(groups[-1]) if len(groups) else 0
            groups = np.concatenate([groups, last + np.arange(1, len(forced_target) + 1)])
            if weights is not None:
                weights = np.concatenate([weights, np.ones(len(forced_target))])
                norm += len(forced_target)
            targets = np.concatenate([targets, forced_target])
            source = np.sort(np.concatenate([source] + forced_source))
            return make_split(length, source, targets, groups, weights, norm, task_id=TASKS.index(name))
        raise UserError("objective.segments: rules left no target in 100 draws; raise some p_target or lower p_drop")


# --------------------------------------------------------------------------- evaluation tasks
# Fixed task families for evaluation matrices (pretrain.train.evaluate, bench/groundtruth.py).
EVAL_TASKS = ("joint", "left_to_right", "mlm", "infill", "biglearn", "prefix", "suffix")


def eval_split(task: str, length: int, rng: np.random.Generator, *, mlm_ratio: float = 0.15,
               infill_ratio: float = 0.25) -> SplitSpec:
    """One draw of an evaluation task:
    joint: S empty, every token a target in a random order; left_to_right: causal LM;
    mlm: `mlm_ratio` of the tokens in one group; infill: S = prefix + suffix, T = a middle of
    `infill_ratio` x L tokens, left to right; biglearn: the default q(S, T); prefix: S = the
    second half, T = the first half left to right (what came before); suffix: S = the first
    half, T = the second half left to right (a prefix LM's task, which a causal LM can score)."""
    if task not in EVAL_TASKS:
        raise ValueError(f"evaluation task must be one of {EVAL_TASKS}; got {task!r}")
    if length < 2:
        raise ValueError(f"length must be >= 2; got {length}")
    if task == "joint":
        return make_split(length, np.arange(0), rng.permutation(length), np.arange(1, length + 1), task_id=TASKS.index("biglearn"))
    if task == "left_to_right":
        return make_split(length, *_clm(length, rng), task_id=TASKS.index("clm"))
    if task == "mlm":
        return make_split(length, *_mlm(length, rng, MLMConfig(ratio=mlm_ratio)), task_id=TASKS.index("mlm"))
    if task == "infill":
        if length == 2:  # no room for both a prefix and a suffix
            return make_split(length, np.arange(1), np.arange(1, 2), np.ones(1), task_id=TASKS.index("span"))
        middle = min(length - 2, max(1, int(round(infill_ratio * length))))
        start = int(rng.integers(1, length - middle))  # prefix and suffix both non-empty
        targets = np.arange(start, start + middle)
        return make_split(length, np.setdiff1d(np.arange(length), targets), targets, np.arange(1, middle + 1),
                     task_id=TASKS.index("span"))
    if task in ("prefix", "suffix"):
        half = length // 2
        first, second = np.arange(half), np.arange(half, length)
        source, targets = (second, first) if task == "prefix" else (first, second)
        return make_split(length, source, targets, np.arange(1, len(targets) + 1), task_id=TASKS.index("prefix_lm"))
    return make_split(length, *_biglearn(length, rng, BigLearnConfig()), task_id=TASKS.index("biglearn"))
