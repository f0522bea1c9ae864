"""The training loop: one process, DDP or FSDP2 under torchrun, with exact resume.

Reproducibility contract: the batch seen at optimiser step ``s`` and the diffusion noise / timesteps drawn for it
depend only on (seed, s) and the global batch size -- not on the number of processes, the gradient-accumulation
split or whether the run was resumed. Data order comes from ``DistributedSampler`` (seed, epoch) sliced at the
step's offset; noise and timesteps for the whole global batch come from a generator seeded by (seed, step) and
each rank / micro-batch takes its slice. What remains on the global RNG (class-label dropout, drop-path, data
augmentation) is restored from the checkpoint per rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .utils import distributed as du
from .utils.ema import EMA
from .utils.images import save_class_grid, save_grid, to_uint8_nhwc
from .utils.logging import MetricsLogger, console, plot_loss_curve

# Fields that define what is being trained: a resumed run must agree on them with its checkpoint.
IDENTITY_FIELDS = (
    "model", "model_overrides", "data", "image_size", "hflip", "objective", "schedule", "prediction",
    "learn_sigma", "diffusion_steps", "time_sampling", "batch_size", "seed", "drop_path",
)


DEFAULT_MODEL = "DiS-T/2"
# The default main job narrows the registry's tiny DiS (128 wide) to 64 and turns drop-path off: measured on the
# 8x8 digits, this reaches the >= 90% class-accuracy bar in half the time (see tests/test_default_run.py).
DEFAULT_JOB_OVERRIDES = {"hidden_size": 64, "drop_path_rate": 0.0}


# A model this small does too little work per op to pay for a second CPU thread: measured on the 2-core CI machine
# with another job running, 60 steps of the default job took 18.6 s on 1 thread and 381 s on 2 (the threads wait
# on each other at every op). Bigger models keep torch's default; --threads overrides either way.
SMALL_MODEL_PARAMS = 5_000_000


@dataclass
class TrainConfig:
    """Everything a training run needs; stored whole in every checkpoint (``state.json``).

    The defaults are the default main job: a class-conditional DiS on the built-in 8x8 digits, sized to finish
    with sampling and evaluation within 10 minutes on two CPU cores.
    """

    # what to train
    model: str = DEFAULT_MODEL
    model_overrides: dict | None = None  # None: DEFAULT_JOB_OVERRIDES for the default model, else none
    data: str = "digits"
    image_size: int | None = None
    hflip: bool = False
    objective: str = "gaussian"  # "gaussian" (DDPM/ADM) or "flow" (flow matching, linear path)
    schedule: str = "cosine"  # measured on 8x8 digits: cosine + v learns classes ~3x sooner than linear + eps
    prediction: str = "v"
    learn_sigma: bool = False
    diffusion_steps: int = 1000
    time_sampling: str = "uniform"  # flow matching only
    # optimisation
    steps: int = 1000
    batch_size: int = 64  # global batch per optimiser step (all ranks and micro-batches together)
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 50
    lr_schedule: str = "cosine"  # "constant" or "cosine" (after warmup)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    compile: bool = False
    grad_checkpointing: bool = False
    drop_path: float | None = None
    fsdp: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threads: int | None = None  # CPU intra-op threads; None: 1 for models under SMALL_MODEL_PARAMS, else torch's
    # outputs
    run_dir: str = "runs/digits-dis"
    overwrite: bool = False
    resume: bool = False
    stop_at: int | None = None  # stop after this step with a checkpoint, as an interrupted job would
    ckpt_every: int = 250
    keep_last: int = 2
    log_every: int = 10
    sample_every: int = 250
    samples_per_class: int = 8
    sampler: str = "ddim"
    sample_steps: int = 25
    guidance_scale: float = 2.5
    eval_samples_per_class: int = 100
    evaluate: bool = True
    inception_weights: str | None = None  # local Inception weights: lets non-digit runs evaluate at the end
    eval_reference: str | None = None  # images to compare against (default: the training data if it is images)
    # weak-to-strong: start from another run's weights (position tables resized); optimiser and step start fresh
    init_from: str | None = None
    init_ema: bool = True
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first field with an impossible value."""
        pos = ("steps", "batch_size", "grad_accum", "ckpt_every", "log_every", "diffusion_steps", "sample_steps")
        for name in pos:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "keep_last", "sample_every", "num_workers", "samples_per_class",
                     "eval_samples_per_class"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.objective not in ("gaussian", "flow"):
            raise ValueError(f"objective must be 'gaussian' or 'flow', got {self.objective!r}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")

    def effective_overrides(self) -> dict:
        """Constructor overrides passed to ``create_model`` (see ``model_overrides``)."""
        if self.model_overrides is None:
            return dict(DEFAULT_JOB_OVERRIDES) if self.model == DEFAULT_MODEL else {}
        return dict(self.model_overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Rebuild from a stored dict, ignoring keys that this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------- building blocks
def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """'auto' picks the local GPU when CUDA is available, else the CPU."""
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
    if spec == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(spec)


def model_family(name: str) -> str:
    """The registry family of a model name ("DiS-S/2" -> "DiS", "DiffuSSM-T" -> "DiffuSSM")."""
    return str(name).split("-", 1)[0]


# Settings copied from an --init-from source unless given: they fix the architecture (model, overrides,
# learn_sigma) or what the network predicts (objective fields), so the source weights keep their meaning.
INIT_INHERITED_FIELDS = ("model", "model_overrides", "learn_sigma", "objective", "schedule", "prediction",
                         "diffusion_steps", "time_sampling")


def read_init_source(path: str) -> tuple[str, dict]:
    """(checkpoint directory, its state.json) of an ``init_from`` run folder or checkpoint.

    Raises FileNotFoundError for a missing path and CheckpointError (a ValueError) for one that is not a
    complete ssmdiff checkpoint recording its model config.
    """
    if not os.path.exists(str(path)):
        raise FileNotFoundError(f"--init-from {path!r}: no such run folder or checkpoint; give a run folder "
                                "(runs/NAME) or one of its checkpoints/step_* directories")
    d = ckpt.resolve_checkpoint(str(path))
    state = ckpt.read_state(d)
    if not isinstance(state.get("model_config"), dict) or "name" not in state["model_config"]:
        raise ckpt.CheckpointError(f"--init-from {d!r}: the checkpoint does not record its model config")
    return d, state


def inherit_init_settings(given: dict, source_state: dict) -> dict:
    """``given`` (settings set explicitly) completed with the architecture/objective settings of the source run.

    An explicit ``model`` must be of the source's family (e.g. DiS-S/2 from a DiS-T/2 run is allowed, and fails
    later only if the shapes do not fit); another family raises ValueError.
    """
    src_cfg = TrainConfig.from_dict(source_state.get("train_config", {}))
    src_name = source_state["model_config"]["name"]
    out = dict(given)
    if "model" in given and model_family(given["model"]) != model_family(src_name):
        raise ValueError(f"--init-from a {src_name} run cannot initialise a {given['model']}: the weights only fit "
                         f"the {model_family(src_name)} family; drop --model to reuse {src_name}")
    explicit_model = "model" in given and given["model"] != src_name
    for k in INIT_INHERITED_FIELDS:
        if k in given:
            continue
        if k == "model_overrides":
            if explicit_model:
                continue  # another size of the family: its own registry config, not the source's overrides
            out[k] = src_cfg.effective_overrides()
        else:
            out[k] = getattr(src_cfg, k)
    return out


def init_model_from(model: nn.Module, path: str, *, ema: bool = True) -> dict:
    """Load the weights of the run/checkpoint ``path`` into ``model`` built at any resolution.

    Position tables are resized by ``ssmdiff.models.adapt_state_dict`` (grid part interpolated, class/time
    tokens reused); every other tensor must match exactly. Returns the record stored in the new run's state.
    Raises FileNotFoundError / ValueError (another architecture, no EMA weights) with what to do.
    """
    from .models import adapt_state_dict

    d, state = read_init_source(path)
    weights = ckpt.load_tensors(d, "ema" if ema else "model")
    if weights is None:
        raise ckpt.CheckpointError(f"--init-from {d!r} has no {'EMA' if ema else 'model'} weights"
                                   + ("; pass --no-init-ema to start from the raw weights" if ema else ""))
    src_name = state["model_config"]["name"]
    try:
        sd = adapt_state_dict(weights, model)
    except ValueError as e:
        raise ValueError(f"cannot initialise from {d!r} ({src_name}): {e}") from None
    model.load_state_dict(sd, strict=True)
    data = state.get("data", {})
    return {"checkpoint": os.path.abspath(d), "step": int(state.get("step", 0)), "model": src_name,
            "image_size": data.get("image_size") or state["model_config"].get("input_size"),
            "weights": "ema" if ema else "model"}


def build_objective(cfg: TrainConfig):
    """The diffusion objective named by the config (from ``ssmdiff.diffusion``)."""
    from . import diffusion

    if cfg.objective == "flow":
        return diffusion.FlowMatching(path="linear", time_sampling=cfg.time_sampling)
    return diffusion.GaussianDiffusion(
        schedule=cfg.schedule, steps=cfg.diffusion_steps, prediction=cfg.prediction, learn_sigma=cfg.learn_sigma
    )


def build_train_dataset(cfg: TrainConfig):
    """The training split named by ``cfg.data`` (from ``ssmdiff.data``)."""
    from .data import build_dataset

    return build_dataset(cfg.data, image_size=cfg.image_size, split="train", hflip=cfg.hflip)


def build_model(cfg: TrainConfig, dataset) -> nn.Module:
    """The backbone named by ``cfg.model`` sized for ``dataset`` (from ``ssmdiff.models``)."""
    from .models import create_model

    overrides = dict(cfg.effective_overrides())
    if cfg.drop_path is not None:
        overrides["drop_path_rate"] = cfg.drop_path
    return create_model(
        cfg.model,
        input_size=dataset.image_size,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        learn_sigma=cfg.learn_sigma,
        **overrides,
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, embeddings and parameters the model lists as exempt.

    A model may exempt parameters with a ``_no_weight_decay`` attribute (set of names or name fragments) or a
    ``no_weight_decay()`` method, as in timm.
    """
    exempt: set[str] = set(getattr(model, "_no_weight_decay", ()) or ())
    if callable(getattr(model, "no_weight_decay", None)):
        exempt |= set(model.no_weight_decay())
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding)
    no_decay_ids = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, norm_types) or "norm" in type(mod).__name__.lower():
            no_decay_ids |= {id(p) for p in mod.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = (
            p.ndim <= 1
            or id(p) in no_decay_ids
            or "embed" in name
            or "token" in leaf
            or name in exempt
            or leaf in exempt
            or any(e and e in name for e in exempt)
        )
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def fused_adamw(device: torch.device, fsdp: bool = False) -> bool:
    """Whether AdamW takes its fused kernel (one pass over every parameter) on this device. On a CPU the default
    per-tensor loop costs ~10 small ops per parameter tensor: for DiS-S/2's 462 tensors an optimiser step took
    43-89 ms that way against 19 ms fused (DiT-S/2, 132 tensors: 39-74 against 19; ``python benchmarks/step.py``).
    FSDP keeps the default path."""
    try:  # private, but the list torch itself checks `fused=True` against
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        supported = _get_fused_kernels_supported_devices()
    except ImportError:
        supported = ["cuda", "cpu"]
    return not fsdp and device.type in supported


def lr_lambda_for(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the base lr after ``s`` scheduler steps: linear warmup, then constant or half-cosine."""
    warm, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def f(s: int) -> float:
        if warm > 0 and s < warm:
            return (s + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the noise of optimiser step ``step`` (independent streams per step)."""
    return int(np.random.SeedSequence([seed, step, 0x5D1F]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _StepSliceSampler(torch.utils.data.Sampler):
    """The indices a rank reads in one epoch, from optimiser step ``start_step`` of that epoch onwards.

    Wraps DistributedSampler (rank's share of a (seed, epoch) permutation) and drops the tail that does not
    fill a whole optimiser step, so that steps never straddle epochs and a resumed run skips consumed batches
    without loading them (which would advance the augmentation RNG).
    """

    def __init__(self, base: torch.utils.data.DistributedSampler, per_step: int, start_step: int, steps: int):
        self.base, self.per_step, self.start_step, self.steps = base, per_step, start_step, steps

    def __iter__(self):
        idx = list(self.base)
        return iter(idx[self.start_step * self.per_step : self.steps * self.per_step])

    def __len__(self):
        return (self.steps - self.start_step) * self.per_step


def _batches(dataset, cfg: TrainConfig, info: du.DistInfo, micro_bs: int, start_step: int, spe: int, workers: int):
    """Yield (step, micro-batch index, x, y) forever, starting at optimiser step ``start_step``."""
    base = torch.utils.data.DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    step = start_step
    while True:
        epoch, within = divmod(step, spe)
        base.set_epoch(epoch)
        sampler = _StepSliceSampler(base, micro_bs * cfg.grad_accum, within, spe)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=micro_bs, sampler=sampler, drop_last=True, num_workers=workers,
            persistent_workers=False,
        )
        micro = 0
        for x, y in loader:
            yield step, micro, x, y
            micro += 1
            if micro == cfg.grad_accum:
                micro = 0
                step += 1


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state((st["numpy"][0], np.asarray(st["numpy"][1], dtype=np.uint32), *st["numpy"][2:]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _to_jsonable(obj):
    if isinstance(obj, tuple):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, list):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_class_grid(model, objective, cfg: TrainConfig, num_classes: int, shape_chw, device, per_class: int,
                      seed: int, progress: bool = False, data_info: dict | None = None, chunk: int = 250):
    """Generate ``per_class`` samples of every class (or of no class when unconditional) with a fixed seed.

    Works in chunks of ``chunk`` images (chunk i seeded by (seed, i)) inside ``torch.random.fork_rng``, so that
    sampling never changes the training RNG stream. Latent runs are decoded with their VAE.
    Returns (uint8 NHWC images, labels or None).
    """
    from .diffusion import sample

    n = per_class * max(1, num_classes)
    y_all = torch.arange(num_classes, device=device).repeat_interleave(per_class) if num_classes > 0 else None
    devices = [device] if device.type == "cuda" else []
    out = []
    with torch.random.fork_rng(devices=devices):
        for i, lo in enumerate(range(0, n, chunk)):
            hi = min(n, lo + chunk)
            g = torch.Generator(device=device).manual_seed(step_seed(seed, i))
            x = sample(
                model, objective, (hi - lo, *shape_chw), sampler=cfg.sampler, steps=cfg.sample_steps,
                y=None if y_all is None else y_all[lo:hi], num_classes=num_classes,
                guidance_scale=cfg.guidance_scale, generator=g, device=device, progress=progress,
            )
            if data_info and data_info.get("latent"):
                x = _decode_latents(x, data_info, device)
            out.append(to_uint8_nhwc(x))
    return np.concatenate(out, axis=0), (y_all.cpu().numpy() if y_all is not None else None)


_VAE_CACHE: dict = {}


def _decode_latents(z, data_info: dict, device):
    from .data import decode_latents, load_vae

    name = data_info.get("vae")
    if not name:
        raise ValueError("latent dataset without a recorded VAE: cannot decode samples to images")
    if name not in _VAE_CACHE:
        _VAE_CACHE[name] = load_vae(name, device=device)
    return decode_latents(z, _VAE_CACHE[name], data_info.get("scaling_factor"), data_info.get("shift_factor"))


def _save_sample_grid(images, labels, path, class_names=None):
    if labels is not None:
        return save_class_grid(images, labels, path, class_names)
    return save_grid(images, path)


# ------------------------------------------------------------------------------------------------------- train
class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def train(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    objective: Any = None,
    dataset: Any = None,
) -> dict:
    """Train according to ``config`` and return a summary dict (run dir, final step, last loss, eval results).

    ``model``, ``objective`` and ``dataset`` may be given directly (tests, notebooks); by default they are built
    from the config through ``ssmdiff.models``, ``ssmdiff.diffusion`` and ``ssmdiff.data``. Under torchrun every
    rank calls this with the same config; rank 0 alone writes files.
    """
    cfg = config
    cfg.validate()
    t_start = time.time()
    device_type = "cuda" if (cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    info = du.init_distributed(device_type)
    device = resolve_device(cfg.device, info.local_rank)
    main = info.is_main
    run_dir = cfg.run_dir
    ckpt_root = os.path.join(run_dir, "checkpoints")

    # ---- resume or fresh start
    resume_dir = None
    if cfg.resume and ckpt.has_checkpoint(run_dir):
        resume_dir = ckpt.resolve_checkpoint(run_dir)
    elif not cfg.resume and ckpt.has_checkpoint(run_dir) and not cfg.overwrite:
        raise ValueError(
            f"run folder {run_dir!r} already holds checkpoints: pass --resume to continue it, --overwrite to "
            "start it again, or --name/--run-dir for a new run"
        )
    if cfg.resume and resume_dir is None:
        console(f"note: --resume given but {run_dir!r} has no checkpoint yet; starting a new run", main)
    resume_state = ckpt.read_state(resume_dir) if resume_dir else None
    if resume_state is not None:
        stored = resume_state.get("train_config", {})
        diffs = [k for k in IDENTITY_FIELDS if k in stored and _to_jsonable(stored[k]) != _to_jsonable(getattr(cfg, k))]
        if diffs:
            k = diffs[0]
            raise ValueError(
                f"cannot resume {resume_dir!r}: it was trained with {k}={stored[k]!r}, this run asks for "
                f"{k}={getattr(cfg, k)!r}; resume with the original settings"
            )
    # ---- data, model, objective (identical initial weights on every rank: same seed before building)
    _set_seed(cfg.seed)
    if dataset is None:
        dataset = build_train_dataset(cfg)
    num_classes = int(getattr(dataset, "num_classes", 0) or 0)
    if model is None:
        model = build_model(cfg, dataset)
    if objective is None:
        objective = build_objective(cfg)
    init_record = None
    if resume_state is not None:
        init_record = resume_state.get("init_from")  # the weights come from the checkpoint; keep the record
    elif cfg.init_from:
        init_record = init_model_from(model, cfg.init_from, ema=cfg.init_ema)
        console(f"initialised from {init_record['checkpoint']} ({init_record['model']} at "
                f"{init_record['image_size']}px, step {init_record['step']}, {init_record['weights']} weights)", main)
    # Only now, with data, model and objective built (a bad setting has failed by here), is the run folder made
    # and, with --overwrite, the old checkpoints removed.
    du.barrier()
    if main and cfg.overwrite and not cfg.resume and os.path.isdir(ckpt_root):
        import shutil

        shutil.rmtree(ckpt_root)
    if main:
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    du.barrier()
    model.to(device)
    if device.type == "cpu":
        threads = cfg.threads or (1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS else None)
        if threads:
            torch.set_num_threads(threads)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
        model.set_grad_checkpointing(True)

    world = info.world_size
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum = {world} x {cfg.grad_accum}"
        )
    micro_bs = cfg.batch_size // (world * cfg.grad_accum)
    n_per_rank = len(dataset) // world
    spe = n_per_rank // (micro_bs * cfg.grad_accum)
    if spe < 1:
        raise ValueError(
            f"dataset of {len(dataset)} examples is smaller than one global batch of {cfg.batch_size}; "
            "lower --batch-size"
        )

    # ---- wrapping for many processes
    train_model: nn.Module = model
    if cfg.fsdp:
        if world < 2:
            raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node=N")
        from torch.distributed.fsdp import fully_shard

        for mod in model.modules():
            if isinstance(mod, nn.ModuleList):
                for block in mod:
                    fully_shard(block)
        fully_shard(model)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        fused=fused_adamw(device, cfg.fsdp),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(cfg))

    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict,
    )

    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    step = 0
    if resume_state is not None:
        weights = ckpt.load_tensors(resume_dir, "model")
        if cfg.fsdp:
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        else:
            ckpt.load_model_weights(model, weights, resume_dir)
        ema_w = ckpt.load_tensors(resume_dir, "ema")
        if ema_w is not None:
            ckpt.load_model_weights(ema.module, {k: v.to(device) for k, v in ema_w.items()}, resume_dir)
        osd = ckpt.load_optimizer_state(resume_dir, resume_state)
        if osd is not None:
            set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(resume_state["scheduler"])
        step = int(resume_state["step"])
        rngs = resume_state.get("rng", [])
        rng_t = ckpt.load_tensors(resume_dir, "rng") or {}
        if len(rngs) == world:
            st = dict(rngs[info.rank])
            st["torch"] = rng_t[f"torch.{info.rank}"]
            if f"cuda.{info.rank}" in rng_t:
                st["cuda"] = rng_t[f"cuda.{info.rank}"]
            _set_rng_state(st)
        else:
            console(f"note: checkpoint has RNG states for {len(rngs)} processes, this run has {world}; "
                    "continuing with fresh per-rank seeds (losses will not repeat exactly)", main)
            _set_seed(cfg.seed + 1000 * step + info.rank)
        console(f"resumed from {resume_dir} at step {step}", main)
    else:
        _set_seed(cfg.seed + info.rank)  # distinct label-dropout / drop-path streams per rank

    data_info = dict(dataset.describe()) if callable(getattr(dataset, "describe", None)) else {}
    data_info.update(num_classes=num_classes, channels=int(getattr(dataset, "channels", 0)),
                     image_size=int(getattr(dataset, "image_size", 0)),
                     class_names=getattr(dataset, "class_names", None))

    def save(at_step: int) -> str | None:
        msd = get_model_state_dict(model, options=full_opts)
        osd_ = get_optimizer_state_dict(model, optimizer, options=full_opts)
        rng = _rng_state()
        gathered = du.all_gather_objects(
            {"torch": rng["torch"].numpy().tobytes(), "cuda": rng["cuda"].numpy().tobytes() if "cuda" in rng else None,
             "numpy": rng["numpy"], "python": _to_jsonable(rng["python"])}
        )
        out = None
        if main:
            rng_tensors, rng_meta = {}, []
            for r, g in enumerate(gathered):
                rng_tensors[f"torch.{r}"] = torch.frombuffer(bytearray(g["torch"]), dtype=torch.uint8)
                if g["cuda"] is not None:
                    rng_tensors[f"cuda.{r}"] = torch.frombuffer(bytearray(g["cuda"]), dtype=torch.uint8)
                rng_meta.append({"numpy": g["numpy"], "python": g["python"]})
            state = {
                "train_config": cfg.to_dict(),
                "model_config": getattr(model, "config", None),
                "objective_config": getattr(objective, "config", None),
                "data": data_info,
                "scheduler": scheduler.state_dict(),
                "rng": rng_meta,
                "world_size": world,
                "init_from": init_record,
            }
            out = ckpt.save_checkpoint(
                ckpt_root, at_step, model_state=msd, ema_state=ema.state_dict(), optimizer_state=osd_,
                rng_tensors=rng_tensors, state=state, keep_last=cfg.keep_last,
            )
        du.barrier()
        return out

    logger = MetricsLogger(run_dir, enabled=main, resume_step=step if resume_state is not None else None)
    bar = _NullBar()
    if main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0)
    shape_chw = (int(getattr(dataset, "channels", 0)), int(dataset.image_size), int(dataset.image_size))
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
        else contextlib.nullcontext()
    )
    if main and resume_state is None:
        console(
            f"training {(getattr(model, 'config', None) or {}).get('name', type(model).__name__)} "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on "
            f"{getattr(dataset, 'source', '') or type(dataset).__name__} ({len(dataset)} images, {num_classes} classes) for {cfg.steps} steps, batch "
            f"{cfg.batch_size} on {world} x {device.type}; run folder {run_dir}", True)

    def grid(at_step: int, name: str) -> str | None:
        path = None
        if main and cfg.samples_per_class > 0:
            ema.module.eval()
            imgs, labels = sample_class_grid(ema.module, objective, cfg, num_classes, shape_chw, device,
                                             cfg.samples_per_class, seed=cfg.seed, data_info=data_info)
            path = _save_sample_grid(imgs, labels, os.path.join(run_dir, "samples", name),
                                     data_info.get("class_names"))
        du.barrier()
        return path

    batches = _batches(dataset, cfg, info, micro_bs, step, spe, cfg.num_workers)
    train_model.train()
    last_loss = float("nan")
    t_last, seen_last = time.time(), 0
    try:
        while step < cfg.steps and (cfg.stop_at is None or step < cfg.stop_at):
            g = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step))
            noise_all = torch.randn((cfg.batch_size, *shape_chw), generator=g, device=device)
            t_all = objective.sample_t(cfg.batch_size, device, generator=g)
            # this rank's share of the global batch, in global-sample order (see module docstring)
            noise_rank, t_rank = noise_all[info.rank :: world], t_all[info.rank :: world]
            total = torch.zeros((), device=device)
            mse_total = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                s, m, x, y = next(batches)
                assert s == step and m == micro, "data stream out of step"
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True) if num_classes > 0 else None
                sl = slice(micro * micro_bs, (micro + 1) * micro_bs)
                last_micro = micro == cfg.grad_accum - 1
                if cfg.fsdp:
                    model.set_requires_gradient_sync(last_micro)
                    sync = contextlib.nullcontext()
                elif world > 1 and not last_micro:
                    sync = _unwrap_ddp(train_model).no_sync()
                else:
                    sync = contextlib.nullcontext()
                with sync:
                    with autocast:
                        out = objective.training_losses(
                            train_model, x, t_rank[sl], model_kwargs={"y": y}, noise=noise_rank[sl]
                        )
                        loss = out["loss"].float().mean()
                    (loss / cfg.grad_accum).backward()
                total += loss.detach()
                mse_total += out.get("mse", out["loss"]).detach().float().mean()
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            lr_now = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            ema.update(model, step)
            loss_mean = du.all_reduce_mean(total / cfg.grad_accum)
            last_loss = float(loss_mean)
            if not math.isfinite(last_loss):
                raise FloatingPointError(
                    f"loss became {last_loss} at step {step}; lower --lr or enable --grad-clip"
                )
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
                now = time.time()
                ips = (step * cfg.batch_size - seen_last) / max(1e-9, now - t_last) if seen_last else None
                rec = {
                    "step": step, "loss": last_loss,
                    "mse": float(du.all_reduce_mean(mse_total / cfg.grad_accum)),
                    "lr": lr_now, "grad_norm": float(grad_norm), "epoch": (step - 1) // spe,
                    "time": round(now - t_start, 3),
                }
                if ips:
                    rec["images_per_s"] = round(ips, 2)
                t_last, seen_last = now, step * cfg.batch_size
                logger.log(rec)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr_now:.2e}")
            if step % cfg.ckpt_every == 0 and step < cfg.steps:
                save(step)
                if main:
                    plot_loss_curve(logger.path, os.path.join(run_dir, "loss.png"))
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                grid(step, f"step_{step:07d}.png")
    finally:
        bar.close()

    final_ckpt = save(step)
    summary: dict = {"run_dir": run_dir, "step": step, "loss": last_loss, "checkpoint": final_ckpt,
                     "train_seconds": round(time.time() - t_start, 1)}
    if main:
        plot_loss_curve(logger.path, os.path.join(run_dir, "loss.png"))
    if step < cfg.steps:  # stopped early on request: the checkpoint is all a later --resume needs
        du.barrier()
        logger.close()
        summary["seconds"] = round(time.time() - t_start, 1)
        return summary
    grid_path = grid(step, "final.png")
    summary["grid"] = grid_path
    skip_reason = eval_skip_reason(cfg, data_info)
    if cfg.evaluate and main and skip_reason:
        console(f"note: no automatic evaluation: {skip_reason}", True)
    if cfg.evaluate and main and not skip_reason:
        try:
            summary["eval"] = evaluate_run(ema.module, objective, cfg, dataset, num_classes, shape_chw, device,
                                           data_info)
        except (ValueError, FileNotFoundError, OSError, ImportError, RuntimeError) as e:
            # a finished training run must not end in a traceback because a metric cannot be computed here
            summary["eval"] = {"error": f"{type(e).__name__}: {e}",
                               "hint": "score samples with `ssmdiff evaluate` and a reference / Inception weights"}
            console(f"note: evaluation skipped ({e})", True)
        ckpt.atomic_write_text(os.path.join(run_dir, "eval.json"), json.dumps(summary["eval"], indent=1) + "\n")
    du.barrier()
    logger.close()
    summary["seconds"] = round(time.time() - t_start, 1)
    return summary


def _unwrap_ddp(m: nn.Module) -> nn.Module:
    """The DDP wrapper under a torch.compile wrapper (``no_sync`` lives on DDP)."""
    return getattr(m, "_orig_mod", m)


def eval_skip_reason(cfg: TrainConfig, data_info: dict | None = None) -> str | None:
    """Why the end-of-training evaluation does not run for ``cfg`` (None: it runs).

    It runs on the built-in digits (a local classifier gives the metrics) or when ``inception_weights`` are
    given; anything else would need Inception weights that tests and offline machines must never download.
    """
    if str(cfg.data).startswith("digits"):
        return None
    if not cfg.inception_weights:
        return ("the data is not the built-in digits and no --inception-weights were given; score samples later "
                "with `ssmdiff evaluate SAMPLES --reference IMAGES --inception-weights FILE`")
    return None


def eval_reference_for(cfg: TrainConfig, data_info: dict | None = None) -> str:
    """The reference images of the end-of-training evaluation.

    ``eval_reference`` when set; else the held-out digits, or the training data itself when it is made of
    images. A latent-shard dataset holds VAE latents, not images, so it needs an explicit ``eval_reference``.
    """
    if cfg.eval_reference:
        return cfg.eval_reference
    if str(cfg.data).startswith("digits"):
        return "digits"
    if (data_info or {}).get("latent"):
        raise ValueError(f"{cfg.data!r} holds VAE latents, not images, so it cannot be the evaluation reference; "
                         "pass --eval-reference with the image folder/.npz the latents were extracted from")
    return cfg.data


def evaluate_run(model, objective, cfg: TrainConfig, dataset, num_classes, shape_chw, device,
                 data_info: dict | None = None) -> dict:
    """Sample ``eval_samples_per_class`` images per class with the EMA model and score them.

    Uses ``ssmdiff.evaluate.evaluate_samples`` against ``eval_reference_for(cfg)`` with digit-classifier features
    for the digits and Inception features (``cfg.inception_weights``, never downloaded) otherwise.
    """
    from .evaluate import evaluate_samples

    reference = eval_reference_for(cfg, data_info)
    t0 = time.time()
    per_class = cfg.eval_samples_per_class
    model.eval()
    imgs, labels = sample_class_grid(model, objective, cfg, num_classes, shape_chw, device, per_class,
                                     seed=cfg.seed + 1, data_info=data_info)
    t_sample = time.time() - t0
    res = evaluate_samples(imgs, labels=labels, reference=reference, inception_weights=cfg.inception_weights,
                           allow_download=False, device="cpu" if str(reference).startswith("digits") else device)
    out = {
        "num_samples": int(len(imgs)), "sampler": cfg.sampler, "sample_steps": cfg.sample_steps,
        "guidance_scale": cfg.guidance_scale, "ema": True, "sample_seconds": round(t_sample, 1),
    }
    out.update(res)
    return out
