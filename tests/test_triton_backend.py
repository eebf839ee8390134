"""The GPU backends (``triton``, ``cuda``) against the float64 reference.

Two parts:

1. CPU, no GPU needed: the Triton kernels run in Triton's interpreter
   (``TRITON_INTERPRET=1``). The interpreter is chosen when a kernel is *decorated*, so
   the checks run in a subprocess (this file with ``--worker``) whose environment sets the
   variable before Triton is imported; the test process itself may already have imported
   Triton normally. Every case runs the backend's ``forward``/``backward`` in float32 and
   compares loss, lse, raw and all four gradients with ``adaptau.loss.reference`` run on
   float64 copies of the same inputs, once per item-gradient mode (atomic, segment).
2. CUDA tensors (skipped without a GPU): ``triton`` and ``cuda`` backends through the
   public ``adaptau.softmax_loss`` + autograd, float32/bfloat16/float16, against the
   float64 reference on the dtype-rounded inputs.

The cases, the inputs they make and the tolerances are in ``tests/_cases.py``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from _cases import (CASES, GPU_CASES, GPU_DTYPES, ITEM_GRAD_MODES, check_backend_functions,
                    check_public_api)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HAS_TRITON = importlib.util.find_spec("triton") is not None
WORKER_TIMEOUT_S = 600

# --------------------------------------------------------------------------- the worker
def _worker(out_path):
    """Runs inside the subprocess: TRITON_INTERPRET=1 is set before Triton is imported."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, ROOT)
    import time

    import torch
    import adaptau
    from adaptau import kernels

    torch.set_num_threads(1)
    results = {"_meta": {"available": bool(kernels.AVAILABLE),
                         "backends": adaptau.available_backends("cpu")}}
    for name, spec in CASES.items():
        for gmode in ITEM_GRAD_MODES:
            key = f"{name}[{gmode}]"
            start = time.time()
            try:
                kernels.set_item_grad_mode(gmode)
                if spec.get("api"):
                    problems = check_public_api(name, spec, "triton")
                else:
                    problems = check_backend_functions(name, spec, kernels.forward,
                                                       kernels.backward)
            except Exception as exc:  # a crash is a failure of that case only
                problems = [f"raised {type(exc).__name__}: {exc}"]
            results[key] = {"problems": problems, "seconds": round(time.time() - start, 3)}
    kernels.set_item_grad_mode("atomic")
    with open(out_path, "w") as fh:
        json.dump(results, fh, indent=1)


# ------------------------------------------------------------------ pytest: interpreter
@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed: the Triton backend (and its interpreter) "
                    "cannot run here")
    out = tmp_path_factory.mktemp("triton_interp") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=WORKER_TIMEOUT_S)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"interpreter worker failed (rc {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(out) as fh:
        return json.load(fh)


def test_interpreter_backend_is_listed(interpreter_results):
    meta = interpreter_results["_meta"]
    assert meta["available"], "adaptau.kernels.AVAILABLE is False although triton imports"
    assert "triton" in meta["backends"], meta


@pytest.mark.parametrize("gmode", ITEM_GRAD_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_interpreter(interpreter_results, case, gmode):
    res = interpreter_results[f"{case}[{gmode}]"]
    assert not res["problems"], "\n".join(res["problems"])


def test_kernels_import_without_triton():
    """adaptau.kernels must import (AVAILABLE=False) when Triton is missing."""
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def fake(name, *a, **k):\n"
        "    if name == 'triton' or name.startswith('triton.'):\n"
        "        raise ImportError('no triton (simulated)')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = fake\n"
        "import adaptau.kernels as k\n"
        "assert k.AVAILABLE is False\n"
        "import adaptau\n"
        "assert 'triton' not in adaptau.available_backends('cpu')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------- pytest: on a GPU
def _cuda_available():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False




@pytest.mark.skipif(not _cuda_available(), reason="no CUDA GPU here")
@pytest.mark.parametrize("gmode", ITEM_GRAD_MODES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_gpu_backend(backend, case, dtype, gmode):
    import torch
    import adaptau

    if backend not in adaptau.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} not available for CUDA tensors here "
                    f"({adaptau.available_backends('cuda')})")
    if backend == "cuda" and gmode != "atomic":
        pytest.skip("the CUDA C++ backend has one item-gradient mode (atomic)")
    spec = dict(GPU_CASES[case])
    if backend == "triton":
        from adaptau import kernels

        kernels.set_item_grad_mode(gmode)
    try:
        problems = check_public_api(f"gpu-{case}", spec, backend, device="cuda",
                                    dtype=getattr(torch, dtype))
        torch.cuda.synchronize()
    finally:
        if backend == "triton":
            kernels.set_item_grad_mode("atomic")
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(not _cuda_available(), reason="no CUDA GPU here")
@pytest.mark.parametrize("backend", ("triton", "cuda"))
@pytest.mark.parametrize("mode", (0, 1, 2))
def test_gpu_backend_float64(backend, mode):
    """float64 CUDA tensors: both GPU backends compute in float64."""
    import torch
    import adaptau

    if backend not in adaptau.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} not available for CUDA tensors here")
    spec = {"mode": mode, "B": 20, "N": 60, "D": 24, "M": 30, "include_pos": True,
            "logq": True}
    problems = check_public_api(f"gpu64-{mode}", spec, backend, device="cuda",
                                dtype=torch.float64)
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit(pytest.main([__file__, "-v"]))
