"""Helpers for harness tests: tiny suite files and reading a store back."""

import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient


TINY_SUITE = """
name = "tiny"
models = {models}
budgets = [3000]
seeds = {seeds}

[[datasets]]
name = "synthetic"
params = {{ input_dim = 10, n_train = 200, n_val = 60, n_test = 60, num_sines = 2 }}
grid = {{ correlation = {correlations} }}

[training]
max_epochs = 2
batch_size = 64
"""


def write_suite(folder: Path, models=("shared_bottom", "mmoe"), seeds=(0, 1),
                correlations=(0.5, 1.0), extra: str = "") -> Path:
    path = folder / "tiny.toml"
    text = TINY_SUITE.format(models=list(models), seeds=list(seeds), correlations=list(correlations))
    path.write_text(text + textwrap.dedent(extra))
    return path


def store_runs(results: Path, suite: str = "tiny"):
    """Return (parent runs, child runs) of the suite's experiment in the default store."""
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"mtl-bench/{suite}")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    return client, parents, children


@pytest.fixture
def suite_file(tmp_path):
    return write_suite(tmp_path)
