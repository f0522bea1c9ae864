"""The diffusion engine: training objectives (ADM Gaussian diffusion, flow matching) and sampling."""

from __future__ import annotations

import json

from .flow import FlowMatching
from .gaussian import (GaussianDiffusion, approx_standard_normal_cdf, discretized_gaussian_log_likelihood,
                       mean_flat, normal_kl)
from .sampling import DEFAULT_STEPS, FLOW_SAMPLERS, GAUSSIAN_SAMPLERS, SAMPLERS, sample
from .schedules import get_betas, respaced_betas, respaced_timesteps
from .upsample import UPSAMPLE_SAMPLERS, UpsampleGuidance, alpha_bar_at, log_snr, snr_matched_timestep

# Named recipes the CLI can pass by name.
PRESETS = {
    # ADM / DiT / DiS: linear 1e-4..0.02, eps prediction, learned-range sigma, MSE + VB.
    "adm": {"type": "gaussian", "schedule": "linear", "steps": 1000, "prediction": "eps", "learn_sigma": True},
    # DiM (Stable Diffusion betas): scaled_linear 0.00085..0.012, eps prediction, plain MSE.
    "dim": {"type": "gaussian", "schedule": "scaled_linear", "steps": 1000, "prediction": "eps",
            "learn_sigma": False},
    # Plain DDPM (Ho et al.): linear betas, eps, fixed variance, MSE.
    "ddpm": {"type": "gaussian", "schedule": "linear", "steps": 1000, "prediction": "eps", "learn_sigma": False},
    # Improved DDPM cosine schedule with learned sigma.
    "cosine": {"type": "gaussian", "schedule": "cosine", "steps": 1000, "prediction": "eps", "learn_sigma": True},
    # Flow matching, linear path, velocity prediction (ZigMa / SiT style), uniform or logit-normal times (SD3).
    "flow": {"type": "flow", "path": "linear", "time_sampling": "uniform"},
    "flow-logit-normal": {"type": "flow", "path": "linear", "time_sampling": "logit_normal"},
}

_TYPES = {"gaussian": GaussianDiffusion, "flow": FlowMatching}


def list_objectives() -> list[str]:
    """Names of the presets ``create_objective`` accepts."""
    return sorted(PRESETS)


def create_objective(config="adm", **overrides):
    """Build an objective from a preset name, a config dict (an objective's ``.config``) or a JSON string.

    ``overrides`` replace config entries, e.g. ``create_objective("adm", steps=500)``.
    """
    if isinstance(config, (GaussianDiffusion, FlowMatching)):
        config = config.config
    if isinstance(config, str):
        text = config.strip()
        if text.startswith("{"):
            try:
                config = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"objective config is not valid JSON: {e}") from None
        elif config in PRESETS:
            config = PRESETS[config]
        else:
            raise ValueError(f"unknown objective {config!r}; choose one of {', '.join(list_objectives())} "
                             f"or pass a config dict")
    if not isinstance(config, dict):
        raise ValueError(f"objective config must be a preset name or a dict, got {type(config).__name__}")
    config = {**config, **overrides}
    kind = config.pop("type", "gaussian")
    if kind not in _TYPES:
        raise ValueError(f"unknown objective type {kind!r}; choose one of {', '.join(_TYPES)}")
    try:
        return _TYPES[kind](**config)
    except TypeError as e:
        raise ValueError(f"bad {kind} objective config {config}: {e}") from None


__all__ = [
    "GaussianDiffusion", "FlowMatching", "create_objective", "list_objectives", "PRESETS", "sample", "SAMPLERS",
    "GAUSSIAN_SAMPLERS", "FLOW_SAMPLERS", "DEFAULT_STEPS", "get_betas", "respaced_timesteps", "respaced_betas",
    "normal_kl", "discretized_gaussian_log_likelihood", "approx_standard_normal_cdf", "mean_flat",
    "UpsampleGuidance", "UPSAMPLE_SAMPLERS", "snr_matched_timestep", "log_snr", "alpha_bar_at",
]
