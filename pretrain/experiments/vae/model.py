"""The universal BigLearn-VAE and the jointly trained VAE it is compared with, on continuous tokens.

"Big Learning Variational Auto-Encoders" (eq. 7) models p_Xi(x_T, z_T | z_-T, x_S) with ONE
transformer. Here that is the project's blocks (pretrain.model.transformer.Block: two-stream attention
through `kernels`) over continuous rows in the sorted layout (docs/design.md):

- encoding p(z | x_S): content rows = the patches of S (group 0), a z QUERY row (group 1) sees
  exactly them and writes a diagonal Gaussian over z. With S empty it sees nothing: that is the
  learned prior p(z).
- decoding p(x_T | z, x_S): a z CONTENT row (group 0) beside the patches of S (group 0); one
  query row per target patch (group 1) sees exactly {z} u S, never its own value or another
  target's, and writes a diagonal Gaussian over the patch.

Patches enter through a linear embedding, z through another; rows carry rotary positions:
patch i at position i + 1 and z at position 0 (1-D patch order). Padding and every invisible
row hold group INVALID. The jointly trained VAE (eq. 1) is the same machinery split in two:
an encoder that only encodes and a decoder that only decodes from z, with the fixed prior N(0, I).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...model import ModelConfig
from ...model.rope import RotaryRows, rope_inv_freq
from ...model.rows import BatchRows
from ...model.transformer import Block, RMSNorm
from .config import VAEConfig

Z_POSITION = 0  # rotary position of z rows; patch i sits at i + 1
INITIAL_Z_LOGVAR = -6.0  # log-variance of every Gaussian over z at initialisation (std 0.05)


class PatchTransformer(nn.Module):
    """pretrain.model.transformer.Block stack over patch and z rows. The flags say which rows it reads
    (patches, z) and which Gaussians it writes (over z, over patches); the universal model has
    all four, the jointly trained VAE's encoder and decoder two each."""

    def __init__(self, config: VAEConfig, patch_dim: int, n_layers: int, *, reads_patches: bool, reads_z: bool,
                 writes_z: bool, writes_patches: bool):
        super().__init__()
        self.config, self.patch_dim = config, patch_dim
        self.blocks_config = ModelConfig(vocab_size=1, bos_id=0, d_model=config.d_model, n_layers=n_layers, n_heads=config.n_heads,
                                         ffn_hidden=config.ffn_hidden, dropout=config.dropout,
                                         attention_backend=config.attention_backend)
        d, std = config.d_model, self.blocks_config.init_std
        self.patch_in = nn.Linear(patch_dim, d) if reads_patches else None
        self.z_in = nn.Linear(config.z_dim, d) if reads_z else None
        self.z_query = nn.Parameter(torch.randn(d) * std) if writes_z else None
        self.patch_query = nn.Parameter(torch.randn(d) * std) if writes_patches else None
        # One learned log-variance shared by every pixel (config.learn_decoder_std), from decoder_std.
        self.decoder_logvar = nn.Parameter(torch.tensor(2 * math.log(config.decoder_std))) \
            if writes_patches and config.learn_decoder_std else None
        self.blocks = nn.ModuleList(Block(self.blocks_config) for _ in range(n_layers))
        # One final norm per head: the two kinds of query rows are read by different heads.
        self.z_head = nn.Sequential(RMSNorm(d, self.blocks_config.norm_eps), nn.Linear(d, 2 * config.z_dim)) \
            if writes_z else None
        self.patch_head = nn.Sequential(RMSNorm(d, self.blocks_config.norm_eps), nn.Linear(d, patch_dim)) \
            if writes_patches else None
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:  # as pretrain.model.BigLearner: residual projections scaled by depth
            for proj in (block.wo, block.w_down):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * n_layers))
        if writes_z:
            # Start with means that differ between images by far more than the draw's noise: with
            # the small init above they differ by ~1e-3 against a noise of ~1, the decoder learns
            # to ignore z before the encoder can say anything, and the posterior collapses onto
            # the prior (the jointly trained VAE's KL stayed at 0, at beta = 0.01 and at beta = 0).
            nn.init.normal_(self.z_head[1].weight, std=d ** -0.5)
            nn.init.constant_(self.z_head[1].bias[config.z_dim:], INITIAL_Z_LOGVAR)

    def _run(self, h, positions, groups, g, query_positions, query_groups):
        """Final query-stream states. Positions are rotary positions, groups int32 sorted per row."""
        c = self.blocks_config
        inv_freq = rope_inv_freq(c.head_dim, c.rope_base, device=h.device)
        rows = BatchRows(groups, query_groups, RotaryRows(torch.cat([positions, query_positions], 1), inv_freq, h.dtype),
                         c.attention_backend)
        x = torch.cat([h, g.expand(h.shape[0], -1, -1)], dim=1)
        for i, block in enumerate(self.blocks):
            x = block(x, rows, i, content_out=i < len(self.blocks) - 1)
        return x

    def encode(self, rows, positions, groups):
        """(mean, logvar) [B, z_dim] of p(z | the rows whose group is 0).
        rows [B, N, patch_dim], positions [B, N] patch indices, groups [B, N] (0 or INVALID, sorted)."""
        batch = rows.shape[0]
        g = self.z_query.to(rows.dtype).expand(batch, 1, -1)
        query_positions = torch.full((batch, 1), Z_POSITION, dtype=torch.long, device=rows.device)
        query_groups = torch.ones((batch, 1), dtype=torch.int32, device=rows.device)
        g = self._run(self.patch_in(rows), positions + 1, groups.to(torch.int32), g, query_positions, query_groups)
        mean, logvar = self.z_head(g[:, 0]).chunk(2, dim=-1)
        return mean, logvar.clamp(-12.0, 8.0)  # keeps exp(logvar) finite early in training

    def decode(self, z, rows, positions, groups, query_positions, query_groups):
        """(mean, logvar) [B, Nt, patch_dim] of p(x_T | z, x_S) for the query rows.
        z [B, z_dim] is a content row of group 0; patch rows (ignored without `patch_in`) are
        visible where their group is 0; query_positions [B, Nt] patch indices, query_groups 1 or
        INVALID for padding."""
        batch = z.shape[0]
        h = self.z_in(z)[:, None]
        positions_all = torch.full((batch, 1), Z_POSITION, dtype=torch.long, device=z.device)
        groups_all = torch.zeros((batch, 1), dtype=torch.int32, device=z.device)
        if self.patch_in is not None:
            h = torch.cat([h, self.patch_in(rows)], dim=1)
            positions_all = torch.cat([positions_all, positions + 1], dim=1)
            groups_all = torch.cat([groups_all, groups.to(torch.int32)], dim=1)
        # A target row must know WHERE its patch is before attending: with S empty it sees the z
        # row alone, and attention to a single key returns that key's value whatever the rotary
        # positions, so every target would get the same state. Sinusoidal features of the patch
        # position (the rotary angles at full width, no parameters) start each row apart.
        angles = (query_positions + 1).float()[..., None] * rope_inv_freq(
            self.config.d_model, self.blocks_config.rope_base, device=z.device)
        g = self.patch_query.to(h.dtype) + torch.cat([angles.cos(), angles.sin()], dim=-1).to(h.dtype)
        g = self._run(h, positions_all, groups_all, g, query_positions + 1, query_groups.to(torch.int32))
        mean = self.patch_head(g)
        # A fixed variance (config.decoder_std) by default, as the paper's N(mu(z), I): a variance
        # written by the head per pixel let the decoder explain every pixel as noise early on (it
        # scales the mean's gradient by 1 / variance), and both models then left z almost unused
        # within this CPU budget. learn_decoder_std: one learned scalar instead.
        if self.decoder_logvar is not None:
            return mean, self.decoder_logvar.to(mean.dtype).expand_as(mean)
        return mean, torch.full_like(mean, 2 * math.log(self.config.decoder_std))


class BigLearnVAE(nn.Module):
    """The universal model p_Xi(x_T, z_T | z_-T, x_S): one PatchTransformer encodes and decodes."""

    def __init__(self, config: VAEConfig, patch_dim: int):
        super().__init__()
        self.config = config
        self.net = PatchTransformer(config, patch_dim, config.n_layers, reads_patches=True, reads_z=True,
                                    writes_z=True, writes_patches=True)

    def encode(self, rows, positions, groups):
        return self.net.encode(rows, positions, groups)

    def encode_pair(self, rows, positions, posterior_groups, prior_groups):
        """p(z | x_{S u T}) and p(z | x_S) in one batched pass: ((mean, logvar), (mean, logvar))."""
        mean, logvar = self.net.encode(torch.cat([rows, rows]), torch.cat([positions, positions]),
                                       torch.cat([posterior_groups, prior_groups]))
        batch = rows.shape[0]
        return (mean[:batch], logvar[:batch]), (mean[batch:], logvar[batch:])

    def decode(self, z, rows, positions, groups, query_positions, query_groups):
        return self.net.decode(z, rows, positions, groups, query_positions, query_groups)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class JointVAE(nn.Module):
    """The conventional VAE of eq. (1): encoder q(z | x), decoder p(x | z), prior N(0, I), with
    the universal model's blocks split between encoder and decoder (same parameter count).
    It knows only the joint task: the prior ignores x_S and the decoder reads z alone."""

    def __init__(self, config: VAEConfig, patch_dim: int):
        super().__init__()
        self.config = config
        self.encoder = PatchTransformer(config, patch_dim, config.encoder_layers, reads_patches=True, reads_z=False,
                                        writes_z=True, writes_patches=False)
        self.decoder = PatchTransformer(config, patch_dim, config.n_layers - config.encoder_layers,
                                        reads_patches=False, reads_z=True, writes_z=False, writes_patches=True)

    def encode(self, rows, positions, groups):
        return self.encoder.encode(rows, positions, groups)

    def encode_pair(self, rows, positions, posterior_groups, prior_groups):
        mean, logvar = self.encoder.encode(rows, positions, posterior_groups)
        return (mean, logvar), (torch.zeros_like(mean), torch.zeros_like(logvar))

    def decode(self, z, rows, positions, groups, query_positions, query_groups):
        return self.decoder.decode(z, rows, positions, groups, query_positions, query_groups)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


MODELS = {"biglearn_vae": BigLearnVAE, "vae": JointVAE}

