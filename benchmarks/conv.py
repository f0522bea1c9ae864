"""Depthwise causal conv1d benchmark: the shifted-multiply-add version against F.conv1d, in the same run, and the
compiled conv + SiLU kernel the CPU mixers use against the unfused composition.

    python benchmarks/conv.py                  # the two mixer shapes, fp32 and bf16
    python benchmarks/conv.py --step           # plus one DiS-S/2 fp32 training step (batch 2, 1024 tokens)

Prints wall milliseconds (median of --repeats) and CPU milliseconds (time.process_time, all threads; the machine
may be shared, so CPU time is the steadier figure) for forward and forward+backward of each implementation.
Inputs are (batch, length, channels) tensors viewed as (batch, channels, length), the layout the mixers pass.
The training step swaps the mixers' conv for the F.conv1d version to give "old" figures from the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ssmdiff.ssm.modules import conv as conv_mod
from ssmdiff.ssm.modules import mamba as mamba_mod
from ssmdiff.ssm.modules import mamba2 as mamba2_mod

IMPLS = {"old (F.conv1d)": conv_mod.depthwise_conv1d_reference, "new (shifted MACs)": conv_mod.depthwise_conv1d}


def _time(fn, repeats: int):
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


_HEADER = (f"{'shape (B,C,L)':>18} {'dtype':>9} {'impl':>20} {'fwd ms':>9} {'fwd cpu':>9} {'f+b ms':>9} "
           f"{'f+b cpu':>9}")


def _report(shape, dtype, name: str, fwd, fwd_bwd, repeats: int) -> None:
    """Time fwd and fwd_bwd and print one row under _HEADER."""
    f, fc = _time(fwd, repeats)
    fb, fbc = _time(fwd_bwd, repeats)
    print(f"{str(tuple(shape)):>18} {str(dtype).replace('torch.', ''):>9} {name:>20} "
          f"{f:9.2f} {fc:9.2f} {fb:9.2f} {fbc:9.2f}", flush=True)


def bench_conv(shapes, dtypes, k: int, repeats: int):
    print(_HEADER)
    for B, C, L in shapes:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(B, L, C, generator=g).to(dtype).transpose(1, 2).requires_grad_()
            w = torch.randn(C, 1, k, generator=g).to(dtype).requires_grad_()
            b = torch.randn(C, generator=g).to(dtype).requires_grad_()
            grad = torch.randn(B, C, L, generator=g).to(dtype)
            for name, fn in IMPLS.items():
                def fwd():
                    with torch.no_grad():
                        fn(x, w, b)

                def fwd_bwd():
                    torch.autograd.grad(fn(x, w, b), (x, w, b), grad)

                _report((B, C, L), dtype, name, fwd, fwd_bwd, repeats)


def bench_conv_silu(shapes, dtypes, k: int, repeats: int):
    """Both directions of a bidirectional block (a causal and an anti-causal conv reading one x), SiLU applied:
    the compiled kernel (one pass over x, SiLU fused, dx summed inside) against silu(depthwise_conv1d) per
    direction. Under bf16 autocast, as the mixers run it."""
    from ssmdiff.ssm.modules.conv import conv_silu
    from ssmdiff.ssm.ops import _scan_cpu

    if not _scan_cpu.available():
        print("\nconv + SiLU: the compiled CPU kernel is unavailable here; skipped")
        return
    impls = {"unfused": lambda x, convs: tuple(torch.nn.functional.silu(conv_mod.depthwise_conv1d(x, w, b, r))
                                                for w, b, r in convs),
             "conv_silu kernel": conv_silu}
    print(f"\nconv + SiLU, two directions sharing x\n{_HEADER}")
    for B, C, L in shapes:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(B, C, L, generator=g).requires_grad_()
            convs = [(torch.randn(C, 1, k, generator=g).requires_grad_(), torch.randn(C, generator=g).requires_grad_(),
                      rev) for rev in (False, True)]
            grads = [torch.randn(B, C, L, generator=g).to(dtype) for _ in convs]
            leaves = [x] + [p for w, b, _ in convs for p in (w, b)]
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
            for name, fn in impls.items():
                def fwd():
                    with torch.no_grad(), autocast:
                        fn(x, convs)

                def fwd_bwd():
                    with autocast:
                        outs = fn(x, convs)
                    torch.autograd.grad(outs, leaves, [gr.to(o.dtype) for gr, o in zip(grads, outs)])

                _report((B, C, L), dtype, name, fwd, fwd_bwd, repeats)


def bench_step(repeats: int):
    from ssmdiff.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("DiS-S/2", input_size=64, in_channels=4, num_classes=0)  # 32x32 = 1024 patch tokens
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(2, 4, 64, 64)
    t = torch.randint(0, 1000, (2,)).float()

    def step():
        out = model(x, t, None)
        loss = out.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    print(f"\nDiS-S/2 fp32 training step, batch 2, 1024 tokens ({torch.get_num_threads()} threads)")
    original = mamba_mod.depthwise_conv1d, mamba2_mod.depthwise_conv1d
    try:
        for name, fn in IMPLS.items():
            mamba_mod.depthwise_conv1d = mamba2_mod.depthwise_conv1d = fn
            wall, cpu = _time(step, repeats)
            print(f"{name:>20}: {wall:9.1f} ms wall  {cpu:9.1f} ms CPU", flush=True)
    finally:
        mamba_mod.depthwise_conv1d, mamba2_mod.depthwise_conv1d = original


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--step", action="store_true", help="also time one DiS-S/2 fp32 training step, old vs new")
    p.add_argument("--step-repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.k < 1:
        raise SystemExit("--k must be >= 1")
    from ssmdiff.utils.alloc import tune_cpu_allocator

    tune_cpu_allocator()  # as training runs: fresh outputs would otherwise page-fault in on every call
    bench_conv([(4, 736, 1026), (64, 128, 20)], [torch.float32, torch.bfloat16], args.k, args.repeats)
    bench_conv_silu([(4, 736, 1026)], [torch.float32, torch.bfloat16], args.k, args.repeats)
    if args.step:
        bench_step(args.step_repeats)


if __name__ == "__main__":
    main()
