"""Census-Income (KDD): person records from the U.S. Current Population Surveys of 1994 and 1995.

Source: Terran Lane and Ronny Kohavi, "Census-Income (KDD)", UCI Machine Learning Repository,
https://archive.ics.uci.edu/dataset/117/census+income+kdd. The official files are
``census-income.data`` (199,523 rows) and ``census-income.test`` (99,762 rows). They have no
header and 42 fields separated by ", ", documented in ``census-income.names``.

Task groups (``task_group``), all binary:

1. ``income_over_50k`` (income label ``50000+.``) and ``never_married`` (marital status
   ``Never married``).
2. ``associate_degree_or_higher`` (education is an associate, bachelors, masters, doctorate or
   professional school degree) and ``never_married``.

Features are all other columns. The income label column is excluded in both groups, because it
is the target field that the data set was published for. Leaving it out of group 2 as well keeps
the inputs of both groups the same apart from the education column. The instance weight
(MARSUPWT) is a survey sampling weight, not an attribute of the person, so it never enters the
features. With ``use_instance_weight=True`` it becomes a per-sample loss weight instead.

Files are looked up in the first of these folders that applies:

1. ``data_dir``, when given: the files lie directly in it.
2. ``$MTL_BENCH_DATA_DIR/census-income``, when the variable is set: one data root for every
   adapter, with one subfolder per data set.
3. ``$XDG_CACHE_HOME/mtl-bench/census-income``, or ``~/.cache/mtl-bench/census-income`` when
   ``XDG_CACHE_HOME`` is unset.

Each file may be plain or gzip-compressed (``census-income.test.gz``); when both exist, the plain
file is used. Missing files are downloaded into that folder from the UCI archive unless
``download=False``.

The encoded splits are cached in ``cache_dir`` (default ``<cache root>/census-income/encoded``,
with the cache root of item 3 above), keyed by the SHA-256 of the input files and every setting
that changes the result, so a sweep parses the files once.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Sequence

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from datasets import register_dataset
from datasets.base import (
    DATA_DIR_ENV,
    SPLITS,
    MultiTaskData,
    Split,
    TaskSpec,
    config_from_params,
    config_signature,
)

logger = logging.getLogger(__name__)

CENSUS_URL = "https://archive.ics.uci.edu/static/public/117/census+income+kdd.zip"
DATA_FILE = "census-income.data"
TEST_FILE = "census-income.test"
SUBFOLDER = "census-income"

# SHA-256 of the official files, by file name.
KNOWN_SHA256: dict[str, str] = {
    # The gzip file as distributed by UCI.
    "census-income.test.gz": "5ac4cacd3ca9f1ecb10de1a0a41e4ac68fdc419e3fec190f5c0c6cc03b2ea659",
    # The content of that gzip file after decompression.
    "census-income.test": "98402b1ab879573d0a7f38a699a40258080e25e33d3401e7bf9c96d3fa0fab8c",
}
# TODO: add the sums of census-income.data and census-income.data.gz. No verified copy of the
# official training file was available when this table was written, so that file is not checked.

# The 42 fields in file order: the attribute list of census-income.names in lower case with
# underscores, the instance weight (MARSUPWT) as field 25 and the income label last.
COLUMNS: tuple[str, ...] = (
    "age",
    "class_of_worker",
    "detailed_industry_recode",
    "detailed_occupation_recode",
    "education",
    "wage_per_hour",
    "enroll_in_edu_inst_last_wk",
    "marital_stat",
    "major_industry_code",
    "major_occupation_code",
    "race",
    "hispanic_origin",
    "sex",
    "member_of_a_labor_union",
    "reason_for_unemployment",
    "full_or_part_time_employment_stat",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "tax_filer_stat",
    "region_of_previous_residence",
    "state_of_previous_residence",
    "detailed_household_and_family_stat",
    "detailed_household_summary_in_household",
    "instance_weight",
    "migration_code_change_in_msa",
    "migration_code_change_in_reg",
    "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt",
    "num_persons_worked_for_employer",
    "family_members_under_18",
    "country_of_birth_father",
    "country_of_birth_mother",
    "country_of_birth_self",
    "citizenship",
    "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits",
    "weeks_worked_in_year",
    "year",
    "income",
)
# The seven attributes that census-income.names marks as continuous. Every other feature is
# nominal, including the numeric codes such as `detailed_industry_recode` and `year`.
NUMERIC_COLUMNS: frozenset[str] = frozenset(
    {
        "age",
        "wage_per_hour",
        "capital_gains",
        "capital_losses",
        "dividends_from_stocks",
        "num_persons_worked_for_employer",
        "weeks_worked_in_year",
    }
)
WEIGHT_COLUMN = "instance_weight"
INCOME_COLUMN = "income"
MARITAL_COLUMN = "marital_stat"
EDUCATION_COLUMN = "education"

MARITAL_VALUES: frozenset[str] = frozenset(
    {
        "Never married",
        "Married-civilian spouse present",
        "Married-spouse absent",
        "Separated",
        "Divorced",
        "Widowed",
        "Married-A F spouse present",
    }
)
# An associate degree or higher, spelled as in the files.
DEGREES: frozenset[str] = frozenset(
    {
        "Associates degree-occup /vocational",
        "Associates degree-academic program",
        "Bachelors degree(BA AB BS)",
        "Masters degree(MA MS MEng MEd MSW MBA)",
        "Doctorate degree(PhD EdD)",
        "Prof school degree (MD DDS DVM LLB JD)",
    }
)
EDUCATION_VALUES: frozenset[str] = DEGREES | {
    "Children",
    "Less than 1st grade",
    "1st 2nd 3rd or 4th grade",
    "5th or 6th grade",
    "7th and 8th grade",
    "9th grade",
    "10th grade",
    "11th grade",
    "12th grade no diploma",
    "High school graduate",
    "Some college but no degree",
}


@dataclass(frozen=True)
class LabelRule:
    """Label source of one binary task: a column, its valid values and the positive ones."""

    column: str
    known_values: frozenset[str]
    positive_values: frozenset[str]


LABEL_RULES: dict[str, LabelRule] = {
    "income_over_50k": LabelRule(
        INCOME_COLUMN, frozenset({"- 50000.", "50000+."}), frozenset({"50000+."})
    ),
    "never_married": LabelRule(MARITAL_COLUMN, MARITAL_VALUES, frozenset({"Never married"})),
    "associate_degree_or_higher": LabelRule(EDUCATION_COLUMN, EDUCATION_VALUES, DEGREES),
}
TASK_GROUPS: dict[int, tuple[str, ...]] = {
    1: ("income_over_50k", "never_married"),
    2: ("associate_degree_or_higher", "never_married"),
}
SPLIT_MODES: tuple[str, ...] = ("official", "fraction")

# Bump when the cached arrays change meaning, so that old cache files are no longer matched.
CACHE_FORMAT = 1
UNKNOWN_CATEGORY = "<unknown>"


class CensusFormatError(ValueError):
    """An input file that is not valid Census-Income (KDD) data."""


class ChecksumError(ValueError):
    """An input file whose SHA-256 differs from the known sum of the official file."""


class LeakageError(ValueError):
    """A feature column that reproduces a task label on nearly every training row."""


class DownloadError(ConnectionError):
    """A download of the official archive that failed or returned an unusable file."""


@dataclass(frozen=True)
class CensusConfig:
    """Settings of the Census-Income adapter, as given in a suite's dataset section.

    Example:
        >>> CensusConfig(task_group=2, split="fraction").fractions
        (0.6, 0.2, 0.2)
    """

    task_group: int = 1  # 1 = income and never married, 2 = associate degree and never married
    split: str = "official"  # "official" trains on .data and halves .test, or "fraction"
    fractions: Sequence[float] = (0.6, 0.2, 0.2)  # train, val, test shares of all rows found
    split_seed: int | None = 0  # seed of the row permutation; None uses the trial seed
    use_instance_weight: bool = False  # MARSUPWT as loss weight, scaled to mean 1 on train
    data_dir: str | os.PathLike[str] | None = None  # None looks up the folders in the module doc
    cache_dir: str | os.PathLike[str] | None = None  # None uses the default in the module doc
    use_cache: bool = True  # read and write the encoded-data cache
    download: bool = True  # download missing files from `url`
    url: str = CENSUS_URL  # zip archive that contains the official files
    download_timeout: float = 60.0  # seconds to wait for the server before the download fails
    verify_checksums: bool = True  # compare files with KNOWN_SHA256 where a sum is known
    leakage_threshold: float | None = 0.99  # score limit of `check_leakage`, None for no check

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        if self.task_group not in TASK_GROUPS:
            raise ValueError(
                f"task_group must be one of {sorted(TASK_GROUPS)}, got {self.task_group!r}."
            )
        if self.split not in SPLIT_MODES:
            raise ValueError(f"split must be one of {list(SPLIT_MODES)}, got {self.split!r}.")

        fractions = self.fractions
        if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"fractions must be three positive shares (train, val, test) that sum to 1, "
                f"got {fractions!r}."
            )
        if self.download_timeout <= 0:
            raise ValueError(
                f"download_timeout must be > 0 seconds, got {self.download_timeout!r}."
            )
        if self.leakage_threshold is not None and not 0.5 < self.leakage_threshold <= 1.0:
            raise ValueError(
                f"leakage_threshold must lie in (0.5, 1] or be None, "
                f"got {self.leakage_threshold!r}."
            )

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASK_GROUPS[self.task_group]

    @property
    def excluded_columns(self) -> tuple[str, ...]:
        """Columns kept out of the features: label sources of the tasks, income and the weight."""
        label_columns = {LABEL_RULES[task].column for task in self.tasks}
        excluded = label_columns | {INCOME_COLUMN, WEIGHT_COLUMN}
        return tuple(column for column in COLUMNS if column in excluded)

    @property
    def feature_columns(self) -> tuple[str, ...]:
        excluded = set(self.excluded_columns)
        return tuple(column for column in COLUMNS if column not in excluded)


@dataclass(frozen=True)
class CensusData:
    """A loaded data set with the name of every feature column.

    Attributes:
        data: Tasks, splits and the facts logged with a trial.
        feature_names: One name per feature column, in order: numeric columns by name
            (``"age"``), then one-hot columns as ``"<column>=<value>"``, with the unknown bucket
            ``"<column>=<unknown>"`` last in each block.
    """

    data: MultiTaskData
    feature_names: tuple[str, ...]


@register_dataset("census")
def census(seed: int = 0, **params: Any) -> MultiTaskData:
    """Load Census-Income (KDD) for one task group.

    ``params`` are fields of :class:`CensusConfig`. ``seed`` only matters when
    ``split_seed=None``, so by default every trial uses the same split.
    """
    return load_census(make_config(params), seed=seed).data


census.__signature__ = config_signature(CensusConfig)


def make_config(params: dict[str, Any]) -> CensusConfig:
    """Build a :class:`CensusConfig` and name the valid parameters when one is unknown."""
    return config_from_params(CensusConfig, params, "census")


def load_census(config: CensusConfig | None = None, seed: int = 0) -> CensusData:
    """Locate or download the files, verify them, then read the cache or parse and encode.

    Raises:
        FileNotFoundError: If a needed file is missing and ``download`` is False.
        DownloadError: If the download fails.
        ChecksumError: If a file differs from its known SHA-256.
        CensusFormatError: If a file cannot be parsed or a split is empty.
        LeakageError: If a feature column reproduces a label (see :func:`check_leakage`).
    """
    config = config or CensusConfig()
    directory = resolve_data_dir(config.data_dir)
    paths = locate_files(directory, config)
    sums = {path.name: sha256_file(path) for path in paths.values()}
    if config.verify_checksums:
        for path in paths.values():
            verify_checksum(path, sums[path.name])

    split_seed = seed if config.split_seed is None else config.split_seed
    cache_path = None
    if config.use_cache:
        cache_dir = resolve_cache_dir(config.cache_dir)
        cache_path = cache_dir / f"census-{cache_key(config, sums, split_seed)}.npz"
        cached = read_cache(cache_path)
        if cached is not None:
            return cached.to_census_data()

    encoded = encode_census(paths, sums, config, split_seed)
    if cache_path is not None:
        encoded.save(cache_path)
        logger.info("Saved encoded Census-Income data to cache %s", cache_path)
    return encoded.to_census_data()


# Locating, downloading and verifying files.


def default_cache_root() -> Path:
    """Return ``$XDG_CACHE_HOME/mtl-bench``, or ``~/.cache/mtl-bench`` when it is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mtl-bench"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder that contains the files, following the order in the module docstring."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    root = os.environ.get(DATA_DIR_ENV)
    if root:
        return Path(root).expanduser() / SUBFOLDER
    return default_cache_root() / SUBFOLDER


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return default_cache_root() / SUBFOLDER / "encoded"


def find_file(directory: Path, name: str) -> Path | None:
    """Return ``directory/name``, else ``directory/name.gz``, else None."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate_files(directory: Path, config: CensusConfig) -> dict[str, Path]:
    """Return the files to read, keyed by official name, downloading missing ones if allowed.

    The official split needs both files. The fraction split takes whichever files exist and
    downloads only when neither does.
    """
    found = {name: find_file(directory, name) for name in (DATA_FILE, TEST_FILE)}
    missing = [name for name, path in found.items() if path is None]
    if config.split == "fraction" and len(missing) < len(found):
        missing = []

    if missing:
        partial = partial_files_hint(directory, found)
        if not config.download:
            raise FileNotFoundError(
                f"Census-Income file(s) {missing} not found in {directory} (plain or .gz), and "
                f"`download` is False. {partial}{manual_download_hint(directory, config.url)}"
            )
        try:
            download_census(directory, config.url, config.download_timeout)
        except DownloadError as error:
            if not partial:
                raise
            raise DownloadError(
                f"Census-Income file(s) {missing} not found in {directory}, and the download "
                f"failed. {partial}{error}"
            ) from error
        found = {name: find_file(directory, name) for name in found}
        missing = [name for name, path in found.items() if path is None]
        if missing and config.split == "official":
            raise FileNotFoundError(
                f"The archive from {config.url!r} did not provide {missing}, so {directory} "
                f"still lacks them. {manual_download_hint(directory, config.url)}"
            )
    return {name: path for name, path in found.items() if path is not None}


def partial_files_hint(directory: Path, found: dict[str, Path | None]) -> str:
    """Return how to train on the files present when only some are, else an empty string."""
    present = [path.name for path in found.values() if path is not None]
    if not present or len(present) == len(found):
        return ""
    return (
        f"{directory} contains only {present}. The official split needs both files. To train on "
        f"the files at hand, set `params = {{ split = \"fraction\" }}` for the census dataset in "
        f"a suite file, which splits their rows by seeded fractions (0.6, 0.2, 0.2 by default). "
    )


def manual_download_hint(directory: Path, url: str) -> str:
    return (
        f"To place the files by hand, download {url}, unpack it and the census.tar.gz inside, "
        f"and copy {DATA_FILE} and {TEST_FILE} (plain or .gz) into {directory}. Alternatively, "
        f"point `--data-dir` (or ${DATA_DIR_ENV}) at a folder whose {SUBFOLDER}/ subfolder "
        f"contains them, or set `data_dir` in the suite's dataset parameters to the folder itself."
    )


def download_census(directory: Path, url: str = CENSUS_URL, timeout: float = 60.0) -> list[Path]:
    """Download the official archive and extract the data and test files into ``directory``.

    Files already in ``directory`` are kept. Every file is written under a temporary name in
    ``directory`` and renamed once complete, so a failed download leaves no partial file behind.

    Returns:
        The files written.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(download_failure_message(url, directory, error)) from error

    logger.info("Downloading Census-Income (KDD) from %s into %s", url, directory)
    archive = fetch_to_temporary_file(url, directory, timeout)
    try:
        written = extract_census_files(archive, directory, url)
    finally:
        archive.unlink(missing_ok=True)

    logger.info("Saved %s in %s", ", ".join(path.name for path in written), directory)
    return written


def download_failure_message(url: str, directory: Path, reason: object) -> str:
    return (
        f"Downloading the Census-Income archive from {url!r} into {directory} failed: {reason}. "
        f"{manual_download_hint(directory, url)}"
    )


def fetch_to_temporary_file(url: str, directory: Path, timeout: float) -> Path:
    """Download ``url`` into a new temporary file in ``directory``, removed again on failure."""
    try:
        handle, name = tempfile.mkstemp(prefix=".census-download-", suffix=".part", dir=directory)
    except OSError as error:
        raise DownloadError(download_failure_message(url, directory, error)) from error

    path = Path(name)
    try:
        with os.fdopen(handle, "wb") as output:
            received, expected = copy_response(url, output, timeout, directory)
        if expected is not None and received != expected:
            reason = f"the connection closed after {received} of {expected} bytes"
            raise DownloadError(download_failure_message(url, directory, reason))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def copy_response(
    url: str, output: IO[bytes], timeout: float, directory: Path
) -> tuple[int, int | None]:
    """Stream ``url`` into ``output`` and return the bytes received and the announced length."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            received = 0
            with tqdm(
                total=expected, unit="B", unit_scale=True, desc="census download", disable=None
            ) as progress:
                while chunk := response.read(1 << 20):
                    output.write(chunk)
                    received += len(chunk)
                    progress.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise DownloadError(download_failure_message(url, directory, error)) from error
    return received, expected


CENSUS_MEMBER_NAMES = {DATA_FILE, f"{DATA_FILE}.gz", TEST_FILE, f"{TEST_FILE}.gz"}


def extract_census_files(archive: Path, directory: Path, url: str) -> list[Path]:
    """Copy the data and test files out of the zip archive, also looking inside tar members.

    Members are matched by base name at any depth, in the zip or in a tar file inside it. Files
    are staged under temporary names and renamed only after the whole archive passed its CRC
    checks, so a damaged download publishes nothing.
    NOTE: not yet run against the live UCI archive, which is expected to contain a
    ``census.tar.gz`` with the files. The tests use archives of both layouts.
    """
    if not zipfile.is_zipfile(archive):
        raise DownloadError(
            download_failure_message(url, directory, "the downloaded file is not a zip archive")
        )

    staged: dict[Path, Path] = {}  # final path -> temporary file
    seen: list[str] = []
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.infolist():
                seen.append(member.filename)
                base = PurePosixPath(member.filename).name
                with bundle.open(member) as source:
                    if base in CENSUS_MEMBER_NAMES:
                        stage_member(source, base, directory, staged)
                    elif base.endswith((".tar", ".tar.gz", ".tgz")):
                        stage_tar_members(source, directory, staged, seen)
                        # Reading to the end makes zipfile check the member's CRC-32.
                        while source.read(1 << 20):
                            pass

        if not any(PurePosixPath(name).name in CENSUS_MEMBER_NAMES for name in seen):
            expected = sorted(CENSUS_MEMBER_NAMES)
            reason = f"the archive contains none of {expected}. Its members are {seen}"
            raise DownloadError(download_failure_message(url, directory, reason))
        for target, temporary in staged.items():
            publish(temporary, target)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as error:
        reason = f"the downloaded archive is damaged ({error})"
        raise DownloadError(download_failure_message(url, directory, reason)) from error
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)  # published files no longer have this name
    return list(staged)


def stage_tar_members(
    source: IO[bytes], directory: Path, staged: dict[Path, Path], seen: list[str]
) -> None:
    """Stage the census files of a tar stream and append every member name to ``seen``."""
    with tarfile.open(fileobj=source, mode="r|*") as bundle:
        for member in bundle:
            seen.append(member.name)
            base = PurePosixPath(member.name).name
            content = bundle.extractfile(member) if member.isfile() else None
            if base in CENSUS_MEMBER_NAMES and content is not None:
                stage_member(content, base, directory, staged)


def stage_member(source: IO[bytes], name: str, directory: Path, staged: dict[Path, Path]) -> None:
    """Copy ``source`` to a temporary file in ``directory``, to be published as ``name``.

    Skipped when ``directory`` already has that file, plain or compressed, or when another
    member with the same content (``name`` with or without ``.gz``) is already staged.
    """
    stem = name.removesuffix(".gz")
    if find_file(directory, stem) is not None:
        return
    if any(target.name.removesuffix(".gz") == stem for target in staged):
        return

    handle, temporary = tempfile.mkstemp(prefix=f".{name}-", suffix=".part", dir=directory)
    staged[directory / name] = Path(temporary)
    with os.fdopen(handle, "wb") as output:
        while chunk := source.read(1 << 20):
            output.write(chunk)


def publish(temporary: str | Path, target: Path) -> None:
    """Rename a finished temporary file to ``target`` in one atomic step.

    ``tempfile.mkstemp`` creates files readable by their owner only, so the file first gets the
    permissions of an ordinary new file (0644) for other users sharing the folder.
    """
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_unverified_names: set[str] = set()


def verify_checksum(path: Path, digest: str) -> None:
    """Raise :class:`ChecksumError` if ``digest`` differs from the known sum for ``path.name``.

    A ``.gz`` file compressed by someone else differs byte for byte from the official one, so it
    also passes when its decompressed content matches the known sum of the plain file.
    """
    expected = KNOWN_SHA256.get(path.name)
    if expected is None:
        if path.name not in _unverified_names:
            _unverified_names.add(path.name)
            logger.warning("No known SHA-256 for %s, so %s is not verified.", path.name, path)
        return
    if digest == expected:
        return

    plain_expected = KNOWN_SHA256.get(path.name.removesuffix(".gz"))
    if path.name.endswith(".gz") and plain_expected is not None:
        if decompressed_sha256(path) == plain_expected:
            return
    raise ChecksumError(
        f"SHA-256 of {path} is {digest}, expected {expected}. The file is damaged or not the "
        f"official release: delete it so that it is downloaded again, or pass "
        f"`verify_checksums=False` to use it anyway."
    )


def decompressed_sha256(path: Path) -> str | None:
    """Return the SHA-256 of the decompressed content, or None if the gzip stream is damaged."""
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return digest.hexdigest()


# Parsing.

FIELD_COUNT = len(COLUMNS)


def read_census_file(path: Path) -> pl.DataFrame:
    """Parse one official file into a frame of whitespace-stripped strings named by COLUMNS.

    Raises:
        CensusFormatError: If the gzip stream is damaged, the file has no rows or a line does
            not hold exactly 42 fields.
    """
    raw = read_bytes(path).rstrip()
    if not raw:
        raise CensusFormatError(
            f"{path} contains no rows. Replace it with the official file, or delete it so that "
            f"it is downloaded again."
        )
    check_field_counts(raw, path)

    frame = pl.read_csv(
        raw,
        has_header=False,
        new_columns=list(COLUMNS),
        infer_schema=False,  # every column as a string; numbers are cast after validation
        quote_char=None,
        encoding="utf8-lossy",
    )
    return frame.with_columns(pl.all().str.strip_chars().fill_null(""))


def read_bytes(path: Path) -> bytes:
    """Return the file's content, decompressed when it starts with the gzip magic number."""
    with open(path, "rb") as file:
        content = file.read()
    if not content.startswith(b"\x1f\x8b"):
        return content
    try:
        return gzip.decompress(content)
    except (EOFError, OSError, zlib.error) as error:
        raise CensusFormatError(
            f"{path} is a damaged or truncated gzip file ({error}). Delete it so that it is "
            f"downloaded again, or copy it again from the source."
        ) from error


def check_field_counts(raw: bytes, path: Path) -> None:
    """Raise with the first line number whose field count is not 42, counting commas with numpy."""
    data = np.frombuffer(raw, dtype=np.uint8)
    line_ends = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate(([0], line_ends + 1))
    # Each segment runs from a line start to the next one, so it is never empty.
    fields = np.add.reduceat(data == ord(","), starts, dtype=np.int64) + 1

    wrong = np.flatnonzero(fields != FIELD_COUNT)
    if wrong.size:
        line = int(wrong[0])
        raise CensusFormatError(
            f"{path}, line {line + 1}: found {fields[line]} field(s), expected {FIELD_COUNT} "
            f"separated by ', '. {wrong.size} line(s) have the wrong count. The file is damaged "
            f"or not Census-Income (KDD) data: replace it with the official file."
        )


def first_line(mask: pl.Series) -> int:
    """Return the 1-based line number of the first True row (rows start at line 1)."""
    return int(mask.arg_max()) + 1


def extract_labels(frame: pl.DataFrame, tasks: Sequence[str], path: Path) -> np.ndarray:
    """Return the (N, T) float32 labels, raising on a value outside a label's known set."""
    labels = np.empty((frame.height, len(tasks)), dtype=np.float32)
    for index, task in enumerate(tasks):
        rule = LABEL_RULES[task]
        column = frame.get_column(rule.column)
        unknown = ~column.is_in(list(rule.known_values))
        if unknown.any():
            line = first_line(unknown)
            raise CensusFormatError(
                f"{path}, line {line}: invalid value {column[line - 1]!r} in column "
                f"`{rule.column}`, the label source of task `{task}`; expected one of "
                f"{sorted(rule.known_values)}. Replace the file with the official one."
            )
        labels[:, index] = column.is_in(list(rule.positive_values)).to_numpy()
    return labels


def parse_numbers(frame: pl.DataFrame, column: str, path: Path) -> np.ndarray:
    """Return ``column`` as float64, raising with the line of the first value that is no number."""
    values = frame.get_column(column).cast(pl.Float64, strict=False)
    invalid = values.is_null() | values.is_nan() | values.is_infinite()
    if invalid.any():
        line = first_line(invalid)
        raise CensusFormatError(
            f"{path}, line {line}: invalid number {frame.get_column(column)[line - 1]!r} in "
            f"column `{column}`. Replace the file with the official one."
        )
    return values.to_numpy()


@dataclass(frozen=True)
class ParsedRows:
    """Validated rows of one or more files.

    Attributes:
        features: The feature columns as strings, N rows.
        labels: (N, T) float32 labels in task order.
        weights: (N,) float64 instance weights (MARSUPWT).
        source_rows: Row count of each file, in order.
    """

    features: pl.DataFrame
    labels: np.ndarray
    weights: np.ndarray
    source_rows: tuple[int, ...]


def parse_files(paths: Sequence[Path], config: CensusConfig) -> ParsedRows:
    """Read and validate every file, then stack the rows in the order of ``paths``."""
    features, labels, weights = [], [], []
    for path in paths:
        frame = read_census_file(path)
        labels.append(extract_labels(frame, config.tasks, path))
        weights.append(parse_numbers(frame, WEIGHT_COLUMN, path))
        for column in config.feature_columns:
            if column in NUMERIC_COLUMNS:
                parse_numbers(frame, column, path)
        features.append(frame.select(config.feature_columns))

    return ParsedRows(
        features=pl.concat(features, how="vertical"),
        labels=np.concatenate(labels),
        weights=np.concatenate(weights),
        source_rows=tuple(frame.height for frame in features),
    )


# Splitting.


def split_indices(
    source_rows: Sequence[int], names: Sequence[str], config: CensusConfig, seed: int
) -> dict[str, np.ndarray]:
    """Return sorted row indices per split into the stacked rows of all files.

    ``"official"``: every row of the data file trains, and a seeded permutation of the test file
    gives half of its rows (rounded down) to validation and the rest to test. ``"fraction"``:
    a seeded permutation of all rows gives ``floor(N * val)`` rows to validation,
    ``floor(N * test)`` to test and the rest to training.
    """
    rng = np.random.default_rng(seed)
    if config.split == "official":
        n_train, n_test = source_rows
        order = n_train + rng.permutation(n_test)
        n_val = n_test // 2
        indices = {"train": np.arange(n_train), "val": order[:n_val], "test": order[n_val:]}
        detail = f"{TEST_FILE} has {n_test} row(s), too few to halve into validation and test"
        fix = "Use the complete official test file."
    else:
        total = sum(source_rows)
        order = rng.permutation(total)
        n_val = int(np.floor(total * config.fractions[1]))
        n_test = int(np.floor(total * config.fractions[2]))
        n_train = total - n_val - n_test
        bounds = np.cumsum([n_train, n_val])
        indices = dict(zip(SPLITS, np.split(order, bounds)))
        detail = f"{total} row(s) from {list(names)} with fractions {config.fractions}"
        fix = "Use more rows or larger fractions."

    for name, rows in indices.items():
        if rows.size == 0:
            raise CensusFormatError(f"Split {name!r} is empty: {detail}. {fix}")
    return {name: np.sort(rows) for name, rows in indices.items()}


def hash_indices(indices: dict[str, np.ndarray]) -> str:
    """Return the first 16 hex digits of a SHA-256 over the row indices of every split."""
    digest = hashlib.sha256()
    for name in SPLITS:
        digest.update(name.encode())
        digest.update(indices[name].astype("<i8").tobytes())
    return digest.hexdigest()[:16]


# Encoding.


@dataclass(frozen=True)
class FeatureEncoder:
    """Encoding fitted on training rows only and applied unchanged to every split.

    Numeric columns are standardised with the training mean and population standard deviation
    (a constant column divides by 1). Categorical columns become indices into their sorted
    training values, and a value unseen in training gets the extra last index, the unknown bucket.
    """

    numeric_columns: tuple[str, ...]
    means: np.ndarray  # (Fn,) float64
    stds: np.ndarray  # (Fn,) float64
    categories: dict[str, tuple[str, ...]]  # sorted training values per categorical column

    @classmethod
    def fit(cls, train: pl.DataFrame) -> FeatureEncoder:
        numeric_columns = tuple(c for c in train.columns if c in NUMERIC_COLUMNS)
        values = numeric_matrix(train, numeric_columns)
        stds = values.std(axis=0)
        stds[stds == 0] = 1.0

        categories = {
            column: tuple(train.get_column(column).unique().sort().to_list())
            for column in train.columns
            if column not in NUMERIC_COLUMNS
        }
        return cls(numeric_columns, values.mean(axis=0), stds, categories)

    @property
    def category_sizes(self) -> np.ndarray:
        """Width of each one-hot block: the training values plus the unknown bucket."""
        return np.array([len(values) + 1 for values in self.categories.values()], dtype=np.int64)

    @property
    def feature_names(self) -> tuple[str, ...]:
        names = list(self.numeric_columns)
        for column, values in self.categories.items():
            names += [f"{column}={value}" for value in values]
            names.append(f"{column}={UNKNOWN_CATEGORY}")
        return tuple(names)

    def transform(self, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """Return standardised numbers (N, Fn) float32, codes (N, Fc) int16 and unseen counts."""
        numeric = (numeric_matrix(frame, self.numeric_columns) - self.means) / self.stds

        expressions = [
            pl.col(column).replace_strict(
                list(values), list(range(len(values))), default=len(values), return_dtype=pl.Int16
            )
            for column, values in self.categories.items()
        ]
        codes = frame.select(expressions).to_numpy().reshape(frame.height, len(self.categories))
        unknown_codes = self.category_sizes - 1
        unseen = dict(zip(self.categories, (codes == unknown_codes).sum(axis=0).tolist()))
        return numeric.astype(np.float32), codes, unseen


def numeric_matrix(frame: pl.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """Return ``columns`` of a string frame as an (N, len(columns)) float64 matrix."""
    if not columns:
        return np.zeros((frame.height, 0))
    matrix = frame.select(pl.col(list(columns)).cast(pl.Float64)).to_numpy()
    return matrix.reshape(frame.height, len(columns))


def expand_one_hot(numeric: np.ndarray, codes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Return the (N, F) float32 features: the numbers, then one one-hot block per code column."""
    n, n_numeric = numeric.shape
    offsets = n_numeric + np.concatenate(([0], np.cumsum(sizes)[:-1]))  # (Fc,)
    features = np.zeros((n, n_numeric + int(sizes.sum())), dtype=np.float32)
    features[:, :n_numeric] = numeric
    features[np.arange(n)[:, None], offsets + codes] = 1.0  # (N, Fc) positions set to 1
    return features


# Leakage guard.


def check_leakage(
    columns: dict[str, np.ndarray], labels: np.ndarray, tasks: Sequence[str], threshold: float
) -> float:
    """Raise :class:`LeakageError` if a feature column predicts a task label almost perfectly.

    A column's score is the held-out balanced accuracy of a table from its values to the majority
    label: the table learnt on even rows predicts the odd rows and the other way round, and a
    value missing from the other half counts as a miss. A copy or one-to-one recoding of a label
    scores 1.0, while a column with a distinct value per row scores 0. On the official test file
    the highest score of a kept column is 0.92 (`detailed_household_and_family_stat` for
    `never_married`).

    Args:
        columns: Integer codes (N,) per feature column, one code per distinct value.
        labels: (N, T) binary labels.

    Returns:
        The highest score over all columns and tasks.
    """
    best = 0.0
    for index, task in enumerate(tasks):
        for column, codes in columns.items():
            score = held_out_balanced_accuracy(codes, labels[:, index])
            if score >= threshold:
                raise LeakageError(
                    f"Feature column `{column}` predicts the label of task `{task}` with a "
                    f"held-out balanced accuracy of {score:.4f} on the training split (threshold "
                    f"{threshold}), so it leaks the label. Check that the input files are the "
                    f"official ones, or pass `leakage_threshold=None` to turn this check off."
                )
            best = max(best, score)
    return best


def held_out_balanced_accuracy(codes: np.ndarray, labels: np.ndarray) -> float:
    """Score non-negative integer ``codes`` (N,) against binary ``labels`` (N,), as above."""
    labels = labels.astype(np.int64)
    codes = codes.astype(np.int64)
    n_values = int(codes.max()) + 1
    half = np.arange(codes.size) % 2

    # counts[h, v, y]: rows of half h with value v and label y.
    counts = np.bincount((half * n_values + codes) * 2 + labels, minlength=4 * n_values)
    counts = counts.reshape(2, n_values, 2)
    predicted = (counts[:, :, 1] > counts[:, :, 0]).astype(np.int64)  # ties go to label 0
    seen = counts.sum(axis=2) > 0

    # Each row is scored by the table of the other half.
    other = 1 - half
    correct = seen[other, codes] & (predicted[other, codes] == labels)
    recalls = [correct[labels == value].mean() for value in np.unique(labels)]
    return float(np.mean(recalls))


def leakage_codes(
    encoder: FeatureEncoder, numeric: np.ndarray, codes: np.ndarray, columns: Sequence[str]
) -> dict[str, np.ndarray]:
    """Return integer codes per feature column, in ``columns`` order, from encoded rows.

    Standardising maps distinct numbers to distinct numbers, so the codes of a numeric column
    can come from its standardised values.
    """
    by_column = {}
    for index, column in enumerate(encoder.numeric_columns):
        by_column[column] = np.unique(numeric[:, index], return_inverse=True)[1].ravel()
    for index, column in enumerate(encoder.categories):
        by_column[column] = codes[:, index]
    return {column: by_column[column] for column in columns}


# Assembly and cache.


@dataclass(frozen=True)
class EncodedSplit:
    """One split in the compact form that is cached: codes instead of one-hot columns."""

    numeric: np.ndarray  # (N, Fn) float32, standardised
    codes: np.ndarray  # (N, Fc) int16, category index per categorical column
    labels: np.ndarray  # (N, T) float32
    weights: np.ndarray | None  # (N,) float32, or None without instance weights


@dataclass(frozen=True)
class EncodedCensus:
    """Encoded splits with everything needed to rebuild the dense features and the info."""

    tasks: tuple[str, ...]
    splits: dict[str, EncodedSplit]
    feature_names: tuple[str, ...]
    category_sizes: np.ndarray  # (Fc,) one-hot block widths
    info: dict[str, Any]

    def to_census_data(self) -> CensusData:
        splits = {}
        for name, split in self.splits.items():
            features = expand_one_hot(split.numeric, split.codes, self.category_sizes)
            targets = tuple(
                torch.from_numpy(split.labels[:, [index]].copy())  # (N, 1) per task
                for index in range(len(self.tasks))
            )
            weights = None if split.weights is None else torch.from_numpy(split.weights)
            splits[name] = Split(torch.from_numpy(features), targets, weights)

        tasks = tuple(TaskSpec(task, "binary") for task in self.tasks)
        return CensusData(MultiTaskData(tasks, splits, dict(self.info)), self.feature_names)

    def save(self, path: Path) -> None:
        """Write an .npz file through a temporary file in the same folder and an atomic rename."""
        arrays: dict[str, np.ndarray] = {
            "tasks": np.array(self.tasks),
            "feature_names": np.array(self.feature_names),
            "category_sizes": self.category_sizes,
            "info": np.array(json.dumps(self.info)),
        }
        for name, split in self.splits.items():
            arrays[f"{name}_numeric"] = split.numeric
            arrays[f"{name}_codes"] = split.codes
            arrays[f"{name}_labels"] = split.labels
            if split.weights is not None:
                arrays[f"{name}_weights"] = split.weights

        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent
        )
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **arrays)
                file.flush()
                os.fsync(file.fileno())
            publish(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> EncodedCensus:
        with np.load(path, allow_pickle=False) as arrays:
            splits = {
                name: EncodedSplit(
                    numeric=arrays[f"{name}_numeric"],
                    codes=arrays[f"{name}_codes"],
                    labels=arrays[f"{name}_labels"],
                    weights=arrays[f"{name}_weights"] if f"{name}_weights" in arrays else None,
                )
                for name in SPLITS
            }
            return cls(
                tasks=tuple(arrays["tasks"].tolist()),
                splits=splits,
                feature_names=tuple(arrays["feature_names"].tolist()),
                category_sizes=arrays["category_sizes"],
                info=json.loads(str(arrays["info"])),
            )


def read_cache(path: Path) -> EncodedCensus | None:
    """Return the cached encoding at ``path``, or None if the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        encoded = EncodedCensus.load(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        logger.warning("Encoding again because cache file %s is unreadable: %s", path, error)
        return None
    logger.info("Loaded encoded Census-Income data from cache %s", path)
    return encoded


def cache_key(config: CensusConfig, sums: dict[str, str], split_seed: int) -> str:
    """Return a hash of the input files and of every setting that changes the encoded data."""
    settings = {
        "format": CACHE_FORMAT,
        "files": sums,
        "task_group": config.task_group,
        "split": config.split,
        "fractions": config.fractions if config.split == "fraction" else None,
        "split_seed": split_seed,
        "use_instance_weight": config.use_instance_weight,
        "leakage_threshold": config.leakage_threshold,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def encode_census(
    paths: dict[str, Path], sums: dict[str, str], config: CensusConfig, split_seed: int
) -> EncodedCensus:
    """Parse, split, encode and check for leakage, with the encoder fitted on training rows."""
    parsed = parse_files(list(paths.values()), config)
    indices = split_indices(parsed.source_rows, list(paths), config, split_seed)
    frames = {name: parsed.features[rows] for name, rows in indices.items()}

    encoder = FeatureEncoder.fit(frames["train"])
    weights = scaled_weights(parsed.weights, indices) if config.use_instance_weight else None
    splits, unseen = {}, dict.fromkeys(encoder.categories, 0)
    for name, rows in indices.items():
        numeric, codes, split_unseen = encoder.transform(frames[name])
        for column, count in split_unseen.items():
            unseen[column] += count
        split_weights = None if weights is None else weights[rows]
        splits[name] = EncodedSplit(numeric, codes, parsed.labels[rows], split_weights)

    max_score = None
    if config.leakage_threshold is not None:
        train = splits["train"]
        columns = leakage_codes(encoder, train.numeric, train.codes, config.feature_columns)
        max_score = check_leakage(columns, train.labels, config.tasks, config.leakage_threshold)

    info = describe(config, sums, split_seed, indices, parsed.labels, unseen, max_score)
    return EncodedCensus(config.tasks, splits, encoder.feature_names, encoder.category_sizes, info)


def scaled_weights(weights: np.ndarray, indices: dict[str, np.ndarray]) -> np.ndarray:
    """Return the instance weights divided by their training mean, as float32."""
    mean = float(weights[indices["train"]].mean())
    if not mean > 0:
        raise CensusFormatError(
            f"The instance weights of the training split have mean {mean!r}, but loss weights "
            f"need a mean > 0. Pass `use_instance_weight=False`."
        )
    return (weights / mean).astype(np.float32)


def describe(
    config: CensusConfig,
    sums: dict[str, str],
    split_seed: int,
    indices: dict[str, np.ndarray],
    labels: np.ndarray,
    unseen: dict[str, int],
    max_score: float | None,
) -> dict[str, Any]:
    """Collect the facts logged with every trial: files, split, label rates and unseen values."""
    info: dict[str, Any] = {
        "task_group": config.task_group,
        "split": config.split,
        "split_seed": split_seed,
        "split_sha256": hash_indices(indices),
        "excluded_columns": ",".join(config.excluded_columns),
        "unseen_total": sum(unseen.values()),
    }
    for name, digest in sums.items():
        stem = name.removeprefix("census-income.").removesuffix(".gz")
        info[f"census_{stem}_sha256"] = digest
    for name, rows in indices.items():
        info[f"{name}_rows"] = int(rows.size)

    train_labels = labels[indices["train"]]
    for index, task in enumerate(config.tasks):
        info[f"train_positive_rate_{task}"] = float(train_labels[:, index].mean())
    # Only columns with unseen values get a key, so the keys stay few.
    for column, count in unseen.items():
        if count:
            info[f"unseen_{column}"] = count
    if max_score is not None:
        info["leakage_max_score"] = max_score
    return info
