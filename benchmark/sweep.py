"""One sweep: the MLflow parent run, resuming, running the trials and the final report."""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from benchmark.executor import run_local
from benchmark.report import Report, write_report
from benchmark.suite import Suite, TrialSpec
from benchmark.tracking import (
    PARENT_TAG,
    SUITE_TAG,
    RunLogger,
    bound_http_requests,
    default_tracking_uri,
    finished_runs,
    get_or_create_experiment,
    is_http,
    is_local_sqlite,
)
from benchmark.trial import SweepContext, TrialResult, load_dataset
from datasets import MultiTaskData
from models import MODELS, WEIGHTINGS, fit_budget
from models.weighting import DEFAULT_WEIGHTING, LossWeighting

logger = logging.getLogger(__name__)


EXECUTORS = ("local", "ray")
ACCELERATORS = ("cpu", "gpu")
BASELINE = "single_task"  # the model whose paired differences the report shows


class SweepError(RuntimeError):
    """A sweep that cannot start or go on, such as one whose tracking store is unreachable."""


@dataclass(frozen=True)
class ExecutorOptions:
    """Placement of a sweep's trials: the executor (``local`` or ``ray``), for Ray the cluster
    and the resources of each trial, and the device each trial trains on."""

    name: str = "local"
    ray_address: str | None = None  # None: a local Ray instance
    cpus_per_trial: int | None = None  # None: the cluster's CPUs divided among the workers
    accelerator: str = "cpu"  # "cpu", or "gpu" for one CUDA device per trial
    gpus_per_trial: float = 0.0  # the GPU share each Ray task declares, 0 on CPU


@dataclass
class SweepOutcome:
    """Counts of trials run, skipped and failed in one sweep, and the report it wrote."""

    parent_run_id: str
    tracking_uri: str
    ran: int = 0
    skipped: int = 0
    failures: list[TrialResult] = field(default_factory=list)
    report: Report | None = None


def experiment_name(suite: Suite) -> str:
    return f"mtl-bench/{suite.name}"


def run_sweep(
    suite: Suite,
    trials: Sequence[TrialSpec],
    results_dir: Path,
    tracking_uri: str | None = None,
    workers: int = 1,
    rerun: bool = False,
    plugins: Sequence[str] = (),
    tags: dict[str, str] | None = None,
    quick: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
    cpus_per_trial: int | None = None,
    accelerator: str = "cpu",
    gpus_per_trial: float | None = None,
) -> SweepOutcome:
    """Run the trials of ``suite`` not yet finished in the store, then report on all of them.

    Args:
        executor: ``"local"`` runs trials in this process or a process pool, ``"ray"`` as Ray
            tasks (see :mod:`benchmark.ray_executor`).
        ray_address: the Ray cluster to use; None starts a local Ray instance.
        cpus_per_trial: CPUs each Ray task declares; None divides the cluster's among ``workers``.
        accelerator: ``"cpu"``, or ``"gpu"`` to train every trial on one CUDA device. The
            device is not part of a trial's configuration, so it does not change trial hashes.
        gpus_per_trial: with ``"gpu"`` and Ray, the share of a GPU each task declares, from
            above 0 to 1 (default 1); a share below 1 lets several trials use one GPU.

    Raises:
        SweepError: If the tracking store cannot be opened, if Ray or the requested GPU cannot
            be used, or if a tracking server stops responding during the sweep.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}.")
    gpus = _gpu_share(accelerator, executor, gpus_per_trial)
    if accelerator == "gpu" and executor == "local":
        _check_local_gpu()
    results_dir = results_dir.resolve()
    if tracking_uri is None:
        # The default store is a file in the results folder, so the folder must exist first.
        # Another store is checked before anything is written.
        results_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or default_tracking_uri(results_dir)
    executor_options = ExecutorOptions(executor, ray_address, cpus_per_trial, accelerator, gpus)
    if executor == "ray":
        _check_ray(executor_options, tracking_uri)
    if is_http(tracking_uri):
        bound_http_requests()
        # With a server as the store, MLflow prints a link to stdout for every run, hundreds of
        # lines in a sweep. The sweep prints the store's address once instead.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    client, experiment_id = _open_store(tracking_uri, experiment_name(suite))
    results_dir.mkdir(parents=True, exist_ok=True)
    with _server_errors(tracking_uri, rerun):
        return _sweep(client, experiment_id, suite, trials, results_dir, tracking_uri, workers,
                      rerun, plugins, dict(tags or {}), quick, executor_options)


def _sweep(
    client: MlflowClient,
    experiment_id: str,
    suite: Suite,
    trials: Sequence[TrialSpec],
    results_dir: Path,
    tracking_uri: str,
    workers: int,
    rerun: bool,
    plugins: Sequence[str],
    tags: dict[str, str],
    quick: bool,
    executor_options: ExecutorOptions,
) -> SweepOutcome:
    done = {} if rerun else finished_runs(client, experiment_id)
    to_run = [spec for spec in trials if spec.trial_hash not in done]
    check_trials(to_run)
    # Announced once the checks passed, so a sweep stopped by them points to no store to browse.
    _announce_store(tracking_uri, experiment_name(suite))
    tags = {**tags, "accelerator": executor_options.accelerator}

    parent = client.create_run(
        experiment_id,
        run_name=f"{suite.name} sweep" + (" (quick)" if quick else ""),
        tags={**tags, SUITE_TAG: suite.name, "sweep": "parent"},
    )
    parent_id = parent.info.run_id
    parent_logger = RunLogger(client, parent_id)
    parent_logger.log_params({
        "suite": suite.name, "quick": quick, "workers": workers, "executor": executor_options.name,
        "trials_planned": len(trials), "trials_skipped": len(trials) - len(to_run),
    })
    client.log_dict(parent_id, suite.model_dump(), "suite.json")

    outcome = SweepOutcome(parent_id, tracking_uri, skipped=len(trials) - len(to_run))
    if outcome.skipped:
        print(f"Skipping {outcome.skipped} trial(s) already finished in the store "
              f"(use --rerun to run them again).", file=sys.stderr)

    context = SweepContext(tracking_uri, experiment_id, parent_id, tags,
                           executor_options.accelerator)
    try:
        _execute(to_run, context, workers, plugins, outcome, executor_options, rerun)
    except SweepError:
        # Ray could not start, or the tracking server went away. In the first case the store
        # still responds, so the parent run is marked FAILED. In the second nothing can be marked.
        if not _server_problem(tracking_uri):
            _end_running_children(client, experiment_id, parent_id)
            client.set_terminated(parent_id, "FAILED")
        raise
    except BaseException:
        _end_running_children(client, experiment_id, parent_id)
        client.set_terminated(parent_id, "KILLED")
        raise

    # A quick run reports into its own folder, so it never replaces a full run's tables.
    report_dir = results_dir / (f"{suite.name}-quick" if quick else suite.name)
    outcome.report = _report(client, experiment_id, suite, trials, report_dir, parent_id)
    parent_logger.log_metrics({"trials_failed": len(outcome.failures), "trials_ran": outcome.ran})
    client.set_terminated(parent_id, "FAILED" if outcome.failures else "FINISHED")
    _print_summary(outcome, report_dir)
    return outcome


def check_trials(trials: Sequence[TrialSpec]) -> None:
    """Load each dataset setting once before any run exists, so a missing file, a failed
    download or an invalid parameter stops the sweep with one message, not one per trial.

    Loading also fills the adapters' on-disk caches, so the trials do not parse the data again.
    Each loss weighting is built once on each dataset's tasks too, because its options can
    depend on them (fixed weights name the tasks). Each model is sized to each budget on the
    meta device, without memory for its weights, so a budget it cannot reach, or a weighting it
    cannot train with, stops the sweep here as well.

    Raises:
        SweepError: If a dataset, a budget or a loss weighting of ``trials`` cannot be used.
    """
    data_by_setting: dict[tuple[str, str], MultiTaskData] = {}
    checked = set()
    for spec in trials:
        key = (spec.dataset, dump_json({**spec.dataset_params, **spec.grid_point}))
        point = ", ".join(f"{k}={v}" for k, v in spec.grid_point.items()) or "no grid"
        if key not in data_by_setting:
            try:
                data_by_setting[key] = load_dataset(spec)
            except Exception as error:
                raise SweepError(
                    f"Dataset {spec.dataset!r} ({point}) could not be loaded, so no trial was "
                    f"run: {type(error).__name__}: {error}"
                ) from error

        model_key = (*key, spec.model, dump_json(spec.model_options), spec.budget,
                     spec.weighting, dump_json(spec.weighting_options))
        if spec.kind == "model" and model_key not in checked:
            checked.add(model_key)
            weighting = _preflight_weighting(spec, data_by_setting[key].tasks, point)
            _preflight_model(spec, data_by_setting[key], weighting, point)


def _preflight_weighting(spec: TrialSpec, tasks: Sequence[Any], point: str) -> LossWeighting:
    try:
        return WEIGHTINGS.build(spec.weighting, tasks=tasks, **spec.weighting_options)
    except Exception as error:
        raise SweepError(
            f"Loss weighting {spec.weighting!r} with options {spec.weighting_options!r} cannot "
            f"train on dataset {spec.dataset!r} ({point}), so no trial was run: "
            f"{type(error).__name__}: {error} Fix `weighting_options.{spec.weighting}` in the "
            f"suite."
        ) from error


def _preflight_model(
    spec: TrialSpec, data: MultiTaskData, weighting: LossWeighting, point: str
) -> None:
    entry = MODELS.get(spec.model)
    try:
        fit = fit_budget(entry, spec.budget, data.input_dim, data.task_dims, spec.model_options)
        with torch.device("meta"):
            model = entry.factory(input_dim=data.input_dim, task_dims=data.task_dims,
                                  width=fit.width, **fit.options)
        weighting.check_model(model)
    except ValueError as error:
        raise SweepError(
            f"{spec.label} at a budget of {spec.budget:,} parameters cannot train on dataset "
            f"{spec.dataset!r} ({point}), so no trial was run: {error}"
        ) from error


def dump_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _end_running_children(client: MlflowClient, experiment_id: str, parent_id: str) -> None:
    # Trials stopped by an interrupt would otherwise stay RUNNING in the store forever.
    running = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'",
    )
    for run in running:
        client.set_terminated(run.info.run_id, "KILLED")


def _open_store(tracking_uri: str, name: str) -> tuple[MlflowClient, str]:
    if is_http(tracking_uri):
        problem = _server_problem(tracking_uri)
        if problem:
            port = urllib.parse.urlsplit(tracking_uri).port
            start = "mlflow server --backend-store-uri sqlite:///mlflow.db" + (
                f" --port {port}" if port else ""
            )
            raise SweepError(
                f"Could not open the MLflow tracking store {tracking_uri!r}: {problem}. Check "
                f"that the MLflow server is running and that --tracking-uri is right. Start one "
                f"with `{start}`, or leave out --tracking-uri to log to mlflow.db in the "
                f"results folder."
            )
    try:
        client = MlflowClient(tracking_uri)
        return client, get_or_create_experiment(client, name, tracking_uri)
    except Exception as error:
        hint = (
            "Check that the folder is writable."
            if is_local_sqlite(tracking_uri)
            else "Check that the MLflow server is running and that --tracking-uri is right."
        )
        raise SweepError(
            f"Could not open the MLflow tracking store {tracking_uri!r}: "
            f"{type(error).__name__}: {error}. {hint}"
        ) from error


def _server_problem(tracking_uri: str, timeout: float = 10.0) -> str | None:
    """Return why a tracking server's health endpoint failed, or None if it responded.

    MLflow's client retries a dead server with backoff, but one direct request to the health
    endpoint fails at once. For a store that is not a server, this returns None.
    """
    if not is_http(tracking_uri):
        return None
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
    except (OSError, urllib.error.URLError) as error:
        return f"{url} did not respond ({error})"
    return None


def _server_lost(tracking_uri: str, problem: str, rerun: bool) -> SweepError:
    return SweepError(
        f"The MLflow tracking server {tracking_uri!r} stopped responding during the sweep: "
        f"{problem}. Trials that finished before are kept in the store. Restart the server on "
        f"the same backend store, then {resume_hint(rerun)} to resume the sweep without them."
    )


def resume_hint(rerun: bool) -> str:
    """Return the command that resumes a sweep, which must not rerun the finished trials."""
    return "run the same command without --rerun" if rerun else "run the same command"


@contextmanager
def _server_errors(tracking_uri: str, rerun: bool) -> Iterator[None]:
    """Turn any error of a sweep whose tracking server stopped into one :class:`SweepError`.

    Whichever MLflow call notices first would otherwise end the sweep with its own traceback.
    """
    try:
        yield
    except SweepError:
        raise
    except Exception as error:
        problem = _server_problem(tracking_uri)
        if problem is None:
            raise
        raise _server_lost(tracking_uri, problem, rerun) from error


def _announce_store(tracking_uri: str, experiment: str) -> None:
    print(f"MLflow tracking URI: {tracking_uri}  (experiment {experiment!r})", file=sys.stderr)
    if is_local_sqlite(tracking_uri):
        print(f"Browse it with: mlflow ui --backend-store-uri {tracking_uri}", file=sys.stderr)


def _gpu_share(accelerator: str, executor: str, gpus_per_trial: float | None) -> float:
    """Return the GPU share each Ray task declares, after checking the device options."""
    if accelerator not in ACCELERATORS:
        raise SweepError(f"--accelerator must be one of {', '.join(ACCELERATORS)}, got "
                         f"{accelerator!r}.")
    if gpus_per_trial is None:
        return 1.0 if accelerator == "gpu" else 0.0
    if accelerator != "gpu" or executor != "ray":
        raise SweepError(f"--gpus-per-trial applies only to `--executor ray --accelerator gpu`, "
                         f"got it with --executor {executor} --accelerator {accelerator}. Add "
                         f"those options or remove --gpus-per-trial.")
    if not 0.0 < gpus_per_trial <= 1.0:
        raise SweepError(f"--gpus-per-trial must be above 0 and at most 1, got {gpus_per_trial}: "
                         f"a trial trains on one GPU, and a share such as 0.25 runs four trials "
                         f"on each.")
    return float(gpus_per_trial)


def _check_local_gpu() -> None:
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        raise SweepError(
            f"--accelerator gpu needs a CUDA GPU, but PyTorch sees none in this process (torch "
            f"{torch.__version__}, {build}). Run on a machine with a GPU and a CUDA build of "
            f"PyTorch, or leave out --accelerator to train on the CPU."
        )


def _check_ray(options: ExecutorOptions, tracking_uri: str) -> None:
    from benchmark.ray_executor import RaySetupError, check_ray_setup

    try:
        check_ray_setup(options.ray_address, tracking_uri, options.cpus_per_trial)
    except RaySetupError as error:
        raise SweepError(str(error)) from error


def _execute(
    to_run: Sequence[TrialSpec],
    context: SweepContext,
    workers: int,
    plugins: Sequence[str],
    outcome: SweepOutcome,
    options: ExecutorOptions,
    rerun: bool,
) -> None:
    if not to_run:
        return
    bar = tqdm(total=len(to_run), unit="trial", desc="trials", file=sys.stderr,
               dynamic_ncols=True)

    def on_result(result: TrialResult) -> None:
        outcome.ran += 1
        if result.status != "FINISHED":
            # A trial fails when its store does, so every later trial would fail the same way.
            problem = _server_problem(context.tracking_uri)
            if problem:
                raise _server_lost(context.tracking_uri, problem, rerun)
            outcome.failures.append(result)
            bar.write(f"FAILED {result.name}: {result.error}", file=sys.stderr)
        # One refresh per trial: set_postfix would otherwise draw the bar a second time.
        bar.set_postfix(failed=len(outcome.failures), refresh=False)
        bar.update(1)

    try:
        if options.name == "ray":
            _run_ray(to_run, context, workers, on_result, plugins, options)
        else:
            run_local(to_run, context, workers, on_result, plugins)
    finally:
        bar.close()


def _run_ray(
    to_run: Sequence[TrialSpec],
    context: SweepContext,
    workers: int,
    on_result: Any,
    plugins: Sequence[str],
    options: ExecutorOptions,
) -> None:
    from benchmark.ray_executor import RaySetupError, run_ray

    try:
        run_ray(to_run, context, workers, on_result, plugins, options.ray_address,
                options.cpus_per_trial, options.gpus_per_trial)
    except RaySetupError as error:
        raise SweepError(str(error)) from error


def _report(
    client: MlflowClient,
    experiment_id: str,
    suite: Suite,
    trials: Sequence[TrialSpec],
    report_dir: Path,
    parent_id: str,
) -> Report:
    # The report reads the store back, so trials finished by an earlier, interrupted sweep count.
    finished = finished_runs(client, experiment_id)
    models = [spec for spec in trials if spec.kind == "model"]
    budgets = sorted({spec.budget for spec in models})
    # Models are labelled `mmoe+gradnorm` as soon as one trial trains with another weighting
    # than the default, so that every row of the tables names its weighting.
    labelled = any(not spec.default_weighting for spec in models)
    baseline = f"{BASELINE}+{DEFAULT_WEIGHTING}" if labelled else BASELINE
    records = []
    for spec in trials:
        if spec.trial_hash not in finished:
            continue
        record = _record(spec, finished[spec.trial_hash])
        if spec.kind == "model":
            if labelled and spec.default_weighting:
                record["model"] = f"{spec.label}+{DEFAULT_WEIGHTING}"
            records.append(record)
            continue
        # A reference has no budget: it appears in the table of every budget.
        for budget in budgets:
            records.append({**record, "budget": budget, "model": f"{spec.model} (reference)"})
    report = write_report(records, report_dir, suite.name, baseline=baseline)
    for path in report.files:
        # Files in subfolders of the report (the heat maps in routing/) keep their folder.
        folder = path.parent.relative_to(report_dir).as_posix()
        artifact_path = "report" if folder == "." else f"report/{folder}"
        client.log_artifact(parent_id, str(path), artifact_path=artifact_path)
    return report


def _record(spec: TrialSpec, run: Any) -> dict[str, Any]:
    return {
        "dataset": spec.dataset,
        "model": spec.label,
        "budget": spec.budget,
        "seed": spec.seed,
        "grid": spec.grid_point,
        "metrics": dict(run.data.metrics),
        "tasks": run.data.params.get("data.tasks"),
    }


def _print_summary(outcome: SweepOutcome, out_dir: Path) -> None:
    report = outcome.report
    if report is not None and report.text:
        print(report.text)
    if report is not None and report.files:
        print(f"\nTables and plots written to {out_dir}")
    print(f"Trials run: {outcome.ran}, skipped (already finished): {outcome.skipped}, "
          f"failed: {len(outcome.failures)}.")
    for failure in outcome.failures:
        print(f"  FAILED {failure.name}: {failure.error}")
    print(f"MLflow parent run: {outcome.parent_run_id} in {outcome.tracking_uri}")
    if is_local_sqlite(outcome.tracking_uri):
        print(f"Browse it with: mlflow ui --backend-store-uri {outcome.tracking_uri}")

