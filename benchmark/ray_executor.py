"""Run a sweep's trials as Ray tasks, on a local Ray instance or on a Ray cluster.

Ray is an optional dependency (``pip install -e ".[ray]"``), imported only by a sweep run with
``--executor ray``. Each trial is one task that declares its CPU share, so Ray places trials on
nodes with free cores. ``--workers`` still bounds how many trials are in flight at once. Trials
train on CPU and declare ``num_gpus=0``, unless the sweep runs with ``--accelerator gpu``: then
each task declares ``--gpus-per-trial`` (1 by default), and Ray makes only its assigned GPU
visible to it.

Where the code comes from: on a local instance, tasks get this checkout's folder on
``PYTHONPATH``, so workers import the same ``benchmark``, ``models`` and ``datasets`` as the
process that started the sweep. On a cluster, the package must be installed on every node.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import torch

from benchmark.executor import MAX_CRASHES, available_cores
from benchmark.suite import TrialSpec
from benchmark.trial import SweepContext, TrialResult, run_trial, worker_init
from datasets.base import DATA_DIR_ENV

logger = logging.getLogger(__name__)

ResultCallback = Callable[[TrialResult], None]

INSTALL_COMMAND = 'pip install -e ".[ray]"'
LOCAL_ADDRESS = "local"
CLIENT_PORT = 10001  # Ray Client's default port, used when a ray:// address gives none
CANCEL_TIMEOUT_S = 30.0  # how long Ctrl-C waits for Ray to stop the cancelled tasks
WAIT_TIMEOUT_S = 1.0  # maximum time one ray.wait call blocks, so Ctrl-C is handled within it

# Ray's errors for a task whose worker process or node died. Such a trial is run again once.
WORKER_DEATH_ERRORS = ("WorkerCrashedError", "OutOfMemoryError", "NodeDiedError",
                       "LocalRayletDiedError")



class RaySetupError(RuntimeError):
    """A Ray sweep that cannot start: Ray is missing, the address is invalid or unreachable,
    or the cluster cannot reach the tracking store."""


def import_ray() -> Any:
    """Return the ``ray`` module.

    Raises:
        RaySetupError: If Ray is not installed.
    """
    try:
        import ray
    except ImportError as error:
        raise RaySetupError(
            f"`--executor ray` needs Ray, which could not be imported ({error}). Install it "
            f"from the project folder with `{INSTALL_COMMAND}`, or run with `--executor local`."
        ) from error
    return ray


def is_local_address(address: str | None) -> bool:
    """Return whether ``address`` means a Ray instance on this machine started for the sweep."""
    return address is None or address == LOCAL_ADDRESS


def is_local_store(tracking_uri: str) -> bool:
    """Return whether the tracking URI is a file or SQLite database on this machine."""
    scheme = urlparse(tracking_uri).scheme
    # A one-letter scheme is a Windows drive, such as C:\results\mlruns.
    return scheme in ("", "file", "sqlite") or len(scheme) == 1


def check_ray_setup(address: str | None, tracking_uri: str, cpus_per_trial: int | None) -> None:
    """Check, before the sweep creates any run, that a Ray sweep can start.

    Raises:
        RaySetupError: If Ray is missing, ``address`` is not a Ray address or cannot be reached,
            ``cpus_per_trial`` is below 1, or a cluster would log to a store on this machine.
    """
    import_ray()
    if cpus_per_trial is not None and cpus_per_trial < 1:
        raise RaySetupError(f"--cpus-per-trial must be >= 1, got {cpus_per_trial}.")
    if address is None:
        return
    host, port = _parse_address(address)
    if is_local_address(address):
        return
    if is_local_store(tracking_uri):
        raise RaySetupError(
            f"--ray-address {address!r} runs trials on a Ray cluster, whose nodes cannot write "
            f"to the tracking store {tracking_uri!r} on this machine. Start an MLflow tracking "
            f"server that every node can reach and pass it with `--tracking-uri "
            f"http://HOST:5000` (see docs/scaling.md), or omit --ray-address to run on a local "
            f"Ray instance."
        )
    if host is not None:
        _check_reachable(address, host, port)


def _parse_address(address: str) -> tuple[str | None, int]:
    """Return the host and port of a HOST:PORT or ray://HOST:PORT address (None for ``auto``
    and ``local``).

    Raises:
        RaySetupError: If ``address`` has none of these forms.
    """
    if address in ("auto", LOCAL_ADDRESS):
        return None, 0
    client = address.startswith("ray://")
    parsed = urlparse(address if client else f"//{address}")
    try:
        port = parsed.port or (CLIENT_PORT if client else None)
    except ValueError:  # a port that is not a number from 0 to 65535
        port = None
    # Another scheme, such as http://, leaves a path behind.
    rest = parsed.path or parsed.query or parsed.params or parsed.fragment
    if port is None or not parsed.hostname or rest or any(c.isspace() for c in address):
        raise RaySetupError(
            f"--ray-address {address!r} is not a Ray address. Pass `auto` (the cluster started "
            f"on this machine with `ray start`), HOST:PORT of the head node (`ray start --head` "
            f"listens on port 6379 by default), ray://HOST:PORT for Ray Client (port {CLIENT_PORT} by default), or omit "
            f"it for a local Ray instance."
        )
    return parsed.hostname, port


def _check_reachable(address: str, host: str, port: int, timeout: float = 5.0) -> None:
    # ray.init retries an address where nothing listens for minutes; one TCP connection attempt
    # fails in seconds.
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as error:
        raise RaySetupError(
            f"Could not reach Ray at --ray-address {address!r} ({host}:{port}: {error}). Check "
            f"that `ray start --head` ran on that host and that the address and port are right."
        ) from error


def run_ray(
    trials: Sequence[TrialSpec],
    context: SweepContext,
    workers: int,
    on_result: ResultCallback,
    plugins: Sequence[str] = (),
    address: str | None = None,
    cpus_per_trial: int | None = None,
    gpus_per_trial: float = 0.0,
) -> None:
    """Run ``trials`` as Ray tasks and call ``on_result`` with each result as it arrives.

    At most ``workers`` trials are in flight. A trial whose worker process dies (killed, out of
    memory, node lost) has its run marked FAILED and is retried once, then failed.

    Raises:
        RaySetupError: If Ray cannot start or connect, or no node has ``cpus_per_trial`` CPUs
            or ``gpus_per_trial`` GPUs.
    """
    ray = import_ray()
    with _ray_connection(ray, address):
        num_cpus = _cpus_per_trial(ray, workers, cpus_per_trial)
        _check_gpus(ray, gpus_per_trial)
        task = ray.remote(_run_trial_task).options(
            num_cpus=num_cpus,
            num_gpus=gpus_per_trial,
            # Retries are made here, so the run of the attempt that died is marked FAILED first.
            max_retries=0,
            runtime_env=task_runtime_env(address),
            name="mtl-bench trial",
        )
        plugins = tuple(_absolute_plugin(plugin) for plugin in plugins)
        logger.info("Running %d trial(s) as Ray tasks, %d at once, %d CPU(s) each.",
                    len(trials), workers, num_cpus)

        def submit(spec: TrialSpec) -> Any:
            return task.remote(spec, context, num_cpus, plugins)

        _run_tasks(ray, submit, trials, context, workers, on_result)


@contextmanager
def _ray_connection(ray: Any, address: str | None) -> Iterator[None]:
    """Use the Ray connection this process already has, or open one and close it at the end."""
    # NOTE: a connection the caller opened is taken to be what --ray-address names. Without
    # --ray-address it counts as local, so a store on this machine is not rejected for it.
    if ray.is_initialized():
        yield
        return

    local = is_local_address(address)
    try:
        ray.init(
            # "local" always starts a new instance; None would join one that another program
            # started on this machine.
            address=LOCAL_ADDRESS if local else address,
            num_cpus=available_cores() if local else None,
            include_dashboard=False if local else None,
        )
    except Exception as error:
        if local:
            raise RaySetupError(
                f"Could not start a local Ray instance: {type(error).__name__}: {error}"
            ) from error
        raise RaySetupError(
            f"Could not connect to Ray at --ray-address {address!r}: {type(error).__name__}: "
            f"{error} Start the cluster's head node with `ray start --head` (`auto` finds one "
            f"started on this machine), pass its HOST:PORT, or omit --ray-address to run on a "
            f"local Ray instance."
        ) from error
    try:
        yield
    finally:
        ray.shutdown()


def _cpus_per_trial(ray: Any, workers: int, requested: int | None) -> int:
    """Return the CPUs each trial declares: the requested count, or the cluster's CPUs divided
    by ``workers`` and capped at the largest node, since one task runs on one node."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    largest = max((int(node["Resources"].get("CPU", 0)) for node in nodes), default=0)
    if requested is not None:
        if requested > largest:
            raise RaySetupError(
                f"--cpus-per-trial {requested} is more than any Ray node has (the largest has "
                f"{largest} CPUs), so no trial could be scheduled. Pass at most {largest}."
            )
        return requested
    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(total // workers, largest))


def _check_gpus(ray: Any, gpus_per_trial: float) -> None:
    """Check that some node has the GPU share a trial declares, which Ray would wait for forever."""
    if not gpus_per_trial:
        return
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    largest = max((float(node["Resources"].get("GPU", 0)) for node in nodes), default=0.0)
    if largest < gpus_per_trial:
        raise RaySetupError(
            f"--accelerator gpu asks for {gpus_per_trial:g} GPU per trial, but no Ray node has "
            f"that many (the most any node has is {largest:g}), so no trial could be scheduled. "
            f"Start the Ray nodes on machines with GPUs, or leave out --accelerator to train on "
            f"the CPU."
        )


def task_runtime_env(address: str | None) -> dict[str, Any]:
    """Return the runtime environment of trial tasks: the data folder and, on a local
    instance, this checkout on ``PYTHONPATH``."""
    env_vars = {}
    if DATA_DIR_ENV in os.environ:
        env_vars[DATA_DIR_ENV] = os.environ[DATA_DIR_ENV]
    if is_local_address(address):
        # Workers start in a fresh interpreter that would import the installed package, which
        # may be another checkout than the one that started the sweep.
        checkout = str(Path(__file__).resolve().parents[1])
        env_vars["PYTHONPATH"] = os.pathsep.join(
            part for part in (checkout, os.environ.get("PYTHONPATH")) if part
        )
    return {"env_vars": env_vars} if env_vars else {}


def _absolute_plugin(plugin: str) -> str:
    # A worker may start in another folder than this process, so a file path must be absolute.
    return str(Path(plugin).resolve()) if plugin.endswith(".py") else plugin


def _run_tasks(
    ray: Any,
    submit: Callable[[TrialSpec], Any],
    trials: Sequence[TrialSpec],
    context: SweepContext,
    workers: int,
    on_result: ResultCallback,
) -> None:
    pending = deque(trials)
    in_flight: dict[Any, TrialSpec] = {}
    crashes: Counter[str] = Counter()
    try:
        while pending or in_flight:
            while pending and len(in_flight) < workers:
                spec = pending.popleft()
                in_flight[submit(spec)] = spec

            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_TIMEOUT_S)
            for ref in done:
                spec = in_flight.pop(ref)
                if _deliver(ray, ref, spec, context, on_result, crashes):
                    pending.appendleft(spec)
    except BaseException:
        # Ctrl-C, or on_result stopping the sweep (a tracking server that went away): the
        # trials in flight are cancelled rather than left to run into the same failure.
        _cancel(ray, in_flight)
        raise


def _deliver(
    ray: Any,
    ref: Any,
    spec: TrialSpec,
    context: SweepContext,
    on_result: ResultCallback,
    crashes: Counter[str],
) -> bool:
    """Hand a finished task's result to ``on_result``; return whether to run the trial again."""
    try:
        result = ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        # run_trial records its own errors, so this is an error around it, such as a plugin
        # that fails to import in the worker.
        on_result(TrialResult(spec.trial_hash, spec.name, "FAILED",
                              error=f"The Ray task failed: {error.cause!r}"))
        return False
    except ray.exceptions.RayError as error:
        death_errors = tuple(getattr(ray.exceptions, name) for name in WORKER_DEATH_ERRORS)
        if isinstance(error, death_errors):
            return _handle_crash(spec, context, on_result, crashes, error)
        # Ray could not run the task at all, such as a runtime environment that failed to set up.
        message = f"Ray could not run the trial: {type(error).__name__}: {error}"
        _, run_id = _close_lost_runs(spec, context, message)
        on_result(TrialResult(spec.trial_hash, spec.name, "FAILED", run_id, error=message))
        return False
    on_result(result)
    return False


def _handle_crash(
    spec: TrialSpec,
    context: SweepContext,
    on_result: ResultCallback,
    crashes: Counter[str],
    error: Exception,
) -> bool:
    finished, run_id = _close_lost_runs(spec, context, "The worker process died.")
    if finished is not None:
        # The trial finished, and the worker died while sending the result back.
        on_result(TrialResult(spec.trial_hash, spec.name, "FINISHED", finished.info.run_id,
                              metrics=dict(finished.data.metrics)))
        return False

    crashes[spec.trial_hash] += 1
    if crashes[spec.trial_hash] < MAX_CRASHES:
        logger.error("The Ray worker running %s died (%s); running the trial again.",
                     spec.name, type(error).__name__)
        return True
    on_result(TrialResult(
        spec.trial_hash, spec.name, "FAILED", run_id,
        error=f"The worker process died while running this trial ({type(error).__name__}).",
    ))
    return False


def _close_lost_runs(
    spec: TrialSpec, context: SweepContext, error: str
) -> tuple[Any | None, str | None]:
    """Mark the trial's RUNNING runs of this sweep FAILED with ``error``, since their task ended.

    Returns:
        A FINISHED run of the trial in this sweep, if there is one, and the id of the run that
        was cut off, if there was one.
    """
    from mlflow.tracking import MlflowClient

    from benchmark.tracking import PARENT_TAG, TRIAL_HASH_TAG

    client = MlflowClient(context.tracking_uri)
    runs = client.search_runs(
        [context.experiment_id],
        filter_string=f"tags.{TRIAL_HASH_TAG} = '{spec.trial_hash}' and "
        f"tags.`{PARENT_TAG}` = '{context.parent_run_id}'",
    )
    finished = next((run for run in runs if run.info.status == "FINISHED"), None)
    run_id = None
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "error", error[:5000])
            client.set_terminated(run.info.run_id, "FAILED")
            run_id = run.info.run_id
    return finished, run_id


def _cancel(ray: Any, in_flight: dict[Any, TrialSpec]) -> None:
    """Stop every trial in flight, for Ctrl-C."""
    # force=True kills the worker process, as the local executor kills its pool's workers.
    for ref in in_flight:
        ray.cancel(ref, force=True)
    # Waiting lets no cancelled trial create a run after the sweep has marked its runs KILLED.
    if in_flight:
        ray.wait(list(in_flight), num_returns=len(in_flight), timeout=CANCEL_TIMEOUT_S)


_prepared_plugins: set[str] = set()
_interop_threads_set = False


def _run_trial_task(
    spec: TrialSpec, context: SweepContext, num_threads: int, plugins: tuple[str, ...]
) -> TrialResult:
    """Run one trial in a Ray worker, which Ray reuses for later trials of the same sweep."""
    from benchmark.plugins import load_plugins

    # Importing a plugin file again would register its models twice, which raises unless the
    # plugin registers them with override=True.
    new_plugins = [plugin for plugin in plugins if plugin not in _prepared_plugins]
    if new_plugins:
        load_plugins(new_plugins)
        _prepared_plugins.update(new_plugins)
    worker_init(num_threads)
    _set_interop_threads()
    return run_trial(spec, context)


def _set_interop_threads() -> None:
    # torch accepts the inter-op thread count once per process, before any parallel work.
    global _interop_threads_set
    if _interop_threads_set:
        return
    _interop_threads_set = True
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        logger.debug("The inter-op thread count of this Ray worker was already set.")
