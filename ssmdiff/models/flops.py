"""Honest parameter and Gflops counts.

Gflops follow DiT's table: one forward pass, one multiply-add counted as one flop. The matrix products,
convolutions and attention are counted by ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 per
multiply-add, hence the halving); the selective scans, S4D convolutions and SSD chunk recurrences, which that
counter cannot see or sees only in part, report their own cost through ``ssmdiff.ssm.ops.counting``. Hooks that see
only Linear/Conv layers undercount state-space models (the DiS authors' published Gflops skip the scan).

Everything runs on the meta device: no memory is allocated and no arithmetic is done, so a 900M-parameter model
is counted in about a second.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..ssm.ops.counting import count_extra_flops

__all__ = ["count_params", "count_flops", "model_table"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (frozen tables such as DiT's sine-cosine positions included unless trainable_only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _meta_twin(model: nn.Module) -> nn.Module:
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "name" in config:
        from .registry import create_model

        with torch.device("meta"):
            return create_model(**config)
    return copy.deepcopy(model).to("meta")


def count_flops(model: nn.Module, batch_size: int = 1) -> dict:
    """Forward-pass cost of ``model`` on a batch of its own input size.

    Returns {"gflops": total, "matmul_gflops": matrix products/convolutions/attention, "extra_gflops": {kind:
    Gflops} for the ops that report themselves (selective_scan, s4d, ssd, ...), "params": count}. All in
    the DiT convention (multiply-add = 1 flop), for ``batch_size`` images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    twin = _meta_twin(model).eval()
    size = model.input_size
    x = torch.empty(batch_size, model.in_channels, size, size, device="meta")
    t = torch.empty(batch_size, device="meta")
    y = torch.zeros(batch_size, dtype=torch.long, device="meta") if model.num_classes > 0 else None
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, count_extra_flops() as extra:
        twin(x, t, y)
    matmul = counter.get_total_flops() / 2
    extra_total = sum(extra.values())
    return {
        "gflops": (matmul + extra_total) / 1e9,
        "matmul_gflops": matmul / 1e9,
        "extra_gflops": {k: v / 1e9 for k, v in sorted(extra.items())},
        "params": count_params(model),
    }


def model_table(names=None, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                learn_sigma: bool | None = None, **overrides) -> list[dict]:
    """One row per model name: {"name", "params", "gflops", "matmul_gflops", "ssm_gflops"} (flat scalars, ready
    to print; ``count_flops`` has the per-op breakdown) counted on the meta device at the given input size. ``names`` defaults to every registered name;
    family wildcards such as "DiS" select every size of that family."""
    from .registry import create_model, list_models

    all_names = list_models()
    if names is None:
        names = all_names
    elif isinstance(names, str):
        names = [names]
    selected: list[str] = []
    for name in names:
        family = [n for n in all_names if n.split("-")[0] == name]
        selected.extend(family if family else [name])
    rows = []
    for name in selected:
        with torch.device("meta"):
            model = create_model(name, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                                 learn_sigma=learn_sigma, **overrides)
        flops = count_flops(model)
        rows.append({"name": name, "params": flops["params"], "gflops": flops["gflops"],
                     "matmul_gflops": flops["matmul_gflops"], "ssm_gflops": sum(flops["extra_gflops"].values())})
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of ``model_table`` rows (name, parameters in millions, Gflops, of which scans/SSM)."""
    lines = [f"{'model':<14} {'params (M)':>11} {'Gflops':>9} {'of which SSM':>13}"]
    for r in rows:
        lines.append(f"{r['name']:<14} {r['params'] / 1e6:>11.2f} {r['gflops']:>9.2f} {r['ssm_gflops']:>13.2f}")
    return "\n".join(lines)
