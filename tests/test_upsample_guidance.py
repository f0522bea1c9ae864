"""Upsample guidance against truth: the SNR-matched timestep against closed forms, weight 0 / fraction 0 against
plain sampling, the pooled trajectory against the low-resolution sampler written out here, and on Gaussian data
whose exact low-resolution noise prediction is analytic, the pooled covariance of the samples against the truth."""

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from scipy.optimize import brentq

from ssmdiff.diffusion import (FlowMatching, UpsampleGuidance, alpha_bar_at, create_objective, log_snr,
                               respaced_timesteps, sample, snr_matched_timestep)


@pytest.fixture(autouse=True)
def _one_thread():
    # Many tiny ops per step: one thread avoids OpenMP contention on the shared two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pool(x, m):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // m, m, w // m, m).mean(dim=(3, 5))


def lam_of(ab, t):
    """log-SNR linear between integer steps (the test's own interpolation)."""
    lam = np.log(ab / (1 - ab))
    return float(np.interp(t, np.arange(len(ab)), lam))


def matched(ab, t, m):
    """t' with log SNR(t') = log SNR(t) + 2 log m by root finding, 0 when beyond the least noisy step."""
    target = lam_of(ab, t) + 2 * math.log(m)
    if target >= lam_of(ab, 0):
        return 0.0
    return brentq(lambda s: lam_of(ab, s) - target, 0.0, t, xtol=1e-12)


def ab_of(ab, t):
    return 1 / (1 + math.exp(-lam_of(ab, t)))


# ----------------------------------------------------------------------------- the SNR-matched timestep
@pytest.mark.parametrize("m", [2, 3])
def test_snr_matched_timestep_on_a_linear_log_snr_schedule(m):
    # log SNR(t) = 6 - 0.012 t exactly, so interpolation is exact and t' = t - 2 log(m) / 0.012 (>= 0).
    T = 1000
    lam = 6.0 - 0.012 * np.arange(T)
    ab = 1 / (1 + np.exp(-lam))
    t = np.array([0.0, 50.0, 123.4, 500.0, 731.25, 999.0])
    want = np.maximum(t - 2 * math.log(m) / 0.012, 0.0)
    np.testing.assert_allclose(snr_matched_timestep(ab, t, m), want, rtol=0, atol=1e-9)
    assert abs(snr_matched_timestep(ab, 731.25, m) - want[4]) < 1e-9  # float in, float out
    got = snr_matched_timestep(ab, torch.tensor(t), m)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("m", [2, 3])
def test_snr_matched_timestep_on_the_cosine_schedule(m):
    # Discrete cosine alpha_bar[i] = f((i + 1) / T) / f(0), f(u) = cos^2((u + s) / (1 + s) pi / 2): SNR(u') = m^2 SNR(u)
    # solves in closed form; between integer steps the table is interpolated, so allow a small error (larger
    # where log SNR bends sharply, when t' falls within the first steps).
    obj = create_objective("cosine")
    T, s = obj.steps, 0.008
    g0 = s / (1 + s) * math.pi / 2
    for i in [20, 100, 250, 500, 750, 900, 990]:
        ab = obj.alphas_cumprod[i]
        snr = m * m * ab / (1 - ab)
        ab_new = snr / (1 + snr)
        g = math.acos(math.sqrt(ab_new) * math.cos(g0))
        u = g * 2 / math.pi * (1 + s) - s
        want = u * T - 1
        assert abs(snr_matched_timestep(obj, float(i), m) - want) < (0.025 if i <= 100 else 0.002), (i, want)


@pytest.mark.parametrize("preset", ["ddpm", "dim", "cosine"])
def test_snr_matched_timestep_multiplies_snr_by_m_squared(preset):
    obj = create_objective(preset)
    ab = obj.alphas_cumprod
    for t in [3.0, 17.5, 200.0, 456.7, 800.0, 999.0]:
        for m in (2, 3):
            tau = snr_matched_timestep(obj, t, m)
            assert 0 <= tau < t
            assert abs(tau - matched(ab, t, m)) < 1e-6
            if tau > 0:
                assert abs(float(log_snr(obj, tau)) - (lam_of(ab, t) + 2 * math.log(m))) < 1e-9
                # The power identity behind the input rescaling: alpha_bar(tau) = alpha_bar_t / P_t.
                a = ab_of(ab, t)
                assert abs(float(alpha_bar_at(obj, tau)) - a / (a + (1 - a) / m ** 2)) < 1e-12
    assert snr_matched_timestep(obj, 0.0, 2) == 0.0  # nothing less noisy than step 0


def test_snr_matched_timestep_input_errors():
    obj = create_objective("ddpm")
    with pytest.raises(ValueError, match="lie in"):
        snr_matched_timestep(obj, 1000.0)
    with pytest.raises(ValueError, match="lie in"):
        snr_matched_timestep(obj, -1.0)
    with pytest.raises(ValueError, match="factor"):
        snr_matched_timestep(obj, 10.0, 0)
    with pytest.raises(ValueError, match="decreasing"):
        snr_matched_timestep(np.array([0.5, 0.6]), 0.5)


# ----------------------------------------------------------------------------- models
class TinyCond(torch.nn.Module):
    """A class-conditional model that works at any resolution (per-pixel channel mixing + a 3x3 blur), with
    learned-sigma output; records every call."""

    num_classes = 3

    def __init__(self, c=2, learn_sigma=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        out = 2 * c if learn_sigma else c
        self.w = torch.nn.Parameter(torch.randn(out, c, generator=g) * 0.3)
        self.emb = torch.nn.Parameter(torch.randn(self.num_classes + 1, out, generator=g))
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((tuple(x.shape), t.clone(), x.clone(), None if y is None else y.clone()))
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes)
        blur = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        h = torch.einsum("oc,nchw->nohw", self.w, x + blur)
        return torch.tanh(h + self.emb[y][:, :, None, None] * torch.cos(t / 400)[:, None, None, None])


class HandGuided(torch.nn.Module):
    """Classifier-free guidance done by hand inside a model (called without labels)."""

    def __init__(self, inner, y, scale):
        super().__init__()
        self.inner, self.y, self.scale = inner, y, scale

    def forward(self, x, t, y=None):
        assert y is None
        cond = self.inner(x, t, y=self.y)
        uncond = self.inner(x, t, y=torch.full_like(self.y, 3))
        out = cond.clone()
        c = x.shape[1]
        out[:, :c] = uncond[:, :c] + self.scale * (cond[:, :c] - uncond[:, :c])
        return out


class ExactGaussian(torch.nn.Module):
    """Bayes-optimal prediction for data x0 ~ N(0, cov) over the flattened (C, H, W) image, at continuous model
    timesteps (alpha_bar from the log-SNR interpolation of the objective's table)."""

    def __init__(self, objective, cov):
        super().__init__()
        self.objective, self.cov = objective, torch.as_tensor(cov, dtype=torch.float64)
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append(float(t[0]))
        ab = ab_of(self.objective.alphas_cumprod, float(t[0]) * self.objective.steps / 1000)
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        flat = x.double().reshape(x.shape[0], -1)
        d = flat.shape[1]
        cov_t = a * a * self.cov + s * s * torch.eye(d, dtype=torch.float64)
        eps = s * torch.linalg.solve(cov_t, flat.T).T
        x0 = (flat - s * eps) / a
        out = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.objective.prediction]
        return out.reshape(x.shape).to(x.dtype)


class PerPixel(ExactGaussian):
    """A "full-resolution" model that only knows per-pixel statistics: every pixel N(0, var), independent."""

    def __init__(self, objective, var):
        torch.nn.Module.__init__(self)
        self.objective, self.var = objective, var
        self.calls = []

    def forward(self, x, t, y=None):
        ab = ab_of(self.objective.alphas_cumprod, float(t[0]) * self.objective.steps / 1000)
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        eps = s * x.double() / (a * a * self.var + s * s)
        x0 = (x.double() - s * eps) / a
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.objective.prediction].to(x.dtype)


Y = torch.tensor([0, 1, 2, 1])


# ----------------------------------------------------------------------------- weight 0 / fraction 0
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_weight_or_fraction_zero_is_plain_sampling_bit_for_bit(sampler):
    adm = create_objective("adm")
    model = TinyCond()
    kw = dict(sampler=sampler, steps=6, y=Y, guidance_scale=2.5, progress=False)
    plain = sample(model, adm, (4, 2, 6, 6), generator=torch.Generator().manual_seed(3), **kw)
    low = TinyCond()
    for ug in (UpsampleGuidance(2, weight=0.0, fraction=1.0, model=low), {"weight": 1.0, "fraction": 0.0,
                                                                         "model": low}):
        got = sample(model, adm, (4, 2, 6, 6), generator=torch.Generator().manual_seed(3), upsample_guidance=ug,
                     **kw)
        assert torch.equal(got, plain)
    assert not low.calls  # nothing extra is evaluated
    assert torch.equal(sample(model, adm, (4, 2, 6, 6), generator=torch.Generator().manual_seed(3),
                              upsample_guidance=None, **kw), plain)


# ----------------------------------------------------------------------------- the pooled trajectory
def low_res_chain(objective, sampler, steps, low, x_T, m):
    """The low-resolution sampler that the block means must follow when w = 1 at every step.

    u = m * pool(x_t) is an x_t of the same schedule for the image m * pool(x_0) with unit noise; it is denoised
    by eps(u) = low(u / (m sqrt(P_t)), tau_t) / 1, where P_t = ab_t + (1 - ab_t) / m^2 and SNR(tau_t) = m^2 SNR(t).
    Written with ADM's respaced DDIM formulas, or diffusers' DPM-Solver++ driven step by step.
    """
    ab_table = objective.alphas_cumprod
    T = objective.steps

    def eps_u(u, t):
        a = ab_of(ab_table, t)
        power = a + (1 - a) / m ** 2
        z = u / (m * math.sqrt(power))
        tau = matched(ab_table, t, m)
        out = low(z.float(), torch.full((u.shape[0],), tau * 1000 / T)).double()
        a_low = a / power  # alpha_bar of z's marginal
        al, sl = math.sqrt(a_low), math.sqrt(1 - a_low)
        if objective.prediction == "eps":
            return out
        if objective.prediction == "x0":
            return (z - al * out) / sl
        return al * out + sl * z

    u = m * pool(x_T.double(), m)
    if sampler == "ddim":
        kept = sorted(respaced_timesteps(T, steps))
        for k in range(steps - 1, -1, -1):
            a = ab_table[kept[k]]
            a_prev = ab_table[kept[k - 1]] if k > 0 else 1.0
            eps = eps_u(u, kept[k])
            x0 = (u - math.sqrt(1 - a) * eps) / math.sqrt(a)
            u = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        return u / m
    with warnings.catch_warnings():  # diffusers' own numpy-2 deprecation notice
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*__array__.*")
        sched = DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=objective.betas.tolist(),
                                            prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
                                            timestep_spacing="linspace", final_sigmas_type="zero")
        sched.set_timesteps(steps)
    for t in sched.timesteps:
        u = sched.step(eps_u(u, int(t)).float(), t, u.float()).prev_sample.double()
    return u / m


@pytest.mark.parametrize("sampler,prediction,m,T", [("ddim", "eps", 2, 1000), ("ddim", "v", 3, 1000),
                                                    ("ddim", "eps", 2, 400), ("dpm++2m", "eps", 2, 1000),
                                                    ("dpm++2m", "x0", 2, 1000)])
def test_block_means_follow_the_low_res_sampler(sampler, prediction, m, T):
    """With w = 1 at every step the pooled samples are exactly the low-resolution model's own samples on the
    SNR-matched grid, whatever the full-resolution model predicts (here an arbitrary network)."""
    obj = create_objective("ddpm", prediction=prediction, steps=T)
    rng = np.random.default_rng(0)
    b = rng.normal(size=(8, 8))
    low = ExactGaussian(obj, 0.1 * np.eye(8) + b @ b.T / 8)  # 2 channels x 2 x 2 at low resolution
    high = TinyCond(learn_sigma=False)
    shape, steps = (16, 2, 2 * m, 2 * m), 8
    got = sample(high, obj, shape, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(4),
                 progress=False, upsample_guidance=UpsampleGuidance(m, weight=1.0, fraction=1.0, model=low))
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    want = low_res_chain(obj, sampler, steps, low, x_T, m)
    torch.testing.assert_close(pool(got.double(), m), want, rtol=2e-4, atol=2e-4)
    # And the guidance is not vacuous: the detail (what pooling removes) still comes from the full-res model.
    plain = sample(high, obj, shape, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(4),
                   progress=False)
    assert not torch.allclose(pool(plain, m), pool(got, m), atol=1e-2)


def test_guidance_visits_the_matched_timesteps_with_the_rescaled_pooled_input():
    obj = create_objective("dim")
    high, low = TinyCond(learn_sigma=False), TinyCond(learn_sigma=False)
    sample(high, obj, (2, 2, 6, 6), sampler="ddim", steps=50, progress=False,
           upsample_guidance=UpsampleGuidance(3, weight=0.7, fraction=0.3, model=low))
    kept = respaced_timesteps(1000, 50)
    guided = [t for t in kept if t >= 700]
    assert len(guided) == 15  # the first 30% of the trajectory
    assert len(high.calls) == 50 and len(low.calls) == len(guided)
    hi_calls = {int(round(t[0].item())): x for _, t, x, _ in high.calls}
    for (shape, t, z, _), t_hi in zip(low.calls, guided):
        assert shape == (2, 2, 2, 2)
        tau = matched(obj.alphas_cumprod, t_hi, 3)
        assert abs(t[0].item() - tau) < 1e-3
        a = obj.alphas_cumprod[t_hi]
        torch.testing.assert_close(z, pool(hi_calls[t_hi], 3) / math.sqrt(a + (1 - a) / 9))


# ----------------------------------------------------------------------------- classifier-free guidance
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_upsample_guidance_on_cfg_predictions_equals_guiding_a_hand_guided_model(sampler):
    adm = create_objective("adm")
    model = TinyCond()
    ug = UpsampleGuidance(2, weight=1.5, fraction=0.6)
    kw = dict(sampler=sampler, steps=8, progress=False, upsample_guidance=ug)
    got = sample(model, adm, (4, 2, 4, 6), y=Y, guidance_scale=3.0, generator=torch.Generator().manual_seed(1), **kw)
    want = sample(HandGuided(model, Y, 3.0), adm, (4, 2, 4, 6), generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = sample(model, adm, (4, 2, 4, 6), y=Y, guidance_scale=3.0, generator=torch.Generator().manual_seed(1),
                   sampler=sampler, steps=8, progress=False)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_eval_mode_for_both_models_and_restored():
    adm = create_objective("adm")
    high, low = TinyCond(), TinyCond()
    high.train(), low.train()
    seen = []
    orig = low.forward

    def spy(x, t, y=None):
        seen.append(low.training)
        return orig(x, t, y)

    low.forward = spy
    sample(high, adm, (2, 2, 4, 4), y=[0, 1], steps=4, progress=False,
           upsample_guidance={"factor": 2, "fraction": 1.0, "model": low})
    assert seen and not any(seen)
    assert high.training and low.training


# ----------------------------------------------------------------------------- the toy problem with known truth
def cov_error(x, m, truth):
    p = pool(x.double(), m).reshape(x.shape[0], -1)
    return torch.linalg.matrix_norm(torch.cov(p.T) - truth).item()


def test_guidance_moves_pooled_statistics_to_the_low_res_truth():
    """Low resolution: 2x2 images with strongly correlated pixels, whose exact noise prediction is analytic. The
    full-resolution model only knows that every pixel is N(0, 1). Sampling 4x4 images, the covariance of the 2x2
    block means is the per-pixel model's 1/4 I without guidance, and moves to the low-res truth with it."""
    obj = create_objective("ddpm")
    truth = torch.tensor([[0.9, 0.6, 0.5, 0.2], [0.6, 0.8, 0.3, 0.4], [0.5, 0.3, 0.7, 0.45], [0.2, 0.4, 0.45, 0.6]],
                         dtype=torch.float64)
    low, high = ExactGaussian(obj, truth), PerPixel(obj, 1.0)
    n = 6000

    def run(sampler, steps, ug=None, seed=0):
        return sample(high, obj, (n, 1, 4, 4), sampler=sampler, steps=steps, progress=False,
                      generator=torch.Generator().manual_seed(seed), upsample_guidance=ug)

    plain = cov_error(run("dpm++2m", 25), 2, truth)
    assert abs(plain - torch.linalg.matrix_norm(torch.eye(4) / 4 - truth).item()) < 0.05
    # The longer the guidance lasts, the closer: here the full-resolution model is wrong about the block means,
    # so what it decides unguided in later steps pulls them back towards its own 1/4 I.
    errors = [cov_error(run("dpm++2m", 25, UpsampleGuidance(2, fraction=f, model=low)), 2, truth)
              for f in (0.5, 0.7, 1.0)]
    assert errors[0] < 0.95 * plain and errors[1] < 0.75 * plain
    assert errors[2] < 0.06  # sampling noise of a 4x4 covariance from 6000 draws is ~0.03
    assert errors[2] < errors[1] < errors[0]
    # The stochastic sampler too: DDPM's pooled noise is again unit Gaussian after rescaling.
    assert cov_error(run("ddpm", 250, UpsampleGuidance(2, fraction=1.0, model=low), seed=1), 2, truth) < 0.12
    # Detail within a block stays the full-resolution model's: per-pixel variance around the block mean.
    x = run("dpm++2m", 25, UpsampleGuidance(2, fraction=1.0, model=low))
    within = (x.double() - pool(x.double(), 2).repeat_interleave(2, -2).repeat_interleave(2, -1)).var().item()
    assert abs(within - 0.75) < 0.05  # N(0, 1) pixels: E[(x - block mean)^2] = 1 - 1/4


# ----------------------------------------------------------------------------- errors
def test_upsample_guidance_input_errors():
    adm = create_objective("adm")
    model = TinyCond()
    kw = dict(steps=2, progress=False)
    with pytest.raises(ValueError, match="flow matching"):
        sample(TinyCond(learn_sigma=False), FlowMatching(), (2, 2, 4, 4), upsample_guidance=True, **kw)
    for sampler in ("euler", "heun"):
        with pytest.raises(ValueError, match="samplers"):
            sample(model, adm, (2, 2, 4, 4), sampler=sampler, upsample_guidance=True, **kw)
    with pytest.raises(ValueError, match="divisible by 2"):
        sample(model, adm, (2, 2, 6, 5), upsample_guidance=True, **kw)
    with pytest.raises(ValueError, match="divisible by 3"):
        sample(model, adm, (2, 2, 6, 8), upsample_guidance={"factor": 3}, **kw)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        sample(model, adm, (2, 2, 8), upsample_guidance=True, **kw)
    for bad in (dict(factor=1), dict(factor=2.5), dict(factor=True), dict(fraction=1.5), dict(weight=float("nan")),
                dict(weight="x"), dict(model=3)):
        with pytest.raises(ValueError, match="upsample guidance"):
            UpsampleGuidance(**bad)
    with pytest.raises(ValueError, match="unknown upsample guidance settings"):
        sample(model, adm, (2, 2, 4, 4), upsample_guidance={"scale": 2}, **kw)
    with pytest.raises(ValueError, match="upsample_guidance must be"):
        sample(model, adm, (2, 2, 4, 4), upsample_guidance=2, **kw)
    low = TinyCond()
    low.input_size = 4
    with pytest.raises(ValueError, match="built for 4x4.*use factor 4"):
        sample(model, adm, (2, 2, 16, 16), upsample_guidance=UpsampleGuidance(2, model=low), **kw)
    with pytest.raises(ValueError, match="low-resolution model output"):
        sample(model, adm, (2, 2, 4, 4), upsample_guidance=UpsampleGuidance(2, fraction=1.0,
                                                                            model=TinyCond(learn_sigma=False)), **kw)


# ----------------------------------------------------------------------------- with a real backbone
def test_real_backbone_upsampled_with_position_tables_adapted():
    models = pytest.importorskip("ssmdiff.models")
    obj = create_objective("dim")
    low = models.create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
    with torch.no_grad():  # away from the zero-initialised output layer, so guidance changes something
        g = torch.Generator().manual_seed(0)
        for p in low.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    high = models.create_model("DiT-T/2", input_size=16, in_channels=1, num_classes=10, learn_sigma=False)
    high.load_state_dict(models.adapt_state_dict(low.state_dict(), high))
    kw = dict(sampler="dpm++2m", steps=3, y=[0, 1], guidance_scale=1.5, progress=False)
    a = sample(high, obj, (2, 1, 16, 16), generator=torch.Generator().manual_seed(0),
               upsample_guidance=UpsampleGuidance(2, fraction=0.5, model=low), **kw)
    b = sample(high, obj, (2, 1, 16, 16), generator=torch.Generator().manual_seed(0), **kw)
    assert a.shape == (2, 1, 16, 16) and torch.isfinite(a).all() and not torch.equal(a, b)
    with pytest.raises(ValueError, match="built for 16x16"):  # the trained model was not passed as the low model
        sample(high, obj, (2, 1, 16, 16), upsample_guidance=True, **kw)
