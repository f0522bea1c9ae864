"""DiffuSSM: "Diffusion Models Without Attention" (Yan et al., arXiv 2311.18257).

No patchify: every latent pixel is a token of the residual stream. Each layer is a gated bidirectional S4D inside
an hourglass (M = 2): the dense projections run on the sequence shortened to J = L/M, the SSM on the full length L.

The paper gives the equations but not every width, and no code was released. Our choices, per layer, with
X (L x D) the residual stream and c the (time + class) condition:

    shift, scale, gate = Linear(SiLU(c))                       adaLN-Zero, one set per layer (D x 3D)
    I  = W_in  merge_M(modulate(LN(X), shift, scale))           J x D   (merge_M: M neighbours concatenated, 2D->D)
    U  = split_M(W_0 I) then act                                 L x D   (W_0: D -> M*D, the hourglass "up")
    Y  = BiS4D(U)                                               L x 2D  (forward and backward S4D, concatenated)
    I' = act(W_down merge_M(Y))                                 J x D   (W_down: M*2D -> D)
    O  = W_3(act(W_2 I') * act(W_1 I))                          J x D   (gate width D_h = mlp_ratio * D)
    X  = X + gate * split_M(W_out O)                            L x D   (W_out: D -> M*D)

A layer has (10 + 3 * mlp_ratio) D^2 weights applied per shortened token plus 3 D^2 for adaLN. The paper's
two figures pull in opposite directions (673M parameters want about 14 D^2 per token, 280.3 Gflops about 13.3);
mlp_ratio 1.2 splits the difference: DiffuSSM-XL (29 x 1152) has 653M parameters (-3%) and about 281 Gflops
at 32x32x4 (272.5 in matrix products, the rest the S4D kernels and FFT convolutions, which are counted here). merge_M/split_M pair horizontally adjacent pixels (a reshape, no copy). No position table: the
S4D convolutions are position-aware, so the model itself has no resolution-bound parameters.
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
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    check_inputs,
    maybe_checkpoint,
    modulate,
    no_weight_decay_names,
    unpatchify,
)
from .mixin import SSMDiffModelMixin

__all__ = ["DiffuSSM", "DIFFUSSM_CONFIGS"]

# XL is the paper's model; T, S and L are our own smaller sizes (DiT-like widths), not from the paper.
DIFFUSSM_CONFIGS = {
    "T": dict(hidden_size=128, depth=4),
    "S": dict(hidden_size=384, depth=12),
    "L": dict(hidden_size=1024, depth=24),
    "XL": dict(hidden_size=1152, depth=29),
}


class HourglassBiSSMBlock(nn.Module):
    """One DiffuSSM layer (see the module docstring for the equations)."""

    def __init__(self, dim: int, d_state: int = 64, mlp_ratio: float = 1.2, hourglass: int = 2,
                 drop_path: float = 0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        from ..ssm.modules import BiS4D

        m = hourglass
        hidden = int(round(dim * mlp_ratio))
        self.m = m
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 3 * dim))
        self.w_in = Linear(m * dim, dim)
        self.w_up = Linear(dim, m * dim)
        self.ssm = BiS4D(dim, d_state=d_state)
        self.w_down = Linear(m * 2 * dim, dim)
        self.w1 = Linear(dim, hidden)
        self.w2 = Linear(dim, hidden)
        self.w3 = Linear(hidden, dim)
        self.w_out = Linear(dim, m * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        j = length // self.m
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        h = modulate(self.norm(x), shift, scale)
        i = self.w_in(h.reshape(n, j, self.m * d))
        u = F.gelu(self.w_up(i), approximate="tanh").reshape(n, length, d)
        y = self.ssm(u)
        i2 = F.gelu(self.w_down(y.reshape(n, j, self.m * 2 * d)), approximate="tanh")
        o = self.w3(F.gelu(self.w2(i2), approximate="tanh") * F.gelu(self.w1(i), approximate="tanh"))
        return x + self.drop_path(gate.unsqueeze(1) * self.w_out(o).reshape(n, length, d))


class DiffuSSM(SSMDiffModelMixin):
    """DiffuSSM backbone. ``forward(x, t, y=None)`` -> (N, out_channels, H, W)."""

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 29,
        num_classes: int = 0,
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
        d_state: int = 64,
        mlp_ratio: float = 1.2,
        hourglass: int = 2,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if hourglass < 1 or (input_size * input_size) % hourglass or input_size % hourglass:
            raise ValueError(f"input_size {input_size} must be divisible by the hourglass factor {hourglass}")
        self.input_size = input_size
        self.patch_size = 1
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(1, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_dim=256)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.blocks = nn.ModuleList(
            [HourglassBiSSMBlock(hidden_size, d_state, mlp_ratio, hourglass, drop_path_rate * i / max(depth - 1, 1))
             for i in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, 1, self.out_channels, conditional=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for blk in self.blocks:
            for lin in (blk.w_in, blk.w_up, blk.w_down, blk.w1, blk.w2, blk.w3, blk.w_out):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
            # adaLN-Zero: every layer starts as the identity.
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        self.final_layer.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW should not decay (timm convention)."""
        return no_weight_decay_names(self)

    def position_table_keys(self):
        """None: DiffuSSM has no resolution-bound parameters."""
        return []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(self, x, t)
        n = x.shape[0]
        h = self.x_embedder(x)
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, n, x.device)
        ckpt = self.grad_checkpointing and self.training
        for blk in self.blocks:
            h = maybe_checkpoint(ckpt, blk, h, c)
        h = self.final_layer(h, c)
        return unpatchify(h, self.out_channels, self.input_size, self.input_size, 1)
