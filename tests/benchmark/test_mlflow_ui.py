"""A quick sweep as the MLflow UI shows it, in headless Chromium driven by Playwright."""

import struct

import pytest
from playwright.sync_api import expect, sync_playwright

from benchmark.run import main
from benchmark.tracking import default_tracking_uri

from .conftest import store_runs
from .mlflow_processes import CHROMIUM, MlflowServer, add_columns, launch_chromium, open_runs_table

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason=f"{CHROMIUM} is missing; install it with `apt-get install chromium`"),
]

VIEWPORT = {"width": 1600, "height": 900}
WAIT_MS = 60_000  # the UI's script bundle is large and loads slowly on a busy machine


def png_size(data: bytes) -> tuple[int, int]:
    """Return (width, height) from a PNG's header: the signature, then the IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_sweep_runs_shown_in_ui(tmp_path):
    results = tmp_path / "results"
    assert main(["--suite", "correlation", "--quick", "--models", "shared_bottom,mmoe",
                 "--seeds", "0", "--results-dir", str(results)]) == 0
    client, parents, children = store_runs(results, "correlation")
    experiment = client.get_experiment_by_name("mtl-bench/correlation")
    parent = parents[0]
    assert len(children) == 4
    screenshot = tmp_path / "mlflow-ui.png"

    ui = MlflowServer("ui", ["--backend-store-uri", default_tracking_uri(results)],
                      log=tmp_path / "ui.log")
    with ui, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(viewport=VIEWPORT)

        page.goto(f"{ui.url}/#/experiments")
        link = page.get_by_role("link", name="mtl-bench/correlation", exact=True)
        expect(link).to_have_attribute("href", f"#/experiments/{experiment.experiment_id}",
                                       timeout=WAIT_MS)

        open_runs_table(page, ui.url, experiment.experiment_id, parent.info.run_name,
                        timeout_ms=WAIT_MS)
        add_columns(page, ["param_count"])
        # The table is an ag-grid: each row carries its run id, with the name column pinned
        # left and the other columns in the centre.
        names = page.locator(".ag-pinned-left-cols-container")
        cells = page.locator(".ag-center-cols-container")
        expect(names.locator(f"[row-id='{parent.info.run_id}']")).to_contain_text(
            parent.info.run_name)
        for child in children:
            expect(names.locator(f"[row-id='{child.info.run_id}']")).to_contain_text(
                child.info.run_name, timeout=WAIT_MS)
            param_count = cells.locator(f"[row-id='{child.info.run_id}'] "
                                        "[col-id='metrics.`param_count`']")
            expect(param_count).to_have_text(str(int(child.data.metrics["param_count"])))

        page.screenshot(path=screenshot)
        browser.close()

    assert png_size(screenshot.read_bytes()) == (VIEWPORT["width"], VIEWPORT["height"])
    assert not ui.group_alive()
