"""Pure-PyTorch chunked selective scan: the path for CUDA without mamba-ssm and for CPUs without a C++ compiler.

The sequence is cut into chunks of ``chunk`` steps. Inside a chunk the linear recurrence h_t = a_t h_{t-1} + x_t is
solved by a Hillis-Steele scan over (a, x) pairs (log2(chunk) vectorised steps, products of decays only, so no
exp(-cumsum) overflow), then the chunk's starting state is added in. Peak memory is a few (batch, channels, chunk,
state) tensors whatever the length: with autograd each chunk is wrapped in activation checkpointing, so only chunk
inputs and the (batch, channels, state) boundary states are kept for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .grad import needs_grad

DEFAULT_CHUNK = 64


def _linear_scan(a: torch.Tensor, x: torch.Tensor, reverse: bool):
    """Inclusive scan of h_t = a_t h_{t-1} + x_t along dim -2 from h = 0 (from the end when ``reverse``).
    Returns (h, cumulative decay) where cumulative decay_t multiplies the state entering the chunk."""
    T = a.shape[-2]
    k = 1
    while k < T:
        if reverse:  # position t combines with t + k
            x = torch.cat([x[..., :-k, :] + a[..., :-k, :] * x[..., k:, :], x[..., -k:, :]], dim=-2)
            a = torch.cat([a[..., :-k, :] * a[..., k:, :], a[..., -k:, :]], dim=-2)
        else:  # position t combines with t - k
            x = torch.cat([x[..., :k, :], x[..., k:, :] + a[..., k:, :] * x[..., :-k, :]], dim=-2)
            a = torch.cat([a[..., :k, :], a[..., k:, :] * a[..., :-k, :]], dim=-2)
        k *= 2
    return x, a


def _chunk(h0, u, dt, A, B, C, reverse: bool):
    """One chunk. h0 (b, g, c, n); u, dt (b, g, c, T); A (g, c, n); B, C (b, g, 1, T, n) -> y (b, g, c, T), h_end."""
    a = torch.exp(dt[..., None] * A[None, :, :, None, :])  # (b, g, c, T, n)
    x = (dt * u)[..., None] * B
    h, acum = _linear_scan(a, x, reverse)
    h = h + acum * h0[..., None, :]
    y = (h * C).sum(-1)
    return y, h[..., 0 if reverse else -1, :]


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
                         chunk: int = DEFAULT_CHUNK):
    """Chunked scan differentiable by autograd; returns (out in u.dtype, last state (b, d, n) float32).
    Inputs are assumed validated by ``selective_scan``."""
    b, d, length = u.shape
    n = A.shape[1]
    Bg = (B.unsqueeze(1) if B.dim() == 3 else B).float()
    Cg = (C.unsqueeze(1) if C.dim() == 3 else C).float()
    g = Bg.shape[1]
    # Channels are split (g, d/g) so each group's B/C broadcasts over its channels instead of being repeated.
    uf = u.float().reshape(b, g, d // g, length)
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt.reshape(b, g, d // g, length)
    Af = A.float().reshape(g, d // g, n)
    Bt = Bg.transpose(-1, -2).unsqueeze(2)  # (b, g, 1, l, n)
    Ct = Cg.transpose(-1, -2).unsqueeze(2)
    h = uf.new_zeros((b, g, d // g, n))
    use_ckpt = needs_grad(u, delta, A, B, C, delta_bias)
    starts = list(range(0, length, chunk))
    if reverse:
        starts.reverse()
    ys = [None] * len(starts)
    for i, s in enumerate(starts):
        sl = slice(s, min(s + chunk, length))
        args = (h, uf[..., sl], dt[..., sl], Af, Bt[..., sl, :], Ct[..., sl, :])
        if use_ckpt:
            y, h = checkpoint(_chunk, *args, reverse, use_reentrant=False)
        else:
            y, h = _chunk(*args, reverse)
        ys[len(starts) - 1 - i if reverse else i] = y
    y = torch.cat(ys, dim=-1).reshape(b, d, length)
    if D is not None:
        y = y + u.float() * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), h.reshape(b, d, n)
