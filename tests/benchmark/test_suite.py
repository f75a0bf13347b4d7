"""Suite files: loading, quick overrides, the trial plan and every documented error."""

import hashlib
import json
import subprocess
import sys

import pytest

from benchmark.run import main
from benchmark.suite import SuiteError, builtin_suites, load_suite, plan_trials

from .conftest import write_suite


def test_builtin_correlation_suite_plan():
    suite = load_suite("correlation")
    trials = plan_trials(suite)
    expected = {"single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple", "cross_stitch",
                "snr_trans", "snr_aver"}
    assert expected <= set(suite.models)
    correlations = sorted({t.grid_point["correlation"] for t in trials})
    assert {0.5, 0.7, 0.9, 1.0} <= set(correlations)
    assert len(suite.budgets) == 1
    assert len(suite.seeds) >= 3
    assert len(trials) == len(suite.models) * len(correlations) * len(suite.seeds)
    assert len({t.trial_hash for t in trials}) == len(trials)


def test_quick_overrides_shrink_suite():
    full, quick = load_suite("correlation"), load_suite("correlation", quick=True)
    assert len(plan_trials(quick)) < len(plan_trials(full))
    assert quick.training.max_epochs < full.training.max_epochs
    assert quick.datasets[0].name == "synthetic"
    assert quick.datasets[0].params["n_train"] < full.datasets[0].params["n_train"]


def test_trial_hash_depends_on_configuration_only(suite_file):
    first = plan_trials(load_suite(str(suite_file)))
    second = plan_trials(load_suite(str(suite_file)))
    assert [t.trial_hash for t in first] == [t.trial_hash for t in second]
    longer = plan_trials(load_suite(str(suite_file), overrides={"training": {"max_epochs": 3}}))
    assert not {t.trial_hash for t in first} & {t.trial_hash for t in longer}


def test_yaml_suite(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\nmodels: [mmoe]\nbudgets: [2000]\nseeds: [0]\n"
        "datasets:\n  - name: synthetic\n    grid: {correlation: [0.1, 0.2]}\n"
    )
    assert len(plan_trials(load_suite(str(path)))) == 2


@pytest.mark.parametrize("extra, message", [
    ("typo_key = 1\n", r"`typo_key`: unknown key"),
    ("[training]\nmax_epoch = 3\n",
     r"`training.max_epoch`: unknown key. Did you mean `max_epochs`\? Valid keys here: max_epochs"),
    ("[training]\nmax_epochs = 0\n", r"`training.max_epochs`: .*greater than or equal to 1"),
])
def test_unknown_and_bad_keys_named(tmp_path, extra, message):
    base = "name = 'x'\nmodels = ['mmoe']\nbudgets = [2000]\nseeds = [0]\n"
    datasets = "[[datasets]]\nname = 'synthetic'\n"
    path = tmp_path / "bad.toml"
    path.write_text(base + (extra if not extra.startswith("[") else "") + datasets
                    + (extra if extra.startswith("[") else ""))
    with pytest.raises(SuiteError, match=message):
        load_suite(str(path))


def test_unknown_model_from_option_named(suite_file):
    with pytest.raises(SuiteError, match=r"`models\[1\]` \(from --models\): Unknown model 'nope'"):
        load_suite(str(suite_file), overrides={"models": ["mmoe", "nope"]})


def test_unknown_model_named(tmp_path):
    path = write_suite(tmp_path, models=("mmoe", "mmeo"))
    with pytest.raises(SuiteError, match=r"`models\[1\]`: Unknown model 'mmeo'.*Did you mean"):
        load_suite(str(path))


def test_empty_grid_rejected(tmp_path):
    path = write_suite(tmp_path, correlations=())
    with pytest.raises(SuiteError, match=r"`datasets\[0\].grid`: grid value list `correlation` is empty"):
        load_suite(str(path))


def test_misspelled_grid_key_suggests_parameter(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text(
        "name = 'typo'\nmodels = ['mmoe']\nbudgets = [2000]\nseeds = [0]\n"
        "[[datasets]]\nname = 'synthetic'\ngrid = { corelation = [0.5] }\n"
    )
    with pytest.raises(SuiteError, match=r"`datasets\[0\].grid.corelation` is not a parameter of "
                                         r"`\w+`. Did you mean `correlation`\?"):
        load_suite(str(path))


def test_empty_models_rejected(tmp_path):
    path = write_suite(tmp_path, models=())
    with pytest.raises(SuiteError, match=r"`models`: .*at least 1 item"):
        load_suite(str(path))


def test_unknown_dataset_parameter_named(tmp_path):
    path = write_suite(tmp_path)
    path.write_text(path.read_text().replace("num_sines = 2", "num_sine = 2"))
    with pytest.raises(SuiteError, match=r"`datasets\[0\].params.num_sine` is not a parameter"):
        load_suite(str(path))


def test_model_options_for_unlisted_model(tmp_path):
    path = write_suite(tmp_path, extra="[model_options.snr_trans]\nl0_strength = 0.1\n")
    with pytest.raises(SuiteError, match=r"`model_options.snr_trans` names a model that is not"):
        load_suite(str(path))


def test_unknown_model_option_named(tmp_path):
    path = write_suite(tmp_path, models=("shared_bottom",),
                       extra="[model_options.shared_bottom]\nexperts = 3\n")
    with pytest.raises(SuiteError, match=r"`model_options.shared_bottom.experts` is not a param"):
        load_suite(str(path))


def test_negative_budget_and_repeated_seed(tmp_path):
    path = write_suite(tmp_path, seeds=(1, 1))
    with pytest.raises(SuiteError, match=r"`seeds`: .*repeat"):
        load_suite(str(path))
    path = write_suite(tmp_path)
    path.write_text(path.read_text().replace("budgets = [3000]", "budgets = [-5]"))
    with pytest.raises(SuiteError, match=r"`budgets`: .*-5"):
        load_suite(str(path))


def test_missing_suite_and_bad_syntax(tmp_path):
    with pytest.raises(SuiteError, match="'nope' is neither a built-in suite"):
        load_suite("nope")
    broken = tmp_path / "broken.toml"
    broken.write_text("models = [\n")
    with pytest.raises(SuiteError, match="is not valid TOML"):
        load_suite(str(broken))
    other = tmp_path / "suite.json"
    other.write_text("{}")
    with pytest.raises(SuiteError, match="expected one of .toml"):
        load_suite(str(other))


def test_builtin_suites_listed():
    assert "correlation" in builtin_suites()


def test_model_grid_expands_options_and_keeps_plain_hashes(tmp_path):
    plain = plan_trials(load_suite(str(write_suite(tmp_path, models=("mmoe", "snr_aver")))))
    path = write_suite(tmp_path, models=("mmoe", "snr_aver"),
                       extra="[model_grid.snr_aver]\nl0_strength = [0.0, 0.01]\n")
    trials = plan_trials(load_suite(str(path)))

    snr = [t for t in trials if t.model == "snr_aver"]
    assert len(snr) == 2 * len([t for t in plain if t.model == "snr_aver"])
    assert {t.model_options["l0_strength"] for t in snr} == {0.0, 0.01}
    assert {t.label for t in snr} == {"snr_aver[l0_strength=0.0]", "snr_aver[l0_strength=0.01]"}
    assert len({t.trial_hash for t in trials}) == len(trials)
    # Models without a grid keep their identity, so a store written before the grid resumes.
    mmoe_hashes = {t.trial_hash for t in trials if t.model == "mmoe"}
    assert mmoe_hashes == {t.trial_hash for t in plain if t.model == "mmoe"}


@pytest.mark.parametrize("extra, message", [
    ("[model_grid.snr_trans]\nl0_strength = [0.1]\n", r"`model_grid.snr_trans` names a model"),
    ("[model_grid.shared_bottom]\nexperts = [2, 4]\n",
     r"`model_grid.shared_bottom.experts` is not a parameter"),
    ("[model_grid.mmoe]\nnum_experts = []\n", r"`model_grid`: value list `mmoe.num_experts` is empty"),
    ("[model_options.mmoe]\nnum_experts = 2\n[model_grid.mmoe]\nnum_experts = [2, 4]\n",
     r"sets \['num_experts'\] both in `model_options` and in `model_grid`"),
])
def test_model_grid_errors_named(tmp_path, extra, message):
    path = write_suite(tmp_path, models=("mmoe", "shared_bottom"), extra=extra)
    with pytest.raises(SuiteError, match=message):
        load_suite(str(path))


def add_weightings(path, names):
    """Put a top-level `weightings` key into a suite file written by `write_suite`."""
    text = path.read_text().replace("seeds = ", f"weightings = {list(names)!r}\nseeds = ", 1)
    path.write_text(text)
    return path


def test_default_weighting_keeps_trial_hash(tmp_path):
    path = write_suite(tmp_path, models=("mmoe",), seeds=(0,), correlations=(0.5,))
    # The configuration that identified this trial before loss weightings existed.
    config = {
        "dataset": {"name": "synthetic", "params": {
            "input_dim": 10, "n_train": 200, "n_val": 60, "n_test": 60, "num_sines": 2,
            "correlation": 0.5,
        }},
        "model": {"name": "mmoe", "options": {}},
        "budget": 3000,
        "seed": 0,
        "training": {"max_epochs": 2, "batch_size": 64, "eval_batch_size": 4096,
                     "learning_rate": 0.001, "weight_decay": 0.0, "patience": None,
                     "loader_workers": 0},
    }
    expected = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

    (implicit,) = plan_trials(load_suite(str(path)))
    (explicit,) = plan_trials(load_suite(str(add_weightings(path, ["equal"]))))
    assert implicit.trial_hash == expected
    assert explicit.trial_hash == expected
    assert "weighting" not in explicit.config()


def test_weightings_crossed_with_models(tmp_path):
    path = add_weightings(write_suite(tmp_path), ["equal", "gradnorm"])
    path.write_text(path.read_text() + "\n[weighting_options.gradnorm]\nalpha = 0.5\n")
    trials = plan_trials(load_suite(str(path)))

    assert len(trials) == 2 * 2 * 2 * 2  # models x weightings x seeds x correlations
    gradnorm = [t for t in trials if t.weighting == "gradnorm"]
    assert len(gradnorm) == 8
    assert all(t.weighting_options == {"alpha": 0.5} for t in gradnorm)
    assert gradnorm[0].config()["weighting"] == {"name": "gradnorm", "options": {"alpha": 0.5}}
    assert {t.name.split()[0] for t in trials} == {
        "shared_bottom", "shared_bottom+gradnorm", "mmoe", "mmoe+gradnorm"
    }
    assert len({t.trial_hash for t in trials}) == len(trials)


def test_builtin_weighting_suite_plan():
    suite = load_suite("weighting")
    assert {"equal", "uncertainty", "gradnorm", "pcgrad"} <= set(suite.weightings)
    assert {"shared_bottom", "mmoe"} <= set(suite.models)
    assert [dataset.name for dataset in suite.datasets] == ["synthetic", "census"]
    assert suite.datasets[0].grid["correlation"] == [0.5, 0.9]
    trials = plan_trials(suite)
    per_dataset = len(suite.models) * len(suite.weightings) * len(suite.seeds)
    assert len(trials) == per_dataset * (2 + 2)

    quick = plan_trials(load_suite("weighting", quick=True))
    assert len(quick) == len(suite.models) * len(suite.weightings) * 2
    assert {t.dataset for t in quick} == {"synthetic", "census"}


@pytest.mark.parametrize("weightings, extra, message", [
    (["equal", "gradnrom"], "",
     r"`weightings\[1\]`: Unknown weighting 'gradnrom'. Did you mean 'gradnorm'\?"),
    (["equal", "equal"], "", r"`weightings`: .*repeat a name"),
    (["equal"], "[weighting_options.pcgrad]\nseed = 1\n",
     r"`weighting_options.pcgrad` names a weighting that is not in `weightings` \(equal\)"),
    (["gradnorm"], "[weighting_options.gradnorm]\nalpah = 1.0\n",
     r"`weighting_options.gradnorm.alpah` is not a parameter of `GradNorm`. Did you mean "
     r"`alpha`\? Known parameters: alpha, learning_rate, min_weight"),
    (["fixed"], "[weighting_options.fixed]\ntasks = ['a']\n",
     r"`weighting_options.fixed.tasks` is set by the harness"),
])
def test_invalid_weightings_named(tmp_path, weightings, extra, message):
    path = add_weightings(write_suite(tmp_path, extra=extra), weightings)
    with pytest.raises(SuiteError, match=message):
        load_suite(str(path))


def test_builtin_budget_suite_spans_sixteenfold():
    suite = load_suite("budget")
    budgets = sorted(suite.budgets)
    assert len(budgets) >= 4
    assert budgets[-1] >= 16 * budgets[0]
    correlations = {t.grid_point["correlation"] for t in plan_trials(suite)}
    assert len(correlations) >= 2
    assert len(suite.seeds) >= 3
    assert {"single_task", "shared_bottom", "omoe", "mmoe", "snr_trans", "snr_aver"} <= set(
        suite.models
    )
    quick = plan_trials(load_suite("budget", quick=True))
    assert len({t.budget for t in quick}) >= 2


def test_weighting_option_errors_name_flag(tmp_path, suite_file, capsys):
    code = main(["--suite", str(suite_file), "--weighting", "equal,pcgard", "--dry-run"])
    assert code == 2
    error = capsys.readouterr().err
    assert ("`weightings[1]` (from --weighting): Unknown weighting 'pcgard'. "
            "Did you mean 'pcgrad'?") in error
    assert "Available: equal, fixed, gradnorm, pcgrad, uncertainty" in error


def test_weighting_flag_replaces_suite_list(suite_file, capsys):
    assert main(["--suite", str(suite_file), "--weighting", "pcgrad", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert plan.startswith("8 trials:")
    assert plan.count("+pcgrad ") == 8


def test_empty_weighting_flag_rejected(suite_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--suite", str(suite_file), "--weighting", ",", "--dry-run"])
    assert exit_info.value.code == 2
    assert "expected a comma-separated list, got ','" in capsys.readouterr().err


def test_plan_piped_into_head_ends_quietly():
    # `head` closes the pipe after one line. With 100 seeds the plan is far larger than a pipe's
    # buffer, so the rest of it is written into the closed pipe.
    seeds = ",".join(str(seed) for seed in range(100))
    command = (f"{sys.executable} -m benchmark.run --suite budget --seeds {seeds} --dry-run "
               f"| head -n 1")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True,
                            text=True, timeout=120)
    planned = len(plan_trials(load_suite("budget", overrides={"seeds": list(range(100))})))
    assert result.stdout == f"{planned} trials:\n"
    assert result.returncode == 0
    assert "Traceback" not in result.stderr
    assert "BrokenPipeError" not in result.stderr


def test_builtin_fixed_problems_suite_plan():
    suite = load_suite("fixed_problems")
    trials = plan_trials(suite)
    assert suite.models == load_suite("correlation").models
    assert suite.datasets[0].grid == {"correlation": [0.5, 0.9], "data_seed": [0, 1]}
    assert len(trials) == len(suite.models) * 2 * 2 * len(suite.seeds)

    # Seeds of one grid point share the problem, so only the seed distinguishes their trials.
    point = [t for t in trials if t.model == "mmoe" and t.grid_point["data_seed"] == 0
             and t.grid_point["correlation"] == 0.5]
    assert sorted(t.seed for t in point) == suite.seeds
    assert len({t.trial_hash for t in point}) == len(suite.seeds)
