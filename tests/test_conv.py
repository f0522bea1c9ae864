"""The shifted-multiply-add depthwise conv against F.conv1d and against a loop written from the definition."""

import pytest
import torch
import torch.nn.functional as F

from ssmdiff.ssm.modules.conv import depthwise_conv1d
from ssmdiff.ssm.ops.counting import count_extra_flops


def _loop_conv(x, w, b, reverse):
    """out[t] = b + sum_j w[j] * x[t - (k-1) + j] (causal) or x[t + (k-1) - j] (anti-causal), zero outside."""
    B, C, L = x.shape
    k = w.shape[-1]
    out = torch.zeros_like(x) if b is None else b[None, :, None].expand(B, C, L).clone()
    for t in range(L):
        for j in range(k):
            src = t + (k - 1) - j if reverse else t - (k - 1) + j
            if 0 <= src < L:
                out[:, :, t] = out[:, :, t] + w[:, 0, j] * x[:, :, src]
    return out


def _conv1d(x, w, b, reverse):
    k, C = w.shape[-1], x.shape[1]
    if reverse:  # anti-causal = flip(causal(flip(x))) with the same taps
        return F.conv1d(x.flip(-1), w, b, padding=k - 1, groups=C)[..., : x.shape[-1]].flip(-1)
    return F.conv1d(x, w, b, padding=k - 1, groups=C)[..., : x.shape[-1]]


def _grads(fn, x, w, b, g, reverse):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    out = fn(leaves[0], leaves[1], leaves[2] if b is not None else None, reverse)
    return (out,) + torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [1, 2, 3, 7])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_loop_and_conv1d_float64(reverse, k, length, with_bias):
    torch.manual_seed(k * 100 + length)
    x = torch.randn(2, 5, length, dtype=torch.float64)
    w = torch.randn(5, 1, k, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64) if with_bias else None
    g = torch.randn(2, 5, length, dtype=torch.float64)
    got = _grads(depthwise_conv1d, x, w, b, g, reverse)
    want = _grads(_conv1d, x, w, b, g, reverse)
    torch.testing.assert_close(got[0], _loop_conv(x, w, b, reverse))
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("reverse", [False, True])
def test_low_precision_close_to_float64_on_transposed_input(dtype, tol, reverse):
    """Mixers pass a (batch, length, channels) tensor viewed as (batch, channels, length); check that layout."""
    torch.manual_seed(0)
    x64 = torch.randn(3, 33, 16, dtype=torch.float64).transpose(1, 2)
    w64, b64 = torch.randn(16, 1, 4, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    g64 = torch.randn(3, 16, 33, dtype=torch.float64)
    want = _grads(_conv1d, x64, w64, b64, g64, reverse)
    got = _grads(depthwise_conv1d, x64.to(dtype), w64.to(dtype), b64.to(dtype), g64.to(dtype), reverse)
    for a, c in zip(got, want):
        assert a.dtype == dtype
        scale = c.abs().max()
        assert (a.double() - c).abs().max() <= tol * scale * 4


def test_autocast_runs_in_the_autocast_dtype():
    x = torch.randn(2, 8, 10)
    w, b = torch.randn(8, 1, 4, requires_grad=True), torch.randn(8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv1d(x, w, b)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_meta_tensors_and_flops_recorded():
    x = torch.empty(4, 6, 11, device="meta")
    w, b = torch.empty(6, 1, 3, device="meta"), torch.empty(6, device="meta")
    with count_extra_flops() as extra:
        out = depthwise_conv1d(x, w, b, reverse=True)
    assert out.shape == (4, 6, 11) and out.device.type == "meta"
    assert extra["depthwise_conv"] == 4 * 6 * 11 * 3  # one multiply-add per tap and output


def test_bad_shapes_and_mixed_dtypes_raise():
    with pytest.raises(ValueError, match="weight"):
        depthwise_conv1d(torch.randn(2, 4, 5), torch.randn(3, 1, 4), None)
    with pytest.raises(ValueError, match="dtype"):
        depthwise_conv1d(torch.randn(2, 4, 5), torch.randn(4, 1, 4, dtype=torch.float64), None)


# ------------------------------------------------------------------ fused conv + SiLU (compiled CPU kernel)

def _fused_available():
    from ssmdiff.ssm.ops import _scan_cpu

    return _scan_cpu.available()


needs_kernel = pytest.mark.skipif(not _fused_available(), reason="the compiled CPU kernel cannot be built here")


@needs_kernel
@pytest.mark.parametrize("k", [1, 3, 4, 9])  # 9: past the vector rows (8 taps at most), the scalar loops
@pytest.mark.parametrize("length", [1, 2, 5, 300])
@pytest.mark.parametrize("dirs", [(False,), (True,), (False, True), (True, True)])
def test_conv_silu_matches_the_unfused_composition(k, length, dirs):
    """Outputs and all gradients of the fused kernel against silu(loop conv) in float64, one or two directions
    sharing x, with and without bias, including lengths shorter than the kernel."""
    from ssmdiff.ssm.modules.conv import conv_silu

    torch.manual_seed(k * 1000 + length)
    C = 24
    x = torch.randn(3, C, length)
    params = []
    for j, _ in enumerate(dirs):
        params += [torch.randn(C, 1, k) * 0.5, torch.randn(C) * 0.5 if j == 0 else None]
    grads = [torch.randn(3, C, length) for _ in dirs]

    def run(fused):
        leaves = [x.clone().requires_grad_()] + [p.clone().requires_grad_() if p is not None else None
                                                 for p in params]
        if fused:
            outs = conv_silu(leaves[0], [(leaves[1 + 2 * j], leaves[2 + 2 * j], r) for j, r in enumerate(dirs)])
        else:
            outs = tuple(F.silu(_loop_conv(leaves[0].double(), leaves[1 + 2 * j].double(),
                                           None if leaves[2 + 2 * j] is None else leaves[2 + 2 * j].double(), r))
                         for j, r in enumerate(dirs))
        inputs = [t for t in leaves if t is not None]
        return [o.double() for o in outs], torch.autograd.grad(outs, inputs, [g.to(o.dtype) for g, o in
                                                                              zip(grads, outs)])

    outs, gr = run(True)
    outs_ref, gr_ref = run(False)
    for a, b in zip(outs, outs_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(gr, gr_ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_conv_silu_bf16_input_and_errors():
    from ssmdiff.ssm.modules.conv import conv_silu

    torch.manual_seed(0)
    x = torch.randn(2, 8, 40)
    w, b = torch.randn(8, 1, 4), torch.randn(8)
    (got,) = conv_silu(x.bfloat16(), [(w, b, True)])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.silu(_loop_conv(x, w, b, True)), rtol=3e-2, atol=3e-2)
    with pytest.raises(ValueError, match="one or two"):
        conv_silu(x, [])
    with pytest.raises(ValueError, match="channels"):
        conv_silu(x, [(torch.randn(7, 1, 4), None, False)])
    with pytest.raises(ValueError, match="same kernel size"):
        conv_silu(x, [(w, b, False), (torch.randn(8, 1, 3), None, True)])


@needs_kernel
def test_conv_silu_bf16_rows_equal_whole_tensor_conversion():
    """bf16 x, outputs, output gradients and dx are converted row by row inside the kernel (exact widening,
    round-to-nearest-even narrowing): bit for bit what converting whole tensors around the float32 kernel gives;
    output gradients in float32 next to a bf16 x take the mixed path."""
    from ssmdiff.ssm.ops import _scan_cpu

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 24, 301, generator=g).bfloat16()
    w0, w1 = torch.randn(24, 1, 4, generator=g) * 0.5, torch.randn(24, 1, 4, generator=g) * 0.5
    b0 = torch.randn(24, generator=g) * 0.5
    g0, g1 = (torch.randn(2, 24, 301, generator=g).bfloat16() for _ in range(2))
    y0, y1 = _scan_cpu._conv_fwd(x, w0, b0, w1, None, False, True)
    r0, r1 = _scan_cpu._conv_fwd(x.float(), w0, b0, w1, None, False, True)
    assert y0.dtype == torch.bfloat16 and torch.equal(y0, r0.bfloat16()) and torch.equal(y1, r1.bfloat16())
    for grads in ((g0, g1), (g0.float(), g1.float())):
        got = _scan_cpu._conv_bwd(*grads, x, w0, b0, w1, None, False, True)
        ref = _scan_cpu._conv_bwd(g0.float(), g1.float(), x.float(), w0, b0, w1, None, False, True)
        assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], ref[0].bfloat16())
        for a, b in zip(got[1:], ref[1:]):
            assert torch.equal(a, b)


def test_conv_silu_meta_records_the_conv_flops():
    from ssmdiff.ssm.modules.conv import conv_silu

    x = torch.empty(2, 8, 50, device="meta")
    w = torch.empty(8, 1, 4, device="meta")
    with count_extra_flops() as counts:
        outs = conv_silu(x, [(w, None, False), (w, None, True)])
    assert [o.shape for o in outs] == [x.shape, x.shape]
    assert counts["depthwise_conv"] == 2 * 2 * 8 * 50 * 4


@pytest.mark.parametrize("autocast", [False, True])
def test_from_channel_major_matches_linear(autocast):
    """The channel-major projection used by the Mamba mixers: same values and gradients as F.linear on the
    transposed input, with the input gradient returned contiguous in the channel-major layout."""
    from ssmdiff.ssm.modules.mamba import _FromChannelMajor

    torch.manual_seed(0)
    x = torch.randn(3, 16, 37, requires_grad=True)
    w = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(3, 37, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = _FromChannelMajor.apply(x, w)
        ref = F.linear(x.transpose(1, 2), w)
    assert out.dtype == ref.dtype
    gx, gw = torch.autograd.grad(out, (x, w), g.to(out.dtype))
    rx, rw = torch.autograd.grad(ref, (x, w), g.to(ref.dtype))
    tol = dict(rtol=2e-2, atol=5e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(gx, rx, **tol)
    torch.testing.assert_close(gw, rw, **tol)
    assert gx.is_contiguous() and gx.dtype == x.dtype and gw.dtype == w.dtype


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("used", [(0, 1), (1,)])
def test_to_channel_major_matches_linear(autocast, used):
    """in_proj's products into the channel-major layout: each part equals F.linear with that block of the weight,
    transposed; the input gradient is one token-major contiguous tensor (the parts' gradients summed), the weight
    gradient float32-summed over the batch, and a part that gets no gradient contributes nothing."""
    from ssmdiff.ssm.modules.mamba import _ToChannelMajor

    torch.manual_seed(0)
    x = torch.randn(3, 37, 16, requires_grad=True)
    w = torch.randn(10, 16, requires_grad=True)
    gs = [torch.randn(3, 5, 37), torch.randn(3, 5, 37)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = _ToChannelMajor.apply(x, w, 2)
        refs = [F.linear(x, wi).transpose(1, 2) for wi in w.chunk(2, dim=0)]
    assert all(o.is_contiguous() and o.dtype == r.dtype and o.shape == (3, 5, 37) for o, r in zip(outs, refs))
    gx, gw = torch.autograd.grad([outs[i] for i in used], (x, w), [gs[i].to(outs[i].dtype) for i in used])
    rx, rw = torch.autograd.grad([refs[i] for i in used], (x, w), [gs[i].to(refs[i].dtype) for i in used])
    tol = dict(rtol=2e-2, atol=5e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o.float(), r.float(), **tol)
    torch.testing.assert_close(gx, rx, **tol)
    torch.testing.assert_close(gw, rw, **tol)
    assert gx.is_contiguous() and gx.dtype == x.dtype and gw.dtype == w.dtype
    if used == (1,):
        assert torch.equal(gw[:5], torch.zeros_like(gw[:5]))


@pytest.mark.parametrize("mode", ["autocast", "bf16"])
def test_low_precision_cpu_products_match_fp32(mode):
    """bf16 on the CPU: the Mamba projections (channel-major in and out, channel-major in and position-major out,
    position-major in) run through dot-layout GEMMs; values and gradients match fp32 within bf16 rounding, and the
    gradients come back in their inputs' dtypes."""
    from ssmdiff.ssm.modules.mamba import _channel_major, _out

    torch.manual_seed(0)
    w = torch.randn(6, 16, requires_grad=True)
    proj = torch.nn.Linear(16, 6, bias=True)
    cases = {
        "channel-major in/out": lambda x, w: _channel_major(w, x),
        "position-major in": lambda x, w: _channel_major(w, x.transpose(1, 2).contiguous().transpose(1, 2)),
        "out_proj": lambda x, w: _out(proj, x),
    }
    refs = {
        "channel-major in/out": lambda x, w: (x.transpose(1, 2) @ w.t()).transpose(1, 2),
        "position-major in": lambda x, w: (x.transpose(1, 2) @ w.t()).transpose(1, 2),
        "out_proj": lambda x, w: F.linear(x.transpose(1, 2), proj.weight, proj.bias),
    }
    tol = dict(rtol=2e-2, atol=6e-2)
    for name, fn in cases.items():
        x32 = torch.randn(3, 16, 41)
        x = x32.clone().to(torch.bfloat16 if mode == "bf16" else torch.float32).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            out = fn(x, w)
        assert out.dtype == torch.bfloat16, name
        xr = x32.clone().requires_grad_()
        ref = refs[name](xr, w)
        g = torch.randn(ref.shape)
        params = [w] if name != "out_proj" else [proj.weight]
        grads = torch.autograd.grad(out, [x] + params, g.to(out.dtype))
        grads_r = torch.autograd.grad(ref, [xr] + params, g)
        torch.testing.assert_close(out.float(), ref, **tol, msg=name)
        assert grads[0].dtype == x.dtype and grads[1].dtype == torch.float32, name
        for a, b in zip(grads, grads_r):
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a.float() / scale, b / scale, **tol, msg=name)



@needs_kernel
def test_conv_benchmark_times_both_conv_forms_on_tiny_shapes(capsys, benchmark_module):
    """benchmarks/conv.py: the depthwise conv against F.conv1d and the compiled conv + SiLU against the unfused
    composition, forward and forward+backward, in fp32 and under bf16 autocast."""
    mod = benchmark_module("conv")
    mod.bench_conv_silu([(2, 8, 37)], [torch.float32, torch.bfloat16], 4, 1)
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("(2,")]
    assert len(lines) == 4 and {" ".join(line[4:-4]) for line in lines} == {"unfused", "conv_silu kernel"}
    assert all(float(v) > 0 for line in lines for v in line[-4:])
