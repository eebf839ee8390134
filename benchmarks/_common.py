"""What the benchmark scripts share: the machine they ran on, its results folder, and the
header every results file starts with."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from typing import List

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
    words = [w for w in re.split(r"[^a-z0-9]+", model)
             if w in ("intel", "amd", "xeon", "epyc", "core", "ryzen")]
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
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               text=True, capture_output=True).stdout.strip()
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
