"""``SSMDiffPipeline``: an ssmdiff backbone as a diffusers ``DiffusionPipeline`` (like diffusers' DiTPipeline).

Components: ``transformer`` (any ssmdiff backbone; ``pipe.backbone`` is the same module), ``scheduler`` (any
diffusers scheduler) and an optional ``vae`` (latent models). The sampling step is the diffusion engine's: the same
classifier-free guidance (``ssmdiff.diffusion.sampling._Guided``: all prediction channels, null class, variance
channels from the conditional branch), the same initial noise draw, model timesteps on the 0..1000 scale, the
learned-range DDPM step fed the variance channels and every other scheduler the prediction alone, and flow-matching
schedulers on the engine's uniform grid. For one seed, scheduler and step count the result equals
``ssmdiff.diffusion.sample`` bit for bit (tests/test_pipeline.py checks it).
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

__all__ = ["SSMDiffPipeline"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class SSMDiffPipeline(DiffusionPipeline):
    """Class-conditional (or unconditional) image generation with an ssmdiff backbone.

    ``pipe(class_labels=[...], num_inference_steps=50, guidance_scale=1.5, generator=g, output_type="pil")``
    returns an ``ImagePipelineOutput`` (``.images``). ``save_pretrained`` / ``from_pretrained`` write and read the
    whole folder (model_index.json, transformer/, scheduler/, vae/ when present); nothing is downloaded.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer, scheduler, vae=None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)

    @property
    def backbone(self):
        """The ssmdiff backbone (the ``transformer`` component, named as in diffusers' DiTPipeline)."""
        return self.transformer

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved pipeline folder (local only: nothing is downloaded)."""
        import os

        path = str(pretrained_model_name_or_path)
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"{path} is not a saved pipeline folder (no model_index.json); write one with "
                                    f"pipe.save_pretrained or `ssmdiff export`")
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(path, **kwargs)

    def _labels(self, class_labels, batch_size, device):
        num_classes = int(getattr(self.transformer, "num_classes", 0) or 0)
        if class_labels is None:
            if batch_size is None:
                raise ValueError("give class_labels=[...] (one image per label) or, for an unconditional model, "
                                 "batch_size=N")
            return None, int(batch_size), num_classes
        if num_classes <= 0:
            raise ValueError("this model is unconditional: call the pipeline with batch_size=N, not class_labels")
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        y = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if y.numel() == 0:
            raise ValueError("class_labels is empty")
        if batch_size is not None and int(batch_size) != y.numel():
            raise ValueError(f"batch_size={batch_size} disagrees with {y.numel()} class labels")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"class labels must lie in [0, {num_classes - 1}], got {y.tolist()}")
        return y.to(device), y.numel(), num_classes

    def _set_timesteps(self, steps: int):
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = self.scheduler
        if isinstance(sched, FlowMatchEulerDiscreteScheduler):
            # The engine's flow grid t = 1, 1 - 1/n, ..., 1/n (diffusers' default stops at sigma_min instead).
            sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist())
            return
        with warnings.catch_warnings():
            # diffusers builds sigmas with np.array(tensor), which numpy 2 reports as deprecated: not ours.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*__array__.*")
            sched.set_timesteps(steps)

    def _progress_disabled(self) -> bool:
        # diffusers' set_progress_bar_config(disable=True) is how pipeline users silence the bar.
        return bool(getattr(self, "_progress_bar_config", {}).get("disable", False))

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.5,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int | None = None,
        eta: float = 0.0,
    ):
        """Generate one image per entry of ``class_labels`` (or ``batch_size`` images for an unconditional model).

        guidance_scale: classifier-free guidance uncond + s * (cond - uncond) on all prediction channels (1 turns
        it off; it needs class labels). generator: one ``torch.Generator`` for the noise and every stochastic step.
        output_type: "pil" (list of PIL images, rounded as ``ssmdiff sample`` writes PNGs), "np" (float NHWC in
        [0, 1]), "pt" (float NCHW in [0, 1]) or "latent" (the raw sample: latents, or pixels in [-1, 1]).
        eta: DDIM stochasticity, passed to schedulers whose step takes it.
        Returns ``ImagePipelineOutput(images=...)`` or a 1-tuple when ``return_dict=False``.
        """
        from .diffusion.sampling import _Guided, run_scheduler

        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if isinstance(generator, (list, tuple)):
            raise ValueError("pass one torch.Generator (it seeds the whole batch, as `ssmdiff sample` does)")
        model = self.transformer
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        y, n, num_classes = self._labels(class_labels, batch_size, device)
        if y is None and guidance_scale != 1.0:
            if num_classes > 0:
                raise ValueError("classifier-free guidance needs class_labels (or set guidance_scale=1.0)")
            guidance_scale = 1.0  # nothing to guide with an unconditional model
        c, size = int(model.in_channels), int(model.input_size)

        call = model
        if dtype != torch.float32:
            def call(x, t, y=None):  # noqa: E306 - half-precision weights take half-precision inputs
                return model(x.to(dtype), t.to(dtype), y=y) if y is not None else model(x.to(dtype), t.to(dtype))
        guided = _Guided(call, y, num_classes, guidance_scale, None, None, c)

        sched = self.scheduler
        self._set_timesteps(int(num_inference_steps))
        scale = 1000.0 / float(sched.config.num_train_timesteps)
        takes_eta = "eta" in inspect.signature(sched.step).parameters
        if eta != 0.0 and not takes_eta:
            raise ValueError(f"eta applies to DDIM-type schedulers, not {type(sched).__name__}")
        # Only a learned-variance DDPM step reads the variance channels; every other scheduler takes C channels.
        full = getattr(sched.config, "variance_type", None) in ("learned", "learned_range") \
            and int(model.out_channels) == 2 * c

        was_training = model.training
        model.eval()  # class dropout must be off while sampling
        try:
            gen_device = generator.device if generator is not None else device
            x = torch.randn((n, c, size, size), generator=generator, device=gen_device, dtype=torch.float32)
            x = run_scheduler(sched, lambda z, t: guided(z, t).float(), x.to(device), c,
                              to_model=lambda t: float(t) * scale, full=full, generator=generator,
                              eta=float(eta) if takes_eta else None, progress=not self._progress_disabled())
        finally:
            model.train(was_training)

        if output_type == "latent":
            images = x
        else:
            if self.vae is not None:
                from .data import decode_latents

                x = decode_latents(x, self.vae)
            if output_type == "pil":
                from PIL import Image

                from .utils.images import to_uint8_nhwc

                arr = to_uint8_nhwc(x)
                images = [Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a)
                          for a in arr]
            else:
                images = (x.float().cpu() / 2 + 0.5).clamp(0, 1)
                if output_type == "np":
                    images = images.permute(0, 2, 3, 1).numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
