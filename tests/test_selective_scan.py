"""The fast selective-scan paths against the sequential reference (outputs and gradients of every input)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from ssmdiff.ssm import selective_scan, selective_scan_ref
from ssmdiff.ssm.ops import _scan_cpu, _scan_torch, _scan_triton
from ssmdiff.ssm.ops.counting import count_extra_flops
from ssmdiff.ssm.ops.selective_scan import resolve_backend

FP32_TOL = dict(rtol=6e-4, atol=2e-3)
# Same tolerances as mamba-ssm's own kernel tests; bf16 rounding of the outputs (8 bits of mantissa) dominates.
BF16_TOL = dict(rtol=3e-2, atol=5e-2)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

needs_kernel = pytest.mark.skipif(not _scan_cpu.available(), reason="no C++ compiler: compiled CPU scan unavailable")
# The Triton kernels run on CPU tensors only through Triton's interpreter: `pip install triton` and
# `TRITON_INTERPRET=1 pytest -k triton` (torch's CPU wheels bring no Triton, so the default run skips these).
TRITON_CPU = _scan_triton.interpreted() and _scan_triton._triton() is not None
needs_triton_interpreter = pytest.mark.skipif(not TRITON_CPU, reason="needs Triton and TRITON_INTERPRET=1")
# Every backend present here that takes ``add`` (the CPU and Triton kernels sum it themselves).
ADD_BACKENDS = ["ref", "torch"] + (["cpu"] if _scan_cpu.available() else []) + (["triton"] if TRITON_CPU else [])


def make_inputs(batch=2, dim=4, length=16, state=16, groups=None, D=True, z=True, bias=True, dtype=torch.float32,
                device="cpu", softplus=True):
    """Inputs like a Mamba layer's: delta = softplus(-1 +- 0.5) (raw when ``softplus``, the scan applies it),
    A = -(S4D-real init) jittered, float32 A/D/bias."""
    g = torch.Generator().manual_seed(1234 + length)
    shape_bc = (batch, state, length) if groups is None else (batch, groups, state, length)
    t = dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) * 0.5 - 1.0,
        A=-(torch.arange(1, state + 1).float().repeat(dim, 1) * (0.5 + torch.rand(dim, state, generator=g))),
        B=torch.randn(shape_bc, generator=g),
        C=torch.randn(shape_bc, generator=g),
        D=torch.randn(dim, generator=g) if D else None,
        z=torch.randn(batch, dim, length, generator=g) if z else None,
        delta_bias=torch.randn(dim, generator=g) * 0.3 if bias else None,
    )
    if not softplus:  # a scan without softplus is only stable for delta >= 0
        t["delta"] = torch.nn.functional.softplus(t["delta"])
    low = ("u", "delta", "B", "C", "z")  # what a bf16 autocast Mamba block feeds in; A, D, bias stay float32
    return {k: None if v is None else v.to(device=device, dtype=dtype if k in low else torch.float32)
            .requires_grad_() for k, v in t.items()}


@contextlib.contextmanager
def one_thread():
    """The reference runs thousands of tiny ops; on a busy machine each one that opens a parallel region waits for a
    second thread to be scheduled (milliseconds), so it runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(fn, inputs, grad_out, **kw):
    out, last = fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], D=inputs["D"], z=inputs["z"],
                   delta_bias=inputs["delta_bias"], return_last_state=True, **kw)
    present = [k for k in NAMES if inputs[k] is not None]
    grads = torch.autograd.grad(out, [inputs[k] for k in present], grad_out)
    return out, last, dict(zip(present, grads))


def compare(inputs, backend, tol, grad_tol=None, **kw):
    grad_tol = grad_tol or tol
    torch.manual_seed(0)
    u = inputs["u"]
    grad_out = torch.randn(u.shape, device=u.device).to(u.dtype)
    ref_inputs = {k: None if v is None else v.detach().cpu().requires_grad_() for k, v in inputs.items()}
    out, last, grads = run(selective_scan, inputs, grad_out, backend=backend, **kw)
    with one_thread():
        out_r, last_r, grads_r = run(selective_scan_ref, ref_inputs, grad_out.cpu(), **kw)
    assert out.dtype == u.dtype and out.shape == u.shape
    assert last.dtype == torch.float32 and last.shape == (u.shape[0], u.shape[1], inputs["A"].shape[1])
    torch.testing.assert_close(out.cpu(), out_r, **tol)
    torch.testing.assert_close(last.cpu(), last_r, **tol)
    for k, g in grads.items():
        assert g.dtype == inputs[k].dtype, k
        # Gradients summed over many positions (A, D, delta_bias, shared B/C) grow with the length: compare them
        # relative to their own scale, as mamba-ssm's tests do.
        scale = max(1.0, grads_r[k].abs().max().item())
        torch.testing.assert_close(g.cpu().float() / scale, grads_r[k].float() / scale, **grad_tol, msg=k)


OPTION_SETS = {
    "plain": dict(D=False, z=False, bias=False, softplus=False),
    "full": dict(D=True, z=True, bias=True, softplus=True),
}
SINGLE = {
    "D": dict(D=True, z=False, bias=False, softplus=False),
    "z": dict(D=False, z=True, bias=False, softplus=False),
    "bias": dict(D=False, z=False, bias=True, softplus=False),
    "softplus": dict(D=False, z=False, bias=False, softplus=True),
}


def _case(length, opts, groups=None, reverse=False, dim=None, state=16, dtype=torch.float32, device="cpu"):
    # The reference loops over time in Python: keep few channels for the long sequences.
    dim = dim or (4 if length >= 256 else 8)
    inputs = make_inputs(dim=dim, length=length, state=state, groups=groups, D=opts["D"], z=opts["z"],
                         bias=opts["bias"], dtype=dtype, device=device, softplus=opts["softplus"])
    return inputs, dict(delta_softplus=opts["softplus"], reverse=reverse)


@needs_kernel
@pytest.mark.parametrize("length", [1, 7, 256, 1000])
@pytest.mark.parametrize("opts", list(OPTION_SETS))
@pytest.mark.parametrize("reverse", [False, True])
def test_cpu_kernel_matches_reference(length, opts, reverse):
    inputs, kw = _case(length, OPTION_SETS[opts], reverse=reverse)
    compare(inputs, "cpu", FP32_TOL, **kw)


@needs_kernel
@pytest.mark.parametrize("reverse", [False, True])
def test_cpu_kernel_softplus_both_sides_vector_body_and_tail(reverse):
    """The backward's softplus derivative comes from the forward exp (sigmoid(v) = 1/(1+e) or e/(1+e), e = exp(-|v|))
    in whole vectors and in the scalar tail: raw delta on both sides of 0 and far out (|v| = 150, past the clamp),
    at a length with both a vector body and a tail."""
    inputs, kw = _case(1003, OPTION_SETS["full"], reverse=reverse)
    g = torch.Generator().manual_seed(7)
    raw = torch.rand(inputs["delta"].shape, generator=g) * 16 - 8
    raw[0, 0, 3], raw[0, 1, 1001], raw[1, 2, 500], raw[1, 3, 1002] = 150.0, -150.0, -150.0, 150.0
    inputs["delta"] = raw.requires_grad_()
    compare(inputs, "cpu", FP32_TOL, **kw)


@needs_kernel
@pytest.mark.parametrize("opts", list(SINGLE))
def test_cpu_kernel_single_options(opts):
    inputs, kw = _case(256, SINGLE[opts])
    compare(inputs, "cpu", FP32_TOL, **kw)


@needs_kernel
@pytest.mark.parametrize("groups,reverse", [(1, False), (2, True), (4, False)])
@pytest.mark.parametrize("length", [7, 256])
def test_cpu_kernel_grouped_bc(groups, reverse, length):
    inputs, kw = _case(length, OPTION_SETS["full"], groups=groups, reverse=reverse, dim=8)
    compare(inputs, "cpu", FP32_TOL, **kw)


@needs_kernel
@pytest.mark.parametrize("state", [1, 4, 5, 8, 24, 32, 64])
def test_cpu_kernel_state_sizes(state):
    inputs, kw = _case(70, OPTION_SETS["full"], state=state, reverse=state % 2 == 1)
    compare(inputs, "cpu", FP32_TOL, **kw)


def test_kernel_builds_where_a_compiler_is_present():
    """With a C++ compiler on PATH and compiling allowed, the kernel must build. The library falls back to the
    PyTorch scan by design, so a build error would otherwise only turn every kernel test into a skip."""
    if os.environ.get("SSMDIFF_NO_COMPILE") or _scan_cpu._compiler() is None:
        pytest.skip("no C++ compiler, or SSMDIFF_NO_COMPILE set: the fallback is the intended behaviour")
    assert _scan_cpu.available(), _scan_cpu._load_error


@needs_kernel
@pytest.mark.parametrize("dim,groups", [(3, None), (6, 2), (6, 3), (5, None)])
def test_cpu_kernel_row_pairs_across_boundaries(dim, groups):
    """The backward walks rows in pairs that share B and C: odd channel counts and groups of one or three channels
    put a pair's second row in the next batch or group, where the kernel must fall back to one row. Batch 2, so
    rows of both batches meet; one thread, so the pairing follows the row order."""
    with one_thread():
        inputs, kw = _case(37, OPTION_SETS["full"], groups=groups, reverse=dim == 5, dim=dim)
        compare(inputs, "cpu", FP32_TOL, **kw)


@needs_kernel
def test_cpu_kernel_threads_share_b_c_gradients():
    # Large enough to start several threads, whose partial dB/dC are summed afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        inputs, kw = _case(64, OPTION_SETS["full"], dim=64, groups=2)
        compare(inputs, "cpu", FP32_TOL, **kw)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [7, 256])
def test_cpu_kernel_low_precision(dtype, length):
    inputs, kw = _case(length, OPTION_SETS["full"], dtype=dtype, reverse=length == 7)
    compare(inputs, "cpu", BF16_TOL, **kw)


@needs_kernel
@pytest.mark.parametrize("state", [16, 24])
@pytest.mark.parametrize("reverse,gate_add", [(False, False), (True, False), (True, True)])
def test_cpu_kernel_bf16_rows_equal_whole_tensor_conversion(state, reverse, gate_add):
    """bf16 u, delta, z, add (and dout) are widened row by row inside the kernel and out, du, ddelta, dz narrowed
    there with round-to-nearest-even: bit for bit what converting the whole tensors to float32 around the float32
    kernel gives (the path for other dtypes, and for state sizes the vector rows do not take, here 24). Length 1003:
    a vector body and a tail; threads on. With ``gate_add`` add also enters the backward (dz) and dadd comes out."""
    g = torch.Generator().manual_seed(3)
    b, d, L = 2, 24, 1003
    bf = torch.bfloat16
    u, delta, z, add, dout = (torch.randn(b, d, L, generator=g).to(bf) for _ in range(5))
    delta = (delta.float() * 0.5 - 1).to(bf)
    A = -torch.rand(d, state, generator=g) * 4 - 0.5
    B, C = torch.randn(b, state, L, generator=g), torch.randn(b, state, L, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g) * 0.3
    f32 = [t.float() for t in (u, delta, z, add, dout)]
    io = _scan_cpu._RowIO(_scan_cpu._bf16_rows_ok(state))
    assert (io.input("u", u).dtype == bf) == (state == 16) and io.bits == (1 if state == 16 else 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, last, states, pre = _scan_cpu._scan_fwd(u, delta, A, B, C, D, z, bias, add, True, reverse, True,
                                                     gate_add)
        out_r, last_r, states_r, pre_r = _scan_cpu._scan_fwd(*f32[:2], A, B, C, D, f32[2], bias, f32[3], True,
                                                             reverse, True, gate_add)
        assert out.dtype == bf and torch.equal(out, out_r.to(bf))
        assert torch.equal(last, last_r) and torch.equal(states, states_r)
        assert (pre.numel() > 0) == gate_add and torch.equal(pre, pre_r.to(bf) if gate_add else pre_r)
        grads = _scan_cpu._scan_bwd(dout, u, delta, A, B, C, D, z, bias, states, True, reverse,
                                    pre if gate_add else None)
        grads_r = _scan_cpu._scan_bwd(f32[4], *f32[:2], A, B, C, D, f32[2], bias, states_r, True, reverse,
                                      pre.float() if gate_add else None)
    finally:
        torch.set_num_threads(threads)
    assert (grads[8].numel() > 0) == gate_add
    for name, gr, gr_r, like in zip(("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias", "dadd"), grads, grads_r,
                                    (u, delta, A, B, C, D, z, bias, add if gate_add else u.new_empty(0))):
        assert gr.dtype == like.dtype, name
        if name in ("dB", "dC"):  # summed over channels in per-thread slabs: the order varies between calls
            torch.testing.assert_close(gr, gr_r, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(gr, gr_r.to(like.dtype)), name


@needs_kernel
def test_cpu_kernel_extreme_delta_and_gate():
    """The kernel's vector softplus and sigmoid over their whole range: pre-activations of delta from -200 to 1e4
    and gates from -300 to 300 (exp2's argument clamps, softplus(x) = x for large x, silu(z) -> 0 for very negative
    z), forward and gradients against the reference; everything finite."""
    inputs, kw = _case(40, OPTION_SETS["full"], dim=8)
    with torch.no_grad():
        delta = inputs["delta"]
        delta.copy_(torch.linspace(-200.0, 1e4, delta.numel()).reshape(delta.shape)[..., torch.randperm(40)])
        inputs["z"].copy_(torch.linspace(-300.0, 300.0, inputs["z"].numel()).reshape(inputs["z"].shape))
        inputs["u"].mul_(1e-3)  # delta * u stays of order one where delta is large
    compare(inputs, "cpu", FP32_TOL, **kw)


@pytest.mark.parametrize("length", [1, 7, 256, 1000])
@pytest.mark.parametrize("opts", list(OPTION_SETS))
def test_torch_fallback_matches_reference(length, opts):
    inputs, kw = _case(length, OPTION_SETS[opts], reverse=length in (7, 1000))
    compare(inputs, "torch", FP32_TOL, **kw)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_torch_fallback_chunking_and_groups(chunk):
    inputs, kw = _case(70, OPTION_SETS["full"], groups=2, reverse=chunk == 5)
    out_ref, last_ref = selective_scan_ref(*(inputs[k] for k in ("u", "delta", "A", "B", "C")), D=inputs["D"],
                                           z=inputs["z"], delta_bias=inputs["delta_bias"], return_last_state=True,
                                           **kw)
    with torch.no_grad():
        out, last = _scan_torch.selective_scan_torch(*(inputs[k] for k in NAMES), chunk=chunk, **kw)
    torch.testing.assert_close(out, out_ref, **FP32_TOL)
    torch.testing.assert_close(last, last_ref, **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_torch_fallback_low_precision(dtype):
    inputs, kw = _case(100, OPTION_SETS["full"], dtype=dtype)
    compare(inputs, "torch", BF16_TOL, **kw)


def test_reverse_equals_flipped_forward():
    """Independent check of reverse semantics: reversing = scanning the time-flipped sequence, flipped back."""
    inputs, kw = _case(50, OPTION_SETS["full"])
    kw.pop("reverse")
    x = {k: None if v is None else v.detach() for k, v in inputs.items()}
    flip = {k: (v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    expected, last_expected = selective_scan_ref(*(flip[k] for k in ("u", "delta", "A", "B", "C")), D=flip["D"],
                                                 z=flip["z"], delta_bias=flip["delta_bias"], return_last_state=True,
                                                 **kw)
    for backend in ["ref", "torch"] + (["cpu"] if _scan_cpu.available() else []):
        out, last = selective_scan(*(x[k] for k in ("u", "delta", "A", "B", "C")), D=x["D"], z=x["z"],
                                   delta_bias=x["delta_bias"], return_last_state=True, reverse=True,
                                   backend=backend, **kw)
        torch.testing.assert_close(out, expected.flip(-1), **FP32_TOL)
        torch.testing.assert_close(last, last_expected, **FP32_TOL)


@pytest.mark.parametrize("opts", ["full", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_is_summed_into_the_output_with_its_gradient_passed_through(opts, dtype):
    """``add`` (summed in the CPU kernel's epilogue, added afterwards elsewhere) = scan(...) + add, and its gradient
    is the output gradient; every other gradient is the plain scan's."""
    inputs, kw = _case(70, OPTION_SETS[opts], reverse=True)
    add = torch.randn(inputs["u"].shape).to(dtype).requires_grad_()
    grad_out = torch.randn(inputs["u"].shape)
    present = [k for k in NAMES if inputs[k] is not None]
    expected, _, grads_e = run(selective_scan_ref, inputs, grad_out, **kw)
    expected = expected + add.detach().float()
    for backend in ADD_BACKENDS:
        out = selective_scan(*(inputs[k] for k in ("u", "delta", "A", "B", "C")), D=inputs["D"], z=inputs["z"],
                             delta_bias=inputs["delta_bias"], add=add, backend=backend, **kw)
        assert out.dtype == inputs["u"].dtype  # the output keeps u's dtype whatever add's is
        torch.testing.assert_close(out, expected, **FP32_TOL)
        grads = torch.autograd.grad(out, [add] + [inputs[k] for k in present], grad_out)
        assert grads[0].dtype == dtype
        torch.testing.assert_close(grads[0], grad_out.to(dtype), rtol=0, atol=0)
        for k, g in zip(present, grads[1:]):
            scale = max(1.0, grads_e[k].abs().max().item())
            torch.testing.assert_close(g / scale, grads_e[k] / scale, **FP32_TOL, msg=f"{backend} {k}")


@pytest.mark.parametrize("state", [16, 24])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_add_sums_before_the_gate(state, reverse, dtype):
    """``gate_add``: out = (scan without z + add) * silu(z), written out with the reference as the formula, for
    every backend (the CPU kernel's vector rows at state 16, its scalar rows at 24), with the gradients of every
    input and of add (then dout * silu(z), not dout). Without z it is the plain add."""
    inputs, kw = _case(70, OPTION_SETS["full"], state=state, reverse=reverse)
    add = torch.randn(inputs["u"].shape).to(dtype).requires_grad_()
    grad_out = torch.randn(inputs["u"].shape)
    present = [k for k in NAMES if inputs[k] is not None]
    scan_args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]

    def formula():
        y = selective_scan_ref(*scan_args, D=inputs["D"], delta_bias=inputs["delta_bias"], **kw)
        return (y + add.float()) * F.silu(inputs["z"].float())

    expected = formula()
    grads_e = torch.autograd.grad(expected, [add] + [inputs[k] for k in present], grad_out)
    for backend in ADD_BACKENDS:
        out = selective_scan(*scan_args, D=inputs["D"], z=inputs["z"], delta_bias=inputs["delta_bias"], add=add,
                             gate_add=True, backend=backend, **kw)
        assert out.dtype == inputs["u"].dtype
        torch.testing.assert_close(out, expected.detach(), **FP32_TOL, msg=backend)
        grads = torch.autograd.grad(out, [add] + [inputs[k] for k in present], grad_out)
        assert grads[0].dtype == dtype
        for k, g, ge in zip(["add"] + present, grads, grads_e):
            scale = max(1.0, ge.abs().max().item())
            tol = FP32_TOL if dtype == torch.float32 or k != "add" else BF16_TOL
            torch.testing.assert_close(g.float() / scale, ge.float() / scale, **tol, msg=f"{backend} {k}")
        no_z = selective_scan(*scan_args, D=inputs["D"], delta_bias=inputs["delta_bias"], add=add, gate_add=True,
                              backend=backend, **kw)
        plain = selective_scan(*scan_args, D=inputs["D"], delta_bias=inputs["delta_bias"], add=add, backend=backend,
                               **kw)
        assert torch.equal(no_z, plain), backend


def test_reference_matches_hand_computed_recurrence():
    """The reference itself against the formula written out for one channel, one state, three steps."""
    u = torch.tensor([[[1.0, 2.0, -1.0]]])
    delta = torch.tensor([[[0.5, 0.1, 1.0]]])
    A = torch.tensor([[-1.0]])
    B = torch.tensor([[[1.0, 0.5, 2.0]]])
    C = torch.tensor([[[2.0, 1.0, -1.0]]])
    h, ys = 0.0, []
    for t in range(3):
        h = torch.exp(delta[0, 0, t] * A[0, 0]) * h + delta[0, 0, t] * B[0, 0, t] * u[0, 0, t]
        ys.append(C[0, 0, t] * h)
    for backend in ["ref", "torch"] + (["cpu"] if _scan_cpu.available() else []):
        torch.testing.assert_close(selective_scan(u, delta, A, B, C, backend=backend)[0, 0], torch.stack(ys))


@needs_kernel
def test_cpu_kernel_saves_no_full_state_tensor():
    """Autograd keeps the inputs plus one state every CHUNK steps, never (batch, length, channels, state)."""
    inputs, kw = _case(512, OPTION_SETS["full"], dim=32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(*(inputs[k] for k in ("u", "delta", "A", "B", "C")), D=inputs["D"], z=inputs["z"],
                       delta_bias=inputs["delta_bias"], backend="cpu", **kw)
    b, d, length = inputs["u"].shape
    n = inputs["A"].shape[1]
    assert saved and max(saved) < b * d * length * n // 8
    saved.clear()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(*(inputs[k] for k in ("u", "delta", "A", "B", "C")), backend="cpu")
    assert saved == []


@needs_kernel
def test_cpu_kernel_without_grad_inputs_keeps_nothing():
    x = {k: None if v is None else v.detach() for k, v in make_inputs(length=100).items()}
    out = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], backend="cpu")
    assert out.grad_fn is None


def test_meta_tensors_return_shapes_and_count_flops():
    b, d, length, n = 2, 768, 4096, 16
    meta = dict(device="meta")
    u = torch.empty(b, d, length, dtype=torch.bfloat16, **meta)
    A = torch.empty(d, n, **meta)
    B = torch.empty(b, n, length, dtype=torch.bfloat16, **meta)
    with count_extra_flops() as counter:
        out, last = selective_scan(u, u, A, B, B, z=u, return_last_state=True)
        selective_scan(u, u, A, B, B, reverse=True)
    assert out.shape == u.shape and out.dtype == torch.bfloat16 and out.device.type == "meta"
    assert last.shape == (b, d, n) and last.dtype == torch.float32
    assert counter["selective_scan"] == 2 * 9 * b * length * d * n


def test_flops_recorded_on_real_tensors():
    x = make_inputs(length=10, dim=3, state=4)
    with count_extra_flops() as counter:
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"])
    assert counter["selective_scan"] == 9 * 2 * 10 * 3 * 4


@pytest.mark.parametrize("bad,match", [
    (dict(delta=torch.zeros(2, 4, 9)), "delta"),
    (dict(A=torch.zeros(5, 16)), "A must be"),
    (dict(B=torch.zeros(2, 8, 10)), "B must be"),
    (dict(B=torch.zeros(2, 3, 16, 10), C=torch.zeros(2, 3, 16, 10)), "groups dividing"),
    (dict(C=torch.zeros(2, 2, 16, 10)), "same grouping|C must be"),
    (dict(D=torch.zeros(5)), "D must be"),
    (dict(z=torch.zeros(2, 4, 11)), "z must"),
    (dict(add=torch.zeros(2, 4, 9)), "add must"),
    (dict(u=torch.zeros(4, 10)), "u must be"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    x = {k: None if v is None else v.detach() for k, v in make_inputs(length=10).items()}
    x.update(bad)
    with pytest.raises(ValueError, match=match):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], add=x.get("add"))


def test_unknown_backend_raises():
    x = make_inputs(length=4)
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="fast")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="cuda")


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("SSMDIFF_SCAN_BACKEND", "ref")
    assert resolve_backend(torch.device("cpu")) == "ref"
    monkeypatch.setenv("SSMDIFF_SCAN_BACKEND", "torch")
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert resolve_backend(torch.device("cpu"), "ref") == "ref"


def test_without_compiler_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_scan_cpu, "_lib", None)
    monkeypatch.setattr(_scan_cpu, "_load_error", None)
    monkeypatch.setenv("SSMDIFF_NO_COMPILE", "1")
    monkeypatch.delenv("SSMDIFF_SCAN_BACKEND", raising=False)
    x = {k: None if v is None else v.detach() for k, v in make_inputs(length=20).items()}
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    kw = dict(D=x["D"], z=x["z"], delta_softplus=True)
    with pytest.warns(RuntimeWarning, match="fast CPU selective scan is unavailable"):
        out = selective_scan(*args, **kw)
    assert resolve_backend(torch.device("cpu")) == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = selective_scan(*args, **kw)
    torch.testing.assert_close(out, selective_scan_ref(*args, **kw), **FP32_TOL)
    torch.testing.assert_close(out2, out)


@pytest.mark.slow
def test_kernel_build_is_cached(tmp_path, monkeypatch):
    cxx = _scan_cpu._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("SSMDIFF_CACHE", str(tmp_path))
    first = _scan_cpu._build(cxx)
    mtime = first.stat().st_mtime_ns
    assert first.parent == tmp_path and first.suffix == ".so"
    assert _scan_cpu._build(cxx) == first and first.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]


@pytest.mark.cuda
@pytest.mark.parametrize("length", [7, 1000])
def test_torch_fallback_on_cuda(length):
    inputs, kw = _case(length, OPTION_SETS["full"], groups=2, reverse=length == 7, dim=8, device="cuda")
    compare(inputs, "torch", FP32_TOL, **kw)


# (length, options, groups, reverse, state, dtype): one tile and a tail, several tiles, grouped B/C, a state that is
# not a power of two, bf16 rows, a large state.
TRITON_CASES = [
    (7, "full", None, False, 16, torch.float32),
    (70, "full", 2, True, 16, torch.float32),
    (40, "plain", None, False, 16, torch.float32),
    (33, "full", None, True, 5, torch.float32),
    (40, "full", None, True, 16, torch.bfloat16),
    (20, "full", None, False, 64, torch.float32),  # fewer channels per program above state 16
]


def _compare_triton(device, length, opts, groups, reverse, state, dtype, dim=8):
    inputs, kw = _case(length, OPTION_SETS[opts], groups=groups, reverse=reverse, dim=dim, state=state, dtype=dtype,
                       device=device)
    compare(inputs, "triton", FP32_TOL if dtype == torch.float32 else BF16_TOL, **kw)


@needs_triton_interpreter
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_kernel_interpreted(case):
    _compare_triton("cpu", *case)


@needs_triton_interpreter
def test_triton_self_check_runs_when_the_first_scan_is_under_inference_mode():
    """Sampling is often the first use: the self-check (which needs autograd) must pass there too, not fall back."""
    _scan_triton._checked.cache_clear()
    x = {k: None if v is None else v.detach() for k, v in make_inputs(length=9, state=4).items()}
    with torch.inference_mode():
        assert _scan_triton.available(torch.device("cpu"))
        out = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                             delta_bias=x["delta_bias"], delta_softplus=True, backend="triton")
    torch.testing.assert_close(out, selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                                                       delta_bias=x["delta_bias"], delta_softplus=True), **FP32_TOL)


@needs_triton_interpreter
@pytest.mark.parametrize("tiling", [(8, 4, 2, 4), (32, 8, 4, 4)])
def test_triton_kernel_interpreted_other_tilings(monkeypatch, tiling):
    """The tilings benchmarks/gpu_check.py times on a GPU are correct too (BT, BD_FWD, BD_BWD, NUM_WARPS)."""
    for name, value in zip(("BT", "BD_FWD", "BD_BWD", "NUM_WARPS"), tiling):
        monkeypatch.setattr(_scan_triton, name, value)
    _compare_triton("cpu", 70, "full", 2, True, 16, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("case", TRITON_CASES + [(1000, "full", None, True, 16, torch.float32)])
def test_triton_kernel_on_cuda(case):
    if _scan_triton._triton() is None:
        pytest.skip("Triton is not installed")
    # Installed but failing its self-check on this GPU is a failure of these kernels, not a reason to skip.
    assert _scan_triton.available(torch.device("cuda")), "the Triton kernels failed their self-check (see warning)"
    _compare_triton("cuda", *case, dim=8 if case[0] >= 256 else 48)


@pytest.mark.cuda
def test_triton_self_check_passes_on_cuda():
    if _scan_triton._triton() is None:
        pytest.skip("Triton is not installed")
    # The limit ``available`` applies (float32 legs agree to about 1e-6; the bf16 leg's rounding counts a fiftieth).
    assert _scan_triton.self_check(torch.device("cuda")) < 1e-3


def test_auto_backend_on_cuda_prefers_mamba_ssm_then_triton(monkeypatch):
    import importlib

    mod = importlib.import_module("ssmdiff.ssm.ops.selective_scan")
    cuda = torch.device("cuda")
    monkeypatch.delenv("SSMDIFF_SCAN_BACKEND", raising=False)
    monkeypatch.setattr(mod, "_mamba_ssm_fn", lambda: object())
    assert resolve_backend(cuda) == "cuda"
    monkeypatch.setattr(mod, "_mamba_ssm_fn", lambda: None)
    monkeypatch.setattr(_scan_triton, "available", lambda device: True)
    assert resolve_backend(cuda) == "triton"
    monkeypatch.setattr(_scan_triton, "available", lambda device: False)
    assert resolve_backend(cuda) == "torch"


@pytest.mark.parametrize("failure", ["mismatch", "error"])
def test_triton_that_fails_its_self_check_is_not_used(monkeypatch, failure):
    """A Triton build that compiles the kernels wrongly (or not at all) must not train a model: ``available`` runs
    the self-check once per device and says no, with one warning naming the reason."""
    def check(device):
        if failure == "error":
            raise RuntimeError("PTX too old")
        return 0.5

    monkeypatch.setattr(_scan_triton, "_triton", lambda: object())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_scan_triton, "self_check", check)
    _scan_triton._checked.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="disagrees" if failure == "mismatch" else "PTX too old"):
            assert not _scan_triton.available(torch.device("cpu"))
        assert not _scan_triton.available(torch.device("cpu"))  # cached: no second check, no second warning
    finally:
        _scan_triton._checked.cache_clear()


@pytest.mark.skipif(TRITON_CPU, reason="Triton's interpreter is on")
def test_triton_backend_on_cpu_without_the_interpreter_raises():
    x = make_inputs(length=4)
    with pytest.raises(ValueError, match="backend 'triton' needs Triton"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("reverse", [False, True])
def test_mamba_ssm_kernel_on_cuda(reverse):
    pytest.importorskip("mamba_ssm")
    inputs, kw = _case(256, OPTION_SETS["full"], reverse=reverse, device="cuda")
    compare(inputs, "cuda", FP32_TOL, grad_tol=dict(rtol=2e-3, atol=5e-3), **kw)


def test_cpu_kernels_are_well_formed_custom_ops():
    """The compiled kernels are torch custom ops (so torch.compile traces through them): opcheck tests their
    schemas, fake (shape) functions and autograd registrations against real calls."""
    from ssmdiff.ssm.ops import _scan_cpu

    if not _scan_cpu.available():
        pytest.skip("the compiled CPU kernel could not be built")
    torch.manual_seed(0)
    b, d, length, n = 2, 16, 20, 8

    def leaf(*shape):
        return torch.randn(*shape, requires_grad=True)

    scan_args = (leaf(b, d, length), leaf(b, d, length), (-torch.rand(d, n)).requires_grad_(), leaf(b, n, length),
                 leaf(b, n, length), leaf(d), leaf(b, d, length), leaf(d), leaf(b, d, length), True, False, True)
    torch.library.opcheck(torch.ops.ssmdiff.selective_scan_fwd.default, scan_args)
    heads, p, g = 4, 4, 2
    E = heads * p
    ssd_args = (leaf(b, E + 2 * g * n, length), torch.rand(b, heads, length, requires_grad=True),
                (-torch.rand(heads)).requires_grad_(), leaf(E), leaf(b, E, length), E, g, p, True, True)
    torch.library.opcheck(torch.ops.ssmdiff.ssd_scan_fwd.default, ssd_args)
    for two in (False, True):
        conv_args = (leaf(b, d, length), leaf(d, 1, 4), leaf(d), leaf(d, 1, 4) if two else None,
                     leaf(d) if two else None, False, True)
        torch.library.opcheck(torch.ops.ssmdiff.conv_silu_fwd.default, conv_args)
    # Non-contiguous inputs (Mamba-2 hands the conv a transposed view): outputs are still contiguous, and the fake
    # functions must say so, or compiled code asserts on the strides.
    x_t = torch.randn(b, length, d).transpose(1, 2).requires_grad_(True)
    torch.library.opcheck(torch.ops.ssmdiff.conv_silu_fwd.default,
                          (x_t, leaf(d, 1, 4), leaf(d), leaf(d, 1, 4), None, False, True))
    u_t = torch.randn(b, length, d).transpose(1, 2).requires_grad_(True)
    torch.library.opcheck(torch.ops.ssmdiff.selective_scan_fwd.default, (u_t,) + scan_args[1:])
    for dtype in (torch.float32, torch.bfloat16):  # residual add + RMSNorm: with and without a residual and scale
        h = torch.randn(b, length, d).to(dtype).requires_grad_()
        torch.library.opcheck(torch.ops.ssmdiff.add_rms_norm_fwd.default,
                              (h, leaf(b, length, d), torch.tensor([0.0, 2.0]), leaf(d), 1e-5))
        torch.library.opcheck(torch.ops.ssmdiff.add_rms_norm_fwd.default, (h, None, None, leaf(d), 1e-6))


@needs_kernel
def test_scan_benchmark_runs_on_tiny_shapes(tmp_path, capsys, benchmark_module):
    """benchmarks/scan.py: times taken with the training allocator settings, peak memory measured after them; a
    missing mambapy is reported and left out rather than failing the run."""
    import importlib.util
    import json

    mod = benchmark_module("scan")
    assert mod.main(["--lengths", "64", "--batch", "1", "--dim", "4", "--state", "4", "--repeats", "1",
                     "--skip-ref", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (row,) = json.loads((tmp_path / "scan.json").read_text())["results"]
    assert row["ssmdiff_fwd_ms"] > 0 and row["ssmdiff_fwdbwd_ms"] > 0 and row["ssmdiff_fwdbwd_peak_mb"] is not None
    if importlib.util.find_spec("mambapy") is None:
        assert "mambapy is not installed" in out and "mambapy_fwd_ms" not in row
    # The suite runs with SSMDIFF_MALLOC=default (conftest), which the measuring processes inherit and record.
    assert row["cpu_allocator"] == "default (SSMDIFF_MALLOC=default)"


@needs_kernel
def test_scan_benchmark_bf16_inputs(tmp_path, benchmark_module):
    """--dtype bf16 hands the kernel bfloat16 u, delta, B and C (its bf16 row path), A and D float32, and records
    the dtype."""
    import json

    mod = benchmark_module("scan")
    u, delta, A, B, C, D = mod.make_inputs("ssmdiff", 1, 4, 32, 8, grad=False, dtype="bf16")
    assert {t.dtype for t in (u, delta, B, C)} == {torch.bfloat16} and A.dtype == D.dtype == torch.float32
    assert mod.main(["--lengths", "64", "--batch", "1", "--dim", "4", "--state", "8", "--repeats", "1",
                     "--skip-ref", "--dtype", "bf16", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "scan.json").read_text())
    (row,) = payload["results"]
    assert payload["config"]["dtype"] == "bf16"
    assert row["ssmdiff_fwd_ms"] > 0 and row["ssmdiff_fwdbwd_ms"] > 0


@needs_triton_interpreter
def test_triton_backend_inside_a_bidirectional_mamba_block(monkeypatch):
    """The scan's callers hand it views (B and C slices of x_proj's output) and the gated sum of two directions:
    a BiMamba block on the Triton kernels gives the reference backend's output and parameter gradients."""
    from ssmdiff.ssm.modules.mamba import BiMamba

    block = BiMamba(d_model=8, d_state=4)
    x = torch.randn(2, 21, 8)
    results = []
    for backend in ("ref", "triton"):
        monkeypatch.setenv("SSMDIFF_SCAN_BACKEND", backend)
        block.zero_grad()
        out = block(x)
        out.square().sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in block.named_parameters()}))
    (out_r, grads_r), (out_t, grads_t) = results
    torch.testing.assert_close(out_t, out_r, **FP32_TOL)
    for k, g in grads_r.items():
        scale = max(1.0, g.abs().max().item())
        torch.testing.assert_close(grads_t[k] / scale, g / scale, **FP32_TOL, msg=k)


@needs_triton_interpreter
def test_triton_backend_under_torch_compile(monkeypatch):
    """torch.compile runs the Triton scan eagerly between its graphs and decides its availability once while tracing:
    a compiled BiMamba block gives the eager block's output and gradients."""
    from ssmdiff.ssm.modules.mamba import BiMamba

    monkeypatch.setenv("SSMDIFF_SCAN_BACKEND", "triton")
    block = BiMamba(d_model=8, d_state=4)
    x = torch.randn(2, 21, 8)
    results = []
    for run_block in (block, torch.compile(block)):
        block.zero_grad()
        out = run_block(x)
        out.square().sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in block.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0])
    for k, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], g, msg=k)


@pytest.mark.skipif(_scan_triton._triton() is None, reason="needs Triton (pip install triton)")
def test_triton_kernels_compile_for_gpus_without_spilling():
    """Without a GPU, Triton still compiles the kernels to cubins for A100 (sm_80) and H100/H200 (sm_90) with the
    ptxas it ships: both kernels compile at the default tiling, with every option on, in float32 and bf16 rows, and
    keep everything in registers (no spills: a tiling of 64 channels by 32 steps per program spills about 8 KB)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for a GPU, not interpret
    code = ("import json; from ssmdiff.ssm.ops._scan_triton import compile_report; "
            "print(json.dumps({f'{a} {t}': compile_report(a, 16, t) for a in (80, 90) for t in ('fp32', 'bf16')}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 4
    for key, kernels in report.items():
        for name, usage in kernels.items():
            assert usage["spill_bytes"] == 0 and 0 < usage["registers"] <= 255, (key, name, usage)


def test_triton_backward_is_not_used_when_torch_asks_for_determinism(monkeypatch):
    """The Triton backward sums with atomics. Under torch.use_deterministic_algorithms(True), training through "auto"
    takes the deterministic PyTorch scan instead; naming "triton" raises, as torch's nondeterministic ops do (a
    warning in warn-only mode); inference keeps the Triton kernels."""
    import importlib

    mod = importlib.import_module("ssmdiff.ssm.ops.selective_scan")
    calls = []

    def fake_triton(u, delta, A, B, C, add=None, gate_add=False, **kw):
        calls.append("triton")
        return _scan_torch.selective_scan_torch(u, delta, A, B, C, **kw)

    monkeypatch.setattr(_scan_triton, "available", lambda device: True)
    monkeypatch.setattr(_scan_triton, "selective_scan_triton", fake_triton)
    monkeypatch.setattr(mod, "resolve_backend", lambda device, backend=None: "triton")
    monkeypatch.delenv("SSMDIFF_SCAN_BACKEND", raising=False)
    x = make_inputs(length=9, state=4)
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        selective_scan(*args, **kw)
        assert calls == []  # auto, with gradients: the PyTorch scan
        with torch.no_grad():
            selective_scan(*args, **kw)
        assert calls == ["triton"]  # no gradients, nothing to sum
        with pytest.raises(RuntimeError, match="not deterministic"):
            selective_scan(*args, backend="triton", **kw)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="not deterministic"):
            selective_scan(*args, backend="triton", **kw)
        assert calls == ["triton", "triton"]
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
