"""Tests of the YouTube-8M metrics against values worked out by hand and plain-loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from models.multilabel_metrics import (
    MultiLabelMetrics,
    mlflow_metric_name,
    mlflow_metric_names,
)

# Three videos, four classes, no equal scores within a class or in the pooled list.
SCORES = torch.tensor(
    [
        [0.90, 0.80, 0.10, 0.30],
        [0.20, 0.70, 0.60, 0.05],
        [0.50, 0.40, 0.35, 0.25],
    ]
)
LABELS = torch.tensor(
    [
        [0.0, 1.0, 0.0, 1.0],
        [0.0, 0.0, 1.0, 0.0],
        [1.0, 0.0, 0.0, 0.0],
    ]
)
# A fourth video without labels; its 0.95 for class 2 outranks every other score.
UNLABELED_SCORES = torch.tensor([[0.15, 0.12, 0.95, 0.13]])
UNLABELED_LABELS = torch.zeros(1, 4)


def metrics_of(scores: torch.Tensor, labels: torch.Tensor, **kwargs) -> dict[str, float]:
    metrics = MultiLabelMetrics(num_classes=scores.shape[1], **kwargs)
    metrics.update(scores, labels)
    return metrics.compute()


def test_hand_computed_example() -> None:
    result = metrics_of(SCORES, LABELS)

    # Top classes 0, 1, 0: only video 2's (class 0) is a label.
    assert result["hit_at_1"] == pytest.approx(1 / 3)
    # Video 0: top 2 = {0, 1}, one label, 1/2. Video 1: top 1 = {1}, 0. Video 2: top 1 = {0}, 1.
    assert result["perr"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    # Pooled and sorted: .9- .8+ .7- .6+ .5+ .4- .35- .3+ .25- .2- .1- .05-, 4 positives at
    # ranks 2, 4, 5 and 8.
    assert result["gap_at_20"] == pytest.approx((1 / 2 + 2 / 4 + 3 / 5 + 4 / 8) / 4)
    # Class 0: its positive (.5) ranks second behind .9, AP 1/2. Classes 1, 2, 3: positive first.
    assert result["map"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert set(result) == {"hit_at_1", "perr", "gap_at_20", "map"}


@pytest.mark.parametrize(
    ("top_k", "expected"),
    [
        # Top 1 per video: .9-, .7-, .5+. One of the 4 labels found, at rank 3.
        (1, (1 / 3) / 4),
        # Top 2 per video: .9- .8+ .7- .6+ .5+ .4-, positives at ranks 2, 4 and 5.
        (2, (1 / 2 + 2 / 4 + 3 / 5) / 4),
    ],
)
def test_gap_counts_labels_outside_top_k(top_k: int, expected: float) -> None:
    result = metrics_of(SCORES, LABELS, top_k=top_k)
    assert result[f"gap_at_{top_k}"] == pytest.approx(expected)


def test_unlabeled_video_skipped_or_zero() -> None:
    scores = torch.cat([SCORES, UNLABELED_SCORES])
    labels = torch.cat([LABELS, UNLABELED_LABELS])

    skipped = metrics_of(scores, labels)
    zero = metrics_of(scores, labels, unlabeled="zero")

    assert skipped["hit_at_1"] == pytest.approx(1 / 3)
    assert skipped["perr"] == pytest.approx(1.5 / 3)
    assert zero["hit_at_1"] == pytest.approx(1 / 4)
    assert zero["perr"] == pytest.approx(1.5 / 4)
    # Both keep the video in GAP and mAP. Its .95 heads the pooled list, so the positives move
    # to ranks 3, 5, 6 and 9; in class 2 it outranks the positive (.6), whose AP drops to 1/2.
    for result in (skipped, zero):
        assert result["gap_at_20"] == pytest.approx((1 / 3 + 2 / 5 + 3 / 6 + 4 / 9) / 4)
        assert result["map"] == pytest.approx((0.5 + 1 + 0.5 + 1) / 4)


def test_counts_videos_without_labels() -> None:
    metrics = MultiLabelMetrics(num_classes=4)
    metrics.update(torch.cat([SCORES, UNLABELED_SCORES]), torch.cat([LABELS, UNLABELED_LABELS]))

    assert metrics.num_videos == 4
    assert metrics.num_videos_without_labels == 1


def test_map_top_n() -> None:
    # Keeping the top score per class: class 0 keeps .9 (negative), AP 0; the others keep their
    # positive, AP 1 with min(1 positive, n=1) as denominator.
    result = metrics_of(SCORES, LABELS, map_top_n=1)
    assert result["map"] == pytest.approx(0.75)


def test_map_skips_classes_without_positives() -> None:
    labels = LABELS.clone()
    labels[:, 3] = 0  # class 3 loses its only positive
    result = metrics_of(SCORES, labels)
    assert result["map"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_no_labels_gives_nan() -> None:
    result = metrics_of(SCORES, torch.zeros_like(SCORES))
    assert all(math.isnan(value) for value in result.values())

    empty = MultiLabelMetrics(num_classes=4).compute()
    assert all(math.isnan(value) for value in empty.values())


def test_batches_give_same_result_as_one_update() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 7, generator=generator)
    labels = (torch.rand(50, 7, generator=generator) < 0.3).float()
    whole = metrics_of(scores, labels)

    for map_top_n in (None, 10):
        split = MultiLabelMetrics(num_classes=7, map_top_n=map_top_n)
        for chunk in range(0, 50, 8):
            split.update(scores[chunk : chunk + 8], labels[chunk : chunk + 8])
        single_update = metrics_of(scores, labels, map_top_n=map_top_n)
        assert split.compute() == pytest.approx(single_update)
    assert metrics_of(scores, labels, map_top_n=50)["map"] == pytest.approx(whole["map"])


def test_reset_forgets_updates() -> None:
    metrics = MultiLabelMetrics(num_classes=4)
    metrics.update(1 - SCORES, LABELS)
    metrics.reset()
    metrics.update(SCORES, LABELS)
    assert metrics.compute() == pytest.approx(metrics_of(SCORES, LABELS))


# References written as plain loops over the definitions.


def reference_hit_and_perr(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    hits, precisions, videos = 0.0, 0.0, 0
    for row_scores, row_labels in zip(scores, labels):
        k = int(row_labels.sum())
        if k == 0:
            continue
        ranked = sorted(range(len(row_scores)), key=lambda c: -row_scores[c])
        hits += row_labels[ranked[0]]
        precisions += sum(row_labels[c] for c in ranked[:k]) / k
        videos += 1
    return hits / videos, precisions / videos


def reference_gap(scores: np.ndarray, labels: np.ndarray, top_k: int) -> float:
    pooled = []
    for row_scores, row_labels in zip(scores, labels):
        ranked = sorted(range(len(row_scores)), key=lambda c: -row_scores[c])[:top_k]
        pooled.extend((row_scores[c], row_labels[c]) for c in ranked)
    pooled.sort(key=lambda pair: -pair[0])
    found, total = 0, 0.0
    for rank, (_, label) in enumerate(pooled, start=1):
        if label:
            found += 1
            total += found / rank
    return total / labels.sum()


def test_matches_references_on_random_scores() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random((300, 40)).astype(np.float32)
    labels = (rng.random((300, 40)) < 0.05).astype(np.float32)
    labels[rng.random(300) < 0.2] = 0  # some videos without labels

    metrics = MultiLabelMetrics(num_classes=40, top_k=5)
    for start in range(0, 300, 64):
        metrics.update(
            torch.from_numpy(scores[start : start + 64]),
            torch.from_numpy(labels[start : start + 64]),
        )
    result = metrics.compute()

    hit, perr = reference_hit_and_perr(scores, labels)
    assert result["hit_at_1"] == pytest.approx(hit)
    assert result["perr"] == pytest.approx(perr)
    assert result["gap_at_5"] == pytest.approx(reference_gap(scores, labels, 5))
    with_positives = labels.sum(axis=0) > 0
    sklearn_aps = [
        average_precision_score(labels[:, c], scores[:, c]) for c in np.flatnonzero(with_positives)
    ]
    assert result["map"] == pytest.approx(np.mean(sklearn_aps))


def test_logits_and_probabilities_agree() -> None:
    logits = torch.logit(SCORES)
    assert metrics_of(logits, LABELS) == pytest.approx(metrics_of(SCORES, LABELS))


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 3), r"expected \(batch, 4\)"),
        (torch.zeros(2, 4), torch.zeros(2, 3), r"labels have shape \(2, 3\); expected \(2, 4\)"),
        (torch.zeros(4), torch.zeros(4), r"scores have shape \(4,\)"),
    ],
)
def test_update_rejects_wrong_shapes(scores, labels, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultiLabelMetrics(num_classes=4).update(scores, labels)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, "num_classes must be >= 1"),
        ({"num_classes": 3, "top_k": 0}, "top_k must be >= 1"),
        ({"num_classes": 3, "map_top_n": 0}, "map_top_n must be >= 1 or None"),
        ({"num_classes": 3, "unlabeled": "drop"}, "unlabeled must be one of"),
    ],
)
def test_invalid_arguments(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultiLabelMetrics(**kwargs)


# MLflow names.


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Hit@1", "hit_at_1"),
        ("PERR", "perr"),
        ("GAP@20", "gap_at_20"),
        ("mAP", "map"),
        ("val/games/GAP@20", "val/games/gap_at_20"),
        ("val/games/auc", "val/games/auc"),
        ("recall@5", "recall_at_5"),
        ("loss (train)", "loss _u0028_train_u0029_"),
        ("précision", "pr_u00e9_cision"),
        ("x:y", "x_u003a_y"),
    ],
)
def test_mlflow_metric_name(name: str, expected: str) -> None:
    assert mlflow_metric_name(name) == expected


def test_mlflow_accepts_mapped_names() -> None:
    validation = pytest.importorskip("mlflow.utils.validation")
    for name in ("Hit@1", "val/arts_and_entertainment/GAP@20", "a#b%c", "x:y", "ünï cödé"):
        validation._validate_metric_name(mlflow_metric_name(name))


@pytest.mark.parametrize("name", ["", "/a", "a/", "a//b", "a/./b", "../a"])
def test_mlflow_metric_name_rejects_path_like_names(name: str) -> None:
    with pytest.raises(ValueError, match="empty, '.' or '..' part"):
        mlflow_metric_name(name)


def test_mlflow_metric_name_rejects_long_names() -> None:
    with pytest.raises(ValueError, match="at most 250"):
        mlflow_metric_name("@" * 63)


def test_mlflow_metric_names_distinct() -> None:
    names = [
        f"{stage}/{task}/{metric}"
        for stage in ("train", "val", "test")
        for task in ("games", "autos_and_vehicles")
        for metric in (
            "Hit@1",
            "PERR",
            "GAP@20",
            "mAP",
            "GAP@10",
            "auc",
            "x y",
            "x-y",
            "x.y",
            "x_y",
        )
    ]
    mapping = mlflow_metric_names(names)
    assert len(set(mapping.values())) == len(names)


@pytest.mark.parametrize(
    "pair",
    [("a@b", "a_at_b"), ("val/Hit@1", "val/hit_at_1"), ("x#", "x_u0023_")],
)
def test_mlflow_metric_names_collision_raises(pair: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="both map to the MLflow name"):
        mlflow_metric_names(pair)
