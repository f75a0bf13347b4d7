"""Report pieces: tables of several datasets, paired differences and their verdicts, size
plots and gate heat maps."""

import math

import numpy as np
import polars as pl
import pytest

from benchmark.figures import best_seeds, plot_against_size, plot_routing, routing_matrices
from benchmark.report import (
    format_transfer, paired_differences, summarize, transfer_verdicts, trial_frame, write_report,
)

T_975_2 = 4.302652729911275  # t quantile 0.975 with 2 degrees of freedom, from a t table


def record(model, seed, mse, auc, budget=1000, correlation=0.5, **metrics):
    return {
        "dataset": "toy", "model": model, "budget": budget, "seed": seed,
        "grid": {"correlation": correlation},
        "metrics": {"test/a/mse": mse, "test/b/auc": auc, **metrics},
    }


def toy_records():
    # Baseline mse 1.0, 1.2, 1.4. The shared model is worse by 0.1, 0.2, 0.3 on the seeds, and
    # its AUC differs from the baseline by +0.01, -0.01, +0.03 (an interval around 0).
    baseline = [record("single_task", s, m, 0.7) for s, m in enumerate((1.0, 1.2, 1.4))]
    shared = [record("shared", s, m, 0.7 + d)
              for s, (m, d) in enumerate(((1.1, 0.01), (1.4, -0.01), (1.7, 0.03)))]
    return baseline + shared


def test_paired_difference_interval_by_hand():
    differences = paired_differences(trial_frame(toy_records()), "single_task")
    mse = differences.filter(pl.col("metric") == "test/a/mse").row(0, named=True)
    # Differences 0.1, 0.2, 0.3: mean 0.2, sample std 0.1, half width t * 0.1 / sqrt(3).
    assert mse["model"] == "shared"
    assert mse["n"] == 3
    assert mse["mean"] == pytest.approx(0.2)
    assert mse["ci95"] == pytest.approx(T_975_2 * 0.1 / math.sqrt(3))


def test_verdicts_follow_metric_direction():
    verdicts = transfer_verdicts(paired_differences(trial_frame(toy_records()), "single_task"))
    by_metric = dict(zip(verdicts["metric"].to_list(), verdicts["verdict"].to_list()))
    # mse worse by 0.2 on average, but the interval 0.2 +- 0.248 includes 0.
    assert T_975_2 * 0.1 / math.sqrt(3) == pytest.approx(0.2484, abs=1e-4)
    assert by_metric["test/a/mse"] == "unclear"
    # AUC differences 0.01, -0.01, 0.03: mean 0.01, interval wider than the mean.
    assert by_metric["test/b/auc"] == "unclear"


def test_clear_negative_transfer_listed_and_marked(tmp_path):
    # Differences 0.30, 0.31, 0.29 on mse: mean 0.3, std 0.01, clearly worse than the baseline.
    records = [record("single_task", s, 1.0, 0.7) for s in range(3)]
    records += [record("shared", s, 1.0 + d, 0.8) for s, d in enumerate((0.30, 0.31, 0.29))]
    verdicts = transfer_verdicts(paired_differences(trial_frame(records), "single_task"))
    text = format_transfer(verdicts, "single_task")
    assert "1 comparisons help, 1 hurt, 0 are unclear" in text
    assert "| toy | correlation=0.5 | 1000 | shared | test/a/mse | 0.3000 ± 0.0248 |" in text

    report = write_report(records, tmp_path, "toy")
    summary = (tmp_path / "summary.md").read_text()
    assert "## Negative transfer" in summary
    assert "0.3000 ± 0.0248 (hurts)" in summary
    # AUC 0.1 higher on every seed: a zero-width interval that excludes 0.
    assert "0.1000 ± 0.0000 (helps)" in summary
    assert tmp_path / "difference_to_single_task.csv" in report.files


def test_routing_matrices_rebuilt_from_metrics():
    moe = {"selected/routing/a/expert_0": 0.75, "selected/routing/a/expert_1": 0.25,
           "selected/routing/b/expert_0": 0.5, "selected/routing/b/expert_1": 0.5,
           "selected/routing/a/gate_entropy": 0.3, "test/a/mse": 1.0}
    matrices = routing_matrices(moe)
    matrix, rows = matrices["gates"]
    np.testing.assert_allclose(matrix, [[0.75, 0.25], [0.5, 0.5]])
    assert rows == ["a", "b"]

    snr = {"selected/routing/to_tasks/gate_1_0": 0.9, "selected/routing/to_tasks/gate_0_1": 0.0,
           "selected/routing/to_layer_1/gate_0_0": 1.0, "selected/routing/to_tasks/gate_0_0": 0.2,
           "selected/routing/to_tasks/gate_1_1": 0.4, "selected/routing/open_fraction": 0.8}
    matrices = routing_matrices(snr)
    assert list(matrices) == ["to_layer_1", "to_tasks"]
    np.testing.assert_allclose(matrices["to_tasks"][0], [[0.2, 0.0], [0.9, 0.4]])
    assert matrices["to_tasks"][1] == ["0", "1"]

    # Task names in model order label the rows of `to_tasks`, and only those.
    named = routing_matrices({**snr, "tasks": '["income", "marital"]'})
    assert named["to_tasks"][1] == ["income", "marital"]
    assert named["to_layer_1"][1] == ["0"]


def test_best_seed_chosen_by_validation_score(tmp_path):
    score = "selected/val_selection_score"
    gates = {"selected/routing/a/expert_0": 1.0, "selected/routing/a/expert_1": 0.0}
    records = [
        record("moe", 0, 1.0, 0.7, **gates, **{score: 0.1}),
        # Seed 1 has the highest validation score, though seed 2 has the better test error.
        record("moe", 1, 1.0, 0.7, **gates, **{score: 0.5}),
        record("moe", 2, 0.5, 0.9, **gates, **{score: float("nan")}),
    ]
    best = best_seeds(trial_frame(records))
    assert best["seed"].to_list() == [1]
    files = plot_routing(trial_frame(records), tmp_path, "toy")
    assert files == [tmp_path / "routing" / "moe.png"]
    assert files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_size_plot_needs_two_budgets(tmp_path):
    def sized(budget):
        return [record(m, s, 1.0 + s / 10, 0.7, budget=budget, correlation=c,
                       param_count=budget + 5, serving_param_count=budget - 5)
                for m in ("x", "y") for s in range(2) for c in (0.5, 0.9)]

    single_budget = trial_frame(sized(1000))
    assert plot_against_size(single_budget, summarize(single_budget), tmp_path, "toy") == []
    two = trial_frame(sized(1000) + sized(4000))
    files = plot_against_size(two, summarize(two), tmp_path, "toy")
    assert sorted(f.name for f in files) == [
        "toy_correlation=0.5_size.png", "toy_correlation=0.9_size.png",
    ]
    differences = paired_differences(two, "x")
    files = plot_against_size(two, differences, tmp_path, "toy", difference_to="x")
    assert sorted(f.name for f in files) == [
        "toy_correlation=0.5_size_vs_x.png", "toy_correlation=0.9_size_vs_x.png",
    ]


def dataset_record(dataset, grid, model, seed, value):
    return {"dataset": dataset, "model": model, "budget": 1000, "seed": seed, "grid": grid,
            "metrics": {"test/task1/mse": value}}


def test_tables_labelled_by_dataset_grid(tmp_path):
    records = []
    for seed, offset in enumerate((0.0, 0.1)):
        for correlation in (0.5, 0.9):
            records.append(dataset_record("synthetic", {"correlation": correlation}, "mmoe+pcgrad", seed,
                                  1.0 + offset))
        records.append(dataset_record("census", {"task_group": 1}, "mmoe+pcgrad", seed, 2.0 + offset))

    report = write_report(records, tmp_path, "mixed")

    tables = {table.split(" on ")[1].split(",")[0]: table for table in report.text.split("\n\n")}
    assert set(tables) == {"synthetic", "census"}
    assert "| model | correlation=0.5 | correlation=0.9 |" in tables["synthetic"]
    assert "| model | task_group=1 |" in tables["census"]
    assert "null" not in report.text
    # Seeds 2.0 and 2.1: mean 2.05, half-width t(0.975, 1) * 0.05 = 12.7062 * 0.05 = 0.6353.
    assert "| mmoe+pcgrad | 2.0500 ± 0.6353 |" in tables["census"]
    assert (tmp_path / "synthetic_budget1000.png").stat().st_size > 0
    assert (tmp_path / "census_budget1000.png").stat().st_size > 0


def test_trial_frame_keeps_late_metrics():
    # 120 trials of one dataset, then one of another whose task appears in no earlier record.
    records = [dataset_record("synthetic", {"correlation": 0.5}, "mmoe", seed, 1.0)
               for seed in range(120)]
    records.append({"dataset": "census", "model": "mmoe", "budget": 1000, "seed": 0,
                    "grid": {"task_group": 1}, "metrics": {"test/income/auc": 0.9}})

    frame = trial_frame(records)

    assert frame.height == 121
    assert "test/income/auc" in frame.columns
    assert "grid.task_group" in frame.columns
    assert frame["test/income/auc"].to_list()[-1] == 0.9


def test_two_grid_parameters_plot_per_value(tmp_path):
    records = [
        {"dataset": "toy", "model": model, "budget": 1000, "seed": seed,
         "grid": {"correlation": correlation, "data_seed": data_seed},
         "metrics": {"test/task1/mse": 1.0 + seed / 10}}
        for model in ("x", "y") for seed in range(2) for correlation in (0.5, 0.9)
        for data_seed in (0, 1)
    ]

    report = write_report(records, tmp_path, "toy")

    plots = sorted(path.name for path in report.files if path.suffix == ".png")
    assert plots == ["toy_data_seed=0_budget1000.png", "toy_data_seed=1_budget1000.png"]
