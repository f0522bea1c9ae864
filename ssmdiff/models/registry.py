"""One table of model names -> constructors, ``create_model`` and loading weights across resolutions.

Names are ``Family-Size/Patch`` ("DiS-H/2", "DiT-XL/2", "DiM-T/1") or ``Family-Size`` for DiffuSSM, which has no
patchify. Every model carries ``model.config``, a JSON-serialisable dict with which ``create_model(**config)``
rebuilds the same architecture. Models are diffusers ``ModelMixin`` s: ``save_pretrained`` / ``from_pretrained``
(see ``mixin.py``).
"""

from __future__ import annotations

import difflib
import inspect
import json

import torch
import torch.nn as nn

__all__ = ["create_model", "list_models", "adapt_state_dict", "load_weights"]


def _families():
    # Imported lazily so that importing ssmdiff.models stays cheap and a missing mixer breaks only its family.
    from .diffussm import DIFFUSSM_CONFIGS, DiffuSSM
    from .dim import DIM_CONFIGS, DiM
    from .dis import DIS_CONFIGS, DiS
    from .dit import DIT_CONFIGS, DiT

    # family -> (class, size configs, patch sizes or None, default learn_sigma)
    return {
        "DiS": (DiS, DIS_CONFIGS, (1, 2, 4), True),
        "DiffuSSM": (DiffuSSM, DIFFUSSM_CONFIGS, None, True),
        "DiM": (DiM, DIM_CONFIGS, (1, 2), False),
        "DiT": (DiT, DIT_CONFIGS, (1, 2, 4, 8), True),
    }


def list_models() -> list[str]:
    """Every registered model name."""
    names = []
    for family, (_, configs, patches, _) in _families().items():
        for size in configs:
            if patches is None:
                names.append(f"{family}-{size}")
            else:
                names.extend(f"{family}-{size}/{p}" for p in patches)
    return names


def _parse(name: str):
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string such as 'DiS-S/2', got {name!r}")
    families = _families()
    if name not in list_models():
        close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} `ssmdiff models` lists them all.")
    family, rest = name.split("-", 1)
    cls, configs, patches, default_sigma = families[family]
    size, _, patch = rest.partition("/")
    kwargs = dict(configs[size])
    if patches is not None:
        kwargs["patch_size"] = int(patch)
    return cls, kwargs, default_sigma


def create_model(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 0,
                 learn_sigma: bool | None = None, **overrides) -> nn.Module:
    """Build a registered backbone.

    input_size: side of the (square) input in pixels or latent cells; in_channels: its channels; num_classes: 0
    for an unconditional model, else the class count (a null class for guidance is added); learn_sigma: output
    2*C channels (prediction + variance interpolation); None takes the family's default (True except DiM, whose
    paper trains without it). ``overrides`` replace constructor arguments (hidden_size, depth, mixer, scan,
    drop_path_rate, class_dropout_prob, ...). The result's ``model.config`` (diffusers' frozen config: ``name`` plus
    every constructor argument) rebuilds it with ``create_model(**model.config)``; keys starting with "_" are
    ignored, so a saved config.json's content works too.
    """
    cls, kwargs, default_sigma = _parse(name)
    # A saved config.json (or a loaded model's config) carries diffusers' private keys (_class_name,
    # _diffusers_version, _name_or_path, ...): bookkeeping, not architecture.
    overrides = {k: v for k, v in overrides.items() if not k.startswith("_")}
    for arg, value in (("input_size", input_size), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0 = unconditional), got {num_classes!r}")
    if learn_sigma is None:
        learn_sigma = default_sigma
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    reserved = {"input_size", "in_channels", "num_classes", "learn_sigma"}
    unknown = set(overrides) - allowed
    if unknown:
        raise ValueError(f"{name} does not accept {sorted(unknown)}; allowed overrides: "
                         f"{sorted(allowed - reserved)}")
    kwargs.update(overrides)
    try:
        json.dumps(overrides)
    except TypeError as e:
        raise ValueError(f"model overrides must be JSON-serialisable (numbers, strings, lists): {e}") from None
    try:
        model = cls(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                    learn_sigma=bool(learn_sigma), **kwargs)
    except TypeError as e:
        if not overrides:
            raise
        # a value of the wrong type ("depth": "x") fails inside the constructor's own checks
        raise ValueError(f"{name}: an override has a value of the wrong type ({e}); overrides: "
                         f"{json.dumps(overrides)}") from None
    # model.config is diffusers' frozen config (every constructor argument); the registry name completes it.
    model._set_registry_name(name)
    return model


def adapt_state_dict(state_dict: dict, model: nn.Module) -> dict:
    """Return a copy of ``state_dict`` that loads into ``model``, resizing position tables when the checkpoint
    was trained at another resolution (bilinear over the grid; class/time/separator/padding tokens kept).

    Raises ValueError when the state dict belongs to another architecture (missing or unexpected keys, or a
    shape difference anywhere but in a position table).
    """
    if not isinstance(state_dict, dict):
        raise ValueError(f"expected a state dict (mapping name -> tensor), got {type(state_dict).__name__}")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    sd = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in sd.items()}
    target = model.state_dict()
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"these weights are for another architecture than {getattr(model, 'model_name', type(model).__name__)}"
            f": {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}). Build the model with the checkpoint's own config."
        )
    tables = set(getattr(model, "position_table_keys", lambda: [])())
    # Shape differences outside the position tables (or in a table's width) mean another architecture;
    # report those before trying to resize anything.
    for key, value in sd.items():
        want = target[key].shape
        if value.shape != want and (key not in tables or value.shape[-1] != want[-1] or value.dim() != len(want)):
            raise ValueError(
                f"these weights are for another architecture: {key} has shape {tuple(value.shape)}, the model "
                f"expects {tuple(want)} (only position tables may differ, for a change of resolution). Build the "
                f"model with the checkpoint's own config."
            )
    out = {}
    for key, value in sd.items():
        want = target[key].shape
        if value.shape == want:
            out[key] = value
            continue
        try:
            out[key] = model.resize_position_table(key, value)
        except ValueError as e:
            raise ValueError(f"these weights are for another architecture: {e}") from None
        if out[key].shape != want:
            raise ValueError(f"these weights are for another architecture: cannot resize {key} from "
                             f"{tuple(value.shape)} to {tuple(want)}")
    return out


def load_weights(model: nn.Module, state_dict: dict) -> nn.Module:
    """``model.load_state_dict`` after ``adapt_state_dict`` (strict; clear errors on another architecture)."""
    model.load_state_dict(adapt_state_dict(state_dict, model), strict=True)
    return model


def _infer_square(n: int) -> int:
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"a position table of {n} grid cells is not square")
    return side


def resize_token_table(table: torch.Tensor, num_extra: int, new_side: int) -> torch.Tensor:
    """(1, num_extra + s*s, D) -> (1, num_extra + new_side^2, D): the first ``num_extra`` rows (class/time
    tokens) are kept, the grid part is resized bilinearly."""
    from .layers import interpolate_grid_table

    grid = table[0, num_extra:]
    side = _infer_square(grid.shape[0])
    new_grid = interpolate_grid_table(grid, (side, side), (new_side, new_side))
    return torch.cat([table[0, :num_extra], new_grid], dim=0).unsqueeze(0)
