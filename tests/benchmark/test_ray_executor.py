"""Sweeps through the Ray executor on a real local Ray instance, checked by reading the store
back, and the errors of a Ray sweep that cannot start."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark.run import main

from .conftest import store_runs, write_suite
from .test_sweep import INTERRUPTING_PLUGIN, KILLING_PLUGIN

ray = pytest.importorskip("ray")

CHECKOUT = Path(__file__).resolve().parents[2]

# Writes the file of the `benchmark` package that the worker imported.
PROBE_PLUGIN = '''
from models import register_model
from models.shared_bottom import SharedBottom


@register_model("probe", override=True)
class Probe(SharedBottom):
    def forward(self, x):
        import benchmark

        with open({out!r}, "w") as handle:
            handle.write(benchmark.__file__)
        return super().forward(x)
'''


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def run(suite_file, results, *extra):
    return main(["--suite", str(suite_file), "--results-dir", str(results),
                 "--executor", "ray", *extra])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ray_sweep_logs_and_resumes(tmp_path, ray_instance, capsys):
    suite = write_suite(tmp_path, extra="\n[quick]\nseeds = [0]\n")
    results = tmp_path / "results"

    assert run(suite, results, "--quick", "--workers", "2") == 0

    _, parents, children = store_runs(results)
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.params["executor"] == "ray"
    assert len(children) == 2 * 2  # two models, two correlations, one seed
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.tags["worker_pid"] != str(os.getpid())
        assert "test/task1/mse" in child.data.metrics
    assert (results / "tiny-quick" / "summary.csv").is_file()
    assert "Trials run: 4, skipped (already finished): 0, failed: 0." in capsys.readouterr().out

    assert run(suite, results, "--quick", "--workers", "2") == 0

    _, parents, children = store_runs(results)
    assert len(parents) == 2
    assert len(children) == 4
    output = capsys.readouterr()
    assert "Skipping 4 trial(s)" in output.err
    assert "Trials run: 0, skipped (already finished): 4, failed: 0." in output.out


@pytest.mark.slow
def test_killed_ray_worker_fails_only_its_trial(tmp_path, ray_instance, capsys):
    plugin = tmp_path / "killing_plugin.py"
    plugin.write_text(KILLING_PLUGIN)
    suite = write_suite(tmp_path, models=("killer", "shared_bottom"), seeds=(0,),
                        correlations=(0.5,))
    results = tmp_path / "results"

    code = run(suite, results, "--workers", "2", "--plugin", str(plugin))

    assert code == 1
    _, parents, children = store_runs(results)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert [c.data.tags["model"] for c in finished] == ["shared_bottom"]
    killed = [c for c in children if c.data.tags["model"] == "killer"]
    # The killer trial runs twice, the retry included, and both attempts are closed.
    assert len(killed) == 2
    assert all(c.info.status == "FAILED" for c in killed)
    assert all(c.data.tags["error"] == "The worker process died." for c in killed)
    assert parents[0].info.status == "FAILED"
    out = capsys.readouterr().out
    assert "failed: 1" in out
    assert "The worker process died while running this trial (WorkerCrashedError)." in out


@pytest.mark.slow
def test_ctrl_c_cancels_ray_trials(tmp_path, ray_instance, capsys):
    plugin = tmp_path / "interrupting_plugin.py"
    plugin.write_text(INTERRUPTING_PLUGIN.format(driver_pid=os.getpid()))
    suite = write_suite(tmp_path, models=("interrupter",), seeds=(0, 1), correlations=(0.5,))
    results = tmp_path / "results"

    code = run(suite, results, "--workers", "2", "--plugin", str(plugin))

    assert code == 130
    _, parents, children = store_runs(results)
    assert parents[0].info.status == "KILLED"
    assert children
    assert all(c.info.status == "KILLED" for c in children)
    assert "run the same command to resume" in capsys.readouterr().err


@pytest.mark.slow
def test_too_many_cpus_per_trial_explained(tmp_path, ray_instance, capsys):
    suite = write_suite(tmp_path, seeds=(0,), correlations=(0.5,))

    assert run(suite, tmp_path / "results", "--cpus-per-trial", "3") == 2

    error = capsys.readouterr().err
    assert "--cpus-per-trial 3 is more than any Ray node has (the largest has 2 CPUs)" in error


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_trials_without_ray_gpus_explained(tmp_path, ray_instance, capsys):
    suite = write_suite(tmp_path, seeds=(0,), correlations=(0.5,))

    code = run(suite, tmp_path / "results", "--accelerator", "gpu", "--gpus-per-trial", "0.5")

    assert code == 2
    error = capsys.readouterr().err
    assert ("--accelerator gpu asks for 0.5 GPU per trial, but no Ray node has that many (the "
            "most any node has is 0)") in error


@pytest.mark.slow
def test_own_ray_instance_imports_this_checkout(tmp_path):
    # A driver started outside the checkout, with the checkout put on sys.path by hand: the
    # workers would import the installed package unless the executor points them here.
    out = tmp_path / "imported_from.txt"
    (tmp_path / "probe_plugin.py").write_text(PROBE_PLUGIN.format(out=str(out)))
    suite = write_suite(tmp_path, models=("probe",), seeds=(0,), correlations=(0.5,))
    driver = (
        f"import sys; sys.path.insert(0, {str(CHECKOUT)!r}); from benchmark.run import main; "
        f"sys.exit(main(['--suite', {str(suite)!r}, '--results-dir', 'results', "
        f"'--executor', 'ray', '--plugin', 'probe_plugin.py']))"
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    done = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, env=environment,
                          capture_output=True, text=True)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Started a local Ray instance" in done.stderr
    assert out.read_text() == str(CHECKOUT / "benchmark" / "__init__.py")
    _, _, children = store_runs(tmp_path / "results")
    assert [c.info.status for c in children] == ["FINISHED"]


def test_missing_ray_explained(tmp_path, suite_file, capsys, monkeypatch):
    # A None entry in sys.modules makes `import ray` raise ImportError, as if Ray were absent.
    monkeypatch.setitem(sys.modules, "ray", None)
    results = tmp_path / "results"

    assert run(suite_file, results) == 2

    error = capsys.readouterr().err
    assert "`--executor ray` needs Ray, which could not be imported" in error
    assert 'pip install -e ".[ray]"' in error
    assert not (results / "mlflow.db").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--ray-address", "http://head:5000"], "--ray-address 'http://head:5000' is not a Ray address"),
    (["--ray-address", "head"], "--ray-address 'head' is not a Ray address"),
    (["--ray-address", "head:99999"], "--ray-address 'head:99999' is not a Ray address"),
    (["--ray-address", "auto"], "whose nodes cannot write to the tracking store 'sqlite:///"),
    (["--ray-address", "ray://head:10001", "--tracking-uri", "file:///tmp/mlruns"],
     "cannot write to the tracking store 'file:///tmp/mlruns' on this machine"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be >= 1, got 0"),
])
def test_bad_ray_setup_explained(tmp_path, suite_file, capsys, arguments, message):
    results = tmp_path / "results"

    assert run(suite_file, results, *arguments) == 2

    assert message in capsys.readouterr().err
    assert not (results / "mlflow.db").exists()


def test_unreachable_ray_address_explained(tmp_path, suite_file, capsys):
    address = f"127.0.0.1:{free_port()}"
    arguments = ["--ray-address", address, "--tracking-uri", "http://127.0.0.1:9"]

    assert run(suite_file, tmp_path / "results", *arguments) == 2

    error = capsys.readouterr().err
    assert f"Could not reach Ray at --ray-address {address!r}" in error
    assert "Check that `ray start --head` ran on that host" in error


@pytest.mark.parametrize("option, value", [("--ray-address", "auto"), ("--cpus-per-trial", "2")])
def test_ray_options_need_ray_executor(tmp_path, suite_file, capsys, option, value):
    code = main(["--suite", str(suite_file), "--results-dir", str(tmp_path / "results"),
                 option, value])

    assert code == 2
    assert f"{option} applies only to `--executor ray`" in capsys.readouterr().err


@pytest.mark.slow
def test_plugin_failing_in_worker_explained(tmp_path, ray_instance, capsys):
    # The plugin imports in this process, where the sweep checks it, but not in Ray's workers.
    plugin = tmp_path / "driver_only_plugin.py"
    plugin.write_text(
        "import os\n"
        f"if os.getpid() != {os.getpid()}:\n"
        "    raise ImportError('only importable in the driver')\n"
    )
    suite = write_suite(tmp_path, models=("shared_bottom",), seeds=(0,), correlations=(0.5,))
    results = tmp_path / "results"

    assert run(suite, results, "--plugin", str(plugin)) == 1

    _, parents, children = store_runs(results)
    assert parents[0].info.status == "FAILED"
    assert children == []
    out = capsys.readouterr().out
    assert "failed: 1" in out
    assert "The Ray task failed: PluginError(" in out
    assert "ImportError: only importable in the driver" in out
