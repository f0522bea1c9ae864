"""S4D kernels and the bidirectional S4D layer against a sequential recurrence and a direct convolution."""

import math

import pytest
import torch

from ssmdiff.ssm import BiS4D
from ssmdiff.ssm.modules.s4d import S4DKernel
from ssmdiff.ssm.ops.counting import count_extra_flops
from ssmdiff.ssm.ops.s4d import fft_conv


def _discrete_ssm(k: S4DKernel):
    """ZOH discretisation written out per mode, in complex128: A_bar = exp(dt A), B_bar = (A_bar - 1) / A."""
    dt = torch.exp(k.log_dt.detach().double())[:, None]
    A = torch.complex(-torch.exp(k.log_A_real.detach().double()), k.A_imag.detach().double())
    Ab = torch.exp(dt * A)
    Bb = (Ab - 1) / A
    C = torch.view_as_complex(k.C.detach().double().contiguous())
    return Ab, Bb, C


def _recurrence(k: S4DKernel, u: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Sequential complex recurrence s_t = A_bar s_{t+-1} + B_bar u_t, y_t = 2 Re(C s_t) (conjugate pairs)."""
    Ab, Bb, C = _discrete_ssm(k)
    b, L, H = u.shape
    s = torch.zeros(b, H, Ab.shape[1], dtype=torch.complex128)
    y = torch.zeros(b, L, H, dtype=torch.float64)
    for t in (reversed(range(L)) if reverse else range(L)):
        s = Ab * s + Bb * u[:, t, :, None].double()
        y[:, t] = 2 * (C * s).sum(-1).real
    return y


@pytest.mark.parametrize("init", ["lin", "inv", "real"])
@pytest.mark.parametrize("L", [1, 7, 64])
def test_bis4d_matches_sequential_recurrence(init, L):
    m = BiS4D(6, d_state=8, dt_min=1e-2, dt_max=0.5, init=init)
    x = torch.randn(2, L, 6)
    y = m(x)
    assert y.shape == (2, L, 12)
    D, D_b = m.D.detach().double(), m.D_b.detach().double()
    y_fwd = _recurrence(m.kernel, x, reverse=False) + x.double() * D
    y_bwd = _recurrence(m.kernel_b, x, reverse=True) + x.double() * D_b
    torch.testing.assert_close(y.double(), torch.cat([y_fwd, y_bwd], -1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("L", [1, 5, 33])
def test_fft_conv_matches_direct_convolution(L):
    H = 3
    u = torch.randn(2, L, H)
    k = torch.randn(H, L)
    y, y_rev = fft_conv(u, [k, k], [False, True])
    direct = torch.zeros(2, L, H)
    direct_rev = torch.zeros(2, L, H)
    for t in range(L):
        for s in range(L):
            if s <= t:
                direct[:, t] += k[:, t - s] * u[:, s]
            if s >= t:
                direct_rev[:, t] += k[:, s - t] * u[:, s]
    torch.testing.assert_close(y, direct, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_rev, direct_rev, rtol=1e-4, atol=1e-5)


def test_kernel_is_vandermonde_of_discrete_ssm():
    k = S4DKernel(4, d_state=6, init="inv")
    K = k(10)
    Ab, Bb, C = _discrete_ssm(k)
    expected = torch.stack([2 * (C * Bb * Ab ** l).sum(-1).real for l in range(10)], dim=-1)
    torch.testing.assert_close(K.double(), expected, rtol=1e-4, atol=1e-5)


def test_initialisations():
    N, H = 8, 5
    lin = S4DKernel(H, N, init="lin")
    torch.testing.assert_close(lin.A_imag.detach(), (math.pi * torch.arange(4.0)).expand(H, 4))
    torch.testing.assert_close(torch.exp(lin.log_A_real.detach()), torch.full((H, 4), 0.5))
    inv = S4DKernel(H, N, init="inv")
    n = torch.arange(4.0)
    torch.testing.assert_close(inv.A_imag.detach(), (N / math.pi * (N / (2 * n + 1) - 1)).expand(H, 4))
    real = S4DKernel(H, N, init="real")
    torch.testing.assert_close(-torch.exp(real.log_A_real.detach()), -(n + 1).expand(H, 4))
    assert torch.all(real.A_imag == 0)
    k = S4DKernel(200, N, dt_min=1e-3, dt_max=0.1)
    dt = torch.exp(k.log_dt.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5) and dt.max() / dt.min() > 10


def test_gradients_and_direction_dependence():
    m = BiS4D(8, d_state=8, dt_min=0.05, dt_max=0.5)
    x = torch.randn(2, 12, 8, requires_grad=True)
    (m(x) ** 2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    t = 5
    x = torch.randn(1, 12, 8)
    x2 = x.clone()
    x2[:, t] += 1.0
    with torch.no_grad():
        changed = (m(x2) - m(x)).abs().amax(-1)[0] > 1e-6
        diff = (m(x2) - m(x)).abs()[0]
    fwd = diff[:, :8].amax(-1) > 1e-6
    bwd = diff[:, 8:].amax(-1) > 1e-6
    assert not fwd[:t].any() and fwd[t:].all(), "forward half must be causal"
    assert not bwd[t + 1:].any() and bwd[: t + 1].all(), "backward half must be anti-causal"
    assert changed.all()


def test_bf16_input_keeps_dtype():
    m = BiS4D(8, d_state=8)
    x = torch.randn(2, 16, 8)
    y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), rtol=3e-2, atol=5e-2)


def test_meta_and_flops():
    b, L, H, N = 2, 64, 16, 8
    with torch.device("meta"):
        m = BiS4D(H, d_state=N)
        x = torch.randn(b, L, H)
    with count_extra_flops() as flops:
        y = m(x)
    assert y.shape == (b, L, 2 * H) and y.device.type == "meta"
    n = 2 * L
    fft = n * math.log2(n)
    assert flops["s4d_kernel"] == 2 * 2 * H * (N // 2) * L
    expected = 3 * b * H * fft + 2 * H * fft + 2 * 4 * b * H * (L + 1) + 2 * b * L * H
    assert flops["fft_conv"] == pytest.approx(expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        BiS4D(8, d_state=7)
    with pytest.raises(ValueError, match="init"):
        BiS4D(8, init="legs")
    with pytest.raises(ValueError, match="dt_min"):
        BiS4D(8, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValueError, match="shape"):
        BiS4D(8)(torch.randn(1, 4, 3))


@pytest.mark.parametrize("L", [1, 2, 7, 13, 50, 64])
def test_vandermonde_factorisation_matches_the_formula(L):
    from ssmdiff.ssm.ops.s4d import vandermonde_kernel

    H, n2 = 3, 4
    args = [(-torch.rand(H, n2) * 0.5).double(), (torch.randn(H, n2) * 2).double(), torch.randn(H, n2).double(),
            torch.randn(H, n2).double()]
    pos = torch.arange(L, dtype=torch.float64)
    direct = 2 * (torch.complex(args[2], args[3])[..., None] * torch.exp(torch.complex(args[0], args[1])[..., None]
                                                                         * pos)).sum(1).real
    torch.testing.assert_close(vandermonde_kernel(*args, L), direct)
    if L > 13:
        return  # the gradient's structure does not change with the length; gradcheck cost grows with it
    args = [t.requires_grad_(True) for t in args]
    torch.autograd.gradcheck(lambda a, b, cr, ci: vandermonde_kernel(a, b, cr, ci, L), args)
