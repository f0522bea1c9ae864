"""Diffusion backbones on one call, ``model(x, t, y=None)``: DiS, DiffuSSM, DiM (state-space) and DiT (attention).

``create_model("DiS-S/2", input_size=32, in_channels=3)`` builds one by name; ``list_models()`` lists the names;
``count_flops`` / ``model_table`` give honest Gflops (selective scans and S4D convolutions included);
``adapt_state_dict`` loads weights trained at another resolution. Every backbone is a diffusers ``ModelMixin``:
``model.save_pretrained(folder)`` writes config.json + safetensors and ``load_model(folder)`` loads any of them.
"""

from .flops import count_flops, count_params, format_table, model_table
from .mixin import SSMDiffModelMixin, load_model
from .registry import adapt_state_dict, create_model, list_models, load_weights

__all__ = [
    "create_model",
    "list_models",
    "count_flops",
    "count_params",
    "model_table",
    "format_table",
    "adapt_state_dict",
    "load_weights",
    "load_model",
    "SSMDiffModelMixin",
]
