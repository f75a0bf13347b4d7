"""Multi-task architectures, their registry and the parameter-budget sizer.

A model factory is called as ``factory(input_dim=F, task_dims=(O_1, ..., O_T), width=W, **options)``
and returns an ``nn.Module`` whose ``forward`` maps a (B, F) tensor to a list of T tensors of shape
(B, O_t), one per task, raw (logits for classification). ``width`` is the model's size knob: larger
values must never give fewer trainable parameters. ``options`` come from the suite file.

Register a factory with ``@register_model("name")``; a duplicate name raises unless
``override=True``. Packages outside this project can register through the ``mtl_bench.models``
entry-point group.
"""

from models.base import MultiTaskModel
from models.registry import Registry

MODELS: Registry = Registry("model", entry_point_group="mtl_bench.models")
register_model = MODELS.register

# Importing the model modules registers the built-in models.
from models import cross_stitch, moe, ple, shared_bottom, snr  # noqa: E402
from models.budget import count_parameters, fit_budget  # noqa: E402
from models.weighting import WEIGHTINGS, register_weighting  # noqa: E402

__all__ = [
    "MODELS",
    "WEIGHTINGS",
    "MultiTaskModel",
    "count_parameters",
    "cross_stitch",
    "fit_budget",
    "moe",
    "ple",
    "register_model",
    "register_weighting",
    "shared_bottom",
    "snr",
]
