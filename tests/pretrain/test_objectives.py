"""Sampler invariants for every preset, XLNet's PLM rule, multi-segment rules, bad configs."""
import numpy as np
import pytest

from data_pipeline.errors import UserError
import torch

from biglearn_kernels import visibility
from pretrain.layout import collate
from pretrain.objectives import (EVAL_TASKS, PRESETS, TASKS, BigLearnConfig, MLMConfig, ObjectiveConfig,
                                 ObjectiveSampler, PLMConfig, SegmentRule, eval_split)


def check_spec(spec, length):
    order = spec.order
    assert sorted(order.tolist()) == list(range(length)), "order must be a permutation"
    source = order[:spec.n_source]
    targets = order[spec.n_source:spec.n_source + spec.n_target]
    assert not set(source) & set(targets), "S and T must be disjoint"
    assert np.all(np.diff(source) > 0), "S keeps original order"
    assert spec.n_target >= 1 and len(spec.target_groups) == spec.n_target
    assert spec.target_groups[0] >= 1 and np.all(np.diff(spec.target_groups) >= 0)


def sampler_for(name):
    if name == "mixture":
        return ObjectiveSampler(ObjectiveConfig(name="mixture", mixture={t: 1.0 for t in TASKS}))
    return ObjectiveSampler(name)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_gives_valid_splits(name):
    rng = np.random.default_rng()
    sampler = sampler_for(name)
    for _ in range(200):
        length = int(rng.integers(2, 64))
        check_spec(sampler(length, rng), length)


def test_clm_is_identity_order_with_groups_one_to_L():
    spec = ObjectiveSampler("clm")(17, np.random.default_rng())
    assert spec.n_source == 0 and spec.order.tolist() == list(range(17))
    assert spec.target_groups.tolist() == list(range(1, 18))


def test_mlm_is_one_group_of_fifteen_percent():
    rng = np.random.default_rng()
    spec = ObjectiveSampler("mlm")(100, rng)
    assert spec.n_target == 15 and spec.n_source == 85 and set(spec.target_groups.tolist()) == {1}


def test_biglearn_ratios_follow_the_beta_draws():
    rng = np.random.default_rng(0)
    sampler = ObjectiveSampler("biglearn")
    specs = [sampler(1000, rng) for _ in range(400)]
    source_ratio = np.mean([s.n_source / 1000 for s in specs])
    target_ratio = np.mean([s.n_target / (1000 - s.n_source) for s in specs])
    assert abs(source_ratio - 0.5 / 3.5) < 0.03  # Beta(0.5, 3) mean
    assert abs(target_ratio - 3 / 3.5) < 0.03  # Beta(3, 0.5) mean


def test_sampling_is_reproducible():
    a = [ObjectiveSampler("biglearn")(30, rng) for rng in [np.random.default_rng(5)] for _ in range(5)]
    b = [ObjectiveSampler("biglearn")(30, rng) for rng in [np.random.default_rng(5)] for _ in range(5)]
    assert all(np.array_equal(x.order, y.order) for x, y in zip(a, b))


def test_mixture_chooses_per_sample():
    rng = np.random.default_rng()
    sampler = ObjectiveSampler(ObjectiveConfig(name="mixture", mixture={"clm": 1.0, "mlm": 3.0}))
    tasks = [sampler(20, rng).task_id for _ in range(400)]
    share_mlm = tasks.count(TASKS.index("mlm")) / 400
    assert set(tasks) == {TASKS.index("clm"), TASKS.index("mlm")} and abs(share_mlm - 0.75) < 0.08


@pytest.mark.parametrize("span", [False, True])
def test_plm_visibility_is_xlnets_rule(span):
    """Non-targets visible to all; target i sees target j iff rank(j) < rank(i) (query), <= (content)."""
    rng = np.random.default_rng()
    sampler = ObjectiveSampler(ObjectiveConfig(name="plm", plm=PLMConfig(span=span)))
    length = 48
    specs = [sampler(length, rng) for _ in range(4)]
    batch = collate(rng.integers(0, 100, (4, length)), specs, pad_id=0)
    groups = torch.from_numpy(batch.groups)
    for strict in (False, True):
        got = visibility(groups, groups, strict=strict).numpy()
        for b, spec in enumerate(specs):
            rank = np.zeros(length, dtype=int)  # rank 0 = non-target, else prediction step
            targets = spec.order[spec.n_source:spec.n_source + spec.n_target]
            rank[targets] = np.arange(1, len(targets) + 1)
            rows = batch.positions[b]  # original position of every sorted row (all kept here)
            for i in range(length):
                for j in range(length):
                    ri, rj = rank[rows[i]], rank[rows[j]]
                    expected = rj == 0 or (rj < ri if strict else rj <= ri)
                    if strict and ri == 0:
                        expected = False  # non-targets have no query row
                    assert got[b, i, j] == expected


def test_plm_predicts_one_sixth():
    spec = ObjectiveSampler("plm")(60, np.random.default_rng())
    assert spec.n_target == 10


def test_span_targets_are_contiguous_runs_left_to_right():
    rng = np.random.default_rng()
    for _ in range(50):
        spec = ObjectiveSampler("span")(100, rng)
        targets = spec.order[spec.n_source:spec.n_source + spec.n_target]
        assert spec.n_target == 15
        breaks = np.flatnonzero(np.diff(targets) != 1)
        runs = np.split(targets, breaks + 1)
        assert all(np.all(np.diff(r) == 1) for r in runs)


def test_segments_forced_into_source_target_or_dropped():
    rng = np.random.default_rng()
    label_to_target = ObjectiveConfig(name="biglearn", segments=[SegmentRule(p_target=1.0), SegmentRule(p_source=1.0)])
    spec = ObjectiveSampler(label_to_target)(11, rng, segment_lengths=[1, 10])
    assert spec.n_target == 1 and spec.order[spec.n_source] == 0 and spec.n_source == 10  # p(y | x)
    drop_text = ObjectiveConfig(name="clm", segments=[SegmentRule(), SegmentRule(p_drop=1.0)])
    spec = ObjectiveSampler(drop_text)(11, rng, segment_lengths=[3, 8])
    assert spec.n_source + spec.n_target == 3  # marginal of the first segment only
    mixed = ObjectiveConfig(name="biglearn", segments=[SegmentRule(p_source=0.3, p_target=0.3, p_drop=0.2), SegmentRule()])
    fates = {"source": 0, "target": 0, "absent": 0, "free": 0}
    for _ in range(2000):
        spec = ObjectiveSampler(mixed)(9, rng, segment_lengths=[1, 8])
        check_spec(spec, 9)
        where = int(np.flatnonzero(spec.order == 0)[0])
        if where >= spec.n_source + spec.n_target:
            fates["absent"] += 1
        elif where < spec.n_source:
            fates["source"] += 1
        else:
            fates["target"] += 1
    assert fates["source"] > 0.3 * 2000 and fates["target"] > 0.3 * 2000 and fates["absent"] > 0.2 * 2000


@pytest.mark.parametrize("fields, key", [
    (dict(name="bert"), "objective.name"),
    (dict(name="mlm", mlm=MLMConfig(ratio=1.5)), "mlm.ratio"),
    (dict(name="mlm", mlm=MLMConfig(ratio=float("nan"))), "mlm.ratio"),
    (dict(name="mixture"), "objective.mixture"),
    (dict(name="mixture", mixture={"gpt": 1.0}), "objective.mixture"),
    (dict(name="mixture", mixture={"clm": -1.0}), "mixture.clm"),
    (dict(segments=[SegmentRule(p_source=0.7, p_target=0.7)]), "segments"),
    (dict(biglearn=BigLearnConfig(source_alpha=0)), "biglearn.source_alpha"),
])
def test_bad_configs_are_refused_when_made_naming_the_key(fields, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        ObjectiveConfig(**fields)


def test_bad_lengths():
    for length in (0, 1):
        with pytest.raises(ValueError, match="length"):
            ObjectiveSampler("biglearn")(length, np.random.default_rng())


def test_eval_tasks_match_their_definitions():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        length = int(rng.integers(8, 80))
        for task in EVAL_TASKS:
            check_spec(eval_split(task, length, rng), length)
        parts = lambda spec: (spec.order[:spec.n_source], spec.order[spec.n_source:spec.n_source + spec.n_target],
                              spec.target_groups)
        source, targets, groups = parts(eval_split("joint", length, rng))
        assert len(source) == 0 and sorted(targets) == list(range(length))
        assert list(groups) == list(range(1, length + 1))  # one token per step: a full chain-rule order
        source, targets, groups = parts(eval_split("left_to_right", length, rng))
        assert len(source) == 0 and list(targets) == list(range(length)) and list(groups) == list(range(1, length + 1))
        source, targets, groups = parts(eval_split("mlm", length, rng, mlm_ratio=0.2))
        assert len(targets) == max(1, round(0.2 * length)) and set(groups) == {1}
        source, targets, groups = parts(eval_split("infill", length, rng, infill_ratio=0.3))
        middle, start = max(1, round(0.3 * length)), targets[0]
        assert list(targets) == list(range(start, start + middle)) and 0 < start and start + middle < length
        assert list(groups) == list(range(1, middle + 1))
        half = length // 2
        source, targets, groups = parts(eval_split("prefix", length, rng))
        assert list(source) == list(range(half, length)) and list(targets) == list(range(half))
        assert list(groups) == list(range(1, half + 1))
        source, targets, groups = parts(eval_split("suffix", length, rng))
        assert list(source) == list(range(half)) and list(targets) == list(range(half, length))
        assert list(groups) == list(range(1, length - half + 1))
    for length in (2, 3):  # shortest windows still give valid draws
        for task in EVAL_TASKS:
            check_spec(eval_split(task, length, rng), length)
    with pytest.raises(ValueError, match="evaluation task"):
        eval_split("bogus", 10, rng)
