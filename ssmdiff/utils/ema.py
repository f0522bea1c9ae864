"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """Decay used after ``step`` optimiser steps.

    With ``warmup`` the decay ramps as (1 + step) / (10 + step) up to ``decay``, so that a short run's EMA is not
    dominated by the random initialisation (0.9999 would need ~10k steps to forget it).
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """An EMA copy of a module's parameters and buffers, kept in fp32 on the module's device."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend the live weights of ``model`` (a plain, unwrapped module) into the EMA copy."""
        d = ema_decay_at(step, self.decay, self.warmup)
        ema_params = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            e = ema_params[name]
            src = p.detach()
            if hasattr(src, "full_tensor"):  # FSDP2 DTensor: the EMA copy is kept whole on every rank
                src = src.full_tensor()
            e.lerp_(src.to(e.dtype), 1.0 - d)
        ema_bufs = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            ema_bufs[name].copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
