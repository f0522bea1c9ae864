"""Layers shared by every backbone: embeddings of time, class and patches, norms, adaLN and the output head.

Kept in one place so DiT, DiS, DiM and DiffuSSM condition and decode in the same way, and a change (for example
to the null-class handling that classifier-free guidance relies on) reaches all four families at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ssm.ops.products import Linear

__all__ = [
    "Linear",
    "timestep_embedding",
    "TimestepEmbedder",
    "LabelEmbedder",
    "PatchEmbed",
    "unpatchify",
    "sincos_pos_embed_2d",
    "RMSNorm",
    "DropPath",
    "add_rms_norm",
    "add_rms_norm_composite",
    "modulate",
    "FinalLayer",
    "interpolate_grid_table",
    "maybe_checkpoint",
    "check_inputs",
    "no_weight_decay_names",
]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of (possibly fractional) timesteps t (N,): [cos(t f_k), sin(t f_k)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid of width ``freq_dim`` -> Linear -> SiLU -> Linear to ``hidden_size``.

    DiT uses freq_dim 256 and a hidden width of D; DiS uses freq_dim D and a 4D-wide MLP (``mlp_width``).
    """

    def __init__(self, hidden_size: int, freq_dim: int = 256, mlp_width: int | None = None):
        super().__init__()
        mlp_width = mlp_width or hidden_size
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, mlp_width), nn.SiLU(), Linear(mlp_width, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra "null" row at index ``num_classes`` for classifier-free guidance.

    ``y=None`` means every sample is unconditional; in training mode each label is replaced by the null class with
    probability ``dropout_prob`` so that one network learns both the conditional and the unconditional model.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor | None, batch_size: int, device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        else:
            if y.shape != (batch_size,):
                raise ValueError(f"class labels must have shape ({batch_size},), got {tuple(y.shape)}")
            y = y.long()
            if self.training and self.dropout_prob > 0:
                drop = torch.rand(batch_size, device=y.device) < self.dropout_prob
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (N, H/p * W/p, D), row-major over the patch grid."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not divisible by the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: torch.Tensor, channels: int, grid_h: int, grid_w: int, patch_size: int) -> torch.Tensor:
    """Inverse of patch tokens: (N, gh*gw, p*p*C) with per-token layout (p1, p2, C) -> (N, C, gh*p, gw*p)."""
    n = x.shape[0]
    p = patch_size
    x = x.reshape(n, grid_h, grid_w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, grid_h * p, grid_w * p)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table (grid_h*grid_w, dim) as in MAE/DiT: half the width encodes the
    column, half the row, each as [sin, cos] of 1/10000^(k/(dim/4))."""
    if dim % 4:
        raise ValueError(f"sincos position embedding needs a width divisible by 4, got {dim}")

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1).double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    gy, gx = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    # DiT's grid is [w-coordinate, h-coordinate] stacked; the first half of the width encodes the column index.
    return torch.cat([one_axis(dim // 2, gx), one_axis(dim // 2, gy)], dim=1).float()


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in fp32 so bf16 residual streams stay stable."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, drop_path: DropPath | None = None,
                 residual_in_fp32: bool = True, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mamba-ssm's "Add -> RMSNorm": residual = hidden if residual is None else residual + drop_path(hidden), in
    float32 when ``residual_in_fp32``; returns (norm(residual) in hidden's dtype, residual).

    ``scale`` (batch,) float32, when given, is the per-sample factor drawn beforehand (``DropPath.sample_scale``) and
    replaces ``drop_path``: residual + scale[sample] * hidden.

    On CPU with the compiled kernels, when the new residual is float32 and hidden is float32 or bfloat16, this is
    one pass over the rows forward and one backward (``add_rms_norm_cpu``). The composite made about ten passes
    forward and more backward, about 6% of a DiS-S/2 bf16 training step at 1024 tokens by ``benchmarks/step.py``'s
    op timer; fused, those steps ran 1.038x as fast (in-process A/B). Elsewhere it is the composite, which is also
    the reference the tests hold the kernel to.
    """
    from ..ssm.ops import _scan_cpu

    if (hidden.device.type == "cpu" and hidden.dtype in (torch.float32, torch.bfloat16) and hidden.dim() >= 2
            and (residual is None or (residual.dtype == torch.float32 and residual.shape == hidden.shape))
            and (residual_in_fp32 or hidden.dtype == torch.float32 or residual is not None)  # a float32 result
            and _scan_cpu.available()):
        if scale is None and residual is not None and drop_path is not None:
            scale = drop_path.sample_scale(hidden)
        return _scan_cpu.add_rms_norm_cpu(hidden, residual, norm.weight, norm.eps,
                                          None if residual is None else scale)
    return add_rms_norm_composite(hidden, residual, norm, drop_path, residual_in_fp32, scale)


def add_rms_norm_composite(hidden: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                           drop_path: DropPath | None = None, residual_in_fp32: bool = True,
                           scale: torch.Tensor | None = None):
    """``add_rms_norm`` written with PyTorch ops: its path off the CPU kernel, and its reference."""
    if residual is None:
        residual = hidden
    elif scale is not None:
        residual = residual + hidden * scale.view((-1,) + (1,) * (hidden.dim() - 1))
    else:
        residual = residual + (hidden if drop_path is None else drop_path(hidden))
    if residual_in_fp32:
        # Summing dozens of bf16 branch outputs loses the small updates; keep the stream in fp32.
        residual = residual.float()
    return norm(residual).to(hidden.dtype), residual


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with probability ``p`` (rescaled by 1/(1-p))."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        # The keep probability as a (non-persistent) tensor: forward never reads the float, so torch.compile does
        # not specialise on it. Blocks with linearly increasing rates would otherwise each compile their own graph
        # (DiS-S/2's 25 blocks hit Dynamo's recompile limit of 8 and the rest ran eagerly).
        self.register_buffer("keep", torch.tensor(1.0), persistent=False)
        self.p = p

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = float(value)
        self.active = self._p > 0.0
        with torch.no_grad():
            self.keep.fill_(1.0 - self._p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or not self.training:
            return x
        keep = self.keep.to(x.dtype)
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def sample_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The per-sample factor forward(x) would apply, (batch,) float32 (0 or 1/keep), or None where forward is
        the identity. Draws the same random numbers as forward(x); only x's batch size, dtype and device matter, so
        a caller can draw the factor before x exists from any tensor that shares them."""
        if not self.active or not self.training:
            return None
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(self.keep.to(x.dtype))
        return mask.reshape(-1).float() / self.keep

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift with per-sample (N, D) shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class FinalLayer(nn.Module):
    """Output head: LayerNorm without affine, adaLN shift/scale from the condition when ``conditional``,
    Linear to p*p*out_channels per token. The Linear and the modulation start at zero (DiT's adaLN-Zero init)
    so a fresh model predicts zeros."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, conditional: bool = True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = (
            nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size)) if conditional else None
        )

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if self.adaLN_modulation is not None:
            nn.init.zeros_(self.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm_final(x)
        if self.adaLN_modulation is not None:
            if c is None:
                raise ValueError("this output head is conditional: pass the condition vector")
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return self.linear(x)


def interpolate_grid_table(table: torch.Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a per-grid-cell table (old_h*old_w, D), row-major, to (new_h*new_w, D).

    align_corners=False keeps the table's cells centred where a patch of the new grid covers the same part of
    the image, the convention of DiM's weak-to-strong fine-tuning and of timm's position-embedding resampling.
    """
    (oh, ow), (nh, nw) = old_hw, new_hw
    if table.shape[0] != oh * ow:
        raise ValueError(f"table has {table.shape[0]} rows, expected {oh}x{ow}={oh * ow}")
    if (oh, ow) == (nh, nw):
        return table.clone()
    d = table.shape[1]
    grid = table.float().reshape(1, oh, ow, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(nh, nw), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(nh * nw, d).to(table.dtype)


def maybe_checkpoint(enabled: bool, fn, *args):
    """Run ``fn(*args)`` under activation checkpointing when ``enabled`` and gradients are being recorded."""
    if enabled and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def check_inputs(model, x: torch.Tensor, t: torch.Tensor) -> None:
    """One clear error for inputs the model was not built for (wrong channels, size or timestep shape)."""
    expect = (model.in_channels, model.input_size, model.input_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expect:
        raise ValueError(
            f"{type(model).__name__} was built for inputs (N, {expect[0]}, {expect[1]}, {expect[2]}), got "
            f"{tuple(x.shape)}; build it with create_model(..., input_size=, in_channels=) to match "
            f"(adapt_state_dict carries weights across resolutions)"
        )
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"timesteps t must have shape ({x.shape[0]},), got {tuple(t.shape)}")


def init_uvit_ssm_weights(embedders, blocks, final_layer, n_layers: int) -> None:
    """Initialisation shared by the U-ViT-style SSM backbones (DiS, DiM).

    Embedder Linears get trunc-normal(0.02) weights and zero biases, embeddings normal(0.02); long-skip Linears
    likewise. Mixer out_proj weights follow the GPT-2 scheme used by mamba-ssm: kaiming-uniform scaled by
    1/sqrt(n_layers), so the fp32 residual stream's variance stays flat over depth.
    """
    for m in embedders:
        if m is None:
            continue
        for sub in m.modules():
            if isinstance(sub, nn.Linear):
                nn.init.trunc_normal_(sub.weight, std=0.02)
                nn.init.zeros_(sub.bias)
            elif isinstance(sub, nn.Embedding):
                nn.init.normal_(sub.weight, std=0.02)
    for blk in blocks:
        if blk.skip_linear is not None:
            nn.init.trunc_normal_(blk.skip_linear.weight, std=0.02)
            nn.init.zeros_(blk.skip_linear.bias)
        out_proj = getattr(blk.mixer, "out_proj", None)
        if isinstance(out_proj, nn.Linear):
            nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                out_proj.weight /= math.sqrt(n_layers)
    final_layer.reset_parameters()


def no_weight_decay_names(model: nn.Module, extra=()) -> set[str]:
    """Names of parameters that should not be decayed: those a mixer flags with ``_no_weight_decay`` (A_log, D,
    S4D dynamics) plus the model's learned tables named in ``extra``."""
    names = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    return names | {n for n, _ in model.named_parameters() if n.split(".")[0] in set(extra)}
