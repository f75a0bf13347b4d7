"""YouTube-8M metrics for multi-label classification, accumulated batch by batch.

The definitions follow ``eval_util.py`` and ``average_precision_calculator.py`` of the
YouTube-8M starter code (https://github.com/google/youtube-8m), for C classes:

- Hit@1: the fraction of videos whose highest-scoring class is a true label.
- PERR, precision at equal recall rate: for a video with k true labels, the precision of its k
  highest-scoring classes, averaged over videos.
- GAP@20, global average precision: the 20 highest-scoring classes of every video are pooled
  into one list of (score, label) pairs and sorted by score. GAP is the average precision of
  that list, with the number of all true labels as recall denominator, including those outside
  every video's top 20, so a label missed by the top 20 lowers the score.
- mAP: the average precision of each class over all videos, averaged over the classes with at
  least one positive. A class without positives has no defined AP and is left out.

Differences from the starter code, all chosen for per-task evaluation, where many videos have
no label in a task:

- Videos without labels are left out of Hit@1 and PERR (``unlabeled="skip"``, the default),
  because neither is defined for them. The starter code counts each of them as 0 in both; pass
  ``unlabeled="zero"`` to do the same. Both settings keep them in GAP and mAP, where their
  predictions are false positives.
- PERR takes the top k classes whatever their score. The starter code counts a hit only when
  its score is > 0, which matters for logits but not for sigmoid probabilities.
- A metric with nothing to average (no labelled video, no positive) is NaN, not 0.
- Equal scores are ranked by class index within a video and by arrival order across videos.
  The starter code leaves the order of equal scores to ``numpy.argpartition``.

Memory: Hit@1 and PERR keep two numbers. GAP keeps ``top_k`` (score, label) pairs per video,
five bytes each. Exact mAP keeps every score and label, five bytes per video and class. With
``map_top_n``, mAP keeps only the ``map_top_n`` highest scores per class, as the starter code's
``top_n`` option does. It then reports the AP at n over those scores, with
``min(positives, n)`` as recall denominator.

MLflow rejects ``@`` in metric names, so the metrics are reported under these keys:

======== =========
Metric   Key
======== =========
Hit@1    hit_at_1
PERR     perr
GAP@20   gap_at_20
mAP      map
======== =========

:func:`mlflow_metric_name` applies the same mapping to any name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

UNLABELED_MODES = ("skip", "zero")
# Names as the YouTube-8M evaluation prints them, and the keys reported here.
METRIC_KEYS: dict[str, str] = {
    "Hit@1": "hit_at_1",
    "PERR": "perr",
    "GAP@20": "gap_at_20",
    "mAP": "map",
}
# Number of classes whose AP `compute` computes together, which bounds its (N, classes) arrays.
_CLASS_BLOCK = 64


class MultiLabelMetrics:
    """Hit@1, PERR, GAP@k and mAP of multi-label scores, updated one batch at a time.

    Args:
        num_classes: C, the number of classes scored.
        top_k: Predictions per video pooled into GAP; the key is ``gap_at_{top_k}``.
        map_top_n: None for exact mAP over all scores, or the number of highest scores kept per
            class (bounded memory, AP at n).
        unlabeled: ``"skip"`` leaves videos without labels out of Hit@1 and PERR; ``"zero"``
            counts them as 0, as the starter code does.

    Example:
        >>> metrics = MultiLabelMetrics(num_classes=3)
        >>> metrics.update(torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[1.0, 0.0, 0.0]]))
        >>> metrics.compute()
        {'hit_at_1': 1.0, 'perr': 1.0, 'gap_at_20': 1.0, 'map': 1.0}
    """

    def __init__(
        self,
        num_classes: int,
        top_k: int = 20,
        map_top_n: int | None = None,
        unlabeled: str = "skip",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}.")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k!r}.")
        if map_top_n is not None and map_top_n < 1:
            raise ValueError(f"map_top_n must be >= 1 or None, got {map_top_n!r}.")
        if unlabeled not in UNLABELED_MODES:
            raise ValueError(f"unlabeled must be one of {UNLABELED_MODES}, got {unlabeled!r}.")
        self.num_classes = num_classes
        self.top_k = top_k
        self.map_top_n = map_top_n
        self.unlabeled = unlabeled
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.num_videos = 0
        self.num_videos_without_labels = 0
        self._hits = 0.0
        self._precision_sum = 0.0
        self._counted_videos = 0
        self._total_labels = 0
        self._gap_scores: list[np.ndarray] = []
        self._gap_labels: list[np.ndarray] = []
        self._class_positives = np.zeros(self.num_classes, dtype=np.int64)
        self._map_scores: list[np.ndarray] = []
        self._map_labels: list[np.ndarray] = []
        # With map_top_n: the highest scores per class so far and their labels, (n, C) each.
        self._top_scores = np.empty((0, self.num_classes), dtype=np.float32)
        self._top_labels = np.empty((0, self.num_classes), dtype=bool)

    def update(self, scores: Tensor, labels: Tensor) -> None:
        """Add a batch of (B, C) scores and (B, C) labels, where a label > 0 is a positive.

        Scores may be probabilities or logits: every metric depends only on their order.
        """
        scores_np, labels_np = self._as_arrays(scores, labels)
        if scores_np.shape[0] == 0:
            return
        label_counts = labels_np.sum(axis=1)  # (B,)
        self.num_videos += scores_np.shape[0]
        self.num_videos_without_labels += int((label_counts == 0).sum())
        self._total_labels += int(label_counts.sum())

        order = np.argsort(-scores_np, axis=1, kind="stable")  # (B, C), best first
        sorted_labels = np.take_along_axis(labels_np, order, axis=1)  # (B, C)
        self._update_hit_and_perr(sorted_labels, label_counts)
        self._update_gap(scores_np, order, sorted_labels)
        self._update_map(scores_np, labels_np)

    def compute(self) -> dict[str, float]:
        """Return the metrics over all updates since the last reset."""
        counted = self._counted_videos
        return {
            "hit_at_1": self._hits / counted if counted else math.nan,
            "perr": self._precision_sum / counted if counted else math.nan,
            f"gap_at_{self.top_k}": self._gap(),
            "map": self._mean_average_precision(),
        }

    def _as_arrays(self, scores: Tensor, labels: Tensor) -> tuple[np.ndarray, np.ndarray]:
        if scores.ndim != 2 or scores.shape[1] != self.num_classes:
            raise ValueError(
                f"scores have shape {tuple(scores.shape)}; expected (batch, {self.num_classes})."
            )
        if labels.shape != scores.shape:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)}; expected {tuple(scores.shape)} to "
                f"match the scores."
            )
        scores_np = scores.detach().to("cpu", torch.float32).numpy()
        labels_np = labels.detach().cpu().numpy() > 0
        return scores_np, labels_np

    def _update_hit_and_perr(self, sorted_labels: np.ndarray, label_counts: np.ndarray) -> None:
        labelled = label_counts > 0
        self._hits += float(sorted_labels[labelled, 0].sum())

        # Precision of the top k classes of each labelled video, with k its number of labels.
        hits_in_top = np.cumsum(sorted_labels[labelled], axis=1)  # (B_labelled, C)
        k = label_counts[labelled]
        top_k_hits = hits_in_top[np.arange(k.size), k - 1]
        self._precision_sum += float((top_k_hits / k).sum())

        self._counted_videos += int(labelled.sum() if self.unlabeled == "skip" else labelled.size)

    def _update_gap(self, scores: np.ndarray, order: np.ndarray, sorted_labels: np.ndarray) -> None:
        top = order[:, : self.top_k]  # (B, k)
        self._gap_scores.append(np.take_along_axis(scores, top, axis=1).ravel())
        self._gap_labels.append(sorted_labels[:, : self.top_k].ravel())

    def _update_map(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self._class_positives += labels.sum(axis=0)
        if self.map_top_n is None:
            self._map_scores.append(scores)
            self._map_labels.append(labels)
            return

        merged_scores = np.concatenate([self._top_scores, scores])  # (n + B, C)
        merged_labels = np.concatenate([self._top_labels, labels])
        if merged_scores.shape[0] > self.map_top_n:
            # Stable sort, so that equal scores keep their arrival order, as in the exact mode.
            keep = np.argsort(-merged_scores, axis=0, kind="stable")[: self.map_top_n]  # (n, C)
            merged_scores = np.take_along_axis(merged_scores, keep, axis=0)
            merged_labels = np.take_along_axis(merged_labels, keep, axis=0)
        self._top_scores, self._top_labels = merged_scores, merged_labels

    def _gap(self) -> float:
        if not self._total_labels:
            return math.nan
        scores = np.concatenate(self._gap_scores)
        labels = np.concatenate(self._gap_labels)
        order = np.argsort(-scores, kind="stable")
        return average_precision(labels[order], self._total_labels)

    def _mean_average_precision(self) -> float:
        if self.map_top_n is None:
            if not self._map_scores:
                return math.nan
            scores = np.concatenate(self._map_scores)
            labels = np.concatenate(self._map_labels)
            denominators = self._class_positives
        else:
            scores, labels = self._top_scores, self._top_labels
            denominators = np.minimum(self._class_positives, self.map_top_n)

        with_positives = np.flatnonzero(self._class_positives > 0)
        if with_positives.size == 0:
            return math.nan
        precisions = []
        for start in range(0, with_positives.size, _CLASS_BLOCK):
            classes = with_positives[start : start + _CLASS_BLOCK]
            order = np.argsort(-scores[:, classes], axis=0, kind="stable")  # (N, block)
            sorted_labels = np.take_along_axis(labels[:, classes], order, axis=0)
            precisions.append(column_average_precision(sorted_labels, denominators[classes]))
        return float(np.concatenate(precisions).mean())


def average_precision(sorted_labels: np.ndarray, num_positives: int) -> float:
    """Return the AP of labels sorted by descending score, given all positives of the problem.

    AP is the sum of the precision at the rank of each positive found, divided by
    ``num_positives``, which may exceed the positives in ``sorted_labels``.
    """
    hits = np.cumsum(sorted_labels)
    ranks = np.arange(1, sorted_labels.size + 1)
    return float((hits / ranks)[sorted_labels].sum() / num_positives)


def column_average_precision(sorted_labels: np.ndarray, num_positives: np.ndarray) -> np.ndarray:
    """Return :func:`average_precision` of each column of an (N, K) array of sorted labels."""
    hits = np.cumsum(sorted_labels, axis=0)  # (N, K)
    ranks = np.arange(1, sorted_labels.shape[0] + 1)[:, None]  # (N, 1)
    return np.where(sorted_labels, hits / ranks, 0.0).sum(axis=0) / num_positives


# Metric names for MLflow.

# Characters kept as they are: the ASCII subset of what MLflow 3 accepts on every platform
# (its `validate_param_and_metric_name` also allows other Unicode word characters, and colons
# except on Windows).
_SAFE_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. ")
MAX_METRIC_NAME_LENGTH = 250  # MLflow's MAX_ENTITY_KEY_LENGTH


def mlflow_metric_name(name: str) -> str:
    """Map a metric name to one MLflow accepts.

    The name is taken as ``/``-separated parts. A part listed in :data:`METRIC_KEYS` becomes its
    key (``GAP@20`` to ``gap_at_20``). In other parts, ``@`` becomes ``_at_`` and any other
    character MLflow may reject becomes ``_u`` plus its four or more hex digits and ``_``.
    Valid names are returned unchanged, so two names can map to one (``a@b`` and ``a_at_b``):
    check a set of names with :func:`mlflow_metric_names`.

    Raises:
        ValueError: If the name is empty, has an empty, ``.`` or ``..`` part (MLflow treats
            names as paths and rejects these), or maps to more than 250 characters.

    Example:
        >>> mlflow_metric_name("val/arts_and_entertainment/GAP@20")
        'val/arts_and_entertainment/gap_at_20'
    """
    parts = name.split("/")
    if not name or any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"Metric name {name!r} is empty or has an empty, '.' or '..' part between slashes, "
            f"which MLflow rejects. Name the metric like 'stage/task/metric'."
        )
    mapped = "/".join(METRIC_KEYS.get(part) or _escape(part) for part in parts)
    if len(mapped) > MAX_METRIC_NAME_LENGTH:
        raise ValueError(
            f"Metric name {name!r} maps to {len(mapped)} characters; MLflow accepts at most "
            f"{MAX_METRIC_NAME_LENGTH}. Use a shorter task or metric name."
        )
    return mapped


def _escape(part: str) -> str:
    pieces = []
    for character in part:
        if character in _SAFE_CHARACTERS:
            pieces.append(character)
        elif character == "@":
            pieces.append("_at_")
        else:
            pieces.append(f"_u{ord(character):04x}_")
    return "".join(pieces)


def mlflow_metric_names(names: Iterable[str]) -> dict[str, str]:
    """Map each name with :func:`mlflow_metric_name`, checking that no two share a result.

    Raises:
        ValueError: If two different names map to the same MLflow name.
    """
    mapping: dict[str, str] = {}
    owners: dict[str, str] = {}
    for name in names:
        mapped = mlflow_metric_name(name)
        owner = owners.setdefault(mapped, name)
        if owner != name:
            raise ValueError(
                f"Metric names {owner!r} and {name!r} both map to the MLflow name {mapped!r}. "
                f"Rename one of them."
            )
        mapping[name] = mapped
    return mapping
