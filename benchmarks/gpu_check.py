"""Issue 6's GPU checks in one run, sized for a short loan of a GPU machine (the project's `device` tool lends one
to some sessions for 15 minutes in all, machine start included).

    python benchmarks/gpu_check.py --fetch-wheels .whl      # here, with network: wheels the GPU image lacks
    python benchmarks/gpu_check.py --out "$OUT"             # there (see "On the device machine" below)

Stages, in this order (the bar first), each under its own time limit so that the whole run stays inside one
command's limit with time left for a rerun; a stage that fails or runs out of time is recorded and the next one still
runs, and gpu_check.json is rewritten after each:
  env      torch and CUDA versions, the GPU, whether mamba-ssm, causal-conv1d and Triton import, and the
           selective-scan backend ``resolve_backend`` picks on the GPU ("cuda": mamba-ssm's kernels; "triton": the
           Triton kernels, once they pass their self-check; "torch": the PyTorch form).
  dim-h    DiM-H/2 and DiT-XL/2 at 256 tokens (256 px images, 32 x 32 x 4 latents), batch 64, fp32 (PyTorch's
           default: no TF32 in matrix products) and bf16: ``ssmdiff bench``'s training and sampling images/s. The
           bar: DiM-H/2 samples faster than the third-party 25.1 img/s (A100, fp32, batch 64; DiT-XL/2 76.9) of
           REFERENCE.md. One sampling step here is one forward pass of the batch, as in that figure. Where the
           training step does not fit at that batch, ``ssmdiff bench`` measures sampling alone (a "partial" row),
           which is all the bar needs.
  scan     the selective scan alone at DiM-H/2's shape at 256 px (batch 64, 3072 channels, 309 steps, state 16):
           forward and forward+backward milliseconds of every backend present, and each one's largest relative
           difference from the PyTorch scan; with Triton, the same for a few tilings of its kernels
           (``TRITON_TILINGS``), chosen without a GPU.
  tests    the tests marked ``cuda`` (``pytest -m cuda``), which skip on machines without a GPU.
  grid     the S pairs (DiS-S/2, DiM-S/2, DiffuSSM-S against DiT-S/2) at 1024 and 4096 tokens in bf16.
It prints a summary and writes gpu_check.json (and each benchmark's models.json / models.png) under --out.

On the device machine: its image has PyTorch with CUDA but neither diffusers (an ssmdiff dependency) nor mamba-ssm,
and it reaches no package index. Fetch the pure-Python wheels here first (--fetch-wheels; the folder must be
ignored by git, e.g. listed in .git/info/exclude), carry that folder, and start the command with
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD``.
mamba-ssm ships as source and compiles for many minutes, longer than a loan allows; without it the GPU path runs
the Triton kernels where PyTorch brought Triton, else the PyTorch scan (the env stage says which).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# What the GPU image lacks that ssmdiff imports: diffusers and the backport it requires on every Python.
WHEELS = ("diffusers", "importlib_metadata", "zipp")
THIRD_PARTY_DIM_H_IPS = 25.1  # REFERENCE.md: DiM-H at 256 px, A100, fp32, batch 64
STAGES = ("env", "dim-h", "scan", "tests", "grid")
# (BT, BD_FWD, BD_BWD, NUM_WARPS) of ssmdiff/ssm/ops/_scan_triton.py timed by the scan stage; the first is the default.
# Compiled for sm_90 here without a GPU (``_scan_triton.compile_report``): (16, 16, 8, 8) spills 8 bytes in the
# forward and (16, 32, 16, 8) 8 in the backward, the others nothing.
TRITON_TILINGS = ((16, 16, 8, 4), (16, 8, 4, 4), (16, 16, 4, 4), (16, 16, 8, 8), (32, 8, 4, 4), (16, 32, 16, 8))


def fetch_wheels(folder: Path) -> int:
    """Download the wheels of WHEELS (this environment's versions where installed) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    versions = {name: _version(name) for name in WHEELS}
    specs = [f"{name}=={version}" if version else name for name, version in versions.items()]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder), *specs]
    print(" ".join(cmd))
    return subprocess.call(cmd)


def stage_env(device: str) -> dict:
    import importlib.util

    import torch

    from ssmdiff.ssm.ops.selective_scan import resolve_backend

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "mamba_ssm": importlib.util.find_spec("mamba_ssm") is not None,
            "causal_conv1d": importlib.util.find_spec("causal_conv1d") is not None,
            "triton": _version("triton"),
            "scan_backend": resolve_backend(torch.device(device)), "python": sys.version.split()[0]}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


def _version(name: str):
    """The installed version of distribution ``name``, or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def stage_scan(device: str, quick: bool) -> dict:
    """Milliseconds (fastest of a few) of one selective scan, forward alone and forward+backward, per backend."""
    import torch

    from ssmdiff.bench import _time_phase
    from ssmdiff.ssm.ops import _scan_triton
    from ssmdiff.ssm.ops.selective_scan import _mamba_ssm_fn, selective_scan

    dev = torch.device(device)
    b, d, L, n = (1, 16, 40, 16) if quick else (64, 3072, 309, 16)
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dev)

    x = dict(u=r(b, d, L), delta=r(b, d, L, scale=0.5, shift=-1.0), A=-torch.rand(d, n, generator=g).to(dev) - 0.5,
             B=r(b, n, L), C=r(b, n, L), D=r(d), z=r(b, d, L), delta_bias=r(d, scale=0.3))
    backends = (["torch"] + (["triton"] if _scan_triton.available(dev) else [])
                + (["cuda"] if dev.type == "cuda" and _mamba_ssm_fn() is not None else []))

    def best_ms(fn):  # one warm-up call (compiles the kernels), then the fastest of a few
        return round(1e3 * min(_time_phase(fn, dev, 1, 3 if quick else 5, budget_s=120.0)["times_s"]), 3)

    def forward(backend, grad=False):
        ins = {k: v.detach().requires_grad_(grad and k != "A") for k, v in x.items()}
        args = [ins[k] for k in ("u", "delta", "A", "B", "C")]
        out = selective_scan(*args, D=ins["D"], z=ins["z"], delta_bias=ins["delta_bias"], delta_softplus=True,
                             backend=backend)
        if grad:
            out.backward(torch.ones_like(out))
        return out

    with torch.no_grad():
        ref = forward("torch").float()

    def measure(backend):
        with torch.no_grad():
            diff = ((forward(backend).float() - ref).abs().max() / ref.abs().max()).item()
            entry = {"max_rel_diff_vs_torch": diff, "forward_ms": best_ms(lambda: forward(backend))}
        entry["forward_backward_ms"] = best_ms(lambda: forward(backend, grad=True))
        return entry

    result = {"shape": {"batch": b, "channels": d, "length": L, "state": n},
              "backends": {backend: measure(backend) for backend in backends}}
    if "triton" in backends and not quick:
        # The Triton kernels' tiling is a guess made without a GPU: time the alternatives here too.
        defaults = (_scan_triton.BT, _scan_triton.BD_FWD, _scan_triton.BD_BWD, _scan_triton.NUM_WARPS)
        result["triton_tilings"] = {}
        try:
            for tiling in TRITON_TILINGS:
                _scan_triton.BT, _scan_triton.BD_FWD, _scan_triton.BD_BWD, _scan_triton.NUM_WARPS = tiling
                key = "BT={} BD_FWD={} BD_BWD={} NUM_WARPS={}".format(*tiling)
                try:
                    entry = measure("triton")
                except Exception as e:  # e.g. out of registers or shared memory for this tiling
                    entry = {"failed": f"{type(e).__name__}: {e}"[:300]}
                result["triton_tilings"][key] = entry
        finally:
            _scan_triton.BT, _scan_triton.BD_FWD, _scan_triton.BD_BWD, _scan_triton.NUM_WARPS = defaults
    return result


def stage_tests(timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else "", "tail": lines[-30:]}


def _bench(models, tokens, dtypes, batch, device, quick: bool, budget_s, out: Path) -> dict:
    """``ssmdiff bench`` with these settings, writing models.json / models.png under ``out``; its result."""
    from ssmdiff.bench import main as bench_main

    argv = ["--device", device, "--models", *models, "--tokens", *map(str, tokens), "--dtype", *dtypes,
            "--repeats", "1" if quick else "5", "--budget", str(budget_s), "--out", str(out)]
    if batch is not None:
        argv += ["--batch", str(batch)]
    if quick:  # in this process (no subprocess per configuration), a short matmul loop, 10 classes
        argv += ["--no-isolate", "--matmul-seconds", "0.1", "--num-classes", "10"]
    if bench_main(argv) != 0:
        raise RuntimeError(f"ssmdiff bench {' '.join(argv)} failed")
    return json.loads((out / "models.json").read_text())


def stage_dim_h(device: str, out: Path, quick: bool) -> dict:
    models, tokens, batch = (["DiT-T/2", "DiM-T/2"], [16], 2) if quick else (["DiT-XL/2", "DiM-H/2"], [256], 64)
    from ssmdiff.bench import MEASURED

    result = _bench(models, tokens, ["fp32", "bf16"], batch, device, quick, 10 if quick else 60, out / "dim_h")
    # MEASURED includes "partial": training did not fit (DiM-H/2 trains 862M parameters at batch 64), sampling
    # measured alone
    rows = [r for r in result["rows"] if r.get("status") in MEASURED]
    summary = {f"{r['model']} {r['dtype']}": {"sample_ips": r["sample_ips"], "train_ips": r["train_ips"],
                                              "sample_peak_mb": r.get("sample_peak_mb")} for r in rows}
    dim = [r for r in rows if r["family"] == "DiM" and r["dtype"] == "fp32"]
    bar = {"model": models[1], "batch": batch, "tokens": tokens[0], "third_party_ips": THIRD_PARTY_DIM_H_IPS}
    if dim:
        ips = dim[0]["sample_ips"]
        bar.update(fp32_sample_ips=ips, ratio=ips / THIRD_PARTY_DIM_H_IPS, met=ips > THIRD_PARTY_DIM_H_IPS)
    else:
        bar.update(fp32_sample_ips=None, met=False)
    return {"rows": summary, "bar": bar,
            "not_ok": [f"{r['model']} {r['dtype']}: {r['status']}: {r.get('reason')}" for r in result["rows"]
                       if r.get("status") != "ok"]}


def stage_grid(device: str, out: Path, quick: bool) -> dict:
    models, tokens = (["DiS-T/2"], [16, 64]) if quick else (["DiS-S/2", "DiM-S/2", "DiffuSSM-S"], [1024, 4096])
    result = _bench(models, tokens, ["bf16"], None, device, quick, 10 if quick else 30, out / "grid")
    return {"bars": result["bars"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu_check.json and the plots")
    p.add_argument("--device", default="cuda", help="the device to check (cpu only makes sense with --quick)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--quick", action="store_true", help="tiny models and sizes: a dry run of the stages")
    p.add_argument("--tests-timeout", type=float, default=150.0, help="seconds for the tests stage")
    p.add_argument("--fetch-wheels", type=Path, metavar="DIR",
                   help=f"download the wheels the GPU image lacks ({', '.join(WHEELS)}) into DIR and stop")
    args = p.parse_args(argv)
    if args.fetch_wheels is not None:
        return fetch_wheels(args.fetch_wheels)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here; the check is for a GPU machine "
              "(--device cpu --quick dry-runs it)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": args.device, "quick": args.quick, "stages": {}}

    def progress(msg):
        print(msg, flush=True)

    runners = {
        "env": lambda: stage_env(args.device),
        "tests": lambda: stage_tests(args.tests_timeout),
        "scan": lambda: stage_scan(args.device, args.quick),
        "dim-h": lambda: stage_dim_h(args.device, args.out, args.quick),
        "grid": lambda: stage_grid(args.device, args.out, args.quick),
    }
    for name in args.stages:
        progress(f"== {name}")
        t0 = time.perf_counter()
        try:
            entry = {"status": "ok", "result": runners[name]()}
        except subprocess.TimeoutExpired as e:
            entry = {"status": "timeout", "reason": f"over {e.timeout:.0f} s"}
        except Exception as e:  # keep going: a later stage may still say something useful
            entry = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["stages"][name] = entry
        progress(json.dumps(entry, indent=1, default=str)[:4000])
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    bar = report["stages"].get("dim-h", {}).get("result", {}) or {}
    b = bar.get("bar")
    if b and b["fp32_sample_ips"] is None:
        progress(f"DiM-H bar: {b['model']} was not measured in fp32 ({'; '.join(bar.get('not_ok', []))})")
    elif b:
        progress(f"DiM-H bar: {b['model']} samples {b['fp32_sample_ips']:.1f} img/s in fp32 at {b['tokens']} tokens, "
                 f"batch {b['batch']}, against {b['third_party_ips']} img/s (DiM-H, 256 tokens, batch 64, A100): "
                 f"{'met' if b['met'] else 'NOT met'} ({b['ratio']:.2f}x)")
    progress(f"wrote {args.out / 'gpu_check.json'}")
    return 0 if all(s["status"] == "ok" for s in report["stages"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
