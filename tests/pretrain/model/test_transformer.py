"""Semantics of BigLearner checked through its outputs, in both attention modes (docs/design.md)."""
import numpy as np
import pytest
import torch

from pretrain.layout import collate
from pretrain.infer import score, split_spec
from pretrain.model import BigLearner, ModelConfig
from pretrain.objectives import ObjectiveConfig, ObjectiveSampler, TASKS

VOCAB = 37


def tiny_model(**overrides):
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         ffn_hidden=64, attention_backend="torch", **overrides)
    return BigLearner(config).double().eval()


def logits_of(model, windows, specs):
    return model(collate(windows, specs, pad_id=0).to_torch())


@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("objective", ["biglearn", "plm", "mlm", "semi_ar", "span"])
def test_tokens_outside_source_and_target_do_not_matter(objective, streams):
    rng = np.random.default_rng()
    model = tiny_model(streams=streams)
    windows = rng.integers(0, VOCAB, (3, 24))
    specs = [ObjectiveSampler(objective)(24, rng) for _ in range(3)]
    changed = windows.copy()
    for b, spec in enumerate(specs):
        dropped = spec.order[spec.n_source + spec.n_target:]
        changed[b, dropped] = rng.integers(0, VOCAB, len(dropped))
    torch.testing.assert_close(logits_of(model, windows, specs), logits_of(model, changed, specs))


@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("objective", ["biglearn", "semi_ar", "clm"])
def test_a_target_influences_only_later_groups(objective, streams):
    """Changing the token of a target in group g changes no prediction of groups <= g
    (itself included), and does change later ones."""
    rng = np.random.default_rng()
    model = tiny_model(streams=streams)
    length = 20
    window = rng.integers(0, VOCAB, (1, length))
    spec = ObjectiveSampler(objective)(length, rng)
    while spec.n_target < 3:
        spec = ObjectiveSampler(objective)(length, rng)
    base = logits_of(model, window, [spec])[0]
    for k in range(spec.n_target):
        changed = window.copy()
        position = spec.order[spec.n_source + k]
        changed[0, position] = (changed[0, position] + 1 + rng.integers(VOCAB - 1)) % VOCAB
        after = logits_of(model, changed, [spec])[0]
        group = spec.target_groups[k]
        same = torch.from_numpy(spec.target_groups <= group)
        torch.testing.assert_close(after[same], base[same])
        if (~same).any():
            assert not torch.allclose(after[~same], base[~same])


@pytest.mark.parametrize("streams", [1, 2])
def test_mlm_targets_are_conditionally_independent(streams):
    rng = np.random.default_rng()
    model = tiny_model(streams=streams)
    window = rng.integers(0, VOCAB, (1, 40))
    spec = ObjectiveSampler("mlm")(40, rng)
    base = logits_of(model, window, [spec])
    changed = window.copy()
    changed[0, spec.order[spec.n_source:spec.n_source + spec.n_target]] = rng.integers(0, VOCAB, spec.n_target)
    torch.testing.assert_close(logits_of(model, changed, [spec]), base)
    changed[0, spec.order[0]] = (changed[0, spec.order[0]] + 1) % VOCAB  # a source token does matter
    assert not torch.allclose(logits_of(model, changed, [spec]), base)


@pytest.mark.parametrize("streams", [1, 2])
def test_batch_composition_does_not_change_outputs(streams):
    rng = np.random.default_rng()
    model = tiny_model(streams=streams)
    sampler = ObjectiveSampler(ObjectiveConfig(name="mixture", mixture={t: 1.0 for t in TASKS}))
    windows = [rng.integers(0, VOCAB, int(n)) for n in rng.integers(2, 30, 5)]
    specs = [sampler(len(w), rng) for w in windows]
    together = logits_of(model, windows, specs)
    for b, (window, spec) in enumerate(zip(windows, specs)):
        alone = logits_of(model, [window], [spec])[0]
        torch.testing.assert_close(together[b, :spec.n_target], alone[:spec.n_target])


def test_positions_matter_through_rope():
    """Same tokens and groups, different original positions -> different predictions."""
    rng = np.random.default_rng()
    model = tiny_model()
    window = rng.integers(0, VOCAB, (1, 12))
    a = split_spec(12, [0, 1, 2], [5])
    b = split_spec(12, [0, 1, 2], [9])
    window_b = window.copy()
    window_b[0, 9] = window[0, 5]
    assert not torch.allclose(logits_of(model, window, [a]), logits_of(model, window_b, [b]))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_is_mean_nll_of_targets_with_per_row_nll_and_per_task_sums(checkpointing):
    from pretrain.train.task import task_stats
    rng = np.random.default_rng()
    model = tiny_model(activation_checkpointing=checkpointing).train()
    sampler = ObjectiveSampler(ObjectiveConfig(name="mixture", mixture={"clm": 1, "mlm": 1, "biglearn": 1}))
    windows = rng.integers(0, VOCAB, (6, 16))
    batch = collate(windows, [sampler(16, rng) for _ in range(6)], pad_id=0).to_torch()
    loss, rows = model.loss(batch)
    stats = task_stats(batch, rows)
    logits = model(batch)
    nll = torch.nn.functional.cross_entropy(logits[batch.target_mask], batch.labels[batch.target_mask], reduction="none")
    torch.testing.assert_close(loss, nll.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows[batch.target_mask], nll, rtol=1e-5, atol=1e-5)
    assert (rows[~batch.target_mask] == 0).all()
    torch.testing.assert_close(stats["nll_sum"].sum().double(), nll.sum(), rtol=1e-5, atol=1e-5)
    for task in range(len(TASKS)):
        rows = (batch.task_id[:, None].expand_as(batch.target_mask))[batch.target_mask] == task
        assert stats["count"][task] == rows.sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def chain_rule_terms(model, tokens, source, order):
    """log p(x_{t_k} | x_S, x_{t_<k}) for each k, each from its own forward pass over the targets
    decoded so far (what step-by-step generation in this order computes)."""
    terms = []
    for k in range(len(order)):
        _, steps = score(model, tokens, source, order[:k + 1], return_steps=True)
        terms.append(float(steps[k]))
    return terms


def test_score_equals_sum_of_chain_rule_terms_for_two_orders():
    rng = np.random.default_rng()
    model = tiny_model()
    length = 9
    tokens = rng.integers(0, VOCAB, length)
    totals = []
    for order in (np.arange(length), rng.permutation(length)):
        total, steps = score(model, tokens, [], order, return_steps=True)
        terms = chain_rule_terms(model, tokens, [], order)
        np.testing.assert_allclose(steps.numpy(), terms, rtol=1e-9, atol=1e-9)
        assert abs(float(total) - sum(terms)) < 1e-8
        totals.append(float(total))
    assert totals[0] != totals[1]  # an untrained model is not order-consistent: two real checks


def test_score_with_source_and_order_argument():
    rng = np.random.default_rng()
    model = tiny_model()
    tokens = rng.integers(0, VOCAB, (2, 10))
    sources, targets, orders = [[0, 2], [4]], [[3, 7, 1], [0, 9]], [[7, 1, 3], [9, 0]]
    total = score(model, tokens, sources, targets, order=orders)
    for b in range(2):
        assert abs(float(total[b]) - sum(chain_rule_terms(model, tokens[b], sources[b], orders[b]))) < 1e-8
    with pytest.raises(ValueError, match="permutation"):
        score(model, tokens, [[0], [1]], targets, order=[[7, 1], [9, 0]])


def test_bad_inputs_are_rejected_with_the_field_name():
    rng = np.random.default_rng()
    model = tiny_model()
    spec = ObjectiveSampler("biglearn")(10, rng)
    batch = collate(np.full((1, 10), VOCAB + 5), [spec], pad_id=0).to_torch()
    with pytest.raises(ValueError, match="vocab"):
        model(batch)
    batch = collate(rng.integers(0, VOCAB, (1, 10)), [ObjectiveSampler("clm")(10, rng)], pad_id=0).to_torch()
    batch.groups = batch.groups.flip(1)
    with pytest.raises(ValueError, match="groups"):
        model(batch)
    for bad in (dict(d_model=30), dict(n_kv_heads=3), dict(vocab_size=0), dict(dropout=1.5),
                dict(attention_backend="magic")):
        with pytest.raises(ValueError, match="model"):
            ModelConfig(**{**dict(d_model=32, n_heads=4), **bad})
