"""The Lightning wrapper: losses, epoch-level metrics and model selection on validation."""

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from datasets import Split, TaskSpec, TensorBatches
from models.lightning import (
    GateStatistics, MultiTaskModule, SingleClassWarning, roc_auc, task_loss,
)
from models.moe import mmoe
from models.shared_bottom import SharedBottom


def auc_by_pair_counting(labels, scores):
    positives = [s for s, y in zip(scores, labels) if y == 1]
    negatives = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = rng.normal(size=60) + labels
    assert roc_auc(labels, scores, "t") == pytest.approx(auc_by_pair_counting(labels, scores))


def test_single_class_gives_nan_and_warning():
    with pytest.warns(SingleClassWarning, match="'clicks'.*only one class"):
        value = roc_auc(np.ones(5), np.arange(5.0), "clicks")
    assert math.isnan(value)


def test_weighted_loss():
    task = TaskSpec("t", "regression")
    output, target = torch.tensor([[1.0], [3.0]]), torch.zeros(2, 1)
    assert task_loss(task, output, target, None).item() == pytest.approx(5.0)
    weights = torch.tensor([3.0, 1.0])
    assert task_loss(task, output, target, weights).item() == pytest.approx((3 + 9) / 4)


def test_binary_loss_is_bce_on_logits():
    task = TaskSpec("t", "binary")
    logits, target = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [0.0]])
    by_hand = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert task_loss(task, logits, target, None).item() == pytest.approx(by_hand, rel=1e-6)


class FixedScores(torch.nn.Module):
    """Returns the input's first column as the logit of one binary task."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return [x[:, :1] + 0 * self.unused]


def test_auc_over_epoch_not_batches():
    # Batch 1 contains scores that rank well only against batch 2, so per-batch AUCs differ from
    # the AUC of the epoch.
    scores = torch.tensor([0.1, 0.2, 0.9, 0.8, 0.3, 0.7, 0.4, 0.6])
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    split = Split(scores.reshape(-1, 1), (labels.reshape(-1, 1),))
    module = MultiTaskModule(FixedScores(), [TaskSpec("t", "binary")])
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    trainer.test(module, dataloaders=TensorBatches(split, batch_size=4), verbose=False)

    expected = auc_by_pair_counting(labels.tolist(), scores.tolist())
    batch_means = np.mean([
        auc_by_pair_counting(labels[i:i + 4].tolist(), scores[i:i + 4].tolist()) for i in (0, 4)
    ])
    assert module.test_metrics["test/t/auc"] == pytest.approx(expected)
    assert expected != pytest.approx(batch_means)


def test_fit_reports_epoch_metrics():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    split = Split(x, (x[:, :1] * 2, (x[:, 1:2] > 0).float()))
    tasks = [TaskSpec("reg", "regression"), TaskSpec("cls", "binary")]
    module = MultiTaskModule(SharedBottom(3, (1, 1), width=8), tasks, learning_rate=0.01)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, TensorBatches(split, 16, shuffle=True), TensorBatches(split, 64))
    metrics = module.epoch_metrics
    for key in ("train/loss", "train/reg/loss", "train/cls/loss", "val/reg/mse", "val/cls/auc",
                "val/selection_score"):
        assert key in metrics
        assert math.isfinite(metrics[key])
    assert metrics["val/selection_score"] == pytest.approx(
        (metrics["val/cls/auc"] - metrics["val/reg/mse"]) / 2
    )


def test_wrong_number_of_outputs_explained():
    module = MultiTaskModule(FixedScores(), [TaskSpec("a", "binary"), TaskSpec("b", "binary")])
    batch = (torch.zeros(2, 1), (torch.zeros(2, 1), torch.zeros(2, 1)), None)
    with pytest.raises(ValueError, match="returned 1 outputs for 2 tasks"):
        module.training_step(batch, 0)


def test_gate_statistics_by_hand():
    tasks = [TaskSpec("a", "binary"), TaskSpec("b", "binary")]
    statistics = GateStatistics(tasks)
    # Two batches; task a picks expert 0 then splits evenly, task b is uniform over 2 experts.
    statistics.update(torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]))
    statistics.update(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
    metrics = statistics.compute()
    assert metrics == pytest.approx({
        "routing/a/expert_0": 0.75, "routing/a/expert_1": 0.25,
        "routing/a/gate_entropy": (0.0 + math.log(2)) / 2,
        "routing/b/expert_0": 0.5, "routing/b/expert_1": 0.5,
        "routing/b/gate_entropy": math.log(2),
    })


def test_mixture_gates_logged_every_epoch_and_on_test():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    split = Split(x, (x[:, :1] * 2, (x[:, 1:2] > 0).float()))
    tasks = [TaskSpec("reg", "regression"), TaskSpec("cls", "binary")]
    model = mmoe(3, (1, 1), width=4, num_experts=3)
    module = MultiTaskModule(model, tasks, learning_rate=0.01)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, TensorBatches(split, 16, shuffle=True), TensorBatches(split, 64))
    trainer.test(module, TensorBatches(split, 64), verbose=False)

    with torch.no_grad():
        expected = model.gate_weights(x).mean(dim=0)  # (T, E)
    for metrics in (module.epoch_metrics, module.test_routing):
        for t, task in enumerate(("reg", "cls")):
            values = [metrics[f"routing/{task}/expert_{e}"] for e in range(3)]
            assert values == pytest.approx(expected[t].tolist(), abs=1e-6)
            assert 0.0 <= metrics[f"routing/{task}/gate_entropy"] <= math.log(3) + 1e-9
