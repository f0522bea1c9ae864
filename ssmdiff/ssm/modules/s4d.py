"""Bidirectional S4D layer (the BiSSM of DiffuSSM / BiGS): x (batch, length, d) -> (batch, length, 2 d)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.counting import record_flops
from ..ops.s4d import fft_conv, s4d_kernel

S4D_INITS = ("lin", "inv", "real")


class S4DKernel(nn.Module):
    """Parameters of one S4D direction and the kernel they generate: ``forward(length) -> K (d_model, length)``.

    ``init``: "lin" (S4D-Lin, A = -1/2 + i pi n), "inv" (S4D-Inv, A = -1/2 + i (N/pi)(N/(2n+1) - 1)) or "real"
    (S4D-Real, A = -(n+1)); n runs over the N/2 modes (conjugate pairs are implied). log dt is uniform in
    [log dt_min, log dt_max] per channel; C is complex standard normal.
    """

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 1e-3, dt_max: float = 0.1,
                 init: str = "lin"):
        super().__init__()
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(d_state, int) or d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be an even int >= 2 (N/2 complex conjugate pairs), got {d_state!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if init not in S4D_INITS:
            raise ValueError(f"init must be one of {S4D_INITS}, got {init!r}")
        H, n2 = d_model, d_state // 2
        n = torch.arange(n2, dtype=torch.float32)
        if init == "real":
            a_real, a_imag = n + 1, torch.zeros(n2)
        elif init == "lin":
            a_real, a_imag = torch.full((n2,), 0.5), math.pi * n
        else:
            a_real, a_imag = torch.full((n2,), 0.5), (d_state / math.pi) * (d_state / (2 * n + 1) - 1)
        self.log_dt = nn.Parameter(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.log_A_real = nn.Parameter(torch.log(a_real).repeat(H, 1))
        self.A_imag = nn.Parameter(a_imag.repeat(H, 1))
        self.C = nn.Parameter(torch.randn(H, n2, 2) * math.sqrt(0.5))
        for p in (self.log_dt, self.log_A_real, self.A_imag):
            p._no_weight_decay = True  # S4 trains the SSM's dynamics without weight decay
        self.init = init

    def forward(self, length: int) -> torch.Tensor:
        return s4d_kernel(self.log_dt, self.log_A_real, self.A_imag, self.C, length)


class BiS4D(nn.Module):
    """S4D run forward (causal) and backward (anti-causal) with separate parameters, each with a skip D.

    x (batch, length, d_model) -> concat([y_fwd, y_bwd], -1) of shape (batch, length, 2 * d_model), as DiffuSSM's
    BiSSM(U). Convolutions are FFTs of length 2L (see ``ssmdiff.ssm.ops.s4d``); the kernels are regenerated from
    the parameters for each input length, so any length works.
    """

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 1e-3, dt_max: float = 0.1,
                 init: str = "lin"):
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.kernel = S4DKernel(d_model, d_state, dt_min, dt_max, init)
        self.kernel_b = S4DKernel(d_model, d_state, dt_min, dt_max, init)
        self.D = nn.Parameter(torch.randn(d_model))
        self.D_b = nn.Parameter(torch.randn(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"BiS4D expects x of shape (batch, length, {self.d_model}), got {tuple(x.shape)}")
        b, L, H = x.shape
        y, y_b = fft_conv(x, [self.kernel(L), self.kernel_b(L)], [False, True])
        xf = x.float()
        y = y + xf * self.D.float()
        y_b = y_b + xf * self.D_b.float()
        record_flops("fft_conv", 2 * b * L * H)  # the two skips
        return torch.cat([y, y_b], dim=-1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, init={self.kernel.init}"
