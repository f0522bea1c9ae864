"""Shared layers: the fused residual add + RMSNorm against the composite it replaces, written in float64."""

import pytest
import torch

from ssmdiff.models.layers import DropPath, RMSNorm, add_rms_norm, add_rms_norm_composite
from ssmdiff.ssm.ops import _scan_cpu

needs_kernel = pytest.mark.skipif(not _scan_cpu.available(), reason="the compiled CPU kernel cannot be built here")


def _composite64(h, res, weight, eps, scale):
    """residual = res + scale * h (or h), then residual * rsqrt(mean(residual^2) + eps) * weight, in float64."""
    x = h.double() if res is None else res.double() + (1.0 if scale is None else scale.double()[:, None, None]) * h.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double(), x


@needs_kernel
@pytest.mark.parametrize("dim", [37, 368])
@pytest.mark.parametrize("with_res", [False, True])
@pytest.mark.parametrize("drop", [0.0, 0.5])
@pytest.mark.parametrize("res_grad", [False, True])
def test_add_rms_norm_kernel_matches_float64(dim, with_res, drop, res_grad):
    """Outputs and the gradients of h, the residual and the weight against the composite in float64: odd widths
    (vector tails), several threads' partial weight gradients (2 x 300 rows), stochastic depth zeroing one sample
    and doubling the other, and the residual output used downstream (a block) or not (the final norm)."""
    torch.manual_seed(dim + 10 * with_res)
    h = torch.randn(2, 300, dim, requires_grad=True)
    res = torch.randn(2, 300, dim, requires_grad=True) if with_res else None
    norm = RMSNorm(dim)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    dp = DropPath(drop).train()
    gn, gr = torch.randn(2, 300, dim), torch.randn(2, 300, dim)

    torch.manual_seed(7)
    normed, residual = add_rms_norm(h, res, norm, dp, True)
    assert normed.dtype == torch.float32 and residual.dtype == torch.float32
    leaves = [h, norm.weight] + ([res] if with_res else [])
    outs, grads = ([normed, residual], [gn, gr]) if res_grad else ([normed], [gn])
    got = torch.autograd.grad(outs, leaves, grads)

    torch.manual_seed(7)
    scale = dp.sample_scale(h) if with_res else None
    if with_res and drop:  # the seed zeroes one sample and doubles the other, so both paths are covered
        assert sorted(scale.tolist()) == [0.0, 2.0]
    ref_n, ref_x = _composite64(h, res, norm.weight, norm.eps, scale)
    ref_outs = [ref_n, ref_x] if res_grad else [ref_n]
    want = torch.autograd.grad(ref_outs, leaves, [g.double() for g in grads])
    torch.testing.assert_close(normed.double(), ref_n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(residual.double(), ref_x, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_add_rms_norm_bf16_branch_keeps_a_float32_stream():
    """Under autocast the branch output h is bfloat16 and the residual stream float32: the normed output comes back
    in bfloat16, the stream in float32 equal to res + h exactly, and h's gradient in bfloat16 within its rounding
    of the float64 reference."""
    torch.manual_seed(0)
    h = torch.randn(2, 50, 64).bfloat16().requires_grad_()
    res = torch.randn(2, 50, 64, requires_grad=True)
    norm = RMSNorm(64)
    normed, residual = add_rms_norm(h, res, norm, None, True)
    assert normed.dtype == torch.bfloat16 and residual.dtype == torch.float32
    assert torch.equal(residual, res + h.float())
    gn = torch.randn(2, 50, 64).bfloat16()
    gh, gres = torch.autograd.grad([normed], [h, res], [gn])
    ref_n, _ = _composite64(h, res, norm.weight, norm.eps, None)
    want_h, want_res = torch.autograd.grad([ref_n], [h, res], [gn.double()])
    torch.testing.assert_close(normed.double(), ref_n, rtol=8e-3, atol=8e-3)
    assert gh.dtype == torch.bfloat16 and gres.dtype == torch.float32
    torch.testing.assert_close(gres.double(), want_res.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), want_h.double(), rtol=8e-3, atol=8e-3)
    # The first block has no residual yet: the stream starts as h widened to float32.
    normed, residual = add_rms_norm(h, None, norm, None, True)
    assert residual.dtype == torch.float32 and torch.equal(residual, h.float())


def test_add_rms_norm_composite_elsewhere(monkeypatch):
    """Without the kernel (or with a bfloat16 stream) the composite runs, with the same results."""
    torch.manual_seed(0)
    h, res, norm = torch.randn(2, 9, 16), torch.randn(2, 9, 16), RMSNorm(16)
    want_n, want_x = _composite64(h, res, norm.weight, norm.eps, None)
    monkeypatch.setattr(_scan_cpu, "available", lambda: False)
    normed, residual = add_rms_norm(h, res, norm, None, True)
    torch.testing.assert_close(normed.double(), want_n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(residual.double(), want_x)
    # A bfloat16 stream (residual_in_fp32=False) stays bfloat16.
    normed, residual = add_rms_norm(h.bfloat16(), None, norm, None, False)
    assert normed.dtype == residual.dtype == torch.bfloat16


def test_drop_path_sample_scale_draws_what_forward_draws():
    """sample_scale(x) is the factor forward(x) applies to each sample, from the same random numbers."""
    dp = DropPath(0.4).train()
    x = torch.randn(64, 3, 5)
    torch.manual_seed(3)
    out = dp(x)
    torch.manual_seed(3)
    scale = dp.sample_scale(x)
    assert scale.shape == (64,) and scale.dtype == torch.float32
    torch.testing.assert_close(scale.unique(), torch.tensor([0.0, 1 / 0.6]))
    torch.testing.assert_close(out, x * scale[:, None, None])
    assert dp.eval().sample_scale(x) is None and DropPath(0.0).train().sample_scale(x) is None


@pytest.mark.parametrize("path", ["dispatch", "composite"])
def test_add_rms_norm_takes_factors_drawn_beforehand(path):
    """``scale=`` (factors drawn beforehand, as DiS's drop plan does) replaces the DropPath's own draw on either
    path: the result is the float64 composite with those factors, and no random number is drawn."""
    if path == "dispatch" and not _scan_cpu.available():
        pytest.skip("the compiled CPU kernel cannot be built here")
    torch.manual_seed(0)
    h, res = torch.randn(3, 20, 48), torch.randn(3, 20, 48)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    scale = torch.tensor([0.0, 1.25, 1.25])
    fn = add_rms_norm if path == "dispatch" else add_rms_norm_composite
    state = torch.get_rng_state()
    normed, residual = fn(h, res, norm, DropPath(0.2).train(), True, scale=scale)
    assert torch.equal(torch.get_rng_state(), state)
    ref_n, ref_x = _composite64(h, res, norm.weight, norm.eps, scale)
    torch.testing.assert_close(residual.double(), ref_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed.double(), ref_n, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_add_rms_norm_kernel_rejects_mismatched_shapes_and_takes_other_dtypes():
    """The kernel reads raw buffers, so shapes are checked before it runs: a norm of the wrong width, a residual of
    another shape or a wrong number of per-sample factors is one clear error (the composite would broadcast or
    fail deep inside). float16 and empty inputs go through too."""
    h = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="weight"):
        _scan_cpu.add_rms_norm_cpu(h, None, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        _scan_cpu.add_rms_norm_cpu(h, torch.randn(2, 5, 1), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="per sample"):
        _scan_cpu.add_rms_norm_cpu(h, torch.randn(2, 5, 8), torch.ones(8), 1e-5, torch.ones(3))
    normed, res = _scan_cpu.add_rms_norm_cpu(h.half(), None, torch.ones(8), 1e-5)
    assert normed.dtype == torch.float16 and res.dtype == torch.float32
    torch.testing.assert_close(normed.float(), _composite64(h.half(), None, torch.ones(8), 1e-5, None)[0].float(),
                               rtol=2e-3, atol=2e-3)
    empty = torch.randn(0, 5, 8, requires_grad=True)
    normed, res = _scan_cpu.add_rms_norm_cpu(empty, None, torch.ones(8), 1e-5)
    assert normed.shape == res.shape == (0, 5, 8)


@needs_kernel
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dis_with_stochastic_depth_matches_the_composite_norm(monkeypatch, dtype):
    """A DiS training forward and backward with stochastic depth on: the fused block entry gives the outputs and
    gradients of the composite one from the same seed (the drop masks are drawn alike), and gradient checkpointing
    (which replays the random draws) changes nothing."""
    from ssmdiff.models import create_model
    from ssmdiff.models import dis as dis_mod

    torch.manual_seed(0)
    model = create_model("DiS-T/2", input_size=8, in_channels=2, num_classes=3, drop_path_rate=0.5).train()
    for p in model.parameters():  # out of the zero initialisation, so every path carries gradient
        p.data.add_(torch.randn_like(p) * 0.02)
    x, t, y = torch.randn(4, 2, 8, 8), torch.tensor([1.0, 300.0, 600.0, 900.0]), torch.tensor([0, 1, 2, 1])

    def run(checkpoint=False):
        model.zero_grad()
        model.set_grad_checkpointing(checkpoint)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(x, t, y)
        out.float().square().mean().backward()
        return out.float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, fused_grads = run()
    checkpointed, ck_grads = run(checkpoint=True)
    monkeypatch.setattr(dis_mod, "add_rms_norm", add_rms_norm_composite)
    ref, ref_grads = run()
    tol = dict(rtol=5e-2, atol=5e-3) if dtype == "bf16" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused, ref, **tol)
    torch.testing.assert_close(checkpointed, fused, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == ref_grads.keys() == ck_grads.keys()
    for n in ref_grads:
        scale = ref_grads[n].abs().max().item() + 1e-6
        assert (fused_grads[n] - ref_grads[n]).abs().max().item() <= (5e-2 if dtype == "bf16" else 1e-4) * scale, n
        torch.testing.assert_close(ck_grads[n], fused_grads[n], rtol=1e-5, atol=1e-6)
