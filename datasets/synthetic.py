"""Two regression tasks with a controlled correlation, as generated in the MMoE paper.

Ma, Zhao, Yi, Chen, Hong and Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018, section 4.1 (https://doi.org/10.1145/3219819.3220007).

Generation, for a correlation score p in [-1, 1]:

1. Draw orthogonal unit vectors u1, u2 in R^d.
2. Set w1 = c u1 and w2 = c (p u1 + sqrt(1 - p^2) u2), so that cos(w1, w2) = p.
3. Draw x ~ N(0, I_d).
4. y_k = w_k^T x + sum_{i=1..m} sin(alpha_i w_k^T x + beta_i) + eps_k, eps_k ~ N(0, noise_std^2),
   with alpha_i, beta_i ~ N(0, 1) drawn once and shared by both tasks.

The sine terms make the tasks non-linear, so the Pearson correlation of the labels grows with p
but is not equal to it; each dataset reports the correlation it measured on its training split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from datasets import register_dataset
from datasets.base import MultiTaskData, Split, TaskSpec


@dataclass(frozen=True)
class SyntheticTasks:
    """The fixed parts of one synthetic problem: weight vectors and sine parameters (float64)."""

    w1: np.ndarray  # (F,)
    w2: np.ndarray  # (F,)
    alphas: np.ndarray  # (m,)
    betas: np.ndarray  # (m,)
    noise_std: float

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` inputs and their two labels; returns x (n, F) and y (n, 2)."""
        x = rng.standard_normal((n, self.w1.shape[0]))
        projections = x @ np.stack([self.w1, self.w2], axis=1)  # (n, 2)
        # (n, 2, m): one sine per task and per term, summed over the m terms.
        sines = np.sin(projections[:, :, None] * self.alphas + self.betas).sum(axis=2)
        noise = rng.normal(0.0, self.noise_std, size=projections.shape)
        return x, projections + sines + noise


def make_tasks(
    rng: np.random.Generator,
    correlation: float,
    input_dim: int,
    scale: float,
    num_sines: int,
    noise_std: float,
) -> SyntheticTasks:
    """Draw the weight vectors and sine parameters of one problem."""
    # QR of a Gaussian matrix gives two orthonormal columns.
    basis, _ = np.linalg.qr(rng.standard_normal((input_dim, 2)))
    u1, u2 = basis[:, 0], basis[:, 1]
    w1 = scale * u1
    w2 = scale * (correlation * u1 + np.sqrt(1.0 - correlation**2) * u2)

    alphas = rng.standard_normal(num_sines)
    betas = rng.standard_normal(num_sines)
    return SyntheticTasks(w1, w2, alphas, betas, noise_std)


@register_dataset("synthetic")
def synthetic(
    seed: int = 0,
    correlation: float = 0.5,
    input_dim: int = 100,  # d: number of input features
    scale: float = 1.0,  # c: norm of both weight vectors
    num_sines: int = 10,  # m: sine terms per label
    noise_std: float = 0.1,  # standard deviation of the label noise (variance 0.01)
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 2_000,
    data_seed: int | None = None,
) -> MultiTaskData:
    """Generate the two-task regression problem for one correlation score.

    The same seed gives the same tasks and the same samples, bit for bit. By default that is
    the trial's ``seed``, so every seed draws a new problem, and the spread over seeds includes
    how hard each problem is. An integer ``data_seed`` draws one problem for every seed, so the
    seeds differ only in the model's initialisation and the order of training batches.

    Example:
        >>> data = synthetic(seed=0, correlation=0.9, n_train=500, n_val=100, n_test=100)
        >>> data.splits["train"].features.shape
        torch.Size([500, 100])
    """
    _check_arguments(correlation, input_dim, scale, num_sines, noise_std, n_train, n_val, n_test)
    if data_seed is not None and (isinstance(data_seed, bool) or not isinstance(data_seed, int)):
        raise ValueError(
            f"data_seed must be an integer or None, got {data_seed!r}. Leave it out to draw a "
            f"new problem for every seed."
        )
    drawn_with = seed if data_seed is None else data_seed
    rng = np.random.default_rng(drawn_with)
    tasks = make_tasks(rng, correlation, input_dim, scale, num_sines, noise_std)

    splits = {}
    for name, size in (("train", n_train), ("val", n_val), ("test", n_test)):
        x, y = tasks.sample(size, rng)
        splits[name] = Split(
            features=torch.from_numpy(x).float(),
            targets=(torch.from_numpy(y[:, :1]).float(), torch.from_numpy(y[:, 1:]).float()),
        )

    train_labels = splits["train"].targets
    label_correlation = float(
        np.corrcoef(train_labels[0].squeeze(1).numpy(), train_labels[1].squeeze(1).numpy())[0, 1]
    )
    cosine = float(tasks.w1 @ tasks.w2 / (np.linalg.norm(tasks.w1) * np.linalg.norm(tasks.w2)))
    return MultiTaskData(
        tasks=(TaskSpec("task1", "regression"), TaskSpec("task2", "regression")),
        splits=splits,
        info={"label_correlation": label_correlation, "weight_cosine": cosine,
              "seed": drawn_with},
    )


def _check_arguments(
    correlation: float,
    input_dim: int,
    scale: float,
    num_sines: int,
    noise_std: float,
    *sizes: int,
) -> None:
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must lie in [-1, 1], got {correlation!r}.")
    if input_dim < 2:
        raise ValueError(
            f"input_dim must be >= 2 to hold two orthogonal vectors, got {input_dim!r}."
        )
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale!r}.")
    if num_sines < 0:
        raise ValueError(f"num_sines must be >= 0, got {num_sines!r}.")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}.")
    for name, size in zip(("n_train", "n_val", "n_test"), sizes):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size!r}.")
