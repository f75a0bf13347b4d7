"""Shared-Bottom and the single-task baseline.

Shared-Bottom is the classic hard-parameter-sharing network: Caruana, "Multitask Learning",
Machine Learning 28, 1997 (https://doi.org/10.1023/A:1007379606734). One bottom MLP feeds one
tower per task. The single-task baseline trains an independent bottom and tower per task, the
reference every multi-task model is compared against.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from models import register_model
from models.base import MultiTaskModel
from models.layers import MLP


@register_model("shared_bottom", fine_knob="tower_hidden")
class SharedBottom(MultiTaskModel):
    """One shared bottom MLP and one tower per task.

    Args:
        input_dim: Number of input features F.
        task_dims: Output size of each task head.
        width: Hidden units D of every bottom layer.
        bottom_layers: Number of hidden layers in the bottom.
        tower_hidden: Hidden units of each task tower.

    Example:
        >>> import torch
        >>> model = SharedBottom(input_dim=10, task_dims=(1, 1), width=16)
        >>> [out.shape for out in model(torch.zeros(4, 10))]
        [torch.Size([4, 1]), torch.Size([4, 1])]
    """

    def __init__(
        self,
        input_dim: int,
        task_dims: Sequence[int],
        width: int = 64,
        bottom_layers: int = 1,
        tower_hidden: int = 16,
    ) -> None:
        super().__init__()
        _check_positive(width=width, bottom_layers=bottom_layers, tower_hidden=tower_hidden)
        self.bottom = MLP(input_dim, [width] * bottom_layers)
        self.towers = nn.ModuleList(MLP(width, [tower_hidden], dim) for dim in task_dims)

    def forward(self, x: Tensor) -> list[Tensor]:
        shared = self.bottom(x)  # (B, D)
        return [tower(shared) for tower in self.towers]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        linears = [layer for layer in self.bottom if isinstance(layer, nn.Linear)]
        return [linears[-1].weight]


@register_model("single_task", fine_knob="tower_hidden")
class SingleTask(MultiTaskModel):
    """An independent bottom and tower per task, sharing nothing.

    Each task's network has the shape of a one-task Shared-Bottom, so at equal ``width`` the
    comparison isolates the effect of sharing.

    Example:
        >>> import torch
        >>> model = SingleTask(input_dim=10, task_dims=(1, 3), width=16)
        >>> [out.shape for out in model(torch.zeros(4, 10))]
        [torch.Size([4, 1]), torch.Size([4, 3])]
    """

    def __init__(
        self,
        input_dim: int,
        task_dims: Sequence[int],
        width: int = 64,
        bottom_layers: int = 1,
        tower_hidden: int = 16,
    ) -> None:
        super().__init__()
        self.networks = nn.ModuleList(
            SharedBottom(input_dim, [dim], width, bottom_layers, tower_hidden) for dim in task_dims
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        return [network(x)[0] for network in self.networks]

    def shared_parameters(self) -> list[nn.Parameter]:
        return []  # every parameter belongs to one task's network


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
