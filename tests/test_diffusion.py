"""Diffusion objectives against independently written formulas (float64)."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from ssmdiff.diffusion import (FlowMatching, GaussianDiffusion, create_objective, discretized_gaussian_log_likelihood,
                               get_betas, list_objectives, normal_kl, respaced_timesteps)


def alpha_bars(betas):
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return np.array(out)


# ----------------------------------------------------------------------------- schedules and respacing
def test_schedules_match_published_definitions():
    np.testing.assert_allclose(get_betas("linear", 1000), np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)
    # ADM keeps the overall noise when the chain is shorter by scaling the ends by 1000/steps.
    np.testing.assert_allclose(get_betas("linear", 500)[[0, -1]], [2e-4, 0.04])
    sl = get_betas("scaled_linear", 1000)
    assert sl[0] == pytest.approx(0.00085) and sl[-1] == pytest.approx(0.012)
    assert np.allclose(np.diff(np.sqrt(sl)), np.diff(np.sqrt(sl))[0])
    cos = get_betas("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(alpha_bars(cos)[:990], [f(i + 1) / f(0) for i in range(990)], rtol=1e-9)
    assert cos.max() == pytest.approx(0.999)


def test_respacing_250_of_1000():
    kept = respaced_timesteps(1000, 250)
    assert len(kept) == 250 and len(set(kept)) == 250
    assert kept[:4] == [999, 995, 991, 987] and kept[-3:] == [8, 4, 0]
    assert kept == [int(round(i * 999 / 249)) for i in range(249, -1, -1)]
    assert respaced_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="sampling steps"):
        respaced_timesteps(1000, 1001)


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="noise schedule"):
        GaussianDiffusion(schedule="quadratic")
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(prediction="noise")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        GaussianDiffusion(beta_start=0.5, beta_end=1.5)
    with pytest.raises(ValueError, match="positive"):
        GaussianDiffusion(steps=0)


# ----------------------------------------------------------------------------- closed forms
@pytest.fixture(scope="module")
def adm():
    return GaussianDiffusion("linear", 1000, "eps", learn_sigma=True)


def test_q_sample_mean_and_variance(adm):
    ab = alpha_bars(np.linspace(1e-4, 0.02, 1000))
    x0 = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 600, 999])
    mean, var, log_var = adm.q_mean_variance(x0, t)
    want_mean = torch.from_numpy(np.sqrt(ab[t.numpy()])).view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var[:, 0, 0, 0], torch.from_numpy(1 - ab[t.numpy()]), rtol=1e-12, atol=0)
    torch.testing.assert_close(log_var, var.log())
    # Empirically, q_sample draws from exactly that distribution.
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    tt = torch.full((20000,), 300)
    xt = adm.q_sample(x0, tt)
    assert xt.mean().item() == pytest.approx(math.sqrt(ab[300]) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab[300], rel=0.03)


def test_posterior_matches_bayes_rule(adm):
    """q(x_{t-1} | x_t, x_0) by conditioning the joint Gaussian, written without the ADM coefficients."""
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = alpha_bars(betas)
    x0 = torch.randn(4, 2, 3, dtype=torch.float64)
    xt = torch.randn(4, 2, 3, dtype=torch.float64)
    t = torch.tensor([1, 17, 500, 999])
    mean, var, log_var = adm.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        # prior x_{t-1} ~ N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}); likelihood x_t ~ N(sqrt(alpha_t) x_{t-1}, beta_t)
        prior_var = 1 - ab[ti - 1]
        precision = 1 / prior_var + (1 - betas[ti]) / betas[ti]
        post_var = 1 / precision
        post_mean = post_var * (math.sqrt(ab[ti - 1]) * x0[i] / prior_var
                                + math.sqrt(1 - betas[ti]) * xt[i] / betas[ti])
        torch.testing.assert_close(mean[i], post_mean, rtol=1e-10, atol=1e-12)
        assert var[i].flatten()[0].item() == pytest.approx(post_var, rel=1e-10)
        assert log_var[i].flatten()[0].item() == pytest.approx(math.log(post_var), rel=1e-10)
    # At t = 0 the posterior is a point mass at x_0; its log-variance is clipped to the t = 1 value.
    m0, v0, lv0 = adm.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    torch.testing.assert_close(m0, x0[:1])
    assert v0.abs().max().item() == 0.0
    assert lv0.flatten()[0].item() == pytest.approx(math.log(betas[1] * (1 - ab[0]) / (1 - ab[1])), rel=1e-10)


def test_normal_kl_closed_form():
    m1, m2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    s1, s2 = torch.rand(50, dtype=torch.float64) + 0.1, torch.rand(50, dtype=torch.float64) + 0.1
    kl = normal_kl(m1, 2 * s1.log(), m2, 2 * s2.log())
    want = torch.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    torch.testing.assert_close(kl, want, rtol=1e-12, atol=1e-12)
    assert normal_kl(m1, 0.3, m1, 0.3).abs().max().item() < 1e-15


def test_discretized_gaussian_likelihood():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    mean = torch.full_like(levels, 0.13)
    log_scale = torch.full_like(levels, math.log(0.2))
    logp = discretized_gaussian_log_likelihood(levels, mean, log_scale)
    # The 256 bins tile the real line, so their probabilities sum to one.
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # Against the exact normal CDF (the ADM tanh approximation is good to ~1e-3 in probability).
    x, m, s = levels.numpy(), 0.13, 0.2
    upper = np.where(x > 0.999, 1.0, ndtr((x + 1 / 255 - m) / s))
    lower = np.where(x < -0.999, 0.0, ndtr((x - 1 / 255 - m) / s))
    np.testing.assert_allclose(logp.exp().numpy(), upper - lower, atol=2e-3)
    # Against ADM's formula (tanh CDF, clamps at 1e-12), transcribed independently here in numpy.
    def cdf(z):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))

    xs = np.concatenate([x, [-1.0, 1.0, 0.0]])
    ms = np.concatenate([np.full(256, m), [3.0, -3.0, 40.0]])
    ls = np.concatenate([np.full(256, np.log(s)), [np.log(0.01)] * 3])
    up, lo = cdf((xs - ms + 1 / 255) / np.exp(ls)), cdf((xs - ms - 1 / 255) / np.exp(ls))
    want = np.log(np.maximum(up - lo, 1e-12))
    want = np.where(xs < -0.999, np.log(np.maximum(up, 1e-12)), want)
    want = np.where(xs > 0.999, np.log(np.maximum(1 - lo, 1e-12)), want)
    got = discretized_gaussian_log_likelihood(*(torch.from_numpy(a) for a in (xs, ms, ls)))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-10)  # tail cancellation


# ----------------------------------------------------------------------------- training losses
class TinyNet(torch.nn.Module):
    """A deterministic float64 model whose output depends on x, t and y."""

    def __init__(self, c, out_c, num_classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(out_c, c, generator=g, dtype=torch.float64) * 0.5)
        self.emb = torch.nn.Parameter(torch.randn(num_classes + 1, out_c, generator=g, dtype=torch.float64) * 0.3)
        self.seen_t = None

    def forward(self, x, t, y=None):
        self.seen_t = t
        out = torch.einsum("oc,nchw->nohw", self.w, x) + torch.sin(t.double() / 300.0).view(-1, 1, 1, 1)
        if y is not None:
            out = out + self.emb[y].view(x.shape[0], -1, 1, 1)
        return torch.tanh(out)


def reference_hybrid_loss(betas, x0, t, noise, out, steps):
    """ADM's MSE + VB (learned range), per sample, with plain numpy loops in float64."""
    ab = alpha_bars(betas)
    x0, noise, out = x0.numpy(), noise.numpy(), out.numpy()
    c = x0.shape[1]
    mse, vb = [], []
    for i, ti in enumerate(t.tolist()):
        a, s = math.sqrt(ab[ti]), math.sqrt(1 - ab[ti])
        xt = a * x0[i] + s * noise[i]
        eps, v = out[i, :c], out[i, c:]
        mse.append(np.mean((eps - noise[i]) ** 2))
        abp = ab[ti - 1] if ti > 0 else 1.0
        post_var = lambda k: betas[k] * (1 - (ab[k - 1] if k > 0 else 1.0)) / (1 - ab[k])  # noqa: E731
        log_post = math.log(post_var(ti) if ti > 0 else post_var(1))
        coef_x0 = betas[ti] * math.sqrt(abp) / (1 - ab[ti])
        coef_xt = (1 - abp) * math.sqrt(1 - betas[ti]) / (1 - ab[ti])
        x0_hat = (xt - s * eps) / a
        mu_model = coef_x0 * x0_hat + coef_xt * xt
        mu_true = coef_x0 * x0[i] + coef_xt * xt
        frac = (v + 1) / 2
        logvar = frac * math.log(betas[ti]) + (1 - frac) * log_post
        if ti > 0:
            kl = 0.5 * (-1 + logvar - log_post + math.exp(log_post) / np.exp(logvar)
                        + (mu_true - mu_model) ** 2 / np.exp(logvar))
            vb.append(np.mean(kl) / math.log(2))
        else:
            def cdf(z):
                return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
            sd = np.exp(0.5 * logvar)
            up, lo = cdf((x0[i] - mu_model + 1 / 255) / sd), cdf((x0[i] - mu_model - 1 / 255) / sd)
            ll = np.where(x0[i] < -0.999, np.log(np.maximum(up, 1e-12)),
                          np.where(x0[i] > 0.999, np.log(np.maximum(1 - lo, 1e-12)),
                                   np.log(np.maximum(up - lo, 1e-12))))
            vb.append(-np.mean(ll) / math.log(2))
    vb = np.array(vb) * steps / 1000
    return np.array(mse), vb


@pytest.mark.parametrize("steps", [1000, 200])
def test_hybrid_loss_matches_float64_reference(steps):
    diff = GaussianDiffusion("linear", steps, "eps", learn_sigma=True)
    net = TinyNet(3, 6)
    x0 = torch.rand(6, 3, 4, 4, dtype=torch.float64) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # the edge bins of the decoder likelihood
    t = torch.tensor([0, 0, 1, steps // 3, steps - 2, steps - 1])
    noise = torch.randn_like(x0)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    losses = diff.training_losses(net, x0, t, {"y": y}, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"}
    torch.testing.assert_close(net.seen_t, t.float() * 1000 / steps)  # models see the 0..1000 scale
    out = net(diff.q_sample(x0, t, noise), t.float() * 1000 / steps, y=y).detach()
    mse, vb = reference_hybrid_loss(get_betas("linear", steps), x0, t, noise, out, steps)
    np.testing.assert_allclose(losses["mse"].detach().numpy(), mse, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(losses["vb"].detach().numpy(), vb, rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(losses["loss"].detach().numpy(), mse + vb, rtol=1e-5, atol=1e-10)
    # DiT's loss type ("MSE", not "rescaled MSE") leaves the VB term unscaled.
    plain = GaussianDiffusion("linear", steps, "eps", learn_sigma=True, rescale_vb=False)
    unscaled = plain.training_losses(net, x0, t, {"y": y}, noise=noise)["vb"].detach().numpy()
    np.testing.assert_allclose(unscaled, vb * 1000 / steps, rtol=1e-5, atol=1e-10)


def test_vb_term_does_not_train_the_mean():
    diff = GaussianDiffusion(learn_sigma=True)
    x0 = torch.rand(3, 2, 2, 2, dtype=torch.float64) * 2 - 1
    out = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    losses = diff.training_losses(lambda x, t: out, x0, torch.tensor([0, 10, 900]))
    (grad,) = torch.autograd.grad(losses["vb"].sum(), out)
    assert grad[:, :2].abs().max().item() == 0.0 and grad[:, 2:].abs().max().item() > 0
    (grad,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert grad[:, 2:].abs().max().item() == 0.0


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_targets_are_consistent(prediction):
    """A model that returns the true target has zero MSE, and predict_x0 recovers x_0 from it."""
    diff = GaussianDiffusion("cosine", 1000, prediction)
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 3, 500, 999])
    ab = torch.from_numpy(alpha_bars(get_betas("cosine", 1000))[t.numpy()]).view(-1, 1, 1, 1)
    truth = {"eps": noise, "x0": x0, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction]
    losses = diff.training_losses(lambda x, tt: truth, x0, t, noise=noise)
    assert losses["mse"].abs().max().item() < 1e-20 and "vb" not in losses
    xt = diff.q_sample(x0, t, noise)
    torch.testing.assert_close(diff.predict_x0(xt, t, truth)[1:], x0[1:], rtol=1e-6, atol=1e-6)


def test_training_loss_input_errors():
    diff = GaussianDiffusion(learn_sigma=True)
    x0 = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="learn_sigma"):
        diff.training_losses(lambda x, t: x, x0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        diff.training_losses(lambda x, t: torch.cat([x, x], 1), x0, torch.tensor([1, 1000]))
    with pytest.raises(ValueError, match="shape"):
        diff.training_losses(lambda x, t: torch.cat([x, x], 1), x0, torch.tensor([1, 2, 3]))


def test_sample_t_is_uniform_and_seeded():
    diff = GaussianDiffusion("cosine", steps=10)
    t = diff.sample_t(20000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 9
    counts = torch.bincount(t, minlength=10).double() / 20000
    assert (counts - 0.1).abs().max().item() < 0.01
    assert torch.equal(t, diff.sample_t(20000, "cpu", torch.Generator().manual_seed(0)))


# ----------------------------------------------------------------------------- flow matching
def test_flow_matching_loss_and_path():
    flow = FlowMatching()
    x0 = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    seen = {}

    def model(x, tt):
        seen["x"], seen["t"] = x, tt
        return torch.zeros_like(x)

    losses = flow.training_losses(model, x0, t, noise=noise)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(seen["x"][i], (1 - ti) * x0[i] + ti * noise[i])
        assert losses["mse"][i].item() == pytest.approx(((noise[i] - x0[i]) ** 2).mean().item(), rel=1e-12)
    torch.testing.assert_close(seen["t"], (t * 1000).float())
    torch.testing.assert_close(losses["loss"], losses["mse"])
    exact = flow.training_losses(lambda x, tt: noise - x0, x0, t, noise=noise)
    assert exact["loss"].abs().max().item() == 0.0
    with pytest.raises(ValueError, match="learn_sigma=False"):
        flow.training_losses(lambda x, tt: torch.cat([x, x], 1), x0, t)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        flow.training_losses(model, x0, torch.tensor([0, 1, 2, 3, 4]))


def test_flow_time_sampling():
    g = torch.Generator().manual_seed(0)
    t = FlowMatching(time_sampling="uniform").sample_t(20000, "cpu", g)
    assert 0 <= t.min() and t.max() <= 1 and t.mean().item() == pytest.approx(0.5, abs=0.01)
    t = FlowMatching(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8).sample_t(20000, "cpu", g)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logit.std().item() == pytest.approx(0.8, abs=0.03)
    with pytest.raises(ValueError, match="time_sampling"):
        FlowMatching(time_sampling="beta")
    with pytest.raises(ValueError, match="path"):
        FlowMatching(path="cosine")


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("name", list_objectives())
def test_config_round_trip(name):
    obj = create_objective(name)
    again = create_objective(json.loads(json.dumps(obj.config)))
    assert type(again) is type(obj) and again.config == obj.config
    assert create_objective(json.dumps(obj.config)).config == obj.config
    if isinstance(obj, GaussianDiffusion):
        np.testing.assert_array_equal(again.betas, obj.betas)


def test_presets():
    adm = create_objective("adm")
    assert (adm.schedule, adm.steps, adm.prediction, adm.learn_sigma) == ("linear", 1000, "eps", True)
    dim = create_objective("dim")
    assert dim.schedule == "scaled_linear" and not dim.learn_sigma
    np.testing.assert_allclose(dim.betas[[0, -1]], [0.00085, 0.012])
    assert isinstance(create_objective("flow"), FlowMatching)
    assert create_objective("adm", steps=500).steps == 500
    with pytest.raises(ValueError, match="unknown objective"):
        create_objective("sde")
    with pytest.raises(ValueError, match="bad gaussian"):
        create_objective({"type": "gaussian", "schedul": "linear"})
