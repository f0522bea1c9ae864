"""Mamba-2's state-space duality (SSD): a selective scan whose decay is one scalar per head, computed by chunks.

Recurrence, per batch, head h (headdim p, state n), with B/C shared by the heads of a group:

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t B_t^T          (h_t: p x n)
    y_t = h_t C_t + D_h * x_t

``reverse=True`` runs it from the last position to the first (h_t built from h_{t+1}), output kept in place.

Because the decay is a scalar per (position, head), the outputs inside a chunk of Q positions are a masked
(Q x Q) matrix of decays times C B^T, applied to the inputs by a matrix product; chunks exchange only their final
states (p x n per head), passed along by another small matrix product. So everything heavy is a matmul, fast on CPU
and GPU, and nothing of size (length, p, n) is materialised.

Shapes follow mamba-ssm's ``mamba_chunk_scan_combined``: x (batch, length, heads, headdim), dt (batch, length,
heads), A (heads,), B and C (batch, length, groups, state), D (heads,) or (heads, headdim). The arithmetic is done in
float32 and the output has x's dtype.

Flops (one multiply-add = one flop): the einsums are matrix products that ``FlopCounterMode`` sees; the elementwise
work it cannot see (decay masks, weighting of inputs and outputs, skip) is recorded under kind "ssd".
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .counting import counting_active, record_flops


def _check_shapes(x, dt, A, B, C, D):
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, heads, headdim), got {tuple(x.shape)}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be (batch, length, heads) = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (heads,) = ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise ValueError(f"B and C must both be (batch, length, groups, state), got {tuple(B.shape)}, "
                         f"{tuple(C.shape)}")
    if h % B.shape[2] != 0:
        raise ValueError(f"heads ({h}) must be divisible by groups ({B.shape[2]})")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be (heads,) or (heads, headdim), got {tuple(D.shape)}")


def _prepare_dt(dt, dt_bias, dt_softplus):
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    return F.softplus(dt) if dt_softplus else dt


def _skip(y, x, D):
    if D is None:
        return y
    Df = D.float()
    return y + x.float() * (Df[:, None] if Df.dim() == 1 else Df)


def ssd_ref(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, return_final_state=False, reverse=False):
    """Sequential per-step reference of SSD (obviously correct, slow): same arguments as ``ssd_chunked``."""
    _check_shapes(x, dt, A, B, C, D)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    dt = _prepare_dt(dt, dt_bias, dt_softplus)
    xf, Af = x.float(), A.float()
    Bh = B.float().repeat_interleave(r, dim=2)  # (b, l, h, n)
    Ch = C.float().repeat_interleave(r, dim=2)
    state = x.new_zeros((b, h, p, n), dtype=torch.float32)
    ys = [None] * l
    for t in (range(l - 1, -1, -1) if reverse else range(l)):
        decay = torch.exp(dt[:, t] * Af)  # (b, h)
        state = decay[:, :, None, None] * state + (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys[t] = (state * Ch[:, t, :, None, :]).sum(-1)
    y = torch.stack(ys, dim=1) if l > 0 else xf.new_zeros((b, 0, h, p))
    y = _skip(y, x, D).to(x.dtype)
    return (y, state) if return_final_state else y


def _segsum(a: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Pairwise sums of log-decays over the last axis (length T): (..., T) -> (..., T, T), -inf where unused.

    Forward:  out[i, j] = a[j+1] + ... + a[i]   for j <= i   (decay from position j to position i)
    Reverse:  out[i, j] = a[i] + ... + a[j-1]   for j >= i   (decay from position j back to position i)

    Each entry is a cumulative sum of the terms it covers, not a difference of two prefix sums: prefix sums grow
    with the length and their difference would lose the small decays of nearby positions to rounding.
    """
    T = a.shape[-1]
    pos = torch.arange(T, device=a.device)
    terms = a[..., :, None].expand(*a.shape, T)  # terms[k, j] = a[k]
    if not reverse:
        out = torch.cumsum(terms.masked_fill(~(pos[:, None] > pos[None, :]), 0.0), dim=-2)
        keep = pos[:, None] >= pos[None, :]
    else:
        out = torch.cumsum(terms.masked_fill(~(pos[:, None] < pos[None, :]), 0.0).flip(-2), dim=-2).flip(-2)
        keep = pos[:, None] <= pos[None, :]
    # -inf before exp (not exp then zero): unused entries would otherwise be free to overflow, and inf * 0 is NaN
    # in the forward or, through autograd, in the backward.
    return out.masked_fill(~keep, float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size=64, D=None, dt_bias=None, dt_softplus=False, return_final_state=False,
                reverse=False):
    """SSD by chunks of ``chunk_size`` positions, in matrix products (see the module docstring for shapes).

    Returns y (batch, length, heads, headdim) in x's dtype, and with ``return_final_state`` the float32 state
    (batch, heads, headdim, state) after the last position processed (position 0 when ``reverse``).
    """
    _check_shapes(x, dt, A, B, C, D)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    Q = chunk_size
    dt = _prepare_dt(dt, dt_bias, dt_softplus)
    xf, Bf, Cf = x.float(), B.float(), C.float()
    # Zero padding to whole chunks: dt = 0 there means decay 1 and no input, so padded positions change neither
    # the outputs at real positions nor the final state, in both directions.
    pad = (-l) % Q
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    c = (l + pad) // Q

    # Two layouts: "natural" (batch, chunk, position, group, head-in-group * headdim), where the products shared by
    # a group's heads (states from B, outputs from C) fold the heads into one matrix dimension; and "head-major"
    # (batch, chunk, group, head-in-group, position, headdim) for the within-chunk product, whose decay matrix
    # differs per head. Only x and the within-chunk output change layout, and B, C are never copied per head.
    Xn = (xf * dt[..., None]).view(b, c, Q, h, p)
    Xh = Xn.transpose(2, 3).reshape(b, c, g, r, Q, p)
    Bg = Bf.view(b, c, Q, g, n).transpose(2, 3)  # (b, c, g, Q, n)
    Cg = Cf.view(b, c, Q, g, n).transpose(2, 3)
    a = (dt * A.float()).view(b, c, Q, h).transpose(2, 3)  # (b, c, h, Q) log-decays
    seg = _segsum(a, reverse)  # (b, c, h, Q, Q)
    decay = torch.exp(seg)
    if not reverse:
        w_state = decay[..., -1, :]  # x_s -> state at the chunk's end: a[s+1..Q-1]
        w_out = torch.exp(torch.cumsum(a, dim=-1))  # state entering from the left -> y_q: a[0..q]
    else:
        w_state = decay[..., 0, :]  # x_s -> state at the chunk's start: a[0..s-1]
        w_out = torch.exp(torch.cumsum(a.flip(-1), dim=-1).flip(-1))  # entering from the right -> y_q: a[q..Q-1]
    total = a.sum(-1).transpose(1, 2)  # (b, h, c) log-decay across a whole chunk

    # Within chunks: (C B^T * decay) @ (dt x), a (Q x Q) by (Q x p) product per (batch, chunk, head).
    CB = torch.matmul(Cg, Bg.transpose(-1, -2)).unsqueeze(3)  # (b, c, g, 1, Q, Q)
    y = torch.matmul(decay.view(b, c, g, r, Q, Q) * CB, Xh)  # head-major

    # Each chunk's own contribution to the state at its far end: B^T (Q x n) by (Q x heads*p) per group.
    Xw = (Xn * w_state.transpose(2, 3)[..., None]).view(b, c, Q, g, r * p).transpose(2, 3)  # (b, c, g, Q, r*p)
    states = torch.matmul(Bg.transpose(-1, -2), Xw).view(b, c, g, n, r, p)

    # Between chunks: the state entering chunk z is a decayed sum of the other chunks' states; the decays span the
    # chunks strictly between them, i.e. the pairwise chunk sums less chunk z's own total.
    cseg = _segsum(total, reverse)  # (b, h, c, c)
    cpos = torch.arange(c, device=x.device)
    strict = (cpos[:, None] > cpos[None, :]) if not reverse else (cpos[:, None] < cpos[None, :])
    cmix = torch.exp((cseg - total[..., :, None]).masked_fill(~strict, float("-inf"))).view(b, g, r, c, c)
    final_w = torch.exp(cseg[..., 0 if reverse else -1, :]).view(b, g, r, c)
    incoming = torch.einsum("bgrzc,bcgnrp->bzgnrp", cmix, states).reshape(b, c, g, n, r * p)

    y_off = torch.matmul(Cg, incoming).view(b, c, g, Q, r, p)  # (Q x n) by (n x heads*p) per group
    y_off = y_off * w_out.view(b, c, g, r, Q).permute(0, 1, 2, 4, 3)[..., None]
    y = y.permute(0, 1, 4, 2, 3, 5) + y_off.transpose(2, 3)  # natural: (b, c, Q, g, r, p)
    y = y.reshape(b, c * Q, h, p)[:, :l]
    y = _skip(y, x, D)

    record_flops("ssd", b * h * c * Q * Q + 4 * b * c * Q * h * p + (b * l * h * p if D is not None else 0))
    out = y.to(x.dtype)
    if not return_final_state:
        return out
    final = torch.einsum("bgrc,bcgnrp->bgrpn", final_w, states).reshape(b, h, p, n)
    return out, final


def _mamba_ssm_chunk_scan():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # not installed, or installed without a working triton/CUDA build
        return None
    return mamba_chunk_scan_combined


def use_compiled_cpu(device: torch.device, d_state: int) -> bool:
    """Whether SSD on ``device`` with state size ``d_state`` runs on the compiled CPU kernel: CPU tensors, a state
    size it is built for, the kernel available, ``SSMDIFF_SCAN_BACKEND`` not "torch"/"ref", and no flop counting
    active (counting goes through ``ssd_chunked``, so Gflops do not depend on the path)."""
    if device.type != "cpu" or os.environ.get("SSMDIFF_SCAN_BACKEND") in ("torch", "ref") or counting_active():
        return False
    from . import _scan_cpu

    return d_state in _scan_cpu.SSD_STATES and _scan_cpu.available()


def ssd(x, dt, A, B, C, chunk_size=64, D=None, dt_bias=None, dt_softplus=False, reverse=False):
    """SSD dispatcher: mamba-ssm's fused Triton kernel for CUDA tensors when it is installed; on CPU the compiled
    recurrence (``_scan_cpu.ssd_scan_cpu``) for state sizes 8/16/32/64 when the kernel builds (unless
    ``SSMDIFF_SCAN_BACKEND`` is "torch" or "ref"); else ``ssd_chunked``. ``chunk_size`` only shapes the chunked
    and Triton paths; the result is the same recurrence on every path.

    The fused kernel has no reverse mode, so on that path ``reverse`` runs it on flipped sequences (one flip in, one
    out: cheap next to the kernel on a GPU); everywhere else the reverse direction is computed natively.
    """
    if x.is_cuda:
        kernel = _mamba_ssm_chunk_scan()
        if kernel is not None:
            _check_shapes(x, dt, A, B, C, D)
            if reverse:
                x, dt, B, C = x.flip(1), dt.flip(1), B.flip(1), C.flip(1)
            y = kernel(x.contiguous(), dt.contiguous(), A.float(), B.contiguous(), C.contiguous(), chunk_size,
                       D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)
            return y.flip(1) if reverse else y
    if use_compiled_cpu(x.device, B.shape[-1]):
        from ._scan_cpu import ssd_scan_cpu

        _check_shapes(x, dt, A, B, C, D)
        return ssd_scan_cpu(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, reverse=reverse)
    return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                       reverse=reverse)
