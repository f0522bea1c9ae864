"""Mamba-2 mixer (SSD), laid out as mamba-ssm's ``Mamba2`` so parameter names, shapes and counts match it.

x -> in_proj -> [z, x, B, C, dt]; causal depthwise conv + SiLU over [x, B, C]; SSD with a scalar decay per head
A = -exp(A_log), dt = softplus(dt + dt_bias), skip D per head; gated RMSNorm norm(y * silu(z)); out_proj.

``bidirectional=True`` adds a reverse direction the Vision-Mamba "v2" way: in_proj, norm and out_proj shared, the
backward direction with its own conv1d_b, dt_bias_b, A_b_log, D_b, computed by the native reverse SSD (no flipped
copies off the fused-kernel path); the two directions' outputs are summed before the gated norm. ``reverse=True``
(one direction) scans right-to-left with the anti-causal conv, so output t depends only on tokens t..L-1.

On CPU (kernel built, state size 8/16/32/64) the conv, the SSD recurrence and the directions' sum run on the
compiled kernels in the channel-major layout the conv produces (``_directions_cpu``); elsewhere the conv is
``depthwise_conv1d`` and SSD goes through ``ssd`` (mamba-ssm's Triton kernel on CUDA, the chunked form otherwise).

Flops: projections and conv are seen by ``FlopCounterMode``; the SSD op records its elementwise work (kind "ssd");
the gated RMSNorm is elementwise and, as in DiT's convention, not counted.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._scan_cpu import channel_major, token_major
from ..ops.products import Linear
from ..ops.ssd import _prepare_dt, ssd, use_compiled_cpu
from .conv import conv_silu, depthwise_conv1d
from .mamba import _check_positive, inverse_softplus_dt


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z) over groups of ``group_size`` channels, times a learned weight (mamba-ssm's
    RMSNormGated with norm_before_gate=False). Computed in float32, returned in y's dtype."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        if d % group_size:
            raise ValueError(f"d ({d}) must be divisible by group_size ({group_size})")
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        v = y.float() * F.silu(z.float())
        shape = v.shape
        v = v.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + self.eps)
        return (v.reshape(shape) * self.weight.float()).to(y.dtype)


class Mamba2(nn.Module):
    """Mamba-2 (SSD) mixer: x (batch, length, d_model) -> (batch, length, d_model).

    heads = expand * d_model / headdim; B and C come in ``ngroups`` groups shared by heads/ngroups heads each;
    the chunked SSD uses chunks of ``chunk_size`` positions. Causal unless ``bidirectional`` or ``reverse``.
    """

    def __init__(self, d_model: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 64, bidirectional: bool = False, dt_min: float = 1e-3,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, A_init_range=(1.0, 16.0), conv_bias: bool = True,
                 bias: bool = False, norm_eps: float = 1e-5, reverse: bool = False):
        super().__init__()
        _check_positive(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                        ngroups=ngroups, chunk_size=chunk_size)
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.headdim, self.ngroups, self.chunk_size = headdim, ngroups, chunk_size
        self.bidirectional = bool(bidirectional)
        self.reverse = bool(reverse)
        if self.bidirectional and self.reverse:
            raise ValueError("Mamba2: choose bidirectional=True or reverse=True, not both")
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"expand * d_model ({self.d_inner}) must be divisible by headdim ({headdim})")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"the number of heads ({self.nheads}) must be divisible by ngroups ({ngroups})")
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range!r}")
        self._init_args = dict(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, A_init_range=(lo, hi),
                               conv_bias=conv_bias)
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias)
        self.conv1d, self.dt_bias, self.A_log, self.D = self._make_direction()
        if self.bidirectional:
            self.conv1d_b, self.dt_bias_b, self.A_b_log, self.D_b = self._make_direction()
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // ngroups, eps=norm_eps)
        self.out_proj = Linear(self.d_inner, d_model, bias=bias)

    def _make_direction(self):
        a = self._init_args
        conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim,
                           padding=self.d_conv - 1, bias=a["conv_bias"])
        dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, a["dt_min"], a["dt_max"], a["dt_init_floor"]))
        dt_bias._no_weight_decay = True
        lo, hi = a["A_init_range"]
        A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(lo, hi)))
        A_log._no_weight_decay = True
        D = nn.Parameter(torch.ones(self.nheads))
        D._no_weight_decay = True
        return conv1d, dt_bias, A_log, D

    def _direction(self, xBC, dt, conv1d, dt_bias, A_log, D, reverse):
        b, l, _ = dt.shape
        xBC = F.silu(depthwise_conv1d(xBC.transpose(1, 2), conv1d.weight, conv1d.bias, reverse=reverse))
        xBC = xBC.transpose(1, 2)
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        y = ssd(x.reshape(b, l, self.nheads, self.headdim), dt, -torch.exp(A_log.float()),
                B.reshape(b, l, self.ngroups, self.d_state), C.reshape(b, l, self.ngroups, self.d_state),
                chunk_size=self.chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True, reverse=reverse)
        return y.reshape(b, l, self.d_inner)

    def _directions_cpu(self, xBC, dt):
        """Both directions on the compiled CPU kernels, channel-major from the conv to the scan: one fused
        conv + SiLU pass for the directions, the recurrence reading x, B and C in place from its output, and the
        second direction's scan adding the first's output. Returns y (b, l, d_inner), contiguous."""
        from ..ops._scan_cpu import ssd_channel_major

        dirs = [(self.conv1d, self.dt_bias, self.A_log, self.D, self.reverse)]
        if self.bidirectional:
            dirs.append((self.conv1d_b, self.dt_bias_b, self.A_b_log, self.D_b, True))
        # xBC is a column slice of in_proj's token-major output: the compiled transpose brings it channel-major.
        (xBC_cm,) = channel_major(xBC, [self.conv_dim])
        outs = conv_silu(xBC_cm, [(conv.weight, conv.bias, rev) for conv, _, _, _, rev in dirs])
        y = None
        for xc, (_, dt_bias, A_log, D, rev) in zip(outs, dirs):
            delta = _prepare_dt(dt, dt_bias, True).transpose(1, 2)
            y = ssd_channel_major(xc, delta, -torch.exp(A_log.float()), D.float().repeat_interleave(self.headdim),
                                  self.d_inner, self.ngroups, self.headdim, reverse=rev, add=y)
        return token_major([y])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2 expects x of shape (batch, length, {self.d_model}), got {tuple(x.shape)}")
        z, xBC, dt = torch.split(self.in_proj(x), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        if use_compiled_cpu(x.device, self.d_state):
            y = self._directions_cpu(xBC, dt)
        else:
            y = self._direction(xBC, dt, self.conv1d, self.dt_bias, self.A_log, self.D, self.reverse)
            if self.bidirectional:
                y = y + self._direction(xBC, dt, self.conv1d_b, self.dt_bias_b, self.A_b_log, self.D_b, True)
        return self.out_proj(self.norm(y, z))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, heads={self.nheads}x{self.headdim}, "
                f"ngroups={self.ngroups}, chunk_size={self.chunk_size}, bidirectional={self.bidirectional}, "
                f"reverse={self.reverse}")
