"""Speculative decoding samples EXACTLY the sequential law of its order.

Independent definitions: the law of every completion of a tiny problem (vocabulary 3, 3-4
targets), enumerated from full forward passes with one group per target (the chain rule
`score` computes) and filtered by temperature / top-k / top-p as written out here; a
chi-square test of many speculative samples against it, which group_parallel's samples of the
same model fail; greedy decoding as a loop of full passes; a model whose drafts are its exact
conditionals, which accepts every draft.
"""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from pretrain.layout import SplitSpec, collate
from pretrain.infer import complete, score
from pretrain.infer.speculative import inverse_cdf
from pretrain.model import BigLearner, ModelConfig

VOCAB = 3


def small_model(streams, rng, std=0.3):
    """Random weights large enough that the conditionals depend on the context (the default
    init_std gives nearly uniform predictions, under which every sampler looks exact)."""
    torch.manual_seed(int(rng.integers(1 << 30)))
    config = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, attention_backend="torch",
                         max_seq_len=8, streams=streams, bos_id=0, init_std=std)
    model = BigLearner(config).double().eval()
    if streams == 1:
        torch.nn.init.normal_(model.offset_embed.weight, std=std)
    return model


def spec_of(length, source, order, groups):
    rest = np.setdiff1d(np.arange(length), np.concatenate([source, order]))
    return SplitSpec(np.concatenate([source, order, rest]).astype(np.int32), len(source), len(order),
                     np.asarray(groups, dtype=np.int32), 0)


def filtered(logits, temperature, top_k, top_p):
    """softmax(logits / T) on the top_k tokens, then the smallest set (by probability) of mass >=
    top_p, renormalised; temperature 0: the argmax. Numpy, rows of [..., V]."""
    if temperature == 0:
        return np.eye(logits.shape[-1])[logits.argmax(-1)]
    probs = np.exp((logits - logits.max(-1, keepdims=True)) / temperature)
    probs /= probs.sum(-1, keepdims=True)
    by_rank = (-probs).argsort(-1, kind="stable")  # most probable first
    keep = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(keep, by_rank[..., :top_k or logits.shape[-1]], True, -1)
    probs = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum(-1, keepdims=True)
    ranked = np.take_along_axis(probs, by_rank, -1)
    np.put_along_axis(keep, by_rank, np.cumsum(ranked, -1) - ranked < top_p, -1)  # the mass before each < top_p
    probs = np.where(keep, probs, 0)
    return probs / probs.sum(-1, keepdims=True)


@torch.no_grad()
def law(model, tokens, source, order, groups, temperature=1.0, top_k=0, top_p=1.0):
    """Probability of every completion of the targets ([V^n], the targets' tokens by position in
    itertools.product order), each target predicted in its group (targets in `order`) from S and
    the earlier groups: one full pass per completion."""
    completions = np.array(list(itertools.product(range(VOCAB), repeat=len(order))))
    full = np.repeat(tokens[None], len(completions), 0)
    full[:, np.sort(order)] = completions
    batch = collate(full, [spec_of(len(tokens), source, order, groups)] * len(full), pad_id=0)
    probs = filtered(model(batch.to_torch()).numpy(), temperature, top_k, top_p)  # [V^n, n targets, V]
    return np.take_along_axis(probs, full[:, order, None], -1)[..., 0].prod(1)


def chi_square_p_value(counts, expected):
    """p-value of Pearson's chi-square test; cells expecting fewer than 5 samples are pooled
    (a sample in a cell of probability 0 makes the statistic large)."""
    small = expected < 5
    counts = np.r_[counts[~small], counts[small].sum()]
    expected = np.r_[expected[~small], expected[small].sum()]
    if expected[-1] < 5:  # too little to stand alone: merge with the least expected other cell
        i = int(expected[:-1].argmin())
        counts[i] += counts[-1]
        expected[i] += expected[-1]
        counts, expected = counts[:-1], expected[:-1]
    statistic = ((counts - expected) ** 2 / expected).sum()
    return chi2.sf(statistic, len(counts) - 1)


def counts_per_order(result, order_set, n_targets):
    """Samples per (order, completion) cell, completions in itertools.product order."""
    counts = np.zeros((len(order_set), VOCAB ** n_targets))
    for tokens, order in zip(result.tokens, result.orders):
        targets = np.sort(order)
        cell = int(np.ravel_multi_index(tuple(tokens[targets]), (VOCAB,) * n_targets))
        counts[order_set.index(tuple(order.tolist())), cell] += 1
    return counts


N_SAMPLES = 6000


@pytest.mark.parametrize("streams, schedule, n_targets, options", [  # ~5 s each; both modes, both orders by default
    (2, "left_to_right", 4, dict(draft=3)),
    (1, "random", 3, dict(draft=2, temperature=0.8, top_k=2, top_p=0.9)),
    pytest.param(1, "left_to_right", 4, dict(draft=3), marks=pytest.mark.slow),
    pytest.param(2, "random", 3, dict(draft=2), marks=pytest.mark.slow),
    pytest.param(2, "left_to_right", 4, dict(draft=2, adaptive_draft=True, temperature=1.3, top_p=0.8),
                 marks=pytest.mark.slow),
    pytest.param(1, "strided", 4, dict(draft=1, group_size=2), marks=pytest.mark.slow)])
def test_speculative_samples_the_sequential_law_and_group_parallel_does_not(streams, schedule, n_targets, options):
    """Speculative samples pass a chi-square test against the exact (filtered) sequential law of
    their order, enumerated from full passes; group_parallel (k=2, the same order) on the same
    model fails it, so the test can tell the two laws apart."""
    rng = np.random.default_rng()
    length = n_targets + 1
    source = np.array([int(rng.integers(length))])
    targets = np.setdiff1d(np.arange(length), source)
    tokens = rng.integers(0, VOCAB, length)
    order_set = [tuple(np.sort(targets).tolist())] if schedule != "random" else [
        tuple(p) for p in itertools.permutations(targets.tolist())]
    if schedule == "strided":
        order_set = [tuple(np.sort(targets)[[0, 2, 1, 3]].tolist())]
    filters = {k: options[k] for k in ("temperature", "top_k", "top_p") if k in options}
    groups = np.arange(1, n_targets + 1)
    for _ in range(30):  # a model on which group_parallel's law is far from the sequential one
        model = small_model(streams, rng)
        sequential = np.array([law(model, tokens, source, np.array(o), groups, **filters) for o in order_set])
        grouped = np.array([law(model, tokens, source, np.array(o), (groups + 1) // 2, **filters) for o in order_set])
        divergence = (np.where(sequential > 0, (grouped - sequential) ** 2 / np.maximum(sequential, 1e-300), 0).sum(1)
                      + np.where(sequential > 0, 0, grouped).sum(1) * 1e6)  # group mass the sequential law lacks
        if N_SAMPLES / len(order_set) * divergence.mean() > 300:  # chi-square noncentrality: p ~ 1e-40
            break
    else:
        pytest.fail("no random model separates the group_parallel law from the sequential one")
    assert np.allclose(sequential.sum(1), 1)
    if not filters:  # the enumerated law is score's chain rule
        completions = np.array(list(itertools.product(range(VOCAB), repeat=n_targets)))
        full = np.repeat(tokens[None], len(completions), 0)
        for o, row in zip(order_set, sequential):
            full[:, np.sort(targets)] = completions
            np.testing.assert_allclose(np.exp(score(model, full, [source] * len(full), [list(o)] * len(full)).numpy()),
                                       row, rtol=1e-9)

    batch = np.repeat(tokens[None], N_SAMPLES, 0)
    seed = int(rng.integers(1 << 30))
    result = complete(model, batch, [source] * N_SAMPLES, [targets] * N_SAMPLES, strategy="speculative",
                      schedule=schedule, seed=seed, **options)
    counts = counts_per_order(result, order_set, n_targets)
    expected = counts.sum(1, keepdims=True) * sequential
    p_value = chi_square_p_value(counts.ravel(), expected.ravel())
    assert p_value > 1e-5, f"speculative samples differ from the sequential law: chi-square p = {p_value:.2e}"
    assert result.accepted.sum() > 0 and (result.accepted <= result.drafted).all()

    # group_parallel with k=2 decodes the same orders as (target 1, 2), (3, 4) in groups: `grouped`'s law.
    parallel = complete(model, batch, [source] * N_SAMPLES, [targets] * N_SAMPLES, strategy="group_parallel",
                        schedule=schedule, group_size=2, seed=seed, **filters)
    counts = counts_per_order(parallel, order_set, n_targets)
    p_value = chi_square_p_value(counts.ravel(), (counts.sum(1, keepdims=True) * sequential).ravel())
    assert p_value < 1e-5, f"group_parallel passed the test (p = {p_value:.2e}): it cannot tell the laws apart"


@torch.no_grad()
def greedy_by_full_passes(model, tokens, source, order):
    """Each target in turn: one full pass with the decided targets and it as singleton groups, argmax."""
    filled = tokens.copy()
    for i, target in enumerate(order):
        spec = spec_of(len(filled), source, order[:i + 1], np.arange(1, i + 2))
        logits = model(collate(filled[None], [spec], pad_id=0).to_torch())[0, i]
        filled[target] = int(logits.argmax())
    return filled


def vocabulary_model(streams, vocab=23):
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    config = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                         attention_backend="torch", max_seq_len=32, streams=streams, bos_id=1, init_std=0.1)
    model = BigLearner(config).double().eval()
    if streams == 1:
        torch.nn.init.normal_(model.offset_embed.weight, std=0.3)
    return model


def ragged_problem(rng, batch, length, vocab=23):
    tokens = rng.integers(0, vocab, (batch, length))
    sources = [np.sort(rng.permutation(length)[:int(rng.integers(0, length - 1))]) for _ in range(batch)]
    return tokens, sources, [np.setdiff1d(np.arange(length), s) for s in sources]


@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("schedule", ["left_to_right", "random", "strided"])
def test_greedy_speculative_is_greedy_sequential_decoding(streams, schedule):
    """A ragged batch (each sample its own S, so its own progress per pass): the tokens of greedy
    decoding in the same order, one full pass per target; left to right also those of
    complete(strategy="left_to_right")."""
    rng = np.random.default_rng()
    model = vocabulary_model(streams)
    tokens, sources, targets = ragged_problem(rng, 4, 16)
    for options in (dict(draft=3), dict(draft=2, adaptive_draft=True), dict(draft=5, top_k=1)):
        result = complete(model, tokens, sources, targets, strategy="speculative", schedule=schedule, group_size=3,
                          temperature=0 if "top_k" not in options else 1.0, seed=int(rng.integers(1 << 20)),
                          **options)
        for b in range(4):
            np.testing.assert_array_equal(result.tokens[b], greedy_by_full_passes(model, tokens[b], sources[b],
                                                                                  result.orders[b]))
            assert sorted(result.orders[b].tolist()) == sorted(targets[b].tolist())
        if schedule == "left_to_right":
            sequential = complete(model, tokens, sources, targets, temperature=0)
            np.testing.assert_array_equal(result.tokens, sequential.tokens)
        assert (result.passes <= np.array([len(t) for t in targets])).all()


@pytest.mark.parametrize("streams", [1, 2])
def test_log_probs_are_the_chain_rule_of_the_order(streams):
    rng = np.random.default_rng()
    model = vocabulary_model(streams)
    tokens, sources, targets = ragged_problem(rng, 5, 14)
    result = complete(model, tokens, sources, targets, strategy="speculative", schedule="random", draft=3,
                      temperature=0.9, top_k=10, top_p=0.95, seed=int(rng.integers(1 << 20)))
    expected = score(model, result.tokens, sources, targets, order=result.orders).numpy()
    np.testing.assert_allclose(result.log_probs, expected, atol=1e-9)
    for b in range(5):
        np.testing.assert_array_equal(result.tokens[b, sources[b]], tokens[b, sources[b]])
        assert result.groups[b].tolist() == list(range(1, len(targets[b]) + 1))


@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("adaptive", [False, True])
def test_drafts_equal_to_the_conditionals_are_all_accepted(streams, adaptive):
    """All weights zero: every row predicts the uniform distribution, the drafts are the exact
    conditionals, every draft is accepted, and a pass decides the pending token and its k drafts
    (k growing by one per pass up to 2k when adaptive)."""
    model = vocabulary_model(streams)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    n_targets, draft = 23, 3
    tokens = np.zeros((2, 25), dtype=np.int64)
    result = complete(model, tokens, [np.arange(2)] * 2, [np.arange(2, 25)] * 2, strategy="speculative", draft=draft,
                      adaptive_draft=adaptive, seed=0)
    lengths = [draft + (i if adaptive else 0) for i in range(n_targets)]
    lengths = [min(k, 2 * draft) for k in lengths]
    decided, passes = 1, 1  # the first pass draws target 0 and drafts the next k
    while decided < n_targets:
        decided += min(lengths[passes - 1], n_targets - decided) + 1  # every draft, and the bonus token
        passes += 1
    assert result.passes.tolist() == [passes] * 2
    np.testing.assert_array_equal(result.accepted, result.drafted)
    np.testing.assert_allclose(result.log_probs, n_targets * -math.log(23))


def test_host_inverse_cdf_takes_the_first_token_whose_cumulative_weight_exceeds_the_uniform():
    """Against its definition, written as a loop: the smallest i with u x total < w_0 + ... + w_i;
    zero-weight tokens (the filtered ones) are never drawn, whatever the uniform."""
    rng = np.random.default_rng()
    weights = rng.random((3, 4, 50)) * (rng.random((3, 4, 50)) < 0.3)
    weights[..., 0] = 0  # a zero-weight first token
    weights[..., -1] += 0.1  # every row has mass
    uniforms = rng.random((3, 4))
    drawn = inverse_cdf(weights, uniforms)
    for index in np.ndindex(uniforms.shape):
        running, threshold = 0.0, uniforms[index] * weights[index].sum()
        expected = next(i for i, w in enumerate(weights[index]) if (running := running + w) > threshold)
        assert drawn[index] == expected and weights[index][drawn[index]] > 0


@pytest.mark.parametrize("options, message", [
    (dict(strategy="speculative", draft=0), "--draft must be an integer >= 1"),
    (dict(strategy="speculative", draft=2.5), "--draft must be an integer >= 1"),
    (dict(strategy="speculative", schedule="confidence"), "--schedule must be one of"),
    (dict(strategy="speculative", steps=4), "--steps and --block-size belong to the remasking"),
    (dict(strategy="speculative", block_size=2), "--steps and --block-size belong to the remasking"),
    (dict(strategy="speculative", use_cache=False), "--no-cache"),
    (dict(strategy="speculative", schedule="strided", group_size=0), "--group-size"),
    (dict(strategy="left_to_right", draft=2), "--draft and --adaptive-draft apply to --strategy speculative"),
    (dict(strategy="group_parallel", adaptive_draft=True), "--draft and --adaptive-draft apply"),
])
def test_bad_speculative_options_name_the_flag(options, message):
    model = vocabulary_model(2)
    with pytest.raises(ValueError, match=message):
        complete(model, np.zeros((1, 12), dtype=np.int64), [np.arange(4)], [np.arange(4, 12)], **options)
