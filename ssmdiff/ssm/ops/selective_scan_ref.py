"""Plain sequential selective scan (Mamba-1): the obviously-correct reference every fast path is tested against.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t> + D * u_t ;   y *= silu(z)   (when z is given)

Shapes follow mamba-ssm's ``selective_scan_fn``: u, delta, z are (batch, channels, length); A is (channels, state);
B and C are (batch, state, length) or grouped (batch, groups, state, length), each group serving channels/groups
consecutive channels. The state accumulates in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_bc(X: torch.Tensor, channels: int) -> torch.Tensor:
    """(b, n, l) or (b, g, n, l) -> (b, channels, n, l) in float32."""
    X = X.float()
    if X.dim() == 3:
        return X.unsqueeze(1).expand(X.shape[0], channels, X.shape[1], X.shape[2])
    if X.dim() == 4:
        g = X.shape[1]
        if channels % g != 0:
            raise ValueError(f"channels ({channels}) must be divisible by the number of B/C groups ({g})")
        return X.repeat_interleave(channels // g, dim=1)
    raise ValueError(f"B and C must be (batch, state, length) or (batch, groups, state, length), got {tuple(X.shape)}")


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
):
    """Sequential reference. ``reverse=True`` scans from the last position to the first (no flipped copies are
    returned: output position t is the reverse scan's value at t); its last state is the state after position 0."""
    dtype_in = u.dtype
    b, d, length = u.shape
    uf = u.float()
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Af = A.float()
    Bf = _expand_bc(B, d)
    Cf = _expand_bc(C, d)
    h = u.new_zeros((b, d, A.shape[1]), dtype=torch.float32)
    ys = [None] * length
    order = range(length - 1, -1, -1) if reverse else range(length)
    # Per-step views come from unbind rather than indexing: the backward of x[..., t] allocates a zero tensor of
    # x's full size at every step (quadratic in the length), the backward of unbind is one stack.
    dts, us, Bs, Cs = dt.unbind(-1), uf.unbind(-1), Bf.unbind(-1), Cf.unbind(-1)
    for t in order:
        dA = torch.exp(dts[t][:, :, None] * Af)
        h = dA * h + (dts[t] * us[t])[:, :, None] * Bs[t]
        ys[t] = (h * Cs[t]).sum(-1)
    y = torch.stack(ys, dim=-1) if length > 0 else uf.new_zeros((b, d, 0))
    if D is not None:
        y = y + uf * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out
