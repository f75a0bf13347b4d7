"""Report tables and plots of a suite whose datasets have different grid parameters."""

from benchmark.report import write_report


def record(dataset, grid, model, seed, value):
    return {"dataset": dataset, "model": model, "budget": 1000, "seed": seed, "grid": grid,
            "metrics": {"test/task1/mse": value}}


def test_report_labels_each_dataset_by_its_grid(tmp_path):
    records = []
    for seed, offset in enumerate((0.0, 0.1)):
        for correlation in (0.5, 0.9):
            records.append(record("synthetic", {"correlation": correlation}, "mmoe+pcgrad", seed,
                                  1.0 + offset))
        records.append(record("census", {"task_group": 1}, "mmoe+pcgrad", seed, 2.0 + offset))

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
