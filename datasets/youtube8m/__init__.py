"""YouTube-8M video-level features, streamed from TFRecord shards, one task per vertical.

Source: Abu-El-Haija, Kothari, Lee, Natsev, Toderici, Varadarajan and Vijayanarasimhan,
"YouTube-8M: A Large-Scale Video Classification Benchmark", arXiv:1609.08675, 2016
(https://arxiv.org/abs/1609.08675); data at https://research.google.com/youtube8m/.

Files, looked up in ``data_dir``, else in ``$MTL_BENCH_DATA_DIR/youtube8m``, else in
``$XDG_CACHE_HOME/mtl-bench/youtube8m`` (``~/.cache/mtl-bench/youtube8m`` when unset):

- ``vocabulary.csv``: one row per class with its ``Index`` (the label value), its
  ``TrainVideoCount`` and its top-level vertical ``Vertical1``.
- ``video_level/*.tfrecord`` (``shard_pattern``): one ``tf.train.Example`` per video. Its
  features are ``id`` (bytes, named ``video_id`` in older releases), ``labels`` (int64 class
  indices), ``mean_rgb`` (1,024 floats) and ``mean_audio`` (128 floats). Only labelled
  partitions can be read, because the official test partition has no labels.

Tasks: one per top-level vertical. By default, the tasks are the ``num_verticals`` verticals
with the largest sum of ``TrainVideoCount`` over their classes. That sum counts the label
occurrences in the official training partition, as the vocabulary states them. ``(Unknown)`` is
left out because it is not a topic. Ranking from the vocabulary needs no pass over the data and
gives the same tasks for every split. ``verticals`` names the verticals explicitly instead, and
may include ``(Unknown)``.

- ``task_kind="multilabel"``: the task's outputs are the classes whose ``Vertical1`` is the
  vertical, ordered by class index, and its target is their (N, O) multi-hot vector.
- ``task_kind="binary"``: one output, 1 when the video has any label of the vertical.

A video with no label of a task's vertical keeps an all-zero target for that task: it is a
negative for every class in training, in GAP and in mAP, and is left out of Hit@1 and PERR
(see :mod:`models.multilabel_metrics`). The adapter counts such videos per split and task in
``info``.

Features: ``mean_rgb`` followed by ``mean_audio``, 1,152 float32 values, without normalisation.
Their scales are already alike: on 10 shards of ``validate``, every value lies in
[-1.99, 2.01], the per-dimension means are near 0 and the standard deviations lie between 0.39
and 0.96.

Splits: the shard files are sorted by name, permuted with ``split_seed`` and cut into
``fractions`` of whole shards, so no video sits in two splits. The splits are never loaded into
memory. Each is a :class:`TFRecordSplit` whose ``loader`` yields batches from a
``torch.utils.data.IterableDataset``. Shards are dealt to DataLoader workers and distributed
ranks, shuffled in a buffer of ``shuffle_buffer`` records per worker, so memory does not grow
with the number of shards.

Download: the official instructions of the second release fetch the video-level validation
partition with::

    curl data.yt8m.org/download.py | partition=2/video/validate mirror=us python

with ``shard=1,100`` added to the environment for one hundredth of the files, and ``mirror``
one of ``us``, ``eu``, ``asia``. The same download, into the layout this adapter reads::

    python -m datasets.youtube8m download --split validate --fraction 0.01 --dir DATA_DIR

It fetches the download plan (file names and MD5 sums) of the partition, keeps the files the
official script keeps for that shard, and writes each file under a temporary name, renamed once
its MD5 sum matches. Files already present with the right sum are skipped. The command has been
run only against a local server laid out like the official one.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import polars as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from datasets import register_dataset
from datasets.base import (
    DATA_DIR_ENV,
    SPLITS,
    Batch,
    MultiTaskData,
    StreamSplit,
    TaskSpec,
    config_from_params,
    config_signature,
)
from datasets.census import default_cache_root
from datasets.tfrecord import ExampleError, count_records, parse_example, read_records

logger = logging.getLogger(__name__)

SUBFOLDER = "youtube8m"
VOCABULARY_FILE = "vocabulary.csv"
SHARD_FOLDER = "video_level"
DEFAULT_SHARD_PATTERN = f"{SHARD_FOLDER}/*.tfrecord"
UNKNOWN_VERTICAL = "(Unknown)"
TASK_KINDS = ("multilabel", "binary")
ID_KEYS = ("id", "video_id")  # `video_id` is the name in the first releases
RGB_SIZE = 1024
AUDIO_SIZE = 128
INPUT_DIM = RGB_SIZE + AUDIO_SIZE
PARSED_FEATURES = frozenset({*ID_KEYS, "labels", "mean_rgb", "mean_audio"})
# Bump when the scan results change meaning, so that old cache files are no longer matched.
SCAN_CACHE_FORMAT = 1
# Maximum length of the comma-separated shard names put in `info`. Longer lists only get their
# hash, because MLflow limits a parameter value to 6,000 characters.
MAX_SHARD_NAMES_LENGTH = 1000


class YouTube8MFormatError(ValueError):
    """A vocabulary or shard file that is not valid YouTube-8M data."""


class DownloadError(ConnectionError):
    """A download that failed or returned a file whose checksum does not match."""


@dataclass(frozen=True)
class YouTube8MConfig:
    """Settings of the YouTube-8M adapter, as given in a suite's dataset section.

    Example:
        >>> YouTube8MConfig(num_verticals=2, task_kind="binary").fractions
        (0.8, 0.1, 0.1)
    """

    num_verticals: int = 3  # K: tasks for the K verticals with most training labels
    verticals: Sequence[str] | None = None  # explicit verticals, in task order; overrides K
    task_kind: str = "multilabel"  # "multilabel" over the vertical's classes, or "binary"
    fractions: Sequence[float] = (0.8, 0.1, 0.1)  # train, val, test shares of the shards
    split_seed: int | None = 0  # seed of the shard permutation; None uses the trial seed
    data_dir: str | os.PathLike[str] | None = None  # None looks up the folders in the module doc
    shard_pattern: str = DEFAULT_SHARD_PATTERN  # glob of the shard files, relative to data_dir
    vocabulary_file: str = VOCABULARY_FILE  # relative to data_dir
    shuffle_buffer: int = 4096  # records held per DataLoader worker for shuffling
    verify_crc: bool = True  # check the CRC-32C of every record while streaming
    scan: bool = True  # read all labels once to count videos without labels per task
    cache_dir: str | os.PathLike[str] | None = None  # scan results; None: <cache root>/youtube8m
    use_cache: bool = True  # read and write the scan cache

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        if self.verticals is not None:
            object.__setattr__(self, "verticals", tuple(self.verticals))
            if not self.verticals or len(set(self.verticals)) != len(self.verticals):
                raise ValueError(
                    f"verticals must be a non-empty list without repeats, got {self.verticals!r}."
                )
        if self.num_verticals < 1:
            raise ValueError(f"num_verticals must be >= 1, got {self.num_verticals!r}.")
        if self.task_kind not in TASK_KINDS:
            raise ValueError(f"task_kind must be one of {TASK_KINDS}, got {self.task_kind!r}.")
        fractions = self.fractions
        if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"fractions must be three positive shares (train, val, test) that sum to 1, "
                f"got {fractions!r}."
            )
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer!r}.")


# Vocabulary and tasks.


@dataclass(frozen=True)
class Vocabulary:
    """The classes of ``vocabulary.csv``, indexed by label value.

    Attributes:
        names: Class name per label value.
        verticals: Top-level vertical (``Vertical1``) per label value.
        train_counts: ``TrainVideoCount`` per label value.
        sha256: SHA-256 of the file.
    """

    names: tuple[str, ...]
    verticals: tuple[str, ...]
    train_counts: np.ndarray  # (V,) int64
    sha256: str

    def __len__(self) -> int:
        return len(self.names)

    def vertical_counts(self) -> dict[str, int]:
        """Return the sum of ``TrainVideoCount`` per vertical, largest first."""
        frame = pl.DataFrame({"vertical": self.verticals, "count": self.train_counts})
        totals = frame.group_by("vertical").agg(pl.col("count").sum())
        totals = totals.sort(["count", "vertical"], descending=[True, False])
        return dict(zip(totals["vertical"].to_list(), totals["count"].to_list()))


VOCABULARY_COLUMNS = ("Index", "TrainVideoCount", "Name", "Vertical1")


def load_vocabulary(path: Path) -> Vocabulary:
    """Parse ``vocabulary.csv``, whose quoted descriptions may contain commas and newlines.

    Raises:
        YouTube8MFormatError: If a column is missing or the indices are not 0 to V - 1.
    """
    content = path.read_bytes()
    try:
        frame = pl.read_csv(
            content, columns=list(VOCABULARY_COLUMNS), schema_overrides={"Name": pl.String}
        )
    except (pl.exceptions.PolarsError, ValueError) as error:
        raise YouTube8MFormatError(
            f"Cannot read the vocabulary {path}: {error}. It needs the columns "
            f"{list(VOCABULARY_COLUMNS)}."
        ) from error

    frame = frame.sort("Index")
    indices = frame["Index"].to_numpy()
    if frame.height == 0 or not np.array_equal(indices, np.arange(frame.height)):
        raise YouTube8MFormatError(
            f"The vocabulary {path} must number its {frame.height} classes 0 to "
            f"{frame.height - 1} in column `Index`, each once."
        )
    if frame["Vertical1"].null_count() or frame["TrainVideoCount"].null_count():
        raise YouTube8MFormatError(
            f"The vocabulary {path} has empty `Vertical1` or `TrainVideoCount` cells."
        )
    return Vocabulary(
        names=tuple(frame["Name"].fill_null("").to_list()),
        verticals=tuple(frame["Vertical1"].to_list()),
        train_counts=frame["TrainVideoCount"].to_numpy().astype(np.int64),
        sha256=hashlib.sha256(content).hexdigest(),
    )


def choose_verticals(vocabulary: Vocabulary, config: YouTube8MConfig) -> tuple[str, ...]:
    """Return the task verticals: ``config.verticals``, or the K with the most training labels."""
    counts = vocabulary.vertical_counts()
    if config.verticals is not None:
        unknown = [vertical for vertical in config.verticals if vertical not in counts]
        if unknown:
            raise ValueError(
                f"Vertical(s) {unknown} are not in the vocabulary. Valid verticals are "
                f"{sorted(counts)}."
            )
        return tuple(config.verticals)

    ranked = [vertical for vertical in counts if vertical != UNKNOWN_VERTICAL]
    if config.num_verticals > len(ranked):
        raise ValueError(
            f"num_verticals is {config.num_verticals}, but the vocabulary has only "
            f"{len(ranked)} verticals besides {UNKNOWN_VERTICAL!r}."
        )
    return tuple(ranked[: config.num_verticals])


def task_name(vertical: str) -> str:
    """Return the snake_case task name of a vertical.

    Example:
        >>> task_name("Arts & Entertainment")
        'arts_and_entertainment'
    """
    words = re.findall(r"[a-z0-9]+", vertical.lower().replace("&", " and "))
    return "_".join(words) or "unknown"


@dataclass(frozen=True)
class LabelMap:
    """Target position of every class: its task and its column within that task.

    Attributes:
        tasks: One task per vertical, in target order.
        verticals: The vertical of each task.
        class_task: (V,) task index of each class, -1 for classes of no task.
        class_column: (V,) target column of each class within its task.
        classes_per_task: Number of classes of each task's vertical.
    """

    tasks: tuple[TaskSpec, ...]
    verticals: tuple[str, ...]
    class_task: np.ndarray
    class_column: np.ndarray
    classes_per_task: tuple[int, ...]

    @classmethod
    def build(cls, vocabulary: Vocabulary, verticals: Sequence[str], kind: str) -> LabelMap:
        """Map the classes of ``verticals`` to tasks of ``kind``, multilabel or binary."""
        class_verticals = np.array(vocabulary.verticals, dtype=object)
        class_task = np.full(len(vocabulary), -1, dtype=np.int64)
        class_column = np.zeros(len(vocabulary), dtype=np.int64)
        tasks, sizes = [], []
        for index, vertical in enumerate(verticals):
            members = np.flatnonzero(class_verticals == vertical)  # ascending class index
            class_task[members] = index
            if kind == "multilabel":
                class_column[members] = np.arange(members.size)
            outputs = members.size if kind == "multilabel" else 1
            tasks.append(TaskSpec(task_name(vertical), kind, outputs))
            sizes.append(int(members.size))

        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"The verticals {list(verticals)} give repeated task names {names}.")
        return cls(tuple(tasks), tuple(verticals), class_task, class_column, tuple(sizes))

    @property
    def key(self) -> str:
        """Hash of the class-to-task assignment, which keys the scan cache."""
        digest = hashlib.sha256(self.class_task.tobytes())
        return digest.hexdigest()[:16]

    def targets(self, labels: np.ndarray, lengths: np.ndarray) -> tuple[Tensor, ...]:
        """Return one (B, O_t) float32 multi-hot target per task.

        Args:
            labels: The label lists of B videos, concatenated.
            lengths: (B,) number of labels of each video.
        """
        rows = np.repeat(np.arange(lengths.size), lengths)  # video of each label
        label_tasks = self.class_task[labels]
        label_columns = self.class_column[labels]

        targets = []
        for index, task in enumerate(self.tasks):
            target = np.zeros((lengths.size, task.output_dim), dtype=np.float32)
            in_task = label_tasks == index
            target[rows[in_task], label_columns[in_task]] = 1.0
            targets.append(torch.from_numpy(target))
        return tuple(targets)

    def unlabeled_counts(self, labels: Sequence[np.ndarray]) -> np.ndarray:
        """Return, per task, how many of the videos have no label of its vertical."""
        labelled = np.zeros(len(self.tasks), dtype=np.int64)
        for label in labels:
            tasks = np.unique(self.class_task[label])
            labelled[tasks[tasks >= 0]] += 1
        return len(labels) - labelled


# Records.


class RecordDecoder:
    """Decode and check the records of one vocabulary.

    Errors name the file, the record index within it (from 0) and the feature.
    """

    def __init__(self, vocabulary_size: int) -> None:
        self.vocabulary_size = vocabulary_size

    def decode(self, data: bytes, path: Path, index: int) -> tuple[bytes, np.ndarray]:
        """Return the features and the int64 labels of one record.

        The features are ``mean_rgb`` then ``mean_audio`` as F little-endian float32 numbers,
        left as bytes because batching copies them once more.
        """
        parsed = self._parse(data, path, index, PARSED_FEATURES)
        self._video_id(parsed, path, index)
        rgb = self._float_feature(parsed, "mean_rgb", RGB_SIZE, path, index)
        audio = self._float_feature(parsed, "mean_audio", AUDIO_SIZE, path, index)
        labels = self._labels(parsed, path, index)
        return rgb + audio, labels

    def labels(self, data: bytes, path: Path, index: int) -> np.ndarray:
        """Return the checked labels of one record without decoding its features."""
        return self._labels(self._parse(data, path, index, {"labels"}), path, index)

    def _parse(self, data: bytes, path: Path, index: int, features: frozenset[str] | set[str]):
        try:
            return parse_example(data, features, raw_floats=True)
        except ExampleError as error:
            raise YouTube8MFormatError(f"{path}, record {index}: {error}") from error

    def _video_id(self, parsed: dict, path: Path, index: int) -> bytes:
        for key in ID_KEYS:
            if key in parsed:
                value = _checked_kind(parsed[key], list, key, "a BytesList", path, index)
                if len(value) != 1:
                    raise _length_error(path, index, key, len(value), 1)
                return value[0]
        raise YouTube8MFormatError(
            f"{path}, record {index}: feature `id` (or the older `video_id`) is missing. "
            f"Video-level YouTube-8M records carry the features `id`, `labels`, `mean_rgb` "
            f"and `mean_audio`."
        )

    def _float_feature(self, parsed: dict, name: str, size: int, path: Path, index: int) -> bytes:
        value = _checked_kind(parsed.get(name), bytes, name, "a FloatList", path, index)
        if len(value) != 4 * size:
            raise _length_error(path, index, name, len(value) // 4, size)
        return value

    def _labels(self, parsed: dict, path: Path, index: int) -> np.ndarray:
        labels = _checked_kind(
            parsed.get("labels"), np.ndarray, "labels", "an Int64List", path, index
        )
        # Python's min and max beat numpy's on the few labels of a video.
        values = labels.tolist()
        if values and (min(values) < 0 or max(values) >= self.vocabulary_size):
            bad = next(v for v in values if not 0 <= v < self.vocabulary_size)
            raise YouTube8MFormatError(
                f"{path}, record {index}: label {bad} is outside the vocabulary of "
                f"{self.vocabulary_size} classes (0 to {self.vocabulary_size - 1}). Check that "
                f"the vocabulary file belongs to the same release as the shards."
            )
        return labels


def _checked_kind(value: Any, kind: type, name: str, expected: str, path: Path, index: int) -> Any:
    if value is None:
        raise YouTube8MFormatError(
            f"{path}, record {index}: feature `{name}` is missing; expected {expected}."
        )
    if not isinstance(value, kind):
        raise _kind_error(path, index, name, value, expected)
    return value


def _kind_name(value: Any) -> str:
    """Return the kind of a value that `parse_example(..., raw_floats=True)` returned."""
    if isinstance(value, list):
        return "a BytesList"
    return "a FloatList" if isinstance(value, bytes) else "an Int64List"


def _kind_error(path: Path, index: int, name: str, value: Any, expected: str):
    return YouTube8MFormatError(
        f"{path}, record {index}: feature `{name}` is {_kind_name(value)}; expected {expected}."
    )


def _length_error(path: Path, index: int, name: str, found: int, expected: int):
    return YouTube8MFormatError(
        f"{path}, record {index}: feature `{name}` has {found} values; expected {expected}."
    )


# Shards and splits.


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the data folder, following the order in the module docstring."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    root = os.environ.get(DATA_DIR_ENV)
    if root:
        return Path(root).expanduser() / SUBFOLDER
    return default_cache_root() / SUBFOLDER


def find_shards(directory: Path, pattern: str) -> list[Path]:
    """Return the shard files matching ``pattern`` in ``directory``, sorted by path."""
    shards = sorted(path for path in directory.glob(pattern) if path.is_file())
    if len(shards) < len(SPLITS):
        raise FileNotFoundError(
            f"Found {len(shards)} shard file(s) matching {pattern!r} in {directory}; the "
            f"train, val and test splits need at least {len(SPLITS)}. Download shards with "
            f"`python -m datasets.youtube8m download --split validate --fraction 0.01 --dir "
            f"{directory}`, pass `data_dir` with a folder that holds them, or set "
            f"${DATA_DIR_ENV} to a folder whose {SUBFOLDER}/ subfolder holds them."
        )
    return shards


def assign_shards(
    shards: Sequence[Path], fractions: Sequence[float], seed: int
) -> dict[str, list[Path]]:
    """Permute the shards with ``seed`` and cut them into train, val and test by ``fractions``.

    Val and test get ``round(fraction * shards)`` shards each, at least one; train gets the
    rest, at least one. Each split lists its shards sorted by path.
    """
    count = len(shards)
    sizes = [max(1, round(fraction * count)) for fraction in fractions[1:]]
    if sum(sizes) >= count:
        raise ValueError(
            f"{count} shards are too few for the fractions {tuple(fractions)}: the train split "
            f"would get none. Add shards or lower the val and test fractions."
        )
    order = np.random.default_rng(seed).permutation(count)
    bounds = np.cumsum([count - sum(sizes), *sizes])[:-1]
    parts = np.split(order, bounds)
    return {name: sorted(shards[i] for i in part) for name, part in zip(SPLITS, parts)}


@dataclass(frozen=True)
class ShardSummary:
    """Facts about one shard from a scan: its record count and its videos without labels."""

    records: int
    unlabeled: tuple[int, ...]  # per task; empty when the shard was only counted


def scan_shard(path: Path, decoder: RecordDecoder, label_map: LabelMap) -> ShardSummary:
    """Read every record's labels, checking their range and every CRC."""
    labels = [decoder.labels(data, path, index) for index, data in enumerate(read_records(path))]
    return ShardSummary(len(labels), tuple(int(n) for n in label_map.unlabeled_counts(labels)))


def summarise_shards(
    shards: Sequence[Path],
    decoder: RecordDecoder,
    label_map: LabelMap,
    config: YouTube8MConfig,
) -> dict[Path, ShardSummary]:
    """Scan or count every shard, reusing cached results of unchanged files."""
    cache_path = scan_cache_path(config, label_map) if config.use_cache else None
    cached = _read_json(cache_path) if cache_path is not None else {}

    summaries: dict[Path, ShardSummary] = {}
    updated = False
    progress = tqdm(shards, desc="youtube8m scan", unit="shard", disable=None, leave=False)
    for path in progress:
        stat = path.stat()
        key = str(path.resolve())
        summary = _cached_summary(cached.get(key), stat, len(label_map.tasks) if config.scan else 0)
        if summary is None:
            if config.scan:
                summary = scan_shard(path, decoder, label_map)
            else:
                summary = ShardSummary(count_records(path), ())
            cached[key] = {
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "records": summary.records,
                "unlabeled": list(summary.unlabeled),
            }
            updated = True
        summaries[path] = summary

    if cache_path is not None and updated:
        _write_json(cache_path, cached)
    return summaries


def scan_cache_path(config: YouTube8MConfig, label_map: LabelMap) -> Path:
    """Return the cache file of shard summaries for this class-to-task assignment."""
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_root() / SUBFOLDER
    mode = f"scan-{label_map.key}" if config.scan else "count"
    return cache_dir.expanduser() / f"shards-{mode}-v{SCAN_CACHE_FORMAT}.json"


def _cached_summary(entry: Any, stat: os.stat_result, num_tasks: int) -> ShardSummary | None:
    """Return the cached summary of a shard, or None if it is missing, stale or malformed."""
    try:
        if entry["size"] != stat.st_size or entry["mtime_ns"] != stat.st_mtime_ns:
            return None
        summary = ShardSummary(int(entry["records"]), tuple(int(n) for n in entry["unlabeled"]))
    except (KeyError, TypeError, ValueError):
        return None
    return summary if len(summary.unlabeled) == num_tasks else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.warning(
            "Scanning the shards again because cache file %s is unreadable: %s", path, error
        )
        return {}
    return content if isinstance(content, dict) else {}


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` to ``path`` through a temporary file, so readers never see half a file.

    A failure only logs a warning, because the cache saves time but is not needed.
    """
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{path.name}-", suffix=".part", dir=path.parent
        )
        with os.fdopen(handle, "w") as file:
            json.dump(content, file)
        os.replace(temporary, path)
    except OSError as error:
        logger.warning("Could not write the shard scan cache %s: %s", path, error)
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


# Streaming.


def distributed_rank() -> tuple[int, int]:
    """Return (rank, world size) of ``torch.distributed``, or (0, 1) when it is not in use."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shuffle_in_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Yield ``items`` in random order, holding at most ``size`` of them at a time.

    Each incoming item takes a random place in the full buffer, and the item it displaces is
    yielded. So an item comes out at most ``size`` places earlier than it came in, though it
    may come out any number of places later.
    """
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        buffer[slot], item = item, buffer[slot]
        yield item
    rng.shuffle(buffer)
    yield from buffer


# A batch as the readers send it: (B, F) features, the concatenated labels and (B,) label counts.
# Multi-hot targets are built in the main process: they are much larger than the labels, and
# each tensor a DataLoader worker sends costs a shared-memory copy.
PackedBatch = tuple[Tensor, Tensor, Tensor]


class ShardStream(IterableDataset):
    """Batches from a list of shards, for one epoch per iteration.

    The shards are dealt round-robin to the ``world_size * num_workers`` readers of an epoch:
    DataLoader worker w of rank r reads positions ``r * num_workers + w`` modulo that number of
    the epoch's shard order, so each record is read once per epoch. ``epoch``, ``rank`` and
    ``world_size`` are set by :class:`EpochLoader` in the main process before the workers
    start, because the workers have no ``torch.distributed`` state of their own.
    """

    def __init__(
        self,
        shards: Sequence[Path],
        decoder: RecordDecoder,
        label_map: LabelMap,
        batch_size: int,
        shuffle: bool,
        seed: int,
        shuffle_buffer: int,
        verify_crc: bool,
    ) -> None:
        super().__init__()
        self.shards = list(shards)
        self.decoder = decoder
        self.label_map = label_map
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.verify_crc = verify_crc
        self.epoch = 0
        self.rank, self.world_size = 0, 1

    def shards_of(self, reader: int, readers: int) -> list[Path]:
        """Return the shards that reader ``reader`` of ``readers`` reads in this epoch."""
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order[reader::readers]]

    def __iter__(self) -> Iterator[PackedBatch]:
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        reader = self.rank * num_workers + worker_id
        shards = self.shards_of(reader, self.world_size * num_workers)

        samples: Iterable[tuple[bytes, np.ndarray]] = self._samples(shards)
        if self.shuffle:
            # random.Random draws a slot in a fifth of the time numpy's Generator takes.
            state = np.random.SeedSequence([self.seed, self.epoch, reader]).generate_state(2)
            rng = random.Random(int(state[0]) << 32 | int(state[1]))
            samples = shuffle_in_buffer(samples, self.shuffle_buffer, rng)
        yield from self._batches(samples)

    def _samples(self, shards: Sequence[Path]) -> Iterator[tuple[bytes, np.ndarray]]:
        decode = self.decoder.decode
        for path in shards:
            for index, data in enumerate(read_records(path, verify_crc=self.verify_crc)):
                yield decode(data, path, index)

    def _batches(self, samples: Iterable[tuple[bytes, np.ndarray]]) -> Iterator[PackedBatch]:
        features: list[bytes] = []
        labels: list[np.ndarray] = []
        for sample_features, sample_labels in samples:
            features.append(sample_features)
            labels.append(sample_labels)
            if len(features) == self.batch_size:
                yield _pack(features, labels)
                features, labels = [], []
        if features:
            yield _pack(features, labels)


def _pack(features: list[bytes], labels: list[np.ndarray]) -> PackedBatch:
    # One copy into a writable buffer, which torch.from_numpy needs. The astype copies only on a
    # big-endian machine.
    rows = np.frombuffer(bytearray().join(features), dtype="<f4").reshape(len(features), -1)
    lengths = np.fromiter((label.size for label in labels), dtype=np.int64, count=len(labels))
    return (
        torch.from_numpy(rows.astype(np.float32, copy=False)),
        torch.from_numpy(np.concatenate(labels)),
        torch.from_numpy(lengths),
    )


class EpochLoader:
    """One pass over a :class:`TFRecordSplit` per iteration, each with a new shuffle.

    Iteration number e (from 0) shuffles the shard order with ``(seed, e)`` and each reader's
    buffer with ``(seed, e, reader)``, so a run is repeatable and epochs differ.
    """

    def __init__(
        self, dataset: ShardStream, record_counts: dict[Path, int], num_workers: int
    ) -> None:
        self.dataset = dataset
        self.record_counts = record_counts
        self.num_workers = num_workers

    def __len__(self) -> int:
        """Return the number of batches the next epoch yields on this rank."""
        rank, world_size = distributed_rank()
        self.dataset.rank, self.dataset.world_size = rank, world_size
        workers = max(self.num_workers, 1)
        batches = 0
        for worker in range(workers):
            shards = self.dataset.shards_of(rank * workers + worker, world_size * workers)
            records = sum(self.record_counts[path] for path in shards)
            batches += math.ceil(records / self.dataset.batch_size)
        return batches

    def __iter__(self) -> Iterator[Batch]:
        rank, world_size = distributed_rank()
        self.dataset.rank, self.dataset.world_size = rank, world_size
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)
        targets = self.dataset.label_map.targets
        batches = iter(loader)
        try:
            for features, labels, lengths in batches:
                yield features, targets(labels.numpy(), lengths.numpy()), None
        finally:
            # Stop the workers now when the epoch ends early (an error, or a consumer that
            # stops). Left to garbage collection, torch 2.13 waits 5 s per worker for them.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self.dataset.epoch += 1


class TFRecordSplit(StreamSplit):
    """A split read from TFRecord shards batch by batch, never held in memory.

    Each reader keeps in memory its shuffle buffer (``shuffle_buffer`` records of about 4.7 KB
    for YouTube-8M), one read buffer of 256 KiB and one batch, whatever the number of shards.

    NOTE: shards are dealt whole to distributed ranks, so ranks may get different numbers of
    batches. Training with DistributedDataParallel then needs uneven-input handling, such as
    ``torch.distributed.algorithms.Join``, or about as many shards per rank.

    Attributes:
        shards: The split's shard files.
        num_samples: Records in the split.
        feature_dim: F, features per record.
    """

    def __init__(
        self,
        shards: Sequence[Path],
        record_counts: Sequence[int],
        decoder: RecordDecoder,
        label_map: LabelMap,
        shuffle_buffer: int = 4096,
        verify_crc: bool = True,
    ) -> None:
        if len(shards) != len(record_counts):
            raise ValueError(f"Got {len(shards)} shards but {len(record_counts)} record counts.")
        self.shards = tuple(shards)
        self.record_counts = dict(zip(self.shards, record_counts))
        self.num_samples: int | None = int(sum(record_counts))
        self.feature_dim = INPUT_DIM
        self.decoder = decoder
        self.label_map = label_map
        self.shuffle_buffer = shuffle_buffer
        self.verify_crc = verify_crc

    def __len__(self) -> int:
        return self.num_samples or 0

    def loader(
        self, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0
    ) -> EpochLoader:
        """Return an iterable of ``(features (B, F), targets (B, O_t) per task, None)`` batches.

        Each iteration is one epoch. Every reader (DataLoader worker on each rank) yields its
        own batches, so an epoch may hold up to one smaller batch per reader.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}.")
        dataset = ShardStream(
            self.shards, self.decoder, self.label_map, batch_size, shuffle, seed,
            self.shuffle_buffer, self.verify_crc,
        )  # fmt: skip
        return EpochLoader(dataset, self.record_counts, num_workers)


# Loading.


@register_dataset("youtube8m")
def youtube8m(seed: int = 0, **params: Any) -> MultiTaskData:
    """Open the YouTube-8M shards as streamed splits, one task per vertical.

    ``params`` are fields of :class:`YouTube8MConfig`. ``seed`` only matters when
    ``split_seed=None``, so by default every trial uses the same split.
    """
    return load_youtube8m(make_config(params), seed=seed)


youtube8m.__signature__ = config_signature(YouTube8MConfig)


def make_config(params: dict[str, Any]) -> YouTube8MConfig:
    """Build a :class:`YouTube8MConfig` and name the valid parameters when one is unknown."""
    return config_from_params(YouTube8MConfig, params, "youtube8m")


def load_youtube8m(config: YouTube8MConfig | None = None, seed: int = 0) -> MultiTaskData:
    """Read the vocabulary, assign shards to splits and count their records.

    Raises:
        FileNotFoundError: If the vocabulary or the shards are missing.
        YouTube8MFormatError: If the vocabulary is invalid or, during the scan, a record is.
        TFRecordError: If, during the scan, a shard is corrupt or truncated.
    """
    config = config or YouTube8MConfig()
    directory = resolve_data_dir(config.data_dir)
    vocabulary_path = directory / config.vocabulary_file
    if not vocabulary_path.is_file():
        raise FileNotFoundError(
            f"The YouTube-8M vocabulary {vocabulary_path} is missing. Download it with "
            f"`python -m datasets.youtube8m download --split validate --fraction 0.01 --dir "
            f"{directory}`, or pass `data_dir` with a folder that contains "
            f"{config.vocabulary_file}."
        )
    vocabulary = load_vocabulary(vocabulary_path)
    label_map = LabelMap.build(vocabulary, choose_verticals(vocabulary, config), config.task_kind)
    decoder = RecordDecoder(len(vocabulary))

    shards = find_shards(directory, config.shard_pattern)
    split_seed = seed if config.split_seed is None else config.split_seed
    assignment = assign_shards(shards, config.fractions, split_seed)
    summaries = summarise_shards(shards, decoder, label_map, config)

    splits = {}
    for name, paths in assignment.items():
        counts = [summaries[path].records for path in paths]
        splits[name] = TFRecordSplit(
            paths, counts, decoder, label_map, config.shuffle_buffer, config.verify_crc
        )
    info = describe(config, vocabulary, label_map, directory, assignment, summaries, split_seed)
    logger.info(
        "YouTube-8M: %s records in %s shards (train/val/test), tasks %s",
        "/".join(str(splits[name].num_samples) for name in SPLITS),
        "/".join(str(len(assignment[name])) for name in SPLITS),
        ", ".join(task.name for task in label_map.tasks),
    )
    return MultiTaskData(label_map.tasks, splits, info)


def describe(
    config: YouTube8MConfig,
    vocabulary: Vocabulary,
    label_map: LabelMap,
    directory: Path,
    assignment: dict[str, list[Path]],
    summaries: dict[Path, ShardSummary],
    split_seed: int,
) -> dict[str, Any]:
    """Collect the facts logged with every trial: tasks, vocabulary, shards and label counts.

    Keys, with ``<split>`` one of train, val and test:

    - ``verticals`` (comma-separated), ``task_kind``, ``vocabulary_size``,
      ``vocabulary_sha256``, ``split_seed``;
    - ``num_classes_<task>``: classes of the task's vertical, also for binary tasks;
    - ``<split>_shards``, ``<split>_records``;
    - ``<split>_shards_sha256``: SHA-256 of the shard paths relative to the data folder, one per
      line;
    - ``<split>_shard_names``: comma-separated file names without extension, left out when
      longer than 1,000 characters;
    - ``<split>_unlabeled_<task>``: videos without a label of the task's vertical, when
      ``scan`` is on.
    """
    info: dict[str, Any] = {
        "verticals": ", ".join(label_map.verticals),
        "task_kind": config.task_kind,
        "vocabulary_size": len(vocabulary),
        "vocabulary_sha256": vocabulary.sha256,
        "split_seed": split_seed,
    }
    for task, count in zip(label_map.tasks, label_map.classes_per_task):
        info[f"num_classes_{task.name}"] = count

    for split, paths in assignment.items():
        names = [path.relative_to(directory).as_posix() for path in paths]
        info[f"{split}_shards"] = len(paths)
        info[f"{split}_records"] = sum(summaries[path].records for path in paths)
        info[f"{split}_shards_sha256"] = hashlib.sha256("\n".join(names).encode()).hexdigest()
        joined = ",".join(Path(name).stem for name in names)
        if len(joined) <= MAX_SHARD_NAMES_LENGTH:
            info[f"{split}_shard_names"] = joined
        logger.info("YouTube-8M %s shards: %s", split, ", ".join(names))

        if config.scan:
            for index, task in enumerate(label_map.tasks):
                count = sum(summaries[path].unlabeled[index] for path in paths)
                info[f"{split}_unlabeled_{task.name}"] = count
    return info


# Download.

PLAN_URL = "http://data.yt8m.org/{version}/download_plans/video_{split}.json"
FILE_URL = "http://{mirror}.data.yt8m.org/{version}/video/{split}/{name}"
# NOTE: this code was written without network access, so none of these three addresses has
# been fetched by it. The tests fetch the same layout from a local server.
VOCABULARY_URL = "https://research.google.com/youtube8m/csv/{version}/vocabulary.csv"
MIRRORS = ("us", "eu", "asia")
DOWNLOAD_SPLITS = ("train", "validate", "test")
# A file name from the download plan: letters, digits, '_', '-' and '.', not starting with '.'.
_PLAN_FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class DownloadSource:
    """Addresses of one partition: the official ones, or a local server's in tests."""

    plan_url: str
    file_url: str  # with a `{name}` field for the file name
    vocabulary_url: str

    @classmethod
    def official(cls, split: str, mirror: str = "us", version: int = 2) -> DownloadSource:
        return cls(
            PLAN_URL.format(version=version, split=split),
            FILE_URL.format(mirror=mirror, version=version, split=split, name="{name}"),
            VOCABULARY_URL.format(version=version),
        )

    @classmethod
    def from_base_url(cls, base_url: str, split: str, version: int = 2) -> DownloadSource:
        """Addresses below ``base_url``, laid out like the official plan and file paths."""
        base = base_url.rstrip("/")
        return cls(
            f"{base}/{version}/download_plans/video_{split}.json",
            f"{base}/{version}/video/{split}/{{name}}",
            f"{base}/{version}/vocabulary.csv",
        )


def shard_selected(name: str, shard: int, num_shards: int) -> bool:
    """Return whether the official download script keeps file ``name`` for ``shard=M,N``.

    With M = ``shard`` and N = ``num_shards``, the script keeps a file when the MD5 of its
    name, read as a hexadecimal number, is M - 1 modulo N.
    """
    return int(hashlib.md5(name.encode("utf-8")).hexdigest(), 16) % num_shards == shard - 1


def download_youtube8m(
    directory: Path,
    source: DownloadSource,
    shard: int = 1,
    num_shards: int = 1,
    vocabulary: bool = True,
    timeout: float = 60.0,
) -> list[Path]:
    """Download the selected shard files into ``directory/video_level``, and the vocabulary.

    Files already present with the MD5 sum of the plan are kept. Every file is written under a
    temporary name in its final folder and renamed once complete and verified, so a failed
    download leaves no partial file behind.

    Returns:
        The files written.

    Raises:
        DownloadError: If the plan cannot be fetched, or any file fails; the files that
            succeeded are kept.
    """
    if not 1 <= shard <= num_shards:
        raise ValueError(f"shard must lie in [1, num_shards={num_shards}], got {shard!r}.")
    plan = fetch_plan(source.plan_url, timeout)
    names = sorted(name for name in plan if shard_selected(name, shard, num_shards))
    logger.info("Downloading %d of %d files of %s", len(names), len(plan), source.plan_url)

    shard_dir = directory / SHARD_FOLDER
    _make_dir(shard_dir, source.plan_url)
    written, failures = [], []
    for name in tqdm(names, desc="youtube8m download", unit="file", disable=None):
        target = shard_dir / name
        if target.is_file() and md5_file(target) == plan[name]:
            continue
        try:
            fetch_file(source.file_url.format(name=name), target, timeout, expected_md5=plan[name])
        except DownloadError as error:
            logger.error("%s", error)
            failures.append(name)
            continue
        written.append(target)

    if vocabulary and not (directory / VOCABULARY_FILE).is_file():
        fetch_file(source.vocabulary_url, directory / VOCABULARY_FILE, timeout)
        written.append(directory / VOCABULARY_FILE)
    if failures:
        raise DownloadError(
            f"{len(failures)} of {len(names)} file(s) failed: {failures}. Run the same command "
            f"again to retry them; files already downloaded are kept."
        )
    return written


def fetch_plan(url: str, timeout: float) -> dict[str, str]:
    """Return the download plan at ``url``: the MD5 sum of each file, by file name."""
    body = _read_url(url, timeout)
    try:
        files = json.loads(body)["files"]
        plan = {str(name): str(md5) for name, md5 in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DownloadError(
            f"The download plan at {url} is not a JSON object with a `files` map of file names "
            f"to MD5 sums ({error})."
        ) from error
    invalid = [name for name in plan if not _PLAN_FILE_NAME.match(name)]
    if invalid:
        raise DownloadError(f"The download plan at {url} lists invalid file names {invalid[:5]}.")
    return plan


def _read_url(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise DownloadError(_failure_message(url, error)) from error


def _failure_message(url: str, reason: object) -> str:
    return (
        f"Downloading {url} failed: {reason}. Check that this machine can reach the server "
        f"(a machine without network access cannot download). Elsewhere, the official script "
        f"downloads the same files: `curl data.yt8m.org/download.py | partition=2/video/validate "
        f"mirror=us python`, after which the .tfrecord files go into DATA_DIR/{SHARD_FOLDER}/ "
        f"and vocabulary.csv into DATA_DIR."
    )


def _make_dir(path: Path, url: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(_failure_message(url, error)) from error


def fetch_file(url: str, target: Path, timeout: float, expected_md5: str | None = None) -> None:
    """Download ``url`` to ``target`` through a temporary file in the same folder.

    Raises:
        DownloadError: If the transfer fails or is cut short, or the MD5 sum differs from
            ``expected_md5``; the temporary file is removed.
    """
    try:
        handle, name = tempfile.mkstemp(
            prefix=f".{target.name}-", suffix=".part", dir=target.parent
        )
    except OSError as error:
        raise DownloadError(_failure_message(url, error)) from error
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as output:
            digest = _copy_response(url, output, timeout)
            output.flush()
            os.fsync(output.fileno())
        if expected_md5 is not None and digest != expected_md5:
            raise DownloadError(
                f"The MD5 sum of {url} is {digest}, but the download plan gives {expected_md5}. "
                f"The file was not saved; run the command again to retry."
            )
        os.chmod(temporary, 0o644)  # mkstemp creates files readable by their owner only
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _copy_response(url: str, output: IO[bytes], timeout: float) -> str:
    """Stream ``url`` into ``output`` and return the MD5 of what was received."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read(1 << 20):
                output.write(chunk)
                digest.update(chunk)
                received += len(chunk)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise DownloadError(_failure_message(url, error)) from error
    if length is not None and received != int(length):
        reason = f"the connection closed after {received} of {length} bytes"
        raise DownloadError(_failure_message(url, reason))
    return digest.hexdigest()


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m datasets.youtube8m", description="Tools for the YouTube-8M data set."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser(
        "download", help="download video-level shards and the vocabulary",
        description="Download video-level YouTube-8M shards and the vocabulary.",
    )  # fmt: skip
    download.add_argument(
        "--split",
        choices=DOWNLOAD_SPLITS,
        default="validate",
        help="official partition to download (default: validate); the test "
        "partition has no labels, so the adapter cannot read it",
    )
    selection = download.add_mutually_exclusive_group()
    selection.add_argument(
        "--fraction", type=float, help="share of the partition's files, as shard 1 of round(1 / F)"
    )
    selection.add_argument("--shard", help="M,N: shard M of N, as the official `shard=M,N`")
    download.add_argument("--dir", help="data folder; default: as for the adapter's data_dir=None")
    download.add_argument("--mirror", choices=MIRRORS, default="us", help="download mirror")
    download.add_argument("--version", type=int, default=2, help="data set release (default: 2)")
    download.add_argument(
        "--base-url",
        help="fetch plan, files and vocabulary from this address instead, laid "
        "out as BASE/2/download_plans/video_validate.json and so on",
    )
    download.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the server before a download fails",
    )
    download.add_argument("--no-vocabulary", action="store_true",
                          help="do not download vocabulary.csv")  # fmt: skip
    args = parser.parse_args(argv)

    try:
        shard, num_shards = _shard_arguments(args)
    except ValueError as error:
        parser.error(str(error))
    directory = resolve_data_dir(args.dir)
    if args.base_url:
        source = DownloadSource.from_base_url(args.base_url, args.split, args.version)
    else:
        source = DownloadSource.official(args.split, args.mirror, args.version)

    try:
        written = download_youtube8m(
            directory, source, shard, num_shards, not args.no_vocabulary, args.timeout
        )
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {len(written)} file(s) into {directory}.")
    return 0


def _shard_arguments(args: argparse.Namespace) -> tuple[int, int]:
    if args.shard is not None:
        match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", args.shard)
        if not match or not 1 <= int(match[1]) <= int(match[2]):
            raise ValueError(f"--shard must be M,N with 1 <= M <= N, got {args.shard!r}.")
        return int(match[1]), int(match[2])
    if args.fraction is not None:
        if not 0 < args.fraction <= 1:
            raise ValueError(f"--fraction must lie in (0, 1], got {args.fraction!r}.")
        return 1, round(1 / args.fraction)
    return 1, 1

