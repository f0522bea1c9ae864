"""Sampling from a trained run: PNG grid, single PNGs and an ADM-style ``.npz`` (uint8 NHWC under ``arr_0``).

Each batch ``b`` draws its noise from a generator seeded by (seed, b), so the images do not depend on how the
batches are spread over torchrun ranks: rank r takes batches r, r + world, ... and rank 0 gathers them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .utils import distributed as du
from .utils.images import save_class_grid, save_grid, save_images, to_uint8_nhwc


@dataclass
class LoadedRun:
    """A model ready to sample, with what is needed to interpret its outputs."""

    model: nn.Module
    objective: object
    checkpoint: str
    step: int
    train_config: dict
    data: dict
    ema: bool

    @property
    def num_classes(self) -> int:
        return int(self.data.get("num_classes", 0) or getattr(self.model, "num_classes", 0) or 0)

    @property
    def shape_chw(self) -> tuple[int, int, int]:
        size = int(self.data.get("image_size") or self.model.input_size)
        return int(self.data.get("channels") or self.model.in_channels), size, size

    @property
    def class_names(self) -> list[str] | None:
        return self.data.get("class_names")


def load_run(path: str, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the model (EMA or live weights) and objective of a run folder or checkpoint directory.

    Raises FileNotFoundError for a missing path and CheckpointError for a partial, corrupt or foreign checkpoint.
    """
    d = ckpt.resolve_checkpoint(path)
    state = ckpt.read_state(d)
    from .diffusion import create_objective
    from .models import create_model

    mcfg = state.get("model_config")
    if not isinstance(mcfg, dict) or "name" not in mcfg:
        raise ckpt.CheckpointError(f"checkpoint {d!r} does not record its model config; it cannot be rebuilt")
    try:
        model = create_model(**mcfg)
    except (TypeError, ValueError, KeyError) as e:
        raise ckpt.CheckpointError(f"cannot rebuild model {mcfg.get('name')!r} recorded in {d!r}: {e}") from None
    which = "ema" if ema else "model"
    weights = ckpt.load_tensors(d, which)
    if weights is None:
        if ema:
            raise ckpt.CheckpointError(f"checkpoint {d!r} has no EMA weights; sample with --no-ema")
        raise ckpt.CheckpointError(f"checkpoint {d!r} has no model weights")
    ckpt.load_model_weights(model, weights, d)
    model.to(device).eval().requires_grad_(False)
    ocfg = state.get("objective_config")
    if ocfg is None:
        raise ckpt.CheckpointError(f"checkpoint {d!r} does not record its diffusion objective")
    objective = create_objective(ocfg)
    return LoadedRun(model, objective, d, int(state["step"]), state.get("train_config", {}), state.get("data", {}), ema)


def at_resolution(run: LoadedRun, size: int | None) -> tuple[nn.Module, tuple[int, int, int]]:
    """(model, sample shape C,H,W) to sample ``run`` at side ``size`` (None: the trained one).

    Another size builds a copy of the backbone at that size and loads the run's weights through
    ``ssmdiff.models.adapt_state_dict`` (position tables interpolated), without any training.
    """
    c, h, w = run.shape_chw
    if size is None or int(size) == h:
        return run.model, (c, h, w)
    size = int(size)
    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    from .models import create_model, load_weights

    cfg = {k: v for k, v in dict(run.model.config).items() if not k.startswith("_")}
    patch = int(cfg.get("patch_size", 1) or 1)
    if size % patch:
        raise ValueError(f"image size {size} is not a multiple of the model's patch size {patch}")
    cfg["input_size"] = size
    p = next(iter(run.model.parameters()))
    big = create_model(**cfg)
    load_weights(big, {k: v.detach().cpu() for k, v in run.model.state_dict().items()})
    return big.to(p.device).eval().requires_grad_(False), (c, size, size)


def class_labels(num_images: int, num_classes: int, classes: Sequence[int] | None) -> np.ndarray | None:
    """Labels for ``num_images`` samples: ``classes`` (default all) in turn, grouped so grids get a row per class."""
    if num_classes <= 0:
        if classes:
            raise ValueError("this model is unconditional: --classes cannot be used")
        return None
    classes = list(range(num_classes)) if not classes else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} out of range: this model has classes 0..{num_classes - 1}")
    per = -(-num_images // len(classes))
    return np.repeat(np.asarray(classes, dtype=np.int64), per)[:num_images]


def _batch_seed(seed: int, b: int) -> int:
    return int(np.random.SeedSequence([seed, b, 0x5A3]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@torch.no_grad()
def generate(
    run: LoadedRun,
    *,
    num_images: int,
    batch_size: int = 64,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float = 1.0,
    classes: Sequence[int] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    vae=None,
    image_size: int | None = None,
    upsample_guidance: dict | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Sample ``num_images`` images; returns (uint8 NHWC, labels or None) on rank 0 and (None, None) elsewhere.

    Latent-space runs are decoded with ``vae`` (loaded from the run's data record when not given).
    image_size: sample at this side (pixels, or latent cells for latent runs) instead of the trained one, with
    the position tables interpolated (see ``at_resolution``). upsample_guidance: a dict of
    ``ssmdiff.diffusion.UpsampleGuidance`` fields (weight, fraction) to guide such a sample with the
    trained-resolution model; the factor is ``image_size`` / trained size, which must be an integer >= 2.
    """
    from .diffusion import UpsampleGuidance, sample

    if num_images < 1 or batch_size < 1:
        raise ValueError("num_images and batch_size must be >= 1")
    device = torch.device(device)
    info = du.current()
    labels = class_labels(num_images, run.num_classes, classes)
    model, shape_chw = at_resolution(run, image_size)
    ug = None
    if upsample_guidance is not None:
        trained = run.shape_chw[1]
        if shape_chw[1] % trained or shape_chw[1] // trained < 2:
            raise ValueError(f"upsample guidance needs an image size that is 2x, 3x, ... the trained "
                             f"{trained}; got {shape_chw[1]}")
        ug = UpsampleGuidance(factor=shape_chw[1] // trained, model=run.model, **dict(upsample_guidance))
    n_batches = -(-num_images // batch_size)
    if run.data.get("latent") and vae is None:
        from .data import load_vae

        if not run.data.get("vae"):
            raise ValueError("this run was trained on latents but does not record its VAE; cannot decode")
        vae = load_vae(run.data["vae"], device=device)
    mine = []
    bar = None
    my_batches = list(range(info.rank, n_batches, info.world_size))
    if progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(my_batches), desc="sample", dynamic_ncols=True)
    for b in my_batches:
        lo, hi = b * batch_size, min(num_images, (b + 1) * batch_size)
        y = torch.from_numpy(labels[lo:hi]).to(device) if labels is not None else None
        g = torch.Generator(device=device).manual_seed(_batch_seed(seed, b))
        x = sample(model, run.objective, (hi - lo, *shape_chw), sampler=sampler, steps=steps, y=y,
                   num_classes=run.num_classes, guidance_scale=guidance_scale, generator=g, device=device,
                   progress=False, upsample_guidance=ug)
        if run.data.get("latent"):
            from .data import decode_latents

            x = decode_latents(x, vae, run.data.get("scaling_factor"), run.data.get("shift_factor"))
        mine.append((b, to_uint8_nhwc(x)))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    gathered = du.all_gather_objects(mine)
    if not info.is_main:
        return None, None
    parts = dict(item for rank_items in gathered for item in rank_items)
    images = np.concatenate([parts[b] for b in range(n_batches)], axis=0)
    return images, labels


def save_samples(images: np.ndarray, labels: np.ndarray | None, out_dir: str, *, class_names=None,
                 singles: bool = True, grid_max: int = 400) -> dict:
    """Write ``grid.png`` (a row per class when labelled), ``images/*.png`` and ``samples.npz``.

    The npz holds ``arr_0`` (uint8 NHWC, the ADM evaluation-suite format) and, when labelled, ``labels``.
    Returns the written paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    npz = os.path.join(out_dir, "samples.npz")
    tmp = os.path.join(out_dir, f".samples.tmp{os.getpid()}.npz")
    if labels is not None:
        np.savez(tmp, arr_0=images, labels=labels)
    else:
        np.savez(tmp, arr_0=images)
    os.replace(tmp, npz)
    paths["npz"] = npz
    gi = images[:grid_max]
    if labels is not None:
        paths["grid"] = save_class_grid(gi, labels[:grid_max], os.path.join(out_dir, "grid.png"), class_names)
    else:
        paths["grid"] = save_grid(gi, os.path.join(out_dir, "grid.png"))
    if singles:
        save_images(images, os.path.join(out_dir, "images"), labels=labels)
        paths["images"] = os.path.join(out_dir, "images")
    return paths


def write_json(path: str, obj) -> None:
    """Write ``obj`` as indented JSON atomically."""
    ckpt.atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
