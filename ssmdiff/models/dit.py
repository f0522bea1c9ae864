"""DiT: the attention baseline (Peebles & Xie, "Scalable Diffusion Models with Transformers").

adaLN-Zero transformer blocks over patch tokens with a fixed 2-D sine-cosine position table. Parameter names follow
the reference implementation (``x_embedder``, ``t_embedder``, ``y_embedder``, ``blocks.i.attn.qkv``, ...), so the
published DiT checkpoints load with ``load_state_dict`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import ModelMixin  # noqa: F401 - diffusers' pipeline loader looks the base class up here
from diffusers.configuration_utils import register_to_config
import torch.nn.functional as F

from .layers import (
    Linear,
    DropPath,
    no_weight_decay_names,
    check_inputs,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    maybe_checkpoint,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)
from .mixin import SSMDiffModelMixin

__all__ = ["DiT", "DIT_CONFIGS"]

# width, depth, heads (DiT paper, Table 1) plus a tiny size for tests and the 8x8 built-in dataset.
DIT_CONFIGS = {
    "T": dict(hidden_size=128, depth=4, num_heads=4),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias on, as timm's ViT)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP, each gated and modulated by the condition (adaLN-Zero)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + self.drop_path(gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = x + self.drop_path(gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class DiT(SSMDiffModelMixin):
    """Diffusion transformer. ``forward(x, t, y=None)`` -> (N, out_channels, H, W)."""

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 0,
        learn_sigma: bool = True,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_dim=256)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Fixed table kept as a frozen parameter (not a buffer) so parameter counts and checkpoints match DiT's.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        # Stochastic depth (off by default, as in DiT) grows linearly with depth when enabled.
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, rates[i]) for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, conditional=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        with torch.no_grad():
            table = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size, self.grid_size)
            self.pos_embed.copy_(table.unsqueeze(0).to(self.pos_embed.device))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        self.final_layer.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW should not decay (timm convention)."""
        return no_weight_decay_names(self, ("pos_embed",))

    def position_table_keys(self):
        """State-dict keys of tables tied to the resolution (resized by ``adapt_state_dict``)."""
        return ["pos_embed"]

    def resize_position_table(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """DiT's table is a fixed sine-cosine function of the grid: the exact table of the new grid beats any
        interpolation of the old one."""
        table = sincos_pos_embed_2d(value.shape[-1], self.grid_size, self.grid_size)
        return table.unsqueeze(0).to(dtype=value.dtype, device=value.device)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = bool(enable)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(self, x, t)
        n = x.shape[0]
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, n, x.device)
        for block in self.blocks:
            h = maybe_checkpoint(self.grad_checkpointing and self.training, block, h, c)
        h = self.final_layer(h, c)
        return unpatchify(h, self.out_channels, self.grid_size, self.grid_size, self.patch_size)
