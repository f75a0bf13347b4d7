"""Dataset adapters and their registry.

A dataset factory is called as ``factory(seed=..., **params)`` with the parameters of a suite's
dataset section and returns a :class:`datasets.base.MultiTaskData`. Register one with
``@register_dataset("name")``; packages outside this project can also register through the
``mtl_bench.datasets`` entry-point group.
"""

from datasets.base import MultiTaskData, Split, StreamSplit, TaskSpec, TensorBatches
from models.registry import Registry

DATASETS: Registry = Registry("dataset", entry_point_group="mtl_bench.datasets")
register_dataset = DATASETS.register

from datasets import census, synthetic, youtube8m  # noqa: E402  (registers the built-in adapters)

__all__ = [
    "DATASETS",
    "MultiTaskData",
    "Split",
    "StreamSplit",
    "TaskSpec",
    "TensorBatches",
    "census",
    "register_dataset",
    "synthetic",
    "youtube8m",
]
