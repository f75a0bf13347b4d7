"""CGC and PLE: equivalence, a forward pass by hand, gate visibility and parameter counts."""

import pytest
import torch

from models.ple import ExtractionLayer, ProgressiveLayeredExtraction, cgc, ple


def perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter))


def visibility_mask(num_tasks: int, shared: int, per_task: int) -> torch.Tensor:
    """Return the (T, E) mask of the experts that each task's gate mixes, built by hand."""
    mask = torch.zeros(num_tasks, shared + num_tasks * per_task, dtype=torch.bool)
    mask[:, :shared] = True
    for task in range(num_tasks):
        start = shared + task * per_task
        mask[task, start : start + per_task] = True
    return mask


def test_one_layer_ple_equals_cgc():
    torch.manual_seed(0)
    single = cgc(input_dim=6, task_dims=(1, 2), width=5, shared_experts=2, task_experts=3)
    torch.manual_seed(1)
    stacked = ple(input_dim=6, task_dims=(1, 2), width=5, num_layers=1, shared_experts=2,
                  task_experts=3)
    stacked.load_state_dict(single.state_dict())

    x = torch.randn(7, 6)
    for expected, actual in zip(single(x), stacked(x)):
        torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(stacked.gate_weights(x), single.gate_weights(x))


def test_cgc_forward_by_hand():
    torch.manual_seed(2)
    model = cgc(input_dim=4, task_dims=(1, 2), width=3, shared_experts=1, task_experts=2,
                tower_hidden=5)
    layer = model.layers[0]
    x = torch.randn(6, 4)

    def expert(bank, member, inputs):
        weight, bias = bank.weights[0][member], bank.biases[0][member]  # (F, D), (D,)
        return torch.relu(inputs @ weight + bias)

    outputs, gate_rows = model(x), model.gate_weights(x)
    for task in range(2):
        experts = [expert(layer.shared_experts, 0, x)]
        experts += [expert(layer.task_experts[task], k, x) for k in range(2)]
        gate = layer.task_gates[task].linear
        weights = torch.softmax(x @ gate.weight.T + gate.bias, dim=1)  # (B, 3)
        mixed = sum(weights[:, [e]] * experts[e] for e in range(3))
        torch.testing.assert_close(outputs[task], model.towers[task](mixed))

        # Order [shared, task 0's two, task 1's two]: task 0 mixes 0, 1, 2 and task 1 mixes 0, 3, 4.
        visible = [0, 1, 2] if task == 0 else [0, 3, 4]
        expected_row = torch.zeros(6, 5)
        expected_row[:, visible] = weights
        torch.testing.assert_close(gate_rows[:, task], expected_row)


def test_extraction_layer_routes_inputs_by_hand():
    # In an upper layer every branch has its own input: the shared experts and the shared gate
    # read the shared input, and task t's experts and gate read task t's input.
    torch.manual_seed(6)
    layer = ExtractionLayer(input_dim=3, num_tasks=2, width=4, shared_experts=1, task_experts=1,
                            expert_layers=1, shared_gate=True)
    shared_input, task_inputs = torch.randn(5, 3), torch.randn(5, 2, 3)

    def expert(bank, inputs):
        return torch.relu(inputs @ bank.weights[0][0] + bank.biases[0][0])  # (B, D)

    experts = [
        expert(layer.shared_experts, shared_input),
        expert(layer.task_experts[0], task_inputs[:, 0]),
        expert(layer.task_experts[1], task_inputs[:, 1]),
    ]
    shared_output, task_outputs = layer(shared_input, task_inputs)

    for task in range(2):
        gate = layer.task_gates[task].linear
        weights = torch.softmax(task_inputs[:, task] @ gate.weight.T + gate.bias, dim=1)  # (B, 2)
        expected = weights[:, [0]] * experts[0] + weights[:, [1]] * experts[1 + task]
        torch.testing.assert_close(task_outputs[:, task], expected)

    gate = layer.shared_gate.linear
    weights = torch.softmax(shared_input @ gate.weight.T + gate.bias, dim=1)  # (B, 3)
    expected = sum(weights[:, [e]] * experts[e] for e in range(3))
    torch.testing.assert_close(shared_output, expected)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_gate_rows_sum_to_one_with_zeros(num_layers):
    model = ple(input_dim=6, task_dims=(1, 1, 2), width=4, num_layers=num_layers,
                shared_experts=2, task_experts=3)
    weights = model.gate_weights(torch.randn(9, 6) * 5)

    assert weights.shape == (9, 3, 2 + 3 * 3)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(9, 3))
    mask = visibility_mask(num_tasks=3, shared=2, per_task=3).expand(9, -1, -1)
    assert (weights[~mask] == 0).all()
    assert (weights[mask] > 0).all()


def test_gate_of_sample_ignores_rest_of_batch():
    model = ple(input_dim=6, task_dims=(1, 1), width=4)
    x = torch.randn(8, 6)
    alone = model.gate_weights(x[:1])
    other_batch = model.gate_weights(torch.cat([x[:1], torch.randn(20, 6) * 100]))[:1]
    torch.testing.assert_close(other_batch, alone)


def test_cgc_task_ignores_other_tasks_experts():
    torch.manual_seed(3)
    model = cgc(input_dim=5, task_dims=(1, 1), width=4, shared_experts=1, task_experts=2)
    x = torch.randn(10, 5)
    before = model(x)

    perturb(model.layers[0].task_experts[1])
    after = model(x)
    assert torch.equal(after[0], before[0])
    assert not torch.allclose(after[1], before[1])


@pytest.mark.parametrize("num_layers, reaches_other_task", [(1, False), (2, True)])
def test_lower_shared_gate_mixes_all_experts(num_layers, reaches_other_task):
    # Task 1's experts in layer 1 reach task 0 only through layer 1's shared gate, which PLE
    # has below its last layer and CGC lacks.
    torch.manual_seed(4)
    model = ple(input_dim=5, task_dims=(1, 1), width=4, num_layers=num_layers)
    x = torch.randn(10, 5)
    before = model(x)[0]

    perturb(model.layers[0].task_experts[1])
    after = model(x)[0]
    if reaches_other_task:
        assert not torch.allclose(after, before)
    else:
        assert torch.equal(after, before)


def test_ple_last_layer_hides_other_tasks_experts():
    torch.manual_seed(5)
    model = ple(input_dim=5, task_dims=(1, 1), width=4, num_layers=2)
    x = torch.randn(10, 5)
    before = model(x)

    perturb(model.layers[-1].task_experts[1])
    after = model(x)
    assert torch.equal(after[0], before[0])
    assert not torch.allclose(after[1], before[1])


def test_only_lower_layers_have_shared_gate():
    model = ple(input_dim=5, task_dims=(1, 1), width=4, num_layers=3)
    assert [layer.shared_gate is not None for layer in model.layers] == [True, True, False]
    assert cgc(input_dim=5, task_dims=(1, 1), width=4).layers[0].shared_gate is None


def count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_parameter_count_by_hand():
    options = dict(input_dim=3, task_dims=(1, 2), width=4, shared_experts=1, task_experts=2,
                   tower_hidden=5)
    # Towers: 4 -> 5 -> 1 and 4 -> 5 -> 2, weights and biases.
    towers = (4 * 5 + 5 + 5 * 1 + 1) + (4 * 5 + 5 + 5 * 2 + 2)  # 68
    # Layer 1 reads the 3 features: 1 + 2 * 2 = 5 experts 3 -> 4, two task gates 3 -> 1 + 2,
    # and (PLE only) a shared gate 3 -> 5.
    experts_1 = 5 * (3 * 4 + 4)  # 80
    task_gates_1 = 2 * (3 * 3 + 3)  # 24
    shared_gate_1 = 3 * 5 + 5  # 20
    # Layer 2 reads the 4 hidden units and has no shared gate.
    experts_2 = 5 * (4 * 4 + 4)  # 100
    task_gates_2 = 2 * (4 * 3 + 3)  # 30

    assert count(cgc(**options)) == experts_1 + task_gates_1 + towers == 172
    assert count(ple(num_layers=2, **options)) == (
        experts_1 + task_gates_1 + shared_gate_1 + experts_2 + task_gates_2 + towers
    ) == 322
    # Two hidden layers per expert: 3 -> 4 -> 4.
    deep_experts = 5 * ((3 * 4 + 4) + (4 * 4 + 4))  # 180
    assert count(cgc(expert_layers=2, **options)) == deep_experts + task_gates_1 + towers == 272


@pytest.mark.parametrize("bad, message", [
    ({"shared_experts": 0}, "`shared_experts` must be a positive integer, got 0"),
    ({"task_experts": -1}, "`task_experts` must be a positive integer, got -1"),
    ({"num_layers": 0}, "`num_layers` must be a positive integer, got 0"),
    ({"expert_layers": 1.5}, "`expert_layers` must be a positive integer, got 1.5"),
])
def test_invalid_options_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        ple(input_dim=4, task_dims=(1, 1), width=3, **bad)


def test_cgc_rejects_num_layers():
    with pytest.raises(ValueError, match="`cgc` always has one extraction layer, got num_layers=2"):
        cgc(input_dim=4, task_dims=(1, 1), width=3, num_layers=2)


def test_no_tasks_rejected():
    with pytest.raises(ValueError, match=r"`task_dims` must contain .* one task, got \(\)"):
        ProgressiveLayeredExtraction(input_dim=4, task_dims=())
