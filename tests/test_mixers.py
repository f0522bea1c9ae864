"""Mixer modules: shapes, gradients, causality, parameter counts, and agreement with flip-based formulations."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssmdiff.ssm import BiMamba, Mamba, Mamba2, selective_scan_ref
from ssmdiff.ssm.ops.counting import count_extra_flops
from ssmdiff.ssm.ops.ssd import ssd_ref


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


def mamba1_params(d_model, d_state=16, d_conv=4, expand=2, conv_bias=True, bias=False, directions=1):
    """mamba-ssm's Mamba (and Vision Mamba's v2 for directions=2) parameter count, written out term by term."""
    E, N, R = expand * d_model, d_state, math.ceil(d_model / 16)
    per_direction = (E * d_conv + (E if conv_bias else 0)  # depthwise conv1d
                     + E * (R + 2 * N)  # x_proj, no bias
                     + R * E + E  # dt_proj with bias
                     + E * N + E)  # A_log, D
    shared = d_model * 2 * E + E * d_model + ((2 * E + d_model) if bias else 0)
    return shared + directions * per_direction


def _flip_based_direction(m, u, z, conv, x_proj, dt_proj, A_log, D, flip):
    """One Mamba-1 direction the way mamba-ssm / Vision Mamba write it: nn.Conv1d with padding k-1 truncated,
    dt_proj with its bias applied before softplus, sequences flipped for the backward direction."""
    if flip:
        u, z = u.flip(-1), z.flip(-1)
    L = u.shape[-1]
    xc = F.silu(conv(u)[..., :L])
    dbl = x_proj(xc.transpose(1, 2))
    dt, B, C = torch.split(dbl, [dt_proj.in_features, m.d_state, m.d_state], dim=-1)
    dt = F.softplus(dt_proj(dt)).transpose(1, 2)
    y = selective_scan_ref(xc, dt, -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2), D, z=z)
    return y.flip(-1) if flip else y


def _reference_forward(m, x):
    u, z = m.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    if isinstance(m, BiMamba):
        y = _flip_based_direction(m, u, z, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, False)
        y = y + _flip_based_direction(m, u, z, m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b, True)
        if m.divide_out:
            y = y / 2
    else:
        y = _flip_based_direction(m, u, z, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, m.reverse)
    return m.out_proj(y.transpose(1, 2))


MAMBA_CASES = {
    "mamba": lambda d: Mamba(d),
    "mamba_reverse": lambda d: Mamba(d, reverse=True),
    "bimamba": lambda d: BiMamba(d),
    "bimamba_divide_out": lambda d: BiMamba(d, divide_out=True),
}


@pytest.mark.parametrize("name", list(MAMBA_CASES))
def test_mamba_family_shape_and_reference(name):
    m = MAMBA_CASES[name](24)
    x = torch.randn(2, 13, 24)
    y = m(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, _reference_forward(m, x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(MAMBA_CASES))
def test_mamba_family_gradients_reach_every_parameter(name):
    m = MAMBA_CASES[name](16)
    x = torch.randn(2, 9, 16, requires_grad=True)
    (m(x) ** 2).sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    assert x.grad.abs().sum() > 0


def _changed_positions(m, L=12, t=5, d=16):
    x = torch.randn(1, L, d)
    x2 = x.clone()
    x2[:, t] += torch.randn(d)
    with torch.no_grad():
        diff = (m(x2) - m(x)).abs().amax(dim=-1)[0]
    return diff > 1e-6


def test_causality():
    t = 5
    fwd = _changed_positions(Mamba(16), t=t)
    assert not fwd[:t].any(), "causal Mamba must not see later tokens"
    assert fwd[t:].all()
    rev = _changed_positions(Mamba(16, reverse=True), t=t)
    assert not rev[t + 1:].any(), "reverse Mamba must not see earlier tokens"
    assert rev[: t + 1].all()
    bi = _changed_positions(BiMamba(16), t=t)
    assert bi.all(), "bidirectional Mamba must depend on earlier and later tokens"


@pytest.mark.parametrize("kw", [dict(), dict(d_state=8, d_conv=3, expand=3), dict(bias=True, conv_bias=False)])
def test_mamba_parameter_counts(kw):
    d = 48
    assert _nparams(Mamba(d, **kw)) == mamba1_params(d, **kw)
    assert _nparams(Mamba(d, reverse=True, **kw)) == mamba1_params(d, **kw)
    assert _nparams(BiMamba(d, **kw)) == mamba1_params(d, directions=2, **kw)


def test_mamba_parameter_count_matches_mamba_130m():
    # mamba-130m (24 layers, d_model 768, vocab padded to 50280, RMSNorm per layer + final, tied embedding) has
    # 129,135,360 parameters; the mixers are all but the embedding and the norms.
    d = 768
    assert 24 * (_nparams(Mamba(d)) + d) + 50280 * d + d == 129_135_360


def test_mamba_initialisation():
    m = BiMamba(32, d_state=16, dt_min=1e-3, dt_max=0.1)
    for dt_proj, A_log, D in [(m.dt_proj, m.A_log, m.D), (m.dt_proj_b, m.A_b_log, m.D_b)]:
        dt = F.softplus(dt_proj.bias.detach())
        assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
        assert dt.max() / dt.min() > 10  # spread over orders of magnitude, not a constant
        bound = m.dt_rank ** -0.5
        assert dt_proj.weight.abs().max() <= bound
        torch.testing.assert_close(-torch.exp(A_log.detach()),
                                   -torch.arange(1, 17, dtype=torch.float32).expand(64, 16))
        assert torch.equal(D.detach(), torch.ones(64))
        assert A_log._no_weight_decay and D._no_weight_decay


def test_mamba_runs_on_meta_and_records_scan_flops():
    with torch.device("meta"):
        m = BiMamba(64)
        x = torch.randn(2, 40, 64)
    with count_extra_flops() as flops:
        y = m(x)
    assert y.shape == (2, 40, 64) and y.device.type == "meta"
    # The scan dispatcher owns the scan's count; when it records, both directions must show up.
    if flops:
        assert sum(flops.values()) >= 2 * 9 * 2 * 40 * 128 * 16 * (1 - 1e-9)


def test_mamba_bad_inputs():
    with pytest.raises(ValueError, match="d_model"):
        Mamba(0)
    with pytest.raises(ValueError, match="dt_rank"):
        Mamba(16, dt_rank="big")
    with pytest.raises(ValueError, match="shape"):
        Mamba(16)(torch.randn(2, 5, 8))


# ---------------------------------------------------------------- Mamba-2

def mamba2_params(d_model, d_state=64, d_conv=4, expand=2, headdim=64, ngroups=1, bidirectional=False):
    """mamba-ssm's Mamba2 parameter count (conv_bias, no linear bias), plus the v2 backward direction."""
    E = expand * d_model
    H = E // headdim
    conv_dim = E + 2 * ngroups * d_state
    per_direction = conv_dim * d_conv + conv_dim + 3 * H  # conv1d (+bias), dt_bias, A_log, D
    shared = d_model * (2 * E + 2 * ngroups * d_state + H) + E + E * d_model  # in_proj, norm weight, out_proj
    return shared + (2 if bidirectional else 1) * per_direction


def _mamba2_reference(m, x):
    """Mamba-2 written the flip-based way with the per-step SSD reference and nn.Conv1d's own padding."""
    b, L, _ = x.shape
    z, xBC, dt = torch.split(m.in_proj(x), [m.d_inner, m.conv_dim, m.nheads], dim=-1)

    def direction(conv, dt_bias, A_log, D, flip):
        u, d = (xBC.flip(1), dt.flip(1)) if flip else (xBC, dt)
        u = F.silu(conv(u.transpose(1, 2))[..., :L]).transpose(1, 2)
        xs, B, C = torch.split(u, [m.d_inner, m.ngroups * m.d_state, m.ngroups * m.d_state], dim=-1)
        y = ssd_ref(xs.reshape(b, L, m.nheads, m.headdim), d, -torch.exp(A_log),
                    B.reshape(b, L, m.ngroups, m.d_state), C.reshape(b, L, m.ngroups, m.d_state), D=D,
                    dt_bias=dt_bias, dt_softplus=True).reshape(b, L, m.d_inner)
        return y.flip(1) if flip else y

    y = direction(m.conv1d, m.dt_bias, m.A_log, m.D, m.reverse)
    if m.bidirectional:
        y = y + direction(m.conv1d_b, m.dt_bias_b, m.A_b_log, m.D_b, True)
    v = (y * F.silu(z)).view(b, L, m.ngroups, -1)
    v = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5)
    return m.out_proj(v.reshape(b, L, -1) * m.norm.weight)


MAMBA2_CASES = {
    "causal": dict(chunk_size=4),
    "bidirectional": dict(bidirectional=True, chunk_size=4),
    "groups_odd_chunks": dict(ngroups=2, chunk_size=5, bidirectional=True),
    "reverse": dict(reverse=True, chunk_size=4),
}


@pytest.mark.parametrize("name", list(MAMBA2_CASES))
def test_mamba2_shape_and_reference(name):
    m = Mamba2(32, d_state=8, headdim=16, **MAMBA2_CASES[name])
    with torch.no_grad():  # a non-trivial norm weight, so the reference's use of it is checked
        m.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 19, 32)
    y = m(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, _mamba2_reference(m, x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(MAMBA2_CASES))
def test_mamba2_gradients_reach_every_parameter(name):
    m = Mamba2(32, d_state=8, headdim=16, **MAMBA2_CASES[name])
    x = torch.randn(2, 11, 32)
    (m(x) ** 2).sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list(MAMBA2_CASES))
def test_mamba2_compiled_cpu_path_matches_chunked_path(name, monkeypatch):
    """On CPU, Mamba2 runs conv, scan and the directions' sum on the compiled kernels (channel-major); with
    SSMDIFF_SCAN_BACKEND=torch it takes the chunked matrix form. Same module, same outputs and gradients."""
    from ssmdiff.ssm.ops import _scan_cpu

    if not _scan_cpu.available():
        pytest.skip("the compiled CPU kernel could not be built")
    torch.manual_seed(0)
    m = Mamba2(32, d_state=16, headdim=8, **MAMBA2_CASES[name])
    x = torch.randn(2, 70, 32, requires_grad=True)

    def run():
        y = m(x)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(),
                                    [x, *m.parameters()])
        return y, grads

    y_fast, g_fast = run()
    monkeypatch.setenv("SSMDIFF_SCAN_BACKEND", "torch")
    y_ref, g_ref = run()
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-4, atol=1e-5)
    for (pname, _), a, b in zip([("x", None), *m.named_parameters()], g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=lambda msg: f"{pname}: {msg}")


def test_mamba2_causality():
    t = 5
    fwd = _changed_positions(Mamba2(16, d_state=8, headdim=8, chunk_size=4), t=t)
    assert not fwd[:t].any() and fwd[t:].all()
    rev = _changed_positions(Mamba2(16, d_state=8, headdim=8, chunk_size=4, reverse=True), t=t)
    assert not rev[t + 1:].any() and rev[: t + 1].all()
    bi = _changed_positions(Mamba2(16, d_state=8, headdim=8, chunk_size=4, bidirectional=True), t=t)
    assert bi.all()


@pytest.mark.parametrize("kw", [dict(), dict(d_state=16, headdim=32, ngroups=2, expand=3, d_conv=3)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_mamba2_parameter_counts(kw, bidirectional):
    d = 128
    assert _nparams(Mamba2(d, bidirectional=bidirectional, **kw)) == mamba2_params(d, bidirectional=bidirectional,
                                                                                    **kw)


def test_mamba2_initialisation_and_meta():
    m = Mamba2(64, d_state=16, headdim=16)
    dt = F.softplus(m.dt_bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    A = torch.exp(m.A_log.detach())
    assert A.min() >= 1 and A.max() <= 16
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_bias._no_weight_decay
    with torch.device("meta"):
        m = Mamba2(128, bidirectional=True)
        x = torch.randn(2, 100, 128)
    with count_extra_flops() as flops:
        y = m(x)
    assert y.shape == x.shape and y.device.type == "meta"
    assert flops["ssd"] > 0


def test_mamba2_bad_arguments():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(48, headdim=64)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(64, headdim=64, ngroups=3)
    with pytest.raises(ValueError, match="not both"):
        Mamba2(64, bidirectional=True, reverse=True)
    with pytest.raises(ValueError, match="shape"):
        Mamba2(64)(torch.randn(1, 4, 32))


@pytest.mark.parametrize("make", [lambda: BiMamba(32), lambda: Mamba(32, reverse=True),
                                  lambda: Mamba2(32, d_state=8, headdim=16, chunk_size=8, bidirectional=True)],
                         ids=["bimamba", "mamba_reverse", "mamba2_bi"])
def test_bf16_autocast_close_to_fp32(make):
    m = make()
    x = torch.randn(2, 20, 32)
    y32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = m(x)
    assert torch.isfinite(y16).all()
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-2)


def test_state_dict_names_follow_mamba_ssm_and_vision_mamba():
    one = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
           "A_log", "D", "out_proj.weight"}
    assert set(Mamba(16).state_dict()) == one
    assert set(BiMamba(16).state_dict()) == one | {"conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight",
                                                   "dt_proj_b.weight", "dt_proj_b.bias", "A_b_log", "D_b"}
    assert set(Mamba2(64).state_dict()) == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log",
                                            "D", "norm.weight", "out_proj.weight"}


@pytest.mark.parametrize("make", [lambda: BiMamba(32, d_state=16),
                                  lambda: Mamba2(32, d_state=16, headdim=8, bidirectional=True)],
                         ids=["BiMamba", "Mamba2"])
def test_mixers_compile_without_graph_breaks(make):
    """The compiled CPU kernels are custom ops, so torch.compile captures a whole mixer as one graph (fullgraph=True
    fails on any break) and the compiled module matches eager, gradients included. aot_eager runs dynamo and AOT
    autograd (the ops' fake and autograd registrations) without the slow inductor code generation."""
    from ssmdiff.ssm.ops import _scan_cpu

    if not _scan_cpu.available():
        pytest.skip("the compiled CPU kernel could not be built")
    torch.manual_seed(0)
    m = make()
    x = torch.randn(2, 40, 32, requires_grad=True)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    y_eager, y_comp = m(x), compiled(x)
    torch.testing.assert_close(y_comp, y_eager)
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x, *m.parameters()])
    g_comp = torch.autograd.grad(y_comp.square().sum(), [x, *m.parameters()])
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


def _graph_has(t, name):
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == name:
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


@pytest.mark.parametrize("make", [lambda: BiMamba(32), lambda: Mamba(32, reverse=True), lambda: Mamba(32)],
                         ids=["bimamba", "mamba_reverse", "mamba"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_fused_direction_matches_separate_ops(make, autocast, monkeypatch):
    """Training on the CPU kernel runs each direction's x_proj, dt_proj and scan as one autograd node
    (``_ScanDirection``): outputs and every gradient match autograd over the separate ops, in float32 and under
    bf16 autocast (there within bf16 rounding: the input gradient is accumulated by the product instead of a
    rounded add, weight gradients are summed in float32). Sampling (no grad) keeps the separate ops."""
    from ssmdiff.ssm.modules import mamba as mamba_mod
    from ssmdiff.ssm.ops import _scan_cpu

    if not _scan_cpu.available():
        pytest.skip("the compiled CPU kernel could not be built")
    torch.manual_seed(0)
    m = make()
    x = torch.randn(2, 70, 32, requires_grad=True)
    gy = torch.randn(2, 70, 32)

    def run(fused):
        monkeypatch.setattr(mamba_mod, "FUSED_DIRECTION", fused)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(x)
        assert _graph_has(y, "_ScanDirectionBackward") == fused
        return [y.float(), *torch.autograd.grad(y.float(), [x, *m.parameters()], gy)]

    names = ["y", "x", *(n for n, _ in m.named_parameters())]
    for name, a, b in zip(names, run(True), run(False)):
        assert a.dtype == b.dtype, name
        if autocast:  # relative to the whole tensor's norm: bf16 rounding differs element by element
            assert (a - b).norm() <= 2e-2 * b.norm(), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        assert m(x).grad_fn is None
