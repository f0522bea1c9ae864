"""Noise schedules (betas) and ADM-style timestep respacing, all in float64 numpy."""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine")


def get_betas(schedule: str, steps: int = 1000, beta_start: float | None = None,
              beta_end: float | None = None) -> np.ndarray:
    """Return the float64 betas of a named schedule.

    - ``"linear"``: ADM/DiT. Without explicit ends it uses 1e-4..0.02 rescaled by 1000/steps, so a
      shorter chain keeps the same overall noise level (as ADM's ``get_named_beta_schedule`` does).
    - ``"scaled_linear"``: Stable Diffusion / DiM, linear in sqrt(beta), default 0.00085..0.012.
    - ``"cosine"``: Nichol & Dhariwal, alpha_bar(t) = cos^2((t/T + 0.008)/1.008 * pi/2), betas capped at 0.999.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if schedule == "linear":
        scale = 1000.0 / steps
        start = scale * 1e-4 if beta_start is None else float(beta_start)
        end = scale * 0.02 if beta_end is None else float(beta_end)
        betas = np.linspace(start, end, steps, dtype=np.float64)
    elif schedule == "scaled_linear":
        start = 0.00085 if beta_start is None else float(beta_start)
        end = 0.012 if beta_end is None else float(beta_end)
        betas = np.linspace(start ** 0.5, end ** 0.5, steps, dtype=np.float64) ** 2
    elif schedule == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule has no beta_start/beta_end; leave them unset")

        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                          for i in range(steps)], dtype=np.float64)
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(f"betas must lie in (0, 1); got range [{betas.min()}, {betas.max()}] "
                         f"from beta_start={beta_start}, beta_end={beta_end}")
    return betas


def respaced_timesteps(steps: int, num: int) -> list[int]:
    """Timesteps kept when sampling ``num`` of ``steps`` steps, in sampling order (high to low).

    This is ADM/DiT's respacing, round(linspace(0, steps - 1, num)): 250 of 1000 gives 999, 995, ..., 4, 0.
    """
    if not isinstance(num, (int, np.integer)) or not 1 <= num <= steps:
        raise ValueError(f"number of sampling steps must be an integer in [1, {steps}], got {num!r}")
    kept = np.round(np.linspace(0, steps - 1, num)).astype(np.int64)
    return [int(t) for t in kept[::-1]]


def respaced_betas(alphas_cumprod: np.ndarray, timesteps) -> np.ndarray:
    """Betas of the shorter chain that visits only ``timesteps`` (any order), keeping their alpha_bar.

    beta'_k = 1 - alpha_bar[t_k] / alpha_bar[t_{k-1}] with t sorted ascending, as ADM's SpacedDiffusion.
    """
    kept = np.sort(np.asarray(list(timesteps), dtype=np.int64))
    ab = np.asarray(alphas_cumprod, dtype=np.float64)[kept]
    prev = np.concatenate([[1.0], ab[:-1]])
    return 1.0 - ab / prev
