"""Masked-diffusion, block and group-AR presets and per-target loss weights (docs/design.md).

The loss checks write the objective's formula out independently: LLaDA's
(1 / (B L)) sum_b (1 / t_b) sum_{masked} -log p, and the plain mean for unweighted presets.
"""
import numpy as np
import pytest

from data_pipeline.errors import UserError
import torch
from scipy import stats

from pretrain.layout import collate
from pretrain.model import BigLearner, ModelConfig
from pretrain.objectives import (TASKS, BlockMDMConfig, GroupARConfig, MDMConfig, ObjectiveConfig, ObjectiveSampler,
                                 SegmentRule)

VOCAB = 23


def tiny_model():
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, attention_backend="torch")
    return BigLearner(config).double()


def targets_of(spec):
    return spec.order[spec.n_source:spec.n_source + spec.n_target]


@pytest.mark.parametrize("eps", [1e-3, 0.3])
def test_mdm_ratio_is_uniform_and_weight_is_its_inverse(eps):
    rng = np.random.default_rng()
    sampler = ObjectiveSampler(ObjectiveConfig(name="mdm", mdm=MDMConfig(eps=eps)))
    length, ratios = 400, []
    for _ in range(1500):
        spec = sampler(length, rng)
        weights = spec.target_weights
        assert spec.loss_norm == length and set(spec.target_groups.tolist()) == {1}
        if weights[0] == 0:  # nothing masked: one placeholder target with weight 0
            assert spec.n_target == 1
            continue
        assert np.all(weights == weights[0])
        t = 1.0 / float(weights[0])
        # The weight is the inverse of the probability the tokens were actually masked with.
        assert abs(spec.n_target / length - t) <= 6 * np.sqrt(t * (1 - t) / length) + 1 / length
        ratios.append(t)
    assert len(ratios) > 1400
    assert stats.kstest(ratios, stats.uniform(loc=eps, scale=1 - eps).cdf).pvalue > 1e-3
    # The same test tells U(eps, 1) from U(0, 1) when eps is large enough to matter.
    if eps > 0.1:
        assert stats.kstest(ratios, stats.uniform(loc=0, scale=1).cdf).pvalue < 1e-6


def test_mdm_masks_tokens_independently_of_position():
    rng = np.random.default_rng()
    sampler = ObjectiveSampler("mdm")
    hits = np.zeros(16)
    for _ in range(3000):
        spec = sampler(16, rng)
        hits[targets_of(spec)[spec.target_weights > 0]] += 1
    expected = hits.sum() / 16
    assert stats.chisquare(hits, np.full(16, expected)).pvalue > 1e-3


def test_mdm_loss_is_lladas_normalisation():
    """sum_b (1/t_b) sum_{i masked} nll_bi / (B * L), written out from the logits."""
    rng = np.random.default_rng()
    model = tiny_model()
    batch_size, length = 5, 20
    specs = [ObjectiveSampler("mdm")(length, rng) for _ in range(batch_size)]
    windows = rng.integers(0, VOCAB, (batch_size, length))
    batch = collate(windows, specs, pad_id=0).to_torch()
    loss, rows = model.loss(batch)
    with torch.no_grad():
        log_probs = model(batch).log_softmax(-1)
    expected = 0.0
    for b, spec in enumerate(specs):
        t = 1.0 / float(spec.target_weights.max()) if spec.target_weights.max() > 0 else None
        for k, position in enumerate(targets_of(spec)):
            if t is not None:
                expected += -float(log_probs[b, k, windows[b, position]]) / t
    expected /= batch_size * length
    assert abs(loss.item() - expected) < 1e-5 * max(1.0, abs(expected))
    # Per-task statistics (training side) stay the unweighted NLL of every predicted row.
    from pretrain.train.task import task_stats
    stats_ = task_stats(batch, rows)
    assert stats_["count"][TASKS.index("mdm")] == sum(s.n_target for s in specs)
    nll = -log_probs.gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0][batch.target_mask]
    torch.testing.assert_close(stats_["nll_sum"][TASKS.index("mdm")], nll.sum().float(), rtol=1e-5, atol=1e-5)


def test_mixed_batch_sums_weighted_nll_over_the_sum_of_normalisers():
    """mdm samples of different lengths next to clm and mlm samples (weight 1, normaliser n_target)."""
    rng = np.random.default_rng()
    model = tiny_model()
    sampler = ObjectiveSampler(ObjectiveConfig(name="mixture", mixture={"mdm": 2, "clm": 1, "mlm": 1, "block_mdm": 1}))
    windows = [rng.integers(0, VOCAB, int(n)) for n in rng.integers(4, 40, 8)]
    specs = [sampler(len(w), rng) for w in windows]
    batch = collate(windows, specs, pad_id=0).to_torch()
    loss, _ = model.loss(batch)
    with torch.no_grad():
        log_probs = model(batch).log_softmax(-1)
    numerator = denominator = 0.0
    for b, (window, spec) in enumerate(zip(windows, specs)):
        nll = [-float(log_probs[b, k, window[p]]) for k, p in enumerate(targets_of(spec))]
        name = TASKS[spec.task_id]
        if name == "mdm":
            weight, norm = float(spec.target_weights.max()), len(window)
        elif name == "block_mdm":  # normalised by the block the targets lie in
            start = targets_of(spec).min() // 32 * 32
            weight, norm = float(spec.target_weights.max()), min(len(window), start + 32) - start
        else:
            weight, norm = 1.0, spec.n_target
        numerator += weight * sum(nll)
        denominator += norm
    assert abs(loss.item() - numerator / denominator) < 1e-6 * max(1.0, numerator / denominator)


@pytest.mark.parametrize("name", ["biglearn", "clm", "mlm", "plm", "prefix_lm", "span", "semi_ar", "group_ar"])
def test_unweighted_presets_collate_to_weight_one_and_mean_over_targets(name):
    rng = np.random.default_rng()
    specs = [ObjectiveSampler(name)(int(n), rng) for n in rng.integers(2, 30, 6)]
    batch = collate([rng.integers(0, VOCAB, len(s.order)) for s in specs], specs, pad_id=0)
    assert np.array_equal(batch.target_weights, batch.target_mask.astype(np.float32))
    assert np.array_equal(batch.loss_norm, batch.n_target.astype(np.float32))


def test_block_mdm_keeps_earlier_blocks_and_drops_later_ones():
    rng = np.random.default_rng()
    sampler = ObjectiveSampler(ObjectiveConfig(name="block_mdm", block_mdm=BlockMDMConfig(block_size=8)))
    seen_blocks = set()
    for _ in range(300):
        length = int(rng.integers(2, 40))
        spec = sampler(length, rng)
        targets = targets_of(spec)
        start = int(targets.min()) // 8 * 8
        stop = min(length, start + 8)
        seen_blocks.add(start // 8)
        kept = set(spec.order[:spec.n_source + spec.n_target].tolist())
        assert set(range(start)) <= kept and not kept & set(range(stop, length))
        assert targets.max() < stop and set(spec.target_groups.tolist()) == {1}
        assert spec.loss_norm == stop - start
    assert seen_blocks == set(range(5))


def test_group_ar_group_sizes_come_from_the_curriculum():
    rng = np.random.default_rng()
    sampler = ObjectiveSampler(ObjectiveConfig(name="group_ar", group_ar=GroupARConfig(sizes=[1, 2, 4, 8])))
    sizes = []
    for _ in range(300):
        spec = sampler(64, rng)
        counts = np.bincount(spec.target_groups)[1:]
        assert np.all(counts > 0), "groups are consecutive integers from 1"
        assert set(counts[:-1].tolist()) <= {1, 2, 4, 8} and counts[-1] <= 8  # the last group may be cut short
        sizes += counts[:-1].tolist()
    share = np.bincount(sizes, minlength=9)[[1, 2, 4, 8]] / len(sizes)
    assert np.all(np.abs(share - 0.25) < 0.05)


def test_mdm_with_a_forced_target_segment_weights_it_one():
    rng = np.random.default_rng()
    config = ObjectiveConfig(name="mdm", segments=[SegmentRule(p_target=1.0), SegmentRule()])
    spec = ObjectiveSampler(config)(12, rng, segment_lengths=[2, 10])
    assert targets_of(spec)[-2:].tolist() == [0, 1] and spec.target_weights[-2:].tolist() == [1, 1]
    assert spec.loss_norm == 12  # 10 free positions + the 2 forced targets


@pytest.mark.parametrize("fields, key", [
    (dict(name="mdm", mdm=MDMConfig(eps=0.0)), "objective.mdm.eps"),
    (dict(name="mdm", mdm=MDMConfig(eps=1.0)), "objective.mdm.eps"),
    (dict(name="mdm", mdm=MDMConfig(eps=float("nan"))), "objective.mdm.eps"),
    (dict(name="block_mdm", block_mdm=BlockMDMConfig(block_size=0)), "objective.block_mdm.block_size"),
    (dict(name="group_ar", group_ar=GroupARConfig(sizes=[])), "objective.group_ar.sizes"),
    (dict(name="group_ar", group_ar=GroupARConfig(sizes=[2, 0])), "objective.group_ar.sizes"),
])
def test_bad_weighted_preset_configs_name_the_key(fields, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        ObjectiveConfig(**fields)
