"""Hard-concrete gates and SNR routing, against values computed by hand."""

import math

import pytest
import torch

from models.layers import HardConcreteGate
from models.snr import SNR, prune_for_serving, snr_aver, snr_trans


def gate_with(log_alpha: float, **options) -> HardConcreteGate:
    gate = HardConcreteGate((1,), **options)
    with torch.no_grad():
        gate.log_alpha.fill_(log_alpha)
    return gate


@pytest.mark.parametrize("log_alpha, expected", [(0.0, 0.5), (3.0, 1.0), (-3.0, 0.0)])
def test_evaluation_gate_known_values(log_alpha, expected):
    # sigmoid(0) * 1.2 - 0.1 = 0.5; sigmoid(3) * 1.2 - 0.1 = 1.043 -> 1; sigmoid(-3) * 1.2 - 0.1 < 0 -> 0.
    gate = gate_with(log_alpha).eval()
    assert gate().item() == pytest.approx(expected, abs=1e-7)


def test_expected_l0_value_and_gradient():
    gate = gate_with(0.0)
    penalty = gate.expected_l0()
    # sigmoid(-beta * log(-gamma / zeta)) = sigmoid((2/3) * log(11)) with the defaults.
    by_hand = 1.0 / (1.0 + math.exp(-(2.0 / 3.0) * math.log(11.0)))
    assert penalty.item() == pytest.approx(0.831822, abs=1e-6)
    assert penalty.item() == pytest.approx(by_hand, abs=1e-7)

    penalty.backward()
    assert gate.log_alpha.grad.item() == pytest.approx(0.139894, abs=1e-6)
    assert gate.log_alpha.grad.item() == pytest.approx(by_hand * (1 - by_hand), abs=1e-7)


def test_training_gate_matches_formula_for_drawn_noise():
    gate = gate_with(0.7).train()
    torch.manual_seed(5)
    z = gate()
    torch.manual_seed(5)
    u = torch.rand(1)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + 0.7) / (2.0 / 3.0))
    torch.testing.assert_close(z, torch.clamp(s * 1.2 - 0.1, 0, 1))


def test_training_draws_fresh_noise_every_call():
    gate = HardConcreteGate((50,), init_log_alpha=0.0).train()
    draws = torch.stack([gate() for _ in range(5)])
    assert not torch.equal(draws[0], draws[1])
    # Exact zeros and ones occur because the stretched sample is clamped.
    many = torch.stack([gate() for _ in range(200)])
    assert (many == 0).any()
    assert (many == 1).any()


def test_evaluation_is_deterministic():
    model = snr_trans(input_dim=8, task_dims=(1, 1), width=4).eval()
    x = torch.randn(3, 8)
    for first, second in zip(model(x), model(x)):
        assert torch.equal(first, second)


def test_training_output_is_stochastic():
    model = snr_aver(input_dim=8, task_dims=(1, 1), width=4, gate_init=0.0).train()
    x = torch.randn(3, 8)
    outputs = [torch.cat(model(x), dim=1) for _ in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_gate_options_are_used():
    gate = gate_with(0.0, beta=0.5, gamma=-0.2, zeta=1.2)
    # sigmoid(log_alpha - beta * log(-gamma / zeta)) with log_alpha = 0.
    by_hand = 1.0 / (1.0 + math.exp(0.5 * math.log(0.2 / 1.2)))
    assert gate.expected_l0().item() == pytest.approx(by_hand, abs=1e-7)
    assert gate.eval()().item() == pytest.approx(0.5 * 1.4 - 0.2)


@pytest.mark.parametrize("factory", [snr_trans, snr_aver])
def test_routing_parameters_are_registered(factory):
    model = factory(input_dim=8, task_dims=(1, 1), width=4, subnetworks=(3, 2))
    parameters = {id(p) for p in model.parameters()}
    for gate in model.gates():
        assert id(gate.log_alpha) in parameters
    routings = [layer.routing for layer in model.layers] + [model.task_routing]
    for routing in routings:
        if factory is snr_trans:
            assert id(routing.weight) in parameters
        else:
            assert routing.weight is None
    assert [tuple(g.log_alpha.shape) for g in model.gates()] == [(2, 3), (2, 2)]


def test_trans_computes_gated_sum_of_transforms():
    model = snr_trans(input_dim=4, task_dims=(1,), width=3, subnetworks=(2,))
    routing = model.task_routing
    lower = torch.randn(5, 2, 3)
    with torch.no_grad():
        routing.gate.log_alpha.copy_(torch.tensor([[3.0, -3.0]]))  # z = [[1, 0]]
    routing.eval()
    w = routing.weight  # (1, 2, 3, 3)
    expected = lower[:, 0] @ w[0, 0].T  # only the open connection contributes
    torch.testing.assert_close(routing(lower)[:, 0], expected)


def test_aver_computes_gated_average():
    model = snr_aver(input_dim=4, task_dims=(1, 1), width=3, subnetworks=(2,))
    routing = model.task_routing.eval()
    with torch.no_grad():
        routing.gate.log_alpha.copy_(torch.tensor([[0.0, 3.0], [-3.0, 0.0]]))
    lower = torch.randn(5, 2, 3)
    routed = routing(lower)
    torch.testing.assert_close(routed[:, 0], 0.5 * lower[:, 0] + lower[:, 1])
    torch.testing.assert_close(routed[:, 1], 0.5 * lower[:, 1])


def test_closed_gate_cuts_connection():
    torch.manual_seed(0)
    model = snr_trans(input_dim=4, task_dims=(1, 1), width=3, subnetworks=(2, 2)).eval()
    with torch.no_grad():
        model.task_routing.gate.log_alpha[0, 1] = -10.0
    x = torch.randn(6, 4)
    before = model(x)[0]
    with torch.no_grad():
        model.task_routing.weight[0, 1].normal_()  # weights of the closed connection
    torch.testing.assert_close(model(x)[0], before)


def test_l0_penalty_and_diagnostics():
    model = SNR(input_dim=4, task_dims=(1, 1), width=3, subnetworks=(2, 2), l0_strength=0.5,
                gate_init=0.0)
    penalty = model.regularization_losses()["l0_penalty"]
    assert penalty.item() == pytest.approx(0.5 * 8 * 0.831822, abs=1e-5)
    with torch.no_grad():
        model.task_routing.gate.log_alpha.fill_(-5.0)
    # Evaluation gate at log_alpha = 0: sigmoid(0) * (1.1 + 0.1) - 0.1 = 0.5; at -5 it is
    # 0.0067 * 1.2 - 0.1 < 0, clipped to 0.
    assert model.diagnostics() == pytest.approx({
        "open_connections": 4.0, "open_fraction": 0.5,
        "to_layer_1/mean_gate": 0.5, "to_layer_1/open_fraction": 1.0,
        "to_tasks/mean_gate": 0.0, "to_tasks/open_fraction": 0.0,
    })
    gates = model.connection_gates()
    assert list(gates) == ["to_layer_1", "to_tasks"]
    assert gates["to_tasks"].shape == (2, 2)  # (tasks, sub-networks)


@pytest.mark.parametrize("bad, message", [
    ({"gate_beta": 0.0}, "beta"),
    ({"gate_gamma": 0.1}, "gamma < 0"),
    ({"l0_strength": -1.0}, "l0_strength"),
    ({"subnetworks": (2, 0)}, r"subnetworks\[1\]"),
])
def test_invalid_options_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        snr_trans(input_dim=4, task_dims=(1,), width=3, **bad)


def close_some_gates(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates():
            closed = torch.rand(gate.log_alpha.shape, generator=generator) < 0.4
            gate.log_alpha.masked_fill_(closed, -10.0)


@pytest.mark.parametrize("factory", [snr_trans, snr_aver])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_serving_equals_eval_model(factory, seed):
    torch.manual_seed(seed)
    model = factory(input_dim=6, task_dims=(1, 2), width=5, subnetworks=(3, 3)).eval()
    close_some_gates(model, seed)
    serving = prune_for_serving(model).eval()
    x = torch.randn(7, 6)
    for expected, actual in zip(model(x), serving(x)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_pruning_removes_closed_matrices():
    torch.manual_seed(0)
    model = snr_trans(input_dim=6, task_dims=(1, 1), width=4, subnetworks=(2, 2)).eval()
    with torch.no_grad():
        model.task_routing.gate.log_alpha.copy_(torch.tensor([[3.0, -10.0], [3.0, -10.0]]))
    serving = prune_for_serving(model)
    full = sum(p.numel() for p in model.parameters())
    pruned = sum(p.numel() for p in serving.parameters())
    # Upper sub-network 1 feeds no tower, so its two incoming 4x4 matrices and bias go, and
    # each tower loses one 4x4 matrix. Every log_alpha (8 values) goes too.
    assert full - pruned == 2 * 16 + 4 + 2 * 16 + 8
    torch.testing.assert_close(serving(torch.ones(2, 6))[0], model(torch.ones(2, 6))[0])


def test_pruning_drops_unused_first_layer_subnetwork():
    model = snr_aver(input_dim=6, task_dims=(1,), width=4, subnetworks=(3, 2)).eval()
    with torch.no_grad():
        model.layers[0].routing.gate.log_alpha[:, 2] = -10.0  # nothing reads sub-network 2
    serving = prune_for_serving(model)
    assert serving.first_units == [0, 1]
    assert serving.first_weight.shape == (2, 6, 4)
