"""Contract tests run for every registered model, so a newly registered one is covered too."""

import pytest
import torch

from models import MODELS

INPUT_DIM = 12
TASK_DIMS = (1, 3)
BATCH = 5


def build(name: str, seed: int = 0, width: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS.build(name, input_dim=INPUT_DIM, task_dims=TASK_DIMS, width=width)


@pytest.fixture(params=MODELS.names())
def model_name(request) -> str:
    return request.param


def test_output_shape_per_task(model_name):
    outputs = build(model_name)(torch.randn(BATCH, INPUT_DIM))
    assert len(outputs) == len(TASK_DIMS)
    for output, dim in zip(outputs, TASK_DIMS):
        assert output.shape == (BATCH, dim)


def test_gradient_reaches_every_parameter(model_name):
    model = build(model_name)
    outputs = model(torch.randn(BATCH, INPUT_DIM))
    loss = sum(output.square().sum() for output in outputs)
    loss = loss + sum(getattr(model, "regularization_losses", dict)().values(), torch.tensor(0.0))
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} received no gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} received an all-zero gradient"


def test_outputs_are_finite(model_name):
    model = build(model_name)
    for mode in (model.train, model.eval):
        mode()
        for output in model(torch.randn(BATCH, INPUT_DIM) * 10):
            assert torch.isfinite(output).all()


def test_same_seed_same_output(model_name):
    x = torch.randn(BATCH, INPUT_DIM)
    first, second = build(model_name, seed=3).eval(), build(model_name, seed=3).eval()
    for a, b in zip(first(x), second(x)):
        assert torch.equal(a, b)
    third = build(model_name, seed=4).eval()
    assert not all(torch.equal(a, b) for a, b in zip(first(x), third(x)))


def test_width_never_shrinks_parameters(model_name):
    counts = [
        sum(p.numel() for p in build(model_name, width=width).parameters())
        for width in (1, 2, 4, 8, 16, 32)
    ]
    assert counts == sorted(counts)
    assert counts[-1] > counts[0]
