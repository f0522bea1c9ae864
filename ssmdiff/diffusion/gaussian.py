"""Gaussian (DDPM) diffusion objective, numerically compatible with ADM / DiT.

Forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) with integer t in [0, steps).
Models are called with timesteps rescaled to the 0..1000 range (identical for the usual 1000 steps).
With ``learn_sigma`` the model returns 2C channels: the prediction and C values v in [-1, 1] that set the
reverse-step log-variance to frac * log(beta_t) + (1 - frac) * log(posterior_variance_clipped_t), frac = (v + 1) / 2
(Nichol & Dhariwal 2021); the loss is then MSE + the variational bound term in bits/dim (the "hybrid" loss).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .schedules import SCHEDULES, get_betas

PREDICTIONS = ("eps", "v", "x0")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting)."""
    tensor = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor))
    logvar1, logvar2 = (a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=tensor.dtype,
                                                                              device=tensor.device)
                        for a in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by ADM (kept for bit-compatible losses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of data in [-1, 1] quantised to 256 levels under N(means, exp(log_scales)^2).

    Each value owns the bin x +- 1/255; the two outermost bins extend to -inf and +inf.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """DDPM objective: forward process, posterior, ADM training losses and the tables samplers need.

    Args:
        schedule: "linear" (ADM/DiT), "scaled_linear" (DiM / Stable Diffusion) or "cosine".
        steps: number of training timesteps.
        prediction: what the model predicts: "eps" (noise), "v" (sqrt(ab) eps - sqrt(1-ab) x0) or "x0".
        learn_sigma: the model also outputs C variance-interpolation channels; adds the VB loss term.
        beta_start, beta_end: override the schedule's end points (linear and scaled_linear only).
        rescale_vb: multiply the VB term by steps/1000 (ADM's "rescaled MSE", improved-diffusion's default).
            DiT's plain "MSE" loss type does not; the two agree for the usual 1000 steps.
    """

    kind = "gaussian"

    def __init__(self, schedule: str = "linear", steps: int = 1000, prediction: str = "eps",
                 learn_sigma: bool = False, beta_start: float | None = None, beta_end: float | None = None,
                 rescale_vb: bool = True):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        self.schedule, self.steps, self.prediction = schedule, int(steps), prediction
        self.learn_sigma = bool(learn_sigma)
        self.rescale_vb = bool(rescale_vb)
        self.beta_start, self.beta_end = beta_start, beta_end
        betas = get_betas(schedule, self.steps, beta_start, beta_end)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; ADM clips the log with the t = 1 value so it stays finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1] if self.steps > 1 else betas[0], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (
            1.0 - self.alphas_cumprod)

    # ----------------------------------------------------------------- configuration
    @property
    def config(self) -> dict:
        """JSON-serialisable dict; ``create_objective(config)`` rebuilds this objective."""
        return {"type": self.kind, "schedule": self.schedule, "steps": self.steps,
                "prediction": self.prediction, "learn_sigma": self.learn_sigma,
                "beta_start": self.beta_start, "beta_end": self.beta_end, "rescale_vb": self.rescale_vb}

    default_sampler = "ddpm"

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "type")
        return f"GaussianDiffusion({args})"

    # ----------------------------------------------------------------- helpers
    def _extract(self, arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather ``arr[t]`` as a tensor broadcastable to ``like`` (float64 tables cast to like's dtype)."""
        out = torch.as_tensor(arr, dtype=torch.float64, device=t.device)[t.long()]
        out = out.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
        return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))

    def _check_t(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
        # Value checks read the tensor on the host; on an accelerator they would stall the queue every step.
        on_host = t.device.type == "cpu"
        if t.is_floating_point():
            if on_host and not torch.equal(t, t.round()):
                raise ValueError("GaussianDiffusion timesteps are integers in [0, steps); got fractional values")
            t = t.long()
        if on_host and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.steps):
            raise ValueError(f"timesteps must lie in [0, {self.steps}), got [{int(t.min())}, {int(t.max())}]")
        return t

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as the model sees them: float, on the 0..1000 scale."""
        return t.float() * (1000.0 / self.steps)

    def sample_t(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps: uniform integers in [0, steps)."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.steps, (batch_size,), device=gen_device, generator=generator)
        return t.to(device) if device is not None else t

    # ----------------------------------------------------------------- closed forms
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        var = self._extract(1.0 - self.alphas_cumprod, t, x_start)
        return mean, var.expand_as(x_start), self._extract(np.log(1.0 - self.alphas_cumprod), t,
                                                           x_start).expand_as(x_start)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) (with the given noise if any)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start {tuple(x_start.shape)}")
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        var = self._extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_var = self._extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, var, log_var

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """x_0 implied by the model's prediction (eps, v or x0) at x_t."""
        if self.prediction == "x0":
            return model_output
        a = self._extract(self.sqrt_alphas_cumprod, t, x_t)
        s = self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction == "eps":
            return (x_t - s * model_output) / a
        return a * x_t - s * model_output

    def target(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """Regression target of the MSE term for this prediction type."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x_start
        return (self._extract(self.sqrt_alphas_cumprod, t, x_t) * noise
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_start)

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Reverse step p(x_{t-1} | x_t) from a raw model output.

        Returns (mean, variance, log_variance, pred_x0). Without learned sigma the variance is the posterior
        variance (ADM "fixed small").
        """
        c = x_t.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"learn_sigma expects {2 * c} output channels, got {model_output.shape[1]}")
            pred, var_values = model_output[:, :c], model_output[:, c:]
            min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._extract(np.log(self.betas), t, x_t)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            var = torch.exp(log_var)
        else:
            if model_output.shape[1] != c:
                raise ValueError(f"expected {c} output channels, got {model_output.shape[1]}")
            pred = model_output
            var = self._extract(self.posterior_variance, t, x_t).expand_as(x_t)
            log_var = self._extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        pred_x0 = self.predict_x0(x_t, t, pred)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return mean, var, log_var, pred_x0

    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """Per-sample variational-bound term in bits/dim: KL(q || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        mean, _, log_var, _ = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ----------------------------------------------------------------- training
    def training_losses(self, model, x_start: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None) -> dict:
        """Per-sample losses {"loss", "mse"[, "vb"]} for one batch at integer timesteps t.

        With learned sigma the VB term sees the prediction detached, so it only trains the variance
        (ADM's hybrid loss); with ``rescale_vb`` it is scaled by steps/1000 as ADM's rescaled MSE does.
        """
        if x_start.ndim < 2:
            raise ValueError(f"x_start must be batched (N, C, ...), got shape {tuple(x_start.shape)}")
        t = self._check_t(t, x_start.shape[0]).to(x_start.device)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        c = x_start.shape[1]
        expected = 2 * c if self.learn_sigma else c
        if out.shape[0] != x_start.shape[0] or out.shape[1] != expected or out.shape[2:] != x_start.shape[2:]:
            raise ValueError(f"model output shape {tuple(out.shape)} does not fit input {tuple(x_start.shape)}: "
                             f"expected {expected} channels (learn_sigma={self.learn_sigma}); build the model "
                             f"with the same learn_sigma as the objective")
        pred = out[:, :c]
        terms = {"mse": mean_flat((self.target(x_start, x_t, t, noise) - pred) ** 2)}
        if self.learn_sigma:
            frozen = torch.cat([pred.detach(), out[:, c:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            if self.rescale_vb:
                terms["vb"] = terms["vb"] * (self.steps / 1000.0)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms
