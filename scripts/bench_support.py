"""Helpers shared by the benchmark scripts: peak memory, machine description, docs sections."""

from __future__ import annotations

import os
import platform
import resource
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path


def peak_rss_mib(children: bool = False) -> float:
    """Return the peak resident set size of this process, or of its largest waited-for child.

    Linux reports ``ru_maxrss`` in KiB.
    """
    scope = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(scope).ru_maxrss / 1024


def machine_description(packages: Iterable[str]) -> str:
    """Return the CPU model, core count, memory, OS, Python and the versions of ``packages``."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = ", ".join(f"{package} {metadata.version(package)}" for package in packages)
    return (
        f"{model}, {cores} cores, {memory_gib:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}; {versions}"
    )


def write_section(path: Path, title: str, section: str) -> None:
    """Replace the ``## title`` section of a markdown file, or append it, keeping the others.

    ``section`` starts with its own ``## title`` line. The file is created with a ``# Benchmarks``
    heading when missing.
    """
    heading = f"## {title}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        updated = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        rest = "".join(lines[end:])
        updated = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated)
