"""One sampling entry point for every backbone and objective: diffusers schedulers + classifier-free guidance.

Samplers
- Gaussian objectives: "ddpm" (ancestral; learned-range variance for learn_sigma models, else fixed small),
  "ddim" (eta), "dpm++2m" / "dpm++3m" (DPM-Solver++ multistep), "euler" / "heun" (Karras-style ODE on the
  diffusers sigma grid). Schedulers get the objective's betas (trained_betas), so schedules match exactly.
- Flow matching: "euler" (diffusers FlowMatchEulerDiscreteScheduler on the uniform grid t = 1, 1 - 1/n, ..., 1/n
  -> 0) and "heun" (second-order, same grid; written here because diffusers' flow Heun cannot take a custom grid).

Timesteps: DDPM uses ADM/DiT respacing, round(linspace(0, T-1, n)) (250 of 1000 -> 999, 995, ..., 4, 0), which
diffusers calls timestep_spacing="linspace". DDIM runs on the respaced chain itself (betas recomputed from the kept
alpha_bar, as ADM's SpacedDiffusion), because diffusers' DDIM steps to t - T // n and so only stays on its own grid
when n divides T.

Karras-style "heun" on the cosine schedule is unstable: its largest sigma is ~2e4 (beta capped at 0.999), so the
first step spans 2e4 -> ~12 and the second-order correction overshoots; use "euler", "ddim" or "dpm++" there.

Guidance interval: ``guidance_interval=(lo, hi)`` is given in normalised time tau = (model timestep) / 1000, i.e.
t / T for Gaussian diffusion and t for flow matching: tau = 1 is pure noise (the start of sampling), tau = 0 clean
data. Guidance is applied at the model evaluations with lo <= tau <= hi; elsewhere the conditional model is used.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from .flow import FlowMatching
from .gaussian import GaussianDiffusion
from .schedules import respaced_betas, respaced_timesteps
from .upsample import UPSAMPLE_SAMPLERS, UpsampleGuidance, UpsampleGuided

GAUSSIAN_SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++3m", "euler", "heun")
FLOW_SAMPLERS = ("euler", "heun")
SAMPLERS = GAUSSIAN_SAMPLERS
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm++2m": 50, "dpm++3m": 50, "euler": 50, "heun": 50}

_DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _gaussian_scheduler(objective: GaussianDiffusion, sampler: str, steps: int):
    """A diffusers scheduler for a Gaussian objective and the map scheduler timestep -> model timestep."""
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           HeunDiscreteScheduler)

    T = objective.steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] for this objective, got {steps}")
    common = dict(num_train_timesteps=T, trained_betas=objective.betas.tolist(),
                  prediction_type=_DIFFUSERS_PREDICTION[objective.prediction])
    scale = 1000.0 / T

    def to_model(t):
        return float(t) * scale

    if sampler == "ddpm":
        sched = DDPMScheduler(**common, variance_type="learned_range" if objective.learn_sigma else "fixed_small",
                              clip_sample=False, timestep_spacing="linspace")
    elif sampler == "ddim":
        kept = sorted(respaced_timesteps(T, steps))
        sched = DDIMScheduler(num_train_timesteps=steps, trained_betas=respaced_betas(objective.alphas_cumprod,
                                                                                      kept).tolist(),
                              prediction_type=common["prediction_type"], clip_sample=False, set_alpha_to_one=True,
                              steps_offset=0, timestep_spacing="leading")

        def to_model(t):  # noqa: F811 - the respaced chain's index k stands for original timestep kept[k]
            return kept[int(t)] * scale
    elif sampler in ("dpm++2m", "dpm++3m"):
        sched = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++",
                                            solver_order=2 if sampler == "dpm++2m" else 3,
                                            timestep_spacing="linspace", final_sigmas_type="zero")
    elif sampler == "euler":
        sched = EulerDiscreteScheduler(**common, timestep_spacing="linspace")
    elif sampler == "heun":
        sched = HeunDiscreteScheduler(**common, timestep_spacing="linspace")
    else:
        raise ValueError(f"unknown sampler {sampler!r} for Gaussian diffusion; choose one of "
                         f"{', '.join(GAUSSIAN_SAMPLERS)}")
    sched.set_timesteps(steps)
    return sched, to_model


class _Guided:
    """Wraps a model with classifier-free guidance; called with (x, model timestep as float)."""

    def __init__(self, model, y, null_class, scale, channels, interval, pred_channels):
        self.model, self.y, self.scale = model, y, float(scale)
        self.null = None if y is None else torch.full_like(y, null_class)
        self.channels = pred_channels if channels is None else channels
        self.interval = interval

    def _call(self, x, t, y):
        return self.model(x, t) if y is None else self.model(x, t, y=y)

    def decide(self, t_model: float) -> bool:
        """Whether guidance is on at this model timestep (labels given, scale != 1, inside the interval)."""
        guide = self.y is not None and self.scale != 1.0
        if guide and self.interval is not None:
            tau = t_model / 1000.0
            guide = self.interval[0] <= tau <= self.interval[1]
        return guide

    def __call__(self, x: torch.Tensor, t_model: float, guide: bool | None = None) -> torch.Tensor:
        """The (guided) prediction; ``guide`` overrides the decision (upsample guidance takes it at the
        full-resolution timestep for both resolutions)."""
        t = torch.full((x.shape[0],), t_model, dtype=torch.float32, device=x.device)
        if guide is None:
            guide = self.decide(t_model)
        if not guide:
            return self._call(x, t, self.y).float()
        if self.scale == 0.0:
            return self._call(x, t, self.null).float()
        out = self._call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.y, self.null])).float()
        cond, uncond = out.chunk(2)
        k = self.channels
        guided = cond.clone()
        guided[:, :k] = uncond[:, :k] + self.scale * (cond[:, :k] - uncond[:, :k])
        return guided


def _flow_heun(guided, x, steps, progress):
    """Heun's method for dx/dt = v(x, t) on t = 1 -> 0 (uniform grid), 2 * steps model evaluations."""
    ts = np.linspace(1.0, 0.0, steps + 1)
    for i in tqdm(range(steps), desc="sampling (heun)", disable=not progress):
        t, t_next = float(ts[i]), float(ts[i + 1])
        v = guided(x, t * 1000.0)
        x_euler = x + (t_next - t) * v
        v_next = guided(x_euler, t_next * 1000.0)
        x = x + (t_next - t) * 0.5 * (v + v_next)
    return x


@torch.no_grad()
def run_scheduler(sched, guided, x, c: int, *, to_model, full: bool, generator=None, eta: float | None = None,
                  progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """Step a diffusers scheduler (timesteps already set) from the noise ``x`` down to a sample.

    ``guided(x, t_model)`` is the (guided) network and ``to_model`` maps a scheduler timestep to the model's 0..1000
    scale. ``full``: hand all 2C output channels to the scheduler (a learned-variance DDPM step reads them); else
    the first ``c``. ``eta`` is passed only when given (DDIM). Shared by ``sample`` and ``SSMDiffPipeline`` so both
    step identically.
    """
    extra = {}
    if "generator" in inspect.signature(sched.step).parameters:
        extra["generator"] = generator
    if eta is not None:
        extra["eta"] = float(eta)
    x = x * getattr(sched, "init_noise_sigma", 1.0)
    scale_input = getattr(sched, "scale_model_input", lambda sample, timestep: sample)
    for t in tqdm(sched.timesteps, desc=desc, disable=not progress):
        out = guided(scale_input(x, t), to_model(t))
        x = sched.step(out if full else out[:, :c], t, x, **extra).prev_sample
    return x


def sample(model, objective, shape, *, sampler: str | None = None, steps: int | None = None, y=None,
           num_classes: int = 0, guidance_scale: float = 1.0, guidance_channels: int | None = None,
           guidance_interval: tuple[float, float] | None = None, eta: float = 0.0,
           generator: torch.Generator | None = None, device=None, progress: bool = True,
           upsample_guidance: UpsampleGuidance | dict | bool | None = None) -> torch.Tensor:
    """Generate samples x_0 of ``shape`` (N, C, ...) with ``model`` trained under ``objective``.

    Args:
        model: callable ``model(x, t, y=None)`` with t on the 0..1000 scale (put in eval mode while sampling).
        objective: a GaussianDiffusion or FlowMatching.
        sampler: see the module docstring; default "ddpm" for Gaussian and "euler" for flow objectives.
        steps: sampler steps (model evaluations per step: 2 for heun); default 250 for ddpm, 50 otherwise.
        y: class ids (N,), or None for unconditional sampling (the model is then called without labels).
        num_classes: number of real classes; the null class is index ``num_classes``. Default: model.num_classes.
        guidance_scale: classifier-free guidance s: uncond + s * (cond - uncond). 1 runs the conditional model
            alone, 0 the unconditional one alone.
        guidance_channels: guide only the first k prediction channels (legacy DiT/DiS behaviour with k=3 for
            4-channel latents); default: all C prediction channels. Learned-variance channels always come from
            the conditional branch, as in DiT.
        guidance_interval: (lo, hi) in normalised time tau in [0, 1] (1 = pure noise); guide only there.
        eta: DDIM stochasticity (0 = deterministic DDIM); only for the "ddim" sampler.
        generator: torch.Generator for the initial noise and every stochastic step (deterministic given it).
        device: where to sample; default the model's device.
        progress: show a tqdm progress bar.
        upsample_guidance: sample at m x the trained resolution with upsample guidance (arXiv 2404.01709, as
            DiM): an ``UpsampleGuidance(factor=m, weight=w, fraction=0.3, model=low_res_model)``, a dict of those
            fields, or True for the defaults. ``shape`` is the full (high) resolution; H and W must be divisible
            by m. Gaussian objectives with the ddpm / ddim / dpm++2m / dpm++3m samplers only. See
            ``ssmdiff.diffusion.upsample`` for the formula and its derivation.
    """
    if isinstance(objective, GaussianDiffusion):
        allowed = GAUSSIAN_SAMPLERS
    elif isinstance(objective, FlowMatching):
        allowed = FLOW_SAMPLERS
    else:
        raise ValueError(f"objective must be a GaussianDiffusion or FlowMatching, got {type(objective).__name__}")
    sampler = objective.default_sampler if sampler is None else sampler
    if sampler not in allowed:
        raise ValueError(f"sampler {sampler!r} does not apply to {type(objective).__name__}; choose one of "
                         f"{', '.join(allowed)}")
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (N, C, ...) with positive sizes, got {shape}")
    n, c = shape[0], shape[1]
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only (sampler is {sampler!r})")
    if device is None:
        param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    if not num_classes:
        num_classes = int(getattr(model, "num_classes", 0) or 0)
    if y is not None:
        if num_classes <= 0:
            raise ValueError("class labels y were given but num_classes is 0; pass num_classes= (or sample "
                             "unconditionally with y=None)")
        y = torch.as_tensor(y, dtype=torch.long, device=device).reshape(-1)
        if y.shape[0] != n:
            raise ValueError(f"y has {y.shape[0]} labels for a batch of {n}")
        if int(y.min()) < 0 or int(y.max()) > num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}] ({num_classes} = null class), "
                             f"got [{int(y.min())}, {int(y.max())}]")
    elif guidance_scale != 1.0:
        raise ValueError("classifier-free guidance needs class labels y (guidance_scale != 1 with y=None)")
    if guidance_channels is not None and not (isinstance(guidance_channels, int) and 1 <= guidance_channels <= c):
        raise ValueError(f"guidance_channels must be an integer in [1, {c}], got {guidance_channels!r}")
    if guidance_interval is not None:
        lo, hi = (float(v) for v in guidance_interval)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {guidance_interval}")
        guidance_interval = (lo, hi)

    ug = UpsampleGuidance.coerce(upsample_guidance)
    low_model = None
    if ug is not None:
        if not isinstance(objective, GaussianDiffusion):
            raise ValueError("upsample guidance needs a Gaussian diffusion objective (eps, v or x0 prediction); "
                             "it is not defined for flow matching")
        if sampler not in UPSAMPLE_SAMPLERS:
            raise ValueError(f"upsample guidance works with the samplers {', '.join(UPSAMPLE_SAMPLERS)}, not "
                             f"{sampler!r}")
        m = ug.factor
        if len(shape) != 4 or shape[2] % m or shape[3] % m:
            raise ValueError(f"upsample guidance by {m} needs images (N, C, H, W) with H and W divisible by {m}, "
                             f"got shape {shape}; pick an image size that is {m} x the trained one")
        low_model = model if ug.model is None else ug.model
        low_size = getattr(low_model, "input_size", None)
        if low_size is not None and (int(low_size) != shape[2] // m or int(low_size) != shape[3] // m):
            hint = (f", or use factor {shape[2] // int(low_size)}" if shape[2] == shape[3] and int(low_size) > 0
                    and shape[2] % int(low_size) == 0 and shape[2] // int(low_size) >= 2 else "")
            raise ValueError(f"upsample guidance by {m} runs the low-resolution model on {shape[2] // m}x"
                             f"{shape[3] // m} images, but it was built for {low_size}x{low_size}: pass the model "
                             f"at its trained resolution as UpsampleGuidance(model=...) and sample with a copy "
                             f"built at {shape[2]}x{shape[3]} (models.adapt_state_dict){hint}")
        if not ug.enabled:
            ug = None  # weight 0 or fraction 0: plain sampling, with no extra model calls

    expected = 2 * c if objective.learn_sigma else c
    raw = _Guided(model, y, num_classes, guidance_scale, guidance_channels, guidance_interval, c)

    def check(out, x, what="model"):
        if out.shape[1] != expected or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
            raise ValueError(f"{what} output shape {tuple(out.shape)} does not fit samples {tuple(x.shape)}: "
                             f"expected {expected} channels (objective learn_sigma={objective.learn_sigma})")
        return out

    upsampled = None
    if ug is not None:
        raw_low = _Guided(low_model, y, num_classes, guidance_scale, guidance_channels, guidance_interval, c)
        upsampled = UpsampleGuided(objective, ug, lambda z, t, g: check(raw_low(z, t, g), z, "low-resolution model"),
                                   c)

    def guided(x, t_model):
        guide = raw.decide(t_model)
        out = check(raw(x, t_model, guide), x)
        return out if upsampled is None else upsampled(out, x, t_model, guide)

    modules = [mod for mod in dict.fromkeys([model, low_model]) if isinstance(mod, torch.nn.Module)]
    was_training = [mod.training for mod in modules]
    for mod in modules:
        mod.eval()  # class dropout and other train-time randomness must be off while sampling
    try:
        gen_device = generator.device if generator is not None else device
        x = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
        if isinstance(objective, FlowMatching) and sampler == "heun":
            return _flow_heun(guided, x, steps, progress)
        if isinstance(objective, FlowMatching):
            from diffusers import FlowMatchEulerDiscreteScheduler

            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
            sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist())

            def to_model(t):
                return float(t)
        else:
            with warnings.catch_warnings():
                # diffusers builds sigmas with np.array(tensor), which numpy 2 reports as deprecated: not ours.
                warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*__array__.*")
                sched, to_model = _gaussian_scheduler(objective, sampler, steps)
        # DDPM's learned-range step reads the variance channels itself; every other scheduler wants C channels.
        full = sampler == "ddpm" and objective.learn_sigma
        return run_scheduler(sched, guided, x, c, to_model=to_model, full=full, generator=generator,
                             eta=float(eta) if sampler == "ddim" else None, progress=progress,
                             desc=f"sampling ({sampler})")
    finally:
        for mod, mode in zip(modules, was_training):
            mod.train(mode)
