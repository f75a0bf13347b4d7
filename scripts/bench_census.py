"""Time and memory of the Census-Income adapter against pandas with scikit-learn encoders.

Every variant runs in a fresh Python process, so that its peak resident set size (RSS, read from
``getrusage``) covers the Rust allocations of polars as well as Python's. Each variant turns
``census-income.test`` into dense float32 train, validation and test matrices with a 0.6/0.2/0.2
split and the task-group-1 feature set:

- ``adapter``: ``datasets.census.load_census`` without its cache. It also checks the SHA-256,
  the field count of every line, the label values and the numbers, and runs the leakage guard.
- ``adapter, no leakage guard``: the same with ``leakage_threshold=None``.
- ``adapter, cached``: a later load that reads the encoded splits from the cache.
- ``pandas + scikit-learn``: ``pandas.read_csv``, ``OneHotEncoder(handle_unknown="ignore")`` and
  ``StandardScaler`` fitted on the training rows, with no validation.

Usage:
    python scripts/bench_census.py --data-dir DATA_DIR

The result is printed as a markdown table and written to the section "Census-Income parsing and
encoding" of docs/benchmarks.md; the rest of that file is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench_support import machine_description, peak_rss_mib, write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = "Census-Income parsing and encoding"
CENSUS_PACKAGES = ("polars", "numpy", "torch", "pandas", "scikit-learn")
VARIANTS = {
    "adapter": "adapter",
    "adapter_no_guard": "adapter, no leakage guard",
    "adapter_cached": "adapter, cached",
    "pandas": "pandas + scikit-learn",
}
BASELINE = "pandas"
FRACTIONS = (0.6, 0.2, 0.2)

# Field positions (0-based) in a census-income line, from census-income.names. Hard-coded so that
# the pandas process does not import the adapter and its libraries.
NUMERIC_POSITIONS = [0, 5, 16, 17, 18, 30, 39]  # the seven continuous attributes
EXCLUDED_POSITIONS = [7, 24, 41]  # marital status and income (labels), instance weight
FIELD_COUNT = 42


def main() -> None:
    args = parse_arguments()
    if args.child:
        print(json.dumps(run_child(args.child, Path(args.data_dir), Path(args.cache_dir))))
        return

    test_file = find_test_file(Path(args.data_dir))
    with tempfile.TemporaryDirectory(prefix="bench-census-") as scratch:
        # A folder that contains only the test file, so the fraction split reads just that file.
        data_dir = Path(scratch) / "data"
        data_dir.mkdir()
        (data_dir / test_file.name).symlink_to(test_file.resolve())
        cache_dir = Path(scratch) / "cache"

        results = {}
        for variant in VARIANTS:
            if variant == "adapter_cached":
                run_in_subprocess(variant, data_dir, cache_dir)  # writes the cache
            runs = [run_in_subprocess(variant, data_dir, cache_dir) for _ in range(args.repeats)]
            results[variant] = summarise(runs)
            print(f"{VARIANTS[variant]}: {results[variant]}", file=sys.stderr)

    table = format_table(results, args.repeats)
    print(table)
    if not args.no_docs:
        write_section(Path(args.docs), SECTION_TITLE, document(table, test_file, results, args))
        print(f"Wrote the section {SECTION_TITLE!r} of {args.docs}", file=sys.stderr)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", required=True, help="folder that contains census-income.test or .test.gz"
    )
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per variant")
    parser.add_argument(
        "--docs", default=str(REPO_ROOT / "docs" / "benchmarks.md"), help="markdown file to update"
    )
    parser.add_argument("--no-docs", action="store_true", help="only print the table")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    return parser.parse_args()


def find_test_file(data_dir: Path) -> Path:
    for name in ("census-income.test", "census-income.test.gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    sys.exit(f"error: neither census-income.test nor census-income.test.gz is in {data_dir}")


def run_in_subprocess(variant: str, data_dir: Path, cache_dir: Path) -> dict[str, float]:
    command = [
        sys.executable, __file__, "--child", variant,
        "--data-dir", str(data_dir), "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if completed.returncode != 0:
        sys.exit(f"error: variant {variant!r} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "seconds": statistics.median(run["seconds"] for run in runs),
        "peak_mib": max(run["peak_mib"] for run in runs),
        "imports_mib": max(run["imports_mib"] for run in runs),
        "features": runs[0]["features"],
        "rows": runs[0]["rows"],
    }


def run_child(variant: str, data_dir: Path, cache_dir: Path) -> dict[str, float]:
    """Import the libraries of one variant, then time its work. Runs in the child process."""
    if variant == BASELINE:
        work = pandas_work(data_dir)
    else:
        work = adapter_work(variant, data_dir, cache_dir)
    imports_mib = peak_rss_mib()

    start = time.perf_counter()
    rows, features = work()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mib": peak_rss_mib(),
        "imports_mib": imports_mib,
        "rows": rows,
        "features": features,
    }


def adapter_work(variant: str, data_dir: Path, cache_dir: Path):
    from datasets.census import CensusConfig, load_census

    config = CensusConfig(
        data_dir=data_dir,
        cache_dir=cache_dir,
        split="fraction",
        fractions=FRACTIONS,
        download=False,
        use_cache=variant == "adapter_cached",
        leakage_threshold=None if variant == "adapter_no_guard" else 0.99,
    )

    def work() -> tuple[int, int]:
        data = load_census(config).data
        return sum(len(split) for split in data.splits.values()), data.input_dim

    return work


def pandas_work(data_dir: Path):
    import numpy as np
    import pandas as pd
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    path = find_test_file(data_dir)
    categorical = [
        i for i in range(FIELD_COUNT) if i not in NUMERIC_POSITIONS + EXCLUDED_POSITIONS
    ]

    def work() -> tuple[int, int]:
        dtypes = {i: (float if i in NUMERIC_POSITIONS else str) for i in range(FIELD_COUNT)}
        frame = pd.read_csv(path, header=None, skipinitialspace=True, dtype=dtypes)
        order = np.random.default_rng(0).permutation(len(frame))
        n_val, n_test = (int(len(frame) * share) for share in FRACTIONS[1:])
        n_train = len(frame) - n_val - n_test
        splits = np.split(order, [n_train, n_train + n_val])

        train = frame.iloc[splits[0]]
        encoder = OneHotEncoder(handle_unknown="ignore", sparse_output=False, dtype=np.float32)
        scaler = StandardScaler()
        encoder.fit(train[categorical])
        scaler.fit(train[NUMERIC_POSITIONS])

        matrices = []
        for rows in splits:
            part = frame.iloc[rows]
            numeric = scaler.transform(part[NUMERIC_POSITIONS]).astype(np.float32)
            matrices.append(np.hstack([numeric, encoder.transform(part[categorical])]))
        return len(frame), matrices[0].shape[1]

    return work


def format_table(results: dict[str, dict[str, float]], repeats: int) -> str:
    baseline = results[BASELINE]
    lines = [
        f"| Variant | Time (s, median of {repeats}) | Peak RSS (MiB) | RSS after imports (MiB) "
        f"| Time vs pandas | Peak RSS vs pandas |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, result in results.items():
        lines.append(
            f"| {VARIANTS[variant]} | {result['seconds']:.3f} | {result['peak_mib']:.0f} "
            f"| {result['imports_mib']:.0f} | {result['seconds'] / baseline['seconds']:.2f} "
            f"| {result['peak_mib'] / baseline['peak_mib']:.2f} |"
        )
    return "\n".join(lines)


def document(
    table: str, test_file: Path, results: dict[str, dict[str, float]], args: argparse.Namespace
) -> str:
    command = " ".join(["python", "scripts/bench_census.py", *map(shlex.quote, sys.argv[1:])])
    features = int(results["adapter"]["features"])
    baseline_features = int(results[BASELINE]["features"])
    rows = int(results["adapter"]["rows"])
    summary = (
        f"Input: `{test_file.name}`, {rows:,} rows. Each variant turns it into dense float32 "
        f"train, validation and test matrices (0.6/0.2/0.2 split, features of task group 1): "
        f"{features} columns from the adapter, {baseline_features} from scikit-learn, which adds "
        f"no unknown buckets. Each variant ran {args.repeats} times, each time in a fresh "
        f"process. Times are medians and cover the work after the imports. Peak RSS is the "
        f"maximum over the runs and includes the imports. polars parses on all cores, while the "
        f"C parser of pandas and the scikit-learn encoders run on one."
    )
    return f"""## {SECTION_TITLE}

{textwrap.fill(summary, width=100)}

- adapter: `load_census` without cache, including the SHA-256 check, the field-count, label
  and number checks, and the leakage guard.
- adapter, no leakage guard: the same with `leakage_threshold=None`.
- adapter, cached: a later load from the encoded-data cache, expanded to dense features.
- pandas + scikit-learn: `read_csv`, `OneHotEncoder(handle_unknown="ignore")` and
  `StandardScaler`, with no checks.

Command: `{command}`

Machine: {machine_description(CENSUS_PACKAGES)}

{table}
"""


if __name__ == "__main__":
    main()
