"""Export trained runs as diffusers pipeline folders (Hugging Face hub layout) and read them back.

``export_pipeline(run_or_checkpoint, out_dir)`` writes::

    out_dir/
        model_index.json          SSMDiffPipeline and its components
        transformer/              the backbone: config.json (with the registry name) + safetensors weights
        scheduler/                the diffusers scheduler of the chosen sampler, on the run's exact betas
        vae/                      latent runs only: the AutoencoderKL, its scaling factor set to the run's
        ssmdiff.json              what ssmdiff needs beyond diffusers: objective, data record, step, sampler
        README.md                 model card: training data, steps, measured metrics (from the run's eval.json)

``load_pipeline_run(out_dir)`` turns such a folder back into the ``LoadedRun`` that ``ssmdiff.sample.generate``
takes, so ``ssmdiff sample`` / ``evaluate`` can use it; with the folder's sampler and step count the images equal
the pipeline's for the same seed.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import torch

__all__ = ["export_pipeline", "is_pipeline_folder", "load_pipeline_run", "build_scheduler", "EXPORT_SAMPLERS"]

SSMDIFF_FILE = "ssmdiff.json"
PIPELINE_CLASS = "SSMDiffPipeline"
# Samplers whose diffusers scheduler is one fixed config for any step count (so the exported folder samples
# exactly as `ssmdiff sample --sampler X --steps N` for every N). DDIM is left out: the engine runs it on a
# re-spaced chain rebuilt for each step count; flow "heun" is not a diffusers scheduler.
EXPORT_SAMPLERS = {"gaussian": ("ddpm", "dpm++2m", "dpm++3m", "euler", "heun"), "flow": ("euler",)}
DEFAULT_EXPORT_SAMPLER = {"gaussian": "dpm++2m", "flow": "euler"}


def _kind(objective) -> str:
    from .diffusion import FlowMatching, GaussianDiffusion

    if isinstance(objective, GaussianDiffusion):
        return "gaussian"
    if isinstance(objective, FlowMatching):
        return "flow"
    raise ValueError(f"cannot export a run trained with {type(objective).__name__}")


def build_scheduler(objective, sampler: str | None = None):
    """The diffusers scheduler with which ``SSMDiffPipeline`` reproduces ``ssmdiff.diffusion.sample(...,
    sampler=sampler)`` for ``objective`` (same betas, prediction type, variance handling and timestep grid).

    sampler: one of EXPORT_SAMPLERS for the objective's kind; None takes "dpm++2m" (Gaussian) / "euler" (flow).
    """
    kind = _kind(objective)
    sampler = sampler or DEFAULT_EXPORT_SAMPLER[kind]
    if sampler not in EXPORT_SAMPLERS[kind]:
        raise ValueError(f"sampler {sampler!r} cannot be exported for a {kind} objective; choose one of "
                         f"{', '.join(EXPORT_SAMPLERS[kind])} (ddim re-spaces its chain per step count, so it "
                         f"has no single diffusers scheduler)")
    if kind == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), sampler
    from .diffusion.sampling import _gaussian_scheduler

    with warnings.catch_warnings():
        # diffusers builds sigmas with np.array(tensor), which numpy 2 reports as deprecated: not ours.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*__array__.*")
        # The engine's own construction (its set_timesteps is harmless: only the config is saved).
        sched, _ = _gaussian_scheduler(objective, sampler, 1)
    return sched, sampler


def is_pipeline_folder(path) -> bool:
    """Whether ``path`` is a folder written by ``export_pipeline`` / ``SSMDiffPipeline.save_pretrained``."""
    index = os.path.join(str(path), "model_index.json")
    if not os.path.isfile(index):
        return False
    try:
        with open(index, encoding="utf-8") as f:
            return json.load(f).get("_class_name") == PIPELINE_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def _run_root(ckpt_dir: str) -> str | None:
    parent = os.path.dirname(os.path.abspath(ckpt_dir))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def _short_checkpoint(ckpt_dir: str) -> str:
    # "run-name/step_0000500": enough to identify it without publishing the local directory layout.
    root = _run_root(ckpt_dir)
    name = os.path.basename(os.path.abspath(ckpt_dir))
    return f"{os.path.basename(root)}/{name}" if root else name


def _read_eval(run_root: str | None) -> dict | None:
    if run_root is None:
        return None
    path = os.path.join(run_root, "eval.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            return None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def model_card(run, *, sampler: str, evals: dict | None, out_params: int) -> str:
    """README.md text for an exported run (YAML header for the hub, then data, training, metrics, usage)."""
    tc, data, mc = run.train_config, run.data, dict(run.model.config)
    name = mc.get("name", type(run.model).__name__)
    ncls = run.num_classes
    c, h, w = run.shape_chw
    tags = ["ssmdiff", "diffusion", "image-generation", "state-space-model" if not name.startswith("DiT")
            else "diffusion-transformer"]
    lines = ["---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["---", "", f"# {name} trained with ssmdiff", ""]
    lines += [f"A {'class-conditional' if ncls else 'unconditional'} {name} backbone ({type(run.model).__name__} "
              f"family, {out_params:,} parameters) generating {c}x{h}x{w} "
              f"{'latents decoded by the bundled VAE' if data.get('latent') else 'images'}.", ""]
    lines += ["## Training data", ""]
    source = data.get("source") or tc.get("data", "unknown")
    lines.append(f"- Dataset: `{tc.get('data', source)}` (source: {source}, split: {data.get('split', 'train')}, "
                 f"{data.get('num_items', 'unknown number of')} items)")
    lines.append(f"- Resolution: {h}x{w}, {c} channels; classes: {ncls or 'none (unconditional)'}"
                 + ("; horizontal flips" if tc.get("hflip") else ""))
    names = data.get("class_names")
    if names:
        lines.append("- Class ids: " + ", ".join(f"{i} = {n}" for i, n in enumerate(names)))
    lines += ["", "## Training", ""]
    total = tc.get("steps")
    lines.append(f"- Steps: {run.step}" + (f" of {total} planned" if total and total != run.step else "")
                 + f"; global batch {tc.get('batch_size', '?')}, lr {tc.get('lr', '?')}, "
                 f"EMA decay {tc.get('ema_decay', '?')}")
    lines.append(f"- Objective: `{json.dumps(run.objective.config)}`")
    lines.append(f"- Exported weights: {'EMA' if run.ema else 'live (non-EMA)'} from checkpoint "
                 f"`{_short_checkpoint(run.checkpoint)}`")
    lines.append(f"- Model config: `{json.dumps({k: v for k, v in mc.items() if not k.startswith('_')})}`")
    lines += ["", "## Measured metrics", ""]
    if evals:
        at = tc.get("steps")
        lines.append(f"From the run's eval.json (measured by ssmdiff at the end of training, step {at}"
                     + (f"; this export is step {run.step}" if at is not None and at != run.step else "") + "):")
        lines += ["", "| metric | value |", "|---|---|"]
        for k, v in evals.items():
            if isinstance(v, (int, float, str, bool)) or (isinstance(v, list) and len(v) <= 8):
                lines.append(f"| {k} | {_fmt(v)} |")
    else:
        lines.append("No evaluation was recorded for this run (no eval.json in the run folder): nothing measured.")
    lines += ["", "## Usage", "", "```python", "import torch", "from ssmdiff.pipeline import SSMDiffPipeline", "",
              "pipe = SSMDiffPipeline.from_pretrained(\"PATH_TO_THIS_FOLDER\")",
              "g = torch.Generator().manual_seed(0)"]
    if ncls:
        lines.append(f"images = pipe(class_labels=[0, 1], num_inference_steps=50, guidance_scale="
                     f"{tc.get('guidance_scale', 1.5)}, generator=g).images")
    else:
        lines.append("images = pipe(batch_size=4, num_inference_steps=50, guidance_scale=1.0, generator=g).images")
    lines += ["```", "", f"The scheduler is the one `ssmdiff sample --sampler {sampler}` uses; with the same seed and "
              f"steps the pipeline reproduces `ssmdiff.diffusion.sample` exactly.", ""]
    return "\n".join(lines)


def export_pipeline(run_or_checkpoint: str, out_dir: str, *, ema: bool = True, sampler: str | None = None,
                    vae=None, overwrite: bool = False) -> str:
    """Write a run folder's (or checkpoint directory's) model as a diffusers pipeline folder with a model card.

    ema: export the EMA weights (default) or the live ones. sampler: which scheduler to bundle (see
    ``build_scheduler``). vae: for latent runs, an ``AutoencoderKL`` or its folder; default the one the run
    records. overwrite: replace an existing non-empty ``out_dir``. Returns ``out_dir``.
    Raises FileNotFoundError for a missing run, CheckpointError (a ValueError) for an unusable checkpoint and
    ValueError for an occupied ``out_dir`` or an unexportable sampler.
    """
    from .pipeline import SSMDiffPipeline
    from .sample import load_run

    out_dir = str(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        if not overwrite:
            raise ValueError(f"{out_dir} exists and is not empty; choose another folder or pass overwrite=True")
        if not is_pipeline_folder(out_dir) and os.path.isdir(out_dir):
            raise ValueError(f"{out_dir} holds something other than an exported pipeline; refusing to replace it")
    run = load_run(str(run_or_checkpoint), ema=ema, device="cpu")
    sched, sampler = build_scheduler(run.objective, sampler)
    if run.data.get("latent"):
        from .data import load_vae

        if vae is None:
            if not run.data.get("vae"):
                raise ValueError("this run was trained on latents but does not record its VAE; pass vae=")
            vae = run.data["vae"]
        if isinstance(vae, (str, os.PathLike)):
            vae = load_vae(str(vae))
        # The pipeline decodes with the VAE config's factors: make them the ones the latents were scaled with.
        factors = {k: float(run.data[k]) for k in ("scaling_factor", "shift_factor") if run.data.get(k) is not None}
        if factors:
            vae.register_to_config(**factors)
    elif vae is not None:
        raise ValueError("this run was trained on pixels: it takes no VAE")
    pipe = SSMDiffPipeline(transformer=run.model, scheduler=sched, vae=vae)
    if os.path.isdir(out_dir) and overwrite:
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    run_root = _run_root(run.checkpoint)
    evals = _read_eval(run_root)
    steps = int(run.train_config.get("sample_steps") or 50) if sampler != "ddpm" else 250
    data = {k: v for k, v in run.data.items() if k != "vae"}
    meta = {"format": 1, "objective_config": run.objective.config, "data": data, "step": run.step, "ema": run.ema,
            "source_checkpoint": _short_checkpoint(run.checkpoint), "sampler": sampler, "sample_steps": steps,
            "guidance_scale": run.train_config.get("guidance_scale", 1.0), "train_config": run.train_config,
            "eval": evals}
    with open(os.path.join(out_dir, SSMDIFF_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, default=str)
    params = sum(p.numel() for p in run.model.parameters())
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(run, sampler=sampler, evals=evals, out_params=params))
    return out_dir


def load_pipeline_run(path: str, *, device: str | torch.device = "cpu"):
    """A ``ssmdiff.sample.LoadedRun`` for an exported pipeline folder, for ``ssmdiff.sample.generate``.

    Its ``train_config`` carries the folder's sampler and step count as ``sampler`` / ``sample_steps``, so
    ``ssmdiff sample FOLDER`` defaults to the bundled scheduler. Raises FileNotFoundError / ValueError when
    ``path`` is not an exported folder.
    """
    from .diffusion import create_objective
    from .models import load_model
    from .sample import LoadedRun

    path = str(path)
    if not is_pipeline_folder(path):
        raise FileNotFoundError(f"{path} is not an ssmdiff pipeline folder (no model_index.json naming "
                                f"{PIPELINE_CLASS}); export one with `ssmdiff export RUN OUT_DIR`")
    meta_path = os.path.join(path, SSMDIFF_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path} has no {SSMDIFF_FILE}, so its diffusion objective is unknown; load it with "
                         f"SSMDiffPipeline.from_pretrained instead")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    model = load_model(os.path.join(path, "transformer")).to(device).requires_grad_(False)
    objective = create_objective(meta["objective_config"])
    data = dict(meta.get("data") or {})
    if data.get("latent"):
        data["vae"] = os.path.join(path, "vae")  # generate() loads the bundled VAE from here
    tc = dict(meta.get("train_config") or {})
    tc.update(sampler=meta.get("sampler"), sample_steps=meta.get("sample_steps"),
              guidance_scale=meta.get("guidance_scale", tc.get("guidance_scale", 1.0)))
    return LoadedRun(model, objective, os.path.join(path, "transformer"), int(meta.get("step", 0)), tc, data,
                     bool(meta.get("ema", True)))
