"""Fast CPU selective scan: a small C++ kernel compiled on first use and called through ctypes.

Why not torch.utils.cpp_extension: torch headers make the first build take about a minute, whereas this file has
no torch dependency and builds in a few seconds with the system compiler. The library is cached under
``$SSMDIFF_CACHE`` (default ``~/.cache/ssmdiff``) in a file named by a hash of source, flags, compiler and CPU, and
written atomically (temporary name, then rename) so parallel processes (pytest-xdist, torchrun) never load a
half-written file. ctypes releases the GIL during the call; the kernel runs its own threads
(``torch.get_num_threads()`` of them).

The autograd formula saves the inputs plus the state at every ``CHUNK``-th step, (batch, channels, length/CHUNK,
state) floats, and the backward recomputes states chunk by chunk: nothing of size (batch, length, channels, state)
is ever allocated.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from typing import Optional

import torch

from .grad import needs_grad

CHUNK = 64
_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "selective_scan_cpu.cpp"
_ABI_VERSION = 10
# -ffast-math only when compiling: linking with it would add crtfastmath.o, which flips the whole process into
# flush-to-zero mode on load (the kernel flushes denormals only inside its own threads).
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c++17"]
_LINK_FLAGS = ["-shared", "-pthread"]
# OpenMP when the compiler has it (the kernel then runs on the OpenMP pool, torch's own with torch's libgomp);
# otherwise the same code runs on std::threads.
_OPENMP_FLAGS = ["-fopenmp"]

_lock = threading.Lock()
_lib = None
_load_error: str | None = None


class _ScanArgs(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_int64) for name in
         ("batch", "dim", "len", "dstate", "groups", "chunk", "softplus", "reverse", "nthreads", "head_dim",
          "u_bstride")]
        + [(name, ctypes.c_void_p) for name in
           ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "add", "out", "last_state", "chunk_states", "dout",
            "du", "ddelta", "dz", "dA_rows", "dD_rows", "dbias_rows", "dB_threads", "dC_threads")]
        + [("bf16_io", ctypes.c_int64), ("gate_add", ctypes.c_int64), ("dadd", ctypes.c_void_p),
                                                ("pre_gate", ctypes.c_void_p)]
    )


# Bits of _ScanArgs.bf16_io: which row tensors the kernel reads or writes as bfloat16 (see the C++ ScanArgs).
_BF16_BITS = {"u": 1, "delta": 2, "z": 4, "add": 8, "out": 16, "dout": 32, "du": 64, "ddelta": 128, "dz": 256,
              "dadd": 512, "pre_gate": 1024}


class _ConvSiluArgs(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_int64) for name in ("batch", "dim", "len", "k", "ndir", "nthreads")]
        + [("reverse", ctypes.c_int64 * 2), ("x", ctypes.c_void_p), ("w", ctypes.c_void_p * 2),
           ("bias", ctypes.c_void_p * 2), ("out", ctypes.c_void_p * 2), ("gout", ctypes.c_void_p * 2),
           ("dx", ctypes.c_void_p), ("dw_rows", ctypes.c_void_p * 2), ("db_rows", ctypes.c_void_p * 2),
           ("bf16_io", ctypes.c_int64)]
    )


# Bits of _ConvSiluArgs.bf16_io: x, the outputs, the output gradients, dx held as bfloat16 (rows converted inside).
_CONV_BF16_X, _CONV_BF16_OUT, _CONV_BF16_GOUT, _CONV_BF16_DX = 1, 2, 4, 8


class _AddNormArgs(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_int64) for name in ("rows", "dim", "rows_per_sample", "nthreads")]
        + [("eps", ctypes.c_double)]
        + [(name, ctypes.c_void_p) for name in ("h", "res", "scale", "weight", "res_out", "normed", "rstd",
                                                 "gnormed", "gres", "dres", "dh", "dw_threads")]
        + [("bf16_io", ctypes.c_int64)]
    )


# Bits of _AddNormArgs.bf16_io: h (and dh), normed (and its gradient) held as bfloat16.
_ADDNORM_BF16_H, _ADDNORM_BF16_NORMED = 1, 2


class _TransposeArgs(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_int64) for name in
         ("batch", "rows", "cols", "src_bstride", "src_rstride", "dst_bstride", "dst_rstride", "nthreads")]
        + [("src", ctypes.c_void_p), ("dst", ctypes.c_void_p)]
    )


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """-march=native binaries are only valid on a CPU with the same features: key the cache on them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def cache_dir() -> Path:
    """Directory holding compiled kernels (``$SSMDIFF_CACHE`` or ``~/.cache/ssmdiff``)."""
    return Path(os.environ.get("SSMDIFF_CACHE") or Path.home() / ".cache" / "ssmdiff")


def _build(cxx: str) -> Path:
    try:
        return _build_with(cxx, _OPENMP_FLAGS)
    except RuntimeError:
        return _build_with(cxx, [])


def _build_with(cxx: str, extra: list[str]) -> Path:
    compile_flags, link_flags = _COMPILE_FLAGS + extra, _LINK_FLAGS + extra
    source = _SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(compile_flags + link_flags).encode(), version.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    out_dir = cache_dir()
    target = out_dir / f"selective_scan_cpu_{key}.so"
    if target.exists():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(out_dir)
    except OSError:  # read-only home (some clusters): build per user under the temp dir instead
        out_dir = Path(tempfile.gettempdir()) / f"ssmdiff-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        target = out_dir / target.name
        if target.exists():
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        obj, lib = Path(tmp) / "scan.o", Path(tmp) / "scan.so"
        for cmd in ([cxx, *compile_flags, "-c", str(_SOURCE), "-o", str(obj)],
                    [cxx, *link_flags, str(obj), "-o", str(lib)]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
        os.replace(lib, target)  # atomic: a concurrent builder of the same key just overwrites an identical file
    return target


def load_library():
    """The loaded kernel library, building it if needed; None (after one warning) when it cannot be built."""
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    with _lock:
        if _lib is not None or _load_error is not None:
            return _lib
        try:
            if os.environ.get("SSMDIFF_NO_COMPILE"):
                raise RuntimeError("SSMDIFF_NO_COMPILE is set")
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set CXX or install g++)")
            lib = ctypes.CDLL(str(_build(cxx)))
            if lib.ssmdiff_scan_abi_version() != _ABI_VERSION:
                raise RuntimeError("stale kernel library in the cache")
            for fn in (lib.ssmdiff_scan_forward, lib.ssmdiff_scan_backward):
                fn.argtypes = [ctypes.POINTER(_ScanArgs)]
                fn.restype = None
            for fn in (lib.ssmdiff_conv_silu_forward, lib.ssmdiff_conv_silu_backward):
                fn.argtypes = [ctypes.POINTER(_ConvSiluArgs)]
                fn.restype = None
            for fn in (lib.ssmdiff_add_norm_forward, lib.ssmdiff_add_norm_backward):
                fn.argtypes = [ctypes.POINTER(_AddNormArgs)]
                fn.restype = None
            lib.ssmdiff_transpose.argtypes = [ctypes.POINTER(_TransposeArgs)]
            lib.ssmdiff_transpose.restype = None
            _lib = lib
        except Exception as exc:  # any failure means "use the PyTorch path", never a crash
            _load_error = str(exc)
            warnings.warn(f"ssmdiff: the fast CPU selective scan is unavailable ({exc}); using the slower pure-PyTorch "
                          f"scan instead", RuntimeWarning, stacklevel=3)
    return _lib


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the compiled CPU kernel can be used (builds it on first call). Under torch.compile the answer is
    taken once, at trace time, as a constant: Dynamo cannot trace the build lock."""
    return load_library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _state_last(X: torch.Tensor) -> torch.Tensor:
    """(b, n, l) or (b, g, n, l) -> float32 (b, g, l, n) contiguous, so one time step's state vector is contiguous."""
    if X.dim() == 3:
        X = X.unsqueeze(1)
    return X.detach().to(torch.float32).transpose(-1, -2).contiguous()


def _threads(rows: int, work: int) -> int:
    # Thread start-up costs tens of microseconds: small scans (tests, tiny models) run on the calling thread.
    if work < 1 << 16:
        return 1
    return max(1, min(torch.get_num_threads(), rows))


def _args(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, reverse, head_dim: int = 0) -> _ScanArgs:
    b, d, length = u.shape
    n = Bt.shape[-1]
    a = _ScanArgs()
    a.head_dim = head_dim
    a.batch, a.dim, a.len, a.dstate, a.groups, a.chunk = b, d, length, n, Bt.shape[1], CHUNK
    a.softplus, a.reverse = int(softplus), int(reverse)
    a.nthreads = _threads(b * d, b * d * length * n)
    a.u, a.delta, a.A, a.B, a.C = _ptr(u), _ptr(delta), _ptr(A), _ptr(Bt), _ptr(Ct)
    a.D, a.z, a.delta_bias = _ptr(D), _ptr(z), _ptr(delta_bias)
    return a


def _bf16_rows_ok(dstate: int) -> bool:
    """Whether the kernel reads and writes bfloat16 rows itself: its vector Mamba-1 path (state sizes that are a
    multiple of 8, up to 64). Elsewhere bf16 tensors are converted to float32 whole, as other dtypes are."""
    return dstate in (8, 16, 32, 64)


class _RowIO:
    """The row tensors of one kernel call: each as the kernel gets it (bfloat16 as is where the kernel converts rows
    itself, else float32 contiguous), with the bits that tell it which are bfloat16."""

    def __init__(self, enabled: bool):
        self.enabled, self.bits = enabled, 0

    def input(self, name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is not None and self.enabled and t.dtype == torch.bfloat16:
            self.bits |= _BF16_BITS[name]
            return t.detach().contiguous()
        return _f32(t)

    def output(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """An empty output the kernel writes: bfloat16 when the result is wanted in bf16 and rows can be, else
        float32 (converted by the caller)."""
        if self.enabled and dtype == torch.bfloat16:
            self.bits |= _BF16_BITS[name]
            return torch.empty(shape, dtype=torch.bfloat16)
        return torch.empty(shape, dtype=torch.float32)


def _keeps_pre_gate(z, add, keep: bool, gate_add: bool) -> bool:
    """Whether a forward keeps the sum before the gate for the backward's dz: gate_add with z and add, training."""
    return keep and gate_add and add is not None and z is not None


def _forward(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, reverse, keep_states: bool, add=None, head_dim=0,
             io: _RowIO | None = None, out_dtype: torch.dtype = torch.float32, gate_add: bool = False):
    b, d, length = u.shape
    n = Bt.shape[-1]
    out = io.output("out", (b, d, length), out_dtype) if io else torch.empty((b, d, length), dtype=torch.float32)
    last = torch.empty((b, d, n), dtype=torch.float32)
    states = torch.empty((b, d, -(-length // CHUNK), n), dtype=torch.float32) if keep_states else None
    pre = None
    if _keeps_pre_gate(z, add, keep_states, gate_add):
        pre = io.output("pre_gate", (b, d, length), out_dtype) if io else torch.empty_like(out)
    a = _args(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, reverse, head_dim)
    a.bf16_io = io.bits if io else 0
    a.add, a.gate_add, a.pre_gate = _ptr(add), int(gate_add), _ptr(pre)
    a.out, a.last_state, a.chunk_states = _ptr(out), _ptr(last), _ptr(states)
    _lib.ssmdiff_scan_forward(ctypes.byref(a))
    return out, last, states, pre


def _thread_accumulators(a: _ScanArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed dB and dC accumulators, one (batch, groups, len, state) slab per kernel thread (channels of a group
    write the same entries), handed to the kernel through ``a``; ``_thread_sum`` reduces them."""
    shape = (a.nthreads, a.batch, a.groups, a.len, a.dstate)
    dB, dC = torch.zeros(shape, dtype=torch.float32), torch.zeros(shape, dtype=torch.float32)
    a.dB_threads, a.dC_threads = _ptr(dB), _ptr(dC)
    return dB, dC


def _thread_sum(buf: torch.Tensor) -> torch.Tensor:
    return buf.sum(0) if buf.shape[0] > 1 else buf[0]


# The kernels are registered as torch custom ops (forward and backward ops plus an autograd formula), so that
# torch.compile sees each call as one opaque op with known output shapes instead of breaking the graph at ctypes.
_EMPTY = (0,)


def _none_if_empty(t: torch.Tensor, present: bool):
    return t if present else None


@torch.library.custom_op("ssmdiff::selective_scan_fwd", mutates_args=(), device_types="cpu")
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
              add: Optional[torch.Tensor], softplus: bool, reverse: bool, keep: bool,
              gate_add: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out in u's dtype, last state (b, d, n) float32, chunk states for the backward or an empty tensor, the sum
    before the gate or an empty tensor). bfloat16 u, delta, z, add and out are converted row by row inside the
    kernel (``_RowIO``). ``gate_add``: add joins before the gate, out = (y + D u + add) silu(z); with ``keep`` (and
    z and add) that sum is kept for the backward's dz, which then recomputes no y."""
    io = _RowIO(_bf16_rows_ok(A.shape[1]))
    out, last, states, pre = _forward(io.input("u", u), io.input("delta", delta), _f32(A), _state_last(B),
                                      _state_last(C), _f32(D), io.input("z", z), _f32(delta_bias), softplus, reverse,
                                      keep_states=keep, add=io.input("add", add), io=io, out_dtype=u.dtype,
                                      gate_add=gate_add)
    return (out.to(u.dtype), last, states if keep else last.new_empty(_EMPTY),
            last.new_empty(_EMPTY) if pre is None else pre.to(u.dtype))


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, add, softplus, reverse, keep, gate_add=False):
    b, d, length = u.shape
    n = A.shape[1]
    states = (b, d, -(-length // CHUNK), n) if keep else _EMPTY
    pre = u.new_empty((b, d, length)) if _keeps_pre_gate(z, add, keep, gate_add) else u.new_empty(_EMPTY,
                                                                                                  dtype=torch.float32)
    return (u.new_empty((b, d, length)), u.new_empty((b, d, n), dtype=torch.float32),
            u.new_empty(states, dtype=torch.float32), pre)


@torch.library.custom_op("ssmdiff::selective_scan_bwd", mutates_args=(), device_types="cpu")
def _scan_bwd(dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
              delta_bias: Optional[torch.Tensor], states: torch.Tensor, softplus: bool, reverse: bool,
              pre_gate: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dadd) in their inputs' dtypes; empty for an absent input.

    ``pre_gate`` (the forward's fourth output) is given for a forward with ``gate_add``, z and add: dz is computed
    from it, and dadd is dout silu(z); otherwise dadd is empty (the caller passes dout itself on)."""
    b, d, length = u.shape
    n = A.shape[1]
    io = _RowIO(_bf16_rows_ok(n))
    f = (io.input("u", u), io.input("delta", delta), _f32(A), _state_last(B), _state_last(C), _f32(D),
         io.input("z", z), _f32(delta_bias))
    dout = io.input("dout", dout)
    du, ddelta = io.output("du", (b, d, length), u.dtype), io.output("ddelta", (b, d, length), delta.dtype)
    dz = io.output("dz", (b, d, length), z.dtype) if z is not None else None
    gated_add = pre_gate is not None and z is not None
    dadd = io.output("dadd", (b, d, length), pre_gate.dtype) if gated_add else None
    dA_rows = torch.empty((b, d, n), dtype=torch.float32)
    dD_rows = torch.empty((b, d), dtype=torch.float32)
    dbias_rows = torch.empty((b, d), dtype=torch.float32)
    a = _args(*f, softplus, reverse)
    pre_in = None
    if gated_add:
        pre_in = io.input("pre_gate", pre_gate)  # held in this frame: the kernel reads it by raw pointer
        a.gate_add, a.pre_gate, a.dadd = 1, _ptr(pre_in), _ptr(dadd)
    a.bf16_io = io.bits
    dB_thr, dC_thr = _thread_accumulators(a)
    a.chunk_states, a.dout = _ptr(states), _ptr(dout)
    a.du, a.ddelta, a.dz = _ptr(du), _ptr(ddelta), _ptr(dz)
    a.dA_rows, a.dD_rows, a.dbias_rows = _ptr(dA_rows), _ptr(dD_rows), _ptr(dbias_rows)
    _lib.ssmdiff_scan_backward(ctypes.byref(a))

    def bc_grad(buf, X):
        grad = _thread_sum(buf).transpose(-1, -2)  # (b, g, n, l)
        return (grad.squeeze(1) if X.dim() == 3 else grad).to(X.dtype).contiguous()

    def empty():  # one per absent input: outputs of a custom op may not alias each other
        return u.new_empty(_EMPTY)

    return (du.to(u.dtype), ddelta.to(delta.dtype), dA_rows.sum(0).to(A.dtype), bc_grad(dB_thr, B),
            bc_grad(dC_thr, C), empty() if D is None else dD_rows.sum(0).to(D.dtype),
            empty() if z is None else dz.to(z.dtype),
            empty() if delta_bias is None else dbias_rows.sum(0).to(delta_bias.dtype),
            dadd.to(pre_gate.dtype) if gated_add else empty())


def _contiguous_like(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Fake output shaped and typed as ``t`` (empty when absent), contiguous as every real output of these ops is:
    ``empty_like`` would copy the strides of a non-contiguous input."""
    return like.new_empty(_EMPTY) if t is None else t.new_empty(t.shape)


@_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, states, softplus, reverse, pre_gate=None):
    return tuple(_contiguous_like(t, u) for t in (u, delta, A, B, C, D, z, delta_bias,
                                                 pre_gate if pre_gate is not None and z is not None else None))


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, add, softplus, reverse, keep, gate_add = inputs
    ctx.gated_add = _keeps_pre_gate(z, add, keep, gate_add)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2], output[3] if ctx.gated_add else None)
    ctx.flags = (softplus, reverse)
    ctx.add_dtype = None if add is None else add.dtype


def add_gradient(dadd: torch.Tensor, dout: torch.Tensor, add_dtype: torch.dtype | None, gated_add: bool):
    """The gradient of a scan's ``add`` input from ``_scan_bwd``'s dadd: None without add, dadd where add joined
    before the gate, else the output's gradient itself (add was summed after the gate, or there was none)."""
    if add_dtype is None:
        return None
    return (dadd if gated_add else dout).to(add_dtype)


def _scan_backward(ctx, dout, _dlast, _dstates, _dpre):
    u, delta, A, B, C, D, z, delta_bias, states, pre = ctx.saved_tensors
    dout = torch.zeros_like(u) if dout is None else dout
    du, ddelta, dA, dB, dC, dD, dz, dbias, dadd = _scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, states,
                                                            *ctx.flags, pre)
    dadd = add_gradient(dadd, dout, ctx.add_dtype, ctx.gated_add)
    return (du, ddelta, dA, dB, dC, _none_if_empty(dD, D is not None), _none_if_empty(dz, z is not None),
            _none_if_empty(dbias, delta_bias is not None), dadd, None, None, None, None)


_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
                       add=None, gate_add=False):
    """Compiled CPU scan; returns (out in u.dtype, last state (b, d, n) float32). Requires ``available()``.

    ``add`` (u's shape) is added to the output inside the kernel's epilogue, without another pass: after the gate,
    or before it with ``gate_add`` (out = (y + D u + add) silu(z))."""
    if not available():
        raise RuntimeError("the compiled CPU scan is unavailable; use the 'torch' backend")
    # Grad mode is off inside Function.forward, so whether to keep chunk states is decided here.
    keep = needs_grad(u, delta, A, B, C, D, z, delta_bias, add)
    out, last, _, _ = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, add, bool(delta_softplus), bool(reverse),
                                keep, bool(gate_add))
    return out, last


# ------------------------------------------------------------------------- Mamba-2 (SSD): scalar decay per head

SSD_STATES = (8, 16, 32, 64)  # state sizes the kernel's scalar-decay mode is compiled for


def _ssd_bc(xcf: torch.Tensor, E: int, groups: int):
    """B and C as (b, g, l, n) contiguous float32 from their channel-major rows of xc."""
    b, width, length = xcf.shape
    n = (width - E) // (2 * groups)
    return tuple(xcf[:, E + k * groups * n:E + (k + 1) * groups * n].view(b, groups, n, length).transpose(-1, -2)
                 .contiguous() for k in (0, 1))


@torch.library.custom_op("ssmdiff::ssd_scan_fwd", mutates_args=(), device_types="cpu")
def _ssd_fwd(xc: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, D_rows: Optional[torch.Tensor],
             add: Optional[torch.Tensor], E: int, groups: int, head_dim: int, reverse: bool,
             keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's recurrence on the kernel's scalar-decay mode, reading one channel-major tensor.

    xc (b, E + 2 g n, l): the channels of x, then B's groups, then C's, as Mamba-2's conv produces them; delta
    (b, heads, l) already biased and soft-plussed; A (heads,); D_rows (E,) or None; add (b, E, l) or None.
    Returns y (b, E, l) float32 channel-major (plus ``add``) and the chunk states (or an empty tensor). Channel e
    belongs to head e // head_dim; the head's decay exp(delta * A) is computed once per step, not once per state
    entry, and the kernel walks time chunk by chunk across a head's rows (see the C++ file). x is read in place.
    """
    a, _alive = _ssd_args(xc, delta, A, D_rows, E, groups, head_dim, reverse)
    b, _, length = xc.shape
    out = torch.empty((b, E, length), dtype=torch.float32)
    states = torch.empty((b, E, -(-length // CHUNK), a.dstate) if keep else _EMPTY, dtype=torch.float32)
    add = _f32(add)
    a.add, a.out, a.chunk_states = _ptr(add), _ptr(out), _ptr(states) if keep else None
    _lib.ssmdiff_scan_forward(ctypes.byref(a))
    return out, states


@_ssd_fwd.register_fake
def _(xc, delta, A, D_rows, add, E, groups, head_dim, reverse, keep):
    b, width, length = xc.shape
    n = (width - E) // (2 * groups)
    states = (b, E, -(-length // CHUNK), n) if keep else _EMPTY
    return xc.new_empty((b, E, length), dtype=torch.float32), xc.new_empty(states, dtype=torch.float32)


@torch.library.custom_op("ssmdiff::ssd_scan_bwd", mutates_args=(), device_types="cpu")
def _ssd_bwd(dout: torch.Tensor, xc: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
             D_rows: Optional[torch.Tensor], states: torch.Tensor, E: int, groups: int, head_dim: int,
             reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dxc, ddelta, dA, dD_rows or empty): x's gradient written in place into dxc, then B's and C's."""
    b, width, length = xc.shape
    a, f = _ssd_args(xc, delta, A, D_rows, E, groups, head_dim, reverse)
    n = a.dstate
    dout = _f32(dout)
    dxc = torch.empty((b, width, length), dtype=torch.float32)
    ddelta = torch.empty_like(f[1])
    dA_heads = torch.empty((b, A.shape[0]), dtype=torch.float32)
    dD_rows = torch.empty((b, E), dtype=torch.float32)
    dB_thr, dC_thr = _thread_accumulators(a)
    a.chunk_states, a.dout, a.du, a.ddelta = _ptr(states), _ptr(dout), _ptr(dxc), _ptr(ddelta)
    a.dA_rows, a.dD_rows = _ptr(dA_heads), _ptr(dD_rows)
    _lib.ssmdiff_scan_backward(ctypes.byref(a))
    for k, buf in enumerate((dB_thr, dC_thr)):
        dxc[:, E + k * groups * n:E + (k + 1) * groups * n].view(b, groups, n, length).copy_(
            _thread_sum(buf).transpose(-1, -2))
    return (dxc.to(xc.dtype), ddelta.to(delta.dtype), dA_heads.sum(0).to(A.dtype),
            xc.new_empty(_EMPTY) if D_rows is None else dD_rows.sum(0).to(D_rows.dtype))


@_ssd_bwd.register_fake
def _(dout, xc, delta, A, D_rows, states, E, groups, head_dim, reverse):
    return tuple(_contiguous_like(t, xc) for t in (xc, delta, A, D_rows))


def _ssd_setup(ctx, inputs, output):
    xc, delta, A, D_rows, add, E, groups, head_dim, reverse, keep = inputs
    ctx.save_for_backward(xc, delta, A, D_rows, output[1])
    ctx.meta = (E, groups, head_dim, reverse)
    ctx.add_dtype = None if add is None else add.dtype


def _ssd_backward(ctx, dout, _dstates):
    xc, delta, A, D_rows, states = ctx.saved_tensors
    if dout is None:
        dout = xc.new_zeros((xc.shape[0], ctx.meta[0], xc.shape[2]), dtype=torch.float32)
    dxc, ddelta, dA, dD = _ssd_bwd(dout, xc, delta, A, D_rows, states, *ctx.meta)
    return (dxc, ddelta, dA, _none_if_empty(dD, D_rows is not None),
            None if ctx.add_dtype is None else dout.to(ctx.add_dtype), None, None, None, None, None)


_ssd_fwd.register_autograd(_ssd_backward, setup_context=_ssd_setup)


def _ssd_args(xc, delta, A, D_rows, E, groups, head_dim, reverse) -> tuple[_ScanArgs, tuple]:
    """The kernel's arguments in scalar-decay mode, and the float32 tensors they point into (keep them alive
    for the call): x read in place from xc, B and C copied state-last."""
    xcf = _f32(xc)
    Bt, Ct = _ssd_bc(xcf, E, groups)
    f = (xcf, _f32(delta), _f32(A), Bt, Ct, _f32(D_rows))
    b, width, length = xcf.shape
    n = Bt.shape[-1]
    a = _ScanArgs()
    a.batch, a.dim, a.len, a.dstate, a.groups, a.chunk = b, E, length, n, Bt.shape[1], CHUNK
    a.softplus, a.reverse, a.head_dim, a.u_bstride = 0, int(reverse), head_dim, width * length
    a.nthreads = _threads(b * E // head_dim, b * E * length * n)
    a.u, a.delta, a.A, a.B, a.C, a.D = (_ptr(t) for t in f)
    return a, f


def ssd_channel_major(xc, delta, A, D_rows, E: int, groups: int, head_dim: int, reverse: bool = False, add=None):
    """SSD on channel-major inputs: xc (b, E + 2 g n, l) holding x, B's groups and C's (Mamba-2's conv output
    layout), delta (b, heads, l) after bias and softplus, A (heads,), D_rows (E,) or None -> y (b, E, l) float32
    (plus ``add``, the other direction's output, summed inside the kernel). Requires ``available()`` and a state
    size in ``SSD_STATES``."""
    if not available():
        raise RuntimeError("the compiled CPU scan is unavailable; use ssd_chunked")
    n = (xc.shape[1] - E) // (2 * groups)
    if n not in SSD_STATES or xc.shape[1] != E + 2 * groups * n or E % head_dim or (E // head_dim) % groups:
        raise ValueError(f"ssd_channel_major: bad shapes xc {tuple(xc.shape)}, E={E}, groups={groups}, "
                         f"head_dim={head_dim} (state sizes {SSD_STATES})")
    keep = needs_grad(xc, delta, A, D_rows, add)
    return _ssd_fwd(xc, delta.contiguous(), A, D_rows, add, E, groups, head_dim, bool(reverse), keep)[0]


def ssd_scan_cpu(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, reverse=False):
    """SSD (``ssd_chunked``'s arguments and result) on the compiled kernel: x (b, l, heads, p) -> (b, l, heads, p).

    The recurrence runs step by step with the state in registers, one decay exp per step and head; nothing of size
    (length x chunk) is formed, and memory is the inputs plus the state every ``CHUNK`` steps. Needs ``available()``
    and a state size in ``SSD_STATES``. (Mamba-2's CPU path calls ``ssd_channel_major`` on its conv output directly.)
    """
    from .ssd import _prepare_dt

    b, l, h, p = x.shape
    g = B.shape[2]
    delta = _prepare_dt(dt, dt_bias, dt_softplus)
    xc = torch.cat([x.float().permute(0, 2, 3, 1).reshape(b, h * p, l),
                    B.float().permute(0, 2, 3, 1).reshape(b, -1, l), C.float().permute(0, 2, 3, 1).reshape(b, -1, l)],
                   dim=1)
    D_rows = None if D is None else (D.float().repeat_interleave(p) if D.dim() == 1 else D.float().reshape(-1))
    y = ssd_channel_major(xc, delta.transpose(1, 2), A.float(), D_rows, h * p, g, p, reverse)
    return y.view(b, h, p, l).permute(0, 3, 1, 2).to(x.dtype)


# ------------------------------------------------------------------------------------ depthwise conv + SiLU

def _conv_inputs(x: torch.Tensor, params):
    """x for the kernel (bfloat16 kept as is: the kernel widens its rows; anything else float32 contiguous),
    (channels, k) float32 weights and biases from (w0, b0[, w1, b1])."""
    xk = x.detach().contiguous() if x.dtype == torch.bfloat16 else _f32(x)
    return xk, [_f32(w.reshape(w.shape[0], -1)) for w in params[0::2]], [_f32(b) for b in params[1::2]]


def _conv_args(x: torch.Tensor, weights, biases, reverses) -> _ConvSiluArgs:
    b, d, length = x.shape
    a = _ConvSiluArgs()
    a.batch, a.dim, a.len, a.k, a.ndir = b, d, length, weights[0].shape[-1], len(weights)
    a.nthreads = _threads(b * d, b * d * length * a.k * 4)
    a.x = _ptr(x)
    for j, (w, bias, rev) in enumerate(zip(weights, biases, reverses)):
        a.w[j], a.bias[j], a.reverse[j] = _ptr(w), _ptr(bias), int(rev)
    return a


@torch.library.custom_op("ssmdiff::conv_silu_fwd", mutates_args=(), device_types="cpu")
def _conv_fwd(x: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor], w1: Optional[torch.Tensor],
              b1: Optional[torch.Tensor], rev0: bool, rev1: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(depthwise causal/anti-causal conv1d(x)) for one direction (w1 None: the second output is empty) or two
    sharing x, in one pass over x; outputs in x's dtype (computed in float32)."""
    params = [w0, b0] + ([w1, b1] if w1 is not None else [])
    xf, weights, biases = _conv_inputs(x, params)
    outs = [torch.empty_like(xf) for _ in weights]  # bfloat16 rows narrowed in the kernel, else float32
    a = _conv_args(xf, weights, biases, (rev0, rev1)[:len(weights)])
    if xf.dtype == torch.bfloat16:
        a.bf16_io = _CONV_BF16_X | _CONV_BF16_OUT
    for j, o in enumerate(outs):
        a.out[j] = _ptr(o)
    _lib.ssmdiff_conv_silu_forward(ctypes.byref(a))
    outs = [o.to(x.dtype) for o in outs]
    return outs[0], outs[1] if len(outs) > 1 else x.new_empty(_EMPTY)


@_conv_fwd.register_fake
def _(x, w0, b0, w1, b1, rev0, rev1):
    return x.new_empty(x.shape), x.new_empty(x.shape if w1 is not None else _EMPTY)


@torch.library.custom_op("ssmdiff::conv_silu_bwd", mutates_args=(), device_types="cpu")
def _conv_bwd(g0: torch.Tensor, g1: torch.Tensor, x: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor],
              w1: Optional[torch.Tensor], b1: Optional[torch.Tensor], rev0: bool,
              rev1: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx summed over the directions, dw0, db0, dw1, db1), empty for absent parameters. The pre-activations are
    recomputed row by row, so neither they nor per-direction input gradients are ever stored."""
    params = [w0, b0] + ([w1, b1] if w1 is not None else [])
    xf, weights, biases = _conv_inputs(x, params)
    b, d, length = xf.shape
    k = weights[0].shape[-1]
    grads = [g.detach() for g in (g0, g1)[:len(weights)]]
    bf16_grads = all(g.dtype == torch.bfloat16 for g in grads)
    grads = [g.contiguous() if bf16_grads else _f32(g) for g in grads]
    a = _conv_args(xf, weights, biases, (rev0, rev1)[:len(weights)])
    dx = torch.empty_like(xf)  # bfloat16 exactly when x is
    a.bf16_io = (_CONV_BF16_X | _CONV_BF16_DX) if xf.dtype == torch.bfloat16 else 0
    if bf16_grads:
        a.bf16_io |= _CONV_BF16_GOUT
    dws = [torch.empty((b, d, k), dtype=torch.float32) for _ in weights]
    dbs = [torch.empty((b, d), dtype=torch.float32) if bias is not None else None for bias in biases]
    a.dx = _ptr(dx)
    for j, g in enumerate(grads):
        a.gout[j], a.dw_rows[j], a.db_rows[j] = _ptr(g), _ptr(dws[j]), _ptr(dbs[j])
    _lib.ssmdiff_conv_silu_backward(ctypes.byref(a))
    out = [dx.to(x.dtype)]
    for j in range(2):
        w, bias = (w0, b0) if j == 0 else (w1, b1)
        out.append(x.new_empty(_EMPTY) if w is None else dws[j].sum(0).reshape(w.shape).to(w.dtype))
        out.append(x.new_empty(_EMPTY) if bias is None or w is None else dbs[j].sum(0).to(bias.dtype))
    return tuple(out)


@_conv_bwd.register_fake
def _(g0, g1, x, w0, b0, w1, b1, rev0, rev1):
    return tuple(_contiguous_like(t, x) for t in (x, w0, b0, w1, b1))


def _conv_setup(ctx, inputs, output):
    x, w0, b0, w1, b1, rev0, rev1 = inputs
    ctx.save_for_backward(x, w0, b0, w1, b1)
    ctx.revs = (rev0, rev1)


def _conv_backward(ctx, g0, g1):
    x, w0, b0, w1, b1 = ctx.saved_tensors
    g0 = torch.zeros_like(x) if g0 is None else g0
    g1 = torch.zeros_like(x) if g1 is None or (w1 is not None and g1.numel() != x.numel()) else g1
    dx, dw0, db0, dw1, db1 = _conv_bwd(g0, g1, x, w0, b0, w1, b1, *ctx.revs)
    return (dx, dw0, _none_if_empty(db0, b0 is not None), _none_if_empty(dw1, w1 is not None),
            _none_if_empty(db1, b1 is not None), None, None)


_conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


def conv_silu_cpu(x: torch.Tensor, convs) -> tuple[torch.Tensor, ...]:
    """The compiled conv + SiLU for one or two ``(weight, bias, reverse)`` directions reading x (batch, channels,
    length); one output per direction. Requires ``available()``."""
    if not available():
        raise RuntimeError("the compiled CPU kernels are unavailable")
    (w0, b0, r0), *rest = convs
    w1, b1, r1 = rest[0] if rest else (None, None, False)
    y0, y1 = _conv_fwd(x, w0, b0, w1, b1, bool(r0), bool(r1))
    return (y0, y1) if rest else (y0,)


# ---------------------------------------------------------------------------------- residual add + RMSNorm

def _add_norm_args(h: torch.Tensor, res_out: torch.Tensor, weight: torch.Tensor, res, scale, eps: float,
                   rstd: torch.Tensor) -> _AddNormArgs:
    a = _AddNormArgs()
    a.dim = h.shape[-1]
    a.rows = h.numel() // a.dim
    a.rows_per_sample = max(1, a.rows // h.shape[0])
    a.nthreads = _threads(a.rows, h.numel() * 4)
    a.eps = float(eps)
    a.h, a.res, a.scale, a.weight = _ptr(h), _ptr(res), _ptr(scale), _ptr(weight)
    a.res_out, a.rstd = _ptr(res_out), _ptr(rstd)
    a.bf16_io = (_ADDNORM_BF16_H | _ADDNORM_BF16_NORMED) if h.dtype == torch.bfloat16 else 0
    return a


@torch.library.custom_op("ssmdiff::add_rms_norm_fwd", mutates_args=(), device_types="cpu")
def _add_norm_fwd(h: torch.Tensor, res: Optional[torch.Tensor], scale: Optional[torch.Tensor], weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normed in h's dtype, res_out float32, rstd float32 per row); see ``add_rms_norm_cpu``."""
    d = h.shape[-1] if h.dim() else 0
    if h.dim() < 2 or tuple(weight.shape) != (d,):
        raise ValueError(f"add_rms_norm: h (batch, ..., dim) with a (dim,) weight; got h {tuple(h.shape)} and weight "
                         f"{tuple(weight.shape)}")
    if res is not None and res.shape != h.shape:
        raise ValueError(f"add_rms_norm: the residual {tuple(res.shape)} must have h's shape {tuple(h.shape)}")
    if scale is not None and tuple(scale.shape) != (h.shape[0],):
        raise ValueError(f"add_rms_norm: scale must hold one factor per sample, ({h.shape[0]},); got "
                         f"{tuple(scale.shape)}")
    dtype = h.dtype
    h = h.detach().contiguous() if dtype in (torch.float32, torch.bfloat16) else _f32(h)
    if h.numel() == 0:
        return (h.new_empty(h.shape, dtype=dtype), h.new_empty(h.shape, dtype=torch.float32),
                h.new_empty(h.shape[:-1], dtype=torch.float32))
    res = None if res is None else _f32(res)
    scale = None if scale is None or res is None else _f32(scale)
    w = _f32(weight)
    res_out = torch.empty(h.shape, dtype=torch.float32)
    normed = torch.empty_like(h)
    rstd = torch.empty(h.shape[:-1], dtype=torch.float32)
    a = _add_norm_args(h, res_out, w, res, scale, eps, rstd)
    a.normed = _ptr(normed)
    _lib.ssmdiff_add_norm_forward(ctypes.byref(a))
    return normed.to(dtype), res_out, rstd


@_add_norm_fwd.register_fake
def _(h, res, scale, weight, eps):
    return h.new_empty(h.shape), h.new_empty(h.shape, dtype=torch.float32), h.new_empty(h.shape[:-1],
                                                                                         dtype=torch.float32)


@torch.library.custom_op("ssmdiff::add_rms_norm_bwd", mutates_args=(), device_types="cpu")
def _add_norm_bwd(gnormed: torch.Tensor, gres: Optional[torch.Tensor], res_out: torch.Tensor, rstd: torch.Tensor,
                  scale: Optional[torch.Tensor], weight: torch.Tensor,
                  has_res: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh in gnormed's dtype, dres float32 (empty without a residual input), dweight in weight's dtype)."""
    g = gnormed.detach().contiguous()
    if g.dtype not in (torch.float32, torch.bfloat16):
        g = g.float()
    if g.numel() == 0:
        return (torch.empty_like(g), res_out.new_empty(res_out.shape if has_res else _EMPTY),
                torch.zeros_like(weight))
    gres = None if gres is None else _f32(gres)
    w = _f32(weight)
    dh = torch.empty_like(g)
    dres = torch.empty(res_out.shape, dtype=torch.float32) if has_res else None
    a = _add_norm_args(g, res_out, w, None, _f32(scale) if has_res and scale is not None else None, 0.0, rstd)
    dw = torch.zeros((max(1, a.nthreads), a.dim), dtype=torch.float32)
    a.gnormed, a.gres, a.dres, a.dh, a.dw_threads = _ptr(g), _ptr(gres), _ptr(dres), _ptr(dh), _ptr(dw)
    _lib.ssmdiff_add_norm_backward(ctypes.byref(a))
    return dh, (dres if has_res else res_out.new_empty(_EMPTY)), dw.sum(0).to(weight.dtype)


@_add_norm_bwd.register_fake
def _(gnormed, gres, res_out, rstd, scale, weight, has_res):
    dh = gnormed.new_empty(gnormed.shape, dtype=gnormed.dtype if gnormed.dtype in (torch.float32, torch.bfloat16)
                           else torch.float32)
    return dh, res_out.new_empty(res_out.shape if has_res else _EMPTY), weight.new_empty(weight.shape)


def _add_norm_setup(ctx, inputs, output):
    h, res, scale, weight, eps = inputs
    _, res_out, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(res_out, rstd, None if res is None else scale, weight)
    ctx.has_res = res is not None
    ctx.h_dtype = h.dtype


def _add_norm_backward(ctx, gnormed, gres, _grstd):
    res_out, rstd, scale, weight = ctx.saved_tensors
    if gnormed is None:
        gnormed = torch.zeros(res_out.shape, dtype=ctx.h_dtype)
    dh, dres, dw = _add_norm_bwd(gnormed, gres, res_out, rstd, scale, weight, ctx.has_res)
    return dh.to(ctx.h_dtype), (dres if ctx.has_res else None), None, dw, None


_add_norm_fwd.register_autograd(_add_norm_backward, setup_context=_add_norm_setup)


def add_rms_norm_cpu(h: torch.Tensor, res: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(res_out) * weight in h's dtype, res_out float32) with res_out = res + scale[sample] * h, or h without
    res; h (batch, ..., dim) float32 or bfloat16, res float32 of h's shape, scale (batch,) or None. One pass over the
    rows forward and one backward. Requires ``available()``."""
    if not available():
        raise RuntimeError("the compiled CPU kernels are unavailable")
    normed, res_out, _ = _add_norm_fwd(h, res, scale, weight, float(eps))
    return normed, res_out


# ------------------------------------------------------------------- layout: token-major <-> channel-major

def _transpose_into(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[b, c, r] = src[b, r, c]: float32 3-D tensors with unit stride along their last axis (either may be a
    column slice of a wider tensor)."""
    b, rows, cols = src.shape
    a = _TransposeArgs()
    a.batch, a.rows, a.cols = b, rows, cols
    a.src_bstride, a.src_rstride = src.stride(0), src.stride(1)
    a.dst_bstride, a.dst_rstride = dst.stride(0), dst.stride(1)
    a.nthreads = _threads(b * rows, b * rows * cols)
    a.src, a.dst = _ptr(src), _ptr(dst)
    _lib.ssmdiff_transpose(ctypes.byref(a))


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("ssmdiff::to_channel_major", mutates_args=(), device_types="cpu")
def _to_channel_major(x: torch.Tensor, splits: list[int]) -> list[torch.Tensor]:
    """x (batch, length, sum(splits)) float32 -> one contiguous (batch, splits[i], length) tensor per split."""
    x = _unit_last(x)
    b, length, _ = x.shape
    outs, c0 = [], 0
    for c in splits:
        out = torch.empty((b, c, length), dtype=torch.float32)
        _transpose_into(x[:, :, c0:c0 + c], out)
        outs.append(out)
        c0 += c
    return outs


@_to_channel_major.register_fake
def _(x, splits):
    return [x.new_empty((x.shape[0], c, x.shape[1])) for c in splits]


@torch.library.custom_op("ssmdiff::to_token_major", mutates_args=(), device_types="cpu")
def _to_token_major(xs: list[torch.Tensor]) -> torch.Tensor:
    """[(batch, c_i, length)] float32 -> (batch, length, sum c_i) contiguous, the parts side by side."""
    b, _, length = xs[0].shape
    out = torch.empty((b, length, sum(x.shape[1] for x in xs)), dtype=torch.float32)
    c0 = 0
    for x in xs:
        _transpose_into(_unit_last(x), out[:, :, c0:c0 + x.shape[1]])
        c0 += x.shape[1]
    return out


@_to_token_major.register_fake
def _(xs):
    return xs[0].new_empty((xs[0].shape[0], xs[0].shape[2], sum(x.shape[1] for x in xs)))


def _channel_major_backward(ctx, grads):
    b, length, _ = ctx.shape
    grads = [g if g is not None else torch.zeros((b, 1, length)).expand(b, c, length)
             for g, c in zip(grads, ctx.splits)]
    return _to_token_major([g.float() for g in grads]), None


def _channel_major_setup_splits(ctx, inputs, output):
    ctx.shape, ctx.splits = inputs[0].shape, list(inputs[1])


def _token_major_setup(ctx, inputs, output):
    ctx.splits = [x.shape[1] for x in inputs[0]]


def _token_major_backward(ctx, grad):
    return list(_to_channel_major(grad.float(), ctx.splits))


_to_channel_major.register_autograd(_channel_major_backward, setup_context=_channel_major_setup_splits)
_to_token_major.register_autograd(_token_major_backward, setup_context=_token_major_setup)


def _layout_kernel_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and available()


def channel_major(x: torch.Tensor, splits) -> list[torch.Tensor]:
    """x (batch, length, sum(splits)) -> [(batch, splits[i], length)], contiguous: the token-major output of a linear
    layer into the channel-major layout of the scan and conv kernels, with the compiled transpose on CPU float32
    (and ``.transpose().contiguous()`` elsewhere). Differentiable; the backward is ``token_major``."""
    splits = [int(c) for c in splits]
    if x.dim() != 3 or sum(splits) != x.shape[-1]:
        raise ValueError(f"channel_major: x {tuple(x.shape)} does not split into {splits} channels")
    if _layout_kernel_ok(x):
        return list(_to_channel_major(x, splits))
    return [t.transpose(1, 2).contiguous() for t in torch.split(x, splits, dim=-1)]


def token_major(xs) -> torch.Tensor:
    """[(batch, c_i, length)] -> (batch, length, sum c_i) contiguous; the inverse of ``channel_major``."""
    xs = list(xs)
    if any(x.dim() != 3 or x.shape[0] != xs[0].shape[0] or x.shape[2] != xs[0].shape[2] for x in xs):
        raise ValueError(f"token_major: parts of shapes {[tuple(x.shape) for x in xs]} do not line up")
    if all(_layout_kernel_ok(x) for x in xs):
        return _to_token_major(xs)
    return torch.cat([x.transpose(1, 2) for x in xs], dim=-1).contiguous()
