"""Every ``csrc/cuda/*.cu`` compiles for sm_90 with nvcc (no GPU needed).

Uses the flags setup.py gives nvcc (``-O3 -std=c++17 --use_fast_math``) and
``-Werror all-warnings`` so a warning fails too. Skipped when nvcc is absent. nvcc is looked
up as ``$NVCC``, on ``PATH``, then under ``$CUDA_HOME``/``/usr/local/cuda``.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC_FLAGS = ["-arch=sm_90", "-O3", "-std=c++17", "--use_fast_math", "-DADAPTAU_WITH_CUDA",
              "-Werror", "all-warnings"]


def find_nvcc():
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


NVCC = find_nvcc()


def test_there_are_cuda_sources():
    assert CU_FILES, "no csrc/cuda/*.cu found"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set NVCC or CUDA_HOME)")
@pytest.mark.parametrize("source", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
def test_cu_compiles_for_sm90(source, tmp_path):
    out = tmp_path / (os.path.basename(source) + ".o")
    cmd = [NVCC, *NVCC_FLAGS, "-c", source, "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert out.exists() and out.stat().st_size > 0


@pytest.mark.parametrize("source", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
def test_cu_includes_only_cuda_headers(source):
    """The kernels stay torch-free: only CUDA/C++ standard headers and our own header."""
    allowed_prefixes = ("cuda", "cstddef", "cstdint", "climits", "cfloat", "math_constants",
                        "softmax_loss_cuda.h")
    with open(source) as fh:
        for line in fh:
            s = line.strip()
            if s.startswith("#include"):
                name = s.split(None, 1)[1].strip("<>\" ")
                assert name.startswith(allowed_prefixes), f"{source}: includes {name}"
