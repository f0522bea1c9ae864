"""Mamba-2's SSD on the CPU: the compiled recurrence (``_scan_cpu.ssd_scan_cpu``, what ``ssd()`` takes on CPU)
against the chunked matrix form in PyTorch (``ssd_chunked``), in the same run.

    python benchmarks/ssd.py                 # DiS-S/2:mixer=mamba2's shapes at 1024 tokens, batch 4
    python benchmarks/ssd.py --threads 1     # one thread (the most stable figures on a shared machine)

Each line: the implementation, the best of --repeats wall milliseconds for the forward (no grad) and for
forward + backward, nanoseconds per (channel, position) of the forward, and the speed-up of the compiled path.
"""

from __future__ import annotations

import argparse

import torch

from ssmdiff.bench import _time_phase
from ssmdiff.ssm.ops import _scan_cpu
from ssmdiff.ssm.ops.ssd import ssd_chunked


def inputs(batch: int, length: int, heads: int, headdim: int, groups: int, state: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, heads, headdim, generator=g)
    dt = torch.randn(batch, length, heads, generator=g)
    A = -torch.rand(heads, generator=g) * 15 - 1  # Mamba-2's A_init_range (1, 16)
    B = torch.randn(batch, length, groups, state, generator=g)
    C = torch.randn(batch, length, groups, state, generator=g)
    D = torch.ones(heads)
    dt_bias = torch.randn(heads, generator=g) * 0.5 - 4  # softplus of it: about Mamba-2's initial dt
    return [t.requires_grad_(True) for t in (x, dt, A, B, C, D, dt_bias)]


def time_impl(fn, tensors, repeats: int) -> tuple[float, float]:
    """Best forward and forward + backward wall seconds."""
    x, dt, A, B, C, D, dt_bias = tensors

    def run():
        return fn(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True)

    def forward():
        with torch.no_grad():
            run()

    def forward_backward():
        y = run()
        torch.autograd.grad(y, tensors, torch.ones_like(y))

    best = [min(_time_phase(f, torch.device("cpu"), 1, repeats, float("inf"))["times_s"])
            for f in (forward, forward_backward)]
    return best[0], best[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=1026, help="positions (DiS-S/2 at 1024 image tokens: 1026)")
    p.add_argument("--heads", type=int, default=23)
    p.add_argument("--headdim", type=int, default=32)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--state", type=int, default=64, choices=_scan_cpu.SSD_STATES)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    args = p.parse_args(argv)
    for name in ("batch", "length", "heads", "headdim", "groups", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.heads % args.groups:
        p.error("--heads must be divisible by --groups")
    if not _scan_cpu.available():
        print("the compiled CPU kernel is unavailable here; nothing to compare", flush=True)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    tensors = inputs(args.batch, args.length, args.heads, args.headdim, args.groups, args.state)
    print(f"SSD, batch {args.batch}, length {args.length}, {args.heads} heads x {args.headdim}, groups {args.groups}, "
          f"state {args.state}, {torch.get_num_threads()} threads (best of {args.repeats})")
    print(f"{'implementation':<16}{'forward ms':>12}{'fwd+bwd ms':>12}{'ns/chan-pos':>13}{'x fwd':>8}{'x fwd+bwd':>11}")
    rows = {name: time_impl(fn, tensors, args.repeats)
            for name, fn in (("chunked", ssd_chunked), ("compiled", _scan_cpu.ssd_scan_cpu))}
    per = args.batch * args.length * args.heads * args.headdim
    for name, (fwd, fb) in rows.items():
        base = rows["chunked"]
        print(f"{name:<16}{fwd * 1e3:>12.1f}{fb * 1e3:>12.1f}{fwd * 1e9 / per:>13.2f}{base[0] / fwd:>8.2f}"
              f"{base[1] / fb:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
