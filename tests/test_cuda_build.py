"""The CUDA sources without a GPU: they compile for sm_90, and the kernels compute the right thing.

1. Every ``csrc/cuda/*.cu`` compiles for sm_90 with nvcc (skipped when nvcc is absent).
2. The .cu includes only CUDA/C++ headers (the kernels stay torch-free).
3. The kernels *run* on the host: softmax_loss_kernels.cu is compiled with g++ against the
   emulation headers of tests/cuda_host_emulation/ and checked against the float64
   reference with the Triton test's cases and tolerances (fp32 + bf16/fp16 samples).

Uses the flags setup.py gives nvcc (``-O3 -std=c++17``) and
``-Werror all-warnings`` so a warning fails too. Skipped when nvcc is absent. nvcc is looked
up as ``$NVCC``, on ``PATH``, then under ``$CUDA_HOME``/``/usr/local/cuda``.
"""

from __future__ import annotations

import glob
import os
import shutil
import re
import subprocess
import sys

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC_FLAGS = ["-arch=sm_90", "-O3", "-std=c++17", "-DADAPTAU_WITH_CUDA", "-Werror", "all-warnings"]


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
    cmd = [NVCC, *NVCC_FLAGS, "-Xptxas", "-v", "-c", source, "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert out.exists() and out.stat().st_size > 0
    bad = _ptxas_over_limits(proc.stdout + proc.stderr)
    assert not [b for b in bad if b[1] == "registers"], f"over 255 registers: {bad}"


def _ptxas_over_limits(log):
    """(kernel, spill store bytes, spill load bytes) or (kernel, "registers", n) for each
    kernel of nvcc's ``-Xptxas -v`` log that spills or uses over 255 registers per thread."""
    # ptxas -v: one "Compiling entry function" block per kernel, each with its spill line
    entries = re.findall(r"Compiling entry function '(\w+)'", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert entries and len(spills) >= len(entries), f"no ptxas -v report per kernel:\n{log}"
    blocks = re.split(r"Compiling entry function", log)[1:]
    bad = []
    for block in blocks:
        name = re.match(r" '(\w+)'", block).group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        if m and (int(m.group(1)) or int(m.group(2))):
            bad.append((name, int(m.group(1)), int(m.group(2))))
        if regs and int(regs.group(1)) > 255:
            bad.append((name, "registers", int(regs.group(1))))
    return bad


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set NVCC or CUDA_HOME)")
@pytest.mark.parametrize("source", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
@pytest.mark.parametrize(
    "extra",
    [[], ["--use_fast_math"], list(COMMON_NVCC_FLAGS)],
    ids=["setup.py-flags", "fast-math", "torch-common-flags"],
)
def test_cu_has_no_register_spills(source, extra, tmp_path):
    """No kernel spills, with setup.py's flags, with fast math, and with the flags torch's
    cpp_extension adds to every CUDA build."""
    cmd = [NVCC, *NVCC_FLAGS, *extra, "-Xptxas", "-v", "-c", source, "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    bad = _ptxas_over_limits(proc.stdout + proc.stderr)
    assert not bad, f"kernels that spill (name, store bytes, load bytes): {bad}"


@pytest.mark.parametrize("source", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
def test_cu_includes_only_cuda_headers(source):
    """The kernels stay torch-free: only CUDA/C++ standard headers and our own headers
    (the launcher interface and the contract's constants, which is standard C++ itself)."""
    allowed_prefixes = (
        "cuda",
        "cstddef",
        "cstdint",
        "climits",
        "cfloat",
        "math_constants",
        "softmax_loss_cuda.h",
        "../contract.h",
    )
    contract = os.path.join(ROOT, "csrc", "contract.h")
    for path in (source, contract):
        with open(path) as fh:
            for line in fh:
                s = line.strip()
                if s.startswith("#include"):
                    name = s.split(None, 1)[1].strip('<>" ')
                    assert name.startswith(allowed_prefixes), f"{path}: includes {name}"


# ------------------------------------------------------------- host emulation of the .cu
# No GPU here, so the CUDA kernels are also *run*: the .cu is compiled as host C++ against
# the emulation headers of tests/cuda_host_emulation/ (cuda_runtime.h: cooperative ucontext
# fibers for the threads of a block, barriers for __syncthreads and warp shuffles, blocks
# one after another, plain adds for atomics; cuda_fp16.h, cuda_bf16.h: the 16-bit types),
# with harness.cpp giving the launchers C entry points, and driven through ctypes with CPU
# tensors, against the float64 reference with the same cases and tolerances as the Triton
# tests (fp32, plus bf16/fp16 samples).
# It checks indexing, masking, reductions and formulas of the real kernel code; it cannot
# check GPU-only behaviour (memory model, races, occupancy): gpu_check.sh does that.
EMULATION_DIR = os.path.join(ROOT, "tests", "cuda_host_emulation")
_KERNELS_CU = os.path.join(ROOT, "csrc", "cuda", "softmax_loss_kernels.cu")


def _cxx():
    for c in (os.environ.get("CXX"), "g++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


@pytest.fixture(scope="module")
def emulated_cuda(tmp_path_factory):
    import ctypes

    cxx = _cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/clang++) for the CUDA-kernel emulation")
    if not os.path.exists(_KERNELS_CU):
        pytest.skip("csrc/cuda/softmax_loss_kernels.cu not present")
    lib_path = tmp_path_factory.mktemp("cuda_emu") / "libadaptau_cuda_emu.so"
    cmd = [
        cxx,
        "-std=c++20",
        "-O1",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Werror",
        "-I" + EMULATION_DIR,
        "-I" + os.path.dirname(_KERNELS_CU),
        "-x",
        "c++",
        os.path.join(EMULATION_DIR, "harness.cpp"),
        "-o",
        str(lib_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail("host emulation build failed:\n" + " ".join(cmd) + "\n" + proc.stderr[-4000:])
    lib = ctypes.CDLL(str(lib_path))
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int  # noqa: E741 (the C types, by their C names)
    lib.emu_forward.argtypes = [I, I, P, P, P, P, P, P, P, I64, I64, I64, I64, I, I, I, I, I, P, P, P]
    lib.emu_backward.argtypes = [
        I,
        I,
        P,
        P,
        P,
        P,
        P,
        P,
        P,
        I64,
        I64,
        I64,
        I64,
        I,
        I,
        I,
        I,
        P,
        P,
        P,
        P,
        P,
        P,
        P,
    ]
    return lib


def _emu_backend(lib):
    import torch

    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

    def ptr(t):
        return None if t is None else t.data_ptr()

    def sizes(user, items, neg, mode):
        batch, dim = user.shape
        return batch, items.shape[0], dim, (neg.shape[-1] if mode != 2 else batch)

    def fwd(user, items, pos, neg, a, b, lq, mode, ip, nm, rh, compute_raw):
        B, N, D, M = sizes(user, items, neg, mode)
        loss, lse = torch.empty(B, dtype=a.dtype), torch.empty(B, dtype=a.dtype)
        raw = torch.empty(B if compute_raw else 0, dtype=a.dtype)
        rc = lib.emu_forward(
            codes[user.dtype],
            int(pos.dtype == torch.int64),
            ptr(user),
            ptr(items),
            ptr(pos),
            ptr(neg) if mode != 2 else None,
            ptr(a),
            ptr(b),
            ptr(lq),
            B,
            N,
            D,
            M,
            mode,
            ip,
            nm,
            rh,
            compute_raw,
            ptr(loss),
            ptr(lse),
            ptr(raw) if compute_raw else None,
        )
        assert rc == 0, f"forward launcher returned cudaError {rc}"
        return loss, lse, raw

    def bwd(gl, user, items, pos, neg, a, b, lq, lse, mode, ip, nm, rh, need):
        B, N, D, M = sizes(user, items, neg, mode)
        gu, gi = torch.empty_like(user), torch.empty_like(items)
        accum = gi if items.dtype == a.dtype else torch.empty(items.shape, dtype=a.dtype)
        ga, gb = torch.empty(B, dtype=a.dtype), torch.empty(B, dtype=a.dtype)
        rc = lib.emu_backward(
            codes[user.dtype],
            int(pos.dtype == torch.int64),
            ptr(user),
            ptr(items),
            ptr(pos),
            ptr(neg) if mode != 2 else None,
            ptr(a),
            ptr(b),
            ptr(lq),
            B,
            N,
            D,
            M,
            mode,
            ip,
            nm,
            rh,
            ptr(gl),
            ptr(lse),
            ptr(gu),
            ptr(gi),
            ptr(accum),
            ptr(ga),
            ptr(gb),
        )
        assert rc == 0, f"backward launcher returned cudaError {rc}"
        return gu, gi, ga, gb

    return fwd, bwd


def _emu_cases():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _cases as T

    cases = [(name, None) for name, spec in T.CASES.items() if not spec.get("api")]
    for dtype in ("bfloat16", "float16"):
        for name in ("perrow-all_options", "shared-duplicates", "inbatch-logq", "perrow-no_normalize"):
            cases.append((name, dtype))
    return cases


_EMU_CASES = _emu_cases()


@pytest.mark.parametrize("name,dtype", _EMU_CASES, ids=[f"{n}-{d or 'float32'}" for n, d in _EMU_CASES])
def test_cuda_kernels_emulated_on_host(emulated_cuda, name, dtype):
    import torch
    import _cases as T

    fwd, bwd = _emu_backend(emulated_cuda)
    spec = T.CASES[name]
    problems = T.check_backend_functions(name, spec, fwd, bwd, dtype=getattr(torch, dtype) if dtype else None)
    assert not problems, "\n".join(problems)
