"""Take the README's screenshot of the MLflow UI: the runs table of a quick correlation sweep.

Runs ``python -m benchmark.run --suite correlation --quick`` into a temporary SQLite store and
starts ``mlflow ui`` on it. Headless Chromium (``/usr/bin/chromium``, driven by Playwright) opens
the runs table, filters it to one correlation, expands the sweep's parent run and adds the columns
that the README suggests. The page is then saved as a PNG. The script reuses the helpers of the
MLflow UI test, so the image shows the page that the test checks.

Usage:
    python scripts/mlflow_ui_screenshot.py [--output docs/images/mlflow-ui.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the helpers live in the test package, which is not installed

from benchmark.run import main as run_benchmark  # noqa: E402
from benchmark.tracking import default_tracking_uri  # noqa: E402
from tests.benchmark.conftest import store_runs  # noqa: E402
from tests.benchmark.mlflow_processes import (  # noqa: E402
    MlflowServer,
    add_columns,
    launch_chromium,
    open_runs_table,
    tidy_runs_page,
)

SEARCH_FILTER = "tags.grid.correlation = '0.5'"
# The first three are shown by default and stay empty for these runs, so ticking hides them.
COLUMNS = [
    "Dataset", "Source", "Models",
    "model.name", "dataset.params.correlation", "seed", "width",
    "test/task1/mse", "test/task2/mse", "val/selection_score", "param_count",
    "serving_param_count",
]
VIEWPORT = {"width": 1600, "height": 760}


def take_screenshot(results: Path, output: Path) -> None:
    client, parents, _ = store_runs(results, "correlation")
    experiment = client.get_experiment_by_name("mtl-bench/correlation")
    ui = MlflowServer("ui", ["--backend-store-uri", default_tracking_uri(results)],
                      log=results / "mlflow-ui.log")
    with ui, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(viewport=VIEWPORT)
        open_runs_table(page, ui.url, experiment.experiment_id, parents[0].info.run_name,
                        search_filter=SEARCH_FILTER)
        tidy_runs_page(page)
        add_columns(page, COLUMNS)
        # The table redraws its columns after the selector closes.
        page.wait_for_timeout(1500)
        page.screenshot(path=output)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "images" / "mlflow-ui.png",
                        help="PNG file to write (default: %(default)s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        results = Path(folder) / "results"
        code = run_benchmark(["--suite", "correlation", "--quick", "--workers", "2",
                              "--results-dir", str(results)])
        if code != 0:
            sys.exit(f"The quick correlation sweep failed with exit status {code}.")
        take_screenshot(results, args.output.resolve())
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
