"""Summaries of a sweep: mean and 95 % confidence interval over seeds, as tables and plots.

For every task metric (``test/<task>/<metric>``), trials are grouped by dataset, grid point,
budget and model. The interval is mean +- t(0.975, n - 1) * s / sqrt(n), with s the sample
standard deviation over the n seeds. It is undefined (empty) for a single seed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import polars as pl
from scipy import stats

from benchmark.figures import filled_columns, plot, plot_against_size, plot_routing, slug

TASK_METRIC = re.compile(r"^test/(?P<task>[^/]+)/(?P<metric>[^/]+)$")
GROUP_COLUMNS = ("dataset", "budget", "model")
LOWER_IS_BETTER = {"mse", "loss"}


@dataclass(frozen=True)
class Report:
    """The summary table (long format) and the files written for it."""

    summary: pl.DataFrame
    files: list[Path]
    text: str


def trial_frame(records: Sequence[dict[str, Any]]) -> pl.DataFrame:
    """Build one row per finished trial from records with spec fields and final metrics.

    Each record contains ``dataset``, ``model``, ``budget``, ``seed``, ``grid`` (a dict) and
    ``metrics`` (a dict), and may contain ``tasks``, the task names in model order as a JSON
    list, which labels the rows of SNR's ``to_tasks`` heat maps.
    """
    rows = []
    for record in records:
        row = {key: record[key] for key in ("dataset", "model", "budget", "seed")}
        if record.get("tasks") is not None:
            row["tasks"] = record["tasks"]
        row.update({f"grid.{key}": value for key, value in record["grid"].items()})
        row.update(record["metrics"])
        rows.append(row)
    # Metrics differ between trials (gates of one model kind, another dataset's tasks), so the
    # schema comes from every row: polars would otherwise infer it from the first 100 only.
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def summarize(trials: pl.DataFrame) -> pl.DataFrame:
    """Return mean, standard deviation, seed count and 95 % interval per group and task metric."""
    metric_columns = [c for c in trials.columns if TASK_METRIC.match(c)]
    grid_columns = [c for c in trials.columns if c.startswith("grid.")]
    keys = [*GROUP_COLUMNS[:1], *grid_columns, *GROUP_COLUMNS[1:]]

    long = trials.unpivot(index=keys + ["seed"], on=metric_columns, variable_name="metric")
    summary = (
        long.drop_nulls("value")
        .filter(pl.col("value").is_not_nan())
        .group_by([*keys, "metric"], maintain_order=True)
        .agg(
            n=pl.len(),
            mean=pl.col("value").mean(),
            std=pl.col("value").std(ddof=1),
        )
    )
    half_widths = [
        _half_width(std, n) for std, n in zip(summary["std"].to_list(), summary["n"].to_list())
    ]
    return summary.with_columns(
        pl.Series("ci95", half_widths, dtype=pl.Float64),
    ).with_columns(
        ci95_low=pl.col("mean") - pl.col("ci95"),
        ci95_high=pl.col("mean") + pl.col("ci95"),
    ).sort([*keys, "metric"])


def paired_differences(trials: pl.DataFrame, baseline: str) -> pl.DataFrame:
    """Return each model's difference to ``baseline``, paired by seed, with a 95 % interval.

    For every seed the baseline's value is subtracted from the model's value on the same dataset,
    grid point, budget and seed, so the seed-to-seed spread of the data itself cancels out. The
    result has the layout of :func:`summarize`, with the differences as values.
    """
    metric_columns = [c for c in trials.columns if TASK_METRIC.match(c)]
    grid_columns = [c for c in trials.columns if c.startswith("grid.")]
    keys = ["dataset", *grid_columns, "budget", "seed"]
    reference = trials.filter(pl.col("model") == baseline).select(
        keys + [pl.col(c).alias(f"{c}@baseline") for c in metric_columns]
    )
    paired = trials.filter(pl.col("model") != baseline).join(
        reference, on=keys, how="inner", nulls_equal=True
    )
    differences = paired.select(
        keys + ["model"] + [(pl.col(c) - pl.col(f"{c}@baseline")).alias(c) for c in metric_columns]
    )
    if differences.is_empty():
        return pl.DataFrame()
    return summarize(differences)


def _grid_plots(
    group: pl.DataFrame, out_dir: Path, suite: str, dataset: str, budget: int
) -> list[Path]:
    """Plot one dataset and budget against its grid: one figure, or with several grid
    parameters, one figure per value of the others, against the first that varies."""
    grid_columns = filled_columns(group, [c for c in group.columns if c.startswith("grid.")])
    varying = [c for c in grid_columns if group[c].n_unique() > 1]
    x_columns = varying or grid_columns
    others = [c for c in grid_columns if c not in x_columns[:1]]
    if others:
        parts = group.group_by(others, maintain_order=True)
    else:
        parts = [((), group)]

    files = []
    for values, part in parts:
        point = " ".join([dataset, *[f"{c[len('grid.'):]}={v}" for c, v in zip(others, values)]])
        title = f"{suite}: {point}, budget {budget:,} parameters"
        path = out_dir / f"{slug(point)}_budget{budget}.png"
        figure = plot(part.drop(others), path, title)
        if figure is not None:
            files.append(figure)
    return files


def _half_width(std: float | None, n: int) -> float:
    if n < 2 or std is None or math.isnan(std):
        return math.nan
    return float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))


def format_tables(summary: pl.DataFrame, difference_to: str | None = None) -> str:
    """Render one text table per dataset, budget and metric: models by grid point, mean +- CI.

    With ``difference_to`` set, the values are differences to that model, and the titles state it.
    """
    grid_columns = [c for c in summary.columns if c.startswith("grid.")]
    blocks = []
    for (dataset, budget, metric), group in summary.group_by(
        ["dataset", "budget", "metric"], maintain_order=True
    ):
        better = "lower" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "higher"
        title = f"{metric} on {dataset}, budget {budget:,} parameters ({better} is better)"
        if difference_to is not None:
            title = (f"{metric} minus that of {difference_to}, paired by seed, on {dataset}, "
                     f"budget {budget:,} parameters ({better} is better)")
        sign = -1.0 if better == "lower" else 1.0
        cells = group.with_columns(
            cell=pl.struct("mean", "ci95").map_elements(
                lambda row, sign=sign: _cell(row["mean"], row["ci95"], sign if difference_to else None),
                return_dtype=pl.String,
            ),
            point=_grid_label(filled_columns(group, grid_columns)),
        )
        table = cells.pivot(on="point", index="model", values="cell", maintain_order=True)
        blocks.append(f"{title}\n{_markdown(table)}")
    return "\n\n".join(blocks)


def _grid_label(grid_columns: list[str]) -> pl.Expr:
    if not grid_columns:
        return pl.lit("all")
    parts = [pl.format(f"{c[len('grid.'):]}={{}}", pl.col(c).cast(pl.String)) for c in grid_columns]
    # A dataset's rows leave the grid columns of other datasets null, so those parts are skipped.
    return pl.concat_str(parts, separator=" ", ignore_nulls=True)


def _cell(mean: float, half_width: float | None, sign: float | None = None) -> str:
    """Format mean ± CI, and mark a difference whose interval excludes 0.

    For a difference, ``sign`` is +1 when higher is better and -1 when lower is better. The
    mark is ``(helps)`` or ``(hurts)``.
    """
    if half_width is None or math.isnan(half_width):
        return f"{mean:.4f}"
    text = f"{mean:.4f} ± {half_width:.4f}"
    if sign is not None and abs(mean) > half_width:
        text += " (helps)" if sign * mean > 0 else " (hurts)"
    return text


def transfer_verdicts(differences: pl.DataFrame) -> pl.DataFrame:
    """Label each paired difference to the baseline: ``helps``, ``hurts`` or ``unclear``.

    A model helps (or hurts) at a sweep point when the 95 % interval of its difference to the
    single-task baseline lies entirely on the better (or worse) side of 0. Negative transfer is
    a ``hurts``. Rows with one seed, whose interval is undefined, are ``unclear``.
    """
    lower_better = pl.col("metric").str.split("/").list.last().is_in(list(LOWER_IS_BETTER))
    gain = pl.when(lower_better).then(-pl.col("mean")).otherwise(pl.col("mean"))
    return differences.with_columns(
        verdict=pl.when(pl.col("ci95").is_nan() | (pl.col("mean").abs() <= pl.col("ci95")))
        .then(pl.lit("unclear"))
        .when(gain > 0)
        .then(pl.lit("helps"))
        .otherwise(pl.lit("hurts"))
    )


def format_transfer(verdicts: pl.DataFrame, baseline: str) -> str:
    """Render the sweep points where sharing hurts, as one markdown table."""
    grid_columns = [c for c in verdicts.columns if c.startswith("grid.")]
    hurts = verdicts.filter(pl.col("verdict") == "hurts")
    counts = {v: verdicts.filter(pl.col("verdict") == v).height for v in ("helps", "hurts", "unclear")}
    summary = (f"Against {baseline} at the same budget, paired by seed: {counts['helps']} "
               f"comparisons help, {counts['hurts']} hurt, {counts['unclear']} are unclear "
               f"(the 95 % interval includes 0, or a single seed gives no interval).")
    if hurts.is_empty():
        return f"{summary} No model is significantly worse than {baseline} anywhere."
    table = hurts.with_columns(
        point=_grid_label(grid_columns),
        difference=pl.struct("mean", "ci95").map_elements(
            lambda row: _cell(row["mean"], row["ci95"]), return_dtype=pl.String
        ),
    ).select("dataset", "point", "budget", "model", "metric", "difference")
    return f"{summary} Where sharing hurts:\n{_markdown(table)}"


def _markdown(table: pl.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.iter_rows()]
    return "\n".join([header, rule, *rows])


def write_report(
    records: Sequence[dict[str, Any]], out_dir: Path, suite: str, baseline: str = "single_task"
) -> Report:
    """Summarize ``records`` and write the CSV, the markdown tables and the plots to ``out_dir``.

    When ``baseline`` is among the models, a second set of tables gives every other model's
    difference to it, paired by seed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # Files of an earlier report in this folder would otherwise sit beside the new ones.
    for pattern in ("trials.csv", "summary.csv", "summary.md", "difference_to_*.csv", "*.png",
                    "routing/*.png"):
        for stale in out_dir.glob(pattern):
            stale.unlink()
    trials = trial_frame(records)
    if trials.is_empty():
        return Report(pl.DataFrame(), [], "No finished trials to summarize.")

    summary = summarize(trials)
    files = [out_dir / "trials.csv", out_dir / "summary.csv", out_dir / "summary.md"]
    trials.write_csv(files[0])
    summary.write_csv(files[1])
    text = format_tables(summary)
    if baseline in set(trials["model"].to_list()):
        differences = paired_differences(trials, baseline)
        if not differences.is_empty():
            verdicts = transfer_verdicts(differences)
            files.append(out_dir / f"difference_to_{baseline}.csv")
            verdicts.write_csv(files[-1])
            text += "\n\n## Negative transfer\n\n" + format_transfer(verdicts, baseline)
            text += "\n\n" + format_tables(differences, difference_to=baseline)
            files += plot_against_size(trials, differences, out_dir, suite, baseline)
    files[2].write_text(f"# Suite `{suite}`: test metrics, mean ± 95 % CI over seeds\n\n{text}\n")

    for (dataset, budget), group in summary.group_by(["dataset", "budget"], maintain_order=True):
        files += _grid_plots(group, out_dir, suite, dataset, budget)
    files += plot_against_size(trials, summary, out_dir, suite)
    files += plot_routing(trials, out_dir, suite)
    return Report(summary, files, text)
