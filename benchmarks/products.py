"""bf16 matrix products on the CPU: torch.bmm as the Mamba projections and nn.Linear's backward would call it,
against ``dot_layout_bmm`` (both operands copied contiguous along the summed dimension first), in the same run.

    python benchmarks/products.py               # DiS-S/2's shapes at 1024 tokens, batch 4
    python benchmarks/products.py --dtype fp32  # the same products in fp32, for scale

Each line: the product, its operand layouts, the best of --repeats wall milliseconds for plain bmm and for the dot
layout (copies included), and their ratio. On a CPU without native bf16 (no AVX512-BF16/AMX) only the dot layout
takes PyTorch's fast bf16 path; ``ssmdiff.ssm.ops.products`` uses it there.
"""

from __future__ import annotations

import argparse
import time

import torch

from ssmdiff.ssm.ops.products import dot_layout_bmm


def _best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def cases(batch: int, d: int, length: int, dtype: torch.dtype):
    """(name, a, b) for a @ b as the DiS mixer and its Linear layers multiply, at width d, length tokens."""
    g = torch.Generator().manual_seed(0)
    e, r = 2 * d, -(-d // 16)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x_pos = rand(batch, length, d)  # position-major block input
    y_cm = rand(batch, e, length)  # channel-major scan output / conv output
    w_in, w_out, w_x = rand(e, d), rand(d, e), rand(r + 32, e)
    # A Linear d -> e as ``products.linear`` calls it: the batch merged into the rows.
    x2, g2 = x_pos.reshape(1, -1, d), rand(1, batch * length, e)
    return [
        ("in_proj: W @ x^T (x position-major)", w_in.expand(batch, -1, -1), x_pos.transpose(1, 2)),
        ("x_proj: W @ y (y channel-major)", w_x.expand(batch, -1, -1), y_cm),
        ("out_proj: y^T @ W^T (y channel-major)", y_cm.transpose(1, 2), w_out.t().expand(batch, -1, -1)),
        ("Linear forward: x @ W^T", x2, w_in.t().unsqueeze(0)),
        ("Linear backward: grad @ W", g2, w_in.unsqueeze(0)),
        ("Linear backward: grad^T @ x", g2.transpose(1, 2), x2),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=int, default=368, help="model width (DiS-S/2: 368)")
    p.add_argument("--length", type=int, default=1026)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if min(args.batch, args.width, args.length, args.repeats) < 1:
        p.error("--batch, --width, --length and --repeats must be positive")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"{args.dtype} products, batch {args.batch}, width {args.width}, length {args.length}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'product':<40} {'bmm ms':>9} {'dot ms':>9} {'bmm/dot':>8}")
    for name, a, b in cases(args.batch, args.width, args.length, dtype):
        plain = _best_ms(lambda: torch.bmm(a, b), args.repeats)
        dot = _best_ms(lambda: dot_layout_bmm(a, b), args.repeats)
        print(f"{name:<40} {plain:>9.1f} {dot:>9.1f} {plain / dot:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
