"""End-to-end sweeps into a temporary SQLite store, checked by reading the store back."""

import csv
import json
import math
import os

import pytest
import torch

from benchmark.run import main

from .conftest import store_runs, write_suite

# Sends Ctrl-C to the process that runs the sweep, then keeps its trial in flight until the
# interrupt ends it (in that process) or the executor stops its worker.
INTERRUPTING_PLUGIN = '''
import os
import signal
import time

from models import register_model
from models.shared_bottom import SharedBottom


@register_model("interrupter", override=True)
class Interrupter(SharedBottom):
    def forward(self, x):
        os.kill({driver_pid}, signal.SIGINT)
        time.sleep(600)
'''

FAILING_PLUGIN = '''
import torch
from models import register_model
from models.shared_bottom import SharedBottom


@register_model("exploding", override=True)
class Exploding(SharedBottom):
    def forward(self, x):
        raise RuntimeError("exploded on purpose")
'''


def run(suite_file, results, *extra):
    return main(["--suite", str(suite_file), "--results-dir", str(results), *extra])


def test_sweep_logs_every_trial_and_report(tmp_path, suite_file, capsys):
    results = tmp_path / "results"
    assert run(suite_file, results) == 0

    client, parents, children = store_runs(results)
    assert len(parents) == 1
    assert len(children) == 2 * 2 * 2
    parent = parents[0]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"model", "dataset", "seed", "trial_hash", "version.torch"} <= set(child.data.tags)
        metrics = child.data.metrics
        assert {"test/task1/mse", "test/task2/mse", "param_count", "wall_seconds"} <= set(metrics)
        assert abs(metrics["param_count"] - 3000) / 3000 <= 0.02
        assert child.data.params["model.name"] == child.data.tags["model"]
        assert child.data.tags["accelerator"] == "cpu"
        history = client.get_metric_history(child.info.run_id, "val/task1/mse")
        assert [m.step for m in history] == [0, 1]
        config = json.loads(open(client.download_artifacts(child.info.run_id, "config.json")).read())
        assert config["training"]["max_epochs"] == 2

    report = results / "tiny"
    with open(report / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["model"] for row in rows} == {"shared_bottom", "mmoe"}
    assert {row["metric"] for row in rows} == {"test/task1/mse", "test/task2/mse"}
    assert all(row["n"] == "2" for row in rows)
    assert (report / "synthetic_budget3000.png").stat().st_size > 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/summary.csv", "report/synthetic_budget3000.png"} <= artifacts

    output = capsys.readouterr()
    assert "mlflow ui --backend-store-uri sqlite:///" in output.err
    assert "test/task1/mse on synthetic" in output.out


def test_report_values_match_store(tmp_path, suite_file):
    results = tmp_path / "results"
    run(suite_file, results)
    _, _, children = store_runs(results)
    values = [c.data.metrics["test/task2/mse"] for c in children
              if c.data.tags["model"] == "mmoe" and c.data.tags["grid.correlation"] == "0.5"]
    mean = sum(values) / 2
    with open(results / "tiny" / "summary.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r["model"] == "mmoe"
                   and r["grid.correlation"] == "0.5" and r["metric"] == "test/task2/mse")
    assert float(row["mean"]) == pytest.approx(mean)
    # 95 % interval for two seeds: t(0.975, 1) = 12.706 times |a - b| / 2.
    assert float(row["ci95"]) == pytest.approx(12.7062047 * abs(values[0] - values[1]) / 2,
                                               rel=1e-6)


def test_resume_skips_finished_trials(tmp_path, suite_file, capsys):
    results = tmp_path / "results"
    first = write_suite(tmp_path, seeds=(0,))
    assert run(first, results) == 0
    second = write_suite(tmp_path, seeds=(0, 1))
    assert run(second, results) == 0
    _, parents, children = store_runs(results)
    assert len(parents) == 2
    assert len(children) == 8  # 4 from the first sweep, 4 new ones for seed 1
    assert "Skipping 4 trial(s)" in capsys.readouterr().err

    assert run(second, results, "--rerun") == 0
    assert len(store_runs(results)[2]) == 16


def test_failing_trial_is_isolated(tmp_path, capsys):
    plugin = tmp_path / "exploding_plugin.py"
    plugin.write_text(FAILING_PLUGIN)
    suite = write_suite(tmp_path, models=("exploding", "shared_bottom"), seeds=(0,),
                        correlations=(0.5,))
    results = tmp_path / "results"
    assert run(suite, results, "--plugin", str(plugin)) == 1

    client, parents, children = store_runs(results)
    status = {c.data.tags["model"]: c for c in children}
    assert status["shared_bottom"].info.status == "FINISHED"
    failed = status["exploding"]
    assert failed.info.status == "FAILED"
    assert "exploded on purpose" in failed.data.tags["error"]
    trace = open(client.download_artifacts(failed.info.run_id, "error.txt")).read()
    assert "RuntimeError: exploded on purpose" in trace
    assert parents[0].info.status == "FAILED"
    out = capsys.readouterr().out
    assert "failed: 1" in out
    assert "FAILED exploding" in out


@pytest.mark.slow
def test_two_workers_share_fresh_store(tmp_path):
    results = tmp_path / "results"
    suite = write_suite(tmp_path, models=("shared_bottom", "mmoe", "omoe"), seeds=(0, 1))
    assert run(suite, results, "--workers", "2") == 0
    client, parents, children = store_runs(results)
    assert len(parents) == 1
    assert len(children) == 12
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert len(history) == 2
        assert math.isfinite(child.data.metrics["test/task1/mse"])


def test_list_and_dry_run(tmp_path, suite_file, capsys):
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("correlation", "snr_trans", "synthetic", "sklearn_gbdt"):
        assert name in listing

    results = tmp_path / "results"
    assert run(suite_file, results, "--dry-run", "--models", "mmoe", "--seeds", "3") == 0
    output = capsys.readouterr()
    assert output.out.startswith("2 trials:")
    assert "mmoe synthetic correlation=0.5 budget=3000 seed=3" in output.out
    assert "Checked: every dataset loads" in output.err
    assert not (results / "mlflow.db").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--models", "nope"], "Unknown model 'nope'"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--max-epochs", "0"], "--max-epochs must be >= 1, got 0"),
    (["--plugin", "no_such_module_xyz"], "Plugin module 'no_such_module_xyz' was not found"),
])
def test_bad_arguments_explained(tmp_path, suite_file, capsys, arguments, message):
    assert run(suite_file, tmp_path / "results", *arguments) == 2
    assert message in capsys.readouterr().err


def test_unreachable_tracking_server_explained(tmp_path, suite_file, capsys):
    code = run(suite_file, tmp_path / "results", "--tracking-uri", "http://127.0.0.1:9")
    assert code == 2
    assert "Could not open the MLflow tracking store 'http://127.0.0.1:9'" in capsys.readouterr().err


KILLING_PLUGIN = '''
import os
import signal

from models import register_model
from models.shared_bottom import SharedBottom


@register_model("killer", override=True)
class Killer(SharedBottom):
    def forward(self, x):
        os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.slow
def test_killed_worker_fails_only_its_trial(tmp_path, capsys):
    plugin = tmp_path / "killing_plugin.py"
    plugin.write_text(KILLING_PLUGIN)
    suite = write_suite(tmp_path, models=("killer", "shared_bottom"), seeds=(0, 1),
                        correlations=(0.5,))
    results = tmp_path / "results"

    code = run(suite, results, "--workers", "2", "--plugin", str(plugin))

    assert code == 1
    _, parents, children = store_runs(results)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert sorted(c.data.tags["model"] for c in finished) == ["shared_bottom", "shared_bottom"]
    killed = [c for c in children if c.data.tags["model"] == "killer"]
    assert killed and all(c.info.status == "FAILED" for c in killed)
    assert all(c.data.tags["error"] == "The worker process died." for c in killed)
    assert parents[0].info.status == "FAILED"
    out = capsys.readouterr().out
    assert "failed: 2" in out
    assert "The worker process died while running this trial." in out


def test_unloadable_dataset_stops_before_any_run(tmp_path, capsys):
    empty = tmp_path / "no-census-here"
    empty.mkdir()
    suite = tmp_path / "census-missing.toml"
    suite.write_text(
        'name = "census-missing"\nmodels = ["mmoe", "shared_bottom"]\nbudgets = [50000]\n'
        "seeds = [0, 1]\n"
        '[[datasets]]\nname = "census"\n'
        f'params = {{ data_dir = "{empty}", url = "http://127.0.0.1:9/census.zip", '
        "download_timeout = 2.0 }\n"
    )
    results = tmp_path / "results"

    assert run(suite, results) == 2

    error = capsys.readouterr().err
    assert "Dataset 'census' (no grid) could not be loaded, so no trial was run" in error
    assert error.count("DownloadError") == 1
    assert "http://127.0.0.1:9/census.zip" in error
    _, parents, children = store_runs(results, "census-missing")
    assert parents == []
    assert children == []


def test_quick_report_has_own_folder(tmp_path, suite_file):
    results = tmp_path / "results"
    suite_file.write_text(suite_file.read_text() + "\n[quick]\nseeds = [0]\n")
    assert run(suite_file, results, "--quick") == 0
    assert (results / "tiny-quick" / "summary.csv").is_file()
    assert not (results / "tiny").exists()


def test_snr_trial_logs_serving_module(tmp_path):
    suite = write_suite(tmp_path, models=("snr_aver", "mmoe"), seeds=(0,), correlations=(0.5,))
    suite.write_text(suite.read_text() + "\n[model_options.snr_aver]\ngate_init = 0.0\n")
    results = tmp_path / "results"
    assert run(suite, results) == 0

    _, _, children = store_runs(results)
    metrics = {c.data.tags["model"]: c.data.metrics for c in children}
    snr, mmoe = metrics["snr_aver"], metrics["mmoe"]
    for task in ("task1", "task2"):
        assert snr[f"test_serving/{task}/mse"] == pytest.approx(snr[f"test/{task}/mse"], rel=1e-5)
    assert snr["serving_param_count"] < snr["param_count"]
    assert mmoe["serving_param_count"] == mmoe["param_count"]
    assert "test_serving/task1/mse" not in mmoe
    assert 0.0 <= snr["selected/routing/open_fraction"] <= 1.0


def test_routing_diagnostics_logged_with_documented_names(tmp_path):
    suite = write_suite(tmp_path, models=("snr_trans", "mmoe"), seeds=(0,), correlations=(0.5,))
    results = tmp_path / "results"
    assert run(suite, results) == 0

    client, _, children = store_runs(results)
    runs = {c.data.tags["model"]: c for c in children}
    snr, mmoe = runs["snr_trans"], runs["mmoe"]
    epochs = int(mmoe.data.metrics["epochs_trained"])

    # Every epoch: MMoE's mean gate weight per task and expert (8 experts by default) and gate
    # entropy; SNR's open connections overall and per routing (sub-networks (3, 3) by default).
    per_epoch = [f"routing/{task}/expert_{e}" for task in ("task1", "task2") for e in range(8)]
    per_epoch += ["routing/task1/gate_entropy", "routing/task2/gate_entropy"]
    for name in per_epoch:
        assert len(client.get_metric_history(mmoe.info.run_id, name)) == epochs, name
    for name in ("routing/open_fraction", "routing/open_connections",
                 "routing/to_layer_1/mean_gate", "routing/to_layer_1/open_fraction",
                 "routing/to_tasks/mean_gate", "routing/to_tasks/open_fraction"):
        assert len(client.get_metric_history(snr.info.run_id, name)) == epochs, name

    # The selected weights: gates measured on the test split, and every SNR connection's gate.
    weights = [mmoe.data.metrics[f"selected/routing/task1/expert_{e}"] for e in range(8)]
    assert sum(weights) == pytest.approx(1.0, abs=1e-6)
    gates = [snr.data.metrics[f"selected/routing/to_tasks/gate_{t}_{j}"]
             for t in range(2) for j in range(3)]
    open_share = sum(g > 0 for g in gates) / len(gates)
    assert open_share == pytest.approx(snr.data.metrics["selected/routing/to_tasks/open_fraction"])

    # The task order that the `to_tasks` gates follow, and the report's heat maps.
    assert json.loads(snr.data.params["data.tasks"]) == ["task1", "task2"]
    assert (results / "tiny" / "routing" / "snr_trans.png").stat().st_size > 0
    assert (results / "tiny" / "routing" / "mmoe.png").stat().st_size > 0


def test_weighting_sweep_logs_weights_and_labels(tmp_path):
    suite = write_suite(tmp_path, models=("shared_bottom",), seeds=(0,), correlations=(0.5,))
    results = tmp_path / "results"
    assert run(suite, results, "--weighting", "equal,gradnorm") == 0

    client, _, children = store_runs(results)
    by_weighting = {child.data.tags["weighting"]: child for child in children}
    assert set(by_weighting) == {"equal", "gradnorm"}
    for name, child in by_weighting.items():
        assert child.info.status == "FINISHED"
        assert child.data.params["weighting.name"] == name
        history = client.get_metric_history(child.info.run_id, "train/task1/loss_weight")
        assert [m.step for m in history] == [0, 1]
    equal_history = client.get_metric_history(
        by_weighting["equal"].info.run_id, "train/task2/loss_weight"
    )
    assert [m.value for m in equal_history] == [1.0, 1.0]
    gradnorm = by_weighting["gradnorm"].data.metrics
    assert gradnorm["train/task1/loss_weight"] + gradnorm["train/task2/loss_weight"] == (
        pytest.approx(2.0)
    )
    config = json.loads(open(client.download_artifacts(
        by_weighting["gradnorm"].info.run_id, "config.json")).read())
    assert config["weighting"] == {"name": "gradnorm", "options": {}}

    with open(results / "tiny" / "summary.csv") as handle:
        models = {row["model"] for row in csv.DictReader(handle)}
    assert models == {"shared_bottom+equal", "shared_bottom+gradnorm"}
    assert "| shared_bottom+gradnorm |" in (results / "tiny" / "summary.md").read_text()


def test_invalid_weighting_option_stops_before_any_run(tmp_path, capsys):
    options = "\n[weighting_options.fixed]\nweights = { task1 = 1.0, clicks = 2.0 }\n"
    suite = write_suite(tmp_path, models=("mmoe",), seeds=(0,), correlations=(0.5,), extra=options)
    results = tmp_path / "results"

    assert run(suite, results, "--weighting", "fixed") == 2

    error = capsys.readouterr().err
    assert ("Loss weighting 'fixed' with options {'weights': {'task1': 1.0, 'clicks': 2.0}} "
            "cannot train on dataset 'synthetic' (correlation=0.5), so no trial was run") in error
    assert "unknown task(s) ['clicks']; the tasks are ['task1', 'task2']" in error
    _, parents, children = store_runs(results)
    assert parents == []
    assert children == []


@pytest.mark.parametrize("extra, message", [
    (("--budgets", "10"), "shared_bottom at a budget of 10 parameters cannot train on dataset "
                          "'synthetic' (correlation=0.5), so no trial was run: Cannot size model"),
    (("--models", "single_task", "--weighting", "gradnorm"),
     "single_task+gradnorm at a budget of 3,000 parameters cannot train on dataset 'synthetic' "
     "(correlation=0.5), so no trial was run: GradNorm needs the weights of a shared layer"),
])
def test_untrainable_model_stops_before_any_run(tmp_path, suite_file, capsys, extra, message):
    results = tmp_path / "results"

    assert run(suite_file, results, *extra) == 2

    error = capsys.readouterr().err
    assert message in error
    assert "Browse it with" not in error
    _, parents, children = store_runs(results)
    assert parents == []
    assert children == []

    # A dry run makes the same checks, and writes nothing.
    dry_results = tmp_path / "dry"
    assert run(suite_file, dry_results, *extra, "--dry-run") == 2
    assert message in capsys.readouterr().err
    assert not dry_results.exists()


def test_ctrl_c_after_rerun_hints_without_rerun(tmp_path, capsys):
    plugin = tmp_path / "interrupting_plugin.py"
    plugin.write_text(INTERRUPTING_PLUGIN.format(driver_pid=os.getpid()))
    suite = write_suite(tmp_path, models=("interrupter",), seeds=(0,), correlations=(0.5,))
    results = tmp_path / "results"

    assert run(suite, results, "--plugin", str(plugin), "--rerun") == 130

    _, parents, children = store_runs(results)
    assert parents[0].info.status == "KILLED"
    assert [c.info.status for c in children] == ["KILLED"]
    error = capsys.readouterr().err
    assert "Finished trials are kept: run the same command without --rerun to resume." in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_without_cuda_stops_before_any_run(tmp_path, suite_file, capsys):
    results = tmp_path / "results"

    assert run(suite_file, results, "--accelerator", "gpu") == 2

    error = capsys.readouterr().err
    assert "--accelerator gpu needs a CUDA GPU, but PyTorch sees none in this process" in error
    assert "leave out --accelerator to train on the CPU" in error
    assert not results.exists()


@pytest.mark.parametrize("extra, message", [
    (("--gpus-per-trial", "0.5"),
     "--gpus-per-trial applies only to `--executor ray --accelerator gpu`, got it with "
     "--executor local --accelerator cpu"),
    (("--executor", "ray", "--gpus-per-trial", "0.5"),
     "got it with --executor ray --accelerator cpu"),
    (("--executor", "ray", "--accelerator", "gpu", "--gpus-per-trial", "2"),
     "--gpus-per-trial must be above 0 and at most 1, got 2.0"),
    (("--executor", "ray", "--accelerator", "gpu", "--gpus-per-trial", "0"),
     "--gpus-per-trial must be above 0 and at most 1, got 0.0"),
])
def test_invalid_gpu_share_rejected(tmp_path, suite_file, capsys, extra, message):
    results = tmp_path / "results"

    assert run(suite_file, results, *extra) == 2

    assert message in capsys.readouterr().err
    assert not results.exists()
