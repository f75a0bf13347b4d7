"""Command line of the benchmark: ``python -m benchmark.run --suite correlation``.

A sweep is one MLflow parent run with one nested child run per trial. Trials already finished in
the store (same configuration hash) are skipped, so an interrupted sweep resumes where it stopped.
At the end a summary table and plots go to ``results/<suite>/`` and to the parent run.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmark.plugins import PluginError, load_plugins
from benchmark.suite import SuiteError, TrialSpec, builtin_suites, load_suite, plan_trials
from datasets.base import DATA_DIR_ENV

logger = logging.getLogger("benchmark")

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.run",
        description="Train multi-task models over a suite's grid and seeds, log every trial to "
        "MLflow and write summary tables and plots.",
    )
    parser.add_argument("--suite", default="correlation",
                        help="built-in suite name or path to a .toml/.yaml suite file "
                        "(default: %(default)s)")
    parser.add_argument("--list", action="store_true",
                        help="list the built-in suites, models, weightings and datasets, then exit")
    parser.add_argument("--models", type=_csv, help="comma-separated models replacing the suite's")
    parser.add_argument("--weighting", type=_csv, dest="weightings", metavar="WEIGHTINGS",
                        help="comma-separated loss weightings replacing the suite's, e.g. "
                        "equal,gradnorm (default of a suite without them: equal)")
    parser.add_argument("--seeds", type=_int_list("0,1,2"),
                        help="comma-separated seeds replacing the suite's, e.g. 0,1,2")
    parser.add_argument("--budgets", type=_int_list("20000,80000"),
                        help="comma-separated parameter budgets replacing the suite's, e.g. "
                        "20000,80000")
    parser.add_argument("--max-epochs", type=int, help="maximum training epochs per trial")
    parser.add_argument("--workers", type=int, default=1,
                        help="trials run at once, each in its own process (default: 1; with "
                        "the local executor, in this process)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="where trials run: local (this process, or a process pool with "
                        "--workers > 1) or ray (Ray tasks; needs pip install -e \".[ray]\") "
                        "(default: %(default)s)")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="with --executor ray: the cluster to run on, `auto`, HOST:PORT or "
                        "ray://HOST:PORT (default: start a local Ray instance); a cluster needs "
                        "an MLflow tracking server as --tracking-uri")
    parser.add_argument("--cpus-per-trial", type=int, metavar="N",
                        help="with --executor ray: CPUs (and torch threads) each trial requests "
                        "(default: the cluster's CPUs divided by --workers)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu",
                        help="device each trial trains on: cpu, or gpu (one CUDA GPU per trial; "
                        "not part of a trial's configuration, so finished trials still count) "
                        "(default: %(default)s)")
    parser.add_argument("--gpus-per-trial", type=float, metavar="SHARE",
                        help="with --executor ray --accelerator gpu: the GPU share each trial "
                        "requests, above 0 and at most 1, such as 0.25 for four trials per GPU "
                        "(default: 1)")
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default: a SQLite store in the results folder)")
    parser.add_argument("--results-dir", type=Path, default=Path("results"),
                        help="folder for the store, tables and plots (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path,
                        help="root folder of the real data sets, one subfolder per data set "
                        "(census-income/, youtube8m/); sets MTL_BENCH_DATA_DIR for every trial")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import a module that registers models or datasets; repeatable")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the trial plan, check that every dataset loads (downloading "
                        "missing files, as a run would) and every model reaches its budget with "
                        "its loss weighting, then exit without running or logging anything")
    parser.add_argument("--quick", action="store_true",
                        help="apply the suite's quick overrides: a smoke test of about a minute")
    parser.add_argument("--rerun", action="store_true",
                        help="run trials again even if the store contains a finished run of them")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


def _print_to_pipe(print_all: Callable[[], None]) -> int:
    """Run a printing function whose reader may stop early, as `| head` does."""
    try:
        print_all()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the closed pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.workers < 1:
        return _usage_error(f"--workers must be >= 1, got {args.workers}.")
    if args.max_epochs is not None and args.max_epochs < 1:
        return _usage_error(f"--max-epochs must be >= 1, got {args.max_epochs}.")
    for option, value in (("--ray-address", args.ray_address),
                          ("--cpus-per-trial", args.cpus_per_trial)):
        if value is not None and args.executor != "ray":
            return _usage_error(f"{option} applies only to `--executor ray`; add that option "
                                f"or remove {option}.")
    if args.data_dir is not None:
        if not args.data_dir.is_dir():
            return _usage_error(
                f"--data-dir {str(args.data_dir)!r} is not a folder. Pass the folder that holds "
                f"the data sets' subfolders, such as census-income/."
            )
        # Worker processes inherit the environment, so every trial reads the same folder.
        os.environ[DATA_DIR_ENV] = str(args.data_dir.resolve())

    try:
        load_plugins(args.plugin)
        if args.list:
            return _print_to_pipe(_print_listing)
        suite = load_suite(args.suite, quick=args.quick, overrides=_overrides(args))
    except (SuiteError, PluginError) as error:
        return _usage_error(str(error))

    trials = plan_trials(suite)
    from benchmark.sweep import SweepError, check_trials, resume_hint, run_sweep

    if args.dry_run:
        _print_to_pipe(lambda: _print_plan(trials))
        try:
            check_trials(trials)
        except SweepError as error:
            return _usage_error(str(error))
        print("Checked: every dataset loads, and every model reaches its budget and can train "
              "with its loss weighting.", file=sys.stderr)
        return EXIT_OK

    try:
        outcome = run_sweep(
            suite,
            trials,
            results_dir=args.results_dir,
            tracking_uri=args.tracking_uri,
            workers=args.workers,
            rerun=args.rerun,
            plugins=args.plugin,
            tags=environment_tags(),
            quick=args.quick,
            executor=args.executor,
            ray_address=args.ray_address,
            cpus_per_trial=args.cpus_per_trial,
            accelerator=args.accelerator,
            gpus_per_trial=args.gpus_per_trial,
        )
    except SweepError as error:
        return _usage_error(str(error))
    except KeyboardInterrupt:
        print(f"Interrupted. Finished trials are kept: {resume_hint(args.rerun)} to resume.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_TRIALS_FAILED if outcome.failures else EXIT_OK


def environment_tags() -> dict[str, str]:
    """Return package versions and the git commit of this project, where there is one."""
    tags = {"version.python": platform.python_version()}
    for package in ("mtl-bench", "torch", "pytorch-lightning", "mlflow", "numpy", "polars",
                    "scikit-learn"):
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    commit = _git_commit(Path(__file__).resolve().parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit(folder: Path) -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder, capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for key in ("models", "weightings", "seeds", "budgets"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.max_epochs is not None:
        overrides["training"] = {"max_epochs": args.max_epochs}
    return overrides


def _print_listing() -> None:
    from benchmark.references import REFERENCES
    from benchmark.suite import read_suite_file
    from datasets import DATASETS
    from models import MODELS, WEIGHTINGS

    print("Suites:")
    suites = sorted(builtin_suites().items())
    width = max(len(name) for name, _ in suites) + 1
    for name, path in suites:
        print(f"  {name:<{width}} {read_suite_file(path).get('description', '')}")
    print("Models:     " + ", ".join(MODELS.names()))
    print("Weightings: " + ", ".join(WEIGHTINGS.names()))
    print("Datasets:   " + ", ".join(DATASETS.names()))
    print("References: " + ", ".join(REFERENCES.names()))


def _print_plan(trials: list[TrialSpec]) -> None:
    print(f"{len(trials)} trials:")
    for index, spec in enumerate(trials, start=1):
        print(f"{index:4d}  {spec.trial_hash}  {spec.name}")


def _usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _csv(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def _int_list(example: str) -> Callable[[str], list[int]]:
    """Return an argparse type that reads comma-separated integers, citing ``example``."""

    def parse(text: str) -> list[int]:
        try:
            return [int(value) for value in _csv(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, such as {example}, got {text!r}"
            ) from None

    return parse


if __name__ == "__main__":
    sys.exit(main())
