"""What the benchmark scripts share: the machine they ran on, its results folder, the
header every results file starts with, the timing loop, the Markdown table writer, and the
pause of background jobs while anything is timed."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterator, List, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def widest_simd() -> str:
    """``avx512``, ``avx2`` or ``baseline``: the widest x86 vector extension the CPU has."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "baseline"
    return "avx512" if " avx512f" in flags else ("avx2" if " avx2" in flags else "baseline")


def machine_slug() -> str:
    """The results folder's name for this CPU: vendor, family, widest SIMD, core count,
    e.g. ``cpu-intel-xeon-avx512-2c`` or ``cpu-amd-epyc-avx2-2c``."""
    model = cpu_model().lower()
    words = [
        w for w in re.split(r"[^a-z0-9]+", model) if w in ("intel", "amd", "xeon", "epyc", "core", "ryzen")
    ]
    name = "-".join(dict.fromkeys(words)) or "cpu"
    return f"cpu-{name}-{widest_simd()}-{os.cpu_count()}c"


def results_dir() -> str:
    """``benchmarks/results/<machine_slug()>``, created if needed."""
    path = os.path.join(RESULTS, machine_slug())
    os.makedirs(path, exist_ok=True)
    return path


def commit() -> str:
    """The checkout's short commit, with ``+dirty`` when it has uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True, capture_output=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, text=True, capture_output=True
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(title: str) -> List[str]:
    """A results file's first lines: title, machine, software, commit, date and command."""
    import adaptau

    return [
        f"# {title}",
        "",
        f"- Machine: {cpu_model()} ({os.cpu_count()} logical cores, widest SIMD: "
        f"{widest_simd()}); torch threads: {torch.get_num_threads()}",
        f"- Software: torch {torch.__version__}, adaptau {adaptau.__version__}, "
        f"python {platform.python_version()}; adaptau cpu kernels: {adaptau.cpu_capability() or 'not built'}",
        f"- Commit {commit()}, {datetime.date.today().isoformat()}",
        f"- Command: `python {' '.join([os.path.relpath(sys.argv[0], os.path.dirname(HERE))] + sys.argv[1:])}`",
        "",
    ]


def machine_line() -> str:
    """One line naming the CPU, its logical cores, widest SIMD and torch's thread count."""
    return (
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores, widest SIMD: {widest_simd()}); "
        f"torch threads: {torch.get_num_threads()}"
    )


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> List[str]:
    """A Markdown table's lines; ``align`` has one character per column, ``l`` or ``r``
    (default: left)."""
    marks = ["---:" if (align[i : i + 1] == "r") else "---" for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


#: The background jobs a benchmark stops while it times (the resumable reproduction runs).
BACKGROUND_JOBS = "benchmarks/reproduce.py"


def add_pause_argument(parser) -> None:
    """``--pause PATTERN``: the ``pgrep -f`` pattern of background jobs to stop (SIGSTOP)
    while timing and continue (SIGCONT) after; ``''`` for none."""
    parser.add_argument(
        "--pause",
        default=BACKGROUND_JOBS,
        help="pgrep -f pattern of background jobs to stop while timing ('' for none; "
        f"default {BACKGROUND_JOBS})",
    )


@contextlib.contextmanager
def paused(pattern: str) -> Iterator[List[int]]:
    """Stop the processes matching ``pattern`` (``pgrep -f``; this process and its parents
    excepted) for the duration of the block, then continue them, also on error. Yields
    their pids."""
    pids: List[int] = []
    if pattern:
        try:
            out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        except OSError:
            out = []
        mine = {os.getpid(), os.getppid()}
        pids = [int(p) for p in out if int(p) not in mine]
    stopped = []
    try:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            except OSError:
                pass
        yield stopped
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass


def paused_line(pattern: str, pids: Sequence[int]) -> str:
    """The results-header line that says which background jobs were paused."""
    if not pattern:
        return "No background jobs paused (--pause '')"
    return f"Background jobs paused while timing: {len(pids)} process(es) matching `{pattern}`"
