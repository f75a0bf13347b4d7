"""Read speed and memory of the YouTube-8M TFRecord reader against the PyPI `tfrecord` package.

Each variant reads every record of the first ``--shards`` video-level shards of ``DATA_DIR`` once,
in a fresh Python process, so that its peak resident set size (RSS, from ``getrusage``) is its
own:

- ``records``: ``datasets.tfrecord.read_records`` and ``parse_example`` of all four features,
  one shard after the other, with CRC checks. It does the same work as the package's reader.
- ``loader``: ``TFRecordSplit.loader`` of the adapter in one process: shard order and a buffer
  of 4,096 records shuffled, each record checked, and batches of 256 with the features and the
  multi-hot targets of three multi-label tasks built.
- ``loader, 2 workers``: the same with two DataLoader worker processes.
- ``tfrecord package``: ``tfrecord.reader.tfrecord_loader`` of the `tfrecord` package, one shard
  after the other, decoding all features to numpy arrays. It does not check CRCs.
- ``loader, 10 shards``: the ``loader`` variant on a tenth of the shards, to show that memory
  does not grow with the number of shards.

Usage:
    python scripts/bench_youtube8m.py --data-dir DATA_DIR

``DATA_DIR`` contains ``vocabulary.csv`` and ``video_level/*.tfrecord``. The result is printed as
a markdown table and written to the section "YouTube-8M reader" of docs/benchmarks.md; the rest
of that file is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bench_support import machine_description, peak_rss_mib, write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = "YouTube-8M reader"
SHARD_PATTERN = "video_level/*.tfrecord"
BATCH_SIZE = 256
# Variant key: (label, worker processes, share of the shards read).
VARIANTS: dict[str, tuple[str, int, float]] = {
    "records": ("our reader: read_records + parse_example", 0, 1.0),
    "loader": ("our loader, 1 process", 0, 1.0),
    "loader_2_workers": ("our loader, 2 workers", 2, 1.0),
    "tfrecord": ("tfrecord package", 0, 1.0),
    "loader_tenth": ("our loader, 1 process", 0, 0.1),
}
BASELINE = "tfrecord"


def main() -> None:
    args = parse_arguments()
    data_dir = Path(args.data_dir)
    shards = sorted(data_dir.glob(SHARD_PATTERN))[: args.shards]
    if not shards:
        sys.exit(f"error: no files match {SHARD_PATTERN!r} in {data_dir}")
    if args.child:
        print(json.dumps(run_child(args.child, data_dir, shards)))
        return

    # Variants alternate within each repeat, so a slow drift in the load of a shared machine
    # affects them alike.
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS:
            runs[variant].append(run_in_subprocess(variant, data_dir, len(shards)))
            print(f"repeat {repeat + 1}, {variant}: {runs[variant][-1]}", file=sys.stderr)

    results = {variant: summarise(variant_runs) for variant, variant_runs in runs.items()}
    table = format_table(results, args.repeats)
    print(table)
    if not args.no_docs:
        record_bytes = sum(shard.stat().st_size for shard in shards) / results["records"]["records"]
        section = document(table, results, load_before, record_bytes / 1000, args)
        write_section(Path(args.docs), SECTION_TITLE, section)
        print(f"Wrote the section {SECTION_TITLE!r} of {args.docs}", file=sys.stderr)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", required=True, help="folder with vocabulary.csv and video_level/*.tfrecord"
    )
    parser.add_argument("--shards", type=int, default=100, help="shards read, first by name")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per variant")
    parser.add_argument(
        "--docs", default=str(REPO_ROOT / "docs" / "benchmarks.md"), help="markdown file to update"
    )
    parser.add_argument("--no-docs", action="store_true", help="only print the table")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    return parser.parse_args()


def run_in_subprocess(variant: str, data_dir: Path, shards: int) -> dict[str, float]:
    command = [
        sys.executable, __file__, "--child", variant, "--data-dir", str(data_dir),
        "--shards", str(shards),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=False
    )
    if completed.returncode != 0:
        sys.exit(f"error: variant {variant!r} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_child(variant: str, data_dir: Path, shards: list[Path]) -> dict[str, float]:
    """Import and set up one variant, then time one pass over its shards. Runs in the child."""
    _, workers, share = VARIANTS[variant]
    shards = shards[: max(1, round(len(shards) * share))]
    if variant == "records":
        work = records_work(shards)
    elif variant == "tfrecord":
        work = package_work(shards)
    else:
        work = loader_work(data_dir, shards, workers)
    setup_mib = peak_rss_mib()

    start = time.perf_counter()
    records = work()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "records": records,
        "shards": len(shards),
        "peak_mib": peak_rss_mib(),
        "worker_peak_mib": peak_rss_mib(children=True) if workers else 0.0,
        "setup_mib": setup_mib,
    }


def records_work(shards: list[Path]):
    from datasets.tfrecord import parse_example, read_records

    def work() -> int:
        count = 0
        for shard in shards:
            for record in read_records(shard):
                parse_example(record)
                count += 1
        return count

    return work


def package_work(shards: list[Path]):
    from tfrecord.reader import tfrecord_loader

    def work() -> int:
        count = 0
        for shard in shards:
            for _ in tfrecord_loader(str(shard), None):
                count += 1
        return count

    return work


def loader_work(data_dir: Path, shards: list[Path], workers: int):
    from datasets.tfrecord import count_records
    from datasets.youtube8m import (
        LabelMap,
        RecordDecoder,
        TFRecordSplit,
        YouTube8MConfig,
        choose_verticals,
        load_vocabulary,
    )

    vocabulary = load_vocabulary(data_dir / "vocabulary.csv")
    config = YouTube8MConfig()
    label_map = LabelMap.build(vocabulary, choose_verticals(vocabulary, config), config.task_kind)
    counts = [count_records(shard) for shard in shards]
    split = TFRecordSplit(shards, counts, RecordDecoder(len(vocabulary)), label_map)
    loader = split.loader(BATCH_SIZE, shuffle=True, seed=0, num_workers=workers)

    def work() -> int:
        return sum(features.shape[0] for features, _, _ in loader)

    return work


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    seconds = statistics.median(run["seconds"] for run in runs)
    return {
        "seconds": seconds,
        "records_per_second": runs[0]["records"] / seconds,
        "records": runs[0]["records"],
        "shards": runs[0]["shards"],
        "peak_mib": max(run["peak_mib"] for run in runs),
        "worker_peak_mib": max(run["worker_peak_mib"] for run in runs),
        "setup_mib": max(run["setup_mib"] for run in runs),
    }


def format_table(results: dict[str, dict[str, float]], repeats: int) -> str:
    baseline = results[BASELINE]["records_per_second"]
    header = (
        f"| Variant | Shards | Records | Records/s (median of {repeats}) | Speed vs tfrecord "
        f"package | Peak RSS (MiB) | Peak RSS per worker (MiB) | RSS before the pass (MiB) |"
    )
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for variant, result in results.items():
        worker_peak = f"{result['worker_peak_mib']:.0f}" if VARIANTS[variant][1] else "-"
        lines.append(
            f"| {VARIANTS[variant][0]} | {result['shards']:.0f} | {result['records']:,.0f} "
            f"| {result['records_per_second']:,.0f} "
            f"| {result['records_per_second'] / baseline:.2f} | {result['peak_mib']:.0f} "
            f"| {worker_peak} | {result['setup_mib']:.0f} |"
        )
    return "\n".join(lines)


def document(
    table: str,
    results: dict[str, dict[str, float]],
    load_before: float,
    record_kb: float,
    args: argparse.Namespace,
) -> str:
    command = f"python scripts/bench_youtube8m.py --data-dir DATA_DIR --repeats {args.repeats}"
    if args.shards != 100:
        command += f" --shards {args.shards}"
    records = int(results["records"]["records"])
    shards = int(results["records"]["shards"])
    summary = (
        f"Input: the first {shards} video-level shards of the YouTube-8M `validate` partition, "
        f"{records:,} records of {record_kb:.1f} KB on average. Each variant reads every record "
        f"once, in a fresh process, {args.repeats} times with the variants taking turns. Records "
        f"per second are "
        f"medians and cover one pass after the imports and the setup (record counts, "
        f"vocabulary). Peak RSS is the maximum over the runs and includes the imports. For the "
        f"variant with workers, the main process and each worker have their own peak."
    )
    if load_before >= 0.5:
        summary += (
            f" Other processes shared the cores: the 1-minute load average before the run was "
            f"{load_before:.2f}."
        )
    tenth, whole = results["loader_tenth"], results["loader"]
    reading = (
        f"Memory does not follow the number of shards: the loader peaks at "
        f"{whole['peak_mib']:.0f} MiB on {whole['shards']:.0f} shards and at "
        f"{tenth['peak_mib']:.0f} MiB on {tenth['shards']:.0f}. The loader with workers also "
        f"pays for starting them and for moving the 1.2 MB of features of each batch through "
        f"shared memory, so it gains only where spare cores decode in parallel."
    )
    return f"""## {SECTION_TITLE}

{textwrap.fill(summary, width=100)}

{textwrap.fill(reading, width=100)}

- our reader: `read_records` with CRC-32C checks and `parse_example` of all four features.
- our loader: `TFRecordSplit.loader(256, shuffle=True, ...)` with the default buffer of 4,096
  records, three multi-label tasks, checked records and dense targets.
- tfrecord package: `tfrecord.reader.tfrecord_loader`, which decodes all features to numpy
  arrays without CRC checks.

Command: `{command}`, where `DATA_DIR` contains `vocabulary.csv` and `video_level/*.tfrecord`.

Machine: {machine_description(("numpy", "torch", "protobuf", "google-crc32c", "tfrecord"))}

{table}
"""


if __name__ == "__main__":
    main()
