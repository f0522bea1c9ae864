"""Triton selective scan (Mamba-1) for NVIDIA GPUs without mamba-ssm: forward and backward, no
(batch, length, channels, state) tensor in global memory.

mamba-ssm's CUDA kernels are the fast path on GPUs, but they are source-only on PyPI and compile for a long time
against one torch/CUDA pair; without them ``selective_scan`` used the chunked pure-PyTorch scan, which writes
several (batch, channels, chunk, state) tensors per chunk. Triton ships with PyTorch's CUDA wheels and compiles these
kernels at first use instead.

Each program owns ``BD`` channels of one batch element and walks the sequence in tiles of ``BT`` steps, in scan order
(from the end for ``reverse``, by index arithmetic: nothing is flipped). Inside a tile the recurrence
h_s = a_s h_{s-1} + x_s (a = exp(dt A), x = dt u B) is a ``tl.associative_scan`` over (a, x) pairs composed as affine
maps, and the state entering the tile is added through the scanned product of decays, so the state lives in
registers across tiles. The forward keeps that entering state per tile for the backward (``states``: (batch,
channels, tiles, state) float32, one float per position and row at state 16 and ``BT`` 16). The backward walks the
tiles from the last: it recomputes the states before each position (a scan of the previous positions' pairs), takes
dh_s = g_s C_s + a_{s+1} dh_{s+1} as a reverse scan, and adds the per-program sums of dB and dC (over its channels)
and of dA, dD and the delta bias (over its positions) into float32 buffers with atomics.

Semantics are ``selective_scan``'s, with ``add`` and ``gate_add`` applied in the epilogue. ``TRITON_INTERPRET=1``
runs the kernels on CPU tensors through Triton's interpreter (how the tests check them without a GPU).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from ._scan_cpu import add_gradient
from .grad import needs_grad

__all__ = ["available", "compile_report", "interpreted", "selective_scan_triton", "self_check"]

BT = 16  # time steps per tile; the forward and backward must agree (the saved states are per tile)
BD_FWD, BD_BWD = 16, 8  # channels per program
NUM_WARPS = 4


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # not installed (torch's CPU wheels do not bring it) or broken
        return None
    return triton


def interpreted() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result  # under torch.compile: decided once while tracing, never traced into
def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with Triton importable, or any CPU tensor under
    Triton's interpreter; and they passed ``self_check`` there (once per device and process)."""
    if _triton() is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return _checked(str(torch.device("cuda", device.index if device.index is not None
                                         else torch.cuda.current_device())))
    return device.type == "cpu" and interpreted() and _checked("cpu")


@functools.lru_cache(maxsize=None)
def _checked(device: str) -> bool:
    try:
        # The first scan often comes under inference_mode (sampling) or autocast: the check needs autograd and
        # float32 whatever the caller's modes.
        dev = torch.device(device)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(dev.type, enabled=False):
            err = self_check(dev)
    except Exception as e:  # a Triton too old for these kernels, a compiler failure, ...
        warnings.warn(f"ssmdiff: the Triton selective scan failed on {device} ({type(e).__name__}: {e}); using "
                      "the PyTorch scan there", RuntimeWarning, stacklevel=3)
        return False
    if err > 1e-3:
        warnings.warn(f"ssmdiff: the Triton selective scan disagrees with the PyTorch scan on {device} (relative "
                      f"error {err:.1e}); using the PyTorch scan there", RuntimeWarning, stacklevel=3)
        return False
    return True


def self_check(device: torch.device) -> float:
    """Largest relative difference between the Triton kernels and the chunked PyTorch scan (``_scan_torch``) on a
    small case with every option (z, D, delta bias with softplus, grouped B/C, ``add`` gated with the sum, both
    directions, several tiles, float32 and bf16 rows), outputs and all gradients; bf16 differences count a fiftieth.
    ``available`` runs it once per device before any model uses the kernels: a Triton build that compiles them
    differently falls back to the PyTorch scan with a warning instead of training on wrong gradients."""
    from ._scan_torch import selective_scan_torch

    g = torch.Generator().manual_seed(0)
    # Two programs per B/C group on a GPU; a smaller case under the interpreter, which runs scans in Python.
    b, d, L, n = (2, 4 * BD_FWD, 2 * BT + 5, 16) if device.type == "cuda" else (1, 8, BT + 5, 4)

    worst = 0.0
    # float32 both ways, then bf16 rows (u, delta, B, C, z, add: what a bf16-autocast model hands over) forwards,
    # whose rounding (8 bits of mantissa, about 4e-3) is scaled down to count like float32 error.
    for reverse, rows, scale in ((False, torch.float32, 1.0), (True, torch.float32, 1.0), (True, torch.bfloat16, 0.02)):
        def r(*shape, sd=1.0, shift=0.0, dtype=rows):
            return (torch.randn(*shape, generator=g) * sd + shift).to(device, dtype).requires_grad_()

        u, delta, z, add = r(b, d, L), r(b, d, L, sd=0.5, shift=-1.0), r(b, d, L), r(b, d, L)
        A = (-torch.rand(d, n, generator=g) * 4 - 0.5).to(device).requires_grad_()
        B, C = r(b, 2, n, L), r(b, 2, n, L)
        D, bias = r(d, dtype=torch.float32), r(d, sd=0.3, dtype=torch.float32)
        ins = (u, delta, A, B, C, D, z, bias, add)
        gout = torch.randn(b, d, L, generator=g).to(device, rows)
        with torch.enable_grad():
            out, last = selective_scan_triton(u, delta, A, B, C, D, z, bias, True, reverse, add=add, gate_add=True)
            grads = torch.autograd.grad(out, ins, gout)
            ref, last_r = selective_scan_torch(u, delta, A, B, C, D, None, bias, True, reverse)
            ref = ((ref.float() + add.float()) * torch.nn.functional.silu(z.float())).to(rows)
            grads_r = torch.autograd.grad(ref, ins, gout)
        for x, y in ((out, ref), (last, last_r), *zip(grads, grads_r)):
            x, y = x.float(), y.float()
            worst = max(worst, scale * ((x - y).abs().max() / y.abs().max().clamp_min(1e-6)).item())
    return worst


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton

    from . import _scan_triton_kernels as k

    return triton, k.scan_fwd, k.scan_bwd


# The tensors each kernel reads or writes in the rows' dtype (bf16 under autocast); every other pointer is float32.
_ROW_POINTERS = {"u_ptr", "dt_ptr", "z_ptr", "add_ptr", "out_ptr", "g_ptr", "du_ptr", "ddt_ptr", "dz_ptr", "dadd_ptr"}


def compile_report(arch: int = 90, state: int = 16, row_dtype: str = "fp32") -> dict:
    """Compile both kernels for NVIDIA compute capability ``arch`` (90: H100/H200, 80: A100) at the module's
    tiling, with every option on, without a GPU (Triton ships ptxas), and read each cubin's resource usage with the
    cuobjdump Triton ships: {"scan_fwd": {"registers", "spill_bytes" (stack frame + local memory: 0 when
    nothing spills), "shared_bytes"}, "scan_bwd": ...}.
    Needs Triton, and not its interpreter."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreted():
        raise RuntimeError("compile_report compiles for a GPU: unset TRITON_INTERPRET")
    from . import _scan_triton_kernels as k

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    np2 = triton.next_power_of_2(state)
    report = {}
    for fn, bd in ((k.scan_fwd, BD_FWD), (k.scan_bwd, BD_BWD)):
        tiles = {"BD": _block(bd, bd, np2), "BT": BT, "NP": np2}
        signature, constants = {}, {}
        for name in fn.arg_names:
            if name.endswith("_ptr"):
                signature[name] = "*" + (("bf16" if row_dtype == "bf16" else "fp32") if name in _ROW_POINTERS
                                         else "fp32")
            elif name.isupper():
                signature[name] = "constexpr"
                constants[name] = tiles.get(name, True)
            else:
                signature[name] = "i32"
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constants),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        # Spilled registers show up as stack frame (with the ABI ptxas uses) or local memory.
        report[fn.__name__] = {"registers": int(m.group(1)), "shared_bytes": int(m.group(3)),
                               "spill_bytes": int(m.group(2)) + int(m.group(4))}
    return report


def _block(bd: int, ch_per_group: int, np2: int) -> int:
    """Channels per program: ``bd`` (scaled down for states above 16, so that a tile's (channels, steps, states)
    tensors stay the size the defaults give at state 16), or the largest power of two dividing the channels of one
    B/C group."""
    if np2 > 16:
        bd = max(1, bd * 16 // np2)
    while ch_per_group % bd:
        bd //= 2
    return bd


def _strides3(x):
    return (0, 0, 0) if x is None else tuple(x.stride())


def _bc4(X: torch.Tensor) -> torch.Tensor:
    return X.unsqueeze(1) if X.dim() == 3 else X


def _shared_args(u, delta, A, B4, C4, D, z, delta_bias, add, gate_add, softplus, reverse, bt, dummy):
    """What both kernels take: the input pointers (``dummy`` for absent optional ones, never read: the flags remove
    their loads), (d, L, n, channels per B/C group, tiles), the inputs' strides, and the constexpr flags with the
    launch options. ``gate_add`` is already False without add or z."""
    triton = _triton()
    d, L = u.shape[1:]
    n = A.shape[1]
    pointers = (u, delta, A, B4, C4, *(dummy if t is None else t for t in (D, z, delta_bias, add)))
    geometry = (d, L, n, d // B4.shape[1], triton.cdiv(L, bt))
    strides = (*u.stride(), *delta.stride(), *B4.stride(), *C4.stride(), *_strides3(z), *_strides3(add))
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_ADD=add is not None,
                 GATE_ADD=gate_add, SOFTPLUS=bool(softplus), REVERSE=bool(reverse), BT=bt,
                 NP=triton.next_power_of_2(n), num_warps=NUM_WARPS)
    return pointers, geometry, strides, flags


def _forward(u, delta, A, B4, C4, D, z, delta_bias, add, gate_add, delta_softplus, reverse, save_states, bt):
    triton, fwd, _ = _kernels()
    b, d, L = u.shape
    out = torch.empty((b, d, L), dtype=u.dtype, device=u.device)
    pointers, geometry, strides, flags = _shared_args(u, delta, A, B4, C4, D, z, delta_bias, add, gate_add,
                                                      delta_softplus, reverse, bt, out)
    n, cpg, ntiles = geometry[2:]
    last = torch.empty((b, d, n), dtype=torch.float32, device=u.device)
    states = (torch.empty((b, d, ntiles, n), dtype=torch.float32, device=u.device) if save_states
              else torch.empty(0, dtype=torch.float32, device=u.device))
    bd = _block(BD_FWD, cpg, flags["NP"])
    fwd[(b, triton.cdiv(d, bd))](*pointers, out, last, states, *geometry, *strides, *out.stride(),
                                 SAVE_STATES=save_states, BD=bd, **flags)
    return out, last, states


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, add, gate_add, delta_softplus, reverse):
        ctx.bt = BT  # the backward walks the same tiles whatever BT is by then
        out, last, states = _forward(u, delta, A, _bc4(B), _bc4(C), D, z, delta_bias, add, gate_add, delta_softplus,
                                     reverse, True, ctx.bt)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, add, states)
        ctx.flags = (gate_add, delta_softplus, reverse)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, delta_bias, add, states = ctx.saved_tensors
        gate_add = ctx.flags[0]
        triton, _, bwd = _kernels()
        b, d, L = u.shape
        B4 = _bc4(B)
        du = torch.empty((b, d, L), dtype=u.dtype, device=u.device)
        pointers, geometry, strides, flags = _shared_args(u, delta, A, B4, _bc4(C), D, z, delta_bias, add, *ctx.flags,
                                                          ctx.bt, du)
        n, cpg = geometry[2:4]
        f32 = dict(dtype=torch.float32, device=u.device)
        ddelta = torch.empty((b, d, L), dtype=delta.dtype, device=u.device)
        dz = torch.empty((b, d, L), dtype=z.dtype, device=u.device) if z is not None else None
        dadd = torch.empty((b, d, L), dtype=add.dtype, device=u.device) if gate_add else None
        dA = torch.zeros((d, n), **f32)
        dB = torch.zeros((b, B4.shape[1], n, L), **f32)
        dC = torch.zeros((b, B4.shape[1], n, L), **f32)
        dD = torch.zeros((d,), **f32) if D is not None else None
        dbias = torch.zeros((d,), **f32) if delta_bias is not None else None
        bd = _block(BD_BWD, cpg, flags["NP"])
        bwd[(b, triton.cdiv(d, bd))](
            *pointers, states, dout, du, ddelta, dA, dB, dC, dA if dD is None else dD, du if dz is None else dz,
            dA if dbias is None else dbias, du if dadd is None else dadd, *geometry, *strides, *dout.stride(),
            *dB.stride(), BD=bd, **flags)
        dadd = add_gradient(dadd, dout, None if add is None else add.dtype, gate_add)
        return (du, ddelta, dA.to(A.dtype), dB.reshape(B.shape).to(B.dtype), dC.reshape(C.shape).to(C.dtype),
                None if dD is None else dD.to(D.dtype), dz, None if dbias is None else dbias.to(delta_bias.dtype),
                dadd, None, None, None)


# torch.compile runs the kernels eagerly between its graphs (a graph break per scan): the autograd Function around
# them, the self-check's cache and the batch split are not for Dynamo to trace.
@torch.compiler.disable
def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
                          add=None, gate_add=False):
    """(out in u's dtype, last state (b, d, n) float32), differentiable; inputs validated by ``selective_scan``.
    ``add`` is summed after the gate, or before it with ``gate_add`` and z."""
    gate_add = bool(gate_add and add is not None and z is not None)  # joins before the gate only with both
    # The kernels index A as (d, n) and D, delta_bias as (d,) with unit strides; everything else by its strides.
    A = A.contiguous()
    D = None if D is None else D.contiguous()
    delta_bias = None if delta_bias is None else delta_bias.contiguous()
    b, d, L = u.shape
    if b > 1 and b * d * max(L, -(-L // BT) * A.shape[1]) >= 2**31:
        # The kernels index with 32-bit offsets: run halves of the batch (autograd sums what they share).
        h = b // 2
        parts = [selective_scan_triton(u[sl], delta[sl], A, B[sl], C[sl], D, None if z is None else z[sl], delta_bias,
                                       delta_softplus, reverse, None if add is None else add[sl], gate_add)
                 for sl in (slice(0, h), slice(h, b))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    tensors = (u, delta, A, B, C, D, z, delta_bias, add)
    if not needs_grad(*tensors):
        out, last, _ = _forward(u, delta, A, _bc4(B), _bc4(C), D, z, delta_bias, add, gate_add, delta_softplus,
                                reverse, False, BT)
        return out, last
    return _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, add, gate_add, delta_softplus, reverse)
