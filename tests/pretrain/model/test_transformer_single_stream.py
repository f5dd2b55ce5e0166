"""Single-stream mode (ModelConfig.streams=1), unread-row dropping and decoding, both modes.

The reference below is written from the definition (docs/design.md, single stream), one sample
at a time, with dense masks and F.scaled_dot_product_attention over ALL rows (nothing dropped):
content rows [START (streams=1), S, T in prediction order] see rows of groups <= their own; a
target of a singleton group after a singleton group is read from the content row of that
previous target, a singleton first group of a sample with an empty S from START, with the offset
term added to that row's input; every other target gets a query row (learned start vector, no
token) seeing groups below its own. In single-stream mode every predictor row attends from one
left of its target: its queries are rotated at the target's position - 1 in every layer (a
content row's keys stay at its own position); two-stream query rows sit at the target's
position. With singleton groups only, the content rows are one sequence with a mask that is
bidirectional over START and S and causal after, and row k predicts target k+1.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.layout import QUERY_PREDICTOR, START_PREDICTOR, collate
from data_pipeline.errors import UserError
from pretrain.infer import complete, label_log_probs, score, split_spec
from pretrain.model import BigLearner, ModelConfig
from pretrain.model.rope import rope_inv_freq
from pretrain.objectives import ObjectiveConfig, ObjectiveSampler, SplitSpec, TASKS

VOCAB = 37
MIXTURE = ObjectiveSampler(ObjectiveConfig(name="mixture", mixture={t: 1.0 for t in TASKS}))


def tiny_model(streams, random_offsets=False, **overrides):
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                         attention_backend="torch", streams=streams, bos_id=int(np.random.default_rng().integers(VOCAB)),
                         max_seq_len=64, **overrides)
    model = BigLearner(config).double().eval()
    if random_offsets:
        torch.nn.init.normal_(model.offset_embed.weight, std=0.5)
    return model


def singleton_predictors(groups, n_source):
    """Brute force: per target, 'start', the index of the previous target, or 'query'."""
    out = []
    for k, g in enumerate(groups):
        alone = (groups == g).sum() == 1
        if k == 0:
            out.append("start" if alone and n_source == 0 else "query")
        else:
            out.append(k - 1 if alone and (groups == groups[k - 1]).sum() == 1 else "query")
    return out


def rotate(x, positions, config):
    """RoPE written out ("RoFormer", eq. 15, the half-split pairing of transformers' rotate_half):
    [x1 cos - x2 sin | x1 sin + x2 cos] at each row's original position."""
    angles = torch.as_tensor(positions, dtype=torch.float32)[:, None] * rope_inv_freq(config.head_dim, config.rope_base)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def attend(block, x_q, x_kv, pos_q, pos_kv, mask):
    """Dense attention sub-block + MLP of `block` for rows x_q over keys x_kv under bool mask [nq, nk]."""
    c = block.config
    hd, n_rep = c.head_dim, c.n_heads // c.n_kv_heads
    q = rotate(block.wq(block.attn_norm(x_q)).view(1, -1, c.n_heads, hd).transpose(1, 2), pos_q, c)
    k, v = block.wkv(block.attn_norm(x_kv)).view(1, -1, 2 * c.n_kv_heads, hd).transpose(1, 2).split(c.n_kv_heads, 1)
    k = rotate(k, pos_kv, c).repeat_interleave(n_rep, 1)
    sees = torch.as_tensor(mask)
    o = F.scaled_dot_product_attention(q, k, v.repeat_interleave(n_rep, 1), attn_mask=sees | ~sees.any(-1, keepdim=True))
    o = o * sees.any(-1)[None, None, :, None]  # a row that sees nothing gets zeros
    x = x_q + block.wo(o.transpose(1, 2).flatten(2))
    gate, up = block.w_gate_up(block.mlp_norm(x)).chunk(2, -1)
    return x + F.linear(F.silu(gate) * up, block.w_down.weight)


def dense_reference(model, window, spec):
    """Logits [n_target, V] of one sample, every row computed (see the module docstring)."""
    c = model.config
    ns, nt = spec.n_source, spec.n_target
    source, targets = spec.order[:ns], spec.order[ns:ns + nt]
    groups = np.asarray(spec.target_groups)
    start = [c.bos_id] if c.streams == 1 else []
    tokens = torch.as_tensor(np.concatenate([start, window[source], window[targets]]).astype(np.int64))
    pos = np.concatenate([[-1] * len(start), source, targets])
    row_group = np.concatenate([[0] * len(start), np.zeros(ns), groups])
    kinds = singleton_predictors(groups, ns) if c.streams == 1 else ["query"] * nt
    row_of = {k: (0 if kind == "start" else len(start) + ns + kind) for k, kind in enumerate(kinds) if kind != "query"}
    x = model.embed(tokens)[None]
    query_pos = pos.copy()
    for k, row in row_of.items():
        offset = int(np.clip(targets[k] - pos[row], -c.max_seq_len, c.max_seq_len)) + c.max_seq_len
        x[0, row] = x[0, row] + model.offset_embed.weight[offset]
        query_pos[row] = targets[k] - 1
    queries = [k for k in range(nt) if kinds[k] == "query"]
    g = model.query_start.expand(1, len(queries), -1)
    content_mask = row_group[None, :] <= row_group[:, None]
    query_mask = row_group[None, :] < groups[queries][:, None]
    for block in model.blocks:
        x, g = (attend(block, x, x, query_pos, pos, content_mask),
                attend(block, g, x, targets[queries] - (c.streams == 1), pos, query_mask) if queries else g)
    states = torch.stack([x[0, row_of[k]] if k in row_of else g[0, queries.index(k)] for k in range(nt)])
    return model.head(model.norm(states))


def draw(rng, n_samples, length, sampler=MIXTURE):
    windows = [rng.integers(0, VOCAB, n) for n in rng.integers(4, length + 1, n_samples)]
    return windows, [sampler(len(w), rng) for w in windows]


def test_collate_predictor_matches_brute_force():
    rng = np.random.default_rng()
    windows, specs = draw(rng, 12, 20)
    batch = collate(windows, specs, pad_id=0)
    for b, spec in enumerate(specs):
        expected = [START_PREDICTOR if kind == "start" else QUERY_PREDICTOR if kind == "query"
                    else spec.n_source + kind for kind in singleton_predictors(spec.target_groups, spec.n_source)]
        assert batch.predictor[b, :spec.n_target].tolist() == expected
        assert (batch.predictor[b, spec.n_target:] == QUERY_PREDICTOR).all()


@pytest.mark.parametrize("objective", ["clm", "biglearn", "plm", "prefix_lm", "span"])
def test_singleton_groups_equal_one_causal_sequence(objective):
    """streams=1, offset term zero (as initialised): the logits of the dense single sequence; the
    only query row is the first target's after a non-empty S."""
    rng = np.random.default_rng()
    model = tiny_model(1)
    windows, specs = draw(rng, 3, 16, ObjectiveSampler(objective))
    logits = model(collate(windows, specs, pad_id=0).to_torch())
    for b, spec in enumerate(specs):
        kinds = singleton_predictors(spec.target_groups, spec.n_source)
        assert [kind == "query" for kind in kinds] == [k == 0 and spec.n_source > 0 for k in range(spec.n_target)]
        torch.testing.assert_close(logits[b, :spec.n_target], dense_reference(model, windows[b], spec))


@pytest.mark.parametrize("streams", [1, 2])
def test_every_preset_matches_the_dense_reference_with_gradients(streams):
    """Mixed presets in one batch (query and content predictors, MLM's single group, padding):
    logits, loss and every parameter gradient equal those of the reference, which drops no row."""
    rng = np.random.default_rng()
    model = tiny_model(streams, random_offsets=streams == 1).train()
    windows, specs = draw(rng, 6, 16)
    batch = collate(windows, specs, pad_id=0).to_torch()
    loss, _ = model.loss(batch)
    params = list(model.parameters())
    got = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    reference = [dense_reference(model, w, s) for w, s in zip(windows, specs)]
    labels = torch.cat([batch.labels[b, :s.n_target] for b, s in enumerate(specs)])
    weights = torch.cat([batch.target_weights[b, :s.n_target] for b, s in enumerate(specs)]).double()
    ref_loss = (F.cross_entropy(torch.cat(reference), labels, reduction="none") * weights).sum() / batch.loss_norm.sum()
    want = torch.autograd.grad(ref_loss, params, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(loss, ref_loss)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(a, b, msg=name)
    logits = model(batch)
    for b, spec in enumerate(specs):
        torch.testing.assert_close(logits[b, :spec.n_target], reference[b].detach())


def test_offset_term_is_zero_at_init_and_learned():
    model = tiny_model(1)
    assert model.offset_embed.weight.abs().max() == 0
    rng = np.random.default_rng()
    windows, specs = draw(rng, 1, 12, ObjectiveSampler("clm"))
    batch = collate(windows, specs, pad_id=0).to_torch()
    model.loss(batch)[0].backward()
    assert model.offset_embed.weight.grad[model.config.max_seq_len + 1].abs().sum() > 0  # clm's offset +1


def test_mlm_and_clm_compute_only_the_rows_they_read():
    """MLM drops every target's content row; clm in single-stream mode needs no query row."""
    rng = np.random.default_rng()
    windows = rng.integers(0, VOCAB, (4, 20))
    mlm = collate(windows, [ObjectiveSampler("mlm")(20, rng) for _ in range(4)], pad_id=0).to_torch()
    clm = collate(windows, [ObjectiveSampler("clm")(20, rng) for _ in range(4)], pad_id=0).to_torch()
    for streams in (1, 2):
        model = tiny_model(streams)
        assert model.check_batch(mlm)[0] == int(mlm.n_source.max())
        assert model.check_batch(clm) == (19, 0 if streams == 1 else 20)
        # rows per sample: every S row (+ START), plus one query row per MLM target; clm: L rows
        # (single stream: START and L - 1 tokens) or 2L - 1 (two streams)
        assert model.rows_computed(mlm).tolist() == (mlm.n_source + mlm.n_target + (streams == 1)).tolist()
        assert model.rows_computed(clm).tolist() == [20 if streams == 1 else 39] * 4


def layout(rng, length):
    """A random (S, T) split with singleton and multi-token groups in random sizes."""
    sizes = [int(rng.choice([1, 1, 2, 3])) for _ in range(rng.integers(3, 7))]
    n_target = min(sum(sizes), length - 2)
    groups = np.repeat(np.arange(1, len(sizes) + 1), sizes)[:n_target]
    n_source = int(rng.integers(0, length - n_target))
    perm = rng.permutation(length)
    order = np.concatenate([np.sort(perm[:n_source]), perm[n_source:]]).astype(np.int32)
    return SplitSpec(order, n_source, n_target, groups.astype(np.int32), 0)


@pytest.mark.parametrize("with_segments", [False, True])
@pytest.mark.parametrize("streams", [1, 2])
def test_decode_step_equals_forward_group_by_group(streams, with_segments):
    """Each step writes the previous group's rows (START and S first) and predicts the next
    group: from the new content row when it is a single-stream predictor, else query rows.
    With segment ids, the rows carry theirs; the START row's (whatever is passed) is ignored."""
    rng = np.random.default_rng()
    model = tiny_model(streams, random_offsets=streams == 1, n_segment_types=3 if with_segments else 0)
    if with_segments:
        torch.nn.init.normal_(model.segment_embed.weight, std=0.5)
    length = 16
    window = rng.integers(0, VOCAB, length)
    segment_ids = rng.integers(0, 3, length) if with_segments else None
    spec = layout(rng, length)
    batch = collate(window[None], [spec], pad_id=0, segments=None if segment_ids is None else segment_ids[None]).to_torch()
    full = model(batch)[0]
    ns, groups = spec.n_source, spec.target_groups
    targets = spec.order[ns:ns + spec.n_target]
    as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))[None]  # noqa: E731
    cache = model.new_cache(1, length + 1)
    rows = list(spec.order[:ns])
    row_groups = [0] * ns
    start = streams == 1
    for g in np.unique(groups):
        ks = np.flatnonzero(groups == g)
        positions, tokens = np.array(rows, dtype=np.int64), window[np.array(rows, dtype=np.int64)]
        segments = None if segment_ids is None else segment_ids[positions]
        if start:
            positions, tokens, row_groups = np.r_[-1, positions], np.r_[model.config.bos_id, tokens], [0] + row_groups
            segments = None if segments is None else np.r_[rng.integers(0, 3), segments]
        segments = None if segments is None else as_t(segments)
        by_row = streams == 1 and batch.predictor[0, ks[0]] != QUERY_PREDICTOR
        if by_row:
            reader = 0 if start else len(positions) - 1  # START predicts the first group
            target_positions = np.full(len(positions), -1)
            target_positions[reader] = targets[ks[0]]
            logits = model.decode_step(cache, as_t(tokens), as_t(positions), as_t(row_groups), segments=segments,
                                       target_positions=as_t(target_positions))[0, reader:reader + 1]
        else:
            if len(positions):
                model.decode_step(cache, as_t(tokens), as_t(positions), as_t(row_groups), segments=segments)
            logits = model.decode_step(cache, query_positions=as_t(targets[ks]), query_groups=as_t([g] * len(ks)))[0]
        torch.testing.assert_close(logits, full[ks], rtol=1e-9, atol=1e-9)
        rows, row_groups, start = list(targets[ks]), [g] * len(ks), False


@pytest.mark.parametrize("strategy", ["left_to_right", "random", "confident"])
def test_single_stream_decoding_with_a_cache_equals_full_passes(strategy):
    """Greedy completion with the cache (one row per step for fixed orders; query rows for the
    adaptive one) picks the same tokens as full forward passes, and its log-probabilities are
    the full forward's terms: score() for a fixed order (content rows with offsets), a pass with
    query rows throughout for the adaptive order."""
    rng = np.random.default_rng()
    model = tiny_model(1, random_offsets=True)
    length = 12
    tokens = rng.integers(0, VOCAB, (3, length))
    perms = [rng.permutation(length) for _ in range(3)]
    sources = [np.sort(p[:int(rng.integers(0, 5))]) for p in perms]
    targets = [p[len(s):len(s) + int(rng.integers(1, 7))] for p, s in zip(perms, sources)]
    seed = int(rng.integers(1 << 20))
    cached = complete(model, tokens, sources, targets, strategy=strategy, temperature=0, seed=seed)
    uncached = complete(model, tokens, sources, targets, strategy=strategy, temperature=0, seed=seed, use_cache=False)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_allclose(cached.log_probs, uncached.log_probs, rtol=1e-9, atol=1e-9)
    for b in range(3):
        np.testing.assert_array_equal(cached.orders[b], uncached.orders[b])
        if strategy != "confident":
            expected = float(score(model, cached.tokens[b], sources[b], cached.orders[b]))
        else:
            batch = collate(cached.tokens[b][None], [split_spec(length, sources[b], cached.orders[b])], pad_id=0)
            batch.predictor[:] = QUERY_PREDICTOR
            batch = batch.to_torch()
            with torch.no_grad():
                expected = float(label_log_probs(model(batch).double(), batch.labels).sum())
        assert abs(cached.log_probs[b] - expected) < 1e-8


def test_bad_input_names_the_field():
    for streams in (3, 0, True, 1.0, "1"):
        with pytest.raises(ValueError, match="model.streams"):
            ModelConfig(streams=streams)
    with pytest.raises(ValueError, match="model.bos_id"):
        ModelConfig(vocab_size=10, bos_id=10)
    rng = np.random.default_rng()
    windows, specs = draw(rng, 2, 12)
    batch = collate(windows, specs, pad_id=0).to_torch()
    single, double = tiny_model(1), tiny_model(2)
    for model, other in ((single, double), (double, single)):
        # UserError: a resumed run or an inference command reports it in one line
        with pytest.raises(UserError, match=f"model.streams={other.config.streams}"):
            model.load_state_dict(other.state_dict())
        wrapper = torch.nn.ModuleDict({"model": model})  # as inside the DeepSpeed engine
        with pytest.raises(UserError, match=f"model.streams={other.config.streams}"):
            wrapper.load_state_dict({f"model.{k}": v for k, v in other.state_dict().items()})
    batch.predictor = None
    double(batch)  # two streams never read it
    with pytest.raises(ValueError, match="batch.predictor"):
        single(batch)
    batch = collate(*draw(rng, 1, 12, ObjectiveSampler("clm")), pad_id=0).to_torch()
    batch.predictor[0, 1] = 3  # a row that sees its own target
    with pytest.raises(ValueError, match="batch.predictor"):
        single(batch)
    cache = double.new_cache(1, 4)
    with pytest.raises(ValueError, match="model.streams=1"):
        double.decode_step(cache, torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([[0]]),
                           target_positions=torch.tensor([[1]]))


def test_predictors_single_stream_rows_cannot_express_are_refused():
    """A hand-made TaskBatch.predictor is checked against the definition: a query row, or START /
    a row of the group just below the target's (so it sees exactly what the target may see), one
    row per target. collate's predictors and all-query predictors pass; each kind of corruption
    below (shared row, a row two groups down, an S row or START past the first group) raises."""
    rng = np.random.default_rng()
    model = tiny_model(1)
    for _ in range(20):
        spec = layout(rng, 16)
        batch = collate(rng.integers(0, VOCAB, 16)[None], [spec], pad_id=0).to_torch()
        model.check_batch(batch)
        batch.predictor[:] = QUERY_PREDICTOR
        model.check_batch(batch)
        groups, ns = spec.target_groups, spec.n_source
        below = {g: max([0] + [h for h in groups if h < g]) for g in groups}
        row_group = lambda r: 0 if r == START_PREDICTOR or r < ns else groups[r - ns]  # noqa: E731
        for k in range(spec.n_target):
            allowed = [r for r in range(START_PREDICTOR, ns + spec.n_target) if row_group(r) == below[groups[k]]]
            for r in range(START_PREDICTOR, ns + spec.n_target):
                batch.predictor[:] = QUERY_PREDICTOR
                batch.predictor[0, k] = r
                if r in allowed:
                    model.check_batch(batch)
                    if spec.n_target > 1:  # the same row for a second target
                        batch.predictor[0, (k + 1) % spec.n_target] = r
                        with pytest.raises(ValueError, match="batch.predictor"):
                            model.check_batch(batch)
                else:
                    with pytest.raises(ValueError, match="batch.predictor"):
                        model.check_batch(batch)


def test_every_parameter_gets_a_gradient_without_query_rows():
    """A single-stream batch with no query row (causal orders) still gives every parameter a
    gradient (query_start's is zero), so data-parallel ranks reduce the same parameters."""
    rng = np.random.default_rng()
    model = tiny_model(1).train()
    windows, specs = draw(rng, 3, 12, ObjectiveSampler("clm"))
    batch = collate(windows, specs, pad_id=0).to_torch()
    assert not ((batch.predictor == QUERY_PREDICTOR) & batch.target_mask).any()
    model.loss(batch)[0].backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.query_start.grad.abs().max() == 0
