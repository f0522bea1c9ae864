"""Fast CPU selective scan: a small C++ kernel compiled on first use and called through ctypes.

Why not torch.utils.cpp_extension: torch headers make the first build take about a minute, whereas this file has
no torch dependency and builds in a few seconds with the system compiler. The library is cached under
``$SSMDIFF_CACHE`` (default ``~/.cache/ssmdiff``) in a file named by a hash of source, flags, compiler and CPU, and
written atomically (temporary name, then rename) so parallel processes (pytest-xdist, torchrun) never load a
half-written file. ctypes releases the GIL during the call; the kernel runs its own threads
(``torch.get_num_threads()`` of them).

The autograd Function saves the inputs plus the state at every ``CHUNK``-th step, (batch, channels, length/CHUNK,
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

import torch
from torch.autograd.function import once_differentiable

CHUNK = 64
_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "selective_scan_cpu.cpp"
_ABI_VERSION = 4
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
         ("batch", "dim", "len", "dstate", "groups", "chunk", "softplus", "reverse", "nthreads", "head_dim", "u_bstride")]
        + [(name, ctypes.c_void_p) for name in
           ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "add", "out", "last_state", "chunk_states", "dout",
            "du", "ddelta", "dz", "dA_rows", "dD_rows", "dbias_rows", "dB_threads", "dC_threads")]
    )


class _ConvSiluArgs(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_int64) for name in ("batch", "dim", "len", "k", "ndir", "nthreads")]
        + [("reverse", ctypes.c_int64 * 2), ("x", ctypes.c_void_p), ("w", ctypes.c_void_p * 2),
           ("bias", ctypes.c_void_p * 2), ("out", ctypes.c_void_p * 2), ("gout", ctypes.c_void_p * 2),
           ("dx", ctypes.c_void_p), ("dw_rows", ctypes.c_void_p * 2), ("db_rows", ctypes.c_void_p * 2)]
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
            _lib = lib
        except Exception as exc:  # any failure means "use the PyTorch path", never a crash
            _load_error = str(exc)
            warnings.warn(f"ssmdiff: the fast CPU selective scan is unavailable ({exc}); using the slower pure-PyTorch "
                          f"scan instead", RuntimeWarning, stacklevel=3)
    return _lib


def available() -> bool:
    """Whether the compiled CPU kernel can be used (builds it on first call)."""
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


def _forward(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, reverse, keep_states: bool, add=None, head_dim=0):
    b, d, length = u.shape
    n = Bt.shape[-1]
    out = torch.empty((b, d, length), dtype=torch.float32)
    last = torch.empty((b, d, n), dtype=torch.float32)
    states = torch.empty((b, d, -(-length // CHUNK), n), dtype=torch.float32) if keep_states else None
    a = _args(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, reverse, head_dim)
    a.add = _ptr(add)
    a.out, a.last_state, a.chunk_states = _ptr(out), _ptr(last), _ptr(states)
    _lib.ssmdiff_scan_forward(ctypes.byref(a))
    return out, last, states


def _inputs_f32(u, delta, A, B, C, D, z, delta_bias):
    return (_f32(u), _f32(delta), _f32(A), _state_last(B), _state_last(C), _f32(D), _f32(z), _f32(delta_bias))


class SelectiveScanCPU(torch.autograd.Function):
    """Autograd wrapper of the compiled kernel; inputs already validated by ``selective_scan``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, add, delta_softplus, reverse, keep):
        f = _inputs_f32(u, delta, A, B, C, D, z, delta_bias)
        out, last, states = _forward(*f, delta_softplus, reverse, keep_states=keep, add=_f32(add))
        ctx.flags = (delta_softplus, reverse)
        ctx.add_dtype = None if add is None else add.dtype
        if keep:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.mark_non_differentiable(last)
        return out.to(u.dtype), last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        softplus, reverse = ctx.flags
        f = _inputs_f32(u, delta, A, B, C, D, z, delta_bias)
        b, d, length = u.shape
        n = A.shape[1]
        g = f[3].shape[1]
        dout = _f32(dout)
        du, ddelta = torch.empty_like(f[0]), torch.empty_like(f[0])
        dz = torch.empty_like(f[0]) if z is not None else None
        dA_rows = torch.empty((b, d, n), dtype=torch.float32)
        dD_rows = torch.empty((b, d), dtype=torch.float32)
        dbias_rows = torch.empty((b, d), dtype=torch.float32)
        a = _args(*f, softplus, reverse)
        # One dB/dC accumulator per thread: channels of a group write the same (b, g, l, n) entries.
        dB_thr = torch.zeros((a.nthreads, b, g, length, n), dtype=torch.float32)
        dC_thr = torch.zeros((a.nthreads, b, g, length, n), dtype=torch.float32)
        a.chunk_states, a.dout = _ptr(states), _ptr(dout)
        a.du, a.ddelta, a.dz = _ptr(du), _ptr(ddelta), _ptr(dz)
        a.dA_rows, a.dD_rows, a.dbias_rows = _ptr(dA_rows), _ptr(dD_rows), _ptr(dbias_rows)
        a.dB_threads, a.dC_threads = _ptr(dB_thr), _ptr(dC_thr)
        _lib.ssmdiff_scan_backward(ctypes.byref(a))

        def bc_grad(buf, X):
            grad = buf.sum(0) if buf.shape[0] > 1 else buf[0]
            grad = grad.transpose(-1, -2)  # (b, g, n, l)
            return (grad.squeeze(1) if X.dim() == 3 else grad).to(X.dtype)

        return (du.to(u.dtype), ddelta.to(delta.dtype), dA_rows.sum(0).to(A.dtype), bc_grad(dB_thr, B),
                bc_grad(dC_thr, C), None if D is None else dD_rows.sum(0).to(D.dtype),
                None if z is None else dz.to(z.dtype),
                None if delta_bias is None else dbias_rows.sum(0).to(delta_bias.dtype),
                None if ctx.add_dtype is None else dout.to(ctx.add_dtype), None, None, None)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
                       add=None):
    """Compiled CPU scan; returns (out in u.dtype, last state (b, d, n) float32). Requires ``available()``.

    ``add`` (u's shape) is added to the output inside the kernel's epilogue, without another pass."""
    if load_library() is None:
        raise RuntimeError("the compiled CPU scan is unavailable; use the 'torch' backend")
    # Grad mode is off inside Function.forward, so whether to keep chunk states is decided here.
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (u, delta, A, B, C, D, z, delta_bias, add))
    return SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, add, bool(delta_softplus), bool(reverse),
                                  keep)


# ------------------------------------------------------------------------- Mamba-2 (SSD): scalar decay per head

SSD_STATES = (8, 16, 32, 64)  # state sizes the kernel's scalar-decay mode is compiled for


class SSDScanCPU(torch.autograd.Function):
    """Mamba-2's recurrence on the compiled kernel in scalar-decay mode, reading one channel-major tensor.

    forward(xc (b, E + 2 g n, l): the channels of x, then B's groups, then C's, as Mamba-2's conv produces them;
    delta (b, heads, l) already biased and soft-plussed; A (heads,); D_rows (E,) or None; add (b, E, l) or None;
    E, groups, head_dim, reverse, keep) -> y (b, E, l) float32 channel-major, plus ``add``.
    Channel e belongs to head e // head_dim; the head's decay exp(delta * A) is computed once per step, not once
    per state entry, and the kernel walks time chunk by chunk across a head's rows (see the C++ file). x is read in
    place and its gradient written in place into the one gradient tensor of xc.
    """

    @staticmethod
    def forward(ctx, xc, delta, A, D_rows, add, E, groups, head_dim, reverse, keep):
        b, width, length = xc.shape
        n = (width - E) // (2 * groups)
        xcf = _f32(xc)
        Bt, Ct = (xcf[:, E + k * groups * n:E + (k + 1) * groups * n].view(b, groups, n, length).transpose(-1, -2)
                  .contiguous() for k in (0, 1))
        f = (xcf, _f32(delta), _f32(A), Bt, Ct, _f32(D_rows))
        a = _ssd_args(f, E, head_dim, reverse)
        out = torch.empty((b, E, length), dtype=torch.float32)
        states = torch.empty((b, E, -(-length // CHUNK), n), dtype=torch.float32) if keep else None
        add = _f32(add)
        a.add, a.out, a.chunk_states = _ptr(add), _ptr(out), _ptr(states)
        _lib.ssmdiff_scan_forward(ctypes.byref(a))
        ctx.meta = (E, groups, head_dim, reverse, add is not None)
        if keep:
            ctx.save_for_backward(xc, delta, A, D_rows, states)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        xc, delta, A, D_rows, states = ctx.saved_tensors
        E, groups, head_dim, reverse, has_add = ctx.meta
        b, width, length = xc.shape
        n = (width - E) // (2 * groups)
        xcf = _f32(xc)
        Bt, Ct = (xcf[:, E + k * groups * n:E + (k + 1) * groups * n].view(b, groups, n, length).transpose(-1, -2)
                  .contiguous() for k in (0, 1))
        f = (xcf, _f32(delta), _f32(A), Bt, Ct, _f32(D_rows))
        a = _ssd_args(f, E, head_dim, reverse)
        dout = _f32(dout)
        dxc = torch.empty((b, width, length), dtype=torch.float32)
        ddelta = torch.empty_like(f[1])
        dA_heads = torch.empty((b, A.shape[0]), dtype=torch.float32)
        dD_rows = torch.empty((b, E), dtype=torch.float32)
        dB_thr = torch.zeros((a.nthreads, b, groups, length, n), dtype=torch.float32)
        dC_thr = torch.zeros((a.nthreads, b, groups, length, n), dtype=torch.float32)
        a.chunk_states, a.dout, a.du, a.ddelta = _ptr(states), _ptr(dout), _ptr(dxc), _ptr(ddelta)
        a.dA_rows, a.dD_rows = _ptr(dA_heads), _ptr(dD_rows)
        a.dB_threads, a.dC_threads = _ptr(dB_thr), _ptr(dC_thr)
        _lib.ssmdiff_scan_backward(ctypes.byref(a))
        for k, buf in enumerate((dB_thr, dC_thr)):
            grad = buf.sum(0) if a.nthreads > 1 else buf[0]
            dxc[:, E + k * groups * n:E + (k + 1) * groups * n].view(b, groups, n, length).copy_(grad.transpose(-1, -2))
        return (dxc.to(xc.dtype), ddelta.to(delta.dtype), dA_heads.sum(0).to(A.dtype),
                None if D_rows is None else dD_rows.sum(0).to(D_rows.dtype), dout if has_add else None,
                None, None, None, None, None)


def _ssd_args(f, E, head_dim, reverse) -> _ScanArgs:
    xcf, delta, A, Bt, Ct, D = f
    b, width, length = xcf.shape
    n = Bt.shape[-1]
    a = _ScanArgs()
    a.batch, a.dim, a.len, a.dstate, a.groups, a.chunk = b, E, length, n, Bt.shape[1], CHUNK
    a.softplus, a.reverse, a.head_dim, a.u_bstride = 0, int(reverse), head_dim, width * length
    a.nthreads = _threads(b * E // head_dim, b * E * length * n)
    a.u, a.delta, a.A, a.B, a.C, a.D = _ptr(xcf), _ptr(delta), _ptr(A), _ptr(Bt), _ptr(Ct), _ptr(D)
    return a


def ssd_channel_major(xc, delta, A, D_rows, E: int, groups: int, head_dim: int, reverse: bool = False, add=None):
    """SSD on channel-major inputs: xc (b, E + 2 g n, l) holding x, B's groups and C's (Mamba-2's conv output
    layout), delta (b, heads, l) after bias and softplus, A (heads,), D_rows (E,) or None -> y (b, E, l) float32
    (plus ``add``, the other direction's output, summed inside the kernel). Requires ``available()`` and a state
    size in ``SSD_STATES``."""
    if load_library() is None:
        raise RuntimeError("the compiled CPU scan is unavailable; use ssd_chunked")
    n = (xc.shape[1] - E) // (2 * groups)
    if n not in SSD_STATES or xc.shape[1] != E + 2 * groups * n or E % head_dim or (E // head_dim) % groups:
        raise ValueError(f"ssd_channel_major: bad shapes xc {tuple(xc.shape)}, E={E}, groups={groups}, "
                         f"head_dim={head_dim} (state sizes {SSD_STATES})")
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xc, delta, A, D_rows, add))
    return SSDScanCPU.apply(xc, delta.contiguous(), A, D_rows, add, E, groups, head_dim, bool(reverse), keep)


def ssd_scan_cpu(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, reverse=False):
    """SSD (``ssd_chunked``'s arguments and result) on the compiled kernel: x (b, l, heads, p) -> (b, l, heads, p).

    The recurrence runs step by step with the state in registers, one decay exp per step and head; nothing of size
    (length x chunk) is formed, and memory is the inputs plus the state every ``CHUNK`` steps. Needs ``available()``
    and a state size in ``SSD_STATES``. (Mamba-2's CPU path calls ``ssd_channel_major`` on its conv output directly.)
    """
    b, l, h, p = x.shape
    g = B.shape[2]
    delta = dt.float()
    if dt_bias is not None:
        delta = delta + dt_bias.float()
    if dt_softplus:
        delta = torch.nn.functional.softplus(delta)
    xc = torch.cat([x.float().permute(0, 2, 3, 1).reshape(b, h * p, l),
                    B.float().permute(0, 2, 3, 1).reshape(b, -1, l), C.float().permute(0, 2, 3, 1).reshape(b, -1, l)],
                   dim=1)
    D_rows = None if D is None else (D.float().repeat_interleave(p) if D.dim() == 1 else D.float().reshape(-1))
    y = ssd_channel_major(xc, delta.transpose(1, 2), A.float(), D_rows, h * p, g, p, reverse)
    return y.view(b, h, p, l).permute(0, 3, 1, 2).to(x.dtype)


# ------------------------------------------------------------------------------------ depthwise conv + SiLU

def _conv_inputs(x: torch.Tensor, params):
    """float32 contiguous x, (channels, k) weights and biases from (w0, b0[, w1, b1]) for the kernel."""
    return _f32(x), [_f32(w.reshape(w.shape[0], -1)) for w in params[0::2]], [_f32(b) for b in params[1::2]]


def _conv_args(x: torch.Tensor, weights, biases, reverses) -> _ConvSiluArgs:
    b, d, length = x.shape
    a = _ConvSiluArgs()
    a.batch, a.dim, a.len, a.k, a.ndir = b, d, length, weights[0].shape[-1], len(weights)
    a.nthreads = _threads(b * d, b * d * length * a.k * 4)
    a.x = _ptr(x)
    for j, (w, bias, rev) in enumerate(zip(weights, biases, reverses)):
        a.w[j], a.bias[j], a.reverse[j] = _ptr(w), _ptr(bias), int(rev)
    return a


class ConvSiluCPU(torch.autograd.Function):
    """silu(depthwise causal/anti-causal conv1d(x)) for one or two directions sharing x, in one pass over x.

    forward(x, reverses, w0, b0[, w1, b1]) -> one output per direction, in x's dtype (computed in float32).
    The backward recomputes the pre-activation row by row instead of saving it, and returns dx summed over the
    directions, so neither the pre-activations nor per-direction input gradients are ever stored.
    """

    @staticmethod
    def forward(ctx, x, reverses, *params):
        xf, weights, biases = _conv_inputs(x, params)
        outs = [torch.empty_like(xf) for _ in weights]
        a = _conv_args(xf, weights, biases, reverses)
        for j, o in enumerate(outs):
            a.out[j] = _ptr(o)
        _lib.ssmdiff_conv_silu_forward(ctypes.byref(a))
        ctx.save_for_backward(x, *params)
        ctx.reverses = reverses
        return tuple(o.to(x.dtype) for o in outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, *params = ctx.saved_tensors
        xf, weights, biases = _conv_inputs(x, params)
        b, d, length = xf.shape
        k = weights[0].shape[-1]
        grads = [torch.zeros_like(xf) if g is None else _f32(g) for g in grads]
        a = _conv_args(xf, weights, biases, ctx.reverses)
        dx = torch.empty_like(xf)
        dws = [torch.empty((b, d, k), dtype=torch.float32) for _ in weights]
        dbs = [torch.empty((b, d), dtype=torch.float32) if bias is not None else None for bias in biases]
        a.dx = _ptr(dx)
        for j, g in enumerate(grads):
            a.gout[j], a.dw_rows[j], a.db_rows[j] = _ptr(g), _ptr(dws[j]), _ptr(dbs[j])
        _lib.ssmdiff_conv_silu_backward(ctypes.byref(a))
        out = [dx.to(x.dtype), None]
        for j in range(len(weights)):
            w, bias = params[2 * j], params[2 * j + 1]
            out.append(dws[j].sum(0).reshape(w.shape).to(w.dtype))
            out.append(None if bias is None else dbs[j].sum(0).to(bias.dtype))
        return tuple(out)
