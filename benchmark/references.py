"""Independent non-neural references, reported in the same tables as the models.

A reference tells a reader whether the neural models land in a sane range on a dataset. It is
trained per task on the same splits as the models and scored with the same metric functions.

A reference function is called as ``function(data, seed=..., **options)`` with a
:class:`datasets.base.MultiTaskData` and returns test metrics named ``test/<task>/<metric>``.
Register one with ``@register_reference("name")``.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

from datasets.base import MultiTaskData, StreamSplit
from models.lightning import task_metrics
from models.registry import Registry

REFERENCES: Registry = Registry("reference", entry_point_group="mtl_bench.references")
register_reference = REFERENCES.register


@register_reference("sklearn_gbdt")
def sklearn_gbdt(
    data: MultiTaskData,
    seed: int = 0,
    max_iter: int = 200,  # boosting rounds, at most
    learning_rate: float = 0.1,
    max_leaf_nodes: int = 31,
) -> dict[str, float]:
    """Fit scikit-learn's histogram gradient boosting per task and score it on the test split.

    Early stopping holds out 10 % of the training split, so neither validation nor test data
    steer the fit. Multi-output tasks are not supported.
    """
    train, test = data.splits["train"], data.splits["test"]
    if isinstance(train, StreamSplit) or isinstance(test, StreamSplit):
        raise ValueError(
            "Reference `sklearn_gbdt` needs the splits in memory, but this dataset streams them "
            "from disk. Remove the reference from this suite."
        )
    features = train.features.numpy()
    weights = None if train.weights is None else train.weights.numpy()

    metrics: dict[str, float] = {}
    for index, task in enumerate(data.tasks):
        if task.output_dim != 1:
            raise ValueError(
                f"Reference `sklearn_gbdt` fits one output per task; task {task.name!r} has "
                f"{task.output_dim}. Remove the reference from this suite."
            )
        estimator_class = (
            HistGradientBoostingRegressor if task.kind == "regression"
            else HistGradientBoostingClassifier
        )
        estimator = estimator_class(
            max_iter=max_iter, learning_rate=learning_rate, max_leaf_nodes=max_leaf_nodes,
            early_stopping=True, validation_fraction=0.1, random_state=seed,
        )
        labels = train.targets[index].squeeze(1).numpy()
        if task.kind != "regression":
            labels = labels.astype(np.int64)
        estimator.fit(features, labels, sample_weight=weights)

        if task.kind == "regression":
            scores = estimator.predict(test.features.numpy())
        else:
            scores = estimator.predict_proba(test.features.numpy())[:, 1]
        task_scores = torch.from_numpy(np.asarray(scores, dtype=np.float64)).unsqueeze(1)
        for name, value in task_metrics(task, task_scores, test.targets[index]).items():
            metrics[f"test/{task.name}/{name}"] = value
    return metrics
