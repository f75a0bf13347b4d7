"""Sub-Network Routing (SNR-Trans and SNR-Aver).

Ma, Zhao, Chen, Li, Hong and Chi, "SNR: Sub-Network Routing for Flexible Parameter Sharing in
Multi-Task Learning", AAAI 2019 (https://ojs.aaai.org/index.php/AAAI/article/view/3788).

The shared bottom is split into layers of sub-networks. Every connection from sub-network j of
one layer to sub-network i of the next carries a scalar coding variable z_ij, a hard-concrete gate
(see :class:`models.layers.HardConcreteGate`). With u_j the output of lower sub-network j:

- SNR-Trans: v_i = sum_j z_ij W_ij u_j, with a learned matrix W_ij per connection.
- SNR-Aver:  v_i = sum_j z_ij u_j.

In both, the top layer of sub-networks routes to the task towers the same way, with one coding
variable per (task, sub-network) pair, so different tasks receive different inputs. Training adds
``l0_strength`` times the expected number of open connections to the loss; connections whose gate
settles at exactly 0 can be removed for serving.

How v_i becomes the output of upper sub-network i: in SNR-Trans the matrices W_ij are that
sub-network's weights, split by incoming connection, so u_i = ReLU(v_i + b_i). In SNR-Aver the
upper sub-network has its own layer, u_i = ReLU(A_i v_i + b_i). A tower's input is v_t itself.
Both variants therefore have one hidden layer per layer of sub-networks.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from models import register_model
from models.base import MultiTaskModel
from models.layers import MLP, HardConcreteGate, ParallelMLP
from models.shared_bottom import _check_positive


class Routing(nn.Module):
    """Gated connections from J lower sub-networks to I upper units: (B, J, D) -> (B, I, H).

    Args:
        num_lower: J, sub-networks below.
        num_upper: I, sub-networks (or towers) above.
        lower_dim: D, output size of each lower sub-network.
        upper_dim: H, output size of each upper unit.
        transform: True for SNR-Trans (a matrix per connection); False for SNR-Aver (only the
            gated average, then ``upper_dim`` must equal ``lower_dim``).
        gate_options: Keyword arguments of :class:`HardConcreteGate`.
    """

    def __init__(
        self,
        num_lower: int,
        num_upper: int,
        lower_dim: int,
        upper_dim: int,
        transform: bool,
        gate_options: dict,
    ) -> None:
        super().__init__()
        if not transform and upper_dim != lower_dim:
            raise ValueError(
                f"Routing without transform keeps the width; got lower_dim={lower_dim} and "
                f"upper_dim={upper_dim}."
            )
        self.gate = HardConcreteGate((num_upper, num_lower), **gate_options)
        self.weight: nn.Parameter | None = None
        if transform:
            # Each upper unit sums J transformed inputs, so its fan-in is J * D.
            bound = 1.0 / math.sqrt(num_lower * lower_dim)
            weight = torch.empty(num_upper, num_lower, upper_dim, lower_dim).uniform_(-bound, bound)
            self.weight = nn.Parameter(weight)  # (I, J, H, D)

    def forward(self, lower: Tensor) -> Tensor:
        z = self.gate()  # (I, J)
        if self.weight is None:
            return torch.einsum("ij,bjd->bid", z, lower)  # (B, I, D)
        return torch.einsum("ij,ijhd,bjd->bih", z, self.weight, lower)  # (B, I, H)


class SubNetworkLayer(nn.Module):
    """The layer of I upper sub-networks fed by a :class:`Routing`: (B, J, D) -> (B, I, D)."""

    def __init__(
        self, num_lower: int, num_upper: int, width: int, transform: bool, gate_options: dict
    ) -> None:
        super().__init__()
        self.routing = Routing(num_lower, num_upper, width, width, transform, gate_options)
        self.bias = nn.Parameter(torch.zeros(num_upper, width))  # (I, D)
        self.weight: nn.Parameter | None = None
        if not transform:
            bound = 1.0 / math.sqrt(width)
            weight = torch.empty(num_upper, width, width).uniform_(-bound, bound)
            self.weight = nn.Parameter(weight)  # (I, D_out, D_in)

    def forward(self, lower: Tensor) -> Tensor:
        routed = self.routing(lower)  # (B, I, D)
        if self.weight is not None:
            routed = torch.einsum("ihd,bid->bih", self.weight, routed)  # (B, I, D)
        return torch.relu(routed + self.bias)


class SNR(MultiTaskModel):
    """Sub-networks in layers, connected and routed to task towers by hard-concrete gates.

    Args:
        input_dim: Number of input features F.
        task_dims: Output size of each task head.
        width: Hidden units D of every sub-network.
        subnetworks: Number of sub-networks in each layer, bottom first.
        tower_hidden: Hidden units of each task tower.
        transform: True for SNR-Trans, False for SNR-Aver.
        l0_strength: lambda, the weight of the expected-L0 penalty in the training loss.
        gate_beta: Temperature beta of the hard-concrete gates.
        gate_gamma: Lower stretch limit gamma (< 0).
        gate_zeta: Upper stretch limit zeta (> 1).
        gate_init: Initial ``log_alpha`` of every gate.
    """

    def __init__(
        self,
        input_dim: int,
        task_dims: Sequence[int],
        width: int = 32,
        subnetworks: Sequence[int] = (3, 3),
        tower_hidden: int = 16,
        transform: bool = True,
        l0_strength: float = 1e-3,
        gate_beta: float = 2.0 / 3.0,
        gate_gamma: float = -0.1,
        gate_zeta: float = 1.1,
        gate_init: float = 2.0,
    ) -> None:
        super().__init__()
        subnetworks = list(subnetworks)
        _check_positive(width=width, tower_hidden=tower_hidden, layers=len(subnetworks))
        _check_positive(**{f"subnetworks[{i}]": n for i, n in enumerate(subnetworks)})
        if l0_strength < 0:
            raise ValueError(f"`l0_strength` must be >= 0, got {l0_strength!r}.")
        gate_options = dict(beta=gate_beta, gamma=gate_gamma, zeta=gate_zeta, init_log_alpha=gate_init)

        self.l0_strength = l0_strength
        self.first_layer = ParallelMLP(input_dim, [width], subnetworks[0])
        self.layers = nn.ModuleList(
            SubNetworkLayer(lower, upper, width, transform, gate_options)
            for lower, upper in zip(subnetworks, subnetworks[1:])
        )
        self.task_routing = Routing(
            subnetworks[-1], len(task_dims), width, width, transform, gate_options
        )
        self.towers = nn.ModuleList(MLP(width, [tower_hidden], dim) for dim in task_dims)

    def gates(self) -> list[HardConcreteGate]:
        """Return the coding-variable gates, bottom layer first and task routing last."""
        return [layer.routing.gate for layer in self.layers] + [self.task_routing.gate]

    def forward(self, x: Tensor) -> list[Tensor]:
        hidden = self.first_layer(x)  # (B, J, D)
        for layer in self.layers:
            hidden = layer(hidden)  # (B, I, D)

        tower_inputs = self.task_routing(hidden)  # (B, T, D)
        return [tower(tower_inputs[:, task]) for task, tower in enumerate(self.towers)]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        # SNR-Trans: the matrices that route to the towers. SNR-Aver routes with gates only, so
        # its last weights are those of the top layer of sub-networks.
        if self.task_routing.weight is not None:
            return [self.task_routing.weight]
        if len(self.layers):
            return [self.layers[-1].weight]
        return [self.first_layer.weights[-1]]

    def expected_l0(self) -> Tensor:
        """Return the expected number of open connections over all gates."""
        return sum(gate.expected_l0() for gate in self.gates())

    def regularization_losses(self) -> dict[str, Tensor]:
        return {"l0_penalty": self.l0_strength * self.expected_l0()}

    def serving_module(self) -> "ServingSNR":
        """Return an inference copy without the connections whose gates are closed."""
        return prune_for_serving(self)

    def connection_gates(self) -> dict[str, Tensor]:
        """Return every routing's evaluation-mode gates, (I, J) each, by the name of what it feeds.

        ``to_layer_<k>`` feeds sub-network layer k (layer 0 reads the features directly);
        ``to_tasks`` feeds the task towers, one row per task.
        """
        names = [f"to_layer_{k + 1}" for k in range(len(self.layers))] + ["to_tasks"]
        return {name: _evaluation_gate(gate).detach() for name, gate in zip(names, self.gates())}

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Return the open connections (evaluation gate above 0), overall and per routing.

        Per routing: ``<name>/mean_gate``, the mean evaluation gate value, and
        ``<name>/open_fraction``; overall: ``open_connections`` and ``open_fraction``.
        """
        values: dict[str, float] = {}
        open_count, total = 0, 0
        for name, z in self.connection_gates().items():
            opened = int((z > 0).sum())
            values[f"{name}/mean_gate"] = float(z.mean())
            values[f"{name}/open_fraction"] = opened / z.numel()
            open_count += opened
            total += z.numel()
        return {"open_connections": float(open_count), "open_fraction": open_count / total, **values}


def _evaluation_gate(gate: HardConcreteGate) -> Tensor:
    was_training = gate.training
    gate.eval()
    z = gate()
    gate.train(was_training)
    return z


@register_model("snr_trans", fine_knob="tower_hidden")
def snr_trans(
    input_dim: int, task_dims: Sequence[int], width: int = 32, tower_hidden: int = 16, **options
) -> SNR:
    """Build SNR-Trans: a learned matrix on every gated connection.

    Example:
        >>> model = snr_trans(input_dim=10, task_dims=(1, 1), width=8, subnetworks=(2, 2))
        >>> [gate.log_alpha.shape for gate in model.gates()]
        [torch.Size([2, 2]), torch.Size([2, 2])]
    """
    return SNR(input_dim, task_dims, width, tower_hidden=tower_hidden, transform=True, **options)


@register_model("snr_aver", fine_knob="tower_hidden")
def snr_aver(
    input_dim: int, task_dims: Sequence[int], width: int = 32, tower_hidden: int = 16, **options
) -> SNR:
    """Build SNR-Aver: gated averages of sub-network outputs, no per-connection matrices."""
    return SNR(input_dim, task_dims, width, tower_hidden=tower_hidden, transform=False, **options)



def prune_for_serving(model: SNR) -> "ServingSNR":
    """Return an inference copy of ``model`` without the connections its gates closed."""
    return ServingSNR(model)


class ServingSNR(nn.Module):
    """An SNR network for inference with its closed connections removed.

    Built by :func:`prune_for_serving` from a trained :class:`SNR`. Every coding variable is
    frozen at its evaluation value. Connections whose gate is exactly 0 are dropped with their
    matrices, and so is every sub-network whose output no open path carries to a tower. The
    outputs equal the trained model's in evaluation mode, up to floating-point rounding.
    """

    def __init__(self, model: SNR) -> None:
        super().__init__()
        gates = [_evaluation_gate(gate).detach() for gate in model.gates()]  # (I, J) per routing
        live = _live_units(gates)
        width = model.first_layer.output_dim

        self.first_units = live[0]
        first_weight, first_bias = model.first_layer.weights[0], model.first_layer.biases[0]
        self.first_weight = nn.Parameter(first_weight[live[0]].detach().clone())  # (J, F, D)
        self.first_bias = nn.Parameter(first_bias[live[0]].detach().clone())  # (J, D)

        self.layers = nn.ModuleList(
            nn.ModuleList(
                _ServingUnit(unit, gates[depth][unit], live[depth], width, layer.routing, layer)
                for unit in live[depth + 1]
            )
            for depth, layer in enumerate(model.layers)
        )
        self.task_inputs = nn.ModuleList(
            _ServingUnit(task, gates[-1][task], live[-1], width, model.task_routing)
            for task in range(len(model.towers))
        )
        self.towers = copy.deepcopy(model.towers)

    def forward(self, x: Tensor) -> list[Tensor]:
        first = torch.relu(torch.einsum("bf,jfd->bjd", x, self.first_weight) + self.first_bias)
        hidden = {unit: first[:, index] for index, unit in enumerate(self.first_units)}
        for layer in self.layers:
            hidden = {unit.index: torch.relu(unit(hidden, x)) for unit in layer}

        return [tower(unit(hidden, x)) for tower, unit in zip(self.towers, self.task_inputs)]


class _ServingUnit(nn.Module):
    """One upper sub-network, or one tower's input, with only its open incoming connections."""

    def __init__(
        self,
        index: int,
        z: Tensor,
        lower_live: Sequence[int],
        width: int,
        routing: Routing,
        layer: SubNetworkLayer | None = None,
    ) -> None:
        super().__init__()
        self.index = index
        self.width = width
        self.sources = [j for j in lower_live if z[j] > 0]
        self.register_buffer("z", z[self.sources].clone())  # (J_open,)

        self.weight = None  # (J_open, D, D): SNR-Trans matrices of the open connections
        if routing.weight is not None and self.sources:
            self.weight = nn.Parameter(routing.weight[index, self.sources].detach().clone())
        self.bias = None  # (D,): sub-networks only, tower inputs have none
        self.average_weight = None  # (D, D): SNR-Aver sub-networks with an open input only
        if layer is not None:
            self.bias = nn.Parameter(layer.bias[index].detach().clone())
            if layer.weight is not None and self.sources:
                self.average_weight = nn.Parameter(layer.weight[index].detach().clone())

    def forward(self, lower: dict[int, Tensor], x: Tensor) -> Tensor:
        if not self.sources:
            routed = x.new_zeros(x.shape[0], self.width)
        else:
            stacked = torch.stack([lower[j] for j in self.sources], dim=1)  # (B, J_open, D)
            if self.weight is not None:
                routed = torch.einsum("j,jhd,bjd->bh", self.z, self.weight, stacked)  # (B, D)
            else:
                routed = torch.einsum("j,bjd->bd", self.z, stacked)  # (B, D)
        if self.average_weight is not None:
            routed = routed @ self.average_weight.T
        return routed if self.bias is None else routed + self.bias


def _live_units(gates: list[Tensor]) -> list[list[int]]:
    """Return, per layer of sub-networks, those with an open path to some tower.

    ``gates`` contains the (I, J) evaluation gates of every routing, bottom first, task routing
    last. A sub-network whose own inputs are all closed still counts when it feeds a tower,
    because its bias alone gives it a constant output.
    """
    live = [sorted(j for j in range(gates[-1].shape[1]) if (gates[-1][:, j] > 0).any())]
    for z in reversed(gates[:-1]):
        live.insert(0, sorted({j for i in live[0] for j in range(z.shape[1]) if z[i, j] > 0}))
    return live
