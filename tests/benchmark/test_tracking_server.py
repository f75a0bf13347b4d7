"""Sweeps that log to a real `mlflow server`, read back through the server's REST API."""

import filecmp
import json
import math

import pytest
from mlflow.tracking import MlflowClient

from benchmark.run import main
from benchmark.suite import load_suite, plan_trials
from benchmark.tracking import HTTP_REQUEST_BOUNDS

from .conftest import write_suite
from .mlflow_processes import MlflowServer, free_port

QUICK_MODELS = ("shared_bottom", "mmoe")

# A model that stops the tracking server once another trial has finished, then trains as
# Shared-Bottom. The marker file makes it stop the server only once, so a resumed sweep runs it
# as a plain model.
STOPPER_PLUGIN = '''
import os
import signal
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from models import register_model
from models.shared_bottom import SharedBottom


def stop_server_after_first_trial():
    client = MlflowClient(os.environ["STOPPER_TRACKING_URI"])
    experiment = client.get_experiment_by_name("mtl-bench/tiny")
    deadline = time.monotonic() + 300
    while not client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'"):
        if time.monotonic() > deadline:
            raise RuntimeError("no other trial finished within 300 s")
        time.sleep(0.1)
    os.killpg(int(os.environ["STOPPER_SERVER_PID"]), signal.SIGKILL)


@register_model("server_stopper", override=True)
class ServerStopper(SharedBottom):
    def forward(self, x):
        marker = Path(os.environ["STOPPER_MARKER"])
        if not marker.exists():
            marker.touch()
            stop_server_after_first_trial()
        return super().forward(x)
'''


@pytest.fixture(autouse=True)
def _restore_http_settings(monkeypatch):
    # A sweep sets MLflow's HTTP retry bounds in os.environ. Undo that after each test.
    for name in HTTP_REQUEST_BOUNDS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tracking_server(tmp_path):
    store = tmp_path / "server"
    store.mkdir()
    server = MlflowServer(
        "server",
        ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts"],
        log=tmp_path / "server.log",
    )
    server.start()
    yield server
    server.stop()
    assert not server.group_alive(), "a process of the MLflow server outlived its stop"


def sweep_runs(client, suite_name):
    experiment = client.get_experiment_by_name(f"mtl-bench/{suite_name}")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get("sweep") == "parent"]
    children = [run for run in runs if run.data.tags.get("sweep") != "parent"]
    return experiment, parents, children


@pytest.mark.slow
def test_quick_suite_logged_through_server(tmp_path, tracking_server):
    results = tmp_path / "results"
    code = main(["--suite", "correlation", "--quick", "--workers", "2",
                 "--models", ",".join(QUICK_MODELS), "--seeds", "0",
                 "--tracking-uri", tracking_server.url, "--results-dir", str(results)])
    assert code == 0

    planned = plan_trials(load_suite("correlation", quick=True,
                                     overrides={"models": list(QUICK_MODELS), "seeds": [0]}))
    client = MlflowClient(tracking_server.url)
    experiment, parents, children = sweep_runs(client, "correlation")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["trials_planned"] == str(len(planned))
    assert parent.data.params["quick"] == "True"
    assert parent.data.metrics["trials_ran"] == len(planned)
    assert parent.data.metrics["trials_failed"] == 0

    by_hash = {child.data.tags["trial_hash"]: child for child in children}
    assert len(children) == len(planned)
    assert set(by_hash) == {spec.trial_hash for spec in planned}
    for spec in planned:
        child = by_hash[spec.trial_hash]
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["model"] == spec.model
        assert child.data.params["model.name"] == spec.model
        correlation = str(spec.grid_point["correlation"])
        assert child.data.tags["grid.correlation"] == correlation
        assert child.data.params["dataset.params.correlation"] == correlation
        assert int(child.data.params["width"]) > 0
        metrics = child.data.metrics
        assert math.isfinite(metrics["test/task1/mse"])
        assert math.isfinite(metrics["test/task2/mse"])
        assert abs(metrics["param_count"] - spec.budget) / spec.budget <= 0.02
        history = client.get_metric_history(child.info.run_id, "val/task1/mse")
        assert sorted(m.step for m in history) == list(range(spec.training["max_epochs"]))
        downloaded = client.download_artifacts(child.info.run_id, "config.json",
                                               str(tmp_path / "downloads" / spec.trial_hash))
        with open(downloaded) as handle:
            assert json.load(handle) == json.loads(json.dumps(spec.config()))

    # The report artifacts, downloaded through the server, equal the files in the results folder.
    report_dir = results / "correlation-quick"
    local = sorted(p.relative_to(report_dir).as_posix() for p in report_dir.rglob("*")
                   if p.is_file())
    assert "summary.csv" in local
    assert "routing/mmoe.png" in local
    listed = sorted(a.path for a in client.list_artifacts(parent.info.run_id, "report"))
    listed += sorted(a.path for a in client.list_artifacts(parent.info.run_id, "report/routing"))
    assert sorted(listed) == sorted(
        [f"report/{name}" for name in local] + ["report/routing"]
    )
    downloaded = tmp_path / "downloads" / "parent"
    client.download_artifacts(parent.info.run_id, "report", str(downloaded))
    match, mismatch, errors = filecmp.cmpfiles(report_dir, downloaded / "report", local,
                                               shallow=False)
    assert mismatch == []
    assert errors == []
    assert match == local

    # The server stored them in its artifact destination, and nothing went to ./mlruns.
    stored = tmp_path / "server" / "artifacts"
    assert len(list(stored.rglob("summary.csv"))) == 1
    assert len(list(stored.rglob("config.json"))) == len(planned)
    assert not (tmp_path / "mlruns").exists()


def test_server_down_at_start_explained(tmp_path, capsys):
    port = free_port()  # nothing listens on it
    results = tmp_path / "results"
    suite = write_suite(tmp_path, seeds=(0,))

    code = main(["--suite", str(suite), "--tracking-uri", f"http://127.0.0.1:{port}",
                 "--results-dir", str(results)])

    assert code == 2
    error = capsys.readouterr().err
    assert f"Could not open the MLflow tracking store 'http://127.0.0.1:{port}'" in error
    assert f"http://127.0.0.1:{port}/health did not respond" in error
    assert f"`mlflow server --backend-store-uri sqlite:///mlflow.db --port {port}`" in error
    assert "Traceback" not in error
    assert not results.exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_server_stopping_mid_sweep_then_resume(tmp_path, tracking_server, monkeypatch, capfd,
                                               workers):
    plugin = tmp_path / "stopper_plugin.py"
    plugin.write_text(STOPPER_PLUGIN)
    monkeypatch.setenv("STOPPER_TRACKING_URI", tracking_server.url)
    monkeypatch.setenv("STOPPER_SERVER_PID", str(tracking_server.process.pid))
    monkeypatch.setenv("STOPPER_MARKER", str(tmp_path / "server-stopped"))
    suite = write_suite(tmp_path, models=("shared_bottom", "server_stopper", "mmoe"),
                        seeds=(0,), correlations=(0.5,))
    command = ["--suite", str(suite), "--workers", str(workers), "--plugin", str(plugin),
               "--tracking-uri", tracking_server.url, "--results-dir", str(tmp_path / "results")]

    assert main(command) == 2

    error = capfd.readouterr().err
    assert (f"The MLflow tracking server '{tracking_server.url}' stopped responding during the "
            f"sweep") in error
    assert ("Restart the server on the same backend store, then run the same command to resume"
            in error)
    assert "Traceback" not in error
    # The sweep stops at the first trial that the stopped server failed, rather than reporting
    # every remaining trial as failed.
    assert "FAILED" not in error
    assert not tracking_server.responds()

    # Restarted on the same store, the server still returns the trials finished before it stopped.
    tracking_server.kill()  # reaps the server that the plugin killed
    tracking_server.start()
    client = MlflowClient(tracking_server.url)
    _, parents, children = sweep_runs(client, "tiny")
    finished = {c.data.tags["trial_hash"]: c for c in children if c.info.status == "FINISHED"}
    models_finished = {c.data.tags["model"] for c in finished.values()}
    assert "shared_bottom" in models_finished
    assert "server_stopper" not in models_finished
    for run in finished.values():
        assert math.isfinite(run.data.metrics["test/task1/mse"])
        assert "config.json" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # The same command resumes: it skips those trials and runs the rest.
    assert main(command) == 0

    assert f"Skipping {len(finished)} trial(s) already finished" in capfd.readouterr().err
    _, parents_after, children_after = sweep_runs(client, "tiny")
    assert len(parents_after) == len(parents) + 1
    finished_after = [c for c in children_after if c.info.status == "FINISHED"]
    assert len(finished_after) == 3
    assert {c.data.tags["model"] for c in finished_after} == {
        "shared_bottom", "server_stopper", "mmoe"}
    for trial_hash, run in finished.items():
        same_trial = [c for c in finished_after if c.data.tags["trial_hash"] == trial_hash]
        assert [c.info.run_id for c in same_trial] == [run.info.run_id]


@pytest.mark.slow
def test_ray_cluster_missing_marks_parent_failed(tmp_path, tracking_server, suite_file, capsys):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("this process is already connected to Ray, so `auto` would find it")

    code = main(["--suite", str(suite_file), "--results-dir", str(tmp_path / "results"),
                 "--executor", "ray", "--ray-address", "auto",
                 "--tracking-uri", tracking_server.url])

    error = capsys.readouterr().err
    if code == 0:
        pytest.skip("a Ray cluster runs on this machine, so `auto` connected to it")
    assert code == 2
    assert "Could not connect to Ray at --ray-address 'auto'" in error
    assert "ray start --head" in error
    _, parents, children = sweep_runs(MlflowClient(tracking_server.url), "tiny")
    assert [parent.info.status for parent in parents] == ["FAILED"]
    assert children == []
