"""Non-neural references: planning, fitting and their rows in the report."""

import csv
from pathlib import Path

import pytest
import torch

from benchmark.references import sklearn_gbdt
from benchmark.run import main
from benchmark.suite import SuiteError, load_suite, plan_trials
from datasets import Split, TaskSpec
from datasets.base import MultiTaskData

from .conftest import store_runs, write_suite

REAL_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def test_gbdt_scores_each_task():
    torch.manual_seed(0)
    x = torch.randn(600, 3)
    targets = (x[:, :1] * 2, (x[:, 1:2] > 0).float())
    split = Split(x, targets)
    data = MultiTaskData((TaskSpec("reg", "regression"), TaskSpec("cls", "binary")),
                         {"train": split, "val": split, "test": split})
    metrics = sklearn_gbdt(data, seed=0, max_iter=50)
    assert set(metrics) == {"test/reg/mse", "test/cls/auc"}
    assert metrics["test/reg/mse"] < 0.2 * float(targets[0].var())
    assert metrics["test/cls/auc"] > 0.95


def test_references_planned_once_per_point_and_seed(tmp_path):
    path = write_suite(tmp_path)
    text = path.read_text().replace("seeds = [0, 1]", "seeds = [0, 1]\nreferences = ['sklearn_gbdt']")
    path.write_text(text)
    trials = plan_trials(load_suite(str(path)))
    references = [t for t in trials if t.kind == "reference"]
    assert len(references) == 2 * 2  # two correlations, two seeds
    assert all(t.budget == 0 and "budget" not in t.config() for t in references)
    assert references[0].name.startswith("reference sklearn_gbdt synthetic")


def test_unknown_reference_rejected(tmp_path):
    path = write_suite(tmp_path)
    path.write_text(path.read_text().replace("seeds = [0, 1]", "seeds = [0]\nreferences = ['xgb']"))
    with pytest.raises(SuiteError, match=r"`references\[0\]`: Unknown reference 'xgb'"):
        load_suite(str(path))


def test_reference_rows_in_report(tmp_path):
    path = write_suite(tmp_path, models=("shared_bottom",), seeds=(0, 1), correlations=(0.5,))
    path.write_text(path.read_text().replace(
        "seeds = [0, 1]", "seeds = [0, 1]\nreferences = ['sklearn_gbdt']\n"
        "reference_options = { sklearn_gbdt = { max_iter = 20 } }"))
    results = tmp_path / "results"
    assert main(["--suite", str(path), "--results-dir", str(results)]) == 0

    _, _, children = store_runs(results)
    kinds = sorted(c.data.tags["kind"] for c in children)
    assert kinds == ["model", "model", "reference", "reference"]
    with open(results / "tiny" / "summary.csv") as handle:
        models = {row["model"] for row in csv.DictReader(handle)}
    assert models == {"shared_bottom", "sklearn_gbdt (reference)"}


@pytest.mark.real_data
@pytest.mark.slow
def test_census_suite_on_real_file(tmp_path):
    if not (REAL_DATA / "census-income" / "census-income.test.gz").is_file():
        pytest.skip(f"the real Census-Income test file is not in {REAL_DATA / 'census-income'}")
    suite = tmp_path / "census-small.toml"
    suite.write_text(
        'name = "census-small"\nmodels = ["shared_bottom"]\nreferences = ["sklearn_gbdt"]\n'
        "budgets = [50000]\nseeds = [0]\n"
        "reference_options = { sklearn_gbdt = { max_iter = 30 } }\n"
        '[[datasets]]\nname = "census"\n'
        f'params = {{ split = "fraction", task_group = 1, cache_dir = "{tmp_path / "cache"}" }}\n'
        "[training]\nmax_epochs = 2\nbatch_size = 1024\n"
    )
    results = tmp_path / "results"
    code = main(["--suite", str(suite), "--results-dir", str(results),
                 "--data-dir", str(REAL_DATA)])
    assert code == 0

    _, _, children = store_runs(results, "census-small")
    by_kind = {c.data.tags["kind"]: c for c in children}
    model, reference = by_kind["model"].data, by_kind["reference"].data
    assert model.metrics["test/income_over_50k/auc"] > 0.85
    assert reference.metrics["test/income_over_50k/auc"] > 0.85
    assert "data.census_test_sha256" in model.params


@pytest.mark.real_data
@pytest.mark.slow
def test_youtube8m_multilabel_trial_on_real_shards(tmp_path):
    if not (REAL_DATA / "youtube8m" / "vocabulary.csv").is_file():
        pytest.skip(f"the real YouTube-8M files are not in {REAL_DATA / 'youtube8m'}")
    suite = tmp_path / "yt-small.toml"
    suite.write_text(
        'name = "yt-small"\nmodels = ["mmoe"]\nbudgets = [200000]\nseeds = [0]\n'
        '[[datasets]]\nname = "youtube8m"\n'
        'params = { num_verticals = 2, shard_pattern = "video_level/validate000*.tfrecord", '
        f'fractions = [0.6, 0.2, 0.2], cache_dir = "{tmp_path / "cache"}" }}\n'
        "[training]\nmax_epochs = 8\nbatch_size = 64\nlearning_rate = 0.003\n"
    )
    results = tmp_path / "results"
    assert main(["--suite", str(suite), "--results-dir", str(results),
                 "--data-dir", str(REAL_DATA)]) == 0

    _, _, children = store_runs(results, "yt-small")
    metrics = children[0].data.metrics
    for task in ("arts_and_entertainment", "games", "overall"):
        for name in ("hit_at_1", "perr", "gap_at_20", "map"):
            assert 0.0 <= metrics[f"test/{task}/{name}"] <= 1.0
    assert metrics["test/games/gap_at_20"] > 0.05
    assert metrics["data/train_records"] > 0
