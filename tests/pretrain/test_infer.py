"""Inference: scoring, cached completion, classification, CLI input errors."""
import json
import shutil

import numpy as np
import pytest
import torch

from data_pipeline.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from kernels import INVALID_GROUP
from pretrain.collate import collate
from pretrain.errors import UserError
from pretrain.export import export_model
from pretrain.infer import (classify, complete, insert_gaps, load_model, main, parse_gaps, sample_from_logits,
                            score, score_orders, split_spec)
from pretrain.model import BigLearner, ModelConfig
from pretrain.objectives import SplitSpec

VOCAB = 29


def tiny_model(**overrides):
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                         attention_backend="torch", max_seq_len=64, **overrides)
    return BigLearner(config).double().eval()


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


def test_score_equals_per_step_full_forward_passes_and_order_average():
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


def test_decode_step_equals_full_forward_on_the_same_layout():
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


def test_decode_step_refuses_groups_that_would_unsort_the_cache():
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


def test_decoding_follows_the_weights_after_they_change():
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
def test_cached_greedy_decoding_matches_uncached_and_score(strategy):
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
def test_greedy_step_picks_the_argmax_of_an_independent_full_pass():
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


def test_complete_keeps_source_tokens_and_fills_exactly_the_gaps():
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


def test_classify_is_the_renormalised_label_slot_distribution():
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


def test_bad_inputs_give_clear_errors(tmp_path):
    rng = np.random.default_rng()
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        complete(model, rng.integers(0, VOCAB, (1, 70)), [[0]], [[5, 6]])
    with pytest.raises(ValueError, match="strategy"):
        complete(model, rng.integers(0, VOCAB, (1, 8)), [[0]], [[5]], strategy="best")
    with pytest.raises(ValueError, match="disjoint"):
        complete(model, rng.integers(0, VOCAB, (1, 8)), [[0, 5]], [[5]])
    with pytest.raises(ValueError, match="label_token_ids"):
        classify(model, [rng.integers(0, VOCAB, 5)], 0, [VOCAB + 1, 2])
    export_model(model.float(), tmp_path / "m", {"tokenizer_sha256": "aaaa"})
    with pytest.raises(ValueError, match="tokenizer sha256 aaaa"):
        load_model(tmp_path / "m", tokenizer_sha256="bbbb")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def user_error(capsys, argv) -> str:
    """The CLI's message for a user mistake: one line on stderr, exit status 2."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m pretrain.infer: error: ") and err.count("\n") == 1, err
    return err


def test_cli_score_and_orders(tmp_path, capsys):
    rng = np.random.default_rng()
    model = tiny_model().float()
    export_model(model, tmp_path)
    ids = rng.integers(0, VOCAB, 9)
    main(["score", "--model", str(tmp_path), "--ids", " ".join(map(str, ids)), "--source", "0-2",
          "--target", "8,3,5", "--orders", "3", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    expected = float(score(model, ids, [0, 1, 2], [8, 3, 5]))
    assert abs(out["log_prob"] - expected) < 1e-4 and len(out["per_order"]) == 3
    assert "empty" in user_error(capsys, ["score", "--model", str(tmp_path), "--ids", " ", "--device", "cpu"])


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    words = "the a cat dog sat lay on under mat rug".split()
    (directory / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(300)))
    train_tokenizer([directory / "corpus.txt"], directory / "tok",
                    TokenizerConfig(vocab_size=30, n_sentinels=2, byte_fallback=False, num_threads=1))
    tokenizer = Tokenizer.load(directory / "tok")
    model = BigLearner(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                   max_seq_len=24, attention_backend="torch"))
    export_model(model, directory / "model", {"tokenizer_sha256": tokenizer.sha256})
    export_model(model, directory / "other", {"tokenizer_sha256": "0" * 64})
    return directory, tokenizer


def test_cli_complete_fills_only_the_gaps(text_model, capsys):
    directory, tokenizer = text_model
    base = ["--model", str(directory / "model"), "--tokenizer", str(directory / "tok"), "--device", "cpu"]
    text = "the [___] sat on the [___:3]"
    main(["complete", *base, "--text", text, "--num-samples", "3", "--strategy", "confident", "--top-k", "5"])
    ids, gaps = parse_gaps(text, tokenizer.encode, 2, tokenizer.pad_id)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert line["gaps"] == gaps and len(line["ids"]) == len(ids)
        kept = [p for p in range(len(ids)) if p not in gaps]
        assert [line["ids"][p] for p in kept] == [ids[p] for p in kept]
    main(["complete", *base, "--text", "the cat", "--continue", "4", "--temperature", "0"])
    line = json.loads(capsys.readouterr().out)
    n_prompt = len(tokenizer.encode("the cat"))
    assert line["gaps"] == list(range(n_prompt, n_prompt + 4)) and line["ids"][:n_prompt] == tokenizer.encode("the cat")


@pytest.mark.parametrize("options", [["--strategy", "group_parallel", "--group-size", "2", "--schedule", "random"],
                                     ["--strategy", "remask_random", "--steps", "3"],
                                     ["--strategy", "block", "--block-size", "2", "--steps", "2"]])
def test_cli_parallel_and_masked_diffusion_strategies_fill_only_the_gaps(text_model, capsys, options):
    directory, tokenizer = text_model
    base = ["--model", str(directory / "model"), "--tokenizer", str(directory / "tok"), "--device", "cpu"]
    assert main(["complete", *base, "--text", "the [___:4] sat", "--num-samples", "2", *options]) == 0
    ids, gaps = parse_gaps("the [___:4] sat", tokenizer.encode, 2, tokenizer.pad_id)
    for line in map(json.loads, capsys.readouterr().out.splitlines()):
        assert line["gaps"] == gaps and [t for p, t in enumerate(line["ids"]) if p not in gaps] == \
            [t for p, t in enumerate(ids) if p not in gaps]


def test_cli_sampler_flags_out_of_range_name_the_flag(text_model, capsys):
    directory, _ = text_model
    base = ["complete", "--model", str(directory / "model"), "--tokenizer", str(directory / "tok"), "--device", "cpu",
            "--text", "the [___:4] sat"]
    assert "--steps must be an integer >= 1" in user_error(capsys, [*base, "--strategy", "remask_random", "--steps", "0"])
    assert "--steps 5 exceeds the 4 masked tokens" in user_error(
        capsys, [*base, "--strategy", "remask_low_confidence", "--steps", "5"])
    assert "--block-size 3 does not divide the 4 tokens" in user_error(
        capsys, [*base, "--strategy", "block", "--block-size", "3", "--steps", "2"])
    assert "--group-size" in user_error(capsys, [*base, "--strategy", "group_parallel", "--group-size", "0"])
    # Without --steps too, a block size is checked (it used to reach numpy's reshape error).
    assert "--block-size 3 does not divide the 4 tokens" in user_error(capsys, [*base, "--strategy", "block",
                                                                                  "--block-size", "3"])
    assert "--temperature must be >= 0" in user_error(capsys, [*base, "--temperature", "-1"])
    assert "--top-p must lie in (0, 1]" in user_error(capsys, [*base, "--temperature", "0", "--top-p", "0"])
    assert "--num-samples must be >= 1" in user_error(capsys, [*base, "--num-samples", "0"])


def test_cli_errors_name_the_problem(text_model, capsys):
    directory, _ = text_model
    base = ["--model", str(directory / "model"), "--tokenizer", str(directory / "tok"), "--device", "cpu"]
    assert "max_seq_len=24" in user_error(capsys, ["complete", *base, "--text", "the [___:30] sat"])
    assert "nothing to complete" in user_error(capsys, ["complete", *base, "--text", "the cat"])
    assert "empty" in user_error(capsys, ["score", *base, "--text", ""])
    other = ["score", "--model", str(directory / "other"), "--tokenizer", str(directory / "tok"), "--text", "the cat"]
    assert "tokenizer sha256 0000" in user_error(capsys, other)
    assert "label_layout" in user_error(capsys, ["classify", *base, "--input", str(directory / "corpus.txt")])
    assert "tok2 not found" in user_error(
        capsys, ["score", "--model", str(directory / "model"), "--tokenizer", str(directory / "tok2"), "--text", "a"])
    # A truncated download names the file; --debug shows the traceback instead of the one line.
    broken = directory / "truncated"
    shutil.copytree(directory / "model", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert f"{weights}: unreadable safetensors" in user_error(capsys, ["score", "--model", str(broken), "--ids", "1 2"])
    with pytest.raises(UserError, match="unreadable safetensors"):
        main(["score", "--model", str(broken), "--ids", "1 2", "--debug"])
