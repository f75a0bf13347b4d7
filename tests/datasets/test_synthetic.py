"""The synthetic generator of the MMoE paper, and the in-memory batch iterator."""

import numpy as np
import pytest
import torch

from datasets import DATASETS, Split, TensorBatches
from datasets.synthetic import make_tasks, synthetic

SMALL = dict(n_train=4000, n_val=100, n_test=100)


@pytest.mark.parametrize("p", [-0.3, 0.0, 0.5, 0.9, 1.0])
def test_weight_cosine_equals_correlation(p):
    tasks = make_tasks(np.random.default_rng(7), p, input_dim=100, scale=3.0, num_sines=10,
                       noise_std=0.1)
    cosine = tasks.w1 @ tasks.w2 / (np.linalg.norm(tasks.w1) * np.linalg.norm(tasks.w2))
    assert abs(cosine - p) < 1e-9
    assert np.linalg.norm(tasks.w1) == pytest.approx(3.0)
    assert np.linalg.norm(tasks.w2) == pytest.approx(3.0)


def test_labels_follow_formula():
    data = synthetic(seed=2, correlation=0.6, input_dim=5, num_sines=3, noise_std=0.0, **SMALL)
    tasks = make_tasks(np.random.default_rng(2), 0.6, 5, 1.0, 3, 0.0)
    x = data.splits["train"].features.double().numpy()
    for target, w in zip(data.splits["train"].targets, (tasks.w1, tasks.w2)):
        projection = x @ w
        expected = projection + sum(
            np.sin(alpha * projection + beta) for alpha, beta in zip(tasks.alphas, tasks.betas)
        )
        np.testing.assert_allclose(target.squeeze(1).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_same_seed_same_data_other_seed_differs():
    first, second = synthetic(seed=1, **SMALL), synthetic(seed=1, **SMALL)
    third = synthetic(seed=2, **SMALL)
    for name in ("train", "val", "test"):
        assert torch.equal(first.splits[name].features, second.splits[name].features)
        for a, b in zip(first.splits[name].targets, second.splits[name].targets):
            assert torch.equal(a, b)
    assert not torch.equal(first.splits["train"].features, third.splits["train"].features)


def test_data_seed_fixes_problem_across_seeds():
    first = synthetic(seed=1, data_seed=7, **SMALL)
    second = synthetic(seed=2, data_seed=7, **SMALL)
    drawn = synthetic(seed=7, **SMALL)
    for data in (second, drawn):
        for name in ("train", "val", "test"):
            assert torch.equal(first.splits[name].features, data.splits[name].features)
            for a, b in zip(first.splits[name].targets, data.splits[name].targets):
                assert torch.equal(a, b)
    assert first.info["seed"] == 7
    assert synthetic(seed=3, **SMALL).info["seed"] == 3


def test_label_correlation_rises_with_p():
    measured = [
        synthetic(seed=0, correlation=p, **SMALL).info["label_correlation"]
        for p in (0.0, 0.5, 0.7, 0.9, 1.0)
    ]
    assert measured == sorted(measured)
    assert measured[-1] > 0.95
    assert abs(measured[0]) < 0.2


def test_reported_correlation_is_pearson_of_train_labels():
    data = synthetic(seed=4, correlation=0.7, **SMALL)
    y1, y2 = (t.squeeze(1).double().numpy() for t in data.splits["train"].targets)
    by_hand = ((y1 - y1.mean()) * (y2 - y2.mean())).sum() / np.sqrt(
        ((y1 - y1.mean()) ** 2).sum() * ((y2 - y2.mean()) ** 2).sum()
    )
    assert data.info["label_correlation"] == pytest.approx(by_hand, abs=1e-6)


def test_shapes_tasks_and_registry():
    data = DATASETS.build("synthetic", seed=0, input_dim=20, n_train=30, n_val=10, n_test=5)
    assert data.splits["train"].features.shape == (30, 20)
    assert data.splits["test"].targets[1].shape == (5, 1)
    assert [task.kind for task in data.tasks] == ["regression", "regression"]
    assert data.splits["train"].features.dtype == torch.float32


@pytest.mark.parametrize("bad, message", [
    ({"correlation": 1.5}, r"correlation must lie in \[-1, 1\], got 1.5"),
    ({"input_dim": 1}, "input_dim must be >= 2"),
    ({"n_val": 0}, "n_val must be >= 1, got 0"),
    ({"noise_std": -1.0}, "noise_std must be >= 0"),
    ({"data_seed": 1.5}, "data_seed must be an integer or None, got 1.5"),
])
def test_invalid_parameters_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        synthetic(seed=0, **bad)


def test_batches_are_slices_covering_the_split():
    split = Split(torch.arange(20.0).reshape(10, 2), (torch.arange(10.0).reshape(10, 1),))
    batches = list(TensorBatches(split, batch_size=4))
    assert [x.shape[0] for x, _, _ in batches] == [4, 4, 2]
    # Unshuffled batches are views of the split's storage, not copies.
    assert batches[0][0].data_ptr() == split.features.data_ptr()


def test_shuffled_epochs_differ_and_keep_pairs():
    split = Split(torch.arange(10.0).reshape(10, 1), (torch.arange(10.0).reshape(10, 1) * 2,))
    loader = TensorBatches(split, batch_size=3, shuffle=True, seed=1)
    first = torch.cat([x for x, _, _ in loader]).flatten()
    second = torch.cat([x for x, _, _ in loader]).flatten()
    assert sorted(first.tolist()) == list(range(10))
    assert not torch.equal(first, second)
    for x, (y,), _ in loader:
        torch.testing.assert_close(y, x * 2)
