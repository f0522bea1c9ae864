"""Products in bf16/fp16 on CPUs without native support: dot-layout GEMMs, checked against float64 and F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmdiff.models.layers import Linear  # re-exported from ssmdiff.ssm.ops.products
from ssmdiff.ssm.ops import products
from ssmdiff.ssm.ops.products import dot_layout_bmm, linear, low_precision_cpu_dtype


def test_dot_layout_bmm_any_operand_layout():
    """The dot-layout product equals bmm for contiguous, transposed and expanded operands."""
    torch.manual_seed(0)
    a = torch.randn(3, 5, 7).to(torch.bfloat16)
    b = torch.randn(3, 7, 9).to(torch.bfloat16)
    w = torch.randn(5, 7).to(torch.bfloat16)
    lhs_cases = (a, a.transpose(1, 2).contiguous().transpose(1, 2), w.expand(3, -1, -1),
                 w.t().contiguous().t().expand(3, -1, -1))
    for lhs in lhs_cases:
        for rhs in (b, b.transpose(1, 2).contiguous().transpose(1, 2)):
            expected = torch.bmm(lhs.double(), rhs.double())
            out = dot_layout_bmm(lhs, rhs)
            assert out.shape == expected.shape and out.dtype == torch.bfloat16
            torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=2e-2)


def test_low_precision_dtype_only_for_emulated_cpu_dtypes(monkeypatch):
    x = torch.randn(2, 3)
    assert low_precision_cpu_dtype(x) is None
    monkeypatch.setattr(products, "_native_on_cpu", lambda dtype: False)
    assert low_precision_cpu_dtype(x.bfloat16()) == torch.bfloat16
    assert low_precision_cpu_dtype(x.half()) == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert low_precision_cpu_dtype(x) == torch.bfloat16
    monkeypatch.setattr(products, "_native_on_cpu", lambda dtype: True)  # AVX512-BF16/AMX: the plain path
    assert low_precision_cpu_dtype(x.bfloat16()) is None


@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16", "fp16"])
def test_linear_matches_f_linear(mode, monkeypatch):
    """Values, gradients and dtypes of ``linear`` / ``Linear`` equal F.linear's (exactly in fp32, within rounding
    in reduced precision, where the dot-layout path is forced as on a CPU without native support)."""
    monkeypatch.setattr(products, "_native_on_cpu", lambda dtype: False)
    torch.manual_seed(0)
    layer = Linear(24, 10)
    ref_layer = nn.Linear(24, 10)
    ref_layer.load_state_dict(layer.state_dict())
    assert list(layer.state_dict()) == ["weight", "bias"]
    dtype = {"fp32": torch.float32, "autocast": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    x0 = torch.randn(2, 13, 24)
    x = x0.to(dtype).requires_grad_()
    if mode in ("bf16", "fp16"):
        layer.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out = layer(x)
    xr = x0.clone().requires_grad_()
    ref = ref_layer(xr)
    expected_dtype = torch.bfloat16 if mode == "autocast" else dtype
    assert out.dtype == expected_dtype
    g = torch.randn(ref.shape)
    grads = torch.autograd.grad(out, (x, layer.weight, layer.bias), g.to(out.dtype))
    grads_r = torch.autograd.grad(ref, (xr, ref_layer.weight, ref_layer.bias), g)
    tol = dict(rtol=0, atol=0) if mode == "fp32" else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    for a, b, p in zip(grads, grads_r, (x, layer.weight, layer.bias)):
        assert a.dtype == p.dtype
        torch.testing.assert_close(a.float(), b, **tol)


def test_linear_on_meta_and_cuda_semantics_unchanged():
    x = torch.empty(4, 8, device="meta")
    w = torch.empty(3, 8, device="meta")
    assert linear(x, w).shape == (4, 3)
    x = torch.randn(4, 8)
    w = torch.randn(3, 8)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=0, atol=0)


def test_products_benchmark_runs_on_tiny_shapes(capsys, benchmark_module):
    """benchmarks/products.py: every product timed both ways, a ratio per line; bad sizes rejected."""
    mod = benchmark_module("products")
    assert mod.main(["--batch", "1", "--width", "16", "--length", "8", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = lines[2:]
    assert len(rows) == len(mod.cases(1, 16, 8, torch.bfloat16)) == 6
    for row in rows:
        plain, dot, ratio = (float(v) for v in row.split()[-3:])
        assert plain >= 0 and dot >= 0 and ratio >= 0
    with pytest.raises(SystemExit):
        mod.main(["--length", "0"])
