"""Loss weightings: known values worked out by hand, errors, and training through the wrapper."""

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from datasets import Split, TaskSpec, TensorBatches
from models.lightning import MultiTaskModule, task_loss
from models.shared_bottom import SharedBottom, SingleTask
from models.weighting import (
    WEIGHTINGS,
    EqualWeighting,
    FixedWeighting,
    GradNorm,
    PCGrad,
    UncertaintyWeighting,
    project_conflicting,
)

TWO_BINARY = [TaskSpec("a", "binary"), TaskSpec("b", "binary")]


def run_backward(loss):
    loss.backward()


class LinearLosses(nn.Module):
    """A shared 2-vector theta and one scalar tower per task; losses are built by the test."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta))
        self.towers = nn.ParameterList([nn.Parameter(torch.tensor(1.0)) for _ in range(2)])


def test_builtin_weightings_registered():
    assert {"equal", "fixed", "uncertainty", "gradnorm", "pcgrad"} <= set(WEIGHTINGS.names())


def test_unknown_weighting_suggests_nearest():
    with pytest.raises(KeyError, match=r"Unknown weighting 'gradnrom'. Did you mean 'gradnorm'\?"):
        WEIGHTINGS.get("gradnrom")


# PCGrad


def test_pcgrad_projects_conflicting_pair():
    # g1 . g2 = -1 < 0, so each is projected on the normal plane of the other:
    # g1' = g1 - (-1 / |g2|^2) g2 = (1, 0) + (-1, 1) / 2 = (0.5, 0.5)
    # g2' = g2 - (-1 / |g1|^2) g1 = (-1, 1) + (1, 0) = (0, 1)
    projected = project_conflicting(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    assert projected[0].tolist() == pytest.approx([0.5, 0.5])
    assert projected[1].tolist() == pytest.approx([0.0, 1.0])
    assert float(projected[0] @ torch.tensor([-1.0, 1.0])) == pytest.approx(0.0)


def test_pcgrad_keeps_agreeing_gradients():
    gradients = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.equal(project_conflicting(gradients), gradients)


def test_pcgrad_backward_fills_shared_and_tower_gradients():
    model = LinearLosses([1.0, 2.0])
    tower_a, tower_b = model.towers
    # grad_theta L_a = (1, 0) and grad_theta L_b = (-1, 1); the towers enter linearly with
    # slopes 3 and 5. The regularisation term |theta|^2 / 2 has gradient theta = (1, 2).
    loss_a = model.theta @ torch.tensor([1.0, 0.0]) + 3.0 * tower_a
    loss_b = model.theta @ torch.tensor([-1.0, 1.0]) + 5.0 * tower_b
    regularization = 0.5 * (model.theta**2).sum()
    terms = torch.stack([loss_a, loss_b, regularization])

    loss = PCGrad(TWO_BINARY).backward(terms, model, run_backward)

    # Projected sum (0.5, 0.5) + (0, 1) = (0.5, 1.5), plus the regularisation gradient (1, 2).
    assert model.theta.grad.tolist() == pytest.approx([1.5, 3.5])
    assert tower_a.grad.item() == pytest.approx(3.0)
    assert tower_b.grad.item() == pytest.approx(5.0)
    assert loss.item() == pytest.approx(1.0 + 3.0 + 1.0 + 5.0 + 2.5)


def test_pcgrad_logs_no_weights():
    assert PCGrad(TWO_BINARY).weights() is None


# Uncertainty weighting


@pytest.mark.parametrize("half_factors, expected_loss, expected_gradient, expected_weights", [
    # L = 1/2 e^{-s1} L1 + s1/2 + e^{-s2} L2 + s2/2 with L = (3, 0.5), s = (ln 2, 0):
    # 0.75 + ln2/2 + 0.5; dL/ds1 = -0.75 + 0.5, dL/ds2 = -0.5 + 0.5.
    (True, 1.25 + math.log(2) / 2, [-0.25, 0.0], [0.25, 1.0]),
    # L = e^{-s1} L1 + s1 + e^{-s2} L2 + s2: 1.5 + ln2 + 0.5; dL/ds = (-1.5 + 1, -0.5 + 1).
    (False, 2.0 + math.log(2), [-0.5, 0.5], [0.5, 1.0]),
])
def test_uncertainty_loss_and_gradient(half_factors, expected_loss, expected_gradient,
                                       expected_weights):
    tasks = [TaskSpec("y", "regression"), TaskSpec("c", "binary")]
    weighting = UncertaintyWeighting(tasks, half_factors=half_factors)
    with torch.no_grad():
        weighting.log_variances.copy_(torch.tensor([math.log(2.0), 0.0]))

    loss = weighting.combine(torch.tensor([3.0, 0.5]))
    loss.backward()

    assert loss.item() == pytest.approx(expected_loss)
    assert weighting.log_variances.grad.tolist() == pytest.approx(expected_gradient)
    assert weighting.weights().tolist() == pytest.approx(expected_weights)


def test_uncertainty_adds_regularization_with_weight_one():
    weighting = UncertaintyWeighting(TWO_BINARY)
    terms = torch.tensor([2.0, 4.0, 0.25])
    # s = 0: 2 + 4 from the tasks, 0 from s, and the penalty 0.25 unweighted.
    assert weighting.total_loss(terms).item() == pytest.approx(6.25)


# GradNorm


class TwoLossLayer(nn.Module):
    """A shared layer W = (w0, w1) with L1 = w0 and L2 = 6 w0 + 8 w1.

    Hence |grad_W L1| = 1 and |grad_W L2| = 10; at W = (1, 1) the losses are 1 and 14.
    """

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def last_shared_parameters(self):
        return [self.weight]

    def losses(self):
        w0, w1 = self.weight
        return torch.stack([w0, 6 * w0 + 8 * w1])


def test_gradnorm_one_weight_update():
    model = TwoLossLayer()
    learning_rate, alpha = 0.1, 1.5
    weighting = GradNorm(TWO_BINARY, alpha=alpha, learning_rate=learning_rate)
    with torch.no_grad():
        weighting.task_weights.copy_(torch.tensor([0.5, 1.5]))
    weighting.initial_losses = torch.tensor([2.0, 7.0])

    loss = weighting.backward(model.losses(), model, run_backward)

    # G = w * |grad_W L| = (0.5, 15), mean 7.75.
    # Loss ratios L / L(0) = (0.5, 2), mean 1.25, so r = (0.4, 1.6).
    norms = [0.5 * 1.0, 1.5 * 10.0]
    mean_norm = sum(norms) / 2
    r = [0.5 / 1.25, 2.0 / 1.25]
    targets = [mean_norm * value**alpha for value in r]
    assert targets == pytest.approx([1.9606, 15.6849], abs=1e-4)
    assert weighting.gradient_norms.tolist() == pytest.approx(norms)
    assert weighting.target_norms.tolist() == pytest.approx(targets)

    # Both G_t lie below their targets, so dL_grad/dw_t = -|grad_W L_t| = (-1, -10).
    assert weighting.task_weights.grad.tolist() == pytest.approx([-1.0, -10.0])
    # The model trains on 0.5 L1 + 1.5 L2: grad_W = 0.5 (1, 0) + 1.5 (6, 8).
    assert model.weight.grad.tolist() == pytest.approx([9.5, 12.0])
    assert loss.item() == pytest.approx(0.5 * 1 + 1.5 * 14)

    weighting.after_step()

    # Adam's first step is lr * g / (|g| + eps) because its bias-corrected moments are g and
    # g^2; then the weights (0.6, 1.6) are rescaled to sum to 2.
    stepped = [w - learning_rate * g / (abs(g) + 1e-8) for w, g in zip([0.5, 1.5], [-1.0, -10.0])]
    renormalised = [2 * w / sum(stepped) for w in stepped]
    assert renormalised == pytest.approx([0.6 / 1.1, 1.6 / 1.1])
    assert weighting.weights().tolist() == pytest.approx(renormalised)


def test_gradnorm_first_step_sets_initial_losses():
    model = TwoLossLayer()
    weighting = GradNorm(TWO_BINARY)
    weighting.backward(model.losses(), model, run_backward)
    assert weighting.initial_losses.tolist() == pytest.approx([1.0, 14.0])
    # At the first step every r_t is 1, so every target is the mean of G = (1, 10).
    assert weighting.target_norms.tolist() == pytest.approx([5.5, 5.5])


def test_gradnorm_rejects_model_without_shared_layer():
    model = SingleTask(input_dim=3, task_dims=(1, 1), width=4)
    outputs = model(torch.zeros(2, 3))
    terms = torch.stack([output.sum() for output in outputs])
    with pytest.raises(ValueError, match=r"`SingleTask` shares none.*Use another weighting"):
        GradNorm(TWO_BINARY).backward(terms, model, run_backward)


@pytest.mark.parametrize("options, message", [
    ({"alpha": -1.0}, r"`alpha` must be a number >= 0, got -1.0"),
    ({"learning_rate": 0}, r"`learning_rate` must be a number > 0, got 0"),
])
def test_gradnorm_invalid_options(options, message):
    with pytest.raises(ValueError, match=message):
        GradNorm(TWO_BINARY, **options)


# Fixed and equal weights


@pytest.mark.parametrize("weights", [[2.0, 0.5], {"b": 0.5, "a": 2.0}])
def test_fixed_weights_scale_losses(weights):
    weighting = FixedWeighting(TWO_BINARY, weights=weights)
    assert weighting.combine(torch.tensor([3.0, 4.0])).item() == pytest.approx(2 * 3 + 0.5 * 4)
    assert weighting.total_loss(torch.tensor([3.0, 4.0, 1.0])).item() == pytest.approx(9.0)
    assert weighting.weights().tolist() == [2.0, 0.5]


@pytest.mark.parametrize("weights, error, message", [
    ([1.0], ValueError, r"have 1 values for 2 tasks \['a', 'b'\]"),
    ({"a": 1.0, "c": 2.0}, ValueError, r"unknown task\(s\) \['c'\]; the tasks are \['a', 'b'\]"),
    ({"a": 1.0}, ValueError, r"are missing task\(s\) \['b'\]"),
    ([1.0, -0.5], ValueError, r"task 'b' is negative \(-0.5\); weights must be >= 0"),
    ([0, 0], ValueError, r"all 0, so no task would be trained"),
    ([1.0, "x"], ValueError, r"task 'b' must be a finite number, got 'x'"),
    ("1,2", TypeError, r"mapping from task name to weight or a list in task order, got '1,2'"),
])
def test_fixed_weights_invalid(weights, error, message):
    with pytest.raises(error, match=message):
        FixedWeighting(TWO_BINARY, weights=weights)


def tiny_data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=generator)
    split = Split(x, (x[:, :1] * 2, (x[:, 1:2] > 0).float()))
    tasks = [TaskSpec("reg", "regression"), TaskSpec("cls", "binary")]
    return split, tasks


def quiet_trainer(max_epochs, **options):
    return pl.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      num_sanity_val_steps=0, accelerator="cpu", **options)


def test_equal_matches_plain_training_loop():
    split, tasks = tiny_data()
    torch.manual_seed(0)
    model = SharedBottom(3, (1, 1), width=8)
    reference = copy.deepcopy(model)

    module = MultiTaskModule(model, tasks, learning_rate=0.01)
    assert isinstance(module.weighting, EqualWeighting)
    quiet_trainer(2).fit(module, TensorBatches(split, 16), TensorBatches(split, 64))

    # The training step before loss weightings existed: sum the stacked terms, one backward.
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.01, foreach=True)
    for _ in range(2):
        for features, targets, weights in TensorBatches(split, 16):
            terms = [task_loss(task, output, target, weights)
                     for task, output, target in zip(tasks, reference(features), targets)]
            optimizer.zero_grad()
            torch.stack(terms).sum().backward()
            optimizer.step()
    for (name, trained), expected in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(trained, expected), name


WEIGHTING_OPTIONS = {"fixed": {"weights": {"reg": 0.5, "cls": 2.0}}}


@pytest.mark.parametrize("name", ["equal", "fixed", "uncertainty", "gradnorm", "pcgrad"])
@pytest.mark.parametrize("model_name", ["shared_bottom", "mmoe"])
def test_training_logs_loss_weights(name, model_name):
    from models import MODELS

    split, tasks = tiny_data()
    torch.manual_seed(0)
    model = MODELS.build(model_name, input_dim=3, task_dims=(1, 1), width=4)
    weighting = WEIGHTINGS.build(name, tasks=tasks, **WEIGHTING_OPTIONS.get(name, {}))
    module = MultiTaskModule(model, tasks, learning_rate=0.01, weighting=weighting)
    quiet_trainer(2).fit(module, TensorBatches(split, 16, shuffle=True), TensorBatches(split, 64))

    metrics = module.epoch_metrics
    assert math.isfinite(metrics["train/loss"])
    assert math.isfinite(metrics["val/selection_score"])
    logged = {key: value for key, value in metrics.items() if key.endswith("/loss_weight")}
    if name == "pcgrad":
        assert logged == {}
        return
    assert set(logged) == {"train/reg/loss_weight", "train/cls/loss_weight"}
    weights = [logged["train/reg/loss_weight"], logged["train/cls/loss_weight"]]
    if name == "equal":
        assert weights == [1.0, 1.0]
    elif name == "fixed":
        assert weights == [0.5, 2.0]
    elif name == "gradnorm":
        assert sum(weights) == pytest.approx(2.0)
        assert weights != pytest.approx([1.0, 1.0])
    else:
        # The log-variances moved away from 0, where the weights are (1/2, 1).
        assert weights != pytest.approx([0.5, 1.0])
        assert all(weight > 0 for weight in weights)


def test_uncertainty_log_variances_in_optimizer_without_decay():
    _, tasks = tiny_data()
    weighting = UncertaintyWeighting(tasks)
    module = MultiTaskModule(SharedBottom(3, (1, 1), width=4), tasks, weight_decay=0.1,
                             weighting=weighting)
    groups = module.configure_optimizers().param_groups
    assert groups[0]["weight_decay"] == 0.1
    assert groups[1]["params"] == [weighting.log_variances]
    assert groups[1]["weight_decay"] == 0.0


def test_gradnorm_weights_not_in_model_optimizer():
    _, tasks = tiny_data()
    module = MultiTaskModule(SharedBottom(3, (1, 1), width=4), tasks, weighting=GradNorm(tasks))
    assert len(module.configure_optimizers().param_groups) == 1


@pytest.mark.parametrize("name", ["gradnorm", "pcgrad"])
def test_per_task_gradients_rejected_under_ddp(name):
    _, tasks = tiny_data()
    module = MultiTaskModule(SharedBottom(3, (1, 1), width=4), tasks,
                             weighting=WEIGHTINGS.build(name, tasks=tasks))
    module.trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(RuntimeError, match=r"bypasses the gradient synchronisation of "
                                           r"distributed data parallel.*on 2 processes"):
        module.on_fit_start()


def test_single_backward_weightings_allowed_under_ddp():
    _, tasks = tiny_data()
    module = MultiTaskModule(SharedBottom(3, (1, 1), width=4), tasks,
                             weighting=UncertaintyWeighting(tasks))
    module.trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    module.on_fit_start()


def test_shared_parameters_of_builtin_models():
    from models import MODELS

    mmoe = MODELS.build("mmoe", input_dim=3, task_dims=(1, 1), width=4, num_experts=2)
    shared = {id(p) for p in mmoe.shared_parameters()}
    assert shared == {id(p) for p in mmoe.experts.parameters()}
    assert mmoe.last_shared_parameters() == [mmoe.experts.weights[-1]]

    omoe = MODELS.build("omoe", input_dim=3, task_dims=(1, 1), width=4, num_experts=2)
    assert {id(p) for p in omoe.gates.parameters()} <= {id(p) for p in omoe.shared_parameters()}

    bottom = SharedBottom(3, (1, 1), width=4, bottom_layers=2)
    assert bottom.last_shared_parameters() == [bottom.bottom[2].weight]
    assert SingleTask(3, (1, 1), width=4).shared_parameters() == []

    snr_aver = MODELS.build("snr_aver", input_dim=3, task_dims=(1, 1), width=4)
    assert snr_aver.last_shared_parameters() == [snr_aver.layers[-1].weight]
    snr_trans = MODELS.build("snr_trans", input_dim=3, task_dims=(1, 1), width=4)
    assert snr_trans.last_shared_parameters() == [snr_trans.task_routing.weight]


def test_gradnorm_fit_rejects_single_task_before_training():
    split, tasks = tiny_data()
    model = SingleTask(input_dim=3, task_dims=(1, 1), width=4)
    before = copy.deepcopy(model.state_dict())
    module = MultiTaskModule(model, tasks, weighting=GradNorm(tasks))
    with pytest.raises(ValueError, match=r"GradNorm needs the weights of a shared layer"):
        quiet_trainer(1).fit(module, TensorBatches(split, 16), TensorBatches(split, 64))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
