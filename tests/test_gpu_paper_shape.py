"""CPU dry run of ``benchmarks/gpu_paper_shape.py``, the script ``gpu_check.sh`` runs on a GPU.

At a tiny shape on the CPU, ``check`` compares every fused backend usable here (the C++
``cpu`` backend when built; ``triton`` under ``TRITON_INTERPRET=1``) with the float64
reference, and ``time`` writes one table row per implementation. No timing is asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_paper_shape.py")
TINY = ["--device", "cpu", "--B", "8", "--M", "4", "--D", "16", "--N", "40", "--reps", "1"]


def _run(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, SCRIPT, *args, "--out", str(tmp_path), *TINY],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_check_matches_reference_on_cpu(tmp_path):
    proc = _run(tmp_path, "check")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = (tmp_path / "check.tsv").read_text().splitlines()
    assert rows[0].startswith("backend\tdtype")
    body = [r.split("\t") for r in rows[1:]]
    assert {r[1] for r in body} == {"float32", "bfloat16"}
    assert body and all(r[-1] == "ok" for r in body), rows


def test_time_writes_a_row_per_implementation(tmp_path):
    proc = _run(tmp_path, "time", "--impls", "adaptau,eager", "--dtypes", "float32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "paper_shape.md").read_text()
    assert "not a GPU figure" in text
    assert "| eager | float32 |" in text and "FAILED" not in text
    assert "x eager" in text
