"""Tests of the Census-Income (KDD) adapter on small hand-written files and on the real test file.

The small files use their own copy of the field layout: a row taken from the official test file
and the positions of the fields that the tests change. A wrong column order in the adapter then
makes the tests fail instead of being copied into them.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import math
import re
import socket
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from datasets import DATASETS, MultiTaskData
from datasets import census as census_module
from datasets.census import (
    CensusConfig,
    CensusFormatError,
    ChecksumError,
    DownloadError,
    LeakageError,
    load_census,
    resolve_cache_dir,
    resolve_data_dir,
    verify_checksum,
)

REAL_DATA_DIR = Path(__file__).parents[2] / ".." / "shared" / "data" / "census-income"
REAL_TEST_FILE = REAL_DATA_DIR / "census-income.test.gz"
TEST_GZ_SHA256 = "5ac4cacd3ca9f1ecb10de1a0a41e4ac68fdc419e3fec190f5c0c6cc03b2ea659"

# The first row of census-income.test, split at ", ".
TEMPLATE = [
    "38", "Private", "6", "36", "1st 2nd 3rd or 4th grade", "0", "Not in universe",
    "Married-civilian spouse present", "Manufacturing-durable goods",
    "Machine operators assmblrs & inspctrs", "White", "Mexican (Mexicano)", "Female",
    "Not in universe", "Not in universe", "Full-time schedules", "0", "0", "0",
    "Joint one under 65 & one 65+", "Not in universe", "Not in universe", "Spouse of householder",
    "Spouse of householder", "1032.38", "?", "?", "?", "Not in universe under 1 year old", "?",
    "4", "Not in universe", "Mexico", "Mexico", "Mexico", "Foreign born- Not a citizen of U S ",
    "0", "Not in universe", "2", "12", "95", "- 50000.",
]  # fmt: skip
# 0-based field positions, read off census-income.names and the row above.
POSITION = {
    "age": 0,
    "class_of_worker": 1,
    "education": 4,
    "wage_per_hour": 5,
    "marital_stat": 7,
    "sex": 12,
    "tax_filer_stat": 19,
    "instance_weight": 24,
    "veterans_benefits": 38,
    "weeks_worked_in_year": 39,
    "income": 41,
}
NUMERIC_FEATURES = [
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "num_persons_worked_for_employer",
    "weeks_worked_in_year",
]
LOW, HIGH = "- 50000.", "50000+."
NEVER, MARRIED, DIVORCED = "Never married", "Married-civilian spouse present", "Divorced"
HIGH_SCHOOL, SOME_COLLEGE = "High school graduate", "Some college but no degree"
BACHELORS, ASSOCIATE = "Bachelors degree(BA AB BS)", "Associates degree-academic program"


def make_row(**fields: object) -> str:
    """Return one census line: the template row with the named fields replaced."""
    values = list(TEMPLATE)
    for name, value in fields.items():
        values[POSITION[name]] = str(value)
    assert len(values) == 42
    return ", ".join(values)


def write_lines(path: Path, lines: list[str]) -> Path:
    content = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
    return path


# Training rows: age, education, marital status, income, instance weight.
TRAIN_ROWS = [
    make_row(age=20, education=HIGH_SCHOOL, marital_stat=NEVER, income=LOW, instance_weight=1000),
    make_row(age=30, education=BACHELORS, marital_stat=MARRIED, income=HIGH, instance_weight=2000),
    make_row(age=40, education=ASSOCIATE, marital_stat=DIVORCED, income=LOW, instance_weight=3000),
    make_row(age=50, education=SOME_COLLEGE, marital_stat=NEVER, income=HIGH, instance_weight=2000),
]
# Test-file rows. Values that no training row has: "Federal government" as class of worker
# (two rows) and "Male" as sex (one row).
TEST_ROWS = [
    make_row(
        age=35, class_of_worker="Federal government", sex="Male", education=HIGH_SCHOOL,
        instance_weight=500,
    ),
    make_row(age=45, education=HIGH_SCHOOL, marital_stat=NEVER, income=HIGH, instance_weight=1500),
    make_row(age=25, class_of_worker="Federal government", education=BACHELORS),
    make_row(age=60, education=HIGH_SCHOOL, marital_stat=DIVORCED),
]  # fmt: skip


@pytest.fixture
def census_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "census-income"
    directory.mkdir()
    write_lines(directory / "census-income.data", TRAIN_ROWS)
    write_lines(directory / "census-income.test", TEST_ROWS)
    return directory


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Default folders point into tmp_path, so no test writes to the real cache.
    monkeypatch.delenv("MTL_BENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def load(directory: Path, tmp_path: Path, **settings: object) -> census_module.CensusData:
    """Load with the cache in tmp_path and no download.

    Unless given, the leakage guard and the checksums are off: the small files are not the
    official ones, so their sums never match.
    """
    defaults = {"download": False, "leakage_threshold": None, "verify_checksums": False}
    settings = {**defaults, **settings}
    config = CensusConfig(data_dir=directory, cache_dir=tmp_path / "cache", **settings)
    return load_census(config)


def column(result: census_module.CensusData, split: str, name: str) -> np.ndarray:
    index = result.feature_names.index(name)
    return result.data.splits[split].features[:, index].numpy()


def base_columns(result: census_module.CensusData) -> set[str]:
    return {name.split("=")[0] for name in result.feature_names}


# Labels and features.


def test_labels_group_one(census_dir: Path, tmp_path: Path) -> None:
    result = load(census_dir, tmp_path, task_group=1)
    tasks = [task.name for task in result.data.tasks]
    income, never_married = result.data.splits["train"].targets

    assert tasks == ["income_over_50k", "never_married"]
    assert income.squeeze(1).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert never_married.squeeze(1).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert all(task.kind == "binary" for task in result.data.tasks)


def test_labels_group_two(census_dir: Path, tmp_path: Path) -> None:
    result = load(census_dir, tmp_path, task_group=2)
    tasks = [task.name for task in result.data.tasks]
    degree, never_married = result.data.splits["train"].targets

    assert tasks == ["associate_degree_or_higher", "never_married"]
    # High school 0, bachelors 1, associate 1, some college without degree 0.
    assert degree.squeeze(1).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert never_married.squeeze(1).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_every_degree_counts_as_college(tmp_path: Path) -> None:
    degrees = [
        "Associates degree-occup /vocational",
        "Associates degree-academic program",
        "Bachelors degree(BA AB BS)",
        "Masters degree(MA MS MEng MEd MSW MBA)",
        "Doctorate degree(PhD EdD)",
        "Prof school degree (MD DDS DVM LLB JD)",
    ]
    others = ["Children", "Less than 1st grade", "12th grade no diploma", SOME_COLLEGE]
    directory = tmp_path / "files"
    directory.mkdir()
    rows = [make_row(education=value, age=20 + i) for i, value in enumerate(degrees + others)]
    write_lines(directory / "census-income.test", rows)

    result = load(directory, tmp_path, task_group=2, split="fraction")
    data = result.data
    degree_labels = torch.cat([data.splits[name].targets[0] for name in ("train", "val", "test")])

    assert degree_labels.sum().item() == len(degrees)
    assert len(degree_labels) == len(rows)


def test_group_one_excludes_labels(census_dir: Path, tmp_path: Path) -> None:
    columns = base_columns(load(census_dir, tmp_path, task_group=1))

    assert "income" not in columns
    assert "marital_stat" not in columns
    assert "instance_weight" not in columns
    assert "education" in columns
    assert len(columns) == 42 - 3


def test_group_two_excludes_labels(census_dir: Path, tmp_path: Path) -> None:
    result = load(census_dir, tmp_path, task_group=2)
    columns = base_columns(result)

    assert "education" not in columns
    assert "marital_stat" not in columns
    assert "income" not in columns
    assert "instance_weight" not in columns
    assert len(columns) == 42 - 4
    assert result.data.info["excluded_columns"] == "education,marital_stat,instance_weight,income"


def test_unknown_bucket_counts(census_dir: Path, tmp_path: Path) -> None:
    result = load(census_dir, tmp_path)
    info = result.data.info
    held_out = ("val", "test")
    unknown = np.concatenate([column(result, s, "class_of_worker=<unknown>") for s in held_out])
    private = np.concatenate([column(result, s, "class_of_worker=Private") for s in held_out])

    assert info["unseen_class_of_worker"] == 2
    assert info["unseen_sex"] == 1
    assert info["unseen_total"] == 3
    assert "unseen_education" not in info
    assert unknown.sum() == 2
    assert private.sum() == 2
    assert column(result, "train", "class_of_worker=<unknown>").sum() == 0


def test_standardisation_uses_training_stats(census_dir: Path, tmp_path: Path) -> None:
    result = load(census_dir, tmp_path)
    # Training ages 20, 30, 40, 50: mean 35, population standard deviation sqrt(125).
    std = math.sqrt(125.0)
    held_out = np.concatenate([column(result, s, "age") for s in ("val", "test")])

    np.testing.assert_allclose(
        column(result, "train", "age"), [-15 / std, -5 / std, 5 / std, 15 / std], rtol=1e-6
    )
    np.testing.assert_allclose(
        np.sort(held_out), [-10 / std, 0.0, 10 / std, 25 / std], rtol=1e-6, atol=1e-7
    )
    # A column that is constant in training divides by 1 and becomes 0.
    assert np.all(column(result, "val", "wage_per_hour") == 0.0)


def test_feature_layout_and_dtype(census_dir: Path, tmp_path: Path) -> None:
    result = load(census_dir, tmp_path)
    names = result.feature_names
    sex_block = [name for name in names if name.startswith("sex=")]
    education_block = [name for name in names if name.startswith("education=")]

    assert list(names[:7]) == NUMERIC_FEATURES
    assert sex_block == ["sex=Female", "sex=<unknown>"]
    assert education_block == sorted(education_block[:-1]) + ["education=<unknown>"]
    for split in result.data.splits.values():
        assert split.features.dtype == torch.float32
        assert split.features.shape[1] == len(names)


def test_same_columns_in_every_split(census_dir: Path, tmp_path: Path) -> None:
    result = load(census_dir, tmp_path)
    # The only male row is the test-file row of age 35, which standardises to 0. No training row
    # is male, so that row sits in the unknown bucket of `sex` in whichever split it landed.
    for split in ("val", "test"):
        male = np.isclose(column(result, split, "age"), 0.0, atol=1e-6)
        unknown_sex = column(result, split, "sex=<unknown>")
        female = column(result, split, "sex=Female")
        assert np.array_equal(unknown_sex == 1.0, male)
        assert np.array_equal(female == 1.0, ~male)


def test_one_hot_rows_sum_to_block_count(census_dir: Path, tmp_path: Path) -> None:
    result = load(census_dir, tmp_path)
    features = result.data.splits["test"].features
    one_hot = features[:, len(NUMERIC_FEATURES) :]
    categorical_columns = len(base_columns(result)) - len(NUMERIC_FEATURES)

    assert torch.all(one_hot.sum(dim=1) == categorical_columns)


def test_instance_weights(census_dir: Path, tmp_path: Path) -> None:
    weighted = load(census_dir, tmp_path, use_instance_weight=True)
    plain = load(census_dir, tmp_path)

    # Training weights 1000, 2000, 3000, 2000 divided by their mean 2000.
    assert weighted.data.splits["train"].weights.tolist() == [0.5, 1.0, 1.5, 1.0]
    held_out = torch.cat([weighted.data.splits[s].weights for s in ("val", "test")])
    # Held-out weights 500 and 1500, and the template's 1032.38 twice.
    template_weight = 1032.38 / 2000
    expected = [0.25, template_weight, template_weight, 0.75]
    assert sorted(held_out.tolist()) == pytest.approx(expected)
    assert plain.data.splits["train"].weights is None
    assert "instance_weight" not in base_columns(weighted)


# Splits.


def test_official_split_halves_test_file(census_dir: Path, tmp_path: Path) -> None:
    info = load(census_dir, tmp_path).data.info

    assert (info["train_rows"], info["val_rows"], info["test_rows"]) == (4, 2, 2)
    assert info["split"] == "official"
    assert re.fullmatch("[0-9a-f]{16}", info["split_sha256"])


def test_split_seed_changes_the_split(census_dir: Path, tmp_path: Path) -> None:
    hashes = {
        seed: load(census_dir, tmp_path, split_seed=seed).data.info["split_sha256"]
        for seed in range(6)
    }
    repeated = load(census_dir, tmp_path / "other", split_seed=0).data.info["split_sha256"]

    assert repeated == hashes[0]
    assert len(set(hashes.values())) > 1  # 4 test rows have 6 ways to pick 2 for validation


def test_split_seed_none_uses_trial_seed(census_dir: Path, tmp_path: Path) -> None:
    config = CensusConfig(
        data_dir=census_dir, cache_dir=tmp_path / "cache", split_seed=None, download=False,
        leakage_threshold=None, verify_checksums=False,
    )  # fmt: skip
    by_seed = {seed: load_census(config, seed=seed).data.info for seed in range(6)}

    assert by_seed[3]["split_seed"] == 3
    assert len({info["split_sha256"] for info in by_seed.values()}) > 1


def test_fraction_split_with_one_file(tmp_path: Path) -> None:
    directory = tmp_path / "files"
    directory.mkdir()
    rows = [make_row(age=20 + i, marital_stat=NEVER if i % 3 else MARRIED) for i in range(10)]
    write_lines(directory / "census-income.test", rows)

    info = load(directory, tmp_path, split="fraction").data.info

    # floor(10 * 0.2) rows each for validation and test, the rest for training.
    assert (info["train_rows"], info["val_rows"], info["test_rows"]) == (6, 2, 2)
    assert "census_test_sha256" in info
    assert "census_data_sha256" not in info


def test_fraction_split_uses_both_files(census_dir: Path, tmp_path: Path) -> None:
    info = load(census_dir, tmp_path, split="fraction", fractions=[0.5, 0.25, 0.25]).data.info

    assert (info["train_rows"], info["val_rows"], info["test_rows"]) == (4, 2, 2)
    assert "census_data_sha256" in info
    assert "census_test_sha256" in info


def test_info_contains_file_sums(census_dir: Path, tmp_path: Path) -> None:
    info = load(census_dir, tmp_path).data.info
    data_sum = hashlib.sha256((census_dir / "census-income.data").read_bytes()).hexdigest()
    test_sum = hashlib.sha256((census_dir / "census-income.test").read_bytes()).hexdigest()

    assert info["census_data_sha256"] == data_sum
    assert info["census_test_sha256"] == test_sum
    assert info["task_group"] == 1
    assert info["train_positive_rate_income_over_50k"] == 0.5


def test_gzip_and_plain_files_agree(census_dir: Path, tmp_path: Path) -> None:
    compressed = tmp_path / "compressed"
    compressed.mkdir()
    write_lines(compressed / "census-income.data.gz", TRAIN_ROWS)
    write_lines(compressed / "census-income.test.gz", TEST_ROWS)

    plain = load(census_dir, tmp_path)
    gzipped = load(compressed, tmp_path, verify_checksums=False)

    for name in ("train", "val", "test"):
        assert torch.equal(plain.data.splits[name].features, gzipped.data.splits[name].features)


# Leakage guard.


def with_copied_label(row_labels: list[tuple[str, str]], copy: str) -> list[str]:
    """Rows whose `veterans_benefits` or `tax_filer_stat` field copies a label."""
    rows = []
    for index, (income, marital) in enumerate(row_labels):
        fields: dict[str, object] = {"age": 20 + index, "income": income, "marital_stat": marital}
        if copy == "income":
            fields["veterans_benefits"] = 2 if income == HIGH else 0
        else:
            fields["tax_filer_stat"] = marital
        rows.append(make_row(**fields))
    return rows


# Mixed so that the even and the odd rows both hold each label value.
GUARD_LABELS = [
    (LOW, NEVER), (HIGH, MARRIED), (HIGH, NEVER), (LOW, DIVORCED),
    (LOW, MARRIED), (HIGH, NEVER), (HIGH, DIVORCED), (LOW, NEVER),
]  # fmt: skip


@pytest.mark.parametrize(
    ("copy", "message"),
    [
        ("income", "`veterans_benefits` predicts the label of task `income_over_50k`"),
        ("marital", "`tax_filer_stat` predicts the label of task `never_married`"),
    ],
)
def test_guard_rejects_copied_label(tmp_path: Path, copy: str, message: str) -> None:
    directory = tmp_path / "files"
    directory.mkdir()
    write_lines(directory / "census-income.data", with_copied_label(GUARD_LABELS, copy))
    write_lines(directory / "census-income.test", with_copied_label(GUARD_LABELS[:4], copy))

    with pytest.raises(LeakageError, match=re.escape(message)):
        load(directory, tmp_path, leakage_threshold=0.99)


def test_guard_accepts_ordinary_rows(tmp_path: Path) -> None:
    directory = tmp_path / "files"
    directory.mkdir()
    rows = [make_row(age=20 + i, income=income, marital_stat=marital)
            for i, (income, marital) in enumerate(GUARD_LABELS)]  # fmt: skip
    write_lines(directory / "census-income.data", rows)
    write_lines(directory / "census-income.test", rows[:4])

    info = load(directory, tmp_path, leakage_threshold=0.99).data.info

    assert info["leakage_max_score"] < 0.99


def test_held_out_score_of_a_copy_is_one() -> None:
    labels = np.array([0, 1, 1, 0, 0, 1, 1, 0])
    copy = np.array([5, 7, 7, 5, 5, 7, 7, 5])
    distinct = np.arange(8)

    assert census_module.held_out_balanced_accuracy(copy, labels) == 1.0
    # Every value is unseen in the other half, so every row is a miss.
    assert census_module.held_out_balanced_accuracy(distinct, labels) == 0.0


# Cache.


def test_second_load_reads_cache(
    census_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load(census_dir, tmp_path)
    cache_files = list((tmp_path / "cache").iterdir())

    def fail(path: Path) -> None:
        raise AssertionError(f"parsed {path} although the cache contains the result")

    monkeypatch.setattr(census_module, "read_census_file", fail)
    second = load(census_dir, tmp_path)

    assert len(cache_files) == 1
    assert cache_files[0].suffix == ".npz"
    assert second.feature_names == first.feature_names
    assert second.data.info == first.data.info
    for name in ("train", "val", "test"):
        assert torch.equal(second.data.splits[name].features, first.data.splits[name].features)
        assert torch.equal(second.data.splits[name].targets[1], first.data.splits[name].targets[1])


def test_cache_key_follows_settings_and_files(census_dir: Path, tmp_path: Path) -> None:
    load(census_dir, tmp_path)
    load(census_dir, tmp_path, task_group=2)
    load(census_dir, tmp_path, use_instance_weight=True)
    write_lines(census_dir / "census-income.test", TEST_ROWS[:2] + TEST_ROWS[2:][::-1])
    load(census_dir, tmp_path)

    assert len(list((tmp_path / "cache").glob("census-*.npz"))) == 4


def test_unreadable_cache_is_rebuilt(census_dir: Path, tmp_path: Path) -> None:
    first = load(census_dir, tmp_path)
    (cache_file,) = (tmp_path / "cache").iterdir()
    cache_file.write_bytes(b"not an npz file")

    second = load(census_dir, tmp_path)

    assert torch.equal(second.data.splits["val"].features, first.data.splits["val"].features)
    assert census_module.read_cache(cache_file) is not None


def test_cache_disabled_writes_nothing(census_dir: Path, tmp_path: Path) -> None:
    load(census_dir, tmp_path, use_cache=False)

    assert not (tmp_path / "cache").exists()


def test_failed_cache_write_leaves_no_file(
    census_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(census_module.np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        load(census_dir, tmp_path)

    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_load_is_fast(tmp_path: Path) -> None:
    directory = tmp_path / "files"
    directory.mkdir()
    rows = [make_row(age=i % 90, weeks_worked_in_year=i % 53) for i in range(20_000)]
    write_lines(directory / "census-income.test", rows)
    load(directory, tmp_path, split="fraction")

    start = time.perf_counter()
    load(directory, tmp_path, split="fraction")

    assert time.perf_counter() - start < 1.0


# Bad input.


def test_missing_file_without_download(census_dir: Path, tmp_path: Path) -> None:
    (census_dir / "census-income.data").unlink()

    with pytest.raises(FileNotFoundError, match=r"\['census-income.data'\] not found in .*by hand"):
        load(census_dir, tmp_path)


def test_failed_download_suggests_fraction_split(tmp_path: Path) -> None:
    directory = tmp_path / "files"
    directory.mkdir()
    write_lines(directory / "census-income.test", TEST_ROWS)

    with ServedFiles(tmp_path / "nothing-here") as server:
        with pytest.raises(DownloadError) as raised:
            load_census(download_config(directory, tmp_path, server.url("census.zip")))

    message = str(raised.value)
    assert "['census-income.data'] not found in" in message
    assert "contains only ['census-income.test']" in message
    assert 'split = "fraction"' in message
    assert "404" in message
    assert "To place the files by hand" in message


def test_truncated_gzip(tmp_path: Path) -> None:
    directory = tmp_path / "files"
    directory.mkdir()
    path = write_lines(directory / "census-income.data.gz", TRAIN_ROWS * 50)
    path.write_bytes(path.read_bytes()[:-40])
    write_lines(directory / "census-income.test", TEST_ROWS)

    with pytest.raises(CensusFormatError, match="census-income.data.gz is a damaged or truncated"):
        load(directory, tmp_path)


def test_truncated_official_gzip_fails_checksum(tmp_path: Path) -> None:
    directory = tmp_path / "files"
    directory.mkdir()
    path = write_lines(directory / "census-income.test.gz", TEST_ROWS)
    path.write_bytes(path.read_bytes()[:-10])
    actual = hashlib.sha256(path.read_bytes()).hexdigest()

    with pytest.raises(ChecksumError) as raised:
        load(directory, tmp_path, split="fraction", verify_checksums=True)

    message = str(raised.value)
    assert actual in message
    assert TEST_GZ_SHA256 in message
    assert str(path) in message
    assert "verify_checksums=False" in message


def test_checksum_can_be_turned_off(tmp_path: Path) -> None:
    directory = tmp_path / "files"
    directory.mkdir()
    rows = [make_row(age=20 + i) for i in range(10)]
    write_lines(directory / "census-income.test.gz", rows)

    with pytest.raises(ChecksumError):
        load(directory, tmp_path, split="fraction", verify_checksums=True)
    info = load(directory, tmp_path, split="fraction", verify_checksums=False).data.info

    assert info["census_test_sha256"] != TEST_GZ_SHA256


@pytest.mark.parametrize(
    ("line", "fields"),
    [
        (TRAIN_ROWS[2].rsplit(", ", 1)[0], 41),
        (TRAIN_ROWS[2] + ", extra", 43),
        ("", 1),
    ],
    ids=["too-few", "too-many", "blank"],
)
def test_wrong_field_count(tmp_path: Path, line: str, fields: int) -> None:
    directory = tmp_path / "files"
    directory.mkdir()
    write_lines(directory / "census-income.data", TRAIN_ROWS[:2] + [line] + TRAIN_ROWS[3:])
    write_lines(directory / "census-income.test", TEST_ROWS)

    message = f"census-income.data, line 3: found {fields} field(s), expected 42"
    with pytest.raises(CensusFormatError, match=re.escape(message)):
        load(directory, tmp_path)


def test_trailing_blank_lines_are_ignored(census_dir: Path, tmp_path: Path) -> None:
    path = census_dir / "census-income.test"
    path.write_bytes(path.read_bytes() + b"\n\n")

    assert load(census_dir, tmp_path).data.info["val_rows"] == 2


@pytest.mark.parametrize(
    ("field", "value", "task_group"),
    [("income", "50000-.", 1), ("marital_stat", "Married", 1), ("education", "College", 2)],
)
def test_unknown_label_value(tmp_path: Path, field: str, value: str, task_group: int) -> None:
    directory = tmp_path / "files"
    directory.mkdir()
    bad_rows = TEST_ROWS[:1] + [make_row(**{field: value})] + TEST_ROWS[2:]
    write_lines(directory / "census-income.data", TRAIN_ROWS)
    write_lines(directory / "census-income.test", bad_rows)

    message = f"census-income.test, line 2: invalid value {value!r} in column `{field}`"
    with pytest.raises(CensusFormatError, match=re.escape(message)):
        load(directory, tmp_path, task_group=task_group)


def test_unseen_education_in_group_one(census_dir: Path, tmp_path: Path) -> None:
    write_lines(census_dir / "census-income.test", TEST_ROWS + [make_row(education="College")])

    info = load(census_dir, tmp_path, task_group=1).data.info

    assert info["unseen_education"] == 1


def test_invalid_number(tmp_path: Path) -> None:
    directory = tmp_path / "files"
    directory.mkdir()
    write_lines(directory / "census-income.data", TRAIN_ROWS[:3] + [make_row(age="forty")])
    write_lines(directory / "census-income.test", TEST_ROWS)

    message = "census-income.data, line 4: invalid number 'forty' in column `age`"
    with pytest.raises(CensusFormatError, match=re.escape(message)):
        load(directory, tmp_path)


def test_empty_file(census_dir: Path, tmp_path: Path) -> None:
    (census_dir / "census-income.test").write_bytes(b"\n")

    with pytest.raises(CensusFormatError, match="census-income.test contains no rows"):
        load(census_dir, tmp_path)


def test_empty_official_split(census_dir: Path, tmp_path: Path) -> None:
    write_lines(census_dir / "census-income.test", TEST_ROWS[:1])

    message = "Split 'val' is empty: census-income.test has 1 row(s), too few to halve"
    with pytest.raises(CensusFormatError, match=re.escape(message)):
        load(census_dir, tmp_path)


def test_empty_fraction_split(tmp_path: Path) -> None:
    directory = tmp_path / "files"
    directory.mkdir()
    write_lines(directory / "census-income.test", TEST_ROWS[:3])

    with pytest.raises(CensusFormatError, match=r"Split 'val' is empty: 3 row\(s\) from"):
        load(directory, tmp_path, split="fraction")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"task_group": 3}, "task_group must be one of [1, 2], got 3"),
        ({"split": "random"}, "split must be one of ['official', 'fraction'], got 'random'"),
        ({"fractions": (0.5, 0.5, 0.5)}, "fractions must be three positive shares"),
        ({"fractions": (0.8, 0.2)}, "fractions must be three positive shares"),
        ({"leakage_threshold": 0.3}, "leakage_threshold must lie in (0.5, 1]"),
    ],
)
def test_invalid_config(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        CensusConfig(**settings)


def test_unknown_parameter_lists_valid_ones() -> None:
    with pytest.raises(TypeError, match=r"Unknown census parameter\(s\) \['groups'\].*task_group"):
        DATASETS.build("census", seed=0, groups=1)


# Folders.


def test_data_dir_argument_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MTL_BENCH_DATA_DIR", str(tmp_path / "root"))

    assert resolve_data_dir(tmp_path / "mine") == tmp_path / "mine"


def test_environment_variable_names_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MTL_BENCH_DATA_DIR", str(tmp_path / "root"))

    assert resolve_data_dir() == tmp_path / "root" / "census-income"


def test_default_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_data_dir() == tmp_path / "xdg-cache" / "mtl-bench" / "census-income"
    assert resolve_cache_dir() == tmp_path / "xdg-cache" / "mtl-bench" / "census-income" / "encoded"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "mtl-bench" / "census-income"


def test_registry_builds_census(census_dir: Path, tmp_path: Path) -> None:
    data = DATASETS.build(
        "census", seed=0, data_dir=str(census_dir), cache_dir=str(tmp_path / "cache"),
        download=False, leakage_threshold=None, verify_checksums=False,
    )  # fmt: skip

    assert isinstance(data, MultiTaskData)
    assert data.task_dims == (1, 1)


# Download.


def make_archive(path: Path, rows: dict[str, list[str]], nested: bool = True) -> Path:
    """Write a zip with the files in a census.tar.gz inside, or directly in a folder."""
    members = {
        name: "".join(line + "\n" for line in lines).encode() for name, lines in rows.items()
    }
    with zipfile.ZipFile(path, "w") as bundle:
        if not nested:
            for name, content in members.items():
                bundle.writestr(f"census/{name}", content)
            return path
        tar_bytes = io.BytesIO()
        with tarfile.open(fileobj=tar_bytes, mode="w:gz") as tar:
            for name, content in {**members, "census-income.names": b"| names\n"}.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        bundle.writestr("census.tar.gz", tar_bytes.getvalue())
    return path


OFFICIAL_MEMBERS = {"census-income.data": TRAIN_ROWS, "census-income.test": TEST_ROWS}
OFFICIAL_NAMES = sorted(OFFICIAL_MEMBERS)


class ServedFiles:
    """A real HTTP server on 127.0.0.1 that serves one folder, or breaks off every response."""

    def __init__(self, directory: Path, truncate: bool = False) -> None:
        served = directory

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(served), **kwargs)

            def do_GET(self) -> None:
                if not truncate:
                    super().do_GET()
                    return
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"PK\x03\x04" + b"\x00" * 96)  # then the connection closes

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def __enter__(self) -> ServedFiles:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def download_config(directory: Path, tmp_path: Path, url: str, **settings: object) -> CensusConfig:
    return CensusConfig(
        data_dir=directory, cache_dir=tmp_path / "cache", url=url, download_timeout=5.0,
        leakage_threshold=None, verify_checksums=False, **settings,
    )  # fmt: skip


def test_download_from_file_url(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "census.zip", OFFICIAL_MEMBERS)
    directory = tmp_path / "downloaded"

    result = load_census(download_config(directory, tmp_path, archive.as_uri()))

    assert sorted(p.name for p in directory.iterdir()) == OFFICIAL_NAMES
    assert (directory / "census-income.data").read_text().splitlines() == TRAIN_ROWS
    assert result.data.info["train_rows"] == 4


def test_download_from_http_server(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    make_archive(served / "census.zip", OFFICIAL_MEMBERS, nested=False)
    directory = tmp_path / "downloaded"

    with ServedFiles(served) as server:
        result = load_census(download_config(directory, tmp_path, server.url("census.zip")))

    assert sorted(p.name for p in directory.iterdir()) == OFFICIAL_NAMES
    assert result.data.info["val_rows"] == 2


def test_download_keeps_existing_files(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "census.zip", OFFICIAL_MEMBERS)
    directory = tmp_path / "downloaded"
    directory.mkdir()
    own_rows = TEST_ROWS[::-1]
    write_lines(directory / "census-income.test", own_rows)

    load_census(download_config(directory, tmp_path, archive.as_uri()))

    assert (directory / "census-income.test").read_text().splitlines() == own_rows
    assert (directory / "census-income.data").is_file()


def test_interrupted_download_leaves_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "downloaded"

    with ServedFiles(tmp_path, truncate=True) as server:
        url = server.url("census.zip")
        with pytest.raises(DownloadError, match=re.escape(f"from {url!r} into {directory} failed")):
            load_census(download_config(directory, tmp_path, url))

    assert list(directory.iterdir()) == []


def test_missing_server_names_url_and_folder(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that nothing listens on once the socket closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/census.zip"
    directory = tmp_path / "downloaded"

    with pytest.raises(DownloadError) as raised:
        load_census(download_config(directory, tmp_path, url))

    message = str(raised.value)
    assert url in message
    assert str(directory) in message
    assert "To place the files by hand" in message
    assert list(directory.iterdir()) == []


def test_http_error_is_download_error(tmp_path: Path) -> None:
    directory = tmp_path / "downloaded"

    with ServedFiles(tmp_path / "nothing-here") as server:
        with pytest.raises(DownloadError, match="404"):
            load_census(download_config(directory, tmp_path, server.url("census.zip")))


def test_archive_without_census_files(tmp_path: Path) -> None:
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("readme.txt", "nothing")

    with pytest.raises(DownloadError, match=r"the archive contains none of .*\['readme.txt'\]"):
        load_census(download_config(tmp_path / "downloaded", tmp_path, archive.as_uri()))


def test_damaged_archive_leaves_nothing(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "census.zip", OFFICIAL_MEMBERS)
    content = bytearray(archive.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 64] = bytes(64)  # zeroes inside the compressed tar
    archive.write_bytes(bytes(content))
    directory = tmp_path / "downloaded"

    with pytest.raises(DownloadError, match="the downloaded archive is damaged"):
        load_census(download_config(directory, tmp_path, archive.as_uri()))

    assert list(directory.iterdir()) == []


def test_download_that_is_not_a_zip(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text("<html>moved</html>")
    directory = tmp_path / "downloaded"

    with pytest.raises(DownloadError, match="not a zip archive"):
        load_census(download_config(directory, tmp_path, page.as_uri()))

    assert list(directory.iterdir()) == []


# Real data.


@pytest.fixture
def real_test_file() -> Path:
    if not REAL_TEST_FILE.is_file():
        pytest.skip(f"the official census-income.test.gz is not at {REAL_TEST_FILE.resolve()}")
    return REAL_TEST_FILE


@pytest.mark.real_data
def test_real_file_checksum_and_recompressed_copy(real_test_file: Path, tmp_path: Path) -> None:
    copy = tmp_path / "census-income.test.gz"
    copy.write_bytes(gzip.compress(gzip.decompress(real_test_file.read_bytes()), compresslevel=1))

    verify_checksum(real_test_file, hashlib.sha256(real_test_file.read_bytes()).hexdigest())
    # A copy compressed differently passes through the sum of its decompressed content.
    verify_checksum(copy, hashlib.sha256(copy.read_bytes()).hexdigest())


@pytest.mark.real_data
@pytest.mark.slow
def test_real_test_file(real_test_file: Path, tmp_path: Path) -> None:
    config = CensusConfig(
        data_dir=real_test_file.parent, cache_dir=tmp_path / "cache", split="fraction",
        download=False,
    )  # fmt: skip
    result = load_census(config)
    data = result.data
    splits = [data.splits[name] for name in ("train", "val", "test")]
    income = torch.cat([split.targets[0] for split in splits])
    never_married = torch.cat([split.targets[1] for split in splits])

    assert sum(len(split) for split in splits) == 99_762
    assert data.info["census_test_sha256"] == TEST_GZ_SHA256
    # census-income.names gives 6.20 % over 50K for the test file. 43,143 of its rows are never
    # married (43.25 %), as counted in the file itself.
    assert abs(income.mean().item() * 100 - 6.20) < 0.01
    assert abs(never_married.mean().item() * 100 - 43.25) < 0.01
    assert {"income", "marital_stat", "instance_weight"}.isdisjoint(base_columns(result))

    assert income_test_auc(data) > 0.85


def income_test_auc(data: MultiTaskData) -> float:
    """Train a 2-layer MLP on the income task for a few epochs and return its test AUC."""
    # A model this small trains faster on one thread, and stays fast when other processes
    # share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_and_score(data)
    finally:
        torch.set_num_threads(threads)


def train_and_score(data: MultiTaskData) -> float:
    torch.manual_seed(0)
    train, test = data.splits["train"], data.splits["test"]
    model = torch.nn.Sequential(
        torch.nn.Linear(data.input_dim, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_function = torch.nn.BCEWithLogitsLoss()

    for _ in range(3):
        order = torch.randperm(len(train))
        for start in range(0, len(train), 512):
            batch = order[start : start + 512]
            loss = loss_function(model(train.features[batch]), train.targets[0][batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    with torch.no_grad():
        scores = model(test.features).squeeze(1).numpy()
    return float(roc_auc_score(test.targets[0].squeeze(1).numpy(), scores))
