"""Inference API: exact scoring, cached decoding against full passes, classification."""

import numpy as np
import pytest
import torch

from biglearn_kernels import INVALID_GROUP
from pretrain.layout import collate
from pretrain.infer import classify, complete, insert_gaps, parse_gaps, sample_from_logits, score, score_orders, split_spec
from pretrain.objectives import SplitSpec

VOCAB = 29


@torch.no_grad()
def full_pass_log_probs(model, tokens, source, order):
    """log p(x_{t_k} | x_S, x_{t_<k}) for each k, each from its own full forward pass whose
    batch holds ONLY S and the first k targets (nothing after step k is present at all)."""
    terms = []
    for k in range(len(order)):
        spec = split_spec(len(tokens), source, order[:k + 1])
        logits = model(collate(tokens[None], [spec], pad_id=0).to_torch())[0, k].double()
        terms.append(float(logits.log_softmax(-1)[tokens[order[k]]]))
    return np.array(terms)


def random_problem(rng, batch, length):
    tokens = rng.integers(0, VOCAB, (batch, length))
    sources, targets = [], []
    for _ in range(batch):
        perm = rng.permutation(length)
        n_source = int(rng.integers(0, length - 1))
        n_target = int(rng.integers(1, length - n_source + 1))
        sources.append(np.sort(perm[:n_source]))
        targets.append(perm[n_source:n_source + n_target])
    return tokens, sources, targets


def test_score_equals_per_step_full_forward_passes_and_order_average(tiny_model):
    rng = np.random.default_rng()
    model = tiny_model()
    tokens, sources, targets = random_problem(rng, 1, 14)
    tokens, source, target = tokens[0], sources[0], targets[0]
    total, steps = score(model, tokens, source, target, return_steps=True)
    reference = full_pass_log_probs(model, tokens, source, target)
    np.testing.assert_allclose(steps.numpy(), reference, rtol=1e-9, atol=1e-10)
    per_order, log_mean_exp, orders = score_orders(model, tokens, source, target, 4, seed=int(rng.integers(100)))
    for value, order in zip(per_order, orders):
        assert sorted(order.tolist()) == sorted(target.tolist())
        assert abs(value - full_pass_log_probs(model, tokens, source, order).sum()) < 1e-8
    assert abs(log_mean_exp - np.log(np.mean(np.exp(per_order)))) < 1e-9


def test_decode_step_equals_full_forward_on_the_same_layout(tiny_model):
    """Cache rows appended in groups, then query rows: the logits equal those of one full
    forward pass over the batch holding the same rows as S and earlier target groups."""
    rng = np.random.default_rng()
    model = tiny_model()
    length, n_source = 16, 5
    tokens = rng.integers(0, VOCAB, length)
    perm = rng.permutation(length)
    source, decoded, queries = np.sort(perm[:n_source]), perm[n_source:n_source + 6], perm[n_source + 6:n_source + 9]
    groups = np.array([1, 1, 2, 3, 3, 3])  # several rows may share a group
    cache = model.new_cache(1, 20)
    as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))[None]  # noqa: E731
    model.decode_step(cache, as_t(tokens[source]), as_t(source), as_t(np.zeros(n_source)))
    for g in (1, 2, 3):
        rows = decoded[groups == g]
        model.decode_step(cache, as_t(tokens[rows]), as_t(rows), as_t(np.full(len(rows), g)))
    logits = model.decode_step(cache, query_positions=as_t(queries), query_groups=as_t([4, 4, 4]))[0]
    order = np.concatenate([source, decoded, queries, np.setdiff1d(np.arange(length), perm[:n_source + 9])])
    spec = SplitSpec(order.astype(np.int32), n_source, 9, np.concatenate([groups, [4, 4, 4]]).astype(np.int32), 0)
    full = model(collate(tokens[None], [spec], pad_id=0).to_torch())[0, 6:]
    torch.testing.assert_close(logits, full, rtol=1e-9, atol=1e-9)
    assert int(cache.length[0]) == n_source + 6 and (cache.groups[0, n_source + 6:] == INVALID_GROUP).all()


def test_truncated_cache_rows_are_forgotten(tiny_model):
    """Rows written and then truncated away (speculative decoding's rejected drafts) change
    nothing: the next steps equal those of a cache that never held them; a length beyond what a
    sample holds is refused."""
    rng = np.random.default_rng()
    model = tiny_model()
    as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    tokens = as_t(rng.integers(0, VOCAB, (2, 12)))
    kept, dropped = model.new_cache(2, 16), model.new_cache(2, 16)
    model.decode_step(kept, tokens[:, :4], as_t([[0, 1, 2, 3]] * 2), as_t([[0, 1, 2, 3]] * 2))
    model.decode_step(dropped, tokens[:, :6], as_t([[0, 1, 2, 3, 4, 5]] * 2), as_t([[0, 1, 2, 3, 4, 5]] * 2))
    dropped.truncate(as_t([4, 4]))
    assert torch.equal(dropped.groups, kept.groups) and torch.equal(dropped.length, kept.length)
    query = dict(query_positions=as_t([[9, 10], [8, 11]]), query_groups=as_t([[6, 7], [6, 6]]))
    for cache in (kept, dropped):  # new rows land where the forgotten ones were
        model.decode_step(cache, tokens[:, 6:9], as_t([[6, 7, 5]] * 2), as_t([[4, 5, 5]] * 2))
    torch.testing.assert_close(model.decode_step(dropped, **query), model.decode_step(kept, **query),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="KVCache.truncate: lengths"):
        kept.truncate(as_t([8, 12]))


def test_single_stream_step_reads_content_rows_and_query_rows_together(tiny_model):
    """One decode_step with readers on its new content rows and query rows gives the logits of
    the two kinds of step apart: the rows' first, then the queries' (speculative decoding's pass)."""
    rng = np.random.default_rng()
    model = tiny_model(streams=1, bos_id=1)
    torch.nn.init.normal_(model.offset_embed.weight, std=0.5)
    as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    tokens = as_t(rng.integers(0, VOCAB, (1, 10)))
    step = dict(tokens=tokens[:, :3], positions=as_t([[2, 5, 3]]), groups=as_t([[1, 2, 3]]),
                target_positions=as_t([[5, 3, 7]]))
    query = dict(query_positions=as_t([[3, 7, 8]]), query_groups=as_t([[2, 3, 4]]))
    caches = [model.new_cache(1, 8) for _ in range(3)]
    for cache in caches:
        model.decode_step(cache, as_t([[1, tokens[0, 0]]]), as_t([[-1, 0]]), as_t([[0, 0]]))
    both = model.decode_step(caches[0], **step, **query)
    rows = model.decode_step(caches[1], **step)
    model.decode_step(caches[2], **step)  # the rows' offset terms are part of their keys and values
    queries = model.decode_step(caches[2], **query)
    torch.testing.assert_close(both, torch.cat([rows, queries], 1), rtol=1e-12, atol=1e-12)


def test_decode_step_refuses_groups_that_would_unsort_the_cache(tiny_model):
    """The cache must stay sorted by group: a write below a cached group, or decreasing within
    the call, is refused in one line naming the sample; the cache is left as it was."""
    rng = np.random.default_rng()
    model = tiny_model()
    cache = model.new_cache(2, 12)
    as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    tokens = as_t(rng.integers(0, VOCAB, (2, 3)))
    model.decode_step(cache, tokens, as_t([[0, 1, 2], [0, 1, 2]]), as_t([[0, 0, 2], [0, 1, 1]]))
    before = (cache.groups.clone(), cache.length.clone())
    for bad, sample in (([[3, 3], [0, 2]], 1), ([[2, 1], [3, 3]], 0), ([[INVALID_GROUP, 3], [3, 3]], 0)):
        with pytest.raises(ValueError, match=f"sample {sample}'s new rows") as error:
            model.decode_step(cache, tokens[:, :2], as_t([[3, 4], [3, 4]]), as_t(bad))
        assert "\n" not in str(error.value)
        assert torch.equal(cache.groups, before[0]) and torch.equal(cache.length, before[1])
    model.decode_step(cache, tokens[:, :2], as_t([[3, 4], [3, 4]]), as_t([[2, 5], [1, INVALID_GROUP]]))  # equal is fine
    assert cache.length.tolist() == [5, 4]


def test_decoding_follows_the_weights_after_they_change(tiny_model):
    """Decoding keeps [in, out] copies of the weights (BigLearner.decoding_weights): after an
    optimizer step (in place), load_state_dict and a dtype change, its log-probabilities are
    still those of a full forward pass (score) with the current weights; also for a model built
    under torch.inference_mode (weights without a version counter)."""
    rng = np.random.default_rng()
    with torch.inference_mode():
        frozen = tiny_model()
    tokens, sources, targets = random_problem(rng, 1, 8)
    result = complete(frozen, tokens, sources, targets, temperature=0)
    assert abs(result.log_probs[0] - float(score(frozen, result.tokens[0], sources[0], result.orders[0]))) < 1e-8
    model = tiny_model()
    tokens, sources, targets = random_problem(rng, 2, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)

    def optimizer_step():
        with torch.enable_grad():
            sum((p * torch.randn_like(p)).sum() for p in model.parameters()).backward()
        optimizer.step()

    changes = [lambda: None, optimizer_step, lambda: model.load_state_dict(tiny_model().state_dict()), model.float]
    for change, tolerance in zip(changes, (1e-8, 1e-8, 1e-8, 1e-3)):
        change()
        result = complete(model, tokens, sources, targets, temperature=0, seed=1)
        for b in range(2):
            expected = float(score(model, result.tokens[b], sources[b], result.orders[b]))
            assert abs(result.log_probs[b] - expected) < tolerance * max(1.0, abs(expected))


@pytest.mark.parametrize("strategy", ["left_to_right", "random", "confident"])
def test_cached_greedy_decoding_matches_uncached_and_score(strategy, tiny_model):
    rng = np.random.default_rng()
    model = tiny_model()
    tokens, sources, targets = random_problem(rng, 4, 12)
    seed = int(rng.integers(1 << 20))
    cached = complete(model, tokens, sources, targets, strategy=strategy, temperature=0, seed=seed)
    uncached = complete(model, tokens, sources, targets, strategy=strategy, temperature=0, seed=seed, use_cache=False)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    for b in range(4):
        np.testing.assert_array_equal(cached.orders[b], uncached.orders[b])
        assert sorted(cached.orders[b].tolist()) == sorted(targets[b].tolist())
        # The decoded log-probabilities are score's per-step terms for the order it produced.
        assert abs(cached.log_probs[b] - float(score(model, cached.tokens[b], sources[b], cached.orders[b]))) < 1e-8
    if strategy == "left_to_right":
        assert all((np.diff(o) > 0).all() for o in cached.orders)


@torch.no_grad()
def test_greedy_step_picks_the_argmax_of_an_independent_full_pass(tiny_model):
    """Each greedy token is the argmax of p(. | S, earlier decoded tokens) from a fresh full pass."""
    rng = np.random.default_rng()
    model = tiny_model()
    tokens, sources, targets = random_problem(rng, 1, 10)
    result = complete(model, tokens, sources, targets, strategy="random", temperature=0, seed=3)
    filled, order = result.tokens[0], result.orders[0]
    for k in range(len(order)):
        spec = split_spec(10, sources[0], order[:k + 1])
        logits = model(collate(filled[None], [spec], pad_id=0).to_torch())[0, k]
        assert int(logits.argmax()) == filled[order[k]]


def test_complete_keeps_source_tokens_and_fills_exactly_the_gaps(tiny_model):
    rng = np.random.default_rng()
    model = tiny_model()
    tokens, sources, targets = random_problem(rng, 5, 15)
    allowed = np.zeros(VOCAB, dtype=bool)
    allowed[rng.choice(VOCAB, 5, replace=False)] = True
    result = complete(model, tokens, sources, targets, strategy="random", temperature=1.3, top_k=4, top_p=0.9,
                      seed=int(rng.integers(1000)), allowed_tokens=allowed)
    for b in range(5):
        np.testing.assert_array_equal(result.tokens[b, sources[b]], tokens[b, sources[b]])
        untouched = np.setdiff1d(np.arange(15), targets[b])
        np.testing.assert_array_equal(result.tokens[b, untouched], tokens[b, untouched])
        assert len(result.orders[b]) == len(targets[b])
        assert allowed[result.tokens[b, targets[b]]].all()


def test_sampling_filters_against_their_definition():
    rng = np.random.default_rng()
    logits = torch.from_numpy(rng.normal(size=(20000, 6)) * 0 + rng.normal(size=6))
    generator = torch.Generator().manual_seed(int(rng.integers(1000)))
    draws = sample_from_logits(logits, temperature=1.0, top_k=3, generator=generator).numpy()
    assert set(draws.tolist()) == set(np.argsort(-logits[0].numpy())[:3].tolist())
    probs = logits[0].softmax(-1).numpy()
    order = np.argsort(-probs)
    nucleus = order[:int(np.searchsorted(np.cumsum(probs[order]), 0.7) + 1)]
    draws = sample_from_logits(logits, top_p=0.7, generator=generator).numpy()
    assert set(draws.tolist()) == set(nucleus.tolist())
    expected = probs[nucleus] / probs[nucleus].sum()
    observed = np.bincount(draws, minlength=6)[nucleus] / len(draws)
    np.testing.assert_allclose(observed, expected, atol=0.02)
    assert (sample_from_logits(logits, temperature=0) == logits.argmax(-1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_temperature_near_zero_is_greedy(dtype):
    """softmax(logits / T) tends to the argmax as T -> 0, down to temperatures below the dtype's
    smallest number (each division used to overflow every logit to -inf: NaN draws)."""
    rng = np.random.default_rng()
    log_probs = torch.from_numpy(rng.normal(size=(500, 40)) * 3).to(dtype).log_softmax(-1)
    generator = torch.Generator().manual_seed(int(rng.integers(1000)))
    for temperature in (1e-20, 1e-45, 1e-300):
        for filters in ({}, {"top_k": 5, "top_p": 0.5}):
            draws = sample_from_logits(log_probs, temperature=temperature, generator=generator, **filters)
            assert (draws == log_probs.argmax(-1)).all(), (temperature, filters)


def test_classify_is_the_renormalised_label_slot_distribution(tiny_model):
    rng = np.random.default_rng()
    model = tiny_model()
    samples = [rng.integers(0, VOCAB, int(n)) for n in rng.integers(3, 12, 4)]
    labels = np.array([3, 7, 11])
    probs, mass = classify(model, samples, 0, labels)
    for b, sample in enumerate(samples):
        log_p = np.array([float(score(model, np.concatenate([[label], sample[1:]]), np.arange(1, len(sample)), [0]))
                          for label in labels])
        np.testing.assert_allclose(probs[b].numpy(), np.exp(log_p) / np.exp(log_p).sum(), rtol=1e-9)
        assert abs(float(mass[b]) - np.exp(log_p).sum()) < 1e-9


def test_gap_parsing():
    encode = lambda s: [len(w) + 4 for w in s.split()]  # noqa: E731  a stand-in word -> id map
    ids, gaps = parse_gaps("The [___] sat on the [___:3]", encode, gap_len=2)
    assert ids == [7, 0, 0, 7, 6, 7, 0, 0, 0] and gaps == [1, 2, 6, 7, 8]
    ids, gaps = insert_gaps([5, 6, 7], "3:2,0:1")
    assert ids == [0, 5, 6, 7, 0, 0] and gaps == [0, 4, 5]
    with pytest.raises(ValueError, match="--gaps"):
        insert_gaps([5, 6], "x")
