"""Where one training step of a backbone goes, without torch.profiler (which nearly doubles a DiS step on the 2-core
CPU and inflates the compiled kernels' share), and what AdamW's per-tensor loop costs against its fused kernel.

    python benchmarks/step.py                                    # DiS-S/2, 1024 tokens, batch 4, fp32
    python benchmarks/step.py --model DiS-S/2 --tokens 4096 --batch 1 --dtype bf16

Step: the model is built as ``ssmdiff bench`` builds it (allocator tuned, fused AdamW), warmed up, then one step is
timed plain and one under a TorchDispatchMode that takes the wall time of every op at the dispatch level, where each
of ssmdiff's compiled-kernel custom ops (selective_scan_fwd/bwd, conv_silu_fwd/bwd, the layout transposes) counts
as one op, conversions and allocations inside it included. Ops are summed by name (matrix products also by operand
shapes) and the top ones printed with their share of the plain step.

Optimizer: one AdamW step over the model's parameters with random gradients, the default per-tensor loop against
``fused=True``, best of --repeats.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssmdiff.bench import (constructor_overrides, cpu_training_step, default_batch, input_size_for,
                           parse_model_spec)
from ssmdiff.models import create_model
from ssmdiff.utils.alloc import tune_cpu_allocator

_PRODUCTS = ("mm", "addmm", "bmm", "baddbmm")


class _OpTimes(TorchDispatchMode):
    """Wall seconds and calls per op (matrix products keyed by operand shapes and dtypes)."""

    def __init__(self):
        super().__init__()
        self.times = collections.defaultdict(lambda: [0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t0
        name = func.overloadpacket.__name__
        if name in _PRODUCTS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            name += " " + " x ".join(str(tuple(a.shape)) for a in tensors) + " " + str(tensors[-1].dtype)[6:]
        entry = self.times[name]
        entry[0] += 1
        entry[1] += dt
        return out


def step_breakdown(name: str, tokens: int, batch: int, dtype: str, warmup: int = 2, num_classes: int = 1000,
                   overrides: dict | None = None):
    """(plain step seconds, step seconds under the op timer, {op: (calls, seconds)})."""
    step, _ = cpu_training_step(name, tokens, dtype, batch=batch, num_classes=num_classes, overrides=overrides)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    step()
    plain = time.perf_counter() - t0
    mode = _OpTimes()
    with mode:
        t0 = time.perf_counter()
        step()
        timed = time.perf_counter() - t0
    return plain, timed, {k: (v[0], v[1]) for k, v in mode.times.items()}


def optimizer_step_ms(name: str, tokens: int, repeats: int = 5, overrides: dict | None = None) -> dict:
    """Best milliseconds of one AdamW step over the model's parameters: per-tensor loop and fused."""
    model = create_model(name, input_size=input_size_for(name, tokens), in_channels=4, num_classes=1000,
                         **constructor_overrides(overrides or {}))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    result = {"tensors": len(params)}
    for label, fused in (("loop", False), ("fused", True)):
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=fused)
        opt.step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        result[label] = min(times) * 1e3
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiS-S/2", help="a name or a spec as `ssmdiff bench` takes, e.g. "
                   "DiS-S/2:mixer=mamba2")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=None, help="images per step (default 4096 // tokens)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--top", type=int, default=15, help="ops to print")
    p.add_argument("--repeats", type=int, default=5, help="optimizer steps timed per variant")
    args = p.parse_args(argv)
    if args.tokens <= 0 or args.top <= 0 or args.repeats <= 0 or (args.batch is not None and args.batch <= 0):
        p.error("--tokens, --batch, --top and --repeats must be positive")
    try:
        name, overrides = parse_model_spec(args.model)
        input_size_for(name, args.tokens)
    except ValueError as e:
        p.error(str(e))
    tune_cpu_allocator()
    batch = args.batch or default_batch(args.tokens)
    plain, timed, ops = step_breakdown(name, args.tokens, batch, args.dtype, overrides=overrides)
    print(f"{args.model}, {args.tokens} tokens, batch {batch}, {args.dtype}: training step {plain:.2f} s "
          f"({timed:.2f} s under the op timer, {sum(s for _, s in ops.values()):.2f} s inside ops)")
    print(f"  {'seconds':>8} {'share':>6} {'calls':>6}  op")
    for op, (calls, s) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"  {s:8.3f} {100 * s / plain:5.1f}% {calls:6d}  {op}")
    o = optimizer_step_ms(name, args.tokens, args.repeats, overrides)
    print(f"AdamW over {o['tensors']} parameter tensors: per-tensor loop {o['loop']:.1f} ms, fused {o['fused']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
