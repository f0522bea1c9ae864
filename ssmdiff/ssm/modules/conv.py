"""Depthwise 1-D convolutions over the length axis, causal or anti-causal, without flipped activation copies.

``F.conv1d(groups=channels)`` is slow on CPU: in bf16 it falls back to one tiny convolution per channel
(``aten::_slow_conv2d``, three quarters of a DiS training step, measured), and in fp32 its backward is slow too.
With a kernel of 2-4 taps the convolution is k shifted multiply-adds, which run at memory speed in any dtype and on
any device, so that is what is done here, in a ``torch.autograd.Function`` whose backward is again shifted
multiply-adds (no padded copies, no per-tap temporaries in the forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..ops.counting import counting_active, record_flops
from ..ops.products import autocast_dtype


def _check_depthwise(fn: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"{fn} expects x (batch, channels, length) and weight (channels, 1, k); got "
                         f"x {tuple(x.shape)} and weight {tuple(weight.shape)}")


def _shifted_macs(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """out[t] = bias + sum_s w[:, k-1-s] * x[t - s] (causal) or x[t + s] (anti-causal); w is (channels, k)."""
    k = w.shape[1]
    length = x.shape[-1]
    w = w.unsqueeze(-1)  # (C, k, 1): one column per tap, broadcast over length
    # Tap s = 0 initialises the output (with the bias folded in), so no zero-filled buffer is written first.
    if bias is None:
        out = x * w[:, k - 1]
    else:
        out = torch.addcmul(bias.unsqueeze(-1), x, w[:, k - 1])
    for s in range(1, min(k, length)):
        if reverse:
            out[..., : length - s].addcmul_(x[..., s:], w[:, k - 1 - s])
        else:
            out[..., s:].addcmul_(x[..., : length - s], w[:, k - 1 - s])
    return out


class _DepthwiseConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, reverse: bool):
        ctx.save_for_backward(x, w)
        ctx.reverse = reverse
        ctx.has_bias = bias is not None
        return _shifted_macs(x, w, bias, reverse)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        reverse = ctx.reverse
        k, length = w.shape[1], x.shape[-1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # The adjoint of a causal conv is the anti-causal conv with the same taps, and vice versa.
            grad_x = _shifted_macs(grad, w, None, not reverse)
        if ctx.needs_input_grad[1]:
            cols = []
            for j in range(k):
                s = k - 1 - j
                if s >= length:
                    cols.append(grad.new_zeros(w.shape[0]))
                elif reverse:
                    cols.append((grad[..., : length - s] * x[..., s:]).sum(dim=(0, 2)))
                else:
                    cols.append((grad[..., s:] * x[..., : length - s]).sum(dim=(0, 2)))
            grad_w = torch.stack(cols, dim=1).to(w.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2))
        return grad_x, grad_w, grad_b, None


def depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool = False):
    """Depthwise convolution of x (batch, channels, length) with ``weight`` (channels, 1, k).

    Causal (``reverse=False``): out[t] = sum_j weight[j] * x[t - (k-1) + j], i.e. nn.Conv1d with padding k-1
    truncated to the input length, as in mamba-ssm.

    Anti-causal (``reverse=True``): out[t] = sum_j weight[j] * x[t + (k-1) - j]. This equals
    flip(causal_conv(flip(x))) with the same weight, so weights of a flip-based bidirectional model (Vision Mamba's
    conv1d_b) load unchanged; only the k-tap weight is flipped here, never the activations.

    Computed as k shifted multiply-adds (see the module docstring); results equal ``F.conv1d`` up to rounding.
    Under autocast the operands are cast to the autocast dtype, as autocast does for ``F.conv1d``. The k multiply-
    adds per output are recorded as flops of kind "depthwise_conv", since the flop counter sees only aten convs.
    """
    _check_depthwise("depthwise_conv1d", x, weight)
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        # Same contract as F.conv1d: mixed dtypes are a caller error, not a silent promotion.
        raise ValueError(f"depthwise_conv1d: x is {x.dtype} but weight/bias are {weight.dtype}; cast them to one "
                         f"dtype (or run under autocast)")
    if counting_active():
        b, c, length = x.shape
        record_flops("depthwise_conv", b * c * length * weight.shape[-1])
    return _DepthwiseConv1d.apply(x, weight.squeeze(1), bias, reverse)


def depthwise_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               reverse: bool = False):
    """The same convolution through ``F.conv1d`` (the previous implementation; used by tests and benchmarks)."""
    k = weight.shape[-1]
    length = x.shape[-1]
    channels = x.shape[1]
    if not reverse:
        return F.conv1d(x, weight, bias, padding=k - 1, groups=channels)[..., :length]
    return F.conv1d(F.pad(x, (0, k - 1)), weight.flip(-1), bias, groups=channels)


def conv_silu(x: torch.Tensor, convs) -> tuple[torch.Tensor, ...]:
    """``silu(depthwise_conv1d(x, weight, bias, reverse))`` for each ``(weight, bias, reverse)`` in ``convs`` (one or
    two directions reading the same x), as a tuple.

    On CPU with the compiled kernel (see ``ssmdiff.ssm.ops._scan_cpu``) all directions run in one pass over x, with
    the SiLU fused and a backward that recomputes the pre-activations and returns a single dx: one read of x and one
    write per output, where the unfused form makes k + 2 passes per direction and stores the pre-activation.
    Elsewhere (CUDA, meta tensors, no compiler) it is the unfused composition, which also records the flops.
    """
    convs = list(convs)
    if not 1 <= len(convs) <= 2:
        raise ValueError(f"conv_silu takes one or two (weight, bias, reverse) directions, got {len(convs)}")
    for weight, _, _ in convs:
        _check_depthwise("conv_silu", x, weight)
    if len({w.shape[-1] for w, _, _ in convs}) != 1:
        raise ValueError("conv_silu: the directions must have the same kernel size")
    from ..ops import _scan_cpu

    if x.device.type == "cpu" and not counting_active() and _scan_cpu.available():
        return _scan_cpu.conv_silu_cpu(x, convs)
    return tuple(F.silu(depthwise_conv1d(x, w, b, reverse=r)) for w, b, r in convs)
