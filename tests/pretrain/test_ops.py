"""pretrain/ops.py against the plain torch expressions it replaces: same values, same gradients,
fewer saved tensors."""
import pytest
import torch
import torch.nn.functional as F

from pretrain.ops import rms_norm, swiglu_down


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
    RMSNorm keeps no normalised copy (the saving of pretrain/ops.py)."""
    for fused, plain, inputs, constants in cases(0):
        # Inputs as produced by a previous op (non-leaf), as in the model.
        made = [t.requires_grad_() * 1.0 for t in inputs]
        assert saved_bytes(fused, *made, *constants) < saved_bytes(plain, *made, *constants), fused.__name__


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
