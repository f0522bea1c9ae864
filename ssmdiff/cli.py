"""The ``ssmdiff`` command: train | sample | evaluate | export | models | extract-latents.

``ssmdiff train`` with no arguments is the default main job (a class-conditional DiS on the built-in digits).
User errors (bad flags, missing files, foreign checkpoints) end with one ``ssmdiff: error: ...`` line and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import typing

from .checkpoint import CheckpointError
from .utils.alloc import tune_cpu_allocator

PROG = "ssmdiff"

_TRAIN_HELP = {
    "model": "backbone name from `ssmdiff models` (e.g. DiS-S/2, DiT-B/4)",
    "model_overrides": "JSON dict of constructor overrides, e.g. '{\"depth\": 6}'; unset: hidden_size 64 and no drop-path for the default DiS-T/2, nothing for other models",
    "data": "dataset: 'digits' (built-in), an image folder, a CIFAR-10 batch folder, an .npz, a latent-shard folder or hf:NAME",
    "image_size": "resize + centre-crop images to this size (default: the dataset's own)",
    "hflip": "random horizontal flips",
    "objective": "'gaussian' (DDPM/ADM) or 'flow' (flow matching)",
    "schedule": "beta schedule of the Gaussian objective (linear, scaled_linear, cosine)",
    "prediction": "what the network predicts (eps, x0, v)",
    "learn_sigma": "learn the variance (ADM hybrid loss)",
    "diffusion_steps": "number of diffusion timesteps",
    "time_sampling": "flow matching time distribution (uniform, logit_normal)",
    "steps": "optimiser steps",
    "batch_size": "global batch per optimiser step (all processes and micro-batches)",
    "grad_accum": "micro-batches accumulated per optimiser step",
    "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay (never on norms, biases, embeddings)",
    "warmup_steps": "linear warmup steps",
    "lr_schedule": "'constant' or 'cosine' after warmup",
    "min_lr_ratio": "cosine floor as a fraction of --lr",
    "grad_clip": "clip the global gradient norm (0: off)",
    "ema_decay": "EMA decay of the weights used for sampling",
    "ema_warmup": "ramp the EMA decay as (1+step)/(10+step) early on",
    "precision": "'fp32' or 'bf16' autocast",
    "compile": "torch.compile the model",
    "grad_checkpointing": "activation checkpointing (less memory, more compute)",
    "drop_path": "stochastic depth rate passed to the model",
    "fsdp": "shard with FSDP2 (under torchrun)",
    "seed": "random seed",
    "device": "'auto', 'cpu' or 'cuda[:N]'",
    "num_workers": "DataLoader workers (0 keeps --resume exact)",
    "threads": "CPU threads for training (default: 1 for models under 5M parameters, where a second thread costs "
               "more than it gains; torch's default otherwise)",
    "run_dir": "run folder (default runs/<name>)",
    "overwrite": "start again in a run folder that already has checkpoints",
    "resume": "continue the run in the run folder from its latest checkpoint",
    "stop_at": "stop after this step (with a checkpoint), e.g. to fit a job time limit; --resume continues",
    "ckpt_every": "checkpoint every N steps (and at the end)",
    "keep_last": "checkpoints to keep",
    "log_every": "log metrics every N steps",
    "sample_every": "write an EMA sample grid every N steps (0: only at the end)",
    "samples_per_class": "images per class in the sample grids",
    "sampler": "sampler for grids and evaluation (ddpm, ddim, dpm++2m, dpm++3m, euler, heun)",
    "sample_steps": "sampler steps for grids and evaluation",
    "guidance_scale": "classifier-free guidance scale for grids and evaluation",
    "eval_samples_per_class": "samples per class for the final evaluation",
    "evaluate": "evaluate samples at the end (eval.json); runs on the digits, or on other data when "
                "--inception-weights are given",
    "inception_weights": "local Inception weights file for the end-of-training FID/KID/IS on non-digit data "
                         "(never downloaded)",
    "eval_reference": "reference images for the end-of-training evaluation (default: held-out digits, or the "
                      "training data when it is images; required for latent datasets)",
    "init_from": "weak-to-strong: start from this run folder or checkpoint (any resolution; position tables "
                 "interpolated, optimiser and step fresh); its model, overrides and objective are reused unless "
                 "given; not with --resume",
    "init_ema": "initialise from the source's EMA weights (--no-init-ema: its raw weights)",
    "progress": "progress bars",
}


class CliError(Exception):
    """A user error detected by the CLI itself."""


def _parse_bool_free_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if args else str
    return tp


def _number(convert, what: str, minimum, exclusive: bool = False):
    """An argparse type: ``convert`` the text, then require ``value >= minimum`` (``> minimum`` when
    ``exclusive``; NaN fails too)."""

    def parse(s: str):
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not (v > minimum if exclusive else v >= minimum):
            raise argparse.ArgumentTypeError(f"expected {what} {'>' if exclusive else '>='} {minimum}, got {s}")
        return v

    return parse


_positive_int = _number(int, "an integer", 1)
_nonneg_int = _number(int, "an integer", 0)
_nonneg_float = _number(float, "a number", 0)


def _json_dict(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {s!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"depth\": 6}}', got {s!r}")
    return v


def _class_list(s: str) -> list[int]:
    try:
        return [int(p) for p in s.replace(" ", "").split(",") if p != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids like 0,3,7, got {s!r}") from None


_CHOICES = {
    "objective": ["gaussian", "flow"],
    "lr_schedule": ["constant", "cosine"],
    "precision": ["fp32", "bf16"],
    "prediction": ["eps", "x0", "v"],
    "time_sampling": ["uniform", "logit_normal"],
    "sampler": ["ddpm", "ddim", "dpm++2m", "dpm++3m", "euler", "heun"],
}
_POSITIVE = {"steps", "batch_size", "grad_accum", "ckpt_every", "log_every", "diffusion_steps", "sample_steps",
             "image_size", "stop_at", "threads"}
_NONNEG = {"warmup_steps", "keep_last", "sample_every", "samples_per_class", "eval_samples_per_class",
           "num_workers", "seed"}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    defaults = TrainConfig()
    p.add_argument("--name", default=argparse.SUPPRESS,
                   help="run name; the run folder is runs/<name> (default: digits-dis)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_ = _TRAIN_HELP.get(f.name, "") + f" (default: {default})"
        tp = _parse_bool_free_type(f.type if not isinstance(f.type, str) else eval(f.type, vars(typing), {}))
        kw: dict = {"default": argparse.SUPPRESS, "help": help_, "dest": f.name}
        if f.name == "model_overrides":
            p.add_argument(flag, type=_json_dict, **kw)
        elif tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name in _CHOICES:
            p.add_argument(flag, choices=_CHOICES[f.name], **kw)
        elif tp is int:
            conv = _positive_int if f.name in _POSITIVE else _nonneg_int if f.name in _NONNEG else int
            p.add_argument(flag, type=conv, **kw)
        elif tp is float:
            p.add_argument(flag, type=_nonneg_float if f.name != "drop_path" else float, **kw)
        else:
            p.add_argument(flag, type=str, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (sub-commands train, sample, evaluate, export, models, extract-latents)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Diffusion models with state-space backbones.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (no arguments: the default DiS on the built-in digits)",
                       description="Train a diffusion model. With no arguments: the default main job.")
    _add_train_args(t)

    s = sub.add_parser("sample", help="sample images from a run, checkpoint or exported pipeline folder")
    s.add_argument("path", metavar="RUN_OR_CHECKPOINT_OR_PIPELINE",
                   help="a run folder, one of its checkpoints, or a folder written by `ssmdiff export`")
    s.add_argument("--num-images", type=_positive_int, default=None,
                   help="images to generate (default: 10 per class, or 64)")
    s.add_argument("--batch-size", type=_positive_int, default=64)
    s.add_argument("--sampler", choices=_CHOICES["sampler"], default=None,
                   help="default: the run's, or a pipeline folder's bundled scheduler")
    s.add_argument("--steps", type=_positive_int, default=None,
                   help="sampler steps (default: the run's, or the pipeline folder's)")
    s.add_argument("--guidance-scale", type=_nonneg_float, default=None, help="default: the run's")
    s.add_argument("--classes", type=_class_list, default=None, help="comma-separated class ids (default: all)")
    s.add_argument("--seed", type=_nonneg_int, default=0)
    s.add_argument("--image-size", type=_positive_int, default=None,
                   help="sample at this side (pixels; latent cells for latent runs) instead of the trained one, "
                        "position tables interpolated, no training")
    s.add_argument("--upsample-guidance", action=argparse.BooleanOptionalAction, default=False,
                   help="guide a --image-size of 2x, 3x, ... the trained one with the trained-resolution model "
                        "(arXiv 2404.01709, as in DiM); Gaussian runs with ddpm, ddim, dpm++2m or dpm++3m")
    s.add_argument("--ug-weight", type=float, default=1.0, help="upsample guidance weight (default: 1.0)")
    s.add_argument("--ug-fraction", type=_nonneg_float, default=0.3,
                   help="guide over this first fraction of the sampling trajectory (default: 0.3)")
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (a pipeline folder holds the one set it was exported with)")
    s.add_argument("--out", default=None,
                   help="output folder (default: <run or pipeline folder>/samples/sample-step<N>-seed<S>)")
    s.add_argument("--singles", action=argparse.BooleanOptionalAction, default=True,
                   help="also write every image as its own PNG")
    s.add_argument("--device", default="auto")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    e = sub.add_parser("evaluate", help="score samples (npz, image folder or pipeline folder) against a reference; "
                                        "JSON output")
    e.add_argument("samples", metavar="SAMPLES",
                   help="an .npz (arr_0 uint8 NHWC, optional labels), an image folder (labels from _class<k> in the "
                        "file names), a sample folder of `ssmdiff sample`, or a pipeline folder of `ssmdiff export` "
                        "(--num-images are generated from it first)")
    e.add_argument("--num-images", type=_positive_int, default=None,
                   help="pipeline folder only: images to generate (default: 100 per class, or 1000)")
    e.add_argument("--batch-size", type=_positive_int, default=64, help="pipeline folder only: sampling batch")
    e.add_argument("--seed", type=_nonneg_int, default=0, help="pipeline folder only: sampling seed")
    e.add_argument("--sampler", choices=_CHOICES["sampler"], default=None,
                   help="pipeline folder only (default: its bundled scheduler)")
    e.add_argument("--steps", type=_positive_int, default=None, help="pipeline folder only (default: its own)")
    e.add_argument("--guidance-scale", type=_nonneg_float, default=None,
                   help="pipeline folder only (default: its own)")
    e.add_argument("--reference", default="digits",
                   help="reference: 'digits' (held-out split), a dataset spec, an .npz or an image folder")
    e.add_argument("--metrics", default=None,
                   help="comma-separated metrics (default: the evaluator's choice for the reference)")
    e.add_argument("--out", default=None, help="write the JSON here as well as printing it")
    e.add_argument("--inception-weights", default=None,
                   help="local Inception weights for FID/KID/IS (otherwise fetched only with --allow-download)")
    e.add_argument("--allow-download", action=argparse.BooleanOptionalAction, default=False,
                   help="allow downloading Inception weights")
    e.add_argument("--device", default="auto")

    xp = sub.add_parser("export", help="write a run as a diffusers pipeline folder (SSMDiffPipeline) with a model card",
                        description="Export a run folder or checkpoint as a diffusers pipeline folder: backbone, "
                                    "scheduler, VAE (latent runs), ssmdiff.json and a README.md model card.")
    xp.add_argument("path", metavar="RUN_OR_CHECKPOINT")
    xp.add_argument("out_dir", metavar="OUT_DIR")
    xp.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                    help="export the EMA weights (--no-ema: the live ones)")
    xp.add_argument("--sampler", default=None,
                    help="scheduler to bundle: ddpm, dpm++2m, dpm++3m, euler, heun for Gaussian runs, euler for flow "
                         "runs (default: dpm++2m / euler)")
    xp.add_argument("--vae", default=None, help="latent runs: AutoencoderKL folder to bundle (default: the run's)")
    xp.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                    help="replace OUT_DIR when it already holds an exported pipeline")

    m = sub.add_parser("models", help="list the model registry with parameter counts and Gflops")
    m.add_argument("--input-size", type=_positive_int, default=32)
    m.add_argument("--in-channels", type=_positive_int, default=4)
    m.add_argument("--num-classes", type=_nonneg_int, default=1000)
    m.add_argument("--filter", default=None, help="only names containing this text")
    m.add_argument("--json", action=argparse.BooleanOptionalAction, default=False, help="print JSON")

    # Listed here for `ssmdiff --help`; main() hands its arguments to ssmdiff.bench's own parser unparsed.
    sub.add_parser("bench", add_help=False,
                   help="benchmark SSM backbones against DiT (images/s, memory, MFU); see `ssmdiff bench --help`")

    x = sub.add_parser("extract-latents", help="encode a dataset with a VAE into latent shards for training")
    x.add_argument("--data", required=True, help="dataset spec (as for train --data)")
    x.add_argument("--vae", required=True, help="diffusers AutoencoderKL: local folder or hub id")
    x.add_argument("--out", required=True, help="output folder for the shards")
    x.add_argument("--image-size", type=_positive_int, default=None)
    x.add_argument("--split", default="train")
    x.add_argument("--batch-size", type=_positive_int, default=32)
    x.add_argument("--shard-size", type=_positive_int, default=10000)
    x.add_argument("--sample-posterior", action=argparse.BooleanOptionalAction, default=False)
    x.add_argument("--flip-copies", action=argparse.BooleanOptionalAction, default=False,
                   help="also store the latents of horizontally flipped images")
    x.add_argument("--seed", type=_nonneg_int, default=0)
    x.add_argument("--device", default="auto")
    x.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


# ------------------------------------------------------------------------------------------------- commands
def _device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise CliError(f"unknown device {spec!r}; use auto, cpu or cuda[:N]") from None


def cmd_train(ns: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .train import TrainConfig, train

    given = {k: v for k, v in vars(ns).items() if k not in ("command", "name")}
    name = getattr(ns, "name", None)
    if "run_dir" not in given:
        given["run_dir"] = os.path.join("runs", name or "digits-dis")
    elif name is not None:
        raise CliError("give either --name or --run-dir, not both")
    run_dir = given["run_dir"]
    if given.get("init_from"):
        if given.get("resume"):
            raise CliError("--init-from starts a new run from another run's weights; --resume continues this "
                           "run from its own checkpoint: give one of them")
        from .train import inherit_init_settings, read_init_source

        _, source_state = read_init_source(given["init_from"])
        given = inherit_init_settings(given, source_state)
    if given.get("resume") and ckpt.has_checkpoint(run_dir):
        # continue with the stored settings; only flags given now change them (e.g. --steps to extend)
        state = ckpt.read_state(ckpt.resolve_checkpoint(run_dir))
        base = TrainConfig.from_dict(state.get("train_config", {})).to_dict()
        base.pop("stop_at", None)  # the interruption point of the previous leg is not a setting of the run
        base.pop("overwrite", None)
        base.update(given)
        given = base
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **given})
    from .utils.distributed import cleanup, current

    try:
        summary = train(cfg)
        is_main = current().is_main
    finally:
        cleanup()
    if not is_main:
        return 0
    ev = summary.get("eval") or {}
    if ev:
        acc, fd, floor = ev.get("accuracy"), ev.get("fd"), ev.get("floor_fd")
        parts = [f"{k}={v:.4g}" for k, v in (("class accuracy", acc), ("Frechet distance", fd),
                                                 ("real-vs-real floor", floor)) if isinstance(v, (int, float))]
        print(f"evaluation: {os.path.join(run_dir, 'eval.json')}" + (f" ({', '.join(parts)})" if parts else ""))
    if summary["step"] < cfg.steps:
        print(f"stopped at step {summary['step']} of {cfg.steps}; continue with: "
              f"ssmdiff train --run-dir {shlex.quote(run_dir)} --resume")
        return 0
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"sample grid: {summary.get('grid') or os.path.join(run_dir, 'samples')}")
    print(f"sample more: ssmdiff sample {shlex.quote(run_dir)} --num-images 100 "
          f"--guidance-scale {cfg.guidance_scale:g} --seed 1")
    return 0


def cmd_sample(ns: argparse.Namespace) -> int:
    from .sample import generate, load_run, save_samples, write_json
    from .utils import distributed as du

    device = _device(ns.device)
    info = du.init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = _device(f"cuda:{info.local_rank}")
    run = _load_any(ns.path, ema=ns.ema, device=device)
    tc = run.train_config
    sampler = ns.sampler or tc.get("sampler")
    steps = ns.steps or tc.get("sample_steps")
    scale = ns.guidance_scale if ns.guidance_scale is not None else tc.get("guidance_scale", 1.0)
    n = ns.num_images or (10 * (len(ns.classes) if ns.classes else run.num_classes) if run.num_classes else 64)
    ug = {"weight": ns.ug_weight, "fraction": ns.ug_fraction} if ns.upsample_guidance else None
    if ug is not None and ns.image_size is None:
        raise CliError("--upsample-guidance samples above the trained resolution: give --image-size "
                       f"(e.g. {2 * run.shape_chw[1]})")
    out = ns.out
    if out is None:
        root = _output_root(ns.path, run)
        tag = f"-size{ns.image_size}" if ns.image_size else ""
        tag += "-ug" if ug is not None else ""
        out = os.path.join(root, "samples", f"sample-step{run.step}-seed{ns.seed}{tag}")
    images, labels = generate(run, num_images=n, batch_size=ns.batch_size, sampler=sampler, steps=steps,
                              guidance_scale=scale, classes=ns.classes, seed=ns.seed, device=device,
                              progress=ns.progress, image_size=ns.image_size, upsample_guidance=ug)
    if info.is_main:
        paths = save_samples(images, labels, out, class_names=run.class_names, singles=ns.singles)
        write_json(os.path.join(out, "sampling.json"), {
            "checkpoint": run.checkpoint, "step": run.step, "ema": run.ema, "num_images": n,
            "sampler": sampler, "steps": steps, "guidance_scale": scale, "classes": ns.classes, "seed": ns.seed,
            "image_size": ns.image_size or run.shape_chw[1], "upsample_guidance": ug,
        })
        print(f"{n} images from {run.checkpoint} (step {run.step}, {'EMA' if run.ema else 'live'} weights)")
        print(f"npz: {paths['npz']}")
        print(f"grid: {paths['grid']}")
    du.barrier()
    du.cleanup()
    return 0


def _load_any(path: str, *, ema: bool, device):
    """A ``LoadedRun`` from a run folder, checkpoint directory or exported pipeline folder."""
    from .hub import is_pipeline_folder, load_pipeline_run
    from .sample import load_run

    if is_pipeline_folder(path):
        return load_pipeline_run(path, device=device)
    return load_run(path, ema=ema, device=device)


def _output_root(path: str, run) -> str:
    """Where default outputs go: inside a pipeline folder, else the run folder of the checkpoint."""
    from .hub import is_pipeline_folder

    if is_pipeline_folder(path):
        return path
    return os.path.dirname(os.path.dirname(run.checkpoint))


def _samples_path(path: str) -> str:
    """The file or folder to score: a run's sample folder means its samples.npz."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "samples.npz")):
        return os.path.join(path, "samples.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no samples at {path!r}: give an .npz (arr_0 uint8 NHWC) or a folder of images")
    if os.path.isfile(path) and not path.endswith(".npz"):
        raise CliError(f"{path!r}: samples must be an .npz file (key arr_0) or a folder of images")
    return path


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from .evaluate import evaluate_samples

    kwargs = {"reference": ns.reference, "inception_weights": ns.inception_weights,
              "allow_download": ns.allow_download, "device": _device(ns.device)}
    if ns.metrics:
        kwargs["metrics"] = [m.strip() for m in ns.metrics.split(",") if m.strip()]
    from .hub import is_pipeline_folder

    if is_pipeline_folder(ns.samples):
        from .sample import generate

        device = kwargs["device"]
        run = _load_any(ns.samples, ema=True, device=device)
        tc = run.train_config
        n = ns.num_images or (100 * run.num_classes if run.num_classes else 1000)
        scale = ns.guidance_scale if ns.guidance_scale is not None else tc.get("guidance_scale", 1.0)
        images, labels = generate(run, num_images=n, batch_size=ns.batch_size, sampler=ns.sampler or tc.get("sampler"),
                                  steps=ns.steps or tc.get("sample_steps"), guidance_scale=scale, seed=ns.seed,
                                  device=device, progress=False)
        result = evaluate_samples(images, labels=labels, **kwargs)
    else:
        # A path goes to evaluate_samples as it is: it reads the labels the samples were asked for from the npz
        # ("labels") or from _class{k} in the file names (a dataset loader would drop them).
        result = evaluate_samples(_samples_path(ns.samples), **kwargs)
    text = json.dumps(result, indent=1)
    if ns.out:
        from .checkpoint import atomic_write_text

        os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
        atomic_write_text(ns.out, text + "\n")
    print(text)
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from .hub import export_pipeline

    out = export_pipeline(ns.path, ns.out_dir, ema=ns.ema, sampler=ns.sampler, vae=ns.vae, overwrite=ns.overwrite)
    print(f"pipeline folder: {out}")
    print(f"model card: {os.path.join(out, 'README.md')}")
    print(f"sample from it: ssmdiff sample {shlex.quote(out)} --num-images 100 --seed 1")
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    from .models import list_models, model_table

    names = [n for n in list_models() if not ns.filter or ns.filter.lower() in n.lower()]
    if not names:
        raise CliError(f"no model name contains {ns.filter!r}; run `ssmdiff models` for the list")
    rows = model_table(names, input_size=ns.input_size, in_channels=ns.in_channels, num_classes=ns.num_classes)
    if ns.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = list(rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))))
    return 0


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def cmd_extract_latents(ns: argparse.Namespace) -> int:
    from .data import build_dataset, encode_latents, load_vae

    device = _device(ns.device)
    ds = build_dataset(ns.data, image_size=ns.image_size, split=ns.split)
    vae = load_vae(ns.vae, device=device)
    info = encode_latents(ds, vae, ns.out, batch_size=ns.batch_size, shard_size=ns.shard_size, device=device,
                          sample_posterior=ns.sample_posterior, flip_copies=ns.flip_copies, seed=ns.seed,
                          vae_name=ns.vae, progress=ns.progress)
    print(json.dumps(info, indent=1, default=str))
    print(f"train on them with: ssmdiff train --data {shlex.quote(ns.out)}")
    return 0


COMMANDS = {
    "train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate, "export": cmd_export, "models": cmd_models,
    "extract-latents": cmd_extract_latents,
}


# Commands that allocate and free large tensors step after step: they keep freed buffers for reuse
# (``ssmdiff.utils.alloc``; SSMDIFF_MALLOC=default turns that off).
_HEAVY_COMMANDS = ("train", "sample", "evaluate", "extract-latents")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ssmdiff`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command in _HEAVY_COMMANDS:
        tune_cpu_allocator()
    try:
        return COMMANDS[ns.command](ns)
    except (CliError, CheckpointError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("SSMDIFF_DEBUG"):
            raise
        msg = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"{e.strerror}: {e.filename}"
        print(f"{PROG} {ns.command}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: not an error of the command
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print(f"{PROG} {ns.command}: interrupted; a run continues from its last checkpoint with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
