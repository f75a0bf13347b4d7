"""The Lightning wrapper that trains any registered model on any dataset's tasks.

It adds per-task losses, epoch-level metrics, the optimiser and the model's own regularisation
terms (the L0 penalty of SNR) to a plain ``nn.Module``. Metrics are computed over whole epochs and
handed out once per epoch through :attr:`MultiTaskModule.epoch_metrics`, named
``{stage}/{task}/{metric}``; nothing is sent to a logger per step, which keeps the training loop
close to the speed of a bare PyTorch loop.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.nn import functional

from datasets.base import Batch, TaskSpec
from models.weighting import EqualWeighting, LossWeighting

logger = logging.getLogger(__name__)


class SingleClassWarning(UserWarning):
    """Warning category for a split with one class only, where ROC AUC is undefined."""


def task_loss(task: TaskSpec, output: Tensor, target: Tensor, weights: Tensor | None) -> Tensor:
    """Return the mean loss of one task over a batch, weighted per sample when ``weights`` is set.

    Regression uses squared error; binary and multi-label classification use BCE on logits,
    averaged over a multi-label task's classes.
    """
    if task.kind == "regression":
        per_sample = functional.mse_loss(output, target, reduction="none").mean(dim=1)
    else:
        per_sample = functional.binary_cross_entropy_with_logits(
            output, target, reduction="none"
        ).mean(dim=1)
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights).sum() / weights.sum()


def task_metrics(task: TaskSpec, outputs: Tensor, targets: Tensor) -> dict[str, float]:
    """Compute one task's metrics over a whole split: MSE for regression, ROC AUC for binary."""
    if task.kind == "regression":
        return {"mse": float(functional.mse_loss(outputs.double(), targets.double()))}
    return {"auc": roc_auc(targets.flatten().numpy(), outputs.flatten().double().numpy(), task.name)}


def roc_auc(labels: np.ndarray, scores: np.ndarray, task_name: str) -> float:
    """Return ROC AUC, or NaN with a :class:`SingleClassWarning` when ``labels`` hold one class."""
    if np.unique(labels).size < 2:
        warnings.warn(
            f"Task {task_name!r}: the split holds only one class, so ROC AUC is undefined and "
            f"reported as NaN. Use a larger split or another split seed.",
            SingleClassWarning,
            stacklevel=2,
        )
        return math.nan
    return float(roc_auc_score(labels, scores))


def selection_score(tasks: Sequence[TaskSpec], metrics: dict[str, float], stage: str) -> float:
    """Return the score that model selection maximises: the mean over tasks of AUC for binary
    tasks, GAP@20 for multi-label tasks and minus MSE for regression tasks. Tasks whose metric is
    NaN are left out."""
    values = []
    for task in tasks:
        if task.kind == "regression":
            values.append(-metrics[f"{stage}/{task.name}/mse"])
        elif task.kind == "multilabel":
            values.append(metrics[f"{stage}/{task.name}/gap_at_20"])
        else:
            values.append(metrics[f"{stage}/{task.name}/auc"])
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else math.nan


class MultiTaskModule(pl.LightningModule):
    """Train a multi-task ``nn.Module`` with per-task losses and epoch-level metrics.

    Args:
        model: Maps a (B, F) batch to a list of T tensors of shape (B, O_t).
        tasks: The dataset's tasks, in the model's output order.
        learning_rate: Adam learning rate.
        weight_decay: Adam weight decay.
        weighting: How the task losses become gradients (see :mod:`models.weighting`); None
            sums them.

    Attributes:
        epoch_metrics: After each validation epoch, the training and validation metrics of that
            epoch (train loss terms averaged over its batches, ``train/loss`` their unweighted
            sum), each task's loss weight at the end of the epoch as
            ``train/<task>/loss_weight``, and the routing diagnostics.
        test_metrics: After a test run, the test metrics.
        test_routing: After a test run, the routing diagnostics of the tested weights, with the
            gate statistics measured on the test split.

    Routing diagnostics, all named ``routing/...``: for a model with a ``gate_weights(x)``
    method returning (B, T, E) gate weights (OMoE, MMoE), each task's mean weight per expert,
    ``routing/<task>/expert_<e>``, and the mean entropy of its gate in nats,
    ``routing/<task>/gate_entropy``, over the split; and the names returned by the model's
    ``diagnostics()`` method, such as SNR's ``routing/open_fraction``.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[TaskSpec],
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        weighting: LossWeighting | None = None,
    ) -> None:
        super().__init__()
        # Manual optimisation: one plain zero_grad, backward and step per batch. Lightning's
        # automatic loop wraps each step in a closure and hooks that cost more than the step of
        # a small model.
        self.automatic_optimization = False
        self.model = model
        self.tasks = tuple(tasks)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.weighting = weighting if weighting is not None else EqualWeighting(self.tasks)
        self.epoch_metrics: dict[str, float] = {}
        self.test_metrics: dict[str, float] = {}
        self.test_routing: dict[str, float] = {}
        self._train_totals = _RunningTotals()
        self._evaluator = SplitEvaluator(self.tasks)
        self._gates = GateStatistics(self.tasks) if hasattr(model, "gate_weights") else None

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model(x)

    def training_step(self, batch: Batch, batch_index: int) -> Tensor:
        features, targets, weights = batch
        outputs = self.model(features)
        if batch_index == 0:
            _check_outputs(outputs, self.tasks)

        terms = [
            task_loss(task, output, target, weights)
            for task, output, target in zip(self.tasks, outputs, targets)
        ]
        regularization = getattr(self.model, "regularization_losses", dict)()
        terms.extend(regularization.values())
        terms = torch.stack(terms)  # (T + R,)

        # One running sum on the device, detached, read once per epoch: per-step logging would
        # cost more than a small model's step.
        totals = self._train_totals
        if totals.names is None:
            totals.names = [f"{task.name}/loss" for task in self.tasks] + list(regularization)
            totals.sum = torch.zeros_like(terms)
        totals.sum += terms.detach()
        totals.batches += 1

        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self.weighting.backward(terms, self.model, self.manual_backward)
        optimizer.step()
        self.weighting.after_step()
        return loss

    def validation_step(self, batch: Batch, batch_index: int) -> None:
        self._collect(batch)

    def test_step(self, batch: Batch, batch_index: int) -> None:
        self._collect(batch)

    def on_validation_epoch_start(self) -> None:
        self._reset_collected()

    def on_test_epoch_start(self) -> None:
        self._reset_collected()

    def on_fit_start(self) -> None:
        self.weighting.check_model(self.model)
        if not self.weighting.per_task_gradients:
            return
        name = type(self.weighting).__name__
        if self.trainer.world_size > 1:
            raise RuntimeError(
                f"Loss weighting `{name}` takes one gradient per task with "
                f"`torch.autograd.grad`, which bypasses the gradient synchronisation of "
                f"distributed data parallel, so it cannot train on {self.trainer.world_size} "
                f"processes. Train on one device (`devices=1`), or use a weighting that needs "
                f"one backward pass: equal, fixed or uncertainty."
            )
        # NOTE: reached on a GPU only, because Lightning 2.6 turns '16-mixed' into
        # 'bf16-mixed' on the CPU, so no test covers this branch.
        if self.trainer.precision == "16-mixed":
            raise RuntimeError(
                f"Loss weighting `{name}` takes one gradient per task, which the loss scaling "
                f"of precision '16-mixed' does not cover. Train with `precision='32-true'` or "
                f"`'bf16-mixed'`, or use equal, fixed or uncertainty."
            )

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self._train_totals.means("train")
        self._train_totals = _RunningTotals()
        if metrics:
            metrics.update(self._loss_weights())

        routing = self._routing()  # before _split_metrics, which resets the gate statistics
        metrics.update(self._split_metrics("val"))
        metrics["val/selection_score"] = selection_score(self.tasks, metrics, "val")
        self.epoch_metrics = {**metrics, **routing}

    def on_test_epoch_end(self) -> None:
        self.test_routing = self._routing()
        self.test_metrics = self._split_metrics("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": list(self.model.parameters())}]
        weighting_parameters = self.weighting.optimizer_parameters()
        if weighting_parameters:
            # Weight decay would pull the weighting's parameters towards 0, a prior that none of
            # the weightings' losses contains.
            groups.append({"params": weighting_parameters, "weight_decay": 0.0})
        # foreach=True updates all parameters in a few vectorised calls instead of a loop of
        # small ones, which dominates a small model's step on the CPU.
        return torch.optim.Adam(
            groups, lr=self.learning_rate, weight_decay=self.weight_decay, foreach=True
        )

    def _loss_weights(self) -> dict[str, float]:
        weights = self.weighting.weights()
        if weights is None:
            return {}
        return {
            f"train/{task.name}/loss_weight": float(weight)
            for task, weight in zip(self.tasks, weights.tolist())
        }

    def _collect(self, batch: Batch) -> None:
        features, targets, _ = batch
        outputs = self.model(features)
        _check_outputs(outputs, self.tasks)
        self._evaluator.update(outputs, targets)
        if self._gates is not None:
            self._gates.update(self.model.gate_weights(features))

    def _reset_collected(self) -> None:
        self._evaluator = SplitEvaluator(self.tasks)
        if self._gates is not None:
            self._gates = GateStatistics(self.tasks)

    def _routing(self) -> dict[str, float]:
        metrics = self._gates.compute() if self._gates is not None else {}
        diagnostics = getattr(self.model, "diagnostics", dict)()
        metrics.update({f"routing/{name}": float(value) for name, value in diagnostics.items()})
        return metrics

    def _split_metrics(self, stage: str) -> dict[str, float]:
        metrics = self._evaluator.compute(stage)
        self._reset_collected()
        return metrics


class SplitEvaluator:
    """Gather one split's predictions batch by batch and compute its metrics at the end.

    Regression and binary tasks keep their (N, 1) outputs, because ROC AUC needs the whole
    epoch. Multi-label tasks feed streaming accumulators instead, so a split with many classes
    is never held in memory; with more than one multi-label task, an ``overall`` entry pools
    all their classes.
    """

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        self.tasks = tuple(tasks)
        self.outputs: list[list[Tensor]] = [[] for _ in self.tasks]
        self.targets: list[list[Tensor]] = [[] for _ in self.tasks]
        self.multilabel = [i for i, task in enumerate(self.tasks) if task.kind == "multilabel"]
        self.accumulators = {}
        self.overall = None
        if not self.multilabel:
            return

        from models.multilabel_metrics import MultiLabelMetrics

        self.accumulators = {
            i: MultiLabelMetrics(self.tasks[i].output_dim) for i in self.multilabel
        }
        if len(self.multilabel) > 1:
            self.overall = MultiLabelMetrics(sum(self.tasks[i].output_dim for i in self.multilabel))

    def update(self, outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> None:
        outputs = [output.detach().float().cpu() for output in outputs]
        targets = [target.cpu() for target in targets]
        for index, (output, target) in enumerate(zip(outputs, targets)):
            if index in self.accumulators:
                self.accumulators[index].update(output, target)
            else:
                self.outputs[index].append(output)
                self.targets[index].append(target)
        if self.overall is not None:
            self.overall.update(
                torch.cat([outputs[i] for i in self.multilabel], dim=1),
                torch.cat([targets[i] for i in self.multilabel], dim=1),
            )

    def compute(self, stage: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for index, task in enumerate(self.tasks):
            if index in self.accumulators:
                values = self.accumulators[index].compute()
            else:
                values = task_metrics(
                    task, torch.cat(self.outputs[index]), torch.cat(self.targets[index])
                )
            metrics.update({f"{stage}/{task.name}/{name}": v for name, v in values.items()})
        if self.overall is not None:
            metrics.update(
                {f"{stage}/overall/{name}": v for name, v in self.overall.compute().items()}
            )
        return metrics


class GateStatistics:
    """Each task's mean gate weight per expert and mean gate entropy over one split.

    Fed batch by batch with (B, T, E) gate weights whose rows sum to 1. The entropy of a gate
    is -sum_e w_e ln w_e, in nats, with 0 ln 0 = 0: ln E for a uniform gate, 0 for a gate that
    picks one expert.
    """

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        self.tasks = tuple(tasks)
        self.weight_sum: Tensor | None = None  # (T, E)
        self.entropy_sum: Tensor | None = None  # (T,)
        self.count = 0

    @torch.no_grad()
    def update(self, weights: Tensor) -> None:
        weights = weights.detach().double()  # (B, T, E)
        entropy = -torch.special.xlogy(weights, weights).sum(dim=-1)  # (B, T)
        if self.weight_sum is None:
            self.weight_sum = torch.zeros_like(weights[0])
            self.entropy_sum = torch.zeros_like(entropy[0])
        self.weight_sum += weights.sum(dim=0)
        self.entropy_sum += entropy.sum(dim=0)
        self.count += weights.shape[0]

    def mean_weights(self) -> Tensor:
        """Return the (T, E) mean gate weights."""
        return self.weight_sum / self.count

    def compute(self) -> dict[str, float]:
        if not self.count:
            return {}
        metrics = {}
        weights, entropy = self.mean_weights().tolist(), (self.entropy_sum / self.count).tolist()
        for task, row, task_entropy in zip(self.tasks, weights, entropy):
            for expert, value in enumerate(row):
                metrics[f"routing/{task.name}/expert_{expert}"] = value
            metrics[f"routing/{task.name}/gate_entropy"] = task_entropy
        return metrics


class _RunningTotals:
    """Sums of the training loss terms over the batches of one epoch.

    A plain object rather than module attributes: assigning to an ``nn.Module`` attribute goes
    through its slow ``__setattr__``, once per step.
    """

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.sum: Tensor | None = None  # (T + R,): per-task losses, then regularisation terms
        self.batches = 0

    def means(self, stage: str) -> dict[str, float]:
        if not self.batches:
            return {}
        means = (self.sum / self.batches).tolist()
        # The training loss is the sum of its terms, so its mean is the sum of their means.
        metrics = {f"{stage}/loss": sum(means)}
        for name, value in zip(self.names, means):
            metrics[f"{stage}/{name}"] = value
        return metrics


def _check_outputs(outputs: Any, tasks: Sequence[TaskSpec]) -> None:
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(tasks):
        count = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
        raise ValueError(
            f"The model returned {count} outputs for {len(tasks)} tasks. A model's forward must "
            f"return a list with one (batch, output_dim) tensor per task."
        )
