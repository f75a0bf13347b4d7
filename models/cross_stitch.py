"""Cross-stitch networks.

Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR 2016
(https://doi.org/10.1109/CVPR.2016.433).

Every task has its own column, an MLP of ``num_layers`` hidden layers. After each hidden layer a
cross-stitch unit replaces every column's activations by a learned linear combination of all
columns' activations, h'_i = sum_j alpha_ij h_j, so training decides how much the tasks share at
each depth. As in the paper there is one alpha per pair of tasks per layer; ``stitch_per_unit``
gives every hidden unit its own alpha instead. With alpha the identity the columns are
independent networks, one per task.

Dimension key: B batch, T tasks, D hidden units, O outputs of one task head. F is the input size
of a column layer, the features in the first layer and D in the ones above it. I and J index the
receiving and the sending task of a cross-stitch unit, both of size T.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from models import register_model
from models.base import MultiTaskModel
from models.layers import MLP
from models.shared_bottom import _check_positive


class ColumnLayer(nn.Module):
    """One hidden layer of every task column, a linear map and ReLU each: (B, T, F) -> (B, T, D).

    Column t only reads row t of the input, so the columns share no weights.
    """

    def __init__(self, input_dim: int, width: int, num_tasks: int) -> None:
        super().__init__()
        # The same uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) range as nn.Linear's default.
        bound = 1.0 / math.sqrt(input_dim)
        self.weight = nn.Parameter(torch.empty(num_tasks, input_dim, width).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_tasks, width).uniform_(-bound, bound))

    def forward(self, inputs: Tensor) -> Tensor:
        return torch.relu(torch.einsum("btf,tfd->btd", inputs, self.weight) + self.bias)


class CrossStitchUnit(nn.Module):
    """Learned combinations of the columns' activations: (B, J, D) -> (B, I, D).

    Output column i is sum_j alpha_ij times input column j. ``alpha`` has shape (I, J), or
    (I, J, D) when every hidden unit has its own combination.

    Args:
        num_tasks: Number of columns T.
        width: Hidden units D of each column.
        alpha_same: Initial alpha_ii, the weight of a column's own activations.
        alpha_other: Initial alpha_ij for i != j, the weight of another column's activations.
        per_unit: True for one alpha per task pair and hidden unit instead of per task pair.
    """

    def __init__(
        self, num_tasks: int, width: int, alpha_same: float, alpha_other: float, per_unit: bool
    ) -> None:
        super().__init__()
        alpha = torch.full((num_tasks, num_tasks), float(alpha_other))
        alpha.fill_diagonal_(float(alpha_same))  # (I, J)
        if per_unit:
            alpha = alpha.unsqueeze(-1).repeat(1, 1, width)  # (I, J, D)
        self.alpha = nn.Parameter(alpha)

    def forward(self, columns: Tensor) -> Tensor:
        if self.alpha.dim() == 3:
            return torch.einsum("ijd,bjd->bid", self.alpha, columns)  # (B, I, D)
        return torch.einsum("ij,bjd->bid", self.alpha, columns)  # (B, I, D)


class CrossStitch(MultiTaskModel):
    """One MLP column per task, linked by a cross-stitch unit after every hidden layer.

    Args:
        input_dim: Number of input features F.
        task_dims: Output size of each task head.
        width: Hidden units D of every column layer.
        num_layers: Hidden layers per column, each followed by a cross-stitch unit.
        alpha_same: Initial weight of a column's own activations in every unit.
        alpha_other: Initial weight of each other column's activations; None for
            (1 - alpha_same) / (T - 1), so that with two or more tasks every row of alpha
            starts summing to 1.
        stitch_per_unit: True for one alpha per task pair and hidden unit, False for one per
            task pair, as in the paper.
        tower_hidden: Hidden units of each task tower.
    """

    def __init__(
        self,
        input_dim: int,
        task_dims: Sequence[int],
        width: int = 16,
        num_layers: int = 2,
        alpha_same: float = 0.9,
        alpha_other: float | None = None,
        stitch_per_unit: bool = False,
        tower_hidden: int = 16,
    ) -> None:
        super().__init__()
        _check_positive(width=width, num_layers=num_layers, tower_hidden=tower_hidden)
        if len(task_dims) == 0:
            raise ValueError(
                f"`task_dims` must contain the output size of at least one task, got {task_dims!r}."
            )
        self.num_tasks = len(task_dims)
        _check_finite(alpha_same=alpha_same)
        if alpha_other is None:
            alpha_other = (1.0 - alpha_same) / max(self.num_tasks - 1, 1)
        _check_finite(alpha_other=alpha_other)
        if not isinstance(stitch_per_unit, bool):
            raise ValueError(f"`stitch_per_unit` must be true or false, got {stitch_per_unit!r}.")

        sizes = [input_dim] + [width] * num_layers
        self.columns = nn.ModuleList(
            ColumnLayer(size, width, self.num_tasks) for size in sizes[:-1]
        )
        self.stitches = nn.ModuleList(
            CrossStitchUnit(self.num_tasks, width, alpha_same, alpha_other, stitch_per_unit)
            for _ in range(num_layers)
        )
        self.towers = nn.ModuleList(MLP(width, [tower_hidden], dim) for dim in task_dims)

    def forward(self, x: Tensor) -> list[Tensor]:
        hidden = x.unsqueeze(1).expand(-1, self.num_tasks, -1)  # (B, T, F)
        for column, stitch in zip(self.columns, self.stitches):
            hidden = stitch(column(hidden))  # (B, T, D)
        return [tower(hidden[:, task]) for task, tower in enumerate(self.towers)]


def _check_finite(**values: float) -> None:
    for name, value in values.items():
        is_real = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_real or not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite real number, got {value!r}.")


@register_model("cross_stitch", fine_knob="tower_hidden")
def cross_stitch(
    input_dim: int, task_dims: Sequence[int], width: int = 16, tower_hidden: int = 16, **options
) -> CrossStitch:
    """Build a cross-stitch network: one MLP column per task, linked after every hidden layer.

    Example:
        >>> model = cross_stitch(input_dim=10, task_dims=(1, 1, 1), width=4, num_layers=2)
        >>> [stitch.alpha.shape for stitch in model.stitches]
        [torch.Size([3, 3]), torch.Size([3, 3])]
        >>> model.stitches[0].alpha[0]
        tensor([0.9000, 0.0500, 0.0500], grad_fn=<SelectBackward0>)
    """
    return CrossStitch(input_dim, task_dims, width, tower_hidden=tower_hidden, **options)
