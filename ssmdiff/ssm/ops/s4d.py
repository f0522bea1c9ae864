"""S4D: a diagonal linear time-invariant state-space model applied as a long convolution, computed by FFT.

Per channel h the SSM x'(t) = A x(t) + B u(t), y = Re(C x) + D u with diagonal complex A (N/2 modes, their
conjugates implied, B folded into C) is discretised by zero-order hold with step dt_h, giving the kernel

    K[h, l] = 2 * Re( sum_n C~[h, n] * exp(dt_h A[h, n] * l) ),   C~ = C * (exp(dt A) - 1) / A

(a Vandermonde product), and y = K * u (causal convolution). The reverse direction convolves anti-causally,
y[t] = sum_{s >= t} K[s - t] u[s], by a correlation in frequency space (conjugated kernel spectrum): no flips.
Both convolutions are FFTs of length 2L, so they are exactly linear (not circular) convolutions.

Flops (one multiply-add = one flop), recorded with ``record_flops`` because FFTs and the Vandermonde product are
invisible to ``FlopCounterMode``:
- "s4d_kernel": 2 per (channel, mode, position), the real matmul that forms the Vandermonde product (the
  transcendentals it needs are on about 2 sqrt(L) positions per mode, negligible);
- "fft_conv": a real FFT or inverse FFT of length n costs n * log2(n) per (batch, channel) (about half of the
  classic 2.5 n log2 n real operations pair into multiply-adds); the spectrum product 4 per frequency.
"""

from __future__ import annotations

import math

import torch

from .counting import record_flops


def vandermonde_kernel(a: torch.Tensor, b: torch.Tensor, cr: torch.Tensor, ci: torch.Tensor,
                       length: int) -> torch.Tensor:
    """K[h, l] = 2 Re(sum_n c[h, n] exp(w[h, n] l)) for w = a + ib, c = cr + i ci, all (channels, modes) real.

    Positions are split as l = m T + j with T about sqrt(length), so exp(w l) = exp(w m T) exp(w j) and
    K[h, m T + j] = 2 Re(sum_n (c exp(w m T))[h, n, m] exp(w j)[h, n, j]): one real batched matmul of
    (M x 2N) by (2N x T) per channel. Transcendentals are evaluated on (channels, modes, M + T) elements instead of
    (channels, modes, length), autograd keeps only those small factors, and the (channels, modes, length)
    Vandermonde matrix is never formed. Real arithmetic throughout: complex exp is slow on CPU.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    H, n2 = a.shape
    T = max(1, math.isqrt(length - 1) + 1)
    M = -(-length // T)
    j = torch.arange(T, device=a.device, dtype=a.dtype)
    m = torch.arange(M, device=a.device, dtype=a.dtype) * T

    def damped(pos):  # exp(w pos) as (real, imaginary) parts, (H, N/2, len(pos))
        mag = torch.exp(a[..., None] * pos)
        ang = b[..., None] * pos
        return mag * torch.cos(ang), mag * torch.sin(ang)

    Vr, Vi = damped(j)
    Er, Ei = damped(m)
    Ur = cr[..., None] * Er - ci[..., None] * Ei  # c * exp(w m T)
    Ui = cr[..., None] * Ei + ci[..., None] * Er
    left = torch.cat([Ur, -Ui], dim=1).transpose(1, 2)  # (H, M, 2N/2)
    right = torch.cat([Vr, Vi], dim=1)  # (H, 2N/2, T)
    return 2 * torch.bmm(left, right).reshape(H, M * T)[:, :length]


def s4d_kernel(log_dt: torch.Tensor, log_A_real: torch.Tensor, A_imag: torch.Tensor, C: torch.Tensor,
               length: int) -> torch.Tensor:
    """ZOH-discretised S4D kernel K (channels, length), float32.

    log_dt (H,); log_A_real, A_imag (H, N/2) with A = -exp(log_A_real) + i A_imag; C (H, N/2, 2), the real and
    imaginary parts of the complex output matrix (B folded in).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    H, n2 = log_A_real.shape
    dt = torch.exp(log_dt.float())[:, None]
    A = torch.complex(-torch.exp(log_A_real.float()), A_imag.float())
    dtA = dt * A
    Cc = torch.view_as_complex(C.float().contiguous())
    Ct = Cc * torch.expm1(dtA) / A
    K = vandermonde_kernel(dtA.real, dtA.imag, Ct.real, Ct.imag, length)
    record_flops("s4d_kernel", 2 * H * n2 * length)
    return K


def _rfft_cost(n: int) -> float:
    return n * math.log2(n)


def fft_conv(u: torch.Tensor, kernels, reverse) -> list[torch.Tensor]:
    """Convolve u (batch, length, channels) with each kernel (channels, length) along the length axis.

    ``reverse[i]`` selects the anti-causal convolution for ``kernels[i]``. The transform of u is computed once and
    shared by all kernels. Returns float32 tensors of u's shape.
    """
    b, L, H = u.shape
    if len(kernels) != len(reverse):
        raise ValueError("fft_conv needs one reverse flag per kernel")
    n = 2 * L
    U = torch.fft.rfft(u.float(), n=n, dim=1)  # (b, L + 1, H)
    outs = []
    for k, rev in zip(kernels, reverse):
        if k.shape != (H, L):
            raise ValueError(f"kernel must be (channels, length) = {(H, L)}, got {tuple(k.shape)}")
        Kf = torch.fft.rfft(k.float(), n=n, dim=-1).transpose(0, 1)  # (L + 1, H)
        if rev:
            # Correlation: conj of the spectrum puts K at negative lags, which the zero half of the 2L padding
            # keeps from wrapping onto positions 0..L-1.
            Kf = Kf.conj()
        outs.append(torch.fft.irfft(U * Kf, n=n, dim=1)[:, :L])
    m = len(kernels)
    record_flops("fft_conv", (1 + m) * b * H * _rfft_cost(n) + m * H * _rfft_cost(n) + 4 * m * b * H * (L + 1))
    return outs
