"""``selective_scan``: the one entry point for the Mamba-1 selective scan, and the only place that picks an
implementation by device.

Backends:
  "cpu"    compiled C++ kernel (``_scan_cpu``), forward and backward without a (batch, length, channels, state)
           tensor;
  "cuda"   mamba-ssm's ``selective_scan_fn`` (CUDA tensors, mamba-ssm installed);
  "triton" Triton kernels (``_scan_triton``), likewise without that tensor: CUDA tensors with Triton importable
           (PyTorch's CUDA wheels bring it) and its self-check passed, or CPU tensors under ``TRITON_INTERPRET=1``
           (Triton's interpreter, for tests);
  "torch"  chunked pure-PyTorch scan (``_scan_torch``), any device, bounded memory;
  "ref"    the sequential reference (``selective_scan_ref``), slow, for tests.
"auto" (default) takes "cuda" on CUDA when mamba-ssm imports, else "triton" when Triton does (and its kernels pass
their self-check), else "torch" there; on CPU "cpu" when the kernel builds, else "torch" (after one warning).

Environment: ``SSMDIFF_SCAN_BACKEND`` replaces "auto" (benchmarks, debugging); ``SSMDIFF_CACHE`` is where the CPU
kernel is built (default ~/.cache/ssmdiff); ``CXX`` picks the compiler; ``SSMDIFF_NO_COMPILE=1`` never compiles
(the CPU then uses the "torch" path).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

from .counting import record_flops
from .grad import needs_grad
from .selective_scan_ref import selective_scan_ref

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch", "ref")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, add=None):
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise ValueError(f"u must be a (batch, channels, length) tensor, got "
                         f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
    b, d, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (channels={d}, state), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported: pass a real (channels, state) A")
    n = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        if X.dim() == 3:
            ok = X.shape == (b, n, length)
        elif X.dim() == 4:
            ok = X.shape[0] == b and X.shape[2:] == (n, length) and X.shape[1] > 0 and d % X.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be (batch={b}, state={n}, length={length}) or (batch, groups, state, "
                             f"length) with groups dividing channels={d}, got {tuple(X.shape)}")
    if B.dim() != C.dim() or (B.dim() == 4 and B.shape[1] != C.shape[1]):
        raise ValueError(f"B and C must have the same grouping, got {tuple(B.shape)} and {tuple(C.shape)}")
    if D is not None and D.shape != (d,):
        raise ValueError(f"D must be (channels={d},), got {tuple(D.shape)}")
    if delta_bias is not None and delta_bias.shape != (d,):
        raise ValueError(f"delta_bias must be (channels={d},), got {tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if add is not None and add.shape != u.shape:
        raise ValueError(f"add must have u's shape {tuple(u.shape)}, got {tuple(add.shape)}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias, add) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all selective_scan inputs must be on one device, got {sorted(map(str, devices))}")


@functools.lru_cache(maxsize=1)
def _mamba_ssm_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or built for another torch/CUDA: use the PyTorch path
        return None
    return selective_scan_fn


def _cuda_scan(fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    # mamba-ssm's kernel only scans forward in time: the reverse direction flips the time axis around it.
    if reverse:
        u, delta, B, C = (t.flip(-1) for t in (u, delta, B, C))
        z = None if z is None else z.flip(-1)
    # B and C may be views into a wider projection (a batch stride larger than their own size).
    B, C = B.contiguous(), C.contiguous()
    out, last = fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                   return_last_state=True)
    return (out.flip(-1) if reverse else out), last


def _deterministic_choice(backend, *tensors) -> str:
    """"triton", or what ``torch.use_deterministic_algorithms(True)`` asks for instead when gradients will flow: the
    Triton backward sums dB, dC, dA, dD and the delta bias with atomics, so its gradients are not bitwise
    reproducible. Chosen by "auto", the deterministic PyTorch scan is taken instead; asked for by name, it is an
    error as torch's own nondeterministic ops raise one (a warning in warn-only mode)."""
    if not (torch.are_deterministic_algorithms_enabled() and needs_grad(*tensors)):
        return "triton"
    if _requested(backend) == "auto":
        return "torch"
    msg = ("the Triton selective scan's backward sums gradients with atomics and is not deterministic, but "
           "torch.use_deterministic_algorithms(True) is set; use backend 'auto' or 'torch'")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, UserWarning, stacklevel=3)
        return "triton"
    raise RuntimeError(msg)


def record_scan_flops(batch: int, channels: int, length: int, state: int) -> None:
    """Record one selective scan's cost for ``count_extra_flops``: 9 multiply-adds per (batch, length, channel,
    state) element, the convention every caller of the scan kernels shares."""
    record_flops("selective_scan", 9 * batch * length * channels * state)


def _requested(backend: str | None) -> str:
    """The backend asked for: the argument, else ``SSMDIFF_SCAN_BACKEND``, else "auto"."""
    return backend or os.environ.get("SSMDIFF_SCAN_BACKEND") or "auto"


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The implementation ``selective_scan`` would use for tensors on ``device``."""
    backend = _requested(backend)
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        if _mamba_ssm_fn() is not None:
            return "cuda"
        from . import _scan_triton

        return "triton" if _scan_triton.available(device) else "torch"
    if device.type == "cpu":
        from . import _scan_cpu

        return "cpu" if _scan_cpu.available() else "torch"
    return "torch"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, reverse=False, add=None, gate_add=False, backend: str | None = None):
    """Mamba-1 selective scan with the semantics of mamba-ssm's ``selective_scan_fn``, plus ``reverse``.

        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = <C_t, h_t> + D u_t ;  y *= silu(z)

    with delta = softplus(delta + delta_bias) when ``delta_softplus``. u, delta, z: (batch, channels, length);
    A: (channels, state); B, C: (batch, state, length) or grouped (batch, groups, state, length); D, delta_bias:
    (channels,). ``reverse=True`` scans from the last position to the first (no flipped copies; the last state is then
    the state after position 0). ``add`` (u's shape) is added to the output: a bidirectional block passes one
    direction's output to the other's scan, which the CPU kernel sums in its epilogue instead of another pass. With
    ``gate_add`` and z, add joins before the gate: out = (y + D u + add) silu(z), so the two directions of a block
    that share z can be gated once (the first direction scanned without z, the second gating the sum). The
    state accumulates in float32; the output has u's dtype and gradients the dtypes of their inputs. Returns ``out``
    or ``(out, last_state)`` with last_state (batch, channels, state) float32.
    ``backend`` forces an implementation ("cpu", "cuda", "triton", "torch", "ref"; default "auto", see the module
    docstring).
    On meta tensors nothing is computed: empty outputs of the right shapes come back. Every call records
    9 * batch * length * channels * state flops under "selective_scan" for ``count_extra_flops``.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, add)
    b, d, length = u.shape
    n = A.shape[1]
    record_scan_flops(b, d, length, n)
    kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, reverse=reverse)
    if u.device.type == "meta":
        out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        last = torch.empty((b, d, n), dtype=torch.float32, device=u.device)
    else:
        which = resolve_backend(u.device, backend)
        if which == "cpu" and u.device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got {u.device}; use 'auto' or 'torch'")
        if which == "cuda" and (u.device.type != "cuda" or _mamba_ssm_fn() is None):
            raise ValueError("backend 'cuda' needs CUDA tensors and mamba-ssm installed (pip install mamba-ssm); "
                             "use 'auto' or 'torch'")
        if which == "triton":
            from . import _scan_triton

            if not _scan_triton.available(u.device):
                raise ValueError("backend 'triton' needs Triton and CUDA tensors (or CPU tensors with "
                                 "TRITON_INTERPRET=1), and kernels that passed their self-check (a warning says "
                                 "when they did not); use 'auto' or 'torch'")
            which = _deterministic_choice(backend, u, delta, A, B, C, D, z, delta_bias, add)
        fused_add = which in ("cpu", "triton") and length > 0  # kernels that sum (and gate) add themselves
        gate_here = gate_add and add is not None and z is not None and not fused_add
        if gate_here:  # the other paths know no add: scan without z, then add and gate below
            kw["z"] = None
        if which == "ref" or length == 0:
            out, last = selective_scan_ref(u, delta, A, B, C, return_last_state=True, **kw)
        elif which == "cpu":
            from ._scan_cpu import selective_scan_cpu

            out, last = selective_scan_cpu(u, delta, A, B, C, add=add, gate_add=gate_add, **kw)
            add = None  # summed inside the kernel
        elif which == "triton":
            out, last = _scan_triton.selective_scan_triton(u, delta, A, B, C, add=add, gate_add=gate_add, **kw)
            add = None  # summed inside the kernel
        elif which == "cuda":
            out, last = _cuda_scan(_mamba_ssm_fn(), u, delta, A, B, C, **kw)
        else:
            from ._scan_torch import selective_scan_torch

            out, last = selective_scan_torch(u, delta, A, B, C, **kw)
        if gate_here:
            out = ((out.float() + add.float()) * F.silu(z.float())).to(out.dtype)
            add = None
    if add is not None:
        out = out + add.to(out.dtype)
    return (out, last) if return_last_state else out
