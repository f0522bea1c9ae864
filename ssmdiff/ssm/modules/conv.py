"""Depthwise 1-D convolutions over the length axis, causal or anti-causal, without flipped activation copies."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool = False):
    """Depthwise convolution of x (batch, channels, length) with ``weight`` (channels, 1, k).

    Causal (``reverse=False``): out[t] = sum_j weight[j] * x[t - (k-1) + j], i.e. nn.Conv1d with padding k-1
    truncated to the input length, as in mamba-ssm.

    Anti-causal (``reverse=True``): out[t] = sum_j weight[j] * x[t + (k-1) - j]. This equals
    flip(causal_conv(flip(x))) with the same weight, so weights of a flip-based bidirectional model (Vision Mamba's
    conv1d_b) load unchanged; only the k-tap weight is flipped here, never the activations.
    """
    k = weight.shape[-1]
    length = x.shape[-1]
    channels = x.shape[1]
    if not reverse:
        return F.conv1d(x, weight, bias, padding=k - 1, groups=channels)[..., :length]
    return F.conv1d(F.pad(x, (0, k - 1)), weight.flip(-1), bias, groups=channels)
