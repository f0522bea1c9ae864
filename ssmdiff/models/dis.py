"""DiS: "Scalable Diffusion Models with State Space Backbone" (Fei et al., arXiv 2402.05608).

Every input is a token — [class token (conditional only), time token, image patches] — with a learned absolute
position table; a U-ViT stack of pre-norm residual blocks (``depth//2`` in, one middle, ``depth//2`` out, the out
blocks fusing a long skip through Linear(2D, D)) around a bidirectional Mamba mixer; a DiT-like head whose LayerNorm
is modulated by (time + class) when conditional. Parameter counts equal the reference implementation's.

``mixer="mamba2"`` swaps the bidirectional Mamba-1 mixer for a bidirectional Mamba-2 (SSD) mixer: one decay per
head instead of one per state entry, computed by chunked matrix products on GPUs (mamba-ssm's kernels) and by the
compiled recurrence on CPUs, where it is about as fast as the Mamba-1 mixer (``benchmarks/models.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers import ModelMixin  # noqa: F401 - diffusers' pipeline loader looks the base class up here
from diffusers.configuration_utils import register_to_config

from .layers import (
    Linear,
    init_uvit_ssm_weights,
    no_weight_decay_names,
    check_inputs,
    DropPath,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    RMSNorm,
    TimestepEmbedder,
    add_rms_norm,
    maybe_checkpoint,
    unpatchify,
)
from .mixin import SSMDiffModelMixin

__all__ = ["DiS", "DIS_CONFIGS", "make_mixer"]

# Training on CPU: draw stochastic depth up front and skip the mixer work of samples whose output the next add drops
# (``DiS._drop_plan``). A switch for A/B timing and for the tests that hold it to the per-add draws.
SKIP_DROPPED_SAMPLES = True

# width, depth argument (the stack has depth + 1 blocks), as in the reference code; "T" is a tiny test size.
DIS_CONFIGS = {
    "T": dict(hidden_size=128, depth=4),
    "S": dict(hidden_size=368, depth=24),
    "B": dict(hidden_size=768, depth=24),
    "M": dict(hidden_size=768, depth=48),
    "L": dict(hidden_size=1024, depth=48),
    "H": dict(hidden_size=1536, depth=48),
}


def make_mixer(kind: str, dim: int, bidirectional: bool, reverse: bool = False, **kwargs) -> nn.Module:
    """Sequence mixer by name: "mamba" (Mamba-1) or "mamba2" (SSD), one- or two-directional.

    ``reverse`` (one-directional only) scans from the last token to the first without flipping activations.
    """
    from ..ssm import modules as ssm_modules

    if kind == "mamba":
        if bidirectional:
            return ssm_modules.BiMamba(dim, **kwargs)
        return ssm_modules.Mamba(dim, reverse=reverse, **kwargs)
    if kind == "mamba2":
        kwargs.pop("dt_rank", None)
        if "headdim" not in kwargs:
            # Mamba-2's default head width (64) must divide expand * dim; narrower heads for odd widths (DiS-S).
            inner = kwargs.get("expand", 2) * dim
            kwargs["headdim"] = next((h for h in (64, 32, 16, 8, 4, 2, 1) if inner % h == 0))
        if bidirectional:
            return ssm_modules.Mamba2(dim, bidirectional=True, **kwargs)
        # reverse=True runs the SSD scan right-to-left natively: no flipped copies.
        return ssm_modules.Mamba2(dim, reverse=reverse, **kwargs)
    raise ValueError(f"unknown mixer {kind!r}: choose 'mamba' or 'mamba2'")


class DiSBlock(nn.Module):
    """"Add -> RMSNorm -> mixer" block of mamba-ssm: returns the mixer output and the (fp32) residual stream.

    An out block first fuses the long skip: hidden = Linear(2D, D)(cat[hidden, skip]).
    """

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0, skip: bool = False,
                 residual_in_fp32: bool = True):
        super().__init__()
        self.skip_linear = Linear(2 * dim, dim) if skip else None
        self.norm = RMSNorm(dim)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path)
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, hidden, residual=None, skip=None, scale=None, keep=None):
        """``scale``: this block's stochastic-depth factors, drawn beforehand (``DropPath.sample_scale``), in place
        of its own draw. ``keep``: the samples whose mixer output will be used; the mixer runs on those alone and
        the other samples' rows come back as zeros. None: all samples."""
        if self.skip_linear is not None:
            hidden = self.skip_linear(torch.cat([hidden, skip], dim=-1))
        normed, residual = add_rms_norm(hidden, residual, self.norm, self.drop_path, self.residual_in_fp32, scale)
        if keep is None:
            return self.mixer(normed), residual
        if keep.numel() == 0:
            # Every sample dropped: no mixer pass. The mixer's parameters and the norm's output still join the graph
            # with zero gradients, as they did when the dropped output was multiplied by zero (DDP expects every
            # parameter to get a gradient).
            anchor = normed.sum() * 0
            for p in self.mixer.parameters():
                if p.requires_grad:
                    anchor = anchor + p.sum() * 0
            return torch.zeros_like(normed) + anchor.to(normed.dtype), residual
        out = self.mixer(normed.index_select(0, keep))
        return out.new_zeros((normed.shape[0],) + out.shape[1:]).index_copy(0, keep, out), residual


class DiS(SSMDiffModelMixin):
    """Diffusion state-space model. ``forward(x, t, y=None)`` -> (N, out_channels, H, W)."""

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 368,
        depth: int = 24,
        num_classes: int = 0,
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
        drop_path_rate: float = 0.1,
        mixer: str = "mamba",
        d_state: int | None = None,
        d_conv: int = 4,
        expand: int = 2,
        residual_in_fp32: bool = True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch size {patch_size}")
        if depth < 2 or depth % 2:
            raise ValueError(f"depth must be an even number >= 2 (blocks = depth + 1), got {depth}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size
        self.num_extra_tokens = 2 if num_classes > 0 else 1
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        self.time_embed = TimestepEmbedder(hidden_size, freq_dim=hidden_size, mlp_width=4 * hidden_size)
        self.label_emb = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_extra_tokens + self.grid_size**2, hidden_size))

        mixer_kwargs = dict(d_conv=d_conv, expand=expand)
        if d_state is None:
            d_state = 16 if mixer == "mamba" else 64
        mixer_kwargs["d_state"] = d_state
        # Stochastic depth grows linearly over the stack; the first block has none (it starts the residual).
        rates = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        half = depth // 2

        def block(i, skip=False):
            return DiSBlock(hidden_size, make_mixer(mixer, hidden_size, bidirectional=True, **mixer_kwargs),
                            drop_path=rates[i], skip=skip, residual_in_fp32=residual_in_fp32)

        self.in_blocks = nn.ModuleList([block(i) for i in range(half)])
        self.mid_block = block(half)
        self.out_blocks = nn.ModuleList([block(half + 1 + i, skip=True) for i in range(half)])
        self.norm_f = RMSNorm(hidden_size)
        self.final_drop_path = DropPath(drop_path_rate)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, conditional=num_classes > 0)
        self.initialize_weights(depth + 1)

    def initialize_weights(self, n_layers: int) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_uvit_ssm_weights([self.patch_embed, self.time_embed, self.label_emb, self.final_layer], self.blocks(),
                              self.final_layer, n_layers)

    def blocks(self):
        """The depth + 1 blocks in execution order."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW should not decay (timm convention)."""
        return no_weight_decay_names(self, ("pos_embed",))

    def position_table_keys(self):
        """State-dict keys of tables tied to the resolution (resized by ``adapt_state_dict``)."""
        return ["pos_embed"]

    def resize_position_table(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """Learned table over [extra tokens, grid]: keep the extra tokens, resize the grid bilinearly."""
        from .registry import resize_token_table

        return resize_token_table(value, self.num_extra_tokens, self.grid_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = bool(enable)

    def _drop_plan(self, h: torch.Tensor):
        """Stochastic depth drawn up front, from the first block's output ``h``: (scales, keeps), ``scales`` one
        factor per block and a last one for the final norm, ``keeps`` one entry per block. Both are all None where
        the plan does not apply and each add draws its own factors: off the CPU (the keep lists would make the host
        wait for the device every step) and under torch.compile (batch sizes that depend on the draws would break
        the graph).

        Each add draws from the same generator, in the same order and with the same dtype as it would itself (no
        other op in the stack draws random numbers), so the factors are the ones the adds would have drawn. The
        middle and out blocks' outputs feed only the next add (through an out block's skip Linear), so a sample
        that add drops needs no mixer: ``keeps[k]`` lists the samples block k's mixer runs on. In blocks also feed
        the long skips and run on every sample. At DiS's ramped rate 0.1 this skips about 1 in 25 of a training
        step's per-sample mixer passes on average; the result is the same up to the order of float sums.
        """
        blocks = self.blocks()
        drops = [blk.drop_path for blk in blocks[1:]] + [self.final_drop_path]
        keeps = [None] * len(blocks)
        if (not SKIP_DROPPED_SAMPLES or not self.training or h.device.type != "cpu"
                or torch.compiler.is_compiling() or not any(dp.active for dp in drops)):
            return [None] * (len(blocks) + 1), keeps
        # scales[k] is block k's own factor (block 0 starts the residual and has none) or the final norm's.
        scales = [None] + [dp.sample_scale(h) for dp in drops]
        for k in range(len(self.in_blocks), len(blocks)):
            consumer = scales[k + 1]
            if consumer is None:
                continue
            kept = consumer.nonzero().flatten()
            if kept.numel() < consumer.numel():
                keeps[k] = kept  # empty: no mixer pass at all
        return scales, keeps

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(self, x, t)
        n = x.shape[0]
        h = self.patch_embed(x)
        time_token = self.time_embed(t).unsqueeze(1)
        tokens = [time_token, h]
        cond = time_token.squeeze(1)
        if self.label_emb is not None:
            label_token = self.label_emb(y, n, x.device).unsqueeze(1)
            tokens.insert(0, label_token)
            cond = cond + label_token.squeeze(1)
        h = torch.cat(tokens, dim=1) + self.pos_embed

        ckpt = self.grad_checkpointing and self.training
        residual = None
        skips = []
        # Block 0 starts the residual (no factor, every sample kept); the plan needs its output's dtype.
        scales, keeps = [None], [None]
        for i, blk in enumerate(self.in_blocks):
            h, residual = maybe_checkpoint(ckpt, blk, h, residual, None, scales[i], keeps[i])
            skips.append(h)
            if i == 0:
                scales, keeps = self._drop_plan(h)
        half = len(self.in_blocks)
        for i, blk in enumerate([self.mid_block, *self.out_blocks], start=half):
            h, residual = maybe_checkpoint(ckpt, blk, h, residual, skips.pop() if i > half else None, scales[i],
                                           keeps[i])
        h, _ = add_rms_norm(h, residual, self.norm_f, self.final_drop_path, residual_in_fp32=False, scale=scales[-1])

        h = self.final_layer(h, cond if self.label_emb is not None else None)
        h = h[:, self.num_extra_tokens:]
        return unpatchify(h, self.out_channels, self.grid_size, self.grid_size, self.patch_size)
