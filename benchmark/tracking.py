"""MLflow helpers: the default store, parameter flattening within MLflow's limits, batched
metrics and the look-up of trials already finished.

Everything goes through ``MlflowClient`` with explicit run ids rather than MLflow's fluent API,
whose active-run state is global to a process and would mix up trials that share a worker.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils import validation

logger = logging.getLogger(__name__)

MAX_PARAM_VALUE = validation.MAX_PARAM_VAL_LENGTH
MAX_KEY = validation.MAX_ENTITY_KEY_LENGTH
MAX_PARAMS_PER_BATCH = validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = validation.MAX_METRICS_PER_BATCH

TRIAL_HASH_TAG = "trial_hash"
SUITE_TAG = "suite"
PARENT_TAG = "mlflow.parentRunId"
CONFIG_ARTIFACT = "config.json"

# MLflow's own defaults (mlflow 3.17: 7 retries, backoff factor 2, 120 s timeout) retry a request to
# a stopped tracking server for about four minutes before it fails. These bounds make it fail after
# about 8 seconds (retries after 0, 2 and 4 seconds, plus random jitter). A server that accepts
# connections but does not respond is given 30 seconds per attempt.
HTTP_REQUEST_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def default_tracking_uri(results_dir: Path) -> str:
    """Return the SQLite store URI under ``results_dir``, as an absolute path."""
    return f"sqlite:///{(results_dir / 'mlflow.db').resolve()}"


def is_local_sqlite(tracking_uri: str) -> bool:
    return tracking_uri.startswith("sqlite:///")


def is_http(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def bound_http_requests() -> dict[str, str]:
    """Set :data:`HTTP_REQUEST_BOUNDS` in the environment, keeping any value the user set.

    MLflow's client reads these variables on every request, and worker processes inherit the
    environment, so the bounds apply to every trial of a sweep.

    Returns:
        The settings in effect, by variable name.
    """
    for name, value in HTTP_REQUEST_BOUNDS.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in HTTP_REQUEST_BOUNDS}


def artifact_root(tracking_uri: str) -> str | None:
    """Return where a local SQLite store keeps artifacts: a folder beside the database.

    MLflow would otherwise put them in ``./mlruns`` under whatever folder the user ran from.
    Remote stores choose their own root, so this returns None for them.
    """
    if not is_local_sqlite(tracking_uri):
        return None
    database = Path(tracking_uri[len("sqlite:///"):])
    return (database.parent / "mlartifacts").resolve().as_uri()


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Return the id of experiment ``name``, creating it (and its artifact folder) if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(tracking_uri))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def config_params(config: Mapping[str, Any]) -> tuple[list[Param], list[str]]:
    """Turn a nested configuration into MLflow params that MLflow accepts.

    A value longer than MLflow's limit is replaced by a note pointing to the JSON artifact, which
    keeps the whole configuration; a key longer than the limit is shortened the same way.

    Returns:
        The params, and the keys whose value or name had to be replaced.
    """
    params, replaced = [], []
    for key, value in flatten(config).items():
        text = json.dumps(value) if not isinstance(value, str) else value
        if len(key) > MAX_KEY:
            replaced.append(key)
            key = key[: MAX_KEY - 12] + "...(cut)"
        if len(text) > MAX_PARAM_VALUE:
            replaced.append(key)
            text = f"(value of {len(text)} characters: see {CONFIG_ARTIFACT})"
        params.append(Param(key, text))
    return params, replaced


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class RunLogger:
    """Log to one MLflow run in as few calls as possible.

    A metric call to a SQLite store costs a few milliseconds, so metrics are sent in one batch
    per call of :meth:`log_metrics`, never one per value.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Log the configuration as flattened params and as a JSON artifact."""
        params, replaced = config_params(config)
        for batch in _batches(params, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)
        if replaced:
            self.set_tags({"params_replaced": ", ".join(replaced)[: validation.MAX_TAG_VAL_LENGTH]})
            logger.warning(
                "Run %s: %d parameter(s) exceed MLflow's length limits and are logged as a "
                "note; the full values are in %s.", self.run_id, len(replaced), CONFIG_ARTIFACT,
            )
        self.client.log_dict(self.run_id, dict(config), CONFIG_ARTIFACT)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_metric_steps([(metrics, step, int(time.time() * 1000))])

    def log_metric_steps(self, steps: Sequence[tuple[Mapping[str, float], int, int]]) -> None:
        """Log several steps' metrics in as few calls as MLflow's batch limit allows.

        Args:
            steps: ``(metrics, step, timestamp in milliseconds)`` per step.
        """
        entries = [
            Metric(key, float(value), timestamp, step)
            for metrics, step, timestamp in steps
            for key, value in metrics.items()
        ]
        for batch in _batches(entries, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        entries = [Param(key, str(value)) for key, value in params.items()]
        for batch in _batches(entries, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(key, str(value)) for key, value in tags.items()]
        for batch in _batches(entries, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=batch)


def finished_runs(client: MlflowClient, experiment_id: str) -> dict[str, Any]:
    """Return the newest FINISHED trial run for each trial hash in the experiment."""
    runs: dict[str, Any] = {}
    page_token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=page_token,
        )
        for run in page:
            trial_hash = run.data.tags.get(TRIAL_HASH_TAG)
            if trial_hash:
                runs[trial_hash] = run
        page_token = page.token
        if not page_token:
            return runs
