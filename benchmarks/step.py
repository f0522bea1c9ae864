"""Where one training step of a backbone goes, without torch.profiler (which nearly doubles a DiS step on the 2-core
CPU and inflates the compiled kernels' share), and what AdamW's per-tensor loop costs against its fused kernel.

    python benchmarks/step.py                                    # DiS-S/2, 1024 tokens, batch 4, fp32
    python benchmarks/step.py --model DiS-S/2 --tokens 4096 --batch 1 --dtype bf16
    python benchmarks/step.py --dtype bf16 --toggle ssmdiff.models.dis.SKIP_DROPPED_SAMPLES --steps 8
    python benchmarks/step.py --model DiS-B/2 --tokens 4096 --dtype bf16 --sample   # one sampling forward instead

Step: the model is built as ``ssmdiff bench`` builds it (allocator tuned, fused AdamW), warmed up, then one step is
timed plain and one under a TorchDispatchMode that takes the wall time of every op at the dispatch level, where each
of ssmdiff's compiled-kernel custom ops (selective_scan_fwd/bwd, conv_silu_fwd/bwd, the layout transposes) counts
as one op, conversions and allocations inside it included. Ops are summed by name (matrix products also by operand
shapes) and the top ones printed with their share of the plain step. ``--sample`` breaks down one sampling forward
(eval and inference mode, the bench's sampling phase) instead, and skips the optimizer comparison.

Optimizer: one AdamW step over the model's parameters with random gradients, the default per-tensor loop against
``fused=True``, best of --repeats.

Toggle (``--toggle MODULE.SWITCH``): an in-process A/B of one of ssmdiff's module-level on/off switches (such as
``ssmdiff.models.dis.SKIP_DROPPED_SAMPLES`` or ``ssmdiff.ssm.modules.mamba.FUSED_DIRECTION``). Steps alternate
between the two settings (on/off, then off/on), each pair from the same seed, so both see the same random draws
(stochastic depth, label dropout); it prints each setting's median, mean and fastest step and the ratios off / on
(above 1: the switch on is faster), instead of the op breakdown.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import statistics
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
        if name.rstrip("_") in _PRODUCTS:  # in-place forms too (baddbmm_)
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            name += " " + " x ".join(str(tuple(a.shape)) for a in tensors) + " " + str(tensors[-1].dtype)[6:]
        entry = self.times[name]
        entry[0] += 1
        entry[1] += dt
        return out


def step_breakdown(name: str, tokens: int, batch: int, dtype: str, warmup: int = 2, num_classes: int = 1000,
                   overrides: dict | None = None, phase: str = "train"):
    """(plain step seconds, step seconds under the op timer, {op: (calls, seconds)}); ``phase="sample"``: one
    sampling forward instead of a training step."""
    step, _ = cpu_training_step(name, tokens, dtype, batch=batch, num_classes=num_classes, overrides=overrides,
                                phase=phase)
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


def resolve_switch(spec: str):
    """``"package.module.NAME"`` -> (module, NAME) for a module-level bool; ValueError with the reason otherwise."""
    module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"--toggle takes MODULE.SWITCH, e.g. ssmdiff.models.dis.SKIP_DROPPED_SAMPLES; got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--toggle {spec}: cannot import {module_name}: {e}") from None
    if not isinstance(getattr(module, attr, None), bool):
        raise ValueError(f"--toggle {spec}: {module_name} has no on/off switch {attr}")
    return module, attr


def toggle_steps(name: str, tokens: int, batch: int, dtype: str, switch: str, steps: int = 6, warmup: int = 1,
                 num_classes: int = 1000, overrides: dict | None = None) -> dict:
    """{True: [step seconds], False: [...]}: training steps alternating the module-level switch ``switch`` (on/off,
    then off/on), the two steps of a pair from one seed. The switch is restored afterwards."""
    module, attr = resolve_switch(switch)
    before = getattr(module, attr)
    step, _ = cpu_training_step(name, tokens, dtype, batch=batch, num_classes=num_classes, overrides=overrides)
    times = {True: [], False: []}
    try:
        for i in range(-warmup, steps):
            for value in ((True, False) if i % 2 == 0 else (False, True)):
                setattr(module, attr, value)
                torch.manual_seed(1000 + i)
                t0 = time.perf_counter()
                step()
                if i >= 0:
                    times[value].append(time.perf_counter() - t0)
    finally:
        setattr(module, attr, before)
    return times


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
    p.add_argument("--toggle", metavar="MODULE.SWITCH", default=None,
                   help="instead of the breakdown, alternate steps with this module-level switch on and off, e.g. "
                   "ssmdiff.models.dis.SKIP_DROPPED_SAMPLES or ssmdiff.ssm.modules.mamba.FUSED_DIRECTION")
    p.add_argument("--steps", type=int, default=6, help="with --toggle: timed steps per setting")
    p.add_argument("--sample", action="store_true",
                   help="break down one sampling forward (eval, inference mode) instead of a training step")
    args = p.parse_args(argv)
    if args.sample and args.toggle is not None:
        p.error("--toggle times training steps; it does not combine with --sample")
    if (args.tokens <= 0 or args.top <= 0 or args.repeats <= 0 or args.steps <= 0
            or (args.batch is not None and args.batch <= 0)):
        p.error("--tokens, --batch, --top, --repeats and --steps must be positive")
    try:
        name, overrides = parse_model_spec(args.model)
        input_size_for(name, args.tokens)
        if args.toggle is not None:
            resolve_switch(args.toggle)
    except ValueError as e:
        p.error(str(e))
    tune_cpu_allocator()
    batch = args.batch or default_batch(args.tokens)
    if args.toggle is not None:
        times = toggle_steps(name, args.tokens, batch, args.dtype, args.toggle, args.steps, overrides=overrides)
        print(f"{args.model}, {args.tokens} tokens, batch {batch}, {args.dtype}: {args.steps} training steps per "
              f"setting of {args.toggle}, alternated")
        stats = {}
        for value in (True, False):
            ts = times[value]
            stats[value] = (statistics.median(ts), statistics.mean(ts), min(ts))
            print(f"  {'on ' if value else 'off'}  median {stats[value][0]:.3f} s  mean {stats[value][1]:.3f} s  "
                  f"fastest {stats[value][2]:.3f} s  ({' '.join(f'{t:.3f}' for t in ts)})")
        on, off = stats[True], stats[False]
        print(f"  off / on: median {off[0] / on[0]:.4f}  mean {off[1] / on[1]:.4f}  fastest {off[2] / on[2]:.4f}"
              " (above 1: faster with the switch on)")
        return 0
    phase = "sample" if args.sample else "train"
    plain, timed, ops = step_breakdown(name, args.tokens, batch, args.dtype, overrides=overrides, phase=phase)
    print(f"{args.model}, {args.tokens} tokens, batch {batch}, {args.dtype}: "
          f"{'sampling forward' if args.sample else 'training step'} {plain:.2f} s "
          f"({timed:.2f} s under the op timer, {sum(s for _, s in ops.values()):.2f} s inside ops)")
    print(f"  {'seconds':>8} {'share':>6} {'calls':>6}  op")
    for op, (calls, s) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"  {s:8.3f} {100 * s / plain:5.1f}% {calls:6d}  {op}")
    if args.sample:
        return 0
    o = optimizer_step_ms(name, args.tokens, args.repeats, overrides)
    print(f"AdamW over {o['tensors']} parameter tensors: per-tensor loop {o['loop']:.1f} ms, fused {o['fused']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
