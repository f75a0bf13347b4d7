"""Building blocks shared by the models: MLPs, softmax gates and hard-concrete gates.

Dimension key: B batch, F input features, T tasks, E experts, D hidden units,
I and J sub-networks of an upper and a lower layer, O outputs of one task head.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


class MLP(nn.Sequential):
    """Linear layers with ReLU after every hidden layer and none after the output layer.

    Args:
        input_dim: Size of the input.
        hidden_dims: Sizes of the hidden layers, each followed by ReLU.
        output_dim: Size of a final linear layer without activation; None to end on the last
            hidden layer (and its ReLU).

    Example:
        >>> MLP(4, [8], 2)(torch.zeros(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self, input_dim: int, hidden_dims: Sequence[int], output_dim: int | None = None
    ) -> None:
        layers: list[nn.Module] = []
        size = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(size, hidden), nn.ReLU()]
            size = hidden
        if output_dim is not None:
            layers.append(nn.Linear(size, output_dim))
            size = output_dim
        super().__init__(*layers)
        self.output_dim = size


class ParallelMLP(nn.Module):
    """E independent MLPs on the same input, computed with one batched product per layer.

    Equivalent to E separate :class:`MLP` s with ReLU after every layer, (B, F) -> (B, E, D), but
    it runs one matrix product per layer instead of E, which matters for small experts.

    Args:
        input_dim: Size of the shared input F.
        hidden_dims: Hidden sizes of every member, each layer followed by ReLU.
        num_members: Number of MLPs E.

    Example:
        >>> ParallelMLP(4, [8], num_members=3)(torch.zeros(2, 4)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], num_members: int) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        size = input_dim
        for hidden in hidden_dims:
            # The same uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) range as nn.Linear's default.
            bound = 1.0 / math.sqrt(size)
            self.weights.append(nn.Parameter(torch.empty(num_members, size, hidden).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_members, hidden).uniform_(-bound, bound)))
            size = hidden
        self.output_dim = size
        self.num_members = num_members

    def __len__(self) -> int:
        return self.num_members

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weights[0], self.biases[0]
        hidden = torch.relu(torch.einsum("bf,efd->bed", x, weight) + bias)  # (B, E, D)
        for weight, bias in zip(self.weights[1:], self.biases[1:]):
            hidden = torch.relu(torch.einsum("bed,edk->bek", hidden, weight) + bias)  # (B, E, D)
        return hidden


class SoftmaxGate(nn.Module):
    """A linear map of the input followed by softmax over experts: (B, F) -> (B, E).

    Every sample's weights depend on that sample alone and sum to 1 over the experts.
    """

    def __init__(self, input_dim: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.linear(x), dim=-1)


class HardConcreteGate(nn.Module):
    """A tensor of hard-concrete gates with the expected-L0 penalty.

    Louizos, Welling and Kingma, "Learning Sparse Neural Networks through L0 Regularization",
    ICLR 2018 (https://arxiv.org/abs/1712.01312), equations 9 to 13.

    Each gate has one learned ``log_alpha``. In training mode every call draws fresh noise
    u ~ U(0, 1) and returns z = clamp(s (zeta - gamma) + gamma, 0, 1) with
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta), so gates can be exactly 0 or 1 and the
    sample is differentiable in ``log_alpha``. In evaluation mode it returns the noise-free
    z = clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1).

    Args:
        shape: Shape of the gate tensor, for example (I, J) for the connections between layers.
        beta: Temperature of the concrete distribution.
        gamma: Lower end of the stretched interval; must be < 0.
        zeta: Upper end of the stretched interval; must be > 1.
        init_log_alpha: Initial value of every ``log_alpha``; larger values start gates open.

    Example:
        >>> gate = HardConcreteGate((2, 3), init_log_alpha=0.0).eval()
        >>> gate()
        tensor([[0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000]], grad_fn=<ClampBackward1>)
    """

    def __init__(
        self,
        shape: Sequence[int],
        beta: float = 2.0 / 3.0,
        gamma: float = -0.1,
        zeta: float = 1.1,
        init_log_alpha: float = 2.0,
    ) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"Hard-concrete `beta` must be > 0, got {beta!r}.")
        if not gamma < 0 < 1 < zeta:
            raise ValueError(
                f"Hard-concrete stretch needs gamma < 0 and zeta > 1, got gamma={gamma!r}, "
                f"zeta={zeta!r}."
            )
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self.log_alpha = nn.Parameter(torch.full(tuple(shape), float(init_log_alpha)))

    def forward(self) -> Tensor:
        if self.training:
            # Keep u away from 0 and 1 so that both logarithms stay finite.
            eps = torch.finfo(self.log_alpha.dtype).eps
            u = torch.rand_like(self.log_alpha).clamp(eps, 1.0 - eps)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return torch.clamp(s * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def open_probability(self) -> Tensor:
        """Return P(z != 0) per gate, the differentiable expected-L0 term (same shape as the gates)."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def expected_l0(self) -> Tensor:
        """Return the expected number of open gates, a differentiable scalar."""
        return self.open_probability().sum()
