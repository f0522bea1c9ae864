"""Layout of the Mamba mixers' products on the CPU: batched products that write channel-major directly against one
GEMM over all tokens followed by the compiled transpose (``channel_major``), in the same run.

    python benchmarks/layout.py                 # in_proj of DiS-S/2, DiS-B/2 and DiM-S/2 at 1024 tokens, batch 4
    python benchmarks/layout.py --threads 1

For each mixer shape (batch, length, model width -> 2 x inner width), float32, best of --repeats wall milliseconds,
with the caches flushed before every call:
  transpose   (batch, length, E) -> (batch, E, length): ``.transpose(1, 2).contiguous()`` against the kernel's tiled
              transpose, with the bandwidth each reaches (bytes read + written);
  in_proj     u and z channel-major from x (batch, length, D): two ``bmm`` with a transposed-view operand (the
              previous form) against one ``F.linear`` over all tokens + ``channel_major`` (what ``Mamba`` does now).
The speed-up column is old / new.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ssmdiff.ssm.ops import _scan_cpu
from ssmdiff.ssm.ops._scan_cpu import channel_major

# (name, model width D, inner width E, tokens per image incl. the models' extra tokens)
SHAPES = [("DiS-S/2", 368, 736, 1026), ("DiS-B/2", 768, 1536, 1026), ("DiM-S/2", 512, 1024, 1230)]


_EVICT = None


def best_ms(fn, repeats: int) -> float:
    """Best wall milliseconds of fn, each call after writing over a buffer larger than the last-level cache, so the
    operands come from memory as a model's activations do (warm, the batched form looks 1.5-2x faster than it is
    inside a model)."""
    global _EVICT
    if _EVICT is None:
        _EVICT = torch.empty(128 * 2**20 // 4)
    fn()
    times = []
    for _ in range(repeats):
        _EVICT.fill_(1.0)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    if not _scan_cpu.available():
        print("the compiled CPU kernels are unavailable here; nothing to compare", flush=True)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B = args.batch
    print(f"float32, batch {B}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'shape':<10}{'what':<12}{'old ms':>9}{'new ms':>9}{'speed-up':>10}   notes")
    for name, D, E, L in SHAPES:
        x = torch.randn(B, L, D)
        w = torch.randn(2 * E, D)
        y = torch.randn(B, L, E)
        gbytes = 2 * y.numel() * 4 / 1e9
        old = best_ms(lambda: y.transpose(1, 2).contiguous(), args.repeats)
        new = best_ms(lambda: channel_major(y, [E]), args.repeats)
        print(f"{name:<10}{'transpose':<12}{old:9.2f}{new:9.2f}{old / new:9.2f}x   "
              f"{gbytes / old * 1e3:.1f} against {gbytes / new * 1e3:.1f} GB/s")
        xt = x.transpose(1, 2)
        wu, wz = w[:E], w[E:]
        old = best_ms(lambda: (torch.bmm(wu.expand(B, -1, -1), xt), torch.bmm(wz.expand(B, -1, -1), xt)),
                      args.repeats)
        new = best_ms(lambda: channel_major(F.linear(x, w), [E, E]), args.repeats)
        gflop = 2 * B * L * D * 2 * E / 1e9
        print(f"{name:<10}{'in_proj':<12}{old:9.2f}{new:9.2f}{old / new:9.2f}x   "
              f"{gflop / old * 1e3:.0f} against {gflop / new * 1e3:.0f} GFLOP/s, transpose included")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
