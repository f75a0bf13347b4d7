"""The budget sizer hits its targets for every registered model and raises when it cannot."""

import pytest
import torch

from models import MODELS, count_parameters, fit_budget
from models.registry import Registry

TARGETS = (5_000, 20_000, 80_000, 320_000)


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("target", TARGETS)
def test_every_model_within_two_percent(name, target):
    fit = fit_budget(MODELS.get(name), target, input_dim=100, task_dims=(1, 1))
    model = MODELS.build(name, input_dim=100, task_dims=(1, 1), width=fit.width, **fit.options)
    built = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert built == fit.parameters
    assert abs(built - target) / target <= 0.02


def test_fine_knob_used_when_width_alone_misses():
    entry = MODELS.get("mmoe")
    coarse = fit_budget(entry, 20_000, input_dim=100, task_dims=(1, 1), tolerance=0.5)
    assert "tower_hidden" not in coarse.options
    fine = fit_budget(entry, 20_000, input_dim=100, task_dims=(1, 1), tolerance=0.002)
    assert "tower_hidden" in fine.options
    assert abs(fine.parameters - 20_000) <= 40


def test_fixed_options_are_kept():
    fit = fit_budget(MODELS.get("mmoe"), 30_000, 100, (1, 1), options={"num_experts": 4})
    assert fit.options["num_experts"] == 4
    model = MODELS.build("mmoe", input_dim=100, task_dims=(1, 1), width=fit.width, **fit.options)
    assert len(model.experts) == 4


def test_unreachable_budget_raises_with_nearest():
    registry = Registry("model", entry_point_group=None)

    @registry.register("coarse")
    def coarse(input_dim, task_dims, width):
        # 1,000 parameters per width step and no fine knob.
        return torch.nn.Linear(width * 100, 10, bias=False)

    with pytest.raises(ValueError, match=r"Cannot size model 'coarse' to 1,400 parameters.*1,000 at width 1"):
        fit_budget(registry.get("coarse"), 1_400, input_dim=1, task_dims=(1,))


def test_invalid_target_rejected():
    with pytest.raises(ValueError, match="positive integer, got 0"):
        fit_budget(MODELS.get("mmoe"), 0, 10, (1,))


def test_count_parameters_skips_frozen():
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 6
