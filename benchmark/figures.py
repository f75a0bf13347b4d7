"""Figures of a sweep report: metrics against the grid and against model size, and gate maps.

Every figure is written with matplotlib's file-only Agg backend, so reports render on machines
without a display.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import polars as pl

MOE_GATE = re.compile(r"^selected/routing/(?P<task>[^/]+)/expert_(?P<expert>\d+)$")
CONNECTION_GATE = re.compile(r"^selected/routing/(?P<routing>[^/]+)/gate_(?P<i>\d+)_(?P<j>\d+)$")
SCORE = "selected/val_selection_score"
SIZE_AXES = {
    "param_count": "trainable parameters",
    "serving_param_count": "parameters at serving time",
}


def plot(summary: pl.DataFrame, path: Path, title: str) -> Path | None:
    """Plot each task metric against the grid parameter: one line and 95 % band per model.

    Makes one figure per dataset and budget, with one panel per metric. As in
    :func:`plot_against_size`, the y axis spans the means, and bands wider than that are cut.
    Returns None when the grid has no single numeric parameter to put on the x axis.
    """
    plt = _pyplot()
    grid_columns = filled_columns(summary, [c for c in summary.columns if c.startswith("grid.")])
    if len(grid_columns) != 1 or not summary[grid_columns[0]].dtype.is_numeric():
        return None
    x_column = grid_columns[0]
    metrics = summary["metric"].unique(maintain_order=True).to_list()

    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        values = summary.filter(pl.col("metric") == metric)
        _lines_with_bands(axis, values, x_column)
        _fit_to_means(axis, values["mean"].to_numpy(), zero=False)
        axis.set_xlabel(x_column[len("grid."):])
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    _legend_beside(axes)
    return _save(figure, f"{title} ({_interval_note(summary)})", path)


def plot_against_size(
    trials: pl.DataFrame,
    summary: pl.DataFrame,
    out_dir: Path,
    suite: str,
    difference_to: str | None = None,
) -> list[Path]:
    """Plot each task metric against model size: one line and 95 % band per model.

    One figure per dataset and grid point, written when the sweep has two or more budgets. Its
    rows are the task metrics. The first column puts the mean trainable parameter count on a log
    x axis, the second the mean parameter count at serving time (SNR without its closed
    connections).
    The y axis spans the means, so a band much wider than the spread of the means is cut at
    the axes. With ``difference_to``, ``summary`` contains paired differences to that model,
    and the figures get a line at 0.
    """
    sizes = [c for c in SIZE_AXES if c in trials.columns]
    if "param_count" not in sizes or trials["budget"].n_unique() < 2:
        return []
    grid_columns = [c for c in summary.columns if c.startswith("grid.")]
    keys = ["dataset", *grid_columns, "budget", "model"]
    means = trials.drop_nulls("param_count").group_by(keys).agg(pl.col(sizes).mean())
    joined = summary.join(means, on=keys, how="inner", nulls_equal=True)
    budgets = sorted(trials["budget"].unique().to_list())

    plt = _pyplot()
    files = []
    for point, group in joined.group_by(["dataset", *grid_columns], maintain_order=True):
        metrics = group["metric"].unique(maintain_order=True).to_list()
        figure, axes = plt.subplots(
            len(metrics), len(sizes), figsize=(5 * len(sizes), 3.6 * len(metrics)), squeeze=False
        )
        for row, metric in zip(axes, metrics):
            values = group.filter(pl.col("metric") == metric)
            for axis, size in zip(row, sizes):
                _lines_with_bands(axis, values, size, clip=difference_to is None)
                _size_axis(axis, budgets, SIZE_AXES[size])
                _fit_to_means(axis, values["mean"].to_numpy(), zero=difference_to is not None)
                axis.set_ylabel(metric if difference_to is None else f"{metric} - {difference_to}")
        _legend_beside(axes)
        label = _point_label(point[0], grid_columns, point[1:])
        if difference_to is None:
            title = f"{suite}: {label}, metric against model size ({_interval_note(group)})"
            name = f"{slug(label)}_size.png"
        else:
            title = (f"{suite}: {label}, difference to {difference_to} at the same budget, "
                     f"paired by seed ({_interval_note(group)})")
            name = f"{slug(label)}_size_vs_{slug(difference_to)}.png"
        files.append(_save(figure, title, out_dir / name))
    return files


def _legend_beside(axes) -> None:
    """Put the models' legend to the right of the top right panel, clear of lines and bands."""
    axes[0][-1].legend(*axes[0][0].get_legend_handles_labels(), fontsize="small",
                       loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _interval_note(summary: pl.DataFrame) -> str:
    """Describe the bands of a figure: a 95 % interval needs at least two seeds."""
    if summary.height and summary["n"].max() < 2:
        return "mean of one seed, no interval"
    return "mean, 95 % CI"


def _size_axis(axis, budgets: list[int], label: str) -> None:
    axis.set_xscale("log")
    axis.set_xticks(budgets, [f"{b / 1000:g}k" if b >= 1000 else str(b) for b in budgets])
    axis.minorticks_off()
    axis.set_xlabel(label)
    axis.grid(alpha=0.3)


def _fit_to_means(axis, means: np.ndarray, zero: bool) -> None:
    """Span the y axis over the means (and 0 for differences), with a margin for the bands."""
    means = means[np.isfinite(means)]
    if not means.size:
        return
    low, high = float(means.min()), float(means.max())
    if zero:
        low, high = min(low, 0.0), max(high, 0.0)
        axis.axhline(0.0, color="black", linewidth=0.8)
    margin = max(high - low, 1e-3 * max(abs(low), abs(high), 1.0)) * 0.6
    axis.set_ylim(low - margin, high + margin)


def routing_matrices(row: dict) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Rebuild a trial's gate matrices, with their row labels, from its routing metrics.

    Reads the ``selected/routing/...`` metrics. Returns ``{"gates": ((T, E), task names)}`` of
    mean gate weights for mixture-of-experts models, or one ((I, J), upper unit indices) of
    evaluation gates per SNR routing, bottom first and ``to_tasks`` last. The rows of
    ``to_tasks`` are labelled with the task names of the row's ``tasks`` column (a JSON list)
    where it has one. Columns (experts or lower sub-networks) keep their indices.
    """
    experts: dict[str, dict[int, float]] = {}
    connections: dict[str, dict[tuple[int, int], float]] = {}
    for name, value in row.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if match := MOE_GATE.match(name):
            experts.setdefault(match["task"], {})[int(match["expert"])] = value
        elif match := CONNECTION_GATE.match(name):
            connections.setdefault(match["routing"], {})[int(match["i"]), int(match["j"])] = value

    task_names = json.loads(row["tasks"]) if row.get("tasks") else []
    matrices = {}
    if experts:
        width = 1 + max(e for values in experts.values() for e in values)
        matrix = [[values.get(e, np.nan) for e in range(width)] for values in experts.values()]
        matrices["gates"] = (np.array(matrix), list(experts))
    for routing in sorted(connections, key=lambda name: (name == "to_tasks", name)):
        cells = connections[routing]
        shape = (1 + max(i for i, _ in cells), 1 + max(j for _, j in cells))
        matrix = np.full(shape, np.nan)
        for (i, j), value in cells.items():
            matrix[i, j] = value
        labels = [str(i) for i in range(shape[0])]
        if routing == "to_tasks" and len(task_names) == shape[0]:
            labels = task_names
        matrices[routing] = (matrix, labels)
    return matrices


def plot_routing(trials: pl.DataFrame, out_dir: Path, suite: str) -> list[Path]:
    """Draw heat maps of the gates of each model's best seed, one figure per model.

    The best seed at each sweep point (dataset, grid point, budget) is the one with the highest
    validation selection score. Mixture-of-experts models show each task's mean gate weight per
    expert on the test split; SNR shows the evaluation gate of every connection.
    """
    routed = [c for c in trials.columns if MOE_GATE.match(c) or CONNECTION_GATE.match(c)]
    if not routed or SCORE not in trials.columns:
        return []
    grid_columns = [c for c in trials.columns if c.startswith("grid.")]
    best = best_seeds(trials)

    files = []
    for (model,), group in best.group_by(["model"], maintain_order=True):
        panels = []
        for r in group.iter_rows(named=True):
            point = _point_label(r["dataset"], grid_columns, [r[c] for c in grid_columns])
            label = f"{point}, budget {r['budget']:,}, seed {r['seed']}"
            matrices = routing_matrices(r)
            if matrices:
                panels.append((label, matrices))
        if not panels:
            continue
        title = f"{suite}: {model}, gates of the best seed per sweep point"
        # CGC and PLE order their experts as the shared ones, then each task's own.
        expert_axis = ("expert (shared first, then each task's own)"
                       if model.split("+")[0] in ("cgc", "ple") else "expert")
        path = out_dir / "routing" / f"{slug(model)}.png"
        files.append(_heat_maps(panels, title, path, expert_axis))
    return files


def best_seeds(trials: pl.DataFrame) -> pl.DataFrame:
    """Return, per model and sweep point, the trial with the highest validation selection score.

    Trials without a score (NaN) come last, so they are picked only when no seed has one.
    """
    keys = ["model", "dataset", *[c for c in trials.columns if c.startswith("grid.")], "budget"]
    return (
        trials.with_columns(pl.col(SCORE).fill_nan(None))
        .sort(SCORE, descending=True, nulls_last=True)
        .group_by(keys, maintain_order=True)
        .first()
        .sort(keys)
    )


def _heat_maps(
    panels: list[tuple[str, dict[str, tuple[np.ndarray, list[str]]]]],
    title: str,
    path: Path,
    expert_axis: str,
) -> Path:
    plt = _pyplot()
    columns = max(len(matrices) for _, matrices in panels)
    figure, axes = plt.subplots(
        len(panels), columns, figsize=(max(7.0, 3.6 * columns + 1), 2.8 * len(panels)),
        squeeze=False, layout="constrained",
    )
    for row, (label, matrices) in zip(axes, panels):
        for axis in row[len(matrices):]:
            axis.set_axis_off()
        for axis, (name, (matrix, rows)) in zip(row, matrices.items()):
            image = axis.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            moe = name == "gates"
            axis.set_title(f"{label}\n{name}" if not moe else label, fontsize="small")
            axis.set_xlabel(expert_axis if moe else "lower sub-network")
            axis.set_ylabel("task" if moe or name == "to_tasks" else "upper sub-network")
            axis.set_xticks(range(matrix.shape[1]))
            axis.set_yticks(range(matrix.shape[0]), rows)
            for (i, j), value in np.ndenumerate(matrix):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="x-small",
                          color="white" if value < 0.6 else "black")
        figure.colorbar(image, ax=list(row), fraction=0.05)
    return _save(figure, title, path, tight=False)  # constrained layout places the colour bars


def filled_columns(frame: pl.DataFrame, columns: list[str]) -> list[str]:
    """Return the columns that hold a value in some row of ``frame``.

    In a suite with several datasets, each dataset's rows leave the other grids' columns null.
    """
    return [c for c in columns if frame[c].null_count() < frame.height]


def _lines_with_bands(axis, summary: pl.DataFrame, x_column: str, clip: bool = True) -> None:
    """Draw one line per model with its 95 % band, each model in its own colour.

    With ``clip``, bands stop at the range a metric can take (0 for an error, 0 and 1 for a
    score), because a t interval over few seeds can reach past it.
    """
    metric = summary["metric"][0] if summary.height else ""
    low_limit, high_limit = _metric_range(metric) if clip else (-np.inf, np.inf)
    for (model,), group in summary.group_by(["model"], maintain_order=True):
        group = group.sort(x_column)
        x, mean = group[x_column].to_numpy(), group["mean"].to_numpy()
        line = axis.plot(x, mean, marker="o", label=model, color=model_color(model))[0]
        low = np.clip(group["ci95_low"].to_numpy(), low_limit, high_limit)
        high = np.clip(group["ci95_high"].to_numpy(), low_limit, high_limit)
        axis.fill_between(x, low, high, color=line.get_color(), alpha=0.1, linewidth=0)


def model_color(model: str) -> str:
    """Return a model's colour, the same in every figure whatever else the figure shows.

    Built-in models get fixed colours. Other labels (weightings, grid variants, plugins) get
    one derived from their name, which may repeat a colour.
    """
    builtin = ["single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple", "cross_stitch",
               "snr_trans", "snr_aver"]
    palette = [f"tab:{name}" for name in ("gray", "brown", "orange", "blue", "cyan", "purple",
                                          "olive", "red", "green")]
    if model in builtin:
        return palette[builtin.index(model)]
    digest = sum((index + 1) * ord(char) for index, char in enumerate(model))
    return f"C{digest % 10}"


def _metric_range(metric: str) -> tuple[float, float]:
    name = metric.rsplit("/", 1)[-1]
    if name in ("mse", "loss"):
        return 0.0, np.inf
    if name in ("auc", "hit_at_1", "perr", "gap_at_20", "map"):
        return 0.0, 1.0
    return -np.inf, np.inf


def _point_label(dataset: str, grid_columns: list[str], values) -> str:
    parts = [f"{c[len('grid.'):]}={v}" for c, v in zip(grid_columns, values) if v is not None]
    return " ".join([dataset, *parts])


def slug(text: str) -> str:
    """Return ``text`` with every run of characters unsafe in a file name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, title: str, path: Path, tight: bool = True) -> Path:
    plt = _pyplot()
    figure.suptitle(title)
    if tight:
        figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A tight bounding box keeps a legend placed beside the axes inside the image.
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
