"""Selective-scan benchmark: ssmdiff's scan against mambapy's parallel scan and the sequential reference.

    python benchmarks/scan.py                      # batch 2, channels 768, state 16, lengths 256 1024 4096
    python benchmarks/scan.py --lengths 1024 --skip-ref
    python benchmarks/scan.py --lengths 1026 --batch 4 --dim 736 --dtype bf16 --skip-ref   # DiS-S/2 under autocast

For every implementation and length: forward (no grad) and forward+backward wall milliseconds (median of repeats) and
CPU milliseconds (all threads), peak memory, achieved GFLOP/s (9*B*L*D*N flops per forward, wall time) and ratios
against mambapy (wall time) measured in the same run.

Each measurement runs in a fresh subprocess. Times are taken with the allocator set as training sets it
(``ssmdiff.utils.alloc.tune_cpu_allocator``: freed buffers are reused, not page-faulted in again every call).
Peak memory comes after them, from one more call with glibc's mmap threshold pinned at 64 KiB and the heap trimmed,
so every tensor-sized buffer is mmapped and unmapped when freed and resident memory follows live memory: the
kernel's peak-RSS counter is reset (/proc/self/clear_refs) and "peak" is VmHWM minus VmRSS just before the call:
extra memory the operation needed on top of its inputs (outputs and gradients included). Not counted: inputs.

mambapy (pure PyTorch, Blelloch scan) runs in its own (batch, length, channels, state) layout, timed from the same
inputs as ours plus the work around its pscan that makes it a full selective scan: softplus(delta), exp(delta*A),
delta*B*u, the C contraction and D*u. Ours takes (batch, channels, length) and does all of that inside the kernel.
The reference runs only where its estimated time (from the previous length) stays under --ref-limit seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("ssmdiff", "mambapy", "reference")


def make_inputs(impl: str, batch: int, dim: int, length: int, state: int, grad: bool, dtype: str = "fp32"):
    """u, delta, A, B, C, D; with dtype "bf16", u, delta, B and C are bfloat16 (as bf16 autocast hands them to the
    scan in a model: the products before it run in bf16), A and D float32."""
    import torch

    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, dim, length, generator=g)
    delta = torch.randn(batch, dim, length, generator=g) * 0.5 - 2.0
    A = -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1)
    B = torch.randn(batch, state, length, generator=g)
    C = torch.randn(batch, state, length, generator=g)
    D = torch.ones(dim)
    if dtype == "bf16":
        u, delta, B, C = (t.to(torch.bfloat16) for t in (u, delta, B, C))
    if impl == "mambapy":  # its preferred layout: (batch, length, channels) and (batch, length, state)
        u, delta, B, C = (t.transpose(1, 2).contiguous() for t in (u, delta, B, C))
    tensors = [u, delta, A, B, C, D]
    for t in tensors:
        t.requires_grad_(grad)
    return tensors


def make_op(impl: str):
    import torch
    import torch.nn.functional as F

    if impl == "mambapy":
        from mambapy.pscan import pscan

        def op(u, delta, A, B, C, D):
            dt = F.softplus(delta)
            deltaA = torch.exp(dt.unsqueeze(-1) * A)                       # (b, l, d, n)
            BX = (dt * u).unsqueeze(-1) * B.unsqueeze(2)                   # (b, l, d, n)
            hs = pscan(deltaA, BX)
            return (hs @ C.unsqueeze(-1)).squeeze(-1) + D * u              # (b, l, d)
        return op
    from ssmdiff.ssm import selective_scan, selective_scan_ref

    fn = selective_scan if impl == "ssmdiff" else selective_scan_ref

    def op(u, delta, A, B, C, D):
        return fn(u, delta, A, B, C, D=D, delta_softplus=True)
    return op


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure(impl: str, mode: str, batch: int, dim: int, length: int, state: int, threads: int, repeats: int,
            budget_s: float, dtype: str = "fp32") -> dict:
    """Runs in a subprocess: times ``mode`` ("fwd" or "fwdbwd") and measures its peak extra memory."""
    import torch

    from ssmdiff.bench import _pin_malloc, _trim_heap
    from ssmdiff.utils.alloc import cpu_allocator_state, tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(threads)
    grad = mode == "fwdbwd"
    inputs = make_inputs(impl, batch, dim, length, state, grad, dtype)
    op = make_op(impl)

    def once():
        if grad:
            out = op(*inputs)
            out.sum().backward()
            for t in inputs:
                t.grad = None
        else:
            with torch.no_grad():
                op(*inputs)

    times, cpu_times = [], []
    if impl != "reference":  # warm-up: kernel load, allocator and page-table first touches
        once()
        start = time.perf_counter()
        while len(times) < repeats and (time.perf_counter() - start < budget_s or len(times) < 2):
            t0, c0 = time.perf_counter(), time.process_time()
            once()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    _pin_malloc()
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        resettable = True
    except OSError:
        resettable = impl == "reference"  # no warm-up ran, so the peak since start is still this run's
    base = _status_kb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    once()
    if impl == "reference":
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = _status_kb("VmHWM") - base if resettable else None
    # CPU time (all threads) next to wall time: on a machine shared with other jobs wall time mostly measures
    # waiting, CPU time the work done.
    return {"ms": 1e3 * statistics.median(times), "ms_all": [1e3 * t for t in times],
            "cpu_ms": 1e3 * statistics.median(cpu_times), "peak_mb": None if peak is None else peak / 1024,
            "cpu_allocator": cpu_allocator_state()}


def run_subprocess(args, impl: str, mode: str, length: int, timeout: float | None) -> dict | None:
    cmd = [sys.executable, __file__, "--_measure", impl, mode, str(length), "--batch", str(args.batch), "--dim",
           str(args.dim), "--state", str(args.state), "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--dtype", args.dtype]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {mode} L={length} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch/kernel threads (default: torch's default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype of u, delta, B and C (bf16: the kernel's bf16 row path, as in a bf16-autocast model)")
    p.add_argument("--ref-limit", type=float, default=60.0, help="seconds the reference may take per measurement")
    p.add_argument("--skip-ref", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for scan.json and scan.png")
    p.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._measure:
        impl, mode, length = args._measure
        res = measure(impl, mode, args.batch, args.dim, int(length), args.state, args.threads, args.repeats,
                      budget_s=20.0, dtype=args.dtype)
        print(json.dumps(res))
        return 0

    import torch

    args.threads = args.threads or torch.get_num_threads()
    from ssmdiff.ssm.ops.selective_scan import resolve_backend

    backend = resolve_backend(torch.device("cpu"))
    print(f"selective scan: batch {args.batch}, channels {args.dim}, state {args.state}, {args.dtype}, "
          f"{args.threads} threads, "
          f"ssmdiff backend '{backend}'; fwd = no-grad forward, fwd+bwd = forward + backward of all inputs")
    impls = list(IMPLS)
    if importlib.util.find_spec("mambapy") is None:
        impls.remove("mambapy")
        print("mambapy is not installed (pip install -e '.[bench]'): its columns and the ratios to it are left out")
    results = []
    ref_estimate = 0.0
    prev_len = None
    for length in args.lengths:
        flops = 9 * args.batch * length * args.dim * args.state
        row = {"length": length, "flops_fwd": flops}
        for impl in impls:
            if impl == "reference":
                if args.skip_ref:
                    continue
                est = ref_estimate * (length / prev_len) if prev_len else 0.0
                if est > args.ref_limit:
                    print(f"  reference at L={length}: skipped (estimated {est:.0f} s > {args.ref_limit:.0f} s)")
                    continue
            for mode in ("fwd", "fwdbwd"):
                timeout = 3 * args.ref_limit + 60 if impl == "reference" else None
                res = run_subprocess(args, impl, mode, length, timeout)
                if res is None:
                    print(f"  {impl} {mode} at L={length}: timed out")
                    continue
                row[f"{impl}_{mode}_ms"] = res["ms"]
                row[f"{impl}_{mode}_cpu_ms"] = res["cpu_ms"]
                row[f"{impl}_{mode}_peak_mb"] = res["peak_mb"]
                row["cpu_allocator"] = res["cpu_allocator"]
                if impl == "reference":
                    ref_estimate = max(ref_estimate, res["ms"] / 1e3)
        prev_len = length
        for impl in IMPLS:
            if f"{impl}_fwd_ms" in row:
                row[f"{impl}_gflops"] = flops / (row[f"{impl}_fwd_ms"] / 1e3) / 1e9
        for mode in ("fwd", "fwdbwd"):
            if f"mambapy_{mode}_ms" in row and f"ssmdiff_{mode}_ms" in row:
                row[f"speedup_vs_mambapy_{mode}"] = row[f"mambapy_{mode}_ms"] / row[f"ssmdiff_{mode}_ms"]
                a, b = row.get(f"ssmdiff_{mode}_peak_mb"), row.get(f"mambapy_{mode}_peak_mb")
                if a is not None and b:
                    row[f"memory_ratio_vs_mambapy_{mode}"] = a / b
        results.append(row)
        print_row(row)

    summary = check_bars(results)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"config": {k: getattr(args, k) for k in ("batch", "dim", "state", "threads", "repeats", "dtype")},
               "backend": backend, "command": " ".join([Path(sys.executable).name] + sys.argv),
               "torch": torch.__version__, "results": results, "bars": summary}
    (args.out / "scan.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out / 'scan.json'}")
    plot(results, args.out / "scan.png")
    return 0


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def print_row(row):
    L = row["length"]
    print(f"\nL = {L}  ({row['flops_fwd'] / 1e9:.2f} GFLOP per forward)")
    print(f"  {'impl':<10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'GFLOP/s':>8} {'peak MB fwd':>12} {'peak MB f+b':>12}"
          f" {'cpu ms fwd':>11} {'cpu ms f+b':>11}")
    for impl in IMPLS:
        if f"{impl}_fwd_ms" not in row:
            continue
        print(f"  {impl:<10} {_fmt(row.get(f'{impl}_fwd_ms')):>9} {_fmt(row.get(f'{impl}_fwdbwd_ms')):>11} "
              f"{_fmt(row.get(f'{impl}_gflops'), '.2f'):>8} {_fmt(row.get(f'{impl}_fwd_peak_mb')):>12} "
              f"{_fmt(row.get(f'{impl}_fwdbwd_peak_mb')):>12} {_fmt(row.get(f'{impl}_fwd_cpu_ms')):>11} "
              f"{_fmt(row.get(f'{impl}_fwdbwd_cpu_ms')):>11}")
    if "speedup_vs_mambapy_fwd" in row:
        print(f"  ssmdiff vs mambapy: fwd {row['speedup_vs_mambapy_fwd']:.1f}x faster, fwd+bwd "
              f"{row.get('speedup_vs_mambapy_fwdbwd', float('nan')):.1f}x faster, peak memory fwd+bwd "
              f"{_fmt(row.get('memory_ratio_vs_mambapy_fwdbwd'), '.3f')} of mambapy's")


def check_bars(results):
    """The issue's bars: at L=1024 fwd+bwd >= 8x and fwd >= 20x faster than mambapy; at L=4096 peak memory <= 1/4."""
    by_len = {r["length"]: r for r in results}
    bars = {}
    if 1024 in by_len:
        r = by_len[1024]
        bars["L1024_fwdbwd_speedup>=8"] = r.get("speedup_vs_mambapy_fwdbwd", 0) >= 8
        bars["L1024_fwd_speedup>=20"] = r.get("speedup_vs_mambapy_fwd", 0) >= 20
    if 4096 in by_len:
        r = by_len[4096]
        ratios = [r.get(f"memory_ratio_vs_mambapy_{m}") for m in ("fwd", "fwdbwd")]
        bars["L4096_peak_memory<=1/4"] = all(x is not None and x <= 0.25 for x in ratios)
    if bars:
        print("\nbars: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in bars.items()))
    return bars


def plot(results, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("fwd_ms", "fwdbwd_ms", "fwdbwd_peak_mb"),
                              ("forward (ms)", "forward + backward (ms)", "peak memory fwd+bwd (MB)")):
        for impl in IMPLS:
            pts = [(r["length"], r[f"{impl}_{key}"]) for r in results if r.get(f"{impl}_{key}") is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("length")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
