"""DiM: "Diffusion Mamba for Efficient High-Resolution Image Synthesis" (Teng et al., arXiv 2405.14224).

One-directional Mamba layers whose scan order alternates across the stack (H+, H-, V+, V- and mirrored in the
second half, see ``scan_orders``); the patch grid is padded with k learnable tokens after every row and k pad rows
below, so no scan runs straight from one line's end into the next line's start; three learnable separator tokens
sit between the condition tokens (time, class) and the image; a depthwise 3x3 convolution enhances local features
after patchify and before the head; U-ViT long skips; the condition enters both as prefix tokens and through
adaLN-single (one shared projection of the condition plus a learned per-block table); no MLP.

The hidden state is always kept in the canonical layout [prefix, padded grid row-major]; each block permutes the
grid into its own scan order, runs the mixer, and permutes back. Reverse orders use a reverse mixer and put the
prefix at the end, so the scan still reads the condition first.

Options beyond the paper: ``mixer="mamba2"`` (SSD) and ``scan="zigzag"`` (ZigMa's continuous paths).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers import ModelMixin  # noqa: F401 - diffusers' pipeline loader looks the base class up here
from diffusers.configuration_utils import register_to_config

from .dis import make_mixer
from .layers import (
    Linear,
    init_uvit_ssm_weights,
    DropPath,
    no_weight_decay_names,
    check_inputs,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    interpolate_grid_table,
    maybe_checkpoint,
    modulate,
    unpatchify,
)
from .mixin import SSMDiffModelMixin
from .scan_orders import (
    dim_layer_directions,
    inverse_permutation,
    order_is_reverse,
    pad_grid,
    scan_permutation,
    unpad_grid,
    zigzag_layer_orders,
)

__all__ = ["DiM", "DIM_CONFIGS"]

# layers (odd: half in, one middle, half out) x width, from the paper; "T" is a tiny test size.
DIM_CONFIGS = {
    "T": dict(hidden_size=128, depth=5),
    "S": dict(hidden_size=512, depth=25),
    "L": dict(hidden_size=1024, depth=49),
    "H": dict(hidden_size=1536, depth=49),
}


class DiMBlock(nn.Module):
    """x + gate * mixer(modulate(LayerNorm(x))) with the mixer reading the grid in this block's scan order."""

    def __init__(self, dim: int, mixer: nn.Module, order: str, side: int, num_prefix: int, skip: bool = False,
                 drop_path: float = 0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.order = order
        self.reverse = order_is_reverse(order)
        self.side = side
        self.num_prefix = num_prefix
        self.skip_linear = Linear(2 * dim, dim) if skip else None
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mixer = mixer
        # adaLN-single: per-block (shift, scale, gate) offsets added to the shared projection of the condition.
        self.scale_shift_table = nn.Parameter(torch.randn(3, dim) / dim**0.5)
        perm = scan_permutation(side, side, order)
        base = order.rstrip("+-")
        self._transpose = base == "v"
        if perm is not None and not self._transpose:
            self.register_buffer("perm", perm, persistent=False)
            self.register_buffer("inv_perm", inverse_permutation(perm), persistent=False)
        else:
            self.perm = self.inv_perm = None

    def _to_scan(self, grid: torch.Tensor) -> torch.Tensor:
        if self._transpose:
            n, _, d = grid.shape
            return grid.reshape(n, self.side, self.side, d).transpose(1, 2).reshape(n, -1, d)
        if self.perm is not None:
            return grid[:, self.perm.to(grid.device)]
        return grid

    def _from_scan(self, seq: torch.Tensor) -> torch.Tensor:
        if self._transpose:
            return self._to_scan(seq)  # a transpose is its own inverse
        if self.inv_perm is not None:
            return seq[:, self.inv_perm.to(seq.device)]
        return seq

    def forward(self, h: torch.Tensor, mod: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            h = self.skip_linear(torch.cat([h, skip], dim=-1))
        shift, scale, gate = (mod + self.scale_shift_table.to(mod.dtype)).unbind(1)
        u = modulate(self.norm(h), shift, scale)
        p = self.num_prefix
        prefix, grid = u[:, :p], self._to_scan(u[:, p:])
        if self.reverse:
            seq = torch.cat([grid, prefix.flip(1)], dim=1)
            out = self.mixer(seq)
            out_prefix, out_grid = out[:, -p:].flip(1), out[:, :-p]
        else:
            out = self.mixer(torch.cat([prefix, grid], dim=1))
            out_prefix, out_grid = out[:, :p], out[:, p:]
        out = torch.cat([out_prefix, self._from_scan(out_grid)], dim=1)
        return h + self.drop_path(gate.unsqueeze(1) * out)


class DiM(SSMDiffModelMixin):
    """Diffusion Mamba. ``forward(x, t, y=None)`` -> (N, out_channels, H, W)."""

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1536,
        depth: int = 49,
        num_classes: int = 0,
        learn_sigma: bool = False,
        class_dropout_prob: float = 0.1,
        mixer: str = "mamba",
        scan: str = "dim",
        d_state: int | None = None,
        d_conv: int = 3,
        expand: int = 2,
        num_pad_tokens: int | None = None,
        num_sep_tokens: int = 3,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch size {patch_size}")
        if depth < 1 or depth % 2 == 0:
            raise ValueError(f"DiM depth is the odd number of layers (half in, middle, half out), got {depth}")
        if scan not in ("dim", "zigzag"):
            raise ValueError(f"unknown scan {scan!r}: choose 'dim' (H+/H-/V+/V-) or 'zigzag' (ZigMa paths)")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.grid_size = g = input_size // patch_size
        # As many pad tokens as the conv kernel is wide: the conv window then never spans two lines.
        self.num_pad = k = d_conv if num_pad_tokens is None else num_pad_tokens
        self.num_sep = num_sep_tokens
        self.num_cond_tokens = 2 if num_classes > 0 else 1
        self.num_prefix = self.num_cond_tokens + num_sep_tokens
        self.padded_side = g + k
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        self.conv_in = nn.Conv2d(hidden_size, hidden_size, 3, padding=1, groups=hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_dim=256)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.pad_tokens = nn.Parameter(torch.zeros(k, hidden_size))
        self.sep_tokens = nn.Parameter(torch.zeros(num_sep_tokens, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + self.padded_side**2, hidden_size))
        self.t_block = nn.Sequential(nn.SiLU(), Linear(hidden_size, 3 * hidden_size))

        if d_state is None:
            d_state = 16 if mixer == "mamba" else 64
        orders = dim_layer_directions(depth) if scan == "dim" else zigzag_layer_orders(depth)
        half = depth // 2

        def block(i, skip=False):
            order = orders[i]
            m = make_mixer(mixer, hidden_size, bidirectional=False, reverse=order_is_reverse(order),
                           d_state=d_state, d_conv=d_conv, expand=expand)
            return DiMBlock(hidden_size, m, order, self.padded_side, self.num_prefix, skip=skip,
                            drop_path=drop_path_rate * i / max(depth - 1, 1))

        self.in_blocks = nn.ModuleList([block(i) for i in range(half)])
        self.mid_block = block(half)
        self.out_blocks = nn.ModuleList([block(half + 1 + i, skip=True) for i in range(half)])
        self.conv_out = nn.Conv2d(hidden_size, hidden_size, 3, padding=1, groups=hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, conditional=True)
        self.initialize_weights(depth)

    def initialize_weights(self, n_layers: int) -> None:
        for p in (self.pos_embed, self.pad_tokens, self.sep_tokens):
            nn.init.trunc_normal_(p, std=0.02)
        init_uvit_ssm_weights([self.patch_embed, self.t_embedder, self.y_embedder, self.t_block], self.blocks(),
                              self.final_layer, n_layers)
        # The local-enhancement convs start as the identity's residual: zero, then learned.
        for conv in (self.conv_in, self.conv_out):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def blocks(self):
        """The layers in execution order."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW should not decay (timm convention)."""
        return no_weight_decay_names(self, ("pos_embed", "pad_tokens", "sep_tokens"))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = bool(enable)

    def _local(self, conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
        n, _, d = h.shape
        g = self.grid_size
        img = h.transpose(1, 2).reshape(n, d, g, g)
        return h + conv(img).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(self, x, t)
        n = x.shape[0]
        g, k = self.grid_size, self.num_pad
        h = self._local(self.conv_in, self.patch_embed(x))
        h = pad_grid(h, self.pad_tokens, g, g)
        c = self.t_embedder(t)
        prefix = [c.unsqueeze(1)]
        if self.y_embedder is not None:
            y_emb = self.y_embedder(y, n, x.device)
            prefix.append(y_emb.unsqueeze(1))
            c = c + y_emb
        prefix.append(self.sep_tokens.to(h.dtype).unsqueeze(0).expand(n, -1, -1))
        h = torch.cat(prefix + [h], dim=1) + self.pos_embed
        mod = self.t_block(c).reshape(n, 3, -1)

        ckpt = self.grad_checkpointing and self.training
        skips = []
        for blk in self.in_blocks:
            h = maybe_checkpoint(ckpt, blk, h, mod)
            skips.append(h)
        h = maybe_checkpoint(ckpt, self.mid_block, h, mod)
        for blk in self.out_blocks:
            h = maybe_checkpoint(ckpt, blk, h, mod, skips.pop())

        h = unpad_grid(h[:, self.num_prefix:], g, g, k)
        h = self._local(self.conv_out, h)
        h = self.final_layer(h, c)
        return unpatchify(h, self.out_channels, g, g, self.patch_size)

    # -- resolution change -------------------------------------------------------------------------------------
    def position_table_keys(self):
        """State-dict keys of tables tied to the resolution (resized by ``adapt_state_dict``)."""
        return ["pos_embed"]

    def resize_position_table(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """Keep the prefix rows; resize the image block bilinearly, the pad columns/rows along their length,
        and keep the k x k pad corner."""
        p, k = self.num_prefix, self.num_pad
        d = value.shape[-1]
        old_side = int(round((value.shape[1] - p) ** 0.5))
        if old_side * old_side != value.shape[1] - p or old_side <= k:
            raise ValueError(f"{key} of shape {tuple(value.shape)} is not a DiM table with {p} prefix tokens")
        og, ng = old_side - k, self.grid_size
        grid = value[0, p:].reshape(old_side, old_side, d)
        img = interpolate_grid_table(grid[:og, :og].reshape(-1, d), (og, og), (ng, ng)).reshape(ng, ng, d)
        right = interpolate_grid_table(grid[:og, og:].reshape(-1, d), (og, k), (ng, k)).reshape(ng, k, d)
        bottom = interpolate_grid_table(grid[og:, :og].reshape(-1, d), (k, og), (k, ng)).reshape(k, ng, d)
        corner = grid[og:, og:]
        new = torch.cat([torch.cat([img, right], 1), torch.cat([bottom, corner], 1)], 0)
        return torch.cat([value[0, :p], new.reshape(-1, d)], 0).unsqueeze(0)
