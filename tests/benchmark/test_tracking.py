"""MLflow helpers against a real SQLite store: param limits, batching, flattening, HTTP bounds."""

import json
import os

from mlflow.tracking import MlflowClient

from benchmark.tracking import (
    HTTP_REQUEST_BOUNDS,
    MAX_PARAM_VALUE,
    RunLogger,
    bound_http_requests,
    config_params,
    default_tracking_uri,
    flatten,
    get_or_create_experiment,
)


def test_flatten_nested_config():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": {}}) == {"a.b": 1, "a.c.d": "x", "e": {}}


def test_long_value_replaced_by_note():
    params, replaced = config_params({"short": 1, "long": "x" * (MAX_PARAM_VALUE + 1)})
    values = {param.key: param.value for param in params}
    assert values["short"] == "1"
    assert values["long"] == f"(value of {MAX_PARAM_VALUE + 1} characters: see config.json)"
    assert replaced == ["long"]


def test_large_config_logged_whole(tmp_path):
    uri = default_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    run = client.create_run(get_or_create_experiment(client, "limits", uri))
    config = {
        "many": {f"key{index}": index for index in range(250)},  # more than one batch of params
        "grid": list(range(3000)),  # longer than MLflow's param limit once written as JSON
    }

    RunLogger(client, run.info.run_id).log_config(config)

    logged = client.get_run(run.info.run_id).data
    assert len(logged.params) == 251
    assert logged.params["many.key249"] == "249"
    assert "see config.json" in logged.params["grid"]
    assert logged.tags["params_replaced"] == "grid"
    artifact = client.download_artifacts(run.info.run_id, "config.json")
    with open(artifact) as handle:
        assert json.load(handle)["grid"] == list(range(3000))
    # Artifacts of a local store live beside the database, not in the working directory.
    assert (tmp_path / "mlartifacts").is_dir()


def test_metric_steps_batched(tmp_path):
    uri = default_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    run = client.create_run(get_or_create_experiment(client, "steps", uri))
    logger = RunLogger(client, run.info.run_id)
    steps = [({"val/a/mse": step / 10, "train/loss": step}, step, 1000 + step) for step in range(600)]

    logger.log_metric_steps(steps)  # 1,200 values: more than one batch of 1,000

    history = client.get_metric_history(run.info.run_id, "val/a/mse")
    assert sorted((m.step, m.value) for m in history) == [(s, s / 10) for s in range(600)]


def test_http_bounds_keep_user_values(monkeypatch):
    for name in HTTP_REQUEST_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")

    settings = bound_http_requests()

    assert settings == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "300",
    }
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
