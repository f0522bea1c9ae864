"""Backbone benchmark: state-space models against DiT of matched size, measured in one run.

    python benchmarks/models.py                 # the full grid of issue 6 (long: tens of minutes on 2 cores)
    python benchmarks/models.py --quick         # smoke run: 256 tokens, batch 2, one repeat
    python benchmarks/models.py --profile       # where one bf16 training step of DiS-S/2 and DiT-S/2 goes

What is measured, for every (model, tokens, dtype) configuration (images/s from the fastest timed step, over the
repeats and ``--rounds``; the median is kept in the JSON):
  train     images/s of one optimisation step: forward, a plain MSE loss, backward, AdamW step (fused, as the
            trainer's; fp32 weights; "bf16" = the forward and backward under ``torch.autocast(dtype=torch.bfloat16)``);
  sample    images/s of one denoising forward under ``torch.inference_mode`` (same autocast);
  memory    peak memory of each, see below;
  Gflops    ``ssmdiff.models.count_flops`` per image and forward pass (DiT convention: a multiply-add is one flop;
            selective scans and S4D convolutions included);
  MFU       model-flops utilisation: 2 * Gflops (real flops) per forward, times 3 for a training step (forward +
            backward), divided by this machine's matmul rate for that dtype, measured at the start of the same
            run (a loop of 2048 x 2048 matrix products, bf16 and fp32). Scan flops are counted as model flops
            although they cannot run on the matrix units, so MFU is a fair bar for a state-space model only if
            its scans are small next to its projections (they are 10-20% of DiS's flops).
  ratios    every state-space row against its paired DiT row (same tokens, dtype and run): images/s, peak memory
            and Gflops, SSM / DiT.

Tokens: the number of image tokens the backbone mixes, (input_size / patch)^2. Patch-2 models (DiS, DiM, DiT) get
input_size = 2 * sqrt(tokens) (32, 64, 128 latent cells with 4 channels for 256, 1024, 4096 tokens); DiffuSSM has no
patchify, every latent cell is a token, so it gets input_size = sqrt(tokens) (16, 32, 64): equal sequence length,
a 4x smaller latent. Its dense layers also run on the hourglass-shortened sequence (tokens / 2). Extra tokens
(time, class, DiM's separators and padding) are not counted in "tokens"; ``mixer_len``, the longest sequence a
mixer actually saw, is recorded next to it, and the Gflops column keeps the comparison honest.

Batch: by default 4096 / tokens images, at most 16 (16, 4, 1): the same number of tokens per batch at every size.

Allocator, CPU: each configuration runs in a fresh subprocess, timed with the allocator settings ``ssmdiff train``
and ``sample`` use (``ssmdiff.utils.alloc.tune_cpu_allocator``: large freed buffers stay in the heap for reuse
instead of being unmapped and page-faulted in again; ``SSMDIFF_MALLOC=default`` measures glibc's defaults). Each
row records which one it ran with (``cpu_allocator``). In-process runs (``isolate=False``) keep the default.

Peak memory, CPU: after the timing, glibc's mmap threshold is pinned at 64 KiB and the free heap is trimmed (``mallopt`` / ``malloc_trim``), so every
tensor-sized buffer is mmapped and unmapped when freed and resident memory follows live memory; before each
measured block the heap is trimmed again, the kernel's peak-RSS counter is reset (/proc/self/clear_refs) and one
more step runs (a training step, then a sampling forward). ``*_extra_mb`` is VmHWM minus VmRSS just
before that step (activations, gradients and temporaries); ``*_peak_mb`` is VmHWM minus the process's RSS before
the model was built (weights and AdamW state included). Where a model's batch changes with tokens, a memory
probe (one more training step, memory only) measures it at the smallest batch too, so that memory is compared
across token counts at one batch size. CUDA: ``torch.cuda.max_memory_allocated`` in the same two
flavours. Without subprocesses (``isolate=False``, used by the tests) the same counters are read in-process.

Out of time: every phase gets ``budget_s`` seconds of timed repeats (at least one after the warm-up); a
configuration whose time estimated from the previous size exceeds its budget, or whose subprocess overruns it,
is kept as a row with ``status="skipped"`` and the reason.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_TOKENS",
    "parse_model_spec",
    "baseline_for",
    "input_size_for",
    "default_batch",
    "measure_matmul_rate",
    "run_model_benchmark",
    "compute_ratios",
    "check_bars",
    "format_table",
    "plot_results",
    "profile_training_step",
    "main",
]

# The issue's pairs: DiS-S/2, DiM-S/2, DiffuSSM-S against DiT-S/2; DiS-B/2 against DiT-B/2.
DEFAULT_MODELS = ("DiT-S/2", "DiS-S/2", "DiM-S/2", "DiffuSSM-S", "DiT-B/2", "DiS-B/2")
DEFAULT_TOKENS = (256, 1024, 4096)
DTYPES = ("fp32", "bf16")
PHASES = ("train", "sample")
# Row statuses: "ok" (both phases measured), "partial" (the training step failed, sampling measured alone; "reason"
# says why), "failed" and "skipped" (nothing measured).
MEASURED = ("ok", "partial")
MEMORY_FIELDS = ("train_extra_mb", "train_peak_mb", "sample_extra_mb", "sample_peak_mb")
TOKENS_PER_BATCH = 4096
MAX_BATCH = 16
DEFAULT_BUDGET_S = 120.0



# ----------------------------------------------------------------------------------------------- configuration

def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"DiS-S/2"`` or ``"DiS-S/2:mixer=mamba2,d_state=32"`` -> (name, overrides for ``create_model``).

    One key is a run option rather than a constructor argument: ``compile=true`` runs that configuration through
    torch.compile (see ``constructor_overrides``).

    Values are read as JSON where they parse (numbers, true/false) and kept as strings otherwise.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a name such as 'DiS-S/2' (optionally ':key=value,...'), got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    overrides = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"bad override {item!r} in {spec!r}: write key=value, e.g. 'DiS-S/2:mixer=mamba2'")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


RUN_OPTIONS = ("compile",)


def format_model_spec(name: str, overrides: dict) -> str:
    """The inverse of ``parse_model_spec``: ``"DiS-S/2:mixer=mamba2,compile=True"``, or the bare name."""
    return name + (":" + ",".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "")


def constructor_overrides(overrides: dict) -> dict:
    """The overrides that go to ``create_model`` (run options such as ``compile`` removed)."""
    return {k: v for k, v in overrides.items() if k not in RUN_OPTIONS}


def _family(name: str) -> str:
    return name.split("-", 1)[0]


def _patch(name: str) -> int:
    # DiffuSSM has no patchify ("DiffuSSM-S"); the others carry it in the name ("DiS-S/2").
    return int(name.rsplit("/", 1)[1]) if "/" in name else 1


def baseline_for(name: str) -> str | None:
    """The DiT a state-space model is compared with: same size letter, patch 2 (DiffuSSM-S -> DiT-S/2);
    None for DiT itself or when no DiT of that size exists."""
    if _family(name) == "DiT":
        return None
    from .models import list_models

    size = name.split("-", 1)[1].split("/", 1)[0]
    candidate = f"DiT-{size}/2"
    return candidate if candidate in list_models() else None


def input_size_for(name: str, tokens: int) -> int:
    """Input side (latent cells) at which ``name`` mixes ``tokens`` image tokens."""
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"tokens must be a perfect square (a square grid of patches), got {tokens}; "
                         f"e.g. 256, 1024, 4096")
    return side * _patch(name)


def default_batch(tokens: int) -> int:
    """Images per batch: the same number of tokens per batch (4096) at every size, between 1 and 16 images."""
    return min(MAX_BATCH, max(1, TOKENS_PER_BATCH // tokens))


# --------------------------------------------------------------------------------------------------- measuring

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _pin_malloc() -> bool:
    """Make resident memory follow live memory from here on (see the module docstring)."""
    from .utils.alloc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt

    # The free heap is trimmed by each measured block (``_PeakMemory`` calls ``_trim_heap``).
    return mallopt(M_MMAP_THRESHOLD, 64 * 1024) and mallopt(M_TRIM_THRESHOLD, 0)


def _trim_heap() -> None:
    """Return freed heap memory to the system, so that resident memory is live memory before a measurement.

    Needed before each measured block even with ``_pin_malloc``: memory freed on other threads' arenas (OpenMP
    workers, the autograd engine) stays resident otherwise; a sampling forward measured right after a training
    step then showed ~0 MB above a resident set still holding the step's freed activations.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak memory of one block of work: ``extra_mb`` above the memory just before it, ``peak_mb`` above ``floor_kb``
    (the process before the model existed)."""

    def __init__(self, device, floor_kb: int | None):
        self.device = device
        self.floor_kb = floor_kb
        self.extra_mb = self.peak_mb = None

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            self._ok = _reset_peak_rss()
            self._base = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        if exc[0] is not None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.extra_mb = (peak - self._base) / 2**20
            self.peak_mb = peak / 2**20
        elif self._ok and self._base is not None:
            hwm = _status_kb("VmHWM")
            self.extra_mb = (hwm - self._base) / 1024
            if self.floor_kb is not None:
                self.peak_mb = (hwm - self.floor_kb) / 1024
        return False


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_phase(fn, device, warmup: int, repeats: int, budget_s: float) -> dict:
    """Warm-up calls (cut short when they alone exceed the budget), then timed calls until ``repeats`` or the
    budget runs out (at least one). Wall and CPU seconds (all threads) per call: on a shared machine wall time
    also counts waiting for a core, CPU time only the work."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
        _sync(device)
        if time.perf_counter() - start > budget_s:
            break
    times, cpu = [], []
    start = time.perf_counter()
    while len(times) < max(repeats, 1) and (not times or time.perf_counter() - start < budget_s):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(times), "times_s": times, "cpu_s": statistics.median(cpu)}


def measure_matmul_rate(device: str = "cpu", size: int = 2048, seconds: float = 2.0) -> dict:
    """This machine's matrix-product rate, in real flops/s (2 n^3 per product): {"bf16": ..., "fp32": ...,
    "size": {"bf16": n, "fp32": n}}.

    A loop of ``size`` x ``size`` products, ``F.linear(a, b)`` = a @ b.T as in every nn.Linear of the models (on
    CPUs without native bf16 that layout takes a faster bf16 path than ``torch.mm``), for about ``seconds`` per
    dtype; the fastest product sets the rate (the machine's capability: on a shared machine a median would measure
    the other jobs). A CPU without native bf16 (no AVX512-BF16/AMX) multiplies bf16 some 10-30x slower than fp32;
    the size is then halved until one product fits
    in a third of ``seconds``, and the size used is recorded.
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    rates, sizes = {}, {}
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        g = torch.Generator(device="cpu").manual_seed(0)
        # Probe at 256 to predict the time of one product at ``size``.
        n = 256
        a = torch.randn(n, n, generator=g).to(dev, dtype)
        F.linear(a, a)
        _sync(dev)
        probe = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            F.linear(a, a)
            _sync(dev)
            probe = min(probe, max(time.perf_counter() - t0, 1e-6))
        n = size
        while n > 256 and probe * (n / 256) ** 3 > seconds / 3:
            n //= 2
        a = torch.randn(n, n, generator=g).to(dev, dtype)
        b = torch.randn(n, n, generator=g).to(dev, dtype)
        F.linear(a, b)
        _sync(dev)
        times = []
        start = time.perf_counter()
        while len(times) < 3 or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            F.linear(a, b)
            _sync(dev)
            times.append(time.perf_counter() - t0)
            if len(times) >= 1000 or time.perf_counter() - start > 3 * seconds:
                break
        rates[label] = 2 * n**3 / min(times)
        sizes[label] = n
    rates["size"] = sizes
    return rates


def _mixer_classes():
    from .models import dit
    from .ssm import modules

    return tuple(getattr(modules, n) for n in ("Mamba", "BiMamba", "Mamba2", "BiS4D")) + (dit.Attention,)


def _workload(name: str, tokens: int, dtype: str, batch: int, num_classes: int, overrides: dict, device,
              compile: bool = False):
    """(model, train_step, sample_step, (x, t, y), autocast): ``name`` at ``tokens`` tokens on ``device`` with fixed random
    data (seeded, so repeatable) and the two phases as closures. train_step: forward under the dtype's autocast,
    MSE loss, backward, AdamW (fused where supported); sample_step: one forward under inference mode. Neither sets
    the model's train/eval mode. With ``compile`` both run the model through torch.compile. Shared by the bench
    (``measure_config``), ``--profile`` and ``benchmarks/step.py`` (``cpu_training_step``)."""
    import torch
    import torch.nn.functional as F

    from .models import create_model
    from .train import fused_adamw

    torch.manual_seed(0)
    size = input_size_for(name, tokens)
    model = create_model(name, input_size=size, in_channels=4, num_classes=num_classes,
                         **constructor_overrides(overrides)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused_adamw(device))
    channels = model.in_channels
    x = torch.randn(batch, channels, size, size, device=device)
    noise = torch.randn_like(x)
    t = torch.randint(0, 1000, (batch,), device=device).float()
    y = torch.randint(0, num_classes, (batch,), device=device) if num_classes > 0 else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    run = torch.compile(model) if compile else model

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = run(x, t, y)
        F.mse_loss(out[:, :channels].float(), noise).backward()
        opt.step()

    def sample_step():
        with torch.inference_mode(), autocast:
            run(x, t, y)

    return model, train_step, sample_step, (x, t, y), autocast


def measure_config(cfg: dict) -> dict:
    """Train and sample one configuration in this process; returns the measured fields of its row.

    cfg: {"name", "overrides", "tokens", "batch", "dtype", "device", "num_classes", "warmup", "repeats",
    "budget_s", "threads", "pin_malloc", "floor_kb", "compile", "phases"}. With "compile" (the run's flag or the
    spec's ``compile=true``) both phases run the model through torch.compile (compiled in the untimed warm-up
    steps). "phases" (default ``PHASES``) names the phases to measure: ``["sample"]`` times and measures sampling
    alone, what ``run_model_benchmark`` does after a training step failed (a model that samples at a batch it
    cannot train at, e.g. out of memory).
    """
    import torch

    from .utils.alloc import cpu_allocator_state

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    phases = tuple(cfg.get("phases") or PHASES)
    if not phases or not set(phases) <= set(PHASES):
        raise ValueError(f"phases must be a non-empty subset of {PHASES}, got {cfg.get('phases')!r}")
    device = torch.device(cfg["device"])
    floor_kb = cfg.get("floor_kb") or _status_kb("VmRSS")
    model, train_step, sample_step, (x, t, y), autocast = _workload(
        cfg["name"], cfg["tokens"], cfg["dtype"], cfg["batch"], cfg["num_classes"], cfg.get("overrides", {}), device,
        compile=bool(cfg.get("compile")))

    # The longest sequence any mixer sees (extra, separator and padding tokens included), from one eager forward
    # of one image before timing: hooks left on during the timed steps made a compiled DiS or DiT training step
    # several times slower.
    lengths = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
             for m in model.modules() if isinstance(m, _mixer_classes())]
    with torch.inference_mode(), autocast:
        model(x[:1], t[:1], None if y is None else y[:1])
    for h in hooks:
        h.remove()

    row = {"cpu_allocator": cpu_allocator_state(), "mixer_len": max(lengths) if lengths else None}
    if cfg.get("memory_only"):
        # A memory probe (see ``_probe_memory``): one untimed step of each phase in place of the timed ones (AdamW's
        # state created, the allocator warm), then the same memory measurements in the same order.
        if "train" in phases:
            model.train()
            train_step()
        model.eval()
        sample_step()
    else:
        if "train" in phases:
            model.train()
            row["train"] = _time_phase(train_step, device, cfg["warmup"], cfg["repeats"], cfg["budget_s"])
        model.eval()
        row["sample"] = _time_phase(sample_step, device, cfg["warmup"], cfg["repeats"], cfg["budget_s"] / 2)

    if device.type == "cpu" and cfg.get("pin_malloc", False):
        row["malloc_pinned"] = _pin_malloc()
    if "train" in phases:
        model.train()
        with _PeakMemory(device, floor_kb) as mem:
            train_step()
        row["train_extra_mb"], row["train_peak_mb"] = mem.extra_mb, mem.peak_mb
    model.eval()
    with _PeakMemory(device, floor_kb) as mem:
        sample_step()
    row["sample_extra_mb"], row["sample_peak_mb"] = mem.extra_mb, mem.peak_mb
    return row


def _worker_main(payload: str) -> int:
    cfg = json.loads(payload)
    from .utils.alloc import tune_cpu_allocator

    tune_cpu_allocator()  # before anything is allocated: every model is timed as ``ssmdiff train`` runs it
    import torch  # noqa: F401

    from .models import list_models

    list_models()  # imports every family, so the floor below holds the code and only the model is counted on top
    cfg["floor_kb"] = _status_kb("VmRSS")
    cfg["pin_malloc"] = True
    print(json.dumps(measure_config(cfg)))
    return 0


def _run_isolated(cfg: dict, timeout_s: float) -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "ssmdiff.bench", "--_worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "reason": f"over its time limit ({timeout_s:.0f} s)"}
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else tail[0][:300]
        return {"status": "failed", "reason": reason}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- the benchmark

def _flops_and_params(name: str, overrides: dict, size: int, num_classes: int) -> tuple[float, int]:
    """(Gflops, parameters) of the model built on the meta device; a bad override fails here with the spec in the
    message."""
    import torch

    from .models import count_flops, create_model

    try:
        with torch.device("meta"):
            model = create_model(name, input_size=size, in_channels=4, num_classes=num_classes,
                                 **constructor_overrides(overrides))
    except ValueError as e:
        raise ValueError(f"{format_model_spec(name, overrides)} at input size {size}: {e}") from None
    counted = count_flops(model)
    return counted["gflops"], counted["params"]


def run_model_benchmark(models=DEFAULT_MODELS, tokens=DEFAULT_TOKENS, dtypes=DTYPES, *, batch: int | None = None,
                        device: str = "cpu", num_classes: int = 1000, warmup: int = 1, repeats: int = 3,
                        budget_s: float = DEFAULT_BUDGET_S, threads: int | None = None, isolate: bool = True,
                        add_baselines: bool = True, matmul_seconds: float = 2.0, rounds: int = 1,
                        compile: bool = False, memory_probes: bool = True, progress=print) -> dict:
    """Run the benchmark grid; returns {"rows": [...], "matmul_flops": {...}, "bars": {...}, "environment": {...}}.

    models: names or specs ("DiS-S/2:mixer=mamba2"); each state-space model's DiT pair is added when missing
    (``add_baselines``). tokens: image tokens per image (perfect squares). dtypes: "fp32" and/or "bf16" (autocast).
    batch: images per step, default ``default_batch(tokens)``. isolate: one fresh subprocess per configuration
    (honest peak memory); False measures in this process (fast, for tests; memory then includes whatever this
    process freed earlier). budget_s: seconds of timed repeats per phase. rounds: measure every configuration
    this many times, round-robin (round 2 starts after the last configuration of round 1), so that a burst of load
    on a shared machine hits one measurement of each configuration rather than all of one; a row keeps every timed
    step and reports the fastest (see ``_derive``). compile: every model, DiT included, runs through torch.compile
    (compiled in the untimed warm-up; needs warmup >= 1); a spec's ``compile=true`` does this for that configuration
    alone. Each row has status "ok", "partial" (training failed, sampling measured alone), "skipped" or "failed"
    (with "reason"); ratios against the paired DiT are filled in by ``compute_ratios``. memory_probes: where a
    model's rows use different batches at different token counts (the default grid: 4 images at 1024 tokens, 1 at
    4096), one more training step and sampling forward are measured for memory alone at the smallest of those
    batches for each row that used a larger one (``row["memory_probe"]``), so that the memory bar and the plot's
    memory panels compare token counts at one batch size (``check_bars``, ``plot_results``).
    """
    import torch

    from .models import list_models

    if isinstance(models, str):
        models = [models]
    if isinstance(tokens, int):
        tokens = [tokens]
    if isinstance(dtypes, str):
        dtypes = [dtypes]
    specs = [parse_model_spec(m) for m in models]
    known = set(list_models())
    for name, _ in specs:
        if name not in known:
            raise ValueError(f"unknown model {name!r}; `ssmdiff models` lists the names (e.g. DiS-S/2, DiT-S/2)")
    if add_baselines:
        have = {(n, json.dumps(o, sort_keys=True)) for n, o in specs}
        for name, _ in list(specs):
            base = baseline_for(name)
            if base is not None and (base, "{}") not in have:
                specs.insert(0, (base, {}))
                have.add((base, "{}"))
    for name, overrides in specs:
        if not isinstance(overrides.get("compile", False), bool):
            raise ValueError(f"compile must be true or false, got {overrides['compile']!r} in "
                             f"{format_model_spec(name, overrides)!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if not matmul_seconds > 0:
        raise ValueError(f"matmul_seconds must be > 0, got {matmul_seconds!r}")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}: choose from {', '.join(DTYPES)}")
    for n in tokens:
        input_size_for("DiT-S/2", n)  # validates: positive perfect square
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if budget_s <= 0 or repeats < 1 or warmup < 0 or not isinstance(rounds, int) or rounds < 1:
        raise ValueError("budget_s must be > 0, repeats >= 1, rounds >= 1 and warmup >= 0")
    any_compile = compile or any(o.get("compile") for _, o in specs)
    if any_compile and warmup < 1:
        raise ValueError("compile needs warmup >= 1: the compilation must not be timed")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but CUDA is not available; use --device cpu")
    # Every spec is built and counted at every size (on the meta device) before anything is timed: a bad override
    # fails here, not after the configurations before it were measured.
    counted = {(format_model_spec(name, overrides), n): _flops_and_params(name, overrides, input_size_for(name, n),
                                                                          num_classes)
               for name, overrides in specs for n in tokens}
    if threads:
        torch.set_num_threads(threads)

    from .ssm.ops.selective_scan import resolve_backend

    environment = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "threads": threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # AVX2 alone has no native bf16: bf16 matmuls and convolutions then take slow generic paths.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "scan_backend": resolve_backend(dev),
        "compile": bool(compile),
        "python": platform.python_version(),
    }
    progress(f"measuring the matmul rate (up to 2048^2, bf16 and fp32) on {dev} ...")
    rates = measure_matmul_rate(device, seconds=matmul_seconds)
    progress(f"  bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s (n={rates['size']['bf16']}), "
             f"fp32 {rates['fp32'] / 1e9:.1f} GFLOP/s (n={rates['size']['fp32']})")

    def measure_once(cfg):
        if isolate:
            # warm-up + repeats of both phases, model build and imports: a generous wall-clock limit.
            return _run_isolated(cfg, timeout_s=4 * budget_s + (600 if any_compile else 180))
        try:
            return measure_config(cfg)
        except RuntimeError as e:  # out of memory and the like: keep the row, go on
            reason = str(e).splitlines()[0][:300]
        if dev.type == "cuda":  # once the exception, and the frames holding the failed step's tensors, are gone
            torch.cuda.empty_cache()
        return {"status": "failed", "reason": reason}

    def measure(cfg):
        """measure_once; when the configuration failed (not when it ran out of time), sampling alone is measured
        again and the result records why training was left out. ``cfg["phases"]`` is then set, so that later
        rounds measure the phase that worked."""
        result = measure_once(cfg)
        both = tuple(cfg.get("phases") or PHASES) == PHASES
        if result.get("status") != "failed" or cfg.get("memory_only") or not both:
            return result
        alone = measure_once(dict(cfg, phases=["sample"]))
        if "status" in alone:
            return result
        cfg["phases"] = ["sample"]
        return dict(alone, train_failed=result["reason"])

    rows = []
    measured = []  # [row, cfg, raw result] of every configuration measured in round 1, for the later rounds
    last_cost: dict = {}  # (spec, dtype) -> (seconds per train step, Gflops x batch) for the time estimate
    for n_tokens in tokens:
        for name, overrides in specs:
            spec = format_model_spec(name, overrides)
            size = input_size_for(name, n_tokens)
            gflops, params = counted[(spec, n_tokens)]
            b = batch or default_batch(n_tokens)
            for dtype in dtypes:
                row = {"model": spec, "name": name, "family": _family(name), "overrides": overrides,
                       "baseline": baseline_for(name), "tokens": n_tokens, "input_size": size,
                       "patch": _patch(name), "batch": b, "dtype": dtype, "gflops": gflops, "params": params}
                prev = last_cost.get((spec, dtype))
                if prev is not None:
                    estimate = prev[0] * (gflops * b) / prev[1]
                    # warm-up + one timed step per phase is the least a measurement needs
                    if estimate * (warmup + 1) > budget_s:
                        row.update(status="skipped", reason=f"estimated {estimate:.0f} s per training step "
                                   f"(from the previous size) x {warmup + 1} > budget {budget_s:.0f} s")
                        rows.append(row)
                        progress(_row_line(row))
                        continue
                cfg = {"name": name, "overrides": overrides, "tokens": n_tokens, "batch": b, "dtype": dtype,
                       "device": device, "num_classes": num_classes, "warmup": warmup, "repeats": repeats,
                       "budget_s": budget_s, "threads": threads,
                       "compile": bool(compile or overrides.get("compile"))}
                result = measure(cfg)
                if "status" in result:
                    row.update(result)
                else:
                    row.update(_derive(result, gflops, b, dtype, rates))
                    if row["train_step_s"] is not None:
                        last_cost[(spec, dtype)] = (row["train_step_s"], gflops * b)
                    measured.append([row, cfg, result])
                rows.append(row)
                progress(_row_line(row))
    if memory_probes:
        _probe_memory(rows, measured, measure, progress)
    for r in range(1, rounds):
        progress(f"round {r + 1} of {rounds}")
        for item in measured:
            row, cfg, raw = item
            result = measure(cfg)
            if "status" in result:  # a failure in a later round keeps the earlier measurement
                progress(f"{row['model']} {row['tokens']} tok {row['dtype']}: round {r + 1} {result['status']}")
                continue
            item[2] = raw = _merge_rounds(raw, result)
            row.update(_derive(raw, row["gflops"], row["batch"], row["dtype"], rates))
            progress(_row_line(row))
    compute_ratios(rows)
    return {"rows": rows, "matmul_flops": rates, "bars": check_bars(rows), "environment": environment,
            "settings": {"num_classes": num_classes, "warmup": warmup, "repeats": repeats, "rounds": rounds,
                         "budget_s": budget_s,
                         "isolate": isolate, "batch": batch or f"{TOKENS_PER_BATCH} // tokens"}}


def _probe_memory(rows: list[dict], measured: list, measure, progress) -> None:
    """For each model and dtype measured at several token counts with different batches, the training and sampling
    memory of every such row at the smallest batch among them: ``row["memory_probe"] = {"batch", "train_extra_mb",
    "train_peak_mb", "sample_extra_mb", "sample_peak_mb"}`` (or {"batch", "status", "reason"} when the probe
    failed; the train fields None for a "partial" row). DiT rows are probed too, so that the plot's memory panels
    compare every model at one batch."""
    groups: dict = {}
    for row, cfg, _ in measured:
        groups.setdefault((row["model"], row["dtype"]), []).append((row, cfg))
    for items in groups.values():
        batches = {row["batch"] for row, _ in items}
        if len({row["tokens"] for row, _ in items}) < 2 or len(batches) < 2:
            continue
        small = min(batches)
        for row, cfg in items:
            if row["batch"] == small:
                continue
            result = measure(dict(cfg, batch=small, memory_only=True))
            if "status" in result:
                row["memory_probe"] = {"batch": small, "status": result["status"], "reason": result.get("reason")}
                progress(f"{row['model']} {row['tokens']} tok b{small} {row['dtype']}: memory probe "
                         f"{result['status']} ({result.get('reason')})")
                continue
            row["memory_probe"] = dict({k: result.get(k) for k in MEMORY_FIELDS}, batch=small)
            progress(f"{row['model']:<22} {row['tokens']:5d} tok  b{small:<3d} {row['dtype']:<5} memory probe: "
                     f"train extra {_fmt(result.get('train_extra_mb'), '.0f')} MB, sample extra "
                     f"{_fmt(result['sample_extra_mb'], '.0f')} MB")


def _merge_rounds(a: dict, b: dict) -> dict:
    """Raw results of two rounds of one configuration: every timed step kept, memory the lower reading."""
    out = dict(a)
    for phase in PHASES:
        if phase not in a or phase not in b:
            continue
        pa, pb = a[phase], b[phase]
        times = pa["times_s"] + pb["times_s"]
        out[phase] = {"median_s": statistics.median(times), "times_s": times, "cpu_s": min(pa["cpu_s"], pb["cpu_s"])}
    for key in MEMORY_FIELDS:
        vals = [v for v in (a.get(key), b.get(key)) if v is not None]
        out[key] = min(vals) if vals else None
    return out


def _derive(result: dict, gflops: float, batch: int, dtype: str, rates: dict) -> dict:
    """Row fields from a raw result. Step times are the fastest timed step (over repeats and rounds): on a shared
    machine a slower step measures the other jobs too, and the matmul rate that MFU divides by is also the
    fastest product; the median is kept as ``*_median_s``. A phase the result lacks (training, when it failed and
    sampling was measured alone) has its fields None, and the row's status is "partial"."""
    out = {"status": "ok", "mixer_len": result.get("mixer_len")}
    # count_flops counts a multiply-add as one flop: x2 for real flops; a training step is ~3 forwards.
    for phase, passes in (("train", 3), ("sample", 1)):
        timed = result.get(phase)
        t = min(timed["times_s"]) if timed else None
        out.update({f"{phase}_step_s": t, f"{phase}_median_s": timed and timed["median_s"],
                    f"{phase}_times_s": timed and timed["times_s"], f"{phase}_cpu_s": timed and timed["cpu_s"],
                    f"{phase}_ips": t and batch / t,
                    f"{phase}_mfu": t and 2 * passes * gflops * 1e9 * batch / t / rates[dtype]})
    if result.get("train_failed"):
        out.update(status="partial", reason=f"training failed ({result['train_failed']}); sampling measured alone")
    for key in MEMORY_FIELDS:
        out[key] = result.get(key)
    return out


def compute_ratios(rows: list[dict]) -> list[dict]:
    """Fill each state-space row's ratios against its DiT pair measured in the same run (same tokens, dtype,
    batch): ``train_speed_ratio`` and ``sample_speed_ratio`` (images/s, SSM / DiT: > 1 means the SSM is faster),
    ``train_memory_ratio`` and ``sample_memory_ratio`` (extra peak memory, SSM / DiT), ``gflops_ratio``; a phase
    either side lacks (a "partial" row) has no ratios."""
    index = {(r["model"], r["tokens"], r["dtype"]): r for r in rows}
    for r in rows:
        base = index.get((r.get("baseline"), r["tokens"], r["dtype"])) if r.get("baseline") else None
        if base is None:
            continue
        r["gflops_ratio"] = r["gflops"] / base["gflops"]
        if r.get("status") not in MEASURED or base.get("status") not in MEASURED:
            continue
        for phase in PHASES:
            if not (r.get(f"{phase}_ips") and base.get(f"{phase}_ips")):
                continue
            r[f"{phase}_speed_ratio"] = r[f"{phase}_ips"] / base[f"{phase}_ips"]
            a, b = r.get(f"{phase}_extra_mb"), base.get(f"{phase}_extra_mb")
            r[f"{phase}_memory_ratio"] = a / b if a is not None and b else None
    return rows


def check_bars(rows: list[dict]) -> dict:
    """Issue 6's CPU bars, judged from these rows only (a bar whose rows are missing is absent, not failed).

    speed: at 1024 tokens and above, the fastest configuration of each state-space model (any dtype, mixer or other
    override of the same name) trains and samples at least as fast as its matched DiT pair (``baseline_for``: DiT-S/2
    for the S models, DiT-B/2 for DiS-B/2) at its fastest dtype and run option (eager or ``compile``), and at least 2x
    as fast at 4096, judged by the fastest step (``ratio``) and, where the rows have them, by the median step too
    (``ratio_median``, each side's best configuration by median): met only when both reach the bar. Each bar records
    both configurations and the Gflops ratio SSM / DiT at those tokens, so a reader sees whether the state-space
    model did more or less arithmetic than the DiT it was compared with.
    memory: training extra peak memory of each state-space model grows at most linearly with tokens (allowing 25%
    for allocator slack), judged at one batch size when rows or memory probes (``row["memory_probe"]``) of one batch
    exist at two or more token counts, else per image (extra_mb / batch; "basis" says which). mfu: DiS-B/2 bf16 at
    1024 tokens trains at >= 25% MFU. A "partial" row (training failed, sampling measured alone) counts for the
    sampling bars only.
    """
    ok = [r for r in rows if r.get("status") in MEASURED]
    bars = {}
    for n in sorted({r["tokens"] for r in ok if r["tokens"] >= 1024}):
        need = 2.0 if n >= 4096 else 1.0
        for name in sorted({r["name"] for r in ok if r["family"] != "DiT" and r["tokens"] == n}):
            for phase in PHASES:
                # rows that measured this phase (a "partial" row has sampling alone)
                ssm = [r for r in ok if r["name"] == name and r["tokens"] == n and r.get(f"{phase}_ips")]
                pair = ssm[0].get("baseline") if ssm else None
                dit = [r for r in ok if r["name"] == pair and r["tokens"] == n and r.get(f"{phase}_ips")
                       and not constructor_overrides(r["overrides"])]
                if not pair or not dit:
                    continue
                best_ssm = max(ssm, key=lambda r: r[f"{phase}_ips"])
                best_dit = max(dit, key=lambda r: r[f"{phase}_ips"])
                ratio = best_ssm[f"{phase}_ips"] / best_dit[f"{phase}_ips"]
                bar = {"met": ratio >= need, "ratio": ratio,
                       "gflops_ratio": best_ssm["gflops"] / best_dit["gflops"],
                       "ssm": f"{best_ssm['model']} {best_ssm['dtype']}",
                       "dit": f"{best_dit['model']} {best_dit['dtype']}"}
                # By the median step as well: a model whose work varies from step to step (DiS skips the mixers
                # of the samples stochastic depth drops) has a fastest step that is partly a lucky draw.
                med_ssm, med_dit = (max((r["batch"] / r[f"{phase}_median_s"] for r in rs
                                         if r.get(f"{phase}_median_s")), default=None) for rs in (ssm, dit))
                if med_ssm and med_dit:
                    bar["ratio_median"] = med_ssm / med_dit
                    bar["met"] = bar["met"] and bar["ratio_median"] >= need
                bars[f"{name} {phase} @{n} >= {need:g}x {pair}"] = bar
    at_one_batch, _ = memory_at_one_batch(ok, "train_extra_mb")
    for spec in sorted({r["model"] for r in ok if r["family"] != "DiT"}):
        for dtype in sorted({r["dtype"] for r in ok}):
            mine = [r for r in ok if r["model"] == spec and r["dtype"] == dtype and r.get("train_extra_mb")]
            same = sorted((r["tokens"], at_one_batch[id(r)]) for r in mine if at_one_batch.get(id(r)))
            if len(same) >= 2:
                # Same batch at several lengths: the claim itself (memory vs sequence length, batch fixed).
                pts, basis = same, f"batch {min(r['batch'] for r in mine)}"
            else:
                # The grid's batches shrink as tokens grow; per image, a part that does not scale with the batch
                # (e.g. an S4D kernel generated once per layer) looks superlinear, so this basis is only a hint.
                pts, basis = sorted((r["tokens"], r["train_extra_mb"] / r["batch"]) for r in mine), "per image"
            if len(pts) >= 2:
                (n0, m0), (n1, m1) = pts[0], pts[-1]
                growth = (m1 / m0) / (n1 / n0) if m0 > 0 else float("inf")
                bars[f"{spec} {dtype} memory linear in tokens"] = {"met": growth <= 1.25, "growth_vs_linear": growth,
                                                                   "basis": basis}
    for r in ok:
        if (r["name"] == "DiS-B/2" and r["tokens"] == 1024 and r["dtype"] == "bf16" and r.get("train_mfu")
                and not constructor_overrides(r["overrides"])):
            bars["DiS-B/2 bf16 @1024 train MFU >= 25%"] = {"met": r["train_mfu"] >= 0.25, "mfu": r["train_mfu"]}
    return bars


# ---------------------------------------------------------------------------------------------------- reporting

def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _row_line(r: dict) -> str:
    head = f"{r['model']:<22} {r['tokens']:>5} tok  b{r['batch']:<3} {r['dtype']:<5}"
    if r.get("status") not in MEASURED:
        return f"{head} {r.get('status')}: {r.get('reason')}"
    line = (f"{head} train {_fmt(r['train_ips'], '7.2f')} img/s  sample {r['sample_ips']:7.2f} img/s  "
            f"mem {_fmt(r.get('train_extra_mb'), '.0f')} MB  MFU {_pct(r['train_mfu'])}")
    return line if r["status"] == "ok" else f"{line}  ({r['reason']})"


def format_table(result: dict) -> str:
    """The rows as a plain-text table, ratios against the paired DiT at the end of each state-space row."""
    rows = result["rows"]
    rates = result.get("matmul_flops", {})
    lines = []
    if rates:
        lines.append(f"matmul rate (same run): bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s (n={rates['size']['bf16']}), "
                     f"fp32 {rates['fp32'] / 1e9:.1f} GFLOP/s (n={rates['size']['fp32']})")
    header = (f"{'model':<22} {'tok':>5} {'len':>5} {'in':>4} {'b':>3} {'dtype':<5} {'Gflops':>7} "
              f"{'train/s':>8} {'samp/s':>8} {'tr MB':>7} {'tr pk MB':>8} {'sa MB':>7} {'MFU tr':>7} "
              f"{'x train':>7} {'x samp':>7} {'x mem':>6} {'x Gfl':>6}")
    lines += [header, "-" * len(header)]
    for r in sorted(rows, key=lambda r: (r["tokens"], r["dtype"], r["family"] != "DiT", r["model"])):
        if r.get("status") not in MEASURED:
            lines.append(f"{r['model']:<22} {r['tokens']:>5} {'':>5} {r['input_size']:>4} {r['batch']:>3} "
                         f"{r['dtype']:<5} {r['gflops']:>7.1f}  {r.get('status')}: {r.get('reason')}")
            continue
        lines.append(
            f"{r['model']:<22} {r['tokens']:>5} {_fmt(r.get('mixer_len'), 'd'):>5} {r['input_size']:>4} "
            f"{r['batch']:>3} {r['dtype']:<5} {r['gflops']:>7.1f} {_fmt(r['train_ips'], '.2f'):>8} "
            f"{r['sample_ips']:>8.2f} {_fmt(r.get('train_extra_mb'), '.0f'):>7} "
            f"{_fmt(r.get('train_peak_mb'), '.0f'):>8} {_fmt(r.get('sample_extra_mb'), '.0f'):>7} "
            f"{_pct(r['train_mfu']):>7} "
            f"{_fmt(r.get('train_speed_ratio'), '.2f'):>7} {_fmt(r.get('sample_speed_ratio'), '.2f'):>7} "
            f"{_fmt(r.get('train_memory_ratio'), '.2f'):>6} {_fmt(r.get('gflops_ratio'), '.2f'):>6}")
    lines.append("tok: image tokens; len: longest sequence a mixer saw; in: input side; b: batch; Gflops: per image "
                 "forward (multiply-add = 1); tr/sa MB: extra peak memory of a train step / sampling forward; tr pk: "
                 "with weights and AdamW state; x ...: SSM / paired DiT, same run (speed > 1 = SSM faster).")
    partial = [f"{r['model']} {r['tokens']} tok {r['dtype']}: {r['reason']}" for r in rows
               if r.get("status") == "partial"]
    if partial:
        lines.append("sampling alone (train columns '-'): " + "; ".join(partial))
    over = sorted({f"{r['model']} {r['dtype']}" for r in rows
                   if r.get("status") in MEASURED and max(r["train_mfu"] or 0, r["sample_mfu"]) > 1.0})
    if over:
        lines.append(f"warning: MFU above 100% ({', '.join(over)}): the matmul rate of this run understates the "
                     f"machine (another job during its loop, or a small product); raise --matmul-seconds.")
    bars = result.get("bars") or {}
    if bars:
        lines.append("bars (issue 6):")
        for key, v in bars.items():
            detail = ", ".join(f"{k} {val:.2f}" if isinstance(val, float) else f"{k} {val}"
                               for k, val in v.items() if k != "met")
            lines.append(f"  {'met    ' if v['met'] else 'NOT met'}  {key}  ({detail})")
    return "\n".join(lines)


def memory_at_one_batch(rows: list[dict], key: str) -> tuple[dict, set]:
    """Each measured row's ``key`` (a field of ``MEMORY_FIELDS``) at its series' (model, dtype) smallest batch: the
    row's own value where it ran at that batch, its memory probe's otherwise (None when neither has it). Returns
    ({id(row): value} for the rows that measured ``key`` themselves, the batches used)."""
    series: dict = {}
    for r in rows:
        if r.get("status") in MEASURED and r.get(key) is not None:
            series.setdefault((r["model"], r["dtype"]), []).append(r)
    values, batches = {}, set()
    for rs in series.values():
        small = min(r["batch"] for r in rs)
        for r in rs:
            probe = r.get("memory_probe") or {}
            v = r.get(key) if r["batch"] == small else (probe.get(key) if probe.get("batch") == small else None)
            values[id(r)] = v
            if v is not None:
                batches.add(small)
    return values, batches


def plot_results(result: dict, path) -> Path | None:
    """PNG of training and sampling images/s and training/sampling extra peak memory against tokens (log-log),
    one line per model and dtype. Memory is plotted at each series' smallest batch (rows of larger batches through
    their memory probes, ``memory_at_one_batch``), so that a line shows memory against tokens alone. Returns the
    path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    ok = [r for r in result["rows"] if r.get("status") in MEASURED]
    panels = (("train_ips", "training images/s"), ("sample_ips", "sampling images/s (one step)"),
              ("train_extra_mb", "training extra peak memory (MB)"),
              ("sample_extra_mb", "sampling extra peak memory (MB)"))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    series = sorted({(r["model"], r["dtype"]) for r in ok})
    for ax, (key, title) in zip(axes, panels):
        if key.endswith("_mb"):
            values, batches = memory_at_one_batch(ok, key)
            title += f", batch {', '.join(map(str, sorted(batches)))}" if batches else ""
        else:
            values = {id(r): r.get(key) for r in ok}
        for model, dtype in series:
            pts = sorted((r["tokens"], values.get(id(r))) for r in ok
                         if r["model"] == model and r["dtype"] == dtype and (values.get(id(r)) or 0) > 0)
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="--" if model.startswith("DiT") else "-",
                        label=f"{model} {dtype}")
        ax.set_xscale("log", base=2)
        if ax.lines:
            ax.set_yscale("log")
        ax.set_xlabel("image tokens")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    next((ax for ax in axes if ax.lines), axes[0]).legend(fontsize=7)  # the train panels are empty if none trained
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------ profile

_CATEGORIES = (
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "_weight_int", "mkldnn_matmul")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax")),
    ("scan", ("selective_scan", "scan", "ssd", "cumsum", "chunk_state")),
    ("conv", ("conv", "convolution", "fft")),
    ("copy/layout", ("copy_", "to_copy", "_to_copy", "contiguous", "clone", "flip", "cat", "stack", "index",
                     "transpose", "permute", "reshape", "view", "expand", "as_strided", "fill_", "zero_",
                     "empty", "split", "slice", "unbind", "select")),
    ("optimizer", ("_foreach", "adam", "lerp", "sqrt", "addcdiv", "addcmul")),
    ("norm", ("norm", "rsqrt", "layer_norm", "rms")),
)


def _category(op: str) -> str:
    low = op.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "elementwise/other"


def cpu_training_step(name: str, tokens: int, dtype: str = "fp32", batch: int | None = None,
                      num_classes: int = 1000, overrides: dict | None = None, phase: str = "train"):
    """(step, batch): one CPU optimisation step of ``name`` at ``tokens`` tokens as a closure (forward under the
    dtype's autocast, MSE loss, backward, fused AdamW), on fixed random data; seeded, so repeatable. With
    ``phase="sample"`` the closure is instead one sampling forward (eval mode, inference mode), the bench's sampling
    phase. Shared by ``--profile`` and ``benchmarks/step.py``."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}: choose from {', '.join(PHASES)}")
    b = batch or default_batch(tokens)
    overrides = overrides or {}
    model, train_step, sample_step, _, _ = _workload(name, tokens, dtype, b, num_classes, overrides, torch.device("cpu"),
                                                  compile=bool(overrides.get("compile")))
    if phase == "sample":
        model.eval()
        return sample_step, b
    model.train()
    return train_step, b


def profile_training_step(name: str = "DiS-S/2", tokens: int = 1024, dtype: str = "bf16", batch: int | None = None,
                          num_classes: int = 1000, row_limit: int = 15, warmup: int = 1, threads: int | None = None,
                          overrides: dict | None = None):
    """torch.profiler over one training step (after ``warmup`` unprofiled steps) of ``name``, built with the
    constructor ``overrides`` when given (e.g. {"mixer": "mamba2"}).

    Returns (table, summary): torch's key-averages table sorted by self CPU time (top ``row_limit`` ops) and
    {"step_s", "self_cpu_s_total", "categories": {category: self CPU seconds}, "top": [(op, self CPU s, calls)]}.
    Categories are a rough grouping of aten op names (matmul, attention, scan, conv, copy/layout, optimizer, norm,
    elementwise/other), to see at a glance where a step goes. ``summary["products"]`` lists the matrix products by
    op and operand shapes: calls, self CPU seconds and the GFLOP/s they reached (``_product_rows``).
    ``summary["plain_step_s"]`` is the same step timed without the profiler: on the 2-core CPU profiling took a
    DiS-S/2 fp32 step at 1024 tokens from 6.1 to 11.0 s, most of it inside the compiled kernels and the backward's
    products, so the shares are a rough guide, not a measurement of the unprofiled step.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    if threads:
        torch.set_num_threads(threads)
    step, b = cpu_training_step(name, tokens, dtype, batch=batch, num_classes=num_classes, overrides=overrides)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    step()  # the same step without the profiler, to show what profiling itself costs
    plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    step_s = time.perf_counter() - t0
    products = _product_rows(prof.key_averages(group_by_input_shape=True))
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=row_limit)
    cats: dict = {}
    events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    for e in events:
        cats[_category(e.key)] = cats.get(_category(e.key), 0.0) + e.self_cpu_time_total / 1e6
    total = sum(cats.values())
    summary = {"model": format_model_spec(name, overrides or {}), "tokens": tokens, "batch": b, "dtype": dtype,
               "step_s": step_s, "plain_step_s": plain_s,
               "self_cpu_s_total": total,
               "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
               "top": [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in events[:row_limit]],
               "products": products}
    return table, summary


def _product_flops(op: str, shapes) -> int | None:
    """Flops (2 per multiply-add) of one call of a matrix product from the profiler's input shapes."""
    try:
        if op == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2 * m * k * n
        if op == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2 * m * k * n
        if op == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2 * b * m * k * n
        if op == "aten::baddbmm":
            (b, m, k), (_, _, n) = shapes[1], shapes[2]
            return 2 * b * m * k * n
    except (TypeError, ValueError, IndexError):
        return None
    return None


def _product_rows(grouped, limit: int = 12) -> list[dict]:
    """The matrix products of a profile grouped by input shapes, slowest first: where a model's products run below
    the machine's GEMM rate (skinny or small-K shapes, transposed operands)."""
    rows = []
    for e in grouped:
        flops = _product_flops(e.key, e.input_shapes)
        seconds = e.self_cpu_time_total / 1e6
        if flops is None or seconds <= 0:
            continue
        shapes = " x ".join(str(tuple(sh)) for sh in e.input_shapes if sh)
        rows.append({"op": e.key.removeprefix("aten::"), "shapes": shapes, "calls": e.count, "self_s": seconds,
                     "gflops_per_s": flops * e.count / seconds / 1e9})
    rows.sort(key=lambda r: -r["self_s"])
    return rows[:limit]


def _print_profile(summary: dict, table: str) -> str:
    lines = [f"== {summary['model']}, {summary['tokens']} tokens, batch {summary['batch']}, {summary['dtype']}: "
             f"one training step {summary['step_s']:.2f} s under the profiler ({summary['plain_step_s']:.2f} s "
             f"without), self CPU total "
             f"{summary['self_cpu_s_total']:.2f} s (all threads) ==", table, "by category (self CPU):"]
    total = summary["self_cpu_s_total"] or 1.0
    for cat, s in summary["categories"].items():
        lines.append(f"  {cat:<18} {s:7.2f} s  {100 * s / total:5.1f}%")
    if summary.get("products"):
        lines.append("matrix products by shape (self CPU, GFLOP/s reached):")
        for r in summary["products"]:
            lines.append(f"  {r['self_s']:6.2f} s  {r['calls']:4d} x {r['op']:<7} {r['gflops_per_s']:6.1f}  {r['shapes']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    """The options of ``ssmdiff bench`` / ``benchmarks/models.py``."""
    from .cli import _number

    positive, nonneg = _number(int, "an integer", 1), _number(int, "an integer", 0)
    seconds = _number(float, "a number of seconds", 0, exclusive=True)
    p = argparse.ArgumentParser(
        prog="ssmdiff bench",
        description="Benchmark state-space backbones against DiT of matched size: training and sampling "
                    "images/s, peak memory, Gflops, MFU, ratios SSM/DiT from the same run.")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"model names or specs with overrides, e.g. DiS-S/2:mixer=mamba2 or DiT-S/2:compile=true "
                        f"(default: {' '.join(DEFAULT_MODELS)}); each state-space model's DiT pair is added")
    p.add_argument("--tokens", type=positive, nargs="+", default=None,
                   help="image tokens per image, perfect squares (default 256 1024 4096)")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=None, help="fp32 and/or bf16 autocast (both)")
    p.add_argument("--batch", type=positive, default=None,
                   help=f"images per step (default {TOKENS_PER_BATCH} // tokens)")
    p.add_argument("--repeats", type=positive, default=None, help="timed steps per phase (default 3; --quick 1)")
    p.add_argument("--warmup", type=nonneg, default=1, help="untimed steps before timing each phase (default 1)")
    p.add_argument("--rounds", type=positive, default=1,
                   help="measure every configuration this many times, round-robin, keeping the fastest step "
                        "(default 1; 2-3 on a shared machine)")
    p.add_argument("--budget", type=seconds, default=None,
                   help=f"seconds of timed repeats per phase and configuration (default {DEFAULT_BUDGET_S:.0f}; "
                        f"configurations estimated to take longer are skipped)")
    p.add_argument("--num-classes", type=nonneg, default=1000, help="class-conditional models (0: unconditional)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=positive, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--matmul-seconds", type=seconds, default=None,
                   help="seconds per dtype for the matmul-rate loop (default 2; --quick 1)")
    p.add_argument("--compile", action="store_true",
                   help="run every model (DiT included) through torch.compile; compiled in the untimed warm-up")
    p.add_argument("--no-memory-probes", action="store_true",
                   help="skip the extra memory-only steps that let the memory bar and plot compare token counts at "
                        "one batch size where the grid's batch changes with tokens")
    p.add_argument("--no-isolate", action="store_true",
                   help="measure in this process instead of one subprocess per configuration (peak memory less exact)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 256 tokens only, batch 2, one repeat, budget 60 s (override with the options above)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="folder for models.json and models.png (and profile.txt with --profile)")
    p.add_argument("--profile", action="store_true",
                   help="instead of the grid: torch.profiler over one training step of each model or spec (default "
                        "DiS-S/2 and DiT-S/2, 1024 tokens, bf16): top-15 ops by self CPU time, time by category, "
                        "matrix products by shape with their GFLOP/s, and the same step timed without the profiler")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    """Command line entry (``ssmdiff bench``); returns the exit status."""
    args = build_parser().parse_args(argv)
    if args._worker:
        return _worker_main(args._worker)
    if args.profile:
        return _profile_main(args)
    models = args.models or list(DEFAULT_MODELS)
    tokens = args.tokens or ([256] if args.quick else list(DEFAULT_TOKENS))
    dtypes = args.dtype or list(DTYPES)
    repeats = args.repeats or (1 if args.quick else 3)
    budget = args.budget or (60.0 if args.quick else DEFAULT_BUDGET_S)
    try:
        batch = args.batch or (2 if args.quick else None)
        result = run_model_benchmark(models, tokens, dtypes, batch=batch, device=args.device,
                                     num_classes=args.num_classes, warmup=args.warmup, repeats=repeats,
                                     budget_s=budget, threads=args.threads, isolate=not args.no_isolate,
                                     rounds=args.rounds, compile=args.compile,
                                     memory_probes=not args.no_memory_probes,
                                     matmul_seconds=args.matmul_seconds or (1.0 if args.quick else 2.0))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    print()
    print(format_table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "models.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'models.json'}")
    png = plot_results(result, args.out / "models.png")
    if png is not None:
        print(f"wrote {png}")
    return 0


def _profile_main(args) -> int:
    from .utils.alloc import tune_cpu_allocator

    tune_cpu_allocator()  # as the timed configurations run
    models = args.models or ["DiS-S/2", "DiT-S/2"]
    tokens = (args.tokens or [1024])[0]
    dtype = (args.dtype or ["bf16"])[0]
    out = []
    summaries = []
    for spec in models:
        try:
            name, overrides = parse_model_spec(spec)
            table, summary = profile_training_step(name, tokens, dtype, batch=args.batch,
                                                   num_classes=args.num_classes, threads=args.threads,
                                                   warmup=args.warmup, overrides=overrides)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        text = _print_profile(summary, table)
        print(text, flush=True)
        out.append(text)
        summaries.append(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.txt").write_text("\n\n".join(out) + "\n")
    (args.out / "profile.json").write_text(json.dumps(summaries, indent=2))
    print(f"wrote {args.out / 'profile.txt'} and profile.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
