"""Size any registered model to a target number of trainable parameters.

Comparisons between architectures are only fair at equal size, so every trial builds its model
through :func:`fit_budget`. The sizer searches the model's ``width`` knob; where the nearest width
misses the tolerance, it also tunes the model's declared fine knob (the towers' hidden size for
the built-in models).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from models.registry import Entry

MAX_WIDTH = 1 << 20


def count_parameters(module: nn.Module) -> int:
    """Return the number of trainable parameters of ``module``."""
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)


@dataclass(frozen=True)
class BudgetFit:
    """The knob values chosen for a budget and the exact parameter count they give."""

    width: int
    options: dict[str, Any]  # the model options, including the fine knob where it was tuned
    parameters: int
    target: int

    @property
    def relative_error(self) -> float:
        return abs(self.parameters - self.target) / self.target


def fit_budget(
    entry: Entry,
    target: int,
    input_dim: int,
    task_dims: Sequence[int],
    options: dict[str, Any] | None = None,
    tolerance: float = 0.02,
) -> BudgetFit:
    """Find the width (and fine knob) whose parameter count is nearest to ``target``.

    Args:
        entry: The registry entry of the model, from ``MODELS.get(name)``.
        target: Target number of trainable parameters.
        input_dim: Number of input features.
        task_dims: Output size of each task head.
        options: Further keyword arguments of the factory, held fixed.
        tolerance: Largest accepted relative error.

    Raises:
        ValueError: If no width within the search range comes within ``tolerance`` of ``target``.
    """
    if target < 1:
        raise ValueError(f"The parameter budget must be a positive integer, got {target!r}.")
    options = dict(options or {})
    counter = _ParameterCounter(entry, input_dim, tuple(task_dims))

    candidates = [
        BudgetFit(width, options, counter(width, options), target)
        for width in _widths_around(counter, options, target)
    ]
    best = min(candidates, key=lambda fit: fit.relative_error)
    if best.relative_error <= tolerance:
        return best

    if entry.fine_knob is not None and entry.fine_knob not in options:
        tuned = _tune_fine_knob(counter, entry.fine_knob, options, target, candidates, tolerance)
        if tuned is not None:
            return tuned

    raise ValueError(
        f"Cannot size model {entry.name!r} to {target:,} parameters within {tolerance * 100:g} %: the "
        f"nearest is {best.parameters:,} at width {best.width}. Choose another budget, or "
        f"change the model's options so that one width step adds fewer parameters."
    )


class _ParameterCounter:
    """Build models without allocating memory (on the meta device) and count their parameters."""

    def __init__(self, entry: Entry, input_dim: int, task_dims: tuple[int, ...]) -> None:
        self.entry, self.input_dim, self.task_dims = entry, input_dim, task_dims
        self._cache: dict[tuple, int] = {}

    def __call__(self, width: int, options: dict[str, Any]) -> int:
        key = (width, tuple(sorted(options.items(), key=lambda item: item[0])).__repr__())
        if key not in self._cache:
            with torch.device("meta"):
                model = self.entry.factory(
                    input_dim=self.input_dim, task_dims=self.task_dims, width=width, **options
                )
            self._cache[key] = count_parameters(model)
        return self._cache[key]


def _widths_around(counter: _ParameterCounter, options: dict, target: int) -> list[int]:
    """Return the widths just below and just above ``target``, found by doubling and bisection."""
    high = 1
    while counter(high, options) < target:
        if high >= MAX_WIDTH:
            return [high]
        high *= 2
    low = high // 2
    if low < 1:
        return [high]
    while high - low > 1:  # counter(low) < target <= counter(high)
        middle = (low + high) // 2
        if counter(middle, options) < target:
            low = middle
        else:
            high = middle
    return [low, high]


def _tune_fine_knob(
    counter: _ParameterCounter,
    knob: str,
    options: dict,
    target: int,
    candidates: list[BudgetFit],
    tolerance: float,
) -> BudgetFit | None:
    # The parameter count is affine in a hidden size it alone controls, so two evaluations per
    # width give the value that lands nearest the target.
    default = _default_of(counter.entry, knob)
    fits = []
    for candidate in candidates:
        for width in {max(1, candidate.width - 1), candidate.width, candidate.width + 1}:
            at_one = counter(width, {**options, knob: 1})
            at_two = counter(width, {**options, knob: 2})
            slope = at_two - at_one
            if slope <= 0:
                continue
            value = max(1, round(1 + (target - at_one) / slope))
            tuned = {**options, knob: value}
            fits.append(BudgetFit(width, tuned, counter(width, tuned), target))

    within = [fit for fit in fits if fit.relative_error <= tolerance]
    if not within:
        return None
    if default is None:
        return min(within, key=lambda fit: fit.relative_error)
    # Among the fits that pass, keep the one whose knob stays closest to its default.
    return min(within, key=lambda fit: (abs(fit.options[knob] - default), fit.relative_error))


def _default_of(entry: Entry, knob: str) -> int | None:
    parameter = inspect.signature(entry.factory).parameters.get(knob)
    if parameter is not None and isinstance(parameter.default, int):
        return parameter.default
    return None
