"""Token-major <-> channel-major layout ops (``channel_major`` / ``token_major`` in ``ssmdiff.ssm.ops._scan_cpu``):
the compiled tiled transpose against torch's own transposes, exactly, in values, strides and gradients, and the
Mamba mixers' token-major products against their batched channel-major form."""

from __future__ import annotations

import pytest
import torch

from ssmdiff.ssm.modules import mamba as mamba_mod
from ssmdiff.ssm.modules.mamba import BiMamba, Mamba
from ssmdiff.ssm.ops import _scan_cpu
from ssmdiff.ssm.ops._scan_cpu import channel_major, token_major

needs_kernel = pytest.mark.skipif(not _scan_cpu.available(), reason="no C++ compiler: compiled CPU kernels unavailable")


def _reference_channel_major(x, splits):
    return [t.transpose(1, 2).contiguous() for t in torch.split(x, splits, dim=-1)]


@needs_kernel
@pytest.mark.parametrize("batch,length", [(1, 1), (2, 15), (3, 16), (2, 17), (1, 100)])
@pytest.mark.parametrize("splits", [[1], [7], [8, 8], [13, 3, 64]])
def test_channel_major_matches_torch_transpose(batch, length, splits):
    # Lengths around the kernel's 16-row tiles and widths around its 8-column vectors (whole tiles and tails).
    g = torch.Generator().manual_seed(batch * 1000 + length)
    x = torch.randn(batch, length, sum(splits), generator=g)
    outs = channel_major(x, splits)
    for out, ref in zip(outs, _reference_channel_major(x, splits)):
        assert out.is_contiguous()
        assert torch.equal(out, ref)
    back = token_major(outs)
    assert back.is_contiguous() and torch.equal(back, x)


@needs_kernel
def test_layout_ops_take_strided_inputs():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 37, 50, generator=g)
    cols = wide[:, :, 5:29]  # a column slice: row stride 50
    (out,) = channel_major(cols, [24])
    assert torch.equal(out, cols.transpose(1, 2))
    t = torch.randn(2, 24, 37, generator=g).transpose(1, 2)  # unit stride along the wrong axis: copied first
    (out,) = channel_major(t, [24])
    assert torch.equal(out, t.transpose(1, 2))
    strided = torch.randn(2, 40, 37, generator=g)[:, 3:27]  # channel-major parts may be row slices too
    assert torch.equal(token_major([strided]), strided.transpose(1, 2))


@needs_kernel
def test_layout_ops_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 19, 21, generator=g, requires_grad=True)
    u, z = channel_major(x, [13, 8])
    gu, gz = torch.randn(u.shape, generator=g), torch.randn(z.shape, generator=g)
    (gx,) = torch.autograd.grad((u * gu).sum() + (z * gz).sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    u_ref, z_ref = _reference_channel_major(x_ref, [13, 8])
    (gx_ref,) = torch.autograd.grad((u_ref * gu).sum() + (z_ref * gz).sum(), x_ref)
    assert torch.equal(gx, gx_ref)
    # Only one output used: the other part's gradient is zero.
    (gx_one,) = torch.autograd.grad((channel_major(x, [13, 8])[0] * gu).sum(), x)
    assert torch.equal(gx_one[..., :13], gu.transpose(1, 2)) and not gx_one[..., 13:].any()
    parts = [torch.randn(2, c, 19, generator=g, requires_grad=True) for c in (5, 16)]
    y = token_major(parts)
    gy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad((y * gy).sum(), parts)
    for grad, ref in zip(grads, _reference_channel_major(gy, [5, 16])):
        assert torch.equal(grad, ref)


@needs_kernel
def test_layout_ops_are_well_formed_custom_ops():
    torch.manual_seed(0)
    x = torch.randn(2, 20, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.ssmdiff.to_channel_major.default, (x, [16, 8]))
    torch.library.opcheck(torch.ops.ssmdiff.to_channel_major.default, (x[:, :, 3:17], [14]))
    parts = [torch.randn(2, 16, 20, requires_grad=True), torch.randn(2, 8, 20, requires_grad=True)]
    torch.library.opcheck(torch.ops.ssmdiff.to_token_major.default, (parts,))


def test_layout_ops_fall_back_outside_the_kernel():
    # float64 (and any device but the CPU) takes torch's transposes: same values.
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    outs = channel_major(x, [4, 8])
    for out, ref in zip(outs, _reference_channel_major(x, [4, 8])):
        assert out.dtype == torch.float64 and torch.equal(out, ref)
    assert torch.equal(token_major(outs), x)


def test_layout_ops_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="does not split"):
        channel_major(torch.randn(2, 9, 12), [4, 4])
    with pytest.raises(ValueError, match="do not line up"):
        token_major([torch.randn(2, 4, 9), torch.randn(2, 4, 8)])


@needs_kernel
@pytest.mark.parametrize("cls", [Mamba, BiMamba])
def test_mamba_token_major_products_match_batched_products(cls, monkeypatch):
    """in_proj as one product over all tokens then the transpose (and out_proj's input gradient the same way)
    against the batched products that write channel-major directly: same outputs and gradients."""
    torch.manual_seed(0)
    block = cls(d_model=24, d_state=16)
    x = torch.randn(2, 33, 24, requires_grad=True)

    def run():
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(x)
        out.pow(2).sum().backward()
        return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in block.named_parameters()}

    out, gx, grads = run()
    monkeypatch.setattr(mamba_mod, "_token_major_products", lambda t: False)
    out_ref, gx_ref, grads_ref = run()
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-4, msg=name)
