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

The cases, the inputs they make and the tolerances are in ``tests/_cases.py``. The worker
also runs, under the interpreter:

* ``SPLIT_CASES``: the shared and in-batch tile kernels with their grid's second axis
  forced to 1, 2, 3 and 7 slices of the negatives (rows for the column backward), at odd
  sizes (B = 1 and 2, M below, at and not a multiple of the block, duplicates, accidental
  hits, logQ, include_pos), loss, lse, raw and every gradient against the float64
  reference, both item-gradient modes; D = 40 and 72 take the float32 score dots in
  32-column chunks, and the 7-slice runs take one full-width dot instead (the 16-bit
  inputs' shape); the slice count chosen for an H200's 132 SMs; the block shapes the
  autotuner may time;
* ``TOUCHED_CASES``: a 2,000,000-row table (D = 8) with a few touched rows, every mode:
  the same results as the reference, and no launch with more programs than the batch
  has indices (the launches are counted through ``launch._launch_log``);
* the deterministic mode (``torch.use_deterministic_algorithms(True)``): bitwise equal
  results on a repeat, no atomics; the tf32 switch (``torch.backends.cuda.matmul.allow_tf32``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from _cases import (
    CASES,
    GPU_CASES,
    GPU_DTYPES,
    ITEM_GRAD_MODES,
    check_backend_functions,
    check_public_api,
    make_inputs,
)

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
    # scratch buffers start as NaN: a read of an entry no kernel wrote fails the case
    importlib.import_module("adaptau.kernels.launch")._poison = True
    results = {"_meta": {"available": bool(kernels.AVAILABLE), "backends": adaptau.available_backends("cpu")}}
    for name, spec in CASES.items():
        for gmode in ITEM_GRAD_MODES:
            key = f"{name}[{gmode}]"
            start = time.time()
            try:
                kernels.set_item_grad_mode(gmode)
                if spec.get("api"):
                    problems = check_public_api(name, spec, "triton")
                else:
                    problems = check_backend_functions(name, spec, kernels.forward, kernels.backward)
            except Exception as exc:  # a crash is a failure of that case only
                problems = [f"raised {type(exc).__name__}: {exc}"]
            results[key] = {"problems": problems, "seconds": round(time.time() - start, 3)}
    kernels.set_item_grad_mode("atomic")
    _worker_extra(results)
    with open(out_path, "w") as fh:
        json.dump(results, fh, indent=1)


# the tile kernels with forced slice counts (odd sizes; the defaults of _cases: N=13, D=8)
SPLIT_CASES = {
    "shared-B1": {"mode": 1, "B": 1, "M": 37, "N": 50, "logq": True},
    "shared-B2-all": {
        "mode": 1,
        "B": 2,
        "M": 21,
        "N": 30,
        "include_pos": True,
        "logq": True,
        "remove_hits": True,
        "force_hits": True,
    },
    "shared-M-below-block": {"mode": 1, "B": 7, "M": 5, "dup": True},
    "shared-many": {
        "mode": 1,
        "B": 70,
        "M": 150,
        "D": 40,
        "dup": True,
        "remove_hits": True,
        "force_hits": True,
        "include_pos": True,
    },
    "shared-M64": {"mode": 1, "B": 40, "M": 64, "N": 90, "D": 24, "normalize": False, "logq": True},
    "shared-empty-rows": {"mode": 1, "remove_hits": True, "empty_rows": True},
    "inbatch-B2": {"mode": 2, "B": 2, "include_pos": True},
    "inbatch-dup": {"mode": 2, "B": 9, "dup": True, "logq": True},
    "inbatch-many": {"mode": 2, "B": 75, "N": 40, "D": 72, "remove_hits": True, "include_pos": True},
    "inbatch-large-scale": {"mode": 2, "B": 33, "N": 60, "D": 16, "scale": 1e4, "include_pos": True},
}
SPLITS = (1, 2, 3, 7)
# a 2M-row table, few touched rows: every mode, normalize on and off
TOUCHED_N = 2_000_000
TOUCHED_CASES = {
    "perrow": {"mode": 0, "B": 4, "M": 5, "N": TOUCHED_N, "logq": True, "dup": True},
    "shared": {"mode": 1, "B": 6, "M": 7, "N": TOUCHED_N, "include_pos": True, "dup": True},
    "inbatch": {"mode": 2, "B": 5, "N": TOUCHED_N, "remove_hits": True, "force_hits": True},
    "shared-no-normalize": {"mode": 1, "B": 6, "M": 7, "N": TOUCHED_N, "normalize": False},
}


def _worker_extra(results):
    """The split, touched-row, deterministic, tf32 and tuning checks (module docstring)."""
    import time

    import torch
    from adaptau import kernels
    from adaptau.kernels import _tile_common as tiles
    from adaptau.kernels import launch

    def record(key, fn):
        start = time.time()
        try:
            problems = fn()
        except Exception as exc:
            problems = [f"raised {type(exc).__name__}: {exc}"]
        results[key] = {"problems": problems, "seconds": round(time.time() - start, 3)}

    for split in SPLITS:
        for name, spec in SPLIT_CASES.items():
            for gmode in ITEM_GRAD_MODES:

                def run(name=name, spec=spec, gmode=gmode, split=split):
                    kernels.set_item_grad_mode(gmode)
                    launch._force_split(split)
                    # 7 slices: one full-width score dot (the 16-bit inputs' shape)
                    launch._full_width_dots = split == 7
                    try:
                        return check_backend_functions(
                            f"split-{name}", spec, kernels.forward, kernels.backward
                        )
                    finally:
                        launch._force_split(None)
                        launch._full_width_dots = False
                        kernels.set_item_grad_mode("atomic")

                record(f"split-{name}-{split}[{gmode}]", run)

    for name, spec in TOUCHED_CASES.items():
        for gmode in ITEM_GRAD_MODES:

            def run(name=name, spec=spec, gmode=gmode):
                kernels.set_item_grad_mode(gmode)
                launch._launch_log = log = []
                try:
                    problems = check_backend_functions(
                        f"touched-{name}", spec, kernels.forward, kernels.backward
                    )
                finally:
                    launch._launch_log = None
                    kernels.set_item_grad_mode("atomic")
                B, M = spec["B"], spec.get("M", 6)
                # pos, then the negatives: [B, M], [M], or the positives again (in-batch)
                indices = B + (B * M if spec["mode"] == 0 else M if spec["mode"] == 1 else B)
                big = [(k, n) for k, n in log if n > indices]
                if big:
                    problems.append(
                        f"launches with more programs than the {indices} indices "
                        f"of the batch (N = {spec['N']}): {big}"
                    )
                if not log:
                    problems.append("no launch was recorded")
                return problems

            record(f"touched-{name}[{gmode}]", run)

    def deterministic():
        spec = {"mode": 1, "B": 40, "M": 70, "N": 90, "D": 24, "dup": True, "include_pos": True}
        torch.use_deterministic_algorithms(True)
        launch._force_split(3)
        launch._launch_log = log = []
        try:
            problems = check_backend_functions("deterministic", spec, kernels.forward, kernels.backward)
            x = make_inputs("deterministic", spec)
            outs = []
            for _ in range(2):
                loss, lse, raw = kernels.forward(
                    x["user"],
                    x["items"],
                    x["pos"],
                    x["neg"],
                    x["alpha"],
                    x["beta"],
                    None,
                    1,
                    True,
                    True,
                    False,
                    True,
                )
                outs.append(
                    [
                        loss,
                        lse,
                        raw,
                        *kernels.backward(
                            x["grad_loss"],
                            x["user"],
                            x["items"],
                            x["pos"],
                            x["neg"],
                            x["alpha"],
                            x["beta"],
                            None,
                            lse,
                            1,
                            True,
                            True,
                            False,
                            True,
                        ),
                    ]
                )
        finally:
            torch.use_deterministic_algorithms(False)
            launch._force_split(None)
            launch._launch_log = None
        if not all(torch.equal(a, b) for a, b in zip(*outs)):
            problems.append("a repeat under deterministic algorithms is not bitwise equal")
        if "_item_finalize_kernel" in {k for k, _ in log}:
            problems.append("the atomic item-gradient path ran under deterministic algorithms")
        if "_item_segment_kernel" not in {k for k, _ in log}:
            problems.append("the segment item-gradient path did not run")
        return problems

    record("deterministic", deterministic)

    def tf32():
        problems = []
        before = torch.backends.cuda.matmul.allow_tf32
        try:
            for flag, want in ((False, "ieee"), (True, "tf32")):
                torch.backends.cuda.matmul.allow_tf32 = flag
                got = launch._dot_precision(torch.float32)
                if not launch.FP32_DOT_PRECISION and got != want:
                    problems.append(f"allow_tf32={flag}: fp32 dots {got!r}, expected {want!r}")
                if launch._dot_precision(torch.float64) != "ieee":
                    problems.append("float64 dots are not ieee")
            # the kernels take the tf32 constexpr (the interpreter computes it in fp32)
            problems += check_backend_functions(
                "tf32", {"mode": 1, "B": 20, "M": 30, "N": 40}, kernels.forward, kernels.backward
            )
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        return problems

    record("tf32", tf32)

    def split_choice():
        problems = []
        sm = launch._sm_count
        launch._sm_count = lambda device: 132  # an H200
        try:
            dev = torch.device("cpu")
            for B, M in ((2048, 1024), (2048, 4096), (256, 100_000), (8192, 1024), (3, 5)):
                rows = -(-B // 64)
                blocks = -(-M // 128)
                s = launch._split_count(rows, blocks, dev)
                if not (1 <= s <= max(1, blocks)):
                    problems.append(f"B={B} M={M}: {s} slices for {blocks} blocks")
                if rows * s < 264 and s < blocks:
                    problems.append(f"B={B} M={M}: {rows}x{s} programs below 2 per SM")
            if launch._split_count(32, 8, dev) != 8:  # the paper shape's shared mode
                problems.append(f"B=2048 M=1024: {launch._split_count(32, 8, dev)} slices, not 8")
        finally:
            launch._sm_count = sm
        return problems

    record("split-choice", split_choice)

    def tuning():
        problems = []
        interp = tiles._interpreting
        tiles._interpreting = lambda: False
        try:
            configs = tiles._tile_configs()
            for B, M, bd, tag in (
                (2048, 1024, 64, 0),
                (3, 5, 16, 0),
                (2048, 1024, 1024, 0),
                (2048, 1024, 64, 1),
            ):
                kept = tiles._prune_tile_configs(
                    configs, {"B": B, "M": M, "TUNE_TAG": tag, "user_ptr": torch.empty(1)}, BLOCK_D=bd
                )
                cap = tiles._tile_cap(bd)
                if not 1 <= len(kept) <= (1 if tag else 3):
                    problems.append(f"{(B, M, bd, tag)}: {len(kept)} configs")
                for c in kept:
                    if max(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_N"]) > max(16, cap):
                        problems.append(f"{(B, M, bd, tag)}: {c} over the cap {cap}")
        finally:
            tiles._interpreting = interp
        if (
            len(
                tiles._prune_tile_configs(
                    configs, {"B": 2048, "M": 1024, "TUNE_TAG": 0, "user_ptr": torch.empty(1)}, BLOCK_D=64
                )
            )
            != 1
        ):
            problems.append("more than one config under the interpreter")
        return problems

    record("tuning", tuning)


# ------------------------------------------------------------------ pytest: interpreter
@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed: the Triton backend (and its interpreter) cannot run here")
    out = tmp_path_factory.mktemp("triton_interp") / "results.json"
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"interpreter worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
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


@pytest.mark.parametrize("gmode", ITEM_GRAD_MODES)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_triton_split_grid(interpreter_results, case, split, gmode):
    res = interpreter_results[f"split-{case}-{split}[{gmode}]"]
    assert not res["problems"], "\n".join(res["problems"])


@pytest.mark.parametrize("gmode", ITEM_GRAD_MODES)
@pytest.mark.parametrize("case", list(TOUCHED_CASES))
def test_triton_touched_rows_only(interpreter_results, case, gmode):
    res = interpreter_results[f"touched-{case}[{gmode}]"]
    assert not res["problems"], "\n".join(res["problems"])


@pytest.mark.parametrize("check", ("deterministic", "tf32", "split-choice", "tuning"))
def test_triton_modes_and_tuning(interpreter_results, check):
    res = interpreter_results[check]
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
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
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
        pytest.skip(
            f"backend {backend!r} not available for CUDA tensors here ({adaptau.available_backends('cuda')})"
        )
    if backend == "cuda" and gmode != "atomic":
        pytest.skip("the CUDA C++ backend has one item-gradient mode (atomic)")
    spec = dict(GPU_CASES[case])
    if backend == "triton":
        from adaptau import kernels

        kernels.set_item_grad_mode(gmode)
    try:
        problems = check_public_api(f"gpu-{case}", spec, backend, device="cuda", dtype=getattr(torch, dtype))
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
    spec = {"mode": mode, "B": 20, "N": 60, "D": 24, "M": 30, "include_pos": True, "logq": True}
    problems = check_public_api(f"gpu64-{mode}", spec, backend, device="cuda", dtype=torch.float64)
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit(pytest.main([__file__, "-v"]))
