"""The universal generator G(x_T | x_S, z) and discriminator f(x; S, T) of the BigLearn-GAN.

"Big Cooperative Learning", App. D.1 (Fig. 12), at digits scale and built from the project's
blocks (pretrain.model.transformer.Block; the visibility rule of docs/design.md through `kernels`).
Both read one (S, T) batch in the sorted layout of pretrain.layout (pretrain.experiments.vae.objective
builds it on patch indices: S rows, then T rows, then the dropped rest); every row carries its
patch index as rotary position and a learned absolute position embedding.

Generator. Content rows only, with the layout's groups: S rows (group 0) hold the embedded source
patches plus the [M_n] type ("no noise here"); T rows (group 1) hold the mask token [M] plus the
patch-wise noise embedding n_l of their position, where a small MLP maps one z ~ N(0, I) per image
to n_1..n_L. By the content rule S rows see S (the paper's G-Encoder) and T rows see S and every
T row (its G-Decoder), so the targets of an image are generated jointly, coordinated through their
noise rows. No row ever holds a value of x_T: a target never sees its own or another target's
true value. Query rows (the text model's second stream) would not do here: rows of one target
group never see each other, and with S empty a query row would see nothing at all.
A target's final state -> RMSNorm -> linear -> sigmoid is its patch (pixels in [0, 1]).

Discriminator. Content rows S u T, all group 0 (bidirectional, as the paper's BERT-like
discriminator), each the embedded patch plus the [M_s] or [M_t] type embedding; dropped patches are
invalid rows that nobody sees. One CLS query row (group 1) sees every S u T row; its final state ->
RMSNorm -> linear is the logit f(x; S, T) of eq. (8).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...layout import INVALID_GROUP
from ...model import ModelConfig
from ...model.rope import RotaryRows, rope_inv_freq
from ...model.rows import BatchRows
from ...model.transformer import Block, RMSNorm
from ..vae.objective import PatchLayout
from .config import GANConfig

CLS_POSITION = 0  # rotary position of the discriminator's CLS row; patch i sits at i + 1


class BlockStack(nn.Module):
    """n_layers pretrain.model Blocks over the rows of one pass (content rows, then query rows),
    initialised with GANConfig.weight_std()."""

    def __init__(self, config: GANConfig, n_layers: int):
        super().__init__()
        self.config = ModelConfig(vocab_size=1, bos_id=0, d_model=config.d_model, n_layers=n_layers,
                                  n_heads=config.n_heads, ffn_hidden=config.ffn_hidden,
                                  attention_backend=config.attention_backend, init_std=config.weight_std())
        self.blocks = nn.ModuleList(Block(self.config) for _ in range(n_layers))

    def forward(self, h, positions, groups, g=None, query_positions=None, query_groups=None):
        """h [B, N, d] content rows with rotary positions [B, N] and sorted int32 groups [B, N];
        optional query rows g [B, Nq, d]. Returns the final content rows (no query rows) or the
        final query rows."""
        c = self.config
        inv_freq = rope_inv_freq(c.head_dim, c.rope_base, device=h.device)
        if g is not None:
            positions = torch.cat([positions, query_positions], 1)
            h = torch.cat([h, g], 1)
        rows = BatchRows(groups, query_groups, RotaryRows(positions, inv_freq, h.dtype), c.attention_backend)
        for i, block in enumerate(self.blocks):
            h = block(h, rows, i, content_out=g is None or i < len(self.blocks) - 1)
        return h

    def init_weights(self, modules):
        """As pretrain.model.BigLearner: N(0, init_std) linears, residual projections scaled by depth."""
        std = self.config.init_std
        for module in modules:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.wo, block.w_down):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * len(self.blocks)))


class Generator(nn.Module):
    """G(x_T | x_S, z): the universal generator p_theta(x_T | x_S) of eq. (8)."""

    def __init__(self, config: GANConfig, n_patches: int, patch_dim: int):
        super().__init__()
        d = config.d_model
        self.config, self.n_patches = config, n_patches
        self.trunk = BlockStack(config, config.generator_layers)
        std = self.trunk.config.init_std
        self.patch_in = nn.Linear(patch_dim, d)
        self.position = nn.Parameter(torch.randn(n_patches, d) * std)
        self.no_noise = nn.Parameter(torch.randn(d) * std)  # [M_n] on source rows
        self.mask = nn.Parameter(torch.randn(d) * std)  # [M] on target rows
        self.noise = nn.Sequential(nn.Linear(config.z_dim, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(),
                                   nn.Linear(d, n_patches * d))
        self.head = nn.Sequential(RMSNorm(d, self.trunk.config.norm_eps), nn.Linear(d, patch_dim))
        self.trunk.init_weights(self.modules())
        # Variance-preserving noise MLP (std fan_in^-1/2, output std ~0.3): at model.init_std 0.02 a
        # noise MLP of that std gave ~1e-3 against position and mask embeddings of ~0.02, and the
        # generator started (and, in our runs, stayed) collapsed onto one image whatever z.
        for layer in self.noise[::2]:
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)

    def forward(self, lay: PatchLayout, groups: torch.Tensor, target_index: torch.Tensor, z: torch.Tensor):
        """Generated target patches [B, Nt, patch_dim] (layout order of lay.targets) from the S rows
        of `lay` and z [B, z_dim]. groups [B, N]: the layout's (0 on S, 1 on T, INVALID else);
        target_index [B, Nt]: the row of each target. Reads no value outside S."""
        batch = z.shape[0]
        is_source = (groups == 0)[..., None]
        noise = self.noise(z).view(batch, self.n_patches, -1).gather(
            1, lay.positions[..., None].expand(-1, -1, self.config.d_model))
        # S rows: the embedded patch; T rows: mask token and noise only (their values in lay.rows are unused).
        h = torch.where(is_source, self.patch_in(lay.rows) + self.no_noise, self.mask + noise)
        h = self.trunk(h + self.position[lay.positions], lay.positions + 1, groups.to(torch.int32))
        targets = h.gather(1, target_index[..., None].expand(-1, -1, h.shape[-1]))
        return torch.sigmoid(self.head(targets))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Discriminator(nn.Module):
    """f(x; S, T): the universal discriminator of eq. (8), a logit per sample."""

    def __init__(self, config: GANConfig, n_patches: int, patch_dim: int):
        super().__init__()
        d = config.d_model
        self.config = config
        self.trunk = BlockStack(config, config.discriminator_layers)
        std = self.trunk.config.init_std
        self.patch_in = nn.Linear(patch_dim, d)
        self.position = nn.Parameter(torch.randn(n_patches, d) * std)
        self.types = nn.Parameter(torch.randn(2, d) * std)  # [M_s], [M_t]
        self.cls = nn.Parameter(torch.randn(d) * std)
        self.head = nn.Sequential(RMSNorm(d, self.trunk.config.norm_eps), nn.Linear(d, 1))
        self.trunk.init_weights(self.modules())

    def forward(self, lay: PatchLayout, groups: torch.Tensor) -> torch.Tensor:
        """f [B] for the rows of `lay` (real or generated values in its S u T rows). groups [B, N]:
        the layout's (0 on S, 1 on T, INVALID else): S u T rows become one bidirectional group."""
        batch = groups.shape[0]
        h = self.patch_in(lay.rows) + self.types[(groups == 1).long()] + self.position[lay.positions]
        content_groups = torch.where(groups == INVALID_GROUP, groups, torch.zeros_like(groups)).to(torch.int32)
        g = self.cls.to(h.dtype).expand(batch, 1, -1)
        query_positions = torch.full((batch, 1), CLS_POSITION, dtype=torch.long, device=h.device)
        query_groups = torch.ones((batch, 1), dtype=torch.int32, device=h.device)
        g = self.trunk(h, lay.positions + 1, content_groups, g, query_positions, query_groups)
        return self.head(g[:, 0]).squeeze(-1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
