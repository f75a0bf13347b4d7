"""Real MLflow servers and a headless Chromium for the tracking server and MLflow UI tests.

``scripts/mlflow_ui_screenshot.py`` uses the same helpers, so the README's screenshot shows the
page that the browser test checks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# The tests need neither the UI's telemetry nor the server's job runner, which would cost one
# more process on a busy test machine.
SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no process listens on at the moment of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """An ``mlflow server`` or ``mlflow ui`` process on 127.0.0.1, in a process group of its own.

    ``mlflow server`` runs uvicorn as a child process. Both share the group that the server leads,
    so signalling the group through the server's process id stops them all.

    Args:
        command: ``"server"`` or ``"ui"``.
        store_args: the store options, such as ``["--backend-store-uri", "sqlite:///..."]``.
        log: file that receives the server's output.
        port: the port to listen on; a free one by default.
    """

    def __init__(self, command: str, store_args: Sequence[str], log: Path,
                 port: int | None = None) -> None:
        self.command = command
        self.store_args = list(store_args)
        self.log = log
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> MlflowServer:
        """Start the server and wait until its health endpoint responds.

        Raises:
            RuntimeError: If the server exits or does not respond within ``timeout`` seconds.
        """
        command = [sys.executable, "-m", "mlflow", self.command, *self.store_args,
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **SERVER_ENV},
            )

        deadline = time.monotonic() + timeout
        while not self.responds():
            if self.process.poll() is not None:
                raise RuntimeError(f"`mlflow {self.command}` exited with code "
                                   f"{self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"`mlflow {self.command}` did not respond on {self.url}/health "
                                   f"within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)
        return self

    def responds(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def kill(self) -> None:
        """Stop the server and its children at once with SIGKILL, as a crash would."""
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def stop(self, grace: float = 15.0) -> None:
        """Ask the server to shut down, and kill it if it still runs after ``grace`` seconds."""
        if self.process is None or self.process.returncode is not None:
            # Already reaped, so its process id may belong to another process by now.
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait()

    def group_alive(self) -> bool:
        """Return whether any process of the server's group still runs."""
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def _signal_group(self, number: int) -> None:
        # The group id is the server's process id, because it was started in a new session.
        try:
            os.killpg(self.process.pid, number)
        except ProcessLookupError:
            pass

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def launch_chromium(playwright):
    """Start Debian's Chromium headless through Playwright, without Playwright's own browsers."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def runs_page_url(server_url: str, experiment_id: str, search_filter: str = "") -> str:
    # Without ``workflowType``, the UI opens experiments in its GenAI view (mlflow 3.17).
    url = f"{server_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if search_filter:
        url += "&" + urllib.parse.urlencode({"searchFilter": search_filter})
    return url


def open_runs_table(page, server_url: str, experiment_id: str, parent_run_name: str,
                    search_filter: str = "", timeout_ms: float = 60_000) -> None:
    """Open an experiment's runs table and expand the sweep's parent run to show its children.

    The UI is a single-page app, so every step waits for the element it needs.

    Args:
        search_filter: an MLflow search expression, as typed into the table's search box.
    """
    page.goto(runs_page_url(server_url, experiment_id, search_filter))
    parent_cell = page.locator("[role=gridcell][col-id='attributes.`Run Name`']").filter(
        has_text=parent_run_name
    )
    parent_cell.wait_for(timeout=timeout_ms)
    # Nested runs are collapsed under their parent. The first button of its name cell expands it.
    parent_cell.locator("button").first.click()


def add_columns(page, names: Sequence[str]) -> None:
    """Tick columns by name in the table's column selector, then close it.

    The selector lists attributes, metrics, params and tags in that order. A name that is both a
    param and a tag, such as ``seed``, ticks the param. Ticking a column shown by default, such
    as ``Dataset``, hides it.
    """
    page.get_by_test_id("column-selection-dropdown").first.click()
    tree = page.get_by_test_id("column-selector-tree")
    for name in names:
        tree.get_by_text(name, exact=True).first.click()
    page.keyboard.press("Escape")


def tidy_runs_page(page) -> None:
    """Close the assistant panel and collapse the sidebar, leaving the page to the table."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()
    page.get_by_role("button", name="Toggle sidebar").click()
