"""Cross-stitch networks: independent columns at identity, unit arithmetic, gradients, sizes."""

import pytest
import torch

from models.cross_stitch import CrossStitch, CrossStitchUnit, cross_stitch
from models.layers import MLP


def count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_identity_alpha_equals_independent_columns():
    torch.manual_seed(0)
    model = cross_stitch(input_dim=5, task_dims=(1, 3), width=4, num_layers=3, alpha_same=1.0,
                         alpha_other=0.0, tower_hidden=6)
    for stitch in model.stitches:
        assert torch.equal(stitch.alpha.detach(), torch.eye(2))

    x = torch.randn(8, 5)
    outputs = model(x)
    for task in range(2):
        column = MLP(5, [4, 4, 4])  # the task's column on its own, ReLU after every layer
        with torch.no_grad():
            for linear, layer in zip(list(column)[0::2], model.columns):
                linear.weight.copy_(layer.weight[task].T)  # (D, F) from (F, D)
                linear.bias.copy_(layer.bias[task])
        expected = model.towers[task](column(x))
        torch.testing.assert_close(outputs[task], expected)


@pytest.mark.parametrize("num_tasks, alpha_other", [(2, 0.1), (3, 0.05), (5, 0.025)])
def test_default_alpha_rows_start_at_one(num_tasks, alpha_other):
    model = cross_stitch(input_dim=4, task_dims=(1,) * num_tasks, width=3)
    alpha = model.stitches[0].alpha.detach()
    assert torch.allclose(alpha.diagonal(), torch.full((num_tasks,), 0.9))
    off_diagonal = alpha[~torch.eye(num_tasks, dtype=torch.bool)]
    assert torch.allclose(off_diagonal, torch.full_like(off_diagonal, alpha_other))
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(num_tasks))


def test_one_task_alpha_is_alpha_same():
    model = cross_stitch(input_dim=4, task_dims=(2,), width=3)
    assert torch.allclose(model.stitches[0].alpha.detach(), torch.tensor([[0.9]]))


def test_alpha_options_set_initial_values():
    model = cross_stitch(input_dim=4, task_dims=(1, 1, 1), width=3, alpha_same=0.6,
                         alpha_other=0.3)
    expected = torch.tensor([[0.6, 0.3, 0.3], [0.3, 0.6, 0.3], [0.3, 0.3, 0.6]])
    for stitch in model.stitches:
        torch.testing.assert_close(stitch.alpha.detach(), expected)


def test_unit_combines_columns_by_hand():
    unit = CrossStitchUnit(num_tasks=2, width=3, alpha_same=0.0, alpha_other=0.0, per_unit=False)
    with torch.no_grad():
        unit.alpha.copy_(torch.tensor([[0.9, 0.1], [0.3, 0.7]]))
    columns = torch.randn(4, 2, 3)
    stitched = unit(columns)
    torch.testing.assert_close(stitched[:, 0], 0.9 * columns[:, 0] + 0.1 * columns[:, 1])
    torch.testing.assert_close(stitched[:, 1], 0.3 * columns[:, 0] + 0.7 * columns[:, 1])


def test_per_unit_alpha_by_hand():
    unit = CrossStitchUnit(num_tasks=2, width=2, alpha_same=0.9, alpha_other=0.1, per_unit=True)
    assert unit.alpha.shape == (2, 2, 2)
    with torch.no_grad():
        unit.alpha[0, 1, 1] = 0.5  # column 0's second unit takes more of column 1
    columns = torch.tensor([[[1.0, 2.0], [10.0, 20.0]]])  # (B=1, T=2, D=2)
    expected = torch.tensor([[[0.9 * 1 + 0.1 * 10, 0.9 * 2 + 0.5 * 20],
                              [0.1 * 1 + 0.9 * 10, 0.1 * 2 + 0.9 * 20]]])
    torch.testing.assert_close(unit(columns), expected)


def test_stitch_units_get_gradients():
    torch.manual_seed(1)
    model = cross_stitch(input_dim=5, task_dims=(1, 1), width=4, num_layers=2)
    loss = model(torch.randn(16, 5))[0].square().sum()  # task 0's loss alone
    loss.backward()

    for stitch in model.stitches:
        assert stitch.alpha.grad is not None
        assert (stitch.alpha.grad[0] != 0).all()  # both columns feed task 0
    # Task 1's column learns from task 0's loss through the units' off-diagonal alphas.
    assert model.columns[0].weight.grad[1].abs().sum() > 0


def test_parameter_count_by_hand():
    options = dict(input_dim=3, task_dims=(1, 2), width=4, num_layers=2, tower_hidden=5)
    # Two columns of layers 3 -> 4 and 4 -> 4.
    columns = 2 * (3 * 4 + 4) + 2 * (4 * 4 + 4)  # 72
    # Towers: 4 -> 5 -> 1 and 4 -> 5 -> 2.
    towers = (4 * 5 + 5 + 5 * 1 + 1) + (4 * 5 + 5 + 5 * 2 + 2)  # 68
    # A 2 x 2 alpha per hidden layer, or a 2 x 2 alpha per hidden layer and hidden unit.
    per_pair, per_unit = 2 * 2 * 2, 2 * 2 * 2 * 4

    assert count(cross_stitch(**options)) == columns + per_pair + towers == 148
    per_unit_model = cross_stitch(stitch_per_unit=True, **options)
    assert count(per_unit_model) == columns + per_unit + towers == 172


@pytest.mark.parametrize("bad, message", [
    ({"num_layers": 0}, "`num_layers` must be a positive integer, got 0"),
    ({"alpha_same": "high"}, "`alpha_same` must be a finite real number, got 'high'"),
    ({"alpha_other": float("nan")}, "`alpha_other` must be a finite real number, got nan"),
    ({"alpha_same": float("inf")}, "`alpha_same` must be a finite real number, got inf"),
    ({"stitch_per_unit": "yes"}, "`stitch_per_unit` must be true or false, got 'yes'"),
])
def test_invalid_options_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        cross_stitch(input_dim=4, task_dims=(1, 1), width=3, **bad)


def test_no_tasks_rejected():
    with pytest.raises(ValueError, match=r"`task_dims` must contain .* one task, got \(\)"):
        CrossStitch(input_dim=4, task_dims=())
