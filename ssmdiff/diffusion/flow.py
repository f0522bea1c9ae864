"""Flow matching (rectified flow) objective.

Convention (the one diffusers' FlowMatchEulerDiscreteScheduler uses, with sigma = t):
    x_t = (1 - t) x_0 + t eps,   t in [0, 1],   t = 1 is pure noise,
    the model predicts the velocity v = eps - x_0 = d x_t / d t,
and it is called with 1000 * t so every backbone sees timesteps on the same 0..1000 scale.
Sampling integrates dx/dt = v from t = 1 down to t = 0.
"""

from __future__ import annotations

import torch

from .gaussian import mean_flat

PATHS = ("linear",)
TIME_SAMPLINGS = ("uniform", "logit_normal")


class FlowMatching:
    """Flow-matching objective on the linear path with velocity prediction.

    Args:
        path: only "linear" (x_t = (1 - t) x_0 + t eps).
        time_sampling: "uniform" t ~ U(0, 1), or "logit_normal" t = sigmoid(N(logit_mean, logit_std^2))
            (Esser et al. 2024), which spends more training on intermediate noise levels.
    """

    kind = "flow"
    prediction = "velocity"
    learn_sigma = False
    default_sampler = "euler"

    def __init__(self, path: str = "linear", time_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        if path not in PATHS:
            raise ValueError(f"unknown flow path {path!r}; only {', '.join(PATHS)} is implemented")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; choose one of {', '.join(TIME_SAMPLINGS)}")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be positive, got {logit_std}")
        self.path, self.time_sampling = path, time_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    @property
    def config(self) -> dict:
        """JSON-serialisable dict; ``create_objective(config)`` rebuilds this objective."""
        return {"type": self.kind, "path": self.path, "time_sampling": self.time_sampling,
                "logit_mean": self.logit_mean, "logit_std": self.logit_std}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "type")
        return f"FlowMatching({args})"

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as the model sees them: 1000 * t."""
        return t.float() * 1000.0

    def sample_t(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times in [0, 1] (float32), uniform or logit-normal."""
        gen_device = generator.device if generator is not None else device
        if self.time_sampling == "uniform":
            t = torch.rand((batch_size,), device=gen_device, generator=generator)
        else:
            z = torch.randn((batch_size,), device=gen_device, generator=generator)
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return t.to(device) if device is not None else t

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        t = t.to(x_start.dtype).reshape(-1, *([1] * (x_start.ndim - 1)))
        return (1 - t) * x_start + t * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """x_0 = x_t - t v."""
        return x_t - t.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1))) * velocity

    def training_losses(self, model, x_start: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None) -> dict:
        """Per-sample {"loss", "mse"}: mean squared error of the predicted velocity against eps - x_0."""
        if x_start.ndim < 2:
            raise ValueError(f"x_start must be batched (N, C, ...), got shape {tuple(x_start.shape)}")
        t = torch.as_tensor(t, device=x_start.device)
        if t.ndim != 1 or t.shape[0] != x_start.shape[0]:
            raise ValueError(f"t must have shape ({x_start.shape[0]},), got {tuple(t.shape)}")
        # The range check reads the tensor on the host; skipped on accelerators so training never stalls on it.
        if not t.is_floating_point() or (t.device.type == "cpu" and (float(t.min()) < 0 or float(t.max()) > 1)):
            raise ValueError("FlowMatching times are floats in [0, 1]; use objective.sample_t(...)")
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        if out.shape != x_start.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} differs from the input {tuple(x_start.shape)}; "
                             f"flow matching needs a model built with learn_sigma=False")
        mse = mean_flat((noise - x_start - out) ** 2)
        return {"loss": mse, "mse": mse}
