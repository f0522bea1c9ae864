"""Matrix products in bf16/fp16 on CPUs without native support for them, and the autocast-dtype lookup they share.

PyTorch's CPU GEMM for bf16/fp16 on such a CPU (AVX2, AVX-512 without BF16/AMX) is fast only when both operands
are contiguous along the reduction dimension (a dot-product layout). The Mamba mixers' products on channel-major
activations and ``nn.Linear``'s input gradient (grad @ W) ran 5-9x slower than the same product in that layout on
this project's AVX2 machine (``python benchmarks/products.py``). ``dot_layout_bmm`` copies the operands that are
not in that layout first: the copies are elementwise, the product is not. On a CPU with native bf16
(AVX512-BF16 or AMX) or fp16 (AMX-FP16) the plain ops are kept: no such machine was available to measure.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["autocast_dtype", "low_precision_cpu_dtype", "dot_layout_bmm", "LowPrecisionBmm", "linear", "Linear"]

_LOW = (torch.bfloat16, torch.float16)


def autocast_dtype(t: torch.Tensor):
    """The dtype autocast would compute in for tensors on ``t``'s device, or None when autocast is off there."""
    kind = t.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


@functools.lru_cache(maxsize=None)
def _native_on_cpu(dtype: torch.dtype) -> bool:
    probes = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              torch.float16: ("_is_amx_fp16_supported",)}[dtype]
    for name in probes:
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except Exception:  # a probe that fails says nothing: treat the dtype as emulated
            pass
    return False


def low_precision_cpu_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The bf16/fp16 dtype a product on ``t`` computes in (autocast's, else t's own) when t is on a CPU without
    native support for it; None otherwise (float32, CUDA, or a CPU with AVX512-BF16/AMX)."""
    dtype = autocast_dtype(t) or t.dtype
    if t.device.type != "cpu" or dtype not in _LOW or _native_on_cpu(dtype):
        return None
    return dtype


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) == 1:
        return t
    if t.stride(0) == 0:  # an expanded weight: copy one matrix, not one per batch
        return t[0].contiguous().expand_as(t)
    return t.contiguous()


def dot_layout_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bmm(a, b), a (B, M, K), b (B, K, N), after making both operands contiguous along K."""
    return torch.bmm(_last_dim_contiguous(a), _last_dim_contiguous(b.transpose(1, 2)).transpose(1, 2))


class LowPrecisionBmm(torch.autograd.Function):
    """bmm whose forward and both backward products use ``dot_layout_bmm``."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return dot_layout_bmm(a, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.to(a.dtype)
        ga = dot_layout_bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        gb = dot_layout_bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
        return ga, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with dot-layout products forward and backward where bf16/fp16 on this CPU needs them."""
    dtype = low_precision_cpu_dtype(x)
    if dtype is None:
        return F.linear(x, weight, bias)
    k = x.shape[-1]
    out = LowPrecisionBmm.apply(x.to(dtype).reshape(1, -1, k), weight.to(dtype).t().unsqueeze(0))
    out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias.to(dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict and initialisation) whose product runs in the dot-product layout
    where bf16/fp16 on this CPU needs it (``linear``); F.linear everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
