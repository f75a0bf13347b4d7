"""Loss weightings: how the per-task losses of one training step become the model's gradients.

A weighting is independent of the model: it reads the task losses and, for the gradient-based
ones, the parameters that the model declares shared (``shared_parameters()``).
The built-in ones are ``equal`` (the default), ``fixed``, ``uncertainty``, ``gradnorm`` and
``pcgrad``.

Call contract. A factory is called as ``factory(tasks=(TaskSpec, ...), **options)``, with the
dataset's tasks in the model's output order and ``options`` from the suite file, and returns a
:class:`LossWeighting`. Once per training step, :class:`models.lightning.MultiTaskModule` zeroes
the gradients and calls :meth:`LossWeighting.backward` with the (T + R,) loss terms: the T task
losses, then the R regularisation terms such as SNR's L0 penalty. ``backward`` must fill the
``.grad`` of the model's parameters and return the loss it minimised; regularisation terms always
enter with weight 1, outside the weighting. The module then steps the model's optimiser and calls
:meth:`LossWeighting.after_step`. Once per epoch it logs :meth:`LossWeighting.weights` as
``train/<task>/loss_weight``.

Register a factory with ``@register_weighting("name")``; packages outside this project can
register through the ``mtl_bench.weightings`` entry-point group.
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from datasets.base import TaskSpec
from models.base import MultiTaskModel
from models.registry import Registry

WEIGHTINGS: Registry = Registry("weighting", entry_point_group="mtl_bench.weightings")
register_weighting = WEIGHTINGS.register

DEFAULT_WEIGHTING = "equal"

Backward = Callable[[Tensor], None]


class LossWeighting(nn.Module):
    """Base class of the loss weightings.

    The weighting is a submodule of the training wrapper, so its learned parameters and buffers
    move to the model's device with it.

    Args:
        tasks: The dataset's tasks, in the model's output order.

    Attributes:
        per_task_gradients: True when :meth:`backward` takes one gradient per task. Such a
            weighting bypasses the gradient synchronisation of distributed data parallel and the
            loss scaling of ``precision="16-mixed"``, so the training wrapper rejects both.
    """

    per_task_gradients: ClassVar[bool] = False

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.task_names = tuple(task.name for task in self.tasks)

    def combine(self, losses: Tensor) -> Tensor:
        """Return the weighted sum of the (T,) task losses."""
        raise NotImplementedError

    def backward(self, terms: Tensor, model: nn.Module, backward: Backward) -> Tensor:
        """Fill the gradients of one training step and return the loss that was minimised.

        Args:
            terms: (T + R,) the T task losses of the batch, then the R regularisation terms,
                each of which enters with weight 1.
            model: The trained model, for weightings that need its parameters.
            backward: Runs the backward pass of a scalar loss (Lightning's ``manual_backward``).
        """
        loss = self.total_loss(terms)
        backward(loss)
        return loss

    def total_loss(self, terms: Tensor) -> Tensor:
        """Return the weighted task losses plus the regularisation terms of (T + R,) ``terms``."""
        num_tasks = len(self.tasks)
        return self.combine(terms[:num_tasks]) + terms[num_tasks:].sum()

    def after_step(self) -> None:
        """Update the weighting's own state once the model's optimiser has stepped."""

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` before training when the weighting cannot train ``model``."""

    def weights(self) -> Tensor | None:
        """Return the (T,) effective weight of each task loss, or None when there is none."""
        raise NotImplementedError

    def optimizer_parameters(self) -> list[nn.Parameter]:
        """Return the parameters that the model's optimiser trains together with the model."""
        return list(self.parameters())


@register_weighting("equal")
class EqualWeighting(LossWeighting):
    """The plain sum of the task losses, with one backward pass per step.

    Example:
        >>> weighting = EqualWeighting([TaskSpec("a", "binary"), TaskSpec("b", "binary")])
        >>> weighting.combine(torch.tensor([0.5, 2.0]))
        tensor(2.5000)
    """

    def combine(self, losses: Tensor) -> Tensor:
        return losses.sum()

    def total_loss(self, terms: Tensor) -> Tensor:
        # One sum over all terms, with no slicing: the step of a small model is short enough
        # for a few extra tensor operations to show.
        return terms.sum()

    def weights(self) -> Tensor:
        return torch.ones(len(self.tasks))


@register_weighting("fixed")
class FixedWeighting(LossWeighting):
    """User-given weights: L = sum_t w_t L_t.

    Args:
        tasks: The dataset's tasks.
        weights: One non-negative weight per task, either a mapping from task name to weight
            or a list in task order.

    Example:
        >>> tasks = [TaskSpec("income", "binary"), TaskSpec("marital", "binary")]
        >>> FixedWeighting(tasks, weights={"income": 2.0, "marital": 0.5}).weights()
        tensor([2.0000, 0.5000])
    """

    def __init__(
        self, tasks: Sequence[TaskSpec], weights: Mapping[str, float] | Sequence[float]
    ) -> None:
        super().__init__(tasks)
        values = _fixed_weights(weights, self.task_names)
        self.register_buffer("task_weights", torch.tensor(values))  # (T,)

    def combine(self, losses: Tensor) -> Tensor:
        return (self.task_weights * losses).sum()

    def weights(self) -> Tensor:
        return self.task_weights.clone()


def _fixed_weights(
    weights: Mapping[str, float] | Sequence[float], task_names: Sequence[str]
) -> list[float]:
    if isinstance(weights, Mapping):
        unknown = [name for name in weights if name not in task_names]
        if unknown:
            raise ValueError(
                f"Fixed weights name unknown task(s) {unknown!r}; the tasks are "
                f"{list(task_names)!r}. Give one weight per task name."
            )
        missing = [name for name in task_names if name not in weights]
        if missing:
            raise ValueError(
                f"Fixed weights are missing task(s) {missing!r}; the tasks are "
                f"{list(task_names)!r}. Give one weight per task name."
            )
        values = [weights[name] for name in task_names]
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        if len(weights) != len(task_names):
            raise ValueError(
                f"Fixed weights {list(weights)!r} have {len(weights)} values for "
                f"{len(task_names)} tasks {list(task_names)!r}. Give one weight per task, in "
                f"task order, or a mapping from task name to weight."
            )
        values = list(weights)
    else:
        raise TypeError(
            f"Fixed `weights` must be a mapping from task name to weight or a list in task "
            f"order, got {weights!r}."
        )

    for name, value in zip(task_names, values):
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value):
            raise ValueError(
                f"Fixed weight of task {name!r} must be a finite number, got {value!r}."
            )
        if value < 0:
            raise ValueError(
                f"Fixed weight of task {name!r} is negative ({value!r}); weights must be >= 0."
            )
    if not any(values):
        raise ValueError(f"Fixed weights {values!r} are all 0, so no task would be trained.")
    return [float(value) for value in values]


@register_weighting("uncertainty")
class UncertaintyWeighting(LossWeighting):
    """Task weights from learned homoscedastic uncertainty.

    Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018 (https://arxiv.org/abs/1705.07115), equations 7 and 10.

    Each task t has a learned log-variance s_t = log sigma_t^2, initialised to 0, and the loss is

        L = sum_t c_t exp(-s_t) L_t + s_t / 2,

    with c_t = 1/2 for regression (a Gaussian likelihood whose negative log is the squared error
    over 2 sigma^2 plus log sigma) and c_t = 1 for binary and multi-label tasks (the paper's
    approximation for a classifier whose logits are scaled by 1 / sigma^2, applied here to the
    BCE loss). With ``half_factors=False`` every task uses the common simplification
    L = sum_t exp(-s_t) L_t + s_t. The log-variances are trained by the model's optimiser,
    without weight decay. The logged weight of task t is c_t exp(-s_t).

    Args:
        tasks: The dataset's tasks.
        half_factors: Use the paper's factors (True) or the simplification (False).
        initial_log_variance: Initial value of every s_t.

    Example:
        >>> weighting = UncertaintyWeighting([TaskSpec("y", "regression"), TaskSpec("c", "binary")])
        >>> weighting.weights()
        tensor([0.5000, 1.0000])
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        half_factors: bool = True,
        initial_log_variance: float = 0.0,
    ) -> None:
        super().__init__(tasks)
        if not math.isfinite(initial_log_variance):
            raise ValueError(
                f"`initial_log_variance` must be a finite number, got {initial_log_variance!r}."
            )
        if half_factors:
            scales = [0.5 if task.kind == "regression" else 1.0 for task in self.tasks]
            prior = 0.5
        else:
            scales, prior = [1.0] * len(self.tasks), 1.0
        initial = torch.full((len(self.tasks),), float(initial_log_variance))
        self.log_variances = nn.Parameter(initial)  # (T,): s_t
        self.register_buffer("scales", torch.tensor(scales))  # (T,): c_t
        self.prior = prior  # factor of s_t in the loss

    def combine(self, losses: Tensor) -> Tensor:
        precisions = torch.exp(-self.log_variances)  # (T,): 1 / sigma_t^2
        return (self.scales * precisions * losses + self.prior * self.log_variances).sum()

    def weights(self) -> Tensor:
        return (self.scales * torch.exp(-self.log_variances)).detach()


@register_weighting("gradnorm")
class GradNorm(LossWeighting):
    """Task weights that balance the gradient norms of the tasks at the last shared layer.

    Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks", ICML 2018 (https://arxiv.org/abs/1711.02257).

    The model trains on sum_t w_t L_t. With W the weights of the model's last shared layer
    (``last_shared_parameters()``), each step computes per task

        G_t = ||grad_W (w_t L_t)||_2 = w_t ||grad_W L_t||_2,
        r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0)),
        target_t = mean_j(G_j) * r_t ** alpha,

    where L_t(0) is the task's loss at the first step, and the GradNorm loss
    L_grad = sum_t |G_t - target_t| with the targets held constant. Its gradient,
    dL_grad/dw_t = sign(G_t - target_t) ||grad_W L_t||_2, updates the weights through their own
    Adam optimiser, which steps after the model's optimiser. The updated weights are then clipped
    at ``min_weight`` and rescaled to sum to T. The weights start at 1.

    Args:
        tasks: The dataset's tasks.
        alpha: Asymmetry: how strongly tasks that train slower than the others are pulled up;
            0 pulls every gradient norm to the mean.
        learning_rate: Adam step size of the weights' optimiser.
        min_weight: Lower limit of a weight before renormalising, which keeps every weight
            positive.
    """

    per_task_gradients = True

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        alpha: float = 1.5,
        learning_rate: float = 0.025,
        min_weight: float = 1e-3,
    ) -> None:
        super().__init__(tasks)
        _check_non_negative(alpha=alpha)
        _check_positive(learning_rate=learning_rate, min_weight=min_weight)
        self.alpha = float(alpha)
        self.learning_rate = float(learning_rate)
        self.min_weight = float(min_weight)
        self.task_weights = nn.Parameter(torch.ones(len(self.tasks)))  # (T,): w_t
        self.initial_losses: Tensor | None = None  # (T,): L_t(0)
        self.gradient_norms: Tensor | None = None  # (T,): G_t of the last step
        self.target_norms: Tensor | None = None  # (T,): target_t of the last step
        self._optimizer: torch.optim.Optimizer | None = None

    def optimizer_parameters(self) -> list[nn.Parameter]:
        return []  # the weights have their own optimiser

    def combine(self, losses: Tensor) -> Tensor:
        return (self.task_weights.detach() * losses).sum()

    def check_model(self, model: nn.Module) -> None:
        self._shared_layer(model)

    def backward(self, terms: Tensor, model: nn.Module, backward: Backward) -> Tensor:
        losses = terms[:len(self.tasks)]
        layer = self._shared_layer(model)
        if self.initial_losses is None:
            self.initial_losses = losses.detach().clone()
        unit_norms = torch.stack([_gradient(loss, layer).norm() for loss in losses])  # (T,)

        weighted_norms = self.task_weights * unit_norms  # (T,): G_t, differentiable in w_t
        loss_ratios = losses.detach() / self.initial_losses
        inverse_rates = loss_ratios / loss_ratios.mean()  # (T,): r_t
        targets = weighted_norms.detach().mean() * inverse_rates**self.alpha
        gradnorm_loss = (weighted_norms - targets).abs().sum()
        (self.task_weights.grad,) = torch.autograd.grad(gradnorm_loss, [self.task_weights])
        self.gradient_norms, self.target_norms = weighted_norms.detach(), targets

        loss = self.total_loss(terms)
        backward(loss)
        return loss

    def _shared_layer(self, model: nn.Module) -> list[nn.Parameter]:
        layer = last_shared_parameters(model)
        if not layer:
            raise ValueError(
                f"GradNorm needs the weights of a shared layer, but `{type(model).__name__}` "
                f"shares none (its `last_shared_parameters()` is empty). Use another weighting "
                f"for this model, or define `last_shared_parameters()` on it."
            )
        return layer

    def after_step(self) -> None:
        if self._optimizer is None:
            # Created on first use, after the wrapper has moved the weights to their device.
            self._optimizer = torch.optim.Adam([self.task_weights], lr=self.learning_rate)
        self._optimizer.step()
        with torch.no_grad():
            self.task_weights.clamp_(min=self.min_weight)
            self.task_weights.mul_(len(self.tasks) / self.task_weights.sum())

    def weights(self) -> Tensor:
        return self.task_weights.detach().clone()


@register_weighting("pcgrad")
class PCGrad(LossWeighting):
    """Projecting conflicting gradients ("gradient surgery").

    Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020 (https://arxiv.org/abs/2001.06782), algorithm 1.

    Each step takes every task's gradient g_t of the model's ``shared_parameters()``. For each
    task i, the other tasks j are visited in a random order and, when g_i . g_j < 0, g_i is
    replaced by its projection on the normal plane of g_j: g_i - (g_i . g_j) / ||g_j||^2 g_j,
    always with the original g_j. The shared parameters receive the sum of the projected
    gradients; every other parameter receives its plain gradient of sum_t L_t. The order comes
    from torch's global random generator, which the trial seed sets.

    PCGrad changes gradients rather than losses, so it has no task weights and logs no
    ``loss_weight`` metric.
    """

    per_task_gradients = True

    def combine(self, losses: Tensor) -> Tensor:
        return losses.sum()

    def backward(self, terms: Tensor, model: nn.Module, backward: Backward) -> Tensor:
        losses = terms[:len(self.tasks)]
        shared = shared_parameters(model)
        loss = self.total_loss(terms)
        if not shared:
            backward(loss)  # nothing is shared, so no gradients can conflict
            return loss

        gradients = torch.stack([_gradient(task_loss, shared) for task_loss in losses])  # (T, P)
        projected = project_conflicting(gradients)  # (T, P)
        backward(loss)

        # The backward pass gave the shared parameters sum_t g_t plus the regularisation
        # gradient; swapping sum_t g_t for the projected sum keeps the regularisation part.
        correction = (projected - gradients).sum(dim=0)  # (P,)
        offset = 0
        for parameter in shared:
            piece = correction[offset:offset + parameter.numel()].view_as(parameter)
            offset += parameter.numel()
            if parameter.grad is None:
                parameter.grad = piece.clone()
            else:
                parameter.grad += piece
        return loss

    def weights(self) -> None:
        return None


def project_conflicting(gradients: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Return PCGrad's projected gradients, (T, P), of the (T, P) per-task ``gradients``.

    Example:
        >>> project_conflicting(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
        tensor([[0.5000, 0.5000],
                [0.0000, 1.0000]])
    """
    projected = gradients.clone()
    num_tasks = gradients.shape[0]
    for i in range(num_tasks):
        for j in torch.randperm(num_tasks, generator=generator).tolist():
            if j == i:
                continue
            other = gradients[j]
            dot = projected[i] @ other
            if dot < 0:
                projected[i] -= dot / (other @ other) * other
    return projected


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the model's ``shared_parameters()``, or for a model without that method every
    parameter outside its ``towers`` attribute."""
    method = getattr(model, "shared_parameters", None)
    if callable(method):
        return list(method())
    return MultiTaskModel.shared_parameters(model)


def last_shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the model's ``last_shared_parameters()``, or for a model without that method the
    last parameter of two or more dimensions among :func:`shared_parameters`."""
    method = getattr(model, "last_shared_parameters", None)
    if callable(method):
        return list(method())
    matrices = [p for p in shared_parameters(model) if p.dim() >= 2]
    return matrices[-1:]


def _gradient(loss: Tensor, parameters: Sequence[nn.Parameter]) -> Tensor:
    """Return the gradient of ``loss`` with respect to ``parameters``, flattened to (P,).

    Parameters that ``loss`` does not depend on get zeros. The graph is kept for the step's
    own backward pass.
    """
    gradients = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return torch.cat([
        (torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(parameters, gradients)
    ])


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"`{name}` must be a number > 0, got {value!r}.")


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")
