"""pretrain/model/ops.py against the plain torch expressions it replaces: same values, same gradients,
fewer saved tensors."""
import pytest
import torch
import torch.nn.functional as F

import pretrain.model.ops as ops
from pretrain.model.ops import linear_cross_entropy, rms_norm, swiglu_down


def plain_rms_norm(x, weight, eps):
    wide = x.float() if x.element_size() < 4 else x
    return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def plain_swiglu_down(gate_up, weight):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight)


def cases(seed):
    g = torch.Generator().manual_seed(seed)
    batch, rows, d, ffn = 2, int(torch.randint(3, 9, (1,), generator=g)), 8, 12
    return [
        (rms_norm, plain_rms_norm, (torch.randn(batch, rows, d, generator=g), 1 + torch.randn(d, generator=g)), (1e-5,)),
        (swiglu_down, plain_swiglu_down,
         (torch.randn(batch, rows, 2 * ffn, generator=g), torch.randn(d, ffn, generator=g) / 3), ()),
    ]


@pytest.mark.parametrize("index", range(2), ids=["rms_norm", "swiglu_down"])
def test_values_and_gradients_equal_the_plain_expressions(index):
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    fused, plain, inputs, constants = cases(seed)[index]
    grads = []
    for fn in (fused, plain):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves, *constants)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
        (out * upstream).sum().backward()
        grads.append((out.detach(), [t.grad for t in leaves]))
    (out_f, grads_f), (out_p, grads_p) = grads
    assert torch.equal(out_f, out_p), f"seed {seed}: forward must be bit-identical"
    for a, b in zip(grads_f, grads_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    # And the exact derivative, in float64.
    leaves = [t.double().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: fused(*a, *[c.double() if torch.is_tensor(c) else c for c in constants]),
                                    leaves)


def saved_bytes(fn, *inputs):
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and not (t.is_leaf and t.requires_grad):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def test_fused_pieces_save_less_than_the_plain_expressions():
    """What the block saves for backward: the SwiGLU product and silu(gate) are recomputed, and
    RMSNorm keeps no normalised copy (the saving of pretrain/model/ops.py)."""
    for fused, plain, inputs, constants in cases(0):
        # Inputs as produced by a previous op (non-leaf), as in the model.
        made = [t.requires_grad_() * 1.0 for t in inputs]
        assert saved_bytes(fused, *made, *constants) < saved_bytes(plain, *made, *constants), fused.__name__


@pytest.mark.parametrize("index", range(2), ids=["rms_norm", "swiglu_down"])
def test_second_derivatives_raise_outside_and_are_exact_inside_twice_differentiable(index):
    """A gradient penalty differentiates a gradient: the memory-lean backward refuses that (its
    rstd / product are constants to autograd), twice_differentiable() gives exact second
    derivatives (gradgradcheck, float64)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    fused, _, inputs, constants = cases(seed)[index]
    leaves = [t.double().requires_grad_() for t in inputs]
    first = torch.autograd.grad(fused(*leaves, *constants).pow(2).sum(), leaves[0], create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once_differentiable"):
        first.sum().backward()
    with ops.twice_differentiable():
        assert torch.autograd.gradgradcheck(lambda *a: fused(*a, *constants), leaves)
    assert not ops._PLAIN_GRAPH.get()  # the context restores the memory-lean path


def test_bf16_autocast_and_no_grad_paths():
    fused, plain, (gate_up, weight), _ = cases(3)[1]
    with torch.no_grad():
        assert torch.equal(fused(gate_up, weight), plain(gate_up, weight))
    gate_up = gate_up.requires_grad_()
    weight = weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(gate_up, weight)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert gate_up.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert torch.isfinite(gate_up.grad).all() and torch.isfinite(weight.grad).all()


def test_rms_norm_of_an_overflowed_row_is_nan_not_zero():
    """A row whose sum of squares overflows: the plain expression gives zeros (a dead model at a
    finite loss); rms_norm gives NaN there, so the divergence guard sees a non-finite loss. Rows
    that do not overflow are untouched."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    x = torch.randn(3, 16, generator=g)
    x[1] *= 1e30
    weight = 1 + torch.randn(16, generator=g)
    assert torch.equal(plain_rms_norm(x, weight, 1e-5)[1], torch.zeros(16))
    out = rms_norm(x, weight, 1e-5)
    assert torch.isnan(out[1]).all()
    assert torch.equal(out[[0, 2]], plain_rms_norm(x, weight, 1e-5)[[0, 2]])


def plain_linear_cross_entropy(states, weight, labels, weights, norm):
    nll = F.cross_entropy(states @ weight.t(), labels, reduction="none", ignore_index=-100)
    return (nll * weights).sum() / norm, nll


@pytest.mark.parametrize("use", ["loss", "nll", "both"])
def test_linear_cross_entropy_equals_logits_then_cross_entropy(use, monkeypatch):
    """Loss, per-row NLL and gradients of the chunked pass against F.cross_entropy on the full
    logits, in float64, with chunks forced small (several per call, a ragged last one), ignored
    rows and weights; through the loss (gradient computed in the forward pass), through the
    per-row NLL (recomputed in backward) or both."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    g = torch.Generator().manual_seed(seed)
    rows, vocab, d = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(2, 40, (1,), generator=g)), 6
    monkeypatch.setitem(ops._CE_CHUNK_ELEMENTS, "cpu", vocab * int(torch.randint(1, 9, (1,), generator=g)))
    states = torch.randn(rows, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows,), generator=g).masked_fill(torch.rand(rows, generator=g) < 0.3, -100)
    weights, norm = torch.rand(rows, generator=g, dtype=torch.float64), torch.tensor(rows / 2, dtype=torch.float64)
    upstream = torch.randn(rows, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda *a: linear_cross_entropy(*a, ignore_index=-100), plain_linear_cross_entropy):
        leaves = [states.clone().requires_grad_(), weight.clone().requires_grad_()]
        loss, nll = fn(*leaves, labels, weights, norm)
        objective = {"loss": 3 * loss, "nll": (nll * upstream).sum(), "both": loss**2 + (nll * upstream).sum()}[use]
        results.append((loss.detach(), nll.detach(), *torch.autograd.grad(objective, leaves)))
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")
    with torch.no_grad():  # no graph: the same numbers, no gradient work
        loss, nll = linear_cross_entropy(states, weight, labels, weights, norm, ignore_index=-100)
    torch.testing.assert_close((loss, nll), results[1][:2], rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_never_saves_the_logits():
    states = torch.randn(512, 16, requires_grad=True) * 1.0
    weight = torch.randn(1000, 16, requires_grad=True)
    labels, weights, norm = torch.randint(0, 1000, (512,)), torch.ones(512), torch.tensor(512.0)
    logits_bytes = 512 * 1000 * 4
    assert saved_bytes(plain_linear_cross_entropy, states, weight, labels, weights, norm) >= logits_bytes
    assert saved_bytes(lambda *a: linear_cross_entropy(*a, ignore_index=-100),
                       states, weight, labels, weights, norm) < logits_bytes / 4


def test_linear_cross_entropy_under_bf16_autocast():
    g = torch.Generator().manual_seed(5)
    states = torch.randn(40, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    labels, weights, norm = torch.randint(0, 30, (40,), generator=g), torch.ones(40), torch.tensor(40.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, nll = linear_cross_entropy(states, weight, labels, weights, norm, ignore_index=-100)
    assert loss.dtype == torch.float32 and nll.dtype == torch.float32  # softmax in fp32
    loss.backward()
    assert states.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    reference = plain_linear_cross_entropy(states.detach(), weight.detach(), labels, weights, norm)[0]
    torch.testing.assert_close(loss.detach(), reference, rtol=2e-2, atol=2e-2)
