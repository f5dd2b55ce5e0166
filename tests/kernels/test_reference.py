"""The dense rule and the torch reference against brute force (docs/design.md, "Visibility rule")."""
import numpy as np
import pytest
import torch

from biglearn_kernels import INVALID_GROUP, group_attention, reference_attention, visibility


def random_groups(rng, batch, n, with_padding=True):
    """Sorted layouts: S (group 0), targets in non-decreasing groups, INVALID padding."""
    rows = []
    for _ in range(batch):
        n_source = int(rng.integers(0, n + 1))
        n_pad = int(rng.integers(0, n - n_source + 1)) if with_padding else 0
        n_target = n - n_source - n_pad
        targets = np.sort(rng.integers(1, max(2, n_target + 1), size=n_target))
        rows.append(np.concatenate([np.zeros(n_source), targets, np.full(n_pad, INVALID_GROUP)]))
    return torch.tensor(np.array(rows), dtype=torch.int32)


@pytest.mark.parametrize("strict", [False, True])
def test_visibility_matches_brute_force(strict):
    rng = np.random.default_rng()
    for _ in range(20):
        q_groups, k_groups = random_groups(rng, 3, 7), random_groups(rng, 3, 9)
        got = visibility(q_groups, k_groups, strict=strict)
        for b in range(3):
            for i in range(7):
                for j in range(9):
                    qi, kj = int(q_groups[b, i]), int(k_groups[b, j])
                    expected = qi != INVALID_GROUP and kj != INVALID_GROUP and (kj < qi if strict else kj <= qi)
                    assert bool(got[b, i, j]) == expected


def naive_attention(q, k, v, q_groups, k_groups, strict):
    """Loop over rows: softmax over visible keys, zeros where none is visible."""
    batch, heads, n_q, _ = q.shape
    rep = heads // k.shape[1]
    out = torch.zeros(batch, heads, n_q, v.shape[-1], dtype=q.dtype)
    mask = visibility(q_groups, k_groups, strict=strict)
    for b in range(batch):
        for h in range(heads):
            for i in range(n_q):
                seen = mask[b, i]
                if seen.any():
                    scores = (k[b, h // rep, seen] @ q[b, h, i]) / q.shape[-1] ** 0.5
                    out[b, h, i] = torch.softmax(scores, 0) @ v[b, h // rep, seen]
    return out


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("strict", [False, True])
def test_reference_matches_naive_loop(n_kv_heads, strict):
    rng = np.random.default_rng()
    q = torch.randn(2, 4, 11, 8, dtype=torch.float64)
    k = torch.randn(2, n_kv_heads, 13, 8, dtype=torch.float64)
    v = torch.randn(2, n_kv_heads, 13, 8, dtype=torch.float64)
    q_groups, k_groups = random_groups(rng, 2, 11), random_groups(rng, 2, 13)
    got = group_attention(q, k, v, q_groups, k_groups, strict=strict, backend="torch")
    torch.testing.assert_close(got, naive_attention(q, k, v, q_groups, k_groups, strict))


@pytest.mark.parametrize("n_keys", [9, 12])
@pytest.mark.parametrize("strict", [False, True])
def test_causal_rows_match_naive_loop(n_keys, strict):
    """Strictly increasing groups: row i sees keys 0..i (content rule, the causal fast path) or
    keys 0..i-1 (strict rule: the query stream of a causal order, the same path shifted by one
    row), with keys past the last row's group unseen; a repeated group leaves the fast path and
    must agree as well. Gradients too."""
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, n_keys, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    groups = torch.arange(n_keys, dtype=torch.int32).expand(2, -1).contiguous()
    for q_groups in (groups[:, :9], groups[:, :9].clone().index_fill_(1, torch.tensor([4]), 3)):
        got = group_attention(q, k, v, q_groups, groups, strict=strict, backend="torch")
        want = naive_attention(q, k, v, q_groups, groups, strict)
        torch.testing.assert_close(got, want)
        upstream = torch.randn(got.shape, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad((got * upstream).sum(), (q, k, v)),
                                   torch.autograd.grad((want * upstream).sum(), (q, k, v)))


def test_reference_query_chunks_agree(monkeypatch):
    """Chunked evaluation (bounded memory) gives the same numbers as one chunk."""
    import biglearn_kernels.reference as reference
    rng = np.random.default_rng()
    q, k, v = (torch.randn(2, 2, 37, 8, dtype=torch.float64) for _ in range(3))
    groups = random_groups(rng, 2, 37)
    whole = reference_attention(q, k, v, groups, groups, strict=False)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * 2 * 37 * 5)  # 5 query rows per chunk
    torch.testing.assert_close(reference_attention(q, k, v, groups, groups, strict=False), whole)


def test_plans_are_shared_by_layers_and_follow_in_place_changes():
    """Calls with the same group tensors (every layer of a forward) share one plan and one mask
    tensor, which autograd saves once; a group tensor written in place between calls (the KV
    cache's groups) gets a new plan, so the answer always matches the groups of the moment."""
    rng = np.random.default_rng()
    q, k, v = (torch.randn(2, 2, 15, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    # A source of 2-7 rows, then sorted target groups with repeats: rows see prefixes of different
    # lengths that are not the causal staircase, so a mask is needed.
    rows = []
    for _ in range(2):
        n_source = int(rng.integers(2, 8))
        rows.append(np.concatenate([np.zeros(n_source), np.sort(rng.integers(1, 5, size=15 - n_source))]))
    groups = torch.tensor(np.array(rows), dtype=torch.int32)
    saved = {}

    def keep(t):
        saved.setdefault(t.untyped_storage().data_ptr(), (tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        first = reference_attention(q, k, v, groups, groups, strict=False)
        second = reference_attention(q * 1.0, k * 1.0, v * 1.0, groups, groups, strict=False)
    torch.testing.assert_close(second, first)
    masks = [key for key, (shape, dtype) in saved.items() if shape[-2:] == (15, 15) and dtype == torch.float64
             and shape[1] == 1]
    assert len(masks) == 1, "both calls must save the same mask tensor"
    for _ in range(3):
        groups[:, int(rng.integers(0, 15)):] = INVALID_GROUP  # in place, as the KV cache writes
        got = reference_attention(q, k, v, groups, groups, strict=False)
        torch.testing.assert_close(got, naive_attention(q.detach(), k.detach(), v.detach(), groups, groups, False))


def test_without_autograd_masks_are_built_per_chunk_and_not_kept(monkeypatch):
    """Inference keeps the reference's memory bound (one chunk's mask at a time, kept only when
    the plan has one chunk); training keeps every chunk's mask in the plan, which autograd saves
    for backward anyway."""
    import biglearn_kernels.reference as reference
    rng = np.random.default_rng()
    q, k, v = (torch.randn(2, 2, 37, 8, dtype=torch.float64) for _ in range(3))
    groups = random_groups(rng, 2, 37)
    groups[0] = torch.arange(37) // 2  # groups of two rows: every chunk needs a mask
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * 2 * 37 * 5)  # 5 query rows per chunk
    with torch.no_grad():
        got = reference_attention(q, k, v, groups, groups, strict=False)
    assert reference._plans[-1][2]._masks == {}
    torch.testing.assert_close(got, naive_attention(q, k, v, groups, groups, False))
    reference_attention(q.requires_grad_(), k, v, groups, groups, strict=False)
    plan = reference._plans[-1][2]
    assert len(plan._masks) == sum(rows is not None for _, _, _, rows, _ in plan.chunks) > 0
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1 << 26)  # one chunk: its mask is kept for the next layer
    with torch.no_grad():
        again = reference_attention(q.detach(), k, v, groups.clone(), groups.clone(), strict=False)
    assert len(reference._plans[-1][2]._masks) == 1
    torch.testing.assert_close(again, got)


def test_a_plan_and_its_masks_go_with_the_groups_that_made_it():
    """Between training steps the cache must not keep the last step's masks alive (they would sit
    next to the new step's at its peak): entries hold their group tensors weakly."""
    import weakref

    import biglearn_kernels.reference as reference
    q, k, v = (torch.randn(2, 2, 12, 8, requires_grad=True) for _ in range(3))
    groups = (torch.arange(12) // 3).to(torch.int32).expand(2, -1).contiguous()  # a mask is needed
    out = reference_attention(q, k, v, groups, groups, strict=False)
    mask = weakref.ref(reference._plans[-1][2]._masks[0])
    del out, groups  # the step is over: its graph and its groups are gone
    fresh = (torch.arange(12) // 4).to(torch.int32).expand(2, -1).contiguous()
    reference_attention(q, k, v, fresh, fresh, strict=False)
    assert mask() is None
    assert all(entry[1][0]() is fresh for entry in reference._plans)


def test_rows_that_see_nothing_are_zero_and_finite_grads():
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    groups = torch.tensor([[0, 0, 1, 2, INVALID_GROUP]], dtype=torch.int32)
    out = group_attention(q, k, v, groups, groups, strict=True, backend="torch")
    assert torch.all(out[:, :, :2] == 0) and torch.all(out[:, :, 4] == 0)  # group 0 and padding
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_reference_gradcheck():
    rng = np.random.default_rng()
    groups = random_groups(rng, 2, 6)
    q = torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 6, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 6, 4, dtype=torch.float64, requires_grad=True)
    for strict in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v: group_attention(q, k, v, groups, groups, strict=strict, backend="torch"), (q, k, v))


@pytest.mark.parametrize("bad, message", [
    (dict(k_groups=torch.tensor([[0, 2, 1, 3]], dtype=torch.int32)), "non-decreasing"),
    (dict(q_groups=torch.zeros(1, 4, dtype=torch.int64)), "int32"),
    (dict(q_groups=torch.zeros(1, 3, dtype=torch.int32)), "q_groups"),
    (dict(k=torch.randn(1, 3, 4, 8)), "n_kv_heads"),
    (dict(backend="cuda-magic"), "backend"),
])
def test_bad_input_is_rejected(bad, message):
    args = dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8),
                q_groups=torch.zeros(1, 4, dtype=torch.int32), k_groups=torch.zeros(1, 4, dtype=torch.int32))
    args.update(bad)
    if "k" in bad:
        args["v"] = torch.randn_like(bad["k"])
    backend = args.pop("backend", "torch")
    with pytest.raises(ValueError, match=message):
        group_attention(**args, strict=False, backend=backend)


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_a_plan_cut_to_its_last_rows_equals_the_full_attention_of_those_rows(monkeypatch, chunk_rows):
    """plan.rows_from(first) (a decoding step's last layer) gives the rows first: exactly what the
    whole plan gives them, with chunking, padding, and rows that see nothing; the causal path
    has no cut (None)."""
    import biglearn_kernels.reference as reference
    from biglearn_kernels import attention_plan, planned_attention
    if chunk_rows:
        monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 3 * 2 * 29 * chunk_rows)
    rng = np.random.default_rng()
    q, k, v = (torch.randn(3, 2, 29, 8, dtype=torch.float64) for _ in range(3))
    k_groups = random_groups(rng, 3, 29)
    q_groups = random_groups(rng, 3, 29)
    for strict in (False, True):
        dense = naive_attention(q, k, v, q_groups, k_groups, strict)
        plan = attention_plan(q_groups, k_groups, strict=strict, n_heads=2, dtype=q.dtype)
        for first in (0, 1, int(rng.integers(2, 28)), 28):
            cut = plan.rows_from(first)
            torch.testing.assert_close(planned_attention(q[:, :, first:], k, v, cut), dense[:, :, first:])
    causal = torch.arange(29, dtype=torch.int32).expand(3, -1)
    assert attention_plan(causal, causal, strict=False, n_heads=2, dtype=q.dtype).rows_from(4) is None


def dense_attention(q, k, v, q_groups, k_groups, strict):
    """Softmax over a dense boolean mask, zeros for rows that see nothing (differentiable)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    seen = visibility(q_groups, k_groups, strict=strict)[:, None]
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~seen, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return weights @ v


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_a_source_prefix_then_singleton_targets_takes_the_causal_path_exactly(monkeypatch, n_kv_heads):
    """Content rows [S (group 0), one target per group, padding] (big learning and prefix LM, whose
    dropped tokens are padding) are the causal case per sample with the S rows redone over S:
    values and gradients equal the dense rule, padding rows are zero, and the plan records each
    sample's (S, valid rows), so this checks that path and not the masked one."""
    import biglearn_kernels.reference as reference
    monkeypatch.setattr(reference, "_PREFIX_CAUSAL_MIN_ROWS", 1)  # the path's own threshold is for speed only
    rng = np.random.default_rng()
    batch, n = 4, 23
    layouts = []
    for b in range(batch):
        n_source = int(rng.integers(1, n + 1)) if b else int(rng.integers(1, n // 2))  # sample 0 has targets
        n_target = int(rng.integers(0, n - n_source + 1)) if b > 1 else n - n_source  # samples 2, 3 padded
        layouts.append((n_source, n_source + n_target))
    groups = torch.tensor(np.array([np.r_[np.zeros(s), np.arange(1, v - s + 1), np.full(n - v, INVALID_GROUP)]
                                    for s, v in layouts]), dtype=torch.int32)
    q = torch.randn(batch, 4, n, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(batch, n_kv_heads, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    plan = reference.attention_plan(groups, groups, strict=False, n_heads=4, dtype=q.dtype)
    assert plan.prefix_causal == layouts and plan.chunks == []
    out = reference.planned_attention(q, k, v, plan)
    expected = dense_attention(q, k, v, groups, groups, strict=False)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(ours, torch.autograd.grad(expected, (q, k, v), grad))
    # The strict rule (query rows) and layouts with a multi-token target group keep the masked path.
    assert reference.attention_plan(groups, groups, strict=True, n_heads=4, dtype=q.dtype).prefix_causal is None
    grouped = groups.clone()
    grouped[0, -2:] = grouped[0, -1]  # sample 0's last two targets predicted together
    assert reference.attention_plan(grouped, grouped, strict=False, n_heads=4, dtype=q.dtype).prefix_causal is None
