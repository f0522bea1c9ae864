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
