"""Run a sweep's trials, in this process or in a pool of worker processes.

Importing torch, Lightning and MLflow takes several seconds, more than a small trial trains, so
worker processes are started once per sweep and reused for every trial. Each worker gets an equal
share of the CPU cores as torch threads, so parallel trials do not oversubscribe the machine.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence

import torch

from benchmark.suite import TrialSpec
from benchmark.trial import SweepContext, TrialResult, run_trial, worker_init

logger = logging.getLogger(__name__)

ResultCallback = Callable[[TrialResult], None]
MAX_CRASHES = 2  # worker deaths after which a trial is failed rather than retried


def available_cores() -> int:
    """Return the CPU cores this process may use (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    return max(1, available_cores() // workers)


def run_local(
    trials: Sequence[TrialSpec],
    context: SweepContext,
    workers: int,
    on_result: ResultCallback,
    plugins: Sequence[str] = (),
) -> None:
    """Run ``trials`` and call ``on_result`` with each result as it arrives.

    With one worker the trials run in this process. With more, a pool of ``workers`` processes
    runs them. When a worker dies (killed, or crashed in native code), the pool is restarted and
    the trials that were running are retried once, then failed.
    """
    if workers == 1:
        worker_init(threads_per_worker(1))
        for spec in trials:
            on_result(run_trial(spec, context))
        return

    # When a worker dies, the pool stops every worker, so the trials running beside the one at
    # fault die too. Those are retried as if they had not started; a trial whose own worker
    # died is retried once, then failed.
    crashes: Counter[str] = Counter()
    pending = list(trials)
    while pending:
        not_started, crashed = _run_pool(pending, context, workers, on_result, plugins)
        for spec, run_id, at_fault in crashed:
            if not at_fault:
                not_started.append(spec)
                continue
            crashes[spec.trial_hash] += 1
            if crashes[spec.trial_hash] < MAX_CRASHES:
                not_started.append(spec)
            else:
                on_result(TrialResult(spec.trial_hash, spec.name, "FAILED", run_id,
                                      error="The worker process died while running this trial."))
        if len(not_started) == len(pending) and not crashed:
            # No trial even started, so the workers cannot start: fail the rest, don't loop.
            for spec in not_started:
                on_result(TrialResult(
                    spec.trial_hash, spec.name, "FAILED",
                    error="Worker processes died before running any trial; run with "
                    "`--workers 1` to see the error.",
                ))
            return
        pending = not_started


def _run_pool(
    trials: list[TrialSpec],
    context: SweepContext,
    workers: int,
    on_result: ResultCallback,
    plugins: Sequence[str],
) -> tuple[list[TrialSpec], list[tuple[TrialSpec, str, bool]]]:
    """Run trials in one pool until they finish or the pool breaks.

    Returns:
        The trials that never started, and the trials that were running when a worker died,
        each with its run id and whether it ran in the worker that died.
    """
    # "spawn" gives each worker a clean interpreter: forking a process that has started torch's
    # thread pools can deadlock.
    context_mp = multiprocessing.get_context("spawn")
    futures: dict[Future, TrialSpec] = {}
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context_mp,
        initializer=_pool_worker_init,
        initargs=(threads_per_worker(workers), tuple(plugins)),
    ) as pool:
        for spec in trials:
            futures[pool.submit(run_trial, spec, context)] = spec
        # NOTE: the pool's process table is private, but it is the only way to learn which
        # worker died. It is read after submitting, when every worker has been started.
        processes = list((getattr(pool, "_processes", None) or {}).values())

        try:
            broken, not_started = _collect_results(futures, on_result)
        except BaseException:
            # Ctrl-C, or ``on_result`` stopping the sweep. Leaving the ``with`` block would
            # otherwise wait for every queued trial.
            _stop_workers(pool)
            raise

    if not broken:
        return [], []
    return _split_lost_trials(not_started, context, on_result, _dead_worker_pids(processes))


def _dead_worker_pids(processes: list) -> set[str]:
    """Return the ids of workers that died by themselves rather than being stopped by the pool."""
    dead = set()
    for process in processes:
        process.join(timeout=10)
        if process.exitcode not in (None, 0, -signal.SIGTERM):
            dead.add(str(process.pid))
    return dead


def _collect_results(
    futures: dict[Future, TrialSpec], on_result: ResultCallback
) -> tuple[bool, list[TrialSpec]]:
    """Hand over each result as it arrives; return whether the pool broke, and the trials lost.

    An exception raised by ``on_result`` propagates, so the caller can stop the sweep.
    """
    broken = False
    lost: list[TrialSpec] = []
    for future in as_completed(futures):
        spec = futures[future]
        try:
            result = future.result()
        except BrokenProcessPool:
            if not broken:
                logger.error("A worker process died; restarting the pool for the rest.")
            broken = True
            lost.append(spec)
            continue
        except Exception as error:  # An error while sending the result back.
            result = TrialResult(spec.trial_hash, spec.name, "FAILED", error=repr(error))
        on_result(result)
    return broken, lost


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel queued trials and end running ones at once, for Ctrl-C."""
    # NOTE: ProcessPoolExecutor has no public way to stop running workers before Python 3.14
    # (terminate_workers), so this reaches into its process table, which shutdown() clears.
    # SIGKILL, because Lightning turns SIGTERM into an exception between steps, which the trial
    # records as its failure before the worker moves on to the next trial.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()


def _split_lost_trials(
    lost: list[TrialSpec], context: SweepContext, on_result: ResultCallback, dead_pids: set[str]
) -> tuple[list[TrialSpec], list[tuple[TrialSpec, str, bool]]]:
    # The pool fails every future it had not yet delivered, so the store decides what happened.
    # A FINISHED run finished before the worker died. A RUNNING run was cut off and is marked
    # FAILED. A trial without a run never started.
    from mlflow.tracking import MlflowClient

    from benchmark.tracking import PARENT_TAG, TRIAL_HASH_TAG

    client = MlflowClient(context.tracking_uri)
    not_started, crashed = [], []
    for spec in lost:
        runs = client.search_runs(
            [context.experiment_id],
            filter_string=f"tags.{TRIAL_HASH_TAG} = '{spec.trial_hash}' and "
            f"tags.`{PARENT_TAG}` = '{context.parent_run_id}'",
        )
        finished = [run for run in runs if run.info.status == "FINISHED"]
        running = [run for run in runs if run.info.status == "RUNNING"]
        if finished:
            run = finished[0]
            on_result(TrialResult(spec.trial_hash, spec.name, "FINISHED", run.info.run_id,
                                  metrics=dict(run.data.metrics)))
        elif running:
            for run in running:
                client.set_tag(run.info.run_id, "error", "The worker process died.")
                client.set_terminated(run.info.run_id, "FAILED")
            at_fault = running[0].data.tags.get("worker_pid") in dead_pids
            crashed.append((spec, running[0].info.run_id, at_fault))
        else:
            not_started.append(spec)
    return not_started, crashed


def _pool_worker_init(num_threads: int, plugins: tuple[str, ...]) -> None:
    from benchmark.plugins import load_plugins

    # Ctrl-C reaches the whole process group; the main process alone handles it and stops the
    # workers, so a worker must not start its own shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    load_plugins(plugins)
    worker_init(num_threads)
    torch.set_num_interop_threads(1)
