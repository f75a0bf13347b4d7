"""Mixture-of-experts models: equivalence with Shared-Bottom, gate properties."""

import torch

from models.layers import MLP, ParallelMLP
from models.moe import mmoe, omoe
from models.shared_bottom import SharedBottom


def test_one_expert_mmoe_equals_shared_bottom():
    torch.manual_seed(0)
    bottom = SharedBottom(input_dim=6, task_dims=(1, 2), width=5, tower_hidden=4)
    mixture = mmoe(input_dim=6, task_dims=(1, 2), width=5, tower_hidden=4, num_experts=1)
    with torch.no_grad():
        mixture.experts.weights[0][0].copy_(bottom.bottom[0].weight.T)  # (F, D) from (D, F)
        mixture.experts.biases[0][0].copy_(bottom.bottom[0].bias)
    mixture.towers.load_state_dict(bottom.towers.state_dict())

    x = torch.randn(7, 6)
    for expected, actual in zip(bottom(x), mixture(x)):
        torch.testing.assert_close(actual, expected)


def test_gate_rows_sum_to_one():
    model = mmoe(input_dim=6, task_dims=(1, 1, 1), width=4, num_experts=5)
    weights = model.gate_weights(torch.randn(9, 6) * 5)
    assert weights.shape == (9, 3, 5)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(9, 3))
    assert (weights >= 0).all()


def test_gate_of_sample_ignores_rest_of_batch():
    model = mmoe(input_dim=6, task_dims=(1, 1), width=4, num_experts=3)
    x = torch.randn(8, 6)
    alone = model.gate_weights(x[:1])
    in_batch = model.gate_weights(x)[:1]
    other_batch = model.gate_weights(torch.cat([x[:1], torch.randn(20, 6) * 100]))[:1]
    torch.testing.assert_close(in_batch, alone)
    torch.testing.assert_close(other_batch, alone)


def test_parallel_experts_equal_separate_mlps():
    torch.manual_seed(2)
    bank = ParallelMLP(5, [4, 3], num_members=2)
    x = torch.randn(6, 5)
    for member in range(2):
        separate = MLP(5, [4, 3])
        with torch.no_grad():
            for layer, (weight, bias) in zip([separate[0], separate[2]], zip(bank.weights, bank.biases)):
                layer.weight.copy_(weight[member].T)
                layer.bias.copy_(bias[member])
        torch.testing.assert_close(bank(x)[:, member], separate(x))


def test_mmoe_gates_differ_per_task_omoe_shares_one():
    torch.manual_seed(1)
    x = torch.randn(4, 6)
    multi = mmoe(input_dim=6, task_dims=(1, 1), width=4, num_experts=3).gate_weights(x)
    one = omoe(input_dim=6, task_dims=(1, 1), width=4, num_experts=3).gate_weights(x)
    assert not torch.allclose(multi[:, 0], multi[:, 1])
    torch.testing.assert_close(one[:, 0], one[:, 1])
    assert len(omoe(input_dim=6, task_dims=(1, 1), width=4).gates) == 1
