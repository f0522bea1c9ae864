"""Diffusers integration of the backbones: every backbone is a ``ModelMixin, ConfigMixin``.

``model.config`` is diffusers' frozen config: every constructor argument plus ``name``, the registry name
("DiS-S/2"). That one dict serves both worlds: ``save_pretrained`` writes it to config.json (with diffusers'
private ``_class_name`` / ``_diffusers_version``), and ``create_model(**model.config)`` rebuilds the architecture
(``create_model`` ignores the private ``_``-prefixed keys).
"""

from __future__ import annotations

import json
import os

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import FrozenDict

__all__ = ["SSMDiffModelMixin", "read_model_config", "load_model", "backbone_classes"]

CONFIG_FILE = "config.json"


class SSMDiffModelMixin(ModelMixin, ConfigMixin):
    """Base of the four backbone families: diffusers save/load with safetensors and a clear error when a folder
    holds another architecture."""

    config_name = CONFIG_FILE
    # Activation checkpointing is ssmdiff's own (``set_grad_checkpointing``), not diffusers' hook-based one.
    _supports_gradient_checkpointing = False

    def _set_registry_name(self, name: str) -> None:
        """Record the registry name and drop diffusers' ``_use_default_values`` bookkeeping, so the config lists
        every argument explicitly (a rebuilt model then has the identical config)."""
        cfg = {k: v for k, v in self._internal_dict.items() if k != "_use_default_values"}
        cfg["name"] = name
        self._internal_dict = FrozenDict(cfg)
        self.model_name = name

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # "name" is not a constructor argument: keep it out of diffusers' "unexpected attribute" warning and hand
        # it back as a hidden entry, which from_config registers on the new model.
        config_dict = dict(config_dict)
        name = config_dict.pop("name", None)
        init_dict, unused, hidden = super().extract_init_dict(config_dict, **kwargs)
        if name is not None:
            hidden["name"] = name
            unused.pop("name", None)
        return init_dict, unused, hidden

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder written by ``save_pretrained`` (local only: nothing is downloaded).

        Raises FileNotFoundError when the folder has no config.json and ValueError when it holds another
        backbone family than ``cls``.
        """
        subfolder = kwargs.get("subfolder")
        folder = str(pretrained_model_name_or_path)
        if subfolder:
            folder = os.path.join(folder, subfolder)
        cfg = read_model_config(folder)
        found = cfg.get("_class_name")
        if cls is not SSMDiffModelMixin and found != cls.__name__:
            raise ValueError(
                f"{folder} holds a {found} model ({cfg.get('name', 'unnamed')}), not a {cls.__name__}: load it "
                f"with ssmdiff.models.load_model({folder!r}) or {found}.from_pretrained"
            )
        if cls is SSMDiffModelMixin:
            return backbone_classes()[found].from_pretrained(pretrained_model_name_or_path, **kwargs)
        kwargs.setdefault("local_files_only", True)
        # Build the model normally (not on the meta device): DiM keeps non-persistent scan-order buffers that
        # exist only once __init__ has run.
        kwargs["low_cpu_mem_usage"] = False
        model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model.model_name = model.config.get("name")
        return model


def backbone_classes() -> dict[str, type]:
    """Class name -> backbone class (imported lazily, like the registry)."""
    from .diffussm import DiffuSSM
    from .dim import DiM
    from .dis import DiS
    from .dit import DiT

    return {c.__name__: c for c in (DiS, DiffuSSM, DiM, DiT)}


def read_model_config(folder: str) -> dict:
    """The config.json of a saved backbone folder, checked to be an ssmdiff backbone."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a saved ssmdiff model: it has no {CONFIG_FILE} (write one with "
                                f"model.save_pretrained or `ssmdiff export`)")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    classes = backbone_classes()
    if not isinstance(cfg, dict) or cfg.get("_class_name") not in classes:
        found = cfg.get("_class_name") if isinstance(cfg, dict) else None
        raise ValueError(f"{folder} holds a {found or 'non-diffusers'} model, not an ssmdiff backbone "
                         f"({', '.join(classes)})")
    return cfg


def load_model(path: str, **kwargs):
    """Load any saved ssmdiff backbone folder (a model folder, or a pipeline folder's ``transformer/``).

    ``kwargs`` go to diffusers' ``from_pretrained`` (e.g. ``torch_dtype``). The model is returned in eval mode.
    """
    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no model folder at {path}")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(
            os.path.join(path, "transformer", CONFIG_FILE)):
        path = os.path.join(path, "transformer")  # a whole pipeline folder: take its backbone
    cfg = read_model_config(path)
    return backbone_classes()[cfg["_class_name"]].from_pretrained(path, **kwargs).eval()
