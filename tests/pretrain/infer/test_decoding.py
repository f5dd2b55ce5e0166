"""Group-parallel cached decoding and masked-diffusion (remasking, block) samplers.

References are independent: full forward passes built here from collate, the chain rule over
groups in ONE forward pass, and LLaDA's unmasking schedule written out by hand.
"""
import numpy as np
import pytest
import torch

from pretrain.layout import QUERY_PREDICTOR, SplitSpec, collate
from pretrain.infer import complete
from pretrain.model import BigLearner, ModelConfig

VOCAB = 19


def tiny_model(streams=2):
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                         attention_backend="torch", max_seq_len=64, streams=streams, bos_id=1)
    model = BigLearner(config).double().eval()
    if streams == 1:  # the offset term starts at zero; make it matter
        torch.nn.init.normal_(model.offset_embed.weight, std=0.5)
    return model


def random_problem(rng, batch, length, min_targets=1):
    tokens = rng.integers(0, VOCAB, (batch, length))
    sources, targets = [], []
    for _ in range(batch):
        perm = rng.permutation(length)
        n_source = int(rng.integers(0, length - min_targets + 1))
        sources.append(np.sort(perm[:n_source]))
        targets.append(perm[n_source:])
    return tokens, sources, targets


def spec_of(length, source, targets, groups):
    rest = np.setdiff1d(np.arange(length), np.concatenate([source, targets]))
    order = np.concatenate([np.sort(source), targets, rest]).astype(np.int32)
    return SplitSpec(order, len(source), len(targets), np.asarray(groups, dtype=np.int32), 0)


@torch.no_grad()
def grouped_log_prob(model, tokens, source, order, groups, all_query=False):
    """sum_g log p(x_{T_g} | x_S, x_{T_<g}) from ONE forward pass with the decoded grouping
    (single stream: every target from a query row with all_query, as adaptive orders decode)."""
    batch = collate(tokens[None], [spec_of(len(tokens), source, order, groups)], pad_id=0)
    if all_query:
        batch.predictor[:] = QUERY_PREDICTOR
    logits = model(batch.to_torch())[0].double()
    return float(logits.log_softmax(-1)[torch.arange(len(order)), torch.as_tensor(tokens[order])].sum())


CASES = [(schedule, k, streams) for schedule in ("confidence", "left_to_right", "random", "strided")
         for k, streams in ((1, 1), (2, 2), (2, 1), (4, 2))]


@pytest.mark.parametrize("schedule, group_size, streams", CASES)
def test_group_parallel_cached_equals_uncached_and_the_grouped_chain_rule(schedule, group_size, streams):
    rng = np.random.default_rng()
    model = tiny_model(streams)
    tokens, sources, targets = random_problem(rng, 4, 14)
    options = dict(strategy="group_parallel", group_size=group_size, schedule=schedule, temperature=0.9, top_k=12,
                   top_p=0.95, seed=int(rng.integers(1 << 20)))
    cached = complete(model, tokens, sources, targets, **options)
    uncached = complete(model, tokens, sources, targets, use_cache=False, **options)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    for b in range(4):
        np.testing.assert_array_equal(cached.orders[b], uncached.orders[b])
        np.testing.assert_array_equal(cached.groups[b], uncached.groups[b])
        assert sorted(cached.orders[b].tolist()) == sorted(targets[b].tolist())
        sizes = np.bincount(cached.groups[b])[1:]
        assert np.all(sizes[:-1] == group_size) and 1 <= sizes[-1] <= group_size
        expected = grouped_log_prob(model, cached.tokens[b], sources[b], cached.orders[b], cached.groups[b],
                                    all_query=streams == 1 and schedule == "confidence")
        assert abs(cached.log_probs[b] - expected) < 1e-8
        assert abs(uncached.log_probs[b] - expected) < 1e-8
    if schedule == "left_to_right":
        assert all((np.diff(o) > 0).all() for o in cached.orders)
    if schedule == "strided":
        for b in range(4):
            assert_strided(np.sort(targets[b]), cached.orders[b], cached.groups[b], group_size)


def assert_strided(sorted_targets, order, groups, k):
    """Group g holds the g-th token of each of k contiguous runs of the sorted targets, the runs'
    lengths ceil or floor of n/k, the longer ones first."""
    n = len(sorted_targets)
    lengths = [n // k + (c < n % k) for c in range(k)]
    starts = np.cumsum([0] + lengths[:-1])
    for g in range(1, groups.max() + 1):
        expected = {sorted_targets[start + g - 1] for start, length in zip(starts, lengths) if g <= length}
        assert set(order[groups == g].tolist()) == expected


@torch.no_grad()
@pytest.mark.parametrize("schedule", ["left_to_right", "confidence", "strided"])
def test_one_token_per_group_is_sequential_decoding(schedule):
    """Greedy group_parallel with k = 1 against a sequential decoder written here: each step a full
    pass over S and the tokens decided so far (one group each), the next target by position or by
    the highest top probability, its argmax appended (strided with one chunk: by position)."""
    rng = np.random.default_rng()
    model = tiny_model()
    tokens, sources, targets = random_problem(rng, 1, 11)
    result = complete(model, tokens, sources, targets, strategy="group_parallel", group_size=1, schedule=schedule,
                      temperature=0)
    filled, source = tokens[0].copy(), sources[0]
    # Candidates in the order given (ties, e.g. before anything is known, go to the first).
    remaining = targets[0].tolist() if schedule == "confidence" else sorted(targets[0].tolist())
    decided = []
    while remaining:
        spec = spec_of(11, source, np.array(decided + remaining), list(range(1, len(decided) + 1))
                       + [len(decided) + 1] * len(remaining))
        logits = model(collate(filled[None], [spec], pad_id=0).to_torch())[0, len(decided):len(decided) + len(remaining)]
        # confidence: the highest top log-probability compared in float32, ties to the first (as
        # documented: near-ties in float64 would otherwise split on rounding, about 1 run in 30)
        pick = 0 if schedule != "confidence" else int(logits.log_softmax(-1).max(-1).values.float().argmax())
        filled[remaining[pick]] = int(logits[pick].argmax())
        decided.append(remaining.pop(pick))
    np.testing.assert_array_equal(result.tokens[0], filled)
    assert result.orders[0].tolist() == decided and result.groups[0].tolist() == list(range(1, len(decided) + 1))


def test_remask_unmasks_lladas_schedule_and_the_most_confident_first():
    """LLaDA's schedule for 10 tokens in 4 steps is 3, 3, 2, 2; with greedy sampling the tokens kept
    at step 1 are those whose argmax has the highest probability given S alone (one full pass
    with every target masked, in one group)."""
    rng = np.random.default_rng()
    model = tiny_model()
    tokens = rng.integers(0, VOCAB, (1, 16))
    source, gap = np.arange(6), np.arange(6, 16)
    result = complete(model, tokens, [source], [gap], strategy="remask_low_confidence", steps=4, temperature=0)
    assert np.bincount(result.groups[0]).tolist()[1:] == [3, 3, 2, 2]
    with torch.no_grad():
        logits = model(collate(tokens, [spec_of(16, source, gap, np.ones(10))], pad_id=0).to_torch())[0]
    probs = logits.softmax(-1)
    expected = set(gap[probs.max(-1).values.argsort(descending=True)[:3].numpy()].tolist())
    assert set(result.orders[0][:3].tolist()) == expected
    assert all(result.tokens[0, p] == int(probs[i].argmax()) for i, p in enumerate(gap) if p in expected)
    np.testing.assert_array_equal(result.tokens[0, :6], tokens[0, :6])


def test_remask_random_keeps_a_random_subset_and_fills_every_gap():
    rng = np.random.default_rng()
    model = tiny_model()
    tokens, sources, targets = random_problem(rng, 3, 20, min_targets=8)
    firsts = set()
    for seed in range(6):
        result = complete(model, tokens, sources, targets, strategy="remask_random", steps=8, seed=seed)
        for b in range(3):
            assert sorted(result.orders[b].tolist()) == sorted(targets[b].tolist())
            np.testing.assert_array_equal(result.tokens[b, sources[b]], tokens[b, sources[b]])
        firsts.add(tuple(sorted(result.orders[0][:np.bincount(result.groups[0])[1]].tolist())))
    assert len(firsts) > 1


def test_block_decodes_blocks_left_to_right_with_later_blocks_absent():
    rng = np.random.default_rng()
    model = tiny_model()
    tokens = rng.integers(0, VOCAB, (2, 20))
    gap = np.arange(4, 16)
    result = complete(model, tokens, [np.arange(4)] * 2, [gap] * 2, strategy="block", block_size=4, steps=6, seed=1)
    for b in range(2):
        blocks = (result.orders[b] - 4) // 4
        assert np.all(np.diff(blocks) >= 0), "a block starts only after the one before it is complete"
        assert np.bincount(result.groups[b]).tolist()[1:] == [2, 2] * 3
    # Tokens after the gap that are not in S are absent: changing them changes nothing.
    changed = tokens.copy()
    changed[:, 16:] = rng.integers(0, VOCAB, (2, 4))
    again = complete(model, changed, [np.arange(4)] * 2, [gap] * 2, strategy="block", block_size=4, steps=6, seed=1)
    np.testing.assert_array_equal(again.tokens[:, :16], result.tokens[:, :16])


@pytest.mark.parametrize("options, flag", [
    (dict(strategy="remask_low_confidence", steps=0), "--steps"),
    (dict(strategy="remask_random", steps=9), "--steps 9 exceeds the 8 masked tokens of sample 0"),
    (dict(strategy="block", steps=4, block_size=3), "--block-size 3 does not divide the 8 tokens"),
    (dict(strategy="block", steps=1, block_size=4), "--steps 1 is fewer than the 2 blocks"),
    (dict(strategy="block", steps=4), "--block-size"),
    (dict(strategy="block"), "--block-size"),  # without --steps, the block size is still checked
    (dict(strategy="block", block_size=3), "--block-size 3 does not divide the 8 tokens"),
    (dict(strategy="block", block_size=16), "--block-size 16 does not divide the 8 tokens"),
    (dict(strategy="remask_random", steps=True), "--steps"),
    (dict(temperature=-0.5), "--temperature"),
    (dict(temperature=0, top_k=-1), "--top-k"),
    (dict(temperature=0, top_p=0.0), "--top-p"),
    (dict(strategy="group_parallel", group_size=0), "--group-size"),
    (dict(strategy="group_parallel", schedule="best"), "--schedule"),
    (dict(strategy="diffuse"), "--strategy"),
])
def test_bad_sampler_options_name_the_flag(options, flag):
    model = tiny_model()
    tokens = np.zeros((1, 12), dtype=np.int64)
    with pytest.raises(ValueError, match=flag):
        complete(model, tokens, [np.arange(4)], [np.arange(4, 12)], **options)


GREEDY_CASES = [dict(strategy=s) for s in ("left_to_right", "random", "confident", "remask_low_confidence")] + [
    dict(strategy="remask_random", steps=4), dict(strategy="block", block_size=4, steps=4),
    dict(strategy="group_parallel", group_size=3, schedule="confidence"),
    dict(strategy="group_parallel", group_size=2, schedule="random")]


@pytest.mark.parametrize("streams", [1, 2])
def test_filters_that_keep_one_token_are_greedy_decoding_for_every_strategy(streams):
    """top_k = 1, a tiny top_p or a tiny temperature leave one token per row: the same tokens and
    orders as temperature 0 with the same seed (random orders, remask_random's included, come from
    a stream of their own, whatever the draws consume). Numpy integers count as integers."""
    rng = np.random.default_rng()
    model = tiny_model(streams)
    tokens, sources, targets = random_problem(rng, 3, 14, min_targets=8)
    targets = [t[:8] for t in targets]
    seed = int(rng.integers(1 << 20))
    for case in GREEDY_CASES:
        greedy = complete(model, tokens, sources, targets, temperature=0, seed=seed, **case)
        numpy_case = {k: np.int64(v) if isinstance(v, int) else v for k, v in case.items()}
        for filters in (dict(top_k=1), dict(top_p=1e-9), dict(temperature=1e-9), dict(temperature=0.7, top_k=1)):
            other = complete(model, tokens, sources, targets, seed=seed, **numpy_case, **filters)
            np.testing.assert_array_equal(other.tokens, greedy.tokens, err_msg=f"{case} {filters}")
            for b in range(3):
                np.testing.assert_array_equal(other.orders[b], greedy.orders[b], err_msg=f"{case} {filters}")
