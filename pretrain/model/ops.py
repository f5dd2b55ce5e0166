"""The block's elementwise pieces as autograd functions that save only their inputs.

Written out by hand because autograd keeps every intermediate its backward formulas read: an
RMSNorm written in torch ops saves the normalised copy of its input, and SwiGLU saves silu(gate) and silu(gate) * up next to gate and up. Those copies were
about 30% of a training step's saved activations (bench/peers.py, L = 1024). Here the
forward computes exactly what the plain torch expressions compute (same operations, same order,
so outputs are bit-identical and imported Llama weights give transformers' logits), and the
backward recomputes the cheap intermediates from the saved inputs instead of storing them.
`tests/pretrain/test_ops.py` checks values and gradients against the plain expressions.

Their backwards are once-differentiable (marked so: differentiating them again raises instead of
silently dropping the terms through rstd). Code that differentiates a gradient, as a gradient
penalty does, runs its forward inside `twice_differentiable()`, where both are the plain
expressions.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_PLAIN_GRAPH = contextvars.ContextVar("plain_graph", default=False)


@contextmanager
def twice_differentiable():
    """rms_norm and swiglu_down record the plain torch expressions inside (more saved tensors,
    every derivative of every order); e.g. the R1 penalty of pretrain/experiments/gan."""
    token = _PLAIN_GRAPH.set(True)
    try:
        yield
    finally:
        _PLAIN_GRAPH.reset(token)


def _rms_forward(x, weight, eps: float):
    wide = x.float() if x.element_size() < 4 else x  # bf16 sums of squares lose too much precision
    rstd = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    # rstd is 0 only where the sum of squares overflowed (eps > 0 bounds it otherwise). The plain
    # expression then returns zeros, and a run whose activations blew up would go on silently
    # with a dead model; NaN there makes its loss non-finite, so the divergence guard stops it.
    rstd = rstd.masked_fill(rstd == 0, float("nan"))
    return (wide * rstd).type_as(x) * weight, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = _rms_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    @once_differentiable
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
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad) or _PLAIN_GRAPH.get():
        # No graph to build (decoding calls this every step): skip the Function's bookkeeping.
        # Under twice_differentiable the same expression is recorded by autograd op by op.
        return _rms_forward(x, weight, eps)[0]
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weight):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    @once_differentiable
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
    if not torch.is_grad_enabled() or not (gate_up.requires_grad or weight.requires_grad) or _PLAIN_GRAPH.get():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, weight)
    return _SwiGLUDown.apply(gate_up, weight)


# Logits held at once by linear_cross_entropy: 16 MiB of fp32 on CPU, under glibc's largest
# mmap threshold (32 MiB), so every chunk reuses heap memory instead of being mapped and
# zero-filled afresh each step; larger on accelerators, whose caching allocators reuse blocks.
_CE_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_CE_CHUNK_ELEMENTS_ACCELERATOR = 1 << 26


def _chunk_rows(states, vocab_size: int) -> int:
    return max(1, _CE_CHUNK_ELEMENTS.get(states.device.type, _CE_CHUNK_ELEMENTS_ACCELERATOR) // vocab_size)


def _ce_chunk(states, weight, labels, valid):
    """A chunk of rows' logits (at least fp32), their logsumexp and their NLL (0 on invalid rows)."""
    logits = F.linear(states, weight)
    logits = logits.float() if logits.element_size() < 4 else logits  # softmax in fp32 under bf16/fp16
    lse = torch.logsumexp(logits, dim=-1)
    nll = (lse - logits.gather(1, labels[:, None]).squeeze(1)) * valid
    return logits, lse, nll


def _ce_grads(states, weight, logits, lse, labels, coefficients, grad_states, grad_weight, rows):
    """Add d(sum_i coefficients_i * nll_i)/d(states, weight) of one chunk: the logits' gradient is
    coefficients * (softmax - onehot(label)), computed in place in the logits' buffer."""
    probs = logits.sub_(lse[:, None]).exp_()
    probs[torch.arange(probs.shape[0], device=probs.device), labels] -= 1
    grad_logits = probs.mul_(coefficients[:, None]).to(states.dtype)
    if grad_states is not None:
        grad_states[rows] += grad_logits @ weight.to(grad_logits.dtype)
    if grad_weight is not None:
        grad_weight += (grad_logits.t() @ states).to(grad_weight.dtype)


def _linear_ce_pass(states, weight, labels, weights, norm, ignore_index: int, grad_states, grad_weight):
    """The chunked pass: per-row NLL and the loss, adding the loss's gradient into grad_states /
    grad_weight when they are given. Returns (loss, nll)."""
    valid = labels != ignore_index
    labels = labels.masked_fill(~valid, 0)  # any in-range index; these rows get weight 0
    wide = torch.promote_types(states.dtype, torch.float32)  # the NLL's dtype: at least fp32
    valid = valid.to(wide)
    coefficients = weights.to(wide) * valid / norm.to(wide)
    n_rows, step = states.shape[0], _chunk_rows(states, weight.shape[0])
    nll = torch.empty(n_rows, dtype=wide, device=states.device)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        logits, lse, nll[rows] = _ce_chunk(states[rows], weight, labels[rows], valid[rows])
        if grad_states is not None or grad_weight is not None:
            _ce_grads(states[rows], weight, logits, lse, labels[rows], coefficients[rows], grad_states,
                      grad_weight, rows)
    return (nll * weights.to(wide)).sum() / norm.to(wide), nll


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, weight, labels, weights, norm, ignore_index: int):
        ctx.set_materialize_grads(False)
        grad_states = torch.zeros_like(states) if states.requires_grad else None
        wide = torch.promote_types(weight.dtype, torch.float32)  # accumulated over chunks: at least fp32
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if weight.requires_grad else None
        loss, nll = _linear_ce_pass(states, weight, labels, weights, norm, ignore_index, grad_states, grad_weight)
        ctx.ignore_index = ignore_index
        ctx.save_for_backward(states, weight, labels, grad_states, grad_weight)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss, grad_nll):
        states, weight, labels, grad_states, grad_weight = ctx.saved_tensors
        out_states = out_weight = None
        if grad_loss is not None:
            out_states = None if grad_states is None else grad_states * grad_loss.to(grad_states.dtype)
            out_weight = None if grad_weight is None else grad_weight * grad_loss
        if grad_nll is not None:
            # A caller differentiating the per-row NLL: the same pass again (the logits are not
            # kept), with grad_nll as the rows' weights and norm 1.
            add_states = None if grad_states is None else torch.zeros_like(states)
            add_weight = None if grad_weight is None else torch.zeros_like(grad_weight)
            _linear_ce_pass(states, weight, labels, grad_nll, grad_nll.new_ones(()), ctx.ignore_index,
                            add_states, add_weight)
            out_states = add_states if out_states is None else out_states + add_states
            out_weight = add_weight if out_weight is None else out_weight + add_weight
        if out_weight is not None:
            out_weight = out_weight.to(weight.dtype)
        return out_states, out_weight, None, None, None, None


def linear_cross_entropy(states, weight, labels, weights, norm, ignore_index: int):
    """(sum_i weights_i * nll_i / norm, nll) with nll_i = -log softmax(states_i @ weight.T)[labels_i]
    (0 where labels_i == ignore_index), without ever holding the [N, vocab] logits: rows go
    through the vocabulary projection in chunks, and the gradient of the loss is computed in
    the same pass (the chunk's logits are at hand then), so backward only scales it by the
    incoming gradient. This is the "fused linear cross-entropy" of large-vocabulary training
    (the same FLOPs as logits + F.cross_entropy: one projection forward, two in backward).
    Differentiating the per-row nll instead of the loss also works, by recomputing the chunks.

    states [N, d], weight [vocab, d], labels [N] int64, weights [N], norm: a 0-dim tensor."""
    if not torch.is_grad_enabled() or not (states.requires_grad or weight.requires_grad):
        return _linear_ce_pass(states, weight, labels, weights, norm, ignore_index, None, None)
    return _LinearCrossEntropy.apply(states, weight, labels, weights, norm, ignore_index)
