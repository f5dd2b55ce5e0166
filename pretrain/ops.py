"""The block's elementwise pieces as autograd functions that save only their inputs.

Written out by hand because autograd keeps every intermediate its backward formulas read: an
RMSNorm written in torch ops saves the normalised copy of its input, and SwiGLU saves silu(gate) and silu(gate) * up next to gate and up. Those copies were
about 30% of a training step's saved activations (bench/peers.py, L = 1024). Here the
forward computes exactly what the plain torch expressions compute (same operations, same order,
so outputs are bit-identical and imported Llama weights give transformers' logits), and the
backward recomputes the cheap intermediates from the saved inputs instead of storing them.
`tests/pretrain/test_ops.py` checks values and gradients against the plain expressions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms_forward(x, weight, eps: float):
    wide = x.float() if x.element_size() < 4 else x  # bf16 sums of squares lose too much precision
    rstd = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return (wide * rstd).type_as(x) * weight, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = _rms_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        wide = x.float() if x.element_size() < 4 else x
        normed = wide * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.type_as(x)).flatten(0, -2).sum(0).to(weight.dtype)
        grad_normed = (grad_out * weight).to(wide.dtype)
        # d/dx [x * (mean(x^2) + eps)^-1/2] applied to grad_normed.
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def rms_norm(x, weight, eps: float):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in at least fp32; saves x and 1/rms only."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        # No graph to build (decoding calls this every step): skip the Function's bookkeeping.
        return _rms_forward(x, weight, eps)[0]
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weight):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad_out):
        gate_up, weight = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        # Under autocast the forward ran in a lower precision than the weight's: match it.
        grad_out = grad_out.to(gate_up.dtype)
        silu = F.silu(gate)
        grad_hidden = grad_out @ weight.to(grad_out.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out.flatten(0, -2).t() @ (silu * up).flatten(0, -2)).to(weight.dtype)
        # Both halves written in place into one [gate | up] gradient (no concatenation pass).
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad_hidden, silu, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_hidden * up, gate, grad_input=grad_gate)
        return grad_gate_up, grad_weight


def swiglu_down(gate_up, weight):
    """(silu(gate) * up) @ weight.T for gate_up = [gate | up] ("GLU Variants Improve
    Transformer", eq. 6); saves gate_up and the weight, recomputing the product in backward."""
    if not torch.is_grad_enabled() or not (gate_up.requires_grad or weight.requires_grad):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, weight)
    return _SwiGLUDown.apply(gate_up, weight)
