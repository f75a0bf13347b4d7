"""Customized Gate Control (CGC) and Progressive Layered Extraction (PLE).

Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
(MTL) Model for Personalized Recommendations", RecSys 2020
(https://doi.org/10.1145/3383313.3412236).

An extraction layer contains S shared experts and K task-specific experts per task, E = S + T K
experts in all, ordered [shared experts, task 0's experts, task 1's experts, ...]. Each task's
softmax gate, a linear map of that task's input, mixes the shared experts and the task's own
experts only. CGC is one such layer under the task towers. PLE stacks several. Every layer but
the last also has a shared gate over all E experts, and its output feeds the next layer's
shared experts and shared gate. Task t's output feeds task t's experts and gate in the next
layer. The first layer gives the raw features to every branch.

Dimension key: B batch, F input features, T tasks, S shared experts, K experts per task,
E experts of one layer (S + T K), D hidden units, O outputs of one task head.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from models import register_model
from models.base import MultiTaskModel
from models.layers import MLP, ParallelMLP, SoftmaxGate
from models.shared_bottom import _check_positive


class ExtractionLayer(nn.Module):
    """Shared and task-specific experts with one gate per task and an optional shared gate.

    Maps a shared input (B, F) and per-task inputs (B, T, F) to per-task outputs (B, T, D) and,
    when it has a shared gate, a shared output (B, D).

    Args:
        input_dim: Size F of every branch's input.
        num_tasks: Number of tasks T.
        width: Hidden units D of every expert layer.
        shared_experts: Number of shared experts S.
        task_experts: Number of experts K of each task.
        expert_layers: Hidden layers per expert.
        shared_gate: True to add the gate over all E experts that feeds the next layer.
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        width: int,
        shared_experts: int,
        task_experts: int,
        expert_layers: int,
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.num_shared = shared_experts
        self.num_per_task = task_experts
        self.num_experts = shared_experts + num_tasks * task_experts

        hidden_dims = [width] * expert_layers
        self.shared_experts = ParallelMLP(input_dim, hidden_dims, shared_experts)
        self.task_experts = nn.ModuleList(
            ParallelMLP(input_dim, hidden_dims, task_experts) for _ in range(num_tasks)
        )
        self.task_gates = nn.ModuleList(
            SoftmaxGate(input_dim, shared_experts + task_experts) for _ in range(num_tasks)
        )
        self.shared_gate = SoftmaxGate(input_dim, self.num_experts) if shared_gate else None

    def task_gate_weights(self, task_inputs: Tensor) -> Tensor:
        """Return every task's gate weights over all E experts of the layer, (B, T, E).

        Task t's row contains its softmax over the shared experts and its own experts, in the
        layer's expert order, and exact zeros for the other tasks' experts.
        """
        batch = task_inputs.shape[0]
        rows = []
        for task, gate in enumerate(self.task_gates):
            visible = gate(task_inputs[:, task])  # (B, S + K)
            before = visible.new_zeros(batch, task * self.num_per_task)
            after = visible.new_zeros(batch, (self.num_tasks - 1 - task) * self.num_per_task)
            shared, own = visible[:, : self.num_shared], visible[:, self.num_shared :]
            rows.append(torch.cat([shared, before, own, after], dim=1))  # (B, E)
        return torch.stack(rows, dim=1)  # (B, T, E)

    def forward(self, shared_input: Tensor, task_inputs: Tensor) -> tuple[Tensor | None, Tensor]:
        own_experts = [bank(task_inputs[:, task]) for task, bank in enumerate(self.task_experts)]
        experts = torch.cat([self.shared_experts(shared_input), *own_experts], dim=1)  # (B, E, D)

        # The zeros in a task's row keep the other tasks' experts out of its output exactly.
        task_weights = self.task_gate_weights(task_inputs)  # (B, T, E)
        task_outputs = torch.einsum("bte,bed->btd", task_weights, experts)  # (B, T, D)

        if self.shared_gate is None:
            return None, task_outputs
        shared_weights = self.shared_gate(shared_input)  # (B, E)
        shared_output = torch.einsum("be,bed->bd", shared_weights, experts)  # (B, D)
        return shared_output, task_outputs


class ProgressiveLayeredExtraction(MultiTaskModel):
    """Stacked extraction layers, the last without a shared gate, then one tower per task.

    With ``num_layers=1`` this is CGC.

    Args:
        input_dim: Number of input features F.
        task_dims: Output size of each task head.
        width: Hidden units D of every expert layer.
        num_layers: Number of extraction layers.
        shared_experts: Shared experts S in every extraction layer.
        task_experts: Experts K of each task in every extraction layer.
        expert_layers: Hidden layers per expert.
        tower_hidden: Hidden units of each task tower.
    """

    def __init__(
        self,
        input_dim: int,
        task_dims: Sequence[int],
        width: int = 16,
        num_layers: int = 2,
        shared_experts: int = 2,
        task_experts: int = 2,
        expert_layers: int = 1,
        tower_hidden: int = 16,
    ) -> None:
        super().__init__()
        _check_positive(
            width=width, num_layers=num_layers, shared_experts=shared_experts,
            task_experts=task_experts, expert_layers=expert_layers, tower_hidden=tower_hidden,
        )
        if len(task_dims) == 0:
            raise ValueError(
                f"`task_dims` must contain the output size of at least one task, got {task_dims!r}."
            )
        self.num_tasks = len(task_dims)
        self.layers = nn.ModuleList(
            ExtractionLayer(
                input_dim if depth == 0 else width, self.num_tasks, width, shared_experts,
                task_experts, expert_layers, shared_gate=depth < num_layers - 1,
            )
            for depth in range(num_layers)
        )
        self.towers = nn.ModuleList(MLP(width, [tower_hidden], dim) for dim in task_dims)

    def _last_layer_inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shared = x  # (B, F)
        tasks = x.unsqueeze(1).expand(-1, self.num_tasks, -1)  # (B, T, F)
        for layer in self.layers[:-1]:
            shared, tasks = layer(shared, tasks)  # (B, D), (B, T, D)
        return shared, tasks

    def gate_weights(self, x: Tensor) -> Tensor:
        """Return every task's gate weights in the last extraction layer, (B, T, E).

        The E experts of that layer are ordered [shared experts, task 0's experts, task 1's
        experts, ...]. A task's gate covers only the shared experts and its own, so its row is
        exactly 0 at every other task's experts. Each row sums to 1.
        """
        _, tasks = self._last_layer_inputs(x)
        return self.layers[-1].task_gate_weights(tasks)

    def forward(self, x: Tensor) -> list[Tensor]:
        shared, tasks = self._last_layer_inputs(x)
        _, outputs = self.layers[-1](shared, tasks)  # (B, T, D)
        return [tower(outputs[:, task]) for task, tower in enumerate(self.towers)]


@register_model("cgc", fine_knob="tower_hidden")
def cgc(
    input_dim: int, task_dims: Sequence[int], width: int = 16, tower_hidden: int = 16, **options
) -> ProgressiveLayeredExtraction:
    """Build CGC: one extraction layer of shared and task-specific experts under the towers.

    Example:
        >>> model = cgc(input_dim=10, task_dims=(1, 1), width=4, shared_experts=1, task_experts=2)
        >>> model.gate_weights(torch.zeros(3, 10)).shape
        torch.Size([3, 2, 5])
    """
    if "num_layers" in options:
        raise ValueError(
            f"`cgc` always has one extraction layer, got num_layers={options['num_layers']!r}. "
            f"Use the model `ple` to stack several."
        )
    return ProgressiveLayeredExtraction(
        input_dim, task_dims, width, num_layers=1, tower_hidden=tower_hidden, **options
    )


@register_model("ple", fine_knob="tower_hidden")
def ple(
    input_dim: int,
    task_dims: Sequence[int],
    width: int = 16,
    num_layers: int = 2,
    tower_hidden: int = 16,
    **options,
) -> ProgressiveLayeredExtraction:
    """Build PLE: ``num_layers`` extraction layers linked by shared gates, then the towers.

    Example:
        >>> model = ple(input_dim=10, task_dims=(1, 3), width=4, num_layers=3)
        >>> [out.shape for out in model(torch.zeros(2, 10))]
        [torch.Size([2, 1]), torch.Size([2, 3])]
    """
    return ProgressiveLayeredExtraction(
        input_dim, task_dims, width, num_layers=num_layers, tower_hidden=tower_hidden, **options
    )
