"""One-gate and multi-gate mixtures of experts (OMoE and MMoE).

Ma, Zhao, Yi, Chen, Hong and Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018 (https://doi.org/10.1145/3219819.3220007).

Both models share E expert MLPs. MMoE gives each task its own softmax gate over the experts,
so tasks can weight the experts differently; OMoE uses one gate for all tasks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from models import register_model
from models.base import MultiTaskModel
from models.layers import MLP, ParallelMLP, SoftmaxGate
from models.shared_bottom import _check_positive


class MixtureOfExperts(MultiTaskModel):
    """Experts mixed by softmax gates, one tower per task.

    Args:
        input_dim: Number of input features F.
        task_dims: Output size of each task head.
        width: Hidden units D of every expert layer.
        num_experts: Number of experts E.
        expert_layers: Hidden layers per expert.
        tower_hidden: Hidden units of each task tower.
        gate_per_task: True for MMoE (one gate per task), False for OMoE (one shared gate).
    """

    def __init__(
        self,
        input_dim: int,
        task_dims: Sequence[int],
        width: int = 16,
        num_experts: int = 8,
        expert_layers: int = 1,
        tower_hidden: int = 16,
        gate_per_task: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(
            width=width, num_experts=num_experts, expert_layers=expert_layers,
            tower_hidden=tower_hidden,
        )
        self.num_tasks = len(task_dims)
        self.experts = ParallelMLP(input_dim, [width] * expert_layers, num_experts)
        num_gates = self.num_tasks if gate_per_task else 1
        self.gates = nn.ModuleList(SoftmaxGate(input_dim, num_experts) for _ in range(num_gates))
        self.towers = nn.ModuleList(MLP(width, [tower_hidden], dim) for dim in task_dims)

    def gate_weights(self, x: Tensor) -> Tensor:
        """Return every task's weights over the experts, (B, T, E); each row sums to 1."""
        weights = torch.stack([gate(x) for gate in self.gates], dim=1)  # (B, T or 1, E)
        return weights.expand(-1, self.num_tasks, -1)

    def forward(self, x: Tensor) -> list[Tensor]:
        experts = self.experts(x)  # (B, E, D)
        weights = self.gate_weights(x)  # (B, T, E)

        mixed = torch.einsum("bte,bed->btd", weights, experts)  # (B, T, D)
        return [tower(mixed[:, task]) for task, tower in enumerate(self.towers)]

    def shared_parameters(self) -> list[nn.Parameter]:
        # MMoE's gates each serve one task; OMoE's single gate serves all of them.
        shared = list(self.experts.parameters())
        if len(self.gates) == 1 and self.num_tasks > 1:
            shared += list(self.gates.parameters())
        return shared

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [self.experts.weights[-1]]  # (E, D_in, D): the last layer of every expert


@register_model("mmoe", fine_knob="tower_hidden")
def mmoe(
    input_dim: int, task_dims: Sequence[int], width: int = 16, tower_hidden: int = 16, **options
) -> MixtureOfExperts:
    """Build an MMoE: one softmax gate per task over shared experts.

    Example:
        >>> model = mmoe(input_dim=10, task_dims=(1, 1), width=4, num_experts=3)
        >>> model.gate_weights(torch.zeros(2, 10)).shape
        torch.Size([2, 2, 3])
    """
    return MixtureOfExperts(
        input_dim, task_dims, width, tower_hidden=tower_hidden, gate_per_task=True, **options
    )


@register_model("omoe", fine_knob="tower_hidden")
def omoe(
    input_dim: int, task_dims: Sequence[int], width: int = 16, tower_hidden: int = 16, **options
) -> MixtureOfExperts:
    """Build an OMoE: one softmax gate over shared experts, used by every task."""
    return MixtureOfExperts(
        input_dim, task_dims, width, tower_hidden=tower_hidden, gate_per_task=False, **options
    )
