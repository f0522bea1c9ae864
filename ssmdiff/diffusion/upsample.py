"""Upsample guidance (Hwang, Park & Jo 2024, arXiv 2404.01709), as DiM uses it for training-free high resolution.

A model trained on h x w images samples at (m h) x (m w): at every step in the first ``fraction`` of the
trajectory, the current sample average-pooled by m is also denoised by the model at its trained resolution, at the
timestep whose signal-to-noise ratio is m^2 times larger, and the (nearest-upsampled) difference between that
low-resolution noise prediction and the pooled full-resolution one is added to the full-resolution prediction.

Derivation (VP diffusion, x_t = a x_0 + s eps with a^2 = alpha_bar_t, s^2 = 1 - alpha_bar_t, SNR(t) = a^2 / s^2)
- Pooling. D averages each m x m block, U repeats each value over its block (so D U = identity). The eps values
  in a block are independent N(0, 1), so D eps = eps' / m with eps' ~ N(0, I) at the low resolution, and
      D x_t = a D x_0 + (s / m) eps'.
  As a low-resolution diffusion of the image D x_0, its SNR is a^2 m^2 / s^2 = m^2 SNR(t): pooling removes noise.
- Power (variance) adjustment. The squared coefficients of D x_t sum to P_t = a^2 + s^2 / m^2 < 1, while every
  x_t a variance-preserving model was trained on has a^2 + s^2 = 1. Dividing by sqrt(P_t),
      z = D x_t / sqrt(P_t) = a' D x_0 + s' eps',   a'^2 = alpha_bar_t / P_t,   s'^2 = (1 - alpha_bar_t) / (m^2 P_t),
  and a'^2 + s'^2 = 1: z is exactly a sample of the model's marginal q(x_tau | x_0 = D x_0) at the timestep tau
  with alpha_bar(tau) = alpha_bar_t / P_t, i.e. SNR(tau) = a'^2 / s'^2 = m^2 SNR(t) (``snr_matched_timestep``).
  This is the paper's "time adjustment" (tau) and "power adjustment" (sqrt(P_t)); DiM's released sampler divides
  by the same sqrt(alpha_bar_t + (1 - alpha_bar_t) / m^2) and uses the same correction below, with w = 1 over the
  first 30% of normalised time.
- Guidance. The low-resolution model predicts eps' of z; the pooled noise of x_t is D eps = eps' / m. So the
  full-resolution prediction eps_hat = eps_theta(x_t, t) is corrected in its block-mean component only:
      eps_guided = eps_hat + w * U( eps_theta(z, tau) / m - D eps_hat )
  The detail component eps_hat - U D eps_hat is untouched; with w = 1 the block means of the prediction are
  exactly the low-resolution model's, w in (0, 1) blends, w > 1 extrapolates like any guidance.
- Why this is the right correction. Every sampler used here (DDPM / DDIM / DPM-Solver++) updates x_t by a
  combination c1 x_t + c2 x0_hat + c3 eps_hat (+ noise) whose coefficients depend only on alpha_bar and on
  log-SNR differences. With w = 1, apply D and divide by sqrt(P): the block means follow *the same sampler run by
  the low-resolution model* on the SNR-shifted grid tau_k (log-SNR shifted by the constant 2 log m, so every
  step size in log-SNR is unchanged; the DDPM posterior variances map too, since the pooled noise m D z is again
  N(0, I)). Equivalently u = m D x_t is a proper x_t of the original schedule for the image m D x_0, denoised
  by eps_theta(u / (m sqrt(P_t)), tau_t). The low frequencies are therefore drawn from the model's own
  low-resolution distribution, which is what the model is good at; the full-resolution model supplies detail.
- Classifier-free guidance. The correction is linear in the predictions, so applying it to CFG-combined
  predictions (both resolutions guided with the same scale, the on/off decision taken at the full-resolution
  timestep t) equals CFG between the upsample-guided conditional and unconditional predictors.
- Other parameterisations. v- and x0-predicting models are converted to eps with the (alpha_bar, x) of their own
  input (x_t at t for the full resolution, z at tau for the pooled one), guided, and converted back.

Timesteps between integers (tau is continuous) are interpolated linearly in log-SNR, so alpha_bar(tau) equals
alpha_bar_t / P_t exactly; the model sees tau on the 0..1000 scale like every timestep. When m^2 SNR(t) exceeds
the least-noisy trained SNR (only at the last one or two steps of a 1000-step schedule) tau is clamped to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Samplers whose update the derivation above covers (an eps / x0 combination on integer timesteps).
UPSAMPLE_SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++3m")


@dataclass(frozen=True)
class UpsampleGuidance:
    """Settings of upsample guidance for ``sample(..., upsample_guidance=...)``.

    Args:
        factor: m, the integer ratio of the sampling resolution to the trained one (2 or 3 in DiM).
        weight: w, the guidance weight (DiM's ``ug_theta``, default 1: block means taken from the low-res model).
        fraction: guide while the normalised time t / T is >= 1 - fraction, i.e. over the first ``fraction`` of
            the trajectory (DiM's ``ug_eta`` = 0.3); 0 turns guidance off, 1 guides at every step.
        model: the network to run at the trained (low) resolution. Default: the sampling model itself, which is
            right for resolution-free models (convolutions); backbones with a fixed ``input_size`` need the
            trained-resolution model here and a copy built at the new size (``adapt_state_dict``) to sample.
    """

    factor: int = 2
    weight: float = 1.0
    fraction: float = 0.3
    model: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, np.integer)) or self.factor < 2:
            raise ValueError(f"upsample guidance factor must be an integer >= 2 (the ratio of the sampling "
                             f"resolution to the trained one), got {self.factor!r}")
        try:
            weight, fraction = float(self.weight), float(self.fraction)
        except (TypeError, ValueError):
            raise ValueError(f"upsample guidance weight and fraction must be numbers, got {self.weight!r}, "
                             f"{self.fraction!r}") from None
        if not math.isfinite(weight):
            raise ValueError(f"upsample guidance weight must be finite, got {self.weight!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"upsample guidance fraction must lie in [0, 1], got {self.fraction!r}")
        if self.model is not None and not callable(self.model):
            raise ValueError(f"upsample guidance model must be callable model(x, t, y=None), got "
                             f"{type(self.model).__name__}")
        object.__setattr__(self, "factor", int(self.factor))
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "fraction", fraction)

    @classmethod
    def coerce(cls, value) -> "UpsampleGuidance | None":
        """None/False -> None (off); True -> defaults; a dict of the fields; an UpsampleGuidance as is."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"factor", "weight", "fraction", "model"})
            if unknown:
                raise ValueError(f"unknown upsample guidance settings {unknown}; use factor, weight, fraction, model")
            return cls(**value)
        raise ValueError(f"upsample_guidance must be None, True, a dict or an UpsampleGuidance, got "
                         f"{type(value).__name__}")

    @property
    def enabled(self) -> bool:
        """False when the settings can never change a prediction (weight 0 or fraction 0)."""
        return self.weight != 0.0 and self.fraction > 0.0

    def active(self, t_model: float) -> bool:
        """Whether to guide at model timestep ``t_model`` (0..1000 scale, 1000 = pure noise)."""
        # The tolerance keeps e.g. t = 700 inside fraction 0.3 whatever 1 - 0.3 rounds to.
        return self.enabled and t_model / 1000.0 >= 1.0 - self.fraction - 1e-9


def _alphas_cumprod(schedule) -> np.ndarray:
    ab = np.asarray(getattr(schedule, "alphas_cumprod", schedule), dtype=np.float64)
    if ab.ndim != 1 or ab.size < 2 or not np.all((ab > 0) & (ab < 1)) or not np.all(np.diff(ab) < 0):
        raise ValueError("alphas_cumprod must be a strictly decreasing 1-D table in (0, 1) with at least 2 entries")
    return ab


def log_snr(schedule, t):
    """log SNR(t) = log(alpha_bar / (1 - alpha_bar)) at (possibly fractional) timesteps t in [0, T - 1],
    linear in t between integer steps. ``schedule``: a GaussianDiffusion or its alphas_cumprod table."""
    ab = _alphas_cumprod(schedule)
    lam = np.log(ab) - np.log1p(-ab)
    return np.interp(np.asarray(t, dtype=np.float64), np.arange(ab.size), lam)


def alpha_bar_at(schedule, t):
    """alpha_bar at (possibly fractional) timesteps, consistent with ``log_snr``: sigmoid(log SNR(t))."""
    lam = log_snr(schedule, t)
    return 1.0 / (1.0 + np.exp(-lam))


def snr_matched_timestep(schedule, t, factor: int = 2):
    """The timestep t' with SNR(t') = factor^2 * SNR(t), on the same integer scale [0, T - 1] as t.

    This is the noise level of the image average-pooled by ``factor`` (see the module docstring). ``schedule`` is
    a GaussianDiffusion or its alphas_cumprod; t a number, numpy array or tensor (fractional values allowed). SNR
    is interpolated linearly in log-SNR between integer steps, so the answer is generally fractional; it is
    clamped to 0 where factor^2 SNR(t) exceeds SNR(0). Returns the type it was given (tensors as float64).
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.integer, np.floating)) or factor < 1:
        raise ValueError(f"factor must be a number >= 1, got {factor!r}")
    ab = _alphas_cumprod(schedule)
    as_tensor = isinstance(t, torch.Tensor)
    device = t.device if as_tensor else None
    tt = np.asarray(t.detach().cpu().double().numpy() if as_tensor else t, dtype=np.float64)
    if not np.all(np.isfinite(tt)) or tt.min(initial=0.0) < 0 or tt.max(initial=0.0) > ab.size - 1:
        raise ValueError(f"timesteps must lie in [0, {ab.size - 1}] for this schedule")
    lam = np.log(ab) - np.log1p(-ab)
    target = np.interp(tt, np.arange(ab.size), lam) + 2.0 * math.log(factor)
    # log SNR decreases with t: invert on the reversed (increasing) table; np.interp clamps beyond lam[0] to 0.
    out = np.interp(target, lam[::-1], np.arange(ab.size, dtype=np.float64)[::-1])
    if as_tensor:
        return torch.from_numpy(np.asarray(out)).to(device)
    return float(out) if np.ndim(out) == 0 else out


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """D: the mean of every factor x factor block of the last two dimensions."""
    return F.avg_pool2d(x, factor)


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """U: nearest-neighbour upsampling (each value repeated over its block), so downsample(upsample(x)) == x."""
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def _to_eps(pred: torch.Tensor, x: torch.Tensor, ab: float, prediction: str) -> torch.Tensor:
    a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
    if prediction == "eps":
        return pred
    if prediction == "x0":
        return (x - a * pred) / s
    return a * pred + s * x  # v = a eps - s x0 and x = a x0 + s eps


def _from_eps(eps: torch.Tensor, x: torch.Tensor, ab: float, prediction: str) -> torch.Tensor:
    a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return (x - s * eps) / a
    return (eps - s * x) / a


class UpsampleGuided:
    """Applies upsample guidance to full-resolution predictions inside ``sample``.

    ``low(x, t_model, guide)`` is the trained-resolution predictor (with classifier-free guidance on when
    ``guide``); ``channels`` is C, the number of prediction channels (learned-variance channels pass through).
    """

    def __init__(self, objective, settings: UpsampleGuidance, low, channels: int):
        self.ab = _alphas_cumprod(objective)
        self.steps = int(objective.steps)
        self.prediction = objective.prediction
        self.settings, self.low, self.channels = settings, low, channels

    def __call__(self, out: torch.Tensor, x: torch.Tensor, t_model: float, guide: bool) -> torch.Tensor:
        st = self.settings
        if not st.active(t_model):
            return out
        m, c = st.factor, self.channels
        t = t_model * self.steps / 1000.0
        ab_t = float(alpha_bar_at(self.ab, t))
        power = ab_t + (1.0 - ab_t) / m ** 2
        tau = snr_matched_timestep(self.ab, t, m)
        z = downsample(x, m) / math.sqrt(power)
        low = self.low(z, tau * 1000.0 / self.steps, guide)
        eps_hi = _to_eps(out[:, :c], x, ab_t, self.prediction)
        # alpha_bar of z's marginal; equal to alpha_bar(tau) unless tau was clamped at 0.
        eps_lo = _to_eps(low[:, :c], z, ab_t / power, self.prediction)
        eps = eps_hi + st.weight * upsample(eps_lo / m - downsample(eps_hi, m), m)
        guided = out.clone()
        guided[:, :c] = _from_eps(eps, x, ab_t, self.prediction)
        return guided
