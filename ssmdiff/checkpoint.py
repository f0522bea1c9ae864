"""Training checkpoints: safetensors for every tensor, JSON for everything else, written atomically.

Layout of a run folder::

    runs/<name>/checkpoints/
        step_0000500/            one directory per checkpoint, renamed into place only once complete
            model.safetensors    live weights (full, unsharded)
            ema.safetensors      EMA weights
            optimizer.safetensors  optimiser state tensors, keyed "<param name>/<state name>"
            rng.safetensors      torch CPU/CUDA generator states, one entry per rank
            state.json           step, epoch, configs, scheduler, optimiser hyper-parameters, numpy/python RNG
        latest                   name of the newest complete checkpoint, written last

Nothing here unpickles anything: a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
STATE_FILE = "state.json"
LATEST = "latest"
TENSOR_FILES = ("model", "ema", "optimizer", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, partial, corrupt, or written for another model."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    """Write a small text file so that readers see either the old or the new content, never a torn one."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(d)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous views; clone breaks both
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------- optimiser state
def flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into tensors (for safetensors) and JSON-able metadata.

    Works with both the plain ``optimizer.state_dict()`` (integer parameter ids) and the FQN-keyed one from
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}/{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    meta = {
        "param_groups": osd["param_groups"],
        "scalars": scalars,
        "key_type": "int" if all(isinstance(k, int) for k in osd["state"]) else "str",
    }
    return tensors, meta


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    conv = int if meta.get("key_type") == "int" else str
    state: dict = {}
    for key, v in tensors.items():
        pid, name = key.rsplit("/", 1)
        state.setdefault(conv(pid), {})[name] = v
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(conv(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def _jsonable(obj):
    """Keep only what JSON can hold (scheduler state dicts may carry callables or tensors)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if _is_plain(v)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def _is_plain(v) -> bool:
    if isinstance(v, (dict, list, tuple)):
        return True
    return v is None or isinstance(v, (bool, int, float, str, torch.Tensor))


# ------------------------------------------------------------------------------------------------------ saving
def save_checkpoint(
    ckpt_root: str,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
    rng_tensors: dict[str, torch.Tensor] | None = None,
    state: dict | None = None,
    keep_last: int | None = None,
) -> str:
    """Write checkpoint ``step_{step:07d}`` under ``ckpt_root`` atomically and point ``latest`` at it.

    Every file goes into a hidden temporary directory beside the final one, is fsynced, and the directory is
    renamed into place; ``latest`` is replaced last. A crash at any point leaves the previous checkpoint and
    ``latest`` intact. With ``keep_last`` only the newest ``keep_last`` checkpoints are kept.
    Returns the checkpoint directory.
    """
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step_{step:07d}"
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}-{os.getpid()}-{time.time_ns()}")
    os.makedirs(tmp)
    files: dict[str, int] = {}

    def put(fname: str, tensors: dict[str, torch.Tensor]):
        path = os.path.join(tmp, fname)
        save_file(_contiguous(tensors), path, metadata={"format": "ssmdiff", "version": str(FORMAT_VERSION)})
        _fsync_file(path)
        files[fname] = os.path.getsize(path)

    put("model.safetensors", model_state)
    if ema_state is not None:
        put("ema.safetensors", ema_state)
    meta = dict(state or {})
    if optimizer_state is not None:
        opt_tensors, opt_meta = flatten_optimizer_state(optimizer_state)
        put("optimizer.safetensors", opt_tensors)
        meta["optimizer"] = opt_meta
    if rng_tensors:
        put("rng.safetensors", rng_tensors)
    meta.update(format_version=FORMAT_VERSION, step=step, files=files)
    if "scheduler" in meta:
        meta["scheduler"] = _jsonable(meta["scheduler"])
    spath = os.path.join(tmp, STATE_FILE)
    with open(spath, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)

    if os.path.exists(final):  # re-saving a step (e.g. the final save after a periodic one): swap it out
        trash = os.path.join(ckpt_root, f".old-{name}-{time.time_ns()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(os.path.join(ckpt_root, LATEST), name + "\n")
    if keep_last:
        prune_checkpoints(ckpt_root, keep_last)
    return final


def list_checkpoints(ckpt_root: str) -> list[str]:
    """Complete checkpoint directories (those with a state.json), oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for d in sorted(os.listdir(ckpt_root)):
        p = os.path.join(ckpt_root, d)
        if d.startswith("step_") and os.path.isfile(os.path.join(p, STATE_FILE)):
            out.append(p)
    return out


def prune_checkpoints(ckpt_root: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and leftovers of interrupted writes."""
    ckpts = list_checkpoints(ckpt_root)
    latest = _read_latest(ckpt_root)
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        if os.path.basename(p) != latest:
            shutil.rmtree(p, ignore_errors=True)
    for d in os.listdir(ckpt_root):
        if d.startswith(".tmp-") or d.startswith(".old-"):
            shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)


def _read_latest(ckpt_root: str) -> str | None:
    try:
        with open(os.path.join(ckpt_root, LATEST)) as f:
            return f.read().strip() or None
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------- loading
def resolve_checkpoint(path: str) -> str:
    """Checkpoint directory for a run folder, a ``checkpoints`` folder or a checkpoint directory.

    A run folder resolves through ``checkpoints/latest`` (or, if that pointer is missing, the newest complete
    checkpoint). Raises FileNotFoundError / CheckpointError with a message saying what was expected.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such run or checkpoint: {path!r}")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        if not os.path.isdir(root):
            continue
        latest = _read_latest(root)
        if latest and os.path.isdir(os.path.join(root, latest)):
            return os.path.join(root, latest)
        ckpts = list_checkpoints(root)
        if ckpts:
            return ckpts[-1]
    if os.path.isdir(path) and any(d.startswith("step_") for d in os.listdir(path)):
        raise CheckpointError(f"{path!r} holds only incomplete checkpoints (no state.json); it cannot be loaded")
    raise FileNotFoundError(
        f"{path!r} is not a run folder or checkpoint: expected 'checkpoints/latest' or a directory with {STATE_FILE}"
    )


def has_checkpoint(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a checkpoint that :func:`resolve_checkpoint` would find."""
    try:
        resolve_checkpoint(run_dir)
        return True
    except (FileNotFoundError, CheckpointError):
        return False


def read_state(ckpt_dir: str) -> dict:
    """The state.json of a checkpoint, after checking that every file it lists is present and whole."""
    spath = os.path.join(ckpt_dir, STATE_FILE)
    try:
        with open(spath) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir!r} is not a complete checkpoint ({STATE_FILE} missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{spath!r} is corrupt ({e}); use an earlier checkpoint") from None
    if not isinstance(state, dict) or "files" not in state or "step" not in state:
        raise CheckpointError(f"{spath!r} is not an ssmdiff checkpoint state (no 'files'/'step')")
    for fname, size in state["files"].items():
        p = os.path.join(ckpt_dir, fname)
        if not os.path.isfile(p):
            raise CheckpointError(f"checkpoint {ckpt_dir!r} is partial: {fname} is missing")
        if os.path.getsize(p) != size:
            raise CheckpointError(
                f"checkpoint {ckpt_dir!r} is corrupt: {fname} has {os.path.getsize(p)} bytes, expected {size}"
            )
    return state


def load_tensors(ckpt_dir: str, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
    """Tensors of ``<name>.safetensors`` in a checkpoint (None when the checkpoint has no such file)."""
    p = os.path.join(ckpt_dir, f"{name}.safetensors")
    if not os.path.exists(p):
        return None
    try:
        return load_file(p, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read {p!r} ({e}); the checkpoint is corrupt") from None


def load_optimizer_state(ckpt_dir: str, state: dict) -> dict | None:
    """The optimiser state dict stored in a checkpoint, or None."""
    tensors = load_tensors(ckpt_dir, "optimizer")
    if tensors is None or "optimizer" not in state:
        return None
    return unflatten_optimizer_state(tensors, state["optimizer"])


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], ckpt_dir: str = "") -> None:
    """Load full weights into ``model`` strictly; another architecture raises one CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    mismatched = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} of another shape (e.g. {k}: {tuple(weights[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(
            f"checkpoint {ckpt_dir!r} was written for another architecture: " + ", ".join(parts)
            + "; use the model/config the checkpoint was trained with"
        )
    model.load_state_dict(weights, strict=True)
