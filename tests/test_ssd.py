"""SSD (Mamba-2) op: the chunked matrix-product form against a per-step recurrence and against the selective scan."""

import pytest
import torch

from ssmdiff.ssm import selective_scan_ref
from ssmdiff.ssm.ops.counting import count_extra_flops
from ssmdiff.ssm.ops import _scan_cpu
from ssmdiff.ssm.ops.ssd import ssd, ssd_chunked, ssd_ref, use_compiled_cpu

needs_kernel = pytest.mark.skipif(not _scan_cpu.available(), reason="the compiled CPU kernel could not be built")


def _inputs(b=2, l=37, h=4, p=3, g=2, n=5, dtype=torch.float32, device="cpu", D_shape="head"):
    x = torch.randn(b, l, h, p, device=device)
    dt = torch.randn(b, l, h, device=device) * 0.5
    A = -torch.rand(h, device=device) * 3 - 0.1
    B = torch.randn(b, l, g, n, device=device)
    C = torch.randn(b, l, g, n, device=device)
    D = None if D_shape is None else torch.randn((h,) if D_shape == "head" else (h, p), device=device)
    dt_bias = torch.randn(h, device=device) * 0.3
    return [t.to(dtype) if t is not None else None for t in (x, dt, A, B, C, D, dt_bias)]


def _recurrence(x, dt, A, B, C, D, reverse):
    """Per-step loop over (batch, head) written independently of ssd_ref: dt already positive, no grouping tricks
    beyond indexing the group of each head."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    y = torch.zeros(b, l, h, p, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            s = torch.zeros(p, n, dtype=torch.float64)
            for t in (reversed(range(l)) if reverse else range(l)):
                s = torch.exp(dt[bi, t, hi] * A[hi]) * s + dt[bi, t, hi] * torch.outer(x[bi, t, hi], B[bi, t, gi])
                y[bi, t, hi] = s @ C[bi, t, gi]
                if D is not None:
                    y[bi, t, hi] += (D[hi] if D.dim() == 1 else D[hi]) * x[bi, t, hi]
    return y, s


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("D_shape", ["head", "headdim", None])
def test_reference_matches_independent_recurrence(reverse, D_shape):
    x, dt, A, B, C, D, _ = _inputs(l=9, D_shape=D_shape)
    dtp = torch.nn.functional.softplus(dt)
    y, s = ssd_ref(x, dt, A, B, C, D=D, dt_softplus=True, return_final_state=True, reverse=reverse)
    y64, s64 = _recurrence(*(t.double() if t is not None else None for t in (x, dtp, A, B, C, D)), reverse)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.double()[-1, -1], s64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_ssd_is_a_selective_scan_with_shared_decay(reverse):
    x, dt, A, B, C, D, dt_bias = _inputs()
    b, l, h, p = x.shape
    n = B.shape[-1]
    y = ssd_chunked(x, dt, A, B, C, chunk_size=8, D=D, dt_bias=dt_bias, dt_softplus=True, reverse=reverse)
    # channels = heads * headdim; each channel's A row is its head's scalar repeated over the state.
    ys = selective_scan_ref(x.reshape(b, l, h * p).transpose(1, 2), dt.repeat_interleave(p, 2).transpose(1, 2),
                            A.repeat_interleave(p)[:, None].expand(h * p, n), B.permute(0, 2, 3, 1),
                            C.permute(0, 2, 3, 1), D.repeat_interleave(p), delta_bias=dt_bias.repeat_interleave(p),
                            delta_softplus=True, reverse=reverse)
    torch.testing.assert_close(y, ys.transpose(1, 2).reshape(b, l, h, p), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("l,chunk", [(1, 4), (7, 4), (37, 8), (64, 64), (50, 1), (130, 16)])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_matches_reference_forward_and_gradients(reverse, l, chunk, groups):
    inputs = _inputs(l=l, g=groups)
    for t in inputs:
        t.requires_grad_(True)
    x, dt, A, B, C, D, dt_bias = inputs
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=True, return_final_state=True, reverse=reverse)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size=chunk, **kw)
    yr, sr = ssd_ref(x, dt, A, B, C, **kw)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, sr, rtol=1e-4, atol=1e-4)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), inputs)
    grads_r = torch.autograd.grad((yr * gy).sum() + (sr * gs).sum(), inputs)
    for name, g, gr in zip("x dt A B C D dt_bias".split(), grads, grads_r):
        torch.testing.assert_close(g, gr, rtol=1e-3, atol=1e-3, msg=lambda m: f"grad of {name}: {m}")


def test_no_softplus_no_bias_no_skip():
    x, dt, A, B, C, _, _ = _inputs(l=20, D_shape=None)
    dt = dt.abs()
    for reverse in (False, True):
        torch.testing.assert_close(ssd_chunked(x, dt, A, B, C, chunk_size=6, reverse=reverse),
                                   ssd_ref(x, dt, A, B, C, reverse=reverse), rtol=1e-4, atol=1e-4)


def test_strong_decay_stays_finite():
    # Large dt * |A| makes the unmasked half of the decay matrix overflow if exponentiated before masking.
    x, dt, A, B, C, D, _ = _inputs(l=64)
    dt = (dt.abs() * 50).requires_grad_(True)
    A = (A * 20).requires_grad_(True)
    for reverse in (False, True):
        y = ssd_chunked(x, dt, A, B, C, chunk_size=32, D=D, reverse=reverse)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, ssd_ref(x, dt, A, B, C, D=D, reverse=reverse), rtol=1e-4, atol=1e-4)
        gdt, gA = torch.autograd.grad(y.sum(), [dt, A])
        assert torch.isfinite(gdt).all() and torch.isfinite(gA).all()


def test_bf16_inputs_accumulate_in_float32():
    x, dt, A, B, C, D, dt_bias = _inputs(l=40)
    y32 = ssd_chunked(x, dt, A, B, C, chunk_size=16, D=D, dt_bias=dt_bias, dt_softplus=True)
    xb, Bb, Cb = x.bfloat16(), B.bfloat16(), C.bfloat16()
    yb = ssd_chunked(xb, dt.bfloat16(), A, Bb, Cb, chunk_size=16, D=D, dt_bias=dt_bias, dt_softplus=True)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y32, rtol=3e-2, atol=5e-2)


def test_meta_and_flop_record():
    b, l, h, p, g, n, Q = 2, 100, 8, 16, 1, 32, 64
    x, dt, A, B, C, D, dt_bias = _inputs(b, l, h, p, g, n, device="meta")
    with count_extra_flops() as flops:
        y = ssd(x, dt, A, B, C, chunk_size=Q, D=D, dt_bias=dt_bias, dt_softplus=True)
    assert y.shape == (b, l, h, p) and y.device.type == "meta"
    c = 2  # 100 positions in chunks of 64
    assert flops["ssd"] == b * h * c * Q * Q + 4 * b * c * Q * h * p + b * l * h * p


def test_bad_shapes():
    x, dt, A, B, C, D, _ = _inputs()
    with pytest.raises(ValueError, match="dt"):
        ssd_chunked(x, dt[:, :-1], A, B, C)
    with pytest.raises(ValueError, match="divisible"):
        ssd_chunked(x, dt, A, B.repeat(1, 1, 2, 1)[:, :, :3], C.repeat(1, 1, 2, 1)[:, :, :3])
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(x, dt, A, B, C, chunk_size=0)


@needs_kernel
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("b,l,h,p,g,n,D_shape", [
    (2, 37, 4, 3, 2, 8, "head"),       # one partial chunk; odd head width; two groups
    (1, 5, 2, 4, 1, 16, "headdim"),    # shorter than a vector of steps
    (2, 150, 6, 8, 3, 32, None),       # three chunks of the kernel's 64, the last partial; three groups
    (1, 130, 2, 16, 1, 64, "head"),    # Mamba-2's default state size
])
def test_compiled_cpu_matches_reference_forward_and_gradients(reverse, b, l, h, p, g, n, D_shape):
    """ssd() on CPU takes the compiled kernel (scalar decay per head, state in registers) for these state sizes;
    it must be the same recurrence as the sequential reference, gradients included."""
    assert use_compiled_cpu(torch.device("cpu"), n)
    ins = [t.requires_grad_(True) if t is not None else None
           for t in _inputs(b, l, h, p, g, n, D_shape=D_shape)]
    x, dt, A, B, C, D, dt_bias = ins
    leaves = [t for t in ins if t is not None]
    y = ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, reverse=reverse)
    ref = ssd_ref(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, reverse=reverse)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, leaves, go), torch.autograd.grad(ref, leaves, go)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_compiled_cpu_threads_and_strong_decay():
    """Big enough for the kernel's threads (per-thread dB/dC partial sums) and with decays that underflow."""
    torch.manual_seed(1)
    x, dt, A, B, C, D, dt_bias = _inputs(b=2, l=200, h=8, p=16, g=2, n=16)
    dt = (dt.abs() * 20).requires_grad_(True)
    x.requires_grad_(True)
    B.requires_grad_(True)
    y = ssd(x, dt, A * 10, B, C, D=D)
    ref = ssd_ref(x, dt, A * 10, B, C, D=D)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(torch.autograd.grad(y.sum(), [x, dt, B]), torch.autograd.grad(ref.sum(), [x, dt, B])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compiled_cpu_path_selection(monkeypatch):
    assert not use_compiled_cpu(torch.device("meta"), 16)
    assert not use_compiled_cpu(torch.device("cpu"), 12)  # no kernel for this state size: chunked
    monkeypatch.setenv("SSMDIFF_SCAN_BACKEND", "torch")
    assert not use_compiled_cpu(torch.device("cpu"), 16)
    monkeypatch.delenv("SSMDIFF_SCAN_BACKEND")
    with count_extra_flops():  # counting goes through the chunked form, so Gflops do not depend on the path
        assert not use_compiled_cpu(torch.device("cpu"), 16)


@needs_kernel
def test_channel_major_entry_rejects_bad_shapes():
    xc = torch.randn(1, 8 + 2 * 12, 10)  # state 12: no kernel for it
    with pytest.raises(ValueError, match="state sizes"):
        _scan_cpu.ssd_channel_major(xc, torch.rand(1, 2, 10), -torch.rand(2), None, 8, 1, 4)
    with pytest.raises(ValueError, match="bad shapes"):
        _scan_cpu.ssd_channel_major(torch.randn(1, 8 + 2 * 16 + 1, 10), torch.rand(1, 2, 10), -torch.rand(2), None,
                                    8, 1, 4)


@pytest.mark.cuda
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_dispatch_matches_reference(reverse):
    x, dt, A, B, C, D, dt_bias = _inputs(l=300, h=8, p=16, g=2, n=16, device="cuda")
    y = ssd(x, dt, A, B, C, chunk_size=64, D=D, dt_bias=dt_bias, dt_softplus=True, reverse=reverse)
    yr = ssd_ref(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, reverse=reverse)
    torch.testing.assert_close(y, yr, rtol=1e-3, atol=2e-3)


@needs_kernel
def test_ssd_benchmark_runs_on_tiny_shapes(capsys, benchmark_module):
    """benchmarks/ssd.py: both implementations timed, ratios against the chunked form; bad sizes rejected."""
    mod = benchmark_module("ssd")
    assert mod.main(["--batch", "1", "--length", "20", "--heads", "2", "--headdim", "4", "--state", "8",
                     "--repeats", "1"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["chunked", "compiled"]
    for row in rows:
        assert all(float(v) > 0 for v in row.split()[1:])
    assert rows[0].split()[-2:] == ["1.00", "1.00"]
    with pytest.raises(SystemExit):
        mod.main(["--heads", "3", "--groups", "2"])
