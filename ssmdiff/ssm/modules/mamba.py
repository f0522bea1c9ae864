"""Mamba-1 mixers: the causal (or reversed) ``Mamba`` block and the bidirectional ``BiMamba`` ("v2" of Vision Mamba).

Parameter names and shapes follow mamba-ssm's ``Mamba`` and Vision Mamba's bimamba v2 (``conv1d_b``, ``x_proj_b``,
``dt_proj_b``, ``A_b_log``, ``D_b``), so parameter counts equal theirs and their state dicts load.

Flops: the linear layers and the depthwise conv are seen by ``torch.utils.flop_counter.FlopCounterMode``; the scan
records its own cost (9 * B * L * E * N, one multiply-add = one flop) through ``record_scan_flops``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..ops import _scan_cpu
from ..ops._scan_cpu import channel_major
from ..ops.grad import needs_grad
from ..ops.selective_scan import record_scan_flops, resolve_backend, selective_scan
from ..ops.products import LowPrecisionBmm, autocast_dtype, linear, low_precision_cpu_dtype
from .conv import conv_silu


# Whether training on the CPU kernel runs each direction through ``_ScanDirection`` (tests switch it off to
# compare with autograd over the separate ops).
FUSED_DIRECTION = True


def _resolve_dt_rank(dt_rank, d_model: int) -> int:
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if isinstance(dt_rank, int) and not isinstance(dt_rank, bool) and dt_rank > 0:
        return dt_rank
    raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")


def _check_positive(**kwargs) -> None:
    for name, value in kwargs.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """Biases b such that softplus(b) is log-uniform in [dt_min, dt_max] (floored at dt_init_floor).

    Mamba's initialisation: the step size starts spread over two orders of magnitude so that channels begin with
    different memory lengths.
    """
    if not (0 < dt_min <= dt_max):
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    # softplus^-1(y) = y + log(1 - exp(-y)), written with expm1 for accuracy at small y.
    return dt + torch.log(-torch.expm1(-dt))


def _token_major_products(t: torch.Tensor) -> bool:
    """Whether the products with the model-width side (in_proj, out_proj's input gradient) run over all tokens at
    once and reach the channel-major layout through the compiled transpose: CPU float32, no autocast.

    Inside a model, the batched products that write channel-major directly (one operand a transposed view) ran at
    77-130 GFLOP/s on this project's AVX2 machine, against 160-175 for one (batch x length, width) GEMM, the layout
    DiT's nn.Linear uses; the tiled transpose of the kernel library moves 14-24 GB/s where
    ``.transpose().contiguous()`` moves 3-17 (``python benchmarks/layout.py``). Whole steps at 1024 tokens, batch
    4, the two forms alternating in one process with the allocator tuned: DiS-B/2 trains 1.13-1.15x and samples
    1.06-1.11x faster this way, DiM-S/2 1.04-1.09x and 1.08-1.17x; DiS-S/2 (width 368, where both forms are
    fast) trains 1.01-1.03x faster and samples 0.96-0.97x as fast. Out of a model, with the operands cold,
    the batched form of in_proj alone holds its speed (``benchmarks/layout.py``: 0.87-1.05x)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and autocast_dtype(t) is None and _scan_cpu.available()


def _channel_major(weight: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """weight (out, in) applied to x_t (batch, in, length) -> (batch, out, length), contiguous.

    torch.matmul would compute this as (x_t^T weight^T)^T and return a transposed view; bmm writes the
    channel-major result directly (x_t may itself be a transposed view: gemm reads it without a copy).
    """
    dtype = low_precision_cpu_dtype(x_t)
    if dtype is not None:  # bf16/fp16 on a CPU without native support: dot-layout products (ops/products.py)
        return LowPrecisionBmm.apply(weight.to(dtype).expand(x_t.shape[0], -1, -1), x_t.to(dtype))
    if autocast_dtype(x_t) is None and weight.dtype != x_t.dtype:  # bf16 activations, fp32 weights: as above
        weight = weight.to(x_t.dtype)
    return torch.bmm(weight.expand(x_t.shape[0], -1, -1), x_t)


class _FromChannelMajor(torch.autograd.Function):
    """x (batch, E, length), channel-major -> x^T weight^T (batch, length, out), with the input gradient written
    channel-major again.

    Autograd's bmm backward would hand back the gradient of x as a transposed view of a (batch, length, E) tensor;
    every consumer of the scan's channel-major layout would then copy it, and gradients arriving in the two layouts
    would be added by a strided copy (together a tenth of a DiS training step, measured). Under autocast the
    product runs in the autocast dtype, as torch.bmm would.
    """

    @staticmethod
    def forward(ctx, x, weight):
        dtype = autocast_dtype(x) or x.dtype  # without autocast the product runs in the activations' dtype
        xc, wc = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype)
        ctx.token_major = _token_major_products(x)
        return torch.bmm(xc.transpose(1, 2), wc.t().expand(x.shape[0], -1, -1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        gx = gw = None
        if ctx.needs_input_grad[0] and ctx.token_major:  # one GEMM over all tokens, then the tiled transpose
            gx = channel_major(torch.matmul(grad, weight), [weight.shape[1]])[0]
        elif ctx.needs_input_grad[0]:
            gx = torch.bmm(weight.t().expand(x.shape[0], -1, -1), grad.transpose(1, 2)).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gw = torch.sum(torch.bmm(grad.transpose(1, 2), x.transpose(1, 2)), 0, dtype=torch.float32).to(ctx.dtypes[1])
        return gx, gw


class _ToChannelMajor(torch.autograd.Function):
    """x (batch, length, in), token-major -> ``parts`` channel-major products W_i x^T (batch, out_i, length), W_i the
    row blocks of ``weight``; the input gradient comes back token-major and contiguous, sum_i g_i^T W_i accumulated
    by the products themselves.

    Autograd's bmm backward (what ``_channel_major`` gets) hands back each part's input gradient channel-major:
    their sum (an add) reached the residual norm as a transposed view that had to be copied, and the weight
    gradient of an expanded weight is a per-sample (batch, out, in) tensor summed in the activations' dtype. Here
    the per-sample weight gradients are summed straight into float32. Under autocast the products run in the
    autocast dtype, as torch.bmm would.
    """

    @staticmethod
    def forward(ctx, x, weight, parts: int):
        dtype = autocast_dtype(x) or x.dtype
        xc, wc = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(xc, wc)
        ctx.weight_dtype = weight.dtype
        ctx.x_dtype = x.dtype
        ctx.parts = parts
        b = x.shape[0]
        return tuple(torch.bmm(w.expand(b, -1, -1), xc.transpose(1, 2)) for w in wc.chunk(parts, dim=0))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        b = x.shape[0]
        blocks = weight.chunk(ctx.parts, dim=0)
        grads = [None if g is None else g.to(x.dtype) for g in grads]
        gx = gw = None
        if ctx.needs_input_grad[0]:
            for g, w in zip(grads, blocks):
                if g is None:
                    continue
                g_t = g.transpose(1, 2)
                if gx is None:
                    gx = torch.bmm(g_t, w.expand(b, -1, -1))
                else:
                    gx.baddbmm_(g_t, w.expand(b, -1, -1))
            gx = torch.zeros_like(x) if gx is None else gx
            gx = gx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for gw_i, g in zip(gw.chunk(ctx.parts, dim=0), grads):
                if g is not None:
                    torch.sum(torch.bmm(g, x), 0, dtype=torch.float32, out=gw_i)
            gw = gw.to(ctx.weight_dtype)
        return gx, gw, None


def _out(out_proj: nn.Linear, y: torch.Tensor) -> torch.Tensor:
    """out_proj of y (batch, E, length) -> (batch, length, d_model), reading y channel-major without a copy
    (with one where bf16/fp16 on this CPU needs it)."""
    if low_precision_cpu_dtype(y) is not None:
        return linear(y.transpose(1, 2), out_proj.weight, out_proj.bias)
    out = _FromChannelMajor.apply(y, out_proj.weight)
    return out if out_proj.bias is None else out + out_proj.bias.to(out.dtype)


class _ScanDirection(torch.autograd.Function):
    """x_proj, dt_proj and the compiled CPU scan of one direction as one autograd node (what ``_scan_direction``
    computes, same products and kernel calls).

    Autograd over the separate ops adds the scan's du and x_proj's input gradient in another pass over a tensor of
    the mixer's width and sums the per-sample gradients of the expanded weights in the activations' dtype. Here
    x_proj's input gradient is accumulated into du by the product itself (``baddbmm_``) and the weight gradients
    are summed in float32; the rest (one concatenation of the dt_low, B and C gradients, the products) is the same
    work with fewer autograd nodes. Under autocast the products run in the autocast dtype, as torch.bmm would (the
    backward reuses the forward's casts).
    """

    @staticmethod
    def forward(ctx, x, z, add, w_x, w_dt, b_dt, A_log, D, d_state: int, reverse: bool, gate_add: bool):
        dtype = autocast_dtype(x) or x.dtype
        xc, wx, wdt = x.to(dtype), w_x.to(dtype), w_dt.to(dtype)
        b, R = x.shape[0], w_dt.shape[1]
        xdbl = torch.bmm(wx.expand(b, -1, -1), xc)
        dt_low, Bm, Cm = torch.split(xdbl, [R, d_state, d_state], dim=1)
        dt = torch.bmm(wdt.expand(b, -1, -1), dt_low)
        A = -torch.exp(A_log.float())
        Df, bias = D.float(), b_dt.float()
        record_scan_flops(b, x.shape[1], x.shape[2], d_state)
        out, _, states, pre = _scan_cpu._scan_fwd(xc, dt, A, Bm, Cm, Df, z, bias, add, True, reverse, True,
                                                  gate_add)
        ctx.gated_add = _scan_cpu._keeps_pre_gate(z, add, True, gate_add)
        ctx.save_for_backward(xc, z, wx, wdt, xdbl, dt, A, Df, bias, states, pre if ctx.gated_add else None)
        ctx.meta = (R, d_state, reverse, None if add is None else add.dtype, x.dtype, w_x.dtype, w_dt.dtype,
                    b_dt.dtype, D.dtype, A_log.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        xc, z, wx, wdt, xdbl, dt, A, Df, bias, states, pre = ctx.saved_tensors
        R, N, reverse, add_dtype, x_dtype, wx_dtype, wdt_dtype, b_dtype, D_dtype, A_dtype = ctx.meta
        dt_low, Bm, Cm = torch.split(xdbl, [R, N, N], dim=1)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dadd = _scan_cpu._scan_bwd(gout.contiguous(), xc, dt, A, Bm, Cm, Df,
                                                                          z, bias, states, True, reverse, pre)
        b = xc.shape[0]
        g_xdbl = torch.cat([torch.bmm(wdt.t().expand(b, -1, -1), ddelta.to(wdt.dtype)), dB, dC], dim=1)
        gx = du.to(xc.dtype).baddbmm_(wx.t().expand(b, -1, -1), g_xdbl).to(x_dtype)
        g_wx = torch.sum(torch.bmm(g_xdbl, xc.transpose(1, 2)), 0, dtype=torch.float32).to(wx_dtype)
        g_wdt = torch.sum(torch.bmm(ddelta.to(wdt.dtype), dt_low.transpose(1, 2)), 0, dtype=torch.float32)
        dadd = _scan_cpu.add_gradient(dadd, gout, add_dtype, ctx.gated_add)
        return (gx, None if z is None else dz, dadd, g_wx, g_wdt.to(wdt_dtype), dbias.to(b_dtype),
                (dA * A).to(A_dtype), dD.to(D_dtype), None, None, None)


def _fused_direction(x, z, add, *params) -> bool:
    """Whether ``_ScanDirection`` takes this direction: training on the compiled CPU kernel, products in float32 or
    a natively supported bf16, outside torch.compile (which traces the separate ops)."""
    return (x.device.type == "cpu" and x.shape[2] > 0 and needs_grad(x, z, add, *params)
            and not torch.compiler.is_compiling() and low_precision_cpu_dtype(x) is None
            and resolve_backend(x.device) == "cpu")


def _scan_direction(x, z, x_proj: nn.Linear, dt_proj: nn.Linear, A_log, D, d_state: int, reverse: bool, add=None,
                    gate_add: bool = False):
    """One direction of Mamba-1 after its conv and SiLU: x, z of shape (batch, E, length) -> y (batch, E, length),
    plus ``add`` when given (the other direction's y, summed inside the CPU scan kernel), after the gate or, with
    ``gate_add``, before it (``selective_scan``).

    Layout: everything stays channel-major, as the scan reads it. x_proj is one product to (batch, R + 2N, length):
    dt_low, B and C are views of it, and dt_proj reads dt_low in place. Autograd's bmm backward then returns the
    gradient of x channel-major and contiguous (W^T @ grad), with no transposed copies.
    """
    params = (x_proj.weight, dt_proj.weight, dt_proj.bias, A_log, D)
    if FUSED_DIRECTION and _fused_direction(x, z, add, *params):
        return _ScanDirection.apply(x, z, add, *params, d_state, reverse, gate_add)
    R = dt_proj.in_features
    xdbl = _channel_major(x_proj.weight, x)
    dt_low, Bm, Cm = torch.split(xdbl, [R, d_state, d_state], dim=1)
    # dt_proj's bias is applied inside the scan (delta_bias), before the softplus, as mamba-ssm does.
    dt = _channel_major(dt_proj.weight, dt_low)
    A = -torch.exp(A_log.float())
    return selective_scan(x, dt, A, Bm, Cm, D.float(), z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True,
                          reverse=reverse, add=add, gate_add=gate_add)


class Mamba(nn.Module):
    """Mamba-1 mixer: x (batch, length, d_model) -> (batch, length, d_model).

    in_proj -> (x, z); depthwise conv1d (causal, or anti-causal when ``reverse``) -> SiLU -> x_proj -> (dt, B, C);
    dt_proj; selective scan with A = -exp(A_log), skip D and gate silu(z); out_proj. ``reverse=True`` scans from the
    last token to the first, so output t depends only on tokens t..L-1.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, reverse: bool = False):
        super().__init__()
        _check_positive(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = _resolve_dt_rank(dt_rank, d_model)
        self.reverse = bool(reverse)
        self._init_args = dict(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, conv_bias=conv_bias)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = self._make_direction()
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _make_direction(self):
        """Conv, projections and SSM parameters of one scan direction, with Mamba's initialisation."""
        a = self._init_args
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        conv1d = nn.Conv1d(E, E, self.d_conv, groups=E, padding=self.d_conv - 1, bias=a["conv_bias"])
        x_proj = nn.Linear(E, R + 2 * N, bias=False)
        dt_proj = nn.Linear(R, E, bias=True)
        std = R ** -0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        with torch.no_grad():
            dt_proj.bias.copy_(inverse_softplus_dt(E, a["dt_min"], a["dt_max"], a["dt_init_floor"]))
        dt_proj.bias._no_reinit = True  # a generic re-initialisation must not zero the dt spread
        # S4D-real initialisation: A_n = -(n + 1) for every channel.
        A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        A_log._no_weight_decay = True
        D = nn.Parameter(torch.ones(E))
        D._no_weight_decay = True
        return conv1d, x_proj, dt_proj, A_log, D

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__} expects x of shape (batch, length, {self.d_model}), "
                             f"got {tuple(x.shape)}")

    def _in(self, x: torch.Tensor):
        """in_proj to the scan's channel-major layout: u and z as two contiguous (b, E, l) tensors."""
        if _token_major_products(x):
            return tuple(channel_major(F.linear(x, self.in_proj.weight, self.in_proj.bias), [self.d_inner] * 2))
        if low_precision_cpu_dtype(x) is None:
            u, z = _ToChannelMajor.apply(x, self.in_proj.weight, 2)
        else:
            x_t = x.transpose(1, 2)
            w_u, w_z = self.in_proj.weight.chunk(2, dim=0)
            u, z = _channel_major(w_u, x_t), _channel_major(w_z, x_t)
        if self.in_proj.bias is not None:
            b_u, b_z = self.in_proj.bias.chunk(2)
            u, z = u + b_u[:, None].to(u.dtype), z + b_z[:, None].to(z.dtype)
        return u, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        u, z = self._in(x)
        (xc,) = conv_silu(u, [(self.conv1d.weight, self.conv1d.bias, self.reverse)])
        y = _scan_direction(xc, z, self.x_proj, self.dt_proj, self.A_log, self.D, self.d_state, self.reverse)
        return _out(self.out_proj, y)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
                f"dt_rank={self.dt_rank}, reverse={self.reverse}")


class BiMamba(Mamba):
    """Bidirectional Mamba-1, Vision Mamba's "v2": x (batch, length, d_model) -> (batch, length, d_model).

    in_proj and out_proj are shared; the backward direction has its own conv1d_b, x_proj_b, dt_proj_b, A_b_log and
    D_b. out = out_proj(y_fwd + y_bwd) where y_bwd is what Vision Mamba computes on the flipped sequence (and flips
    back), obtained here with an anti-causal conv and the reverse scan, so no activation is ever flipped.
    Both directions are always computed, on every device.

    ``divide_out=True`` averages instead of summing (Vision Mamba's ``if_devide_out``, on in its released models);
    DiS sums, the default here.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, divide_out: bool = False):
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, dt_min=dt_min,
                         dt_max=dt_max, dt_init_floor=dt_init_floor, conv_bias=conv_bias, bias=bias, reverse=False)
        self.divide_out = bool(divide_out)
        self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = self._make_direction()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        u, z = self._in(x)
        # Both directions' convs read u in one pass (an anti-causal conv for the backward branch: no flips).
        xc, xc_b = conv_silu(u, [(self.conv1d.weight, self.conv1d.bias, False),
                                 (self.conv1d_b.weight, self.conv1d_b.bias, True)])
        # Both directions share the gate: (y_f + y_b) silu(z) = y_f silu(z) + y_b silu(z). The forward direction is
        # scanned ungated and the backward one gates the sum, so silu(z) and its gradient are computed once, and
        # the forward direction's backward needs no recompute of y for dz.
        y = _scan_direction(xc, None, self.x_proj, self.dt_proj, self.A_log, self.D, self.d_state, False)
        y = _scan_direction(xc_b, z, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, self.d_state, True, add=y,
                            gate_add=True)
        if self.divide_out:
            y = y * 0.5
        return _out(self.out_proj, y)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
                f"dt_rank={self.dt_rank}, bidirectional (v2), divide_out={self.divide_out}")
