"""Run one trial: build its data and model, train, select on validation, test once, log it all.

A trial never raises for a problem of its own: it records the error on a FAILED MLflow run and
returns a failed :class:`TrialResult`, so the sweep goes on.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import time
import traceback
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from benchmark.references import REFERENCES
from benchmark.suite import TrialSpec
from benchmark.tracking import PARENT_TAG, SUITE_TAG, TRIAL_HASH_TAG, RunLogger
from datasets import DATASETS, MultiTaskData
from datasets.base import make_loader
from models import MODELS, WEIGHTINGS, count_parameters, fit_budget
from models.lightning import MultiTaskModule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepContext:
    """Settings shared by every trial of a sweep: the store, the experiment, common tags and
    the device to train on."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)  # package versions, git commit
    accelerator: str = "cpu"  # the Lightning accelerator of every trial: "cpu" or "gpu"


@dataclass
class TrialResult:
    """Outcome of one trial, as returned to the sweep."""

    trial_hash: str
    name: str
    status: str  # "FINISHED" or "FAILED"
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class BestEpoch(pl.Callback):
    """Keep the weights of the epoch with the best validation selection score, in memory.

    Model selection reads validation metrics only; the test split is evaluated once, later, on the
    weights kept here. With ``patience`` set, training stops after that many epochs without gain.
    """

    def __init__(self, patience: int | None = None) -> None:
        self.patience = patience
        self.best_score = -math.inf
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, module: MultiTaskModule) -> None:
        score = module.epoch_metrics.get("val/selection_score", math.nan)
        if self.best_state is None or score > self.best_score:
            self.best_score = score if not math.isnan(score) else -math.inf
            self.best_epoch = trainer.current_epoch
            self.best_state = copy.deepcopy(module.model.state_dict())
        elif self.patience is not None and trainer.current_epoch - self.best_epoch >= self.patience:
            trainer.should_stop = True


class EpochMetricsLogger(pl.Callback):
    """Send each epoch's metrics to MLflow with the epoch as the step.

    A write to a SQLite store costs about 10 ms, as much as several training steps of a small
    model. Epochs are therefore buffered and sent together at most every ``flush_seconds``, and
    once more when training ends, normally or with an error.
    """

    def __init__(self, run_logger: RunLogger, flush_seconds: float = 5.0) -> None:
        self.run_logger = run_logger
        self.flush_seconds = flush_seconds
        self._pending: list[tuple[dict[str, float], int, int]] = []
        self._last_flush = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: MultiTaskModule) -> None:
        timestamp = int(time.time() * 1000)
        self._pending.append((dict(module.epoch_metrics), trainer.current_epoch, timestamp))
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def on_fit_end(self, trainer: pl.Trainer, module: MultiTaskModule) -> None:
        self.flush()

    def on_exception(self, trainer: pl.Trainer, module: MultiTaskModule, error: BaseException) -> None:
        self.flush()

    def flush(self) -> None:
        # The buffer is emptied before sending, so ``on_exception`` does not send it again to a
        # store that just failed. The trial fails either way.
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        if pending:
            self.run_logger.log_metric_steps(pending)


@lru_cache(maxsize=4)
def _load_dataset_cached(name: str, seed: int, params_json: str) -> MultiTaskData:
    return DATASETS.build(name, seed=seed, **json.loads(params_json))


def load_dataset(spec: TrialSpec) -> MultiTaskData:
    """Build the trial's dataset; consecutive trials on the same data in one process share it."""
    params = {**spec.dataset_params, **spec.grid_point}
    return _load_dataset_cached(spec.dataset, spec.seed, json.dumps(params, sort_keys=True))


def run_trial(spec: TrialSpec, context: SweepContext) -> TrialResult:
    """Run one trial and log it as a child run of the sweep; never raises for trial errors."""
    result = TrialResult(spec.trial_hash, spec.name, "FAILED")
    try:
        client = MlflowClient(context.tracking_uri)
        run = client.create_run(
            context.experiment_id, run_name=spec.name, tags=_run_tags(spec, context)
        )
        result.run_id = run.info.run_id
    except Exception as error:  # The store is unreachable: nothing can be logged for this trial.
        result.error = f"Could not create an MLflow run at {context.tracking_uri!r}: {error}"
        return result

    run_logger = RunLogger(client, result.run_id)
    try:
        if spec.kind == "reference":
            result.metrics = _fit_reference(spec, run_logger)
        else:
            result.metrics = _train_and_test(spec, run_logger, context.accelerator)
        result.status = "FINISHED"
        client.set_terminated(result.run_id, "FINISHED")
    except (KeyboardInterrupt, SystemExit):
        # Lightning turns Ctrl-C during fit into sys.exit(1) and then ignores SIGINT
        # (pytorch-lightning 2.6, trainer/call.py). Record the run as KILLED, restore the
        # handler and hand the interrupt on, so the sweep stops and can be resumed.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        client.set_terminated(result.run_id, "KILLED")
        raise KeyboardInterrupt from None
    except Exception as error:
        result.error = f"{type(error).__name__}: {error}"
        _record_failure(client, result.run_id, traceback.format_exc(), result.error)
    return result


def _train_and_test(spec: TrialSpec, run_logger: RunLogger, accelerator: str) -> dict[str, float]:
    started = time.perf_counter()
    config = spec.config()
    run_logger.log_config(config)
    if "weighting" not in config:
        run_logger.log_params({"weighting.name": spec.weighting})

    data = load_dataset(spec)
    _log_data_info(run_logger, data)

    entry = MODELS.get(spec.model)
    fit = fit_budget(entry, spec.budget, data.input_dim, data.task_dims, spec.model_options)
    pl.seed_everything(spec.seed, workers=False, verbose=False)
    model = entry.factory(
        input_dim=data.input_dim, task_dims=data.task_dims, width=fit.width, **fit.options
    )
    parameters = count_parameters(model)
    run_logger.log_params({"width": fit.width, **{f"fitted.{k}": v for k, v in fit.options.items()}})

    training = spec.training
    weighting = WEIGHTINGS.build(spec.weighting, tasks=data.tasks, **spec.weighting_options)
    module = MultiTaskModule(
        model, data.tasks, training["learning_rate"], training["weight_decay"], weighting
    )
    best = BestEpoch(training["patience"])
    trainer = _trainer(training["max_epochs"], [best, EpochMetricsLogger(run_logger)],
                       accelerator)
    train_started = time.perf_counter()
    workers = training.get("loader_workers", 0)
    trainer.fit(
        module,
        train_dataloaders=make_loader(
            data.splits["train"], training["batch_size"], True, spec.seed, workers
        ),
        val_dataloaders=make_loader(
            data.splits["val"], training["eval_batch_size"], num_workers=workers
        ),
    )
    train_seconds = time.perf_counter() - train_started

    # The test split is evaluated once, on the weights that validation selected.
    module.model.load_state_dict(best.best_state)
    trainer.test(
        module,
        dataloaders=make_loader(
            data.splits["test"], training["eval_batch_size"], num_workers=workers
        ),
        verbose=False,
    )
    serving = _serving_metrics(module.model, data, trainer, training["eval_batch_size"], workers)
    final = {
        **module.test_metrics,
        **serving,
        **{f"selected/{name}": value for name, value in module.test_routing.items()},
        **_connection_gates(module.model),
        "selected/val_selection_score": (
            best.best_score if math.isfinite(best.best_score) else math.nan
        ),
        "param_count": parameters,
        "budget_error": (parameters - spec.budget) / spec.budget,
        "best_epoch": best.best_epoch,
        "epochs_trained": trainer.current_epoch,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
    }
    run_logger.log_metrics(final)
    return final


def _connection_gates(model: torch.nn.Module) -> dict[str, float]:
    """Return each gated connection's evaluation gate, for the report's heat maps.

    Named ``selected/routing/<routing>/gate_<i>_<j>`` for the connection from lower unit j to
    upper unit i, for models with ``connection_gates()`` (SNR).
    """
    if not hasattr(model, "connection_gates"):
        return {}
    values = {}
    for name, gates in model.connection_gates().items():
        for (upper, lower), value in np.ndenumerate(gates.cpu().numpy()):
            values[f"selected/routing/{name}/gate_{upper}_{lower}"] = float(value)
    return values


def _serving_metrics(
    model: torch.nn.Module, data: MultiTaskData, trainer: pl.Trainer, batch_size: int, workers: int
) -> dict[str, float]:
    """Count the parameters of the module a model deploys and test it when it differs.

    SNR drops the connections its gates closed; the pruned module's test metrics are logged
    under ``test_serving/`` so that a reader can check they match ``test/``.
    """
    serving = getattr(model, "serving_module", lambda: model)()
    metrics = {"serving_param_count": count_parameters(serving)}
    if serving is model:
        return metrics

    serving_module = MultiTaskModule(serving.eval(), data.tasks)
    trainer.test(
        serving_module,
        dataloaders=make_loader(data.splits["test"], batch_size, num_workers=workers),
        verbose=False,
    )
    for name, value in serving_module.test_metrics.items():
        metrics[name.replace("test/", "test_serving/", 1)] = value
    return metrics


def _fit_reference(spec: TrialSpec, run_logger: RunLogger) -> dict[str, float]:
    started = time.perf_counter()
    run_logger.log_config(spec.config())
    data = load_dataset(spec)
    _log_data_info(run_logger, data)

    metrics = REFERENCES.get(spec.model).factory(data, seed=spec.seed, **spec.model_options)
    final = {**metrics, "wall_seconds": time.perf_counter() - started}
    run_logger.log_metrics(final)
    return final


def _trainer(max_epochs: int, callbacks: list[pl.Callback], accelerator: str) -> pl.Trainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_epochs=max_epochs,
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )


def _run_tags(spec: TrialSpec, context: SweepContext) -> dict[str, str]:
    tags = {
        **context.tags,
        TRIAL_HASH_TAG: spec.trial_hash,
        SUITE_TAG: spec.suite,
        "model": spec.model,
        "dataset": spec.dataset,
        "seed": str(spec.seed),
        "kind": spec.kind,
        "worker_pid": str(os.getpid()),
        **{f"grid.{key}": str(value) for key, value in spec.grid_point.items()},
        **{f"model_grid.{key}": str(value) for key, value in spec.variant.items()},
    }
    if spec.kind == "model":
        tags["budget"] = str(spec.budget)
        tags["weighting"] = spec.weighting
    if context.parent_run_id:
        tags[PARENT_TAG] = context.parent_run_id
    return tags


def _log_data_info(run_logger: RunLogger, data: MultiTaskData) -> None:
    numbers = {f"data/{k}": v for k, v in data.info.items() if isinstance(v, (int, float))}
    texts = {f"data.{k}": v for k, v in data.info.items() if not isinstance(v, (int, float))}
    numbers.update({f"data/{name}_size": len(split) for name, split in data.splits.items()})
    # Metrics indexed by task, such as SNR's `to_tasks` gates, follow this order.
    texts["data.tasks"] = json.dumps([task.name for task in data.tasks])
    run_logger.log_metrics(numbers)
    run_logger.log_params(texts)


def _record_failure(client: MlflowClient, run_id: str, trace: str, summary: str) -> None:
    try:
        client.set_tag(run_id, "error", summary[:5000])
        client.log_text(run_id, trace, "error.txt")
        client.set_terminated(run_id, "FAILED")
    except Exception as error:  # The store failed too, but the result still carries the error.
        logger.error("Could not record the failure of run %s: %s: %s", run_id,
                     type(error).__name__, error)


def quiet_libraries() -> None:
    """Silence Lightning's per-trial banners, which would flood a parallel sweep's output."""
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")


def worker_init(num_threads: int) -> None:
    """Set up a worker process once: thread count, quiet logs, imports paid up front."""
    torch.set_num_threads(max(1, num_threads))
    quiet_libraries()

