"""Rotary position embeddings ("RoFormer: Enhanced Transformer with Rotary Position Embedding"),
computed for ORIGINAL positions: the sorted layout reorders rows, RoPE keeps them position-aware."""
from __future__ import annotations

import math

import torch

from data_pipeline.errors import UserError


ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """Rotary frequencies [head_dim/2], computed as transformers computes them (same formula, same
    fp32 operations) so that imported Llama-family weights see the same angles: plain RoPE
    ("RoFormer: Enhanced Transformer with Rotary Position Embedding", eq. 15), "linear" position
    interpolation, and Llama 3's frequency-dependent "llama3" scaling."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALING_KEYS:
        raise UserError(f"model.rope_scaling.rope_type must be one of {tuple(ROPE_SCALING_KEYS)}; got {kind!r}")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in scaling]
    if missing:
        raise UserError(f"model.rope_scaling ({kind}) lacks {missing}")
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryRows:
    """The rotary tables of every row of a pass, widened once per pass so that each application is
    x * cos + roll(x, head_dim / 2) * sin with sin = [-sin | sin]: bitwise the rotation
    [x1 cos - x2 sin | x1 sin + x2 cos] of x = [x1 | x2] (a - b is a + (-b)) with half its operations per call, shared by all layers."""

    def __init__(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype):
        angles = positions.float()[:, None, :, None] * inv_freq  # [B, 1, rows, head_dim / 2]
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        self.cos, self.sin = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)

    def __call__(self, x, start: int = 0, stop: int | None = None):
        """x [B, H, stop - start, head_dim] of the pass's rows start:stop, rotated."""
        return x * self.cos[:, :, start:stop] + x.roll(x.shape[-1] // 2, -1) * self.sin[:, :, start:stop]
