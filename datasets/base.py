"""Containers shared by every dataset adapter: task specs, in-memory splits and batch iterators.

Dimension key used across the project: B batch, N samples in a split, F input features,
T tasks, O outputs of one task head, E experts, D hidden units.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal

import torch
from torch import Tensor

TaskKind = Literal["regression", "binary", "multilabel"]
TASK_KINDS: tuple[str, ...] = ("regression", "binary", "multilabel")
SPLITS: tuple[str, ...] = ("train", "val", "test")
# Environment variable naming the root folder of the real data sets, one subfolder per data set.
DATA_DIR_ENV = "MTL_BENCH_DATA_DIR"


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task: its name, its kind (which sets loss and metric) and its head size.

    ``regression`` and ``binary`` tasks have one output; a ``multilabel`` task has one output
    per class, each a logit of that class being present.
    """

    name: str
    kind: TaskKind
    output_dim: int = 1

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(
                f"Task {self.name!r} has kind {self.kind!r}; expected one of {', '.join(TASK_KINDS)}."
            )
        if self.output_dim < 1:
            raise ValueError(f"Task {self.name!r} has output_dim {self.output_dim}; expected >= 1.")


@dataclass(frozen=True)
class Split:
    """One split held in memory.

    Attributes:
        features: (N, F) float32 inputs.
        targets: One (N, O) float32 tensor per task.
        weights: Optional (N,) float32 per-sample loss weights.
    """

    features: Tensor
    targets: tuple[Tensor, ...]
    weights: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        for index, target in enumerate(self.targets):
            if target.ndim != 2 or target.shape[0] != n:
                raise ValueError(
                    f"Target {index} has shape {tuple(target.shape)}; expected ({n}, O) to match "
                    f"features of shape {tuple(self.features.shape)}."
                )
        if self.weights is not None and self.weights.shape != (n,):
            raise ValueError(f"Weights have shape {tuple(self.weights.shape)}; expected ({n},).")

    def __len__(self) -> int:
        return self.features.shape[0]


class StreamSplit(abc.ABC):
    """A split read from disk batch by batch instead of held in memory.

    Attributes:
        feature_dim: Number of input features F.
        num_samples: Samples per epoch, or None where unknown before reading.
    """

    feature_dim: int
    num_samples: int | None

    @abc.abstractmethod
    def loader(
        self, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0
    ) -> Iterable[Batch]:
        """Return an iterable over the split's batches, laid out as :class:`TensorBatches`."""


def make_loader(
    split: "Split | StreamSplit",
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> Iterable[Batch]:
    """Return the batches of any split: sliced from memory or streamed from disk.

    ``num_workers`` applies to streamed splits only; in-memory splits need no loader processes.
    """
    if isinstance(split, StreamSplit):
        return split.loader(batch_size, shuffle, seed, num_workers)
    return TensorBatches(split, batch_size, shuffle=shuffle, seed=seed)


@dataclass(frozen=True)
class MultiTaskData:
    """A dataset ready for training: its tasks, its three splits and facts worth logging.

    Attributes:
        tasks: The tasks, in the order of the model's outputs.
        splits: ``"train"``, ``"val"`` and ``"test"`` splits.
        info: Scalar facts about the data (sizes, measured label correlation), logged with a trial.
    """

    tasks: tuple[TaskSpec, ...]
    splits: dict[str, "Split | StreamSplit"]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [name for name in SPLITS if name not in self.splits]
        if missing:
            raise ValueError(f"Dataset is missing split(s) {missing}; expected {list(SPLITS)}.")
        for name, split in self.splits.items():
            if isinstance(split, StreamSplit):
                if split.num_samples == 0:
                    raise ValueError(f"Split {name!r} is empty. Give it at least one shard.")
                continue
            if len(split) == 0:
                raise ValueError(
                    f"Split {name!r} is empty. Enlarge the data set or change the split sizes."
                )
            if len(split.targets) != len(self.tasks):
                raise ValueError(
                    f"Split {name!r} has {len(split.targets)} targets for {len(self.tasks)} tasks."
                )

    @property
    def input_dim(self) -> int:
        train = self.splits["train"]
        if isinstance(train, StreamSplit):
            return train.feature_dim
        return train.features.shape[1]

    @property
    def task_dims(self) -> tuple[int, ...]:
        return tuple(task.output_dim for task in self.tasks)


Batch = tuple[Tensor, tuple[Tensor, ...], "Tensor | None"]


def config_signature(config_class: type) -> inspect.Signature:
    """Return a factory signature with ``seed`` and one keyword per field of ``config_class``.

    Suite validation reads a factory's signature to name unknown parameters before a sweep
    starts, so adapters whose factory takes ``**params`` assign this to ``__signature__``.
    """
    fields = [
        inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default)
        for field in dataclasses.fields(config_class)
    ]
    return inspect.Signature(
        [inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0), *fields]
    )


def config_from_params(config_class: type, params: dict[str, Any], dataset: str) -> Any:
    """Build ``config_class`` from suite parameters, naming the valid ones when one is unknown."""
    valid = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise TypeError(
            f"Unknown {dataset} parameter(s) {unknown}. Valid parameters are {sorted(valid)}."
        )
    return config_class(**params)


class TensorBatches:
    """Iterate over a :class:`Split` in batches sliced from its tensors.

    Shuffling permutes the split once per epoch with one gather, so every batch after that is a
    view: no sample is copied one at a time.

    Args:
        split: The data to iterate over.
        batch_size: Samples per batch; the last batch may be smaller.
        shuffle: Whether to draw a new permutation at the start of every epoch.
        seed: Seed of the permutation stream, so runs with the same seed see the same order.

    Example:
        >>> split = Split(torch.arange(10.0).reshape(5, 2), (torch.zeros(5, 1),))
        >>> [x.shape[0] for x, _, _ in TensorBatches(split, batch_size=2)]
        [2, 2, 1]
    """

    def __init__(self, split: Split, batch_size: int, shuffle: bool = False, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        features, targets, weights = self.split.features, self.split.targets, self.split.weights
        if self.shuffle:
            order = torch.randperm(len(self.split), generator=self._generator)
            features = features[order]
            targets = tuple(target[order] for target in targets)
            weights = None if weights is None else weights[order]

        for start in range(0, len(self.split), self.batch_size):
            stop = start + self.batch_size
            batch_weights = None if weights is None else weights[start:stop]
            yield features[start:stop], tuple(t[start:stop] for t in targets), batch_weights
