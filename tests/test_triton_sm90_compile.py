"""The Triton kernels compile for Hopper (sm_90), checked on a machine without a GPU.

Triton's interpreter (``test_triton_backend.py``) runs the kernels' Python semantics but
never compiles them: what only fails when Triton lowers a kernel (a type that changes in
a loop, an op or layout the backend rejects, a tile that needs more shared memory than a
block may have) would first show on a GPU machine. This test lowers every kernel
specialization that the GPU tests launch in float32 and bfloat16 (all negative modes,
both item-gradient modes, the options of ``GPU_CASES``) through Triton's NVIDIA backend
to PTX and then, with the ``ptxas`` that Triton ships, to an sm_90 cubin.

How, without a GPU: a worker subprocess replaces Triton's active driver by one that only
names a ``cuda`` target of compute capability 9.0, and turns every kernel launch into
Triton's compile-only path (``JITFunction.run(..., warmup=True)``), so the backend's
Python wrappers run unchanged on small CPU tensors and nothing is launched (their
outputs are never read). The worker relies on these two Triton internals; when a Triton
version lacks them, or lacks the NVIDIA backend / ptxas, the test skips and says which.

The autotuned tile kernels are compiled in every block shape the tuner would time (the
stand-in driver's benchmarker runs each once and reports equal times).

Checks per compiled kernel, every kernel and specialization: a cubin was produced, the
PTX targets sm_90, the shared memory a block needs is at most 227 KiB (the most an sm_90
block can be given), and ptxas's ``-v`` report (Triton's own, or ptxas run again on the
PTX) shows at most 255 registers per thread and no spill stores or loads. The paper
shape's specializations (B=2048, M=1024, D=64, N=40981; per-row, and shared negatives for
the tile kernels; fp32 and bf16) are compiled too, and their occupancy on sm_90 (resident
warps per SM, from registers, warps and shared memory) is printed (``pytest -s``), and
the per-row kernels are compiled at text-embedding widths (D = 512, 768, 1024) and
checked the same way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HAS_TRITON = importlib.util.find_spec("triton") is not None
SM90_MAX_SHARED_BYTES = 227 * 1024
SM90_MAX_REGS_PER_THREAD = 255
SM90_REGS_PER_SM = 65536
SM90_WARPS_PER_SM = 64
SM90_BLOCKS_PER_SM = 32
SM90_SMEM_PER_SM = 228 * 1024
PAPER_SHAPE = (2048, 1024, 64, 40981)  # B, M, D, N
LARGE_D = (512, 768, 1024)  # text-embedding widths
DTYPES = ("float32", "bfloat16")
TIMEOUT_S = 900


def _worker(out_path: str) -> None:
    """Runs in the subprocess: compile every specialization, write a JSON report."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    report = {"skip": None, "kernels": [], "errors": []}
    try:
        import triton
        import triton.runtime.jit as jit
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # no NVIDIA backend in this Triton build
        report["skip"] = f"Triton's NVIDIA backend is not importable: {exc!r}"
        json.dump(report, open(out_path, "w"))
        return
    if not (hasattr(driver, "set_active") and hasattr(jit.JITFunction, "run")):
        report["skip"] = (
            f"Triton {triton.__version__}: no driver.set_active / JITFunction.run to compile without a GPU"
        )
        json.dump(report, open(out_path, "w"))
        return

    class Sm90Target:
        """A driver that only names the target: every launch is compile-only (below)."""

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_benchmarker(self):
            """The autotuner's timer: runs (here: compiles) each block shape once, equal
            times, so every shape the tuner would time is compiled and checked."""

            def bench(kernel_call, quantiles=None):
                kernel_call()
                return [1.0, 1.0, 1.0]

            return bench

    driver.set_active(Sm90Target())
    run = jit.JITFunction.run
    seen = set()
    try:  # Triton prints ptxas's -v report of each kernel it assembles
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True
    except Exception:  # older Triton: ptxas is run again below
        pass
    phase = {"name": "tests"}

    def compile_only(self, *args, grid, warmup, **kwargs):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (phase["name"], self.__name__, getattr(kernel, "hash", id(kernel)))
        if key not in seen:
            seen.add(key)
            asm = getattr(kernel, "asm", {})
            regs, spills = _ptxas_resources(buf.getvalue(), asm.get("ptx", ""))
            report["kernels"].append(
                {
                    "name": self.__name__,
                    "phase": phase["name"],
                    "shared": int(kernel.metadata.shared),
                    "num_warps": int(kernel.metadata.num_warps),
                    "cubin_bytes": len(asm.get("cubin", b"")),
                    "ptx_sm90": ".target sm_90" in asm.get("ptx", ""),  # sm_90 or sm_90a
                    "n_regs": regs,
                    "n_spills": spills,
                    # what the specialization is: the inputs' dtype (a 16-bit one when any of
                    # the first tensors is) and the block shape
                    "meta": " ".join(
                        [_input_dtype(args)]
                        + [
                            f"{k}={v}"
                            for k, v in sorted(kwargs.items())
                            if k.startswith("BLOCK") or k == "num_warps"
                        ]
                    ),
                }
            )
        return kernel

    jit.JITFunction.run = compile_only

    import importlib

    import torch
    from adaptau import kernels
    import _cases as T

    importlib.import_module("adaptau.kernels.softmax_loss")._check_device = lambda t: None
    for dtype in DTYPES:
        for case, spec in T.GPU_CASES.items():
            for gmode in T.ITEM_GRAD_MODES:
                kernels.set_item_grad_mode(gmode)
                x = T.make_inputs(case, spec, "cpu", getattr(torch, dtype))
                flags = (
                    bool(spec.get("include_pos", False)),
                    bool(spec.get("normalize", True)),
                    bool(spec.get("remove_hits", False)),
                    True,
                )
                try:
                    _, lse, _ = kernels.forward(
                        x["user"],
                        x["items"],
                        x["pos"],
                        x["neg"],
                        x["alpha"],
                        x["beta"],
                        x["logq"],
                        spec["mode"],
                        *flags,
                    )
                    kernels.backward(
                        x["grad_loss"],
                        x["user"],
                        x["items"],
                        x["pos"],
                        x["neg"],
                        x["alpha"],
                        x["beta"],
                        x["logq"],
                        lse,
                        spec["mode"],
                        *flags,
                    )
                except Exception as exc:
                    report["errors"].append(
                        f"{case} {dtype} {gmode}: {type(exc).__name__}: {str(exc)[:3000]}"
                    )
    # the paper shape (per-row negatives, normalize): its specializations, for occupancy;
    # then text-embedding widths (per-row, small B/M/N: the specialization depends on D)
    g = torch.Generator().manual_seed(0)
    shapes = [("paper", PAPER_SHAPE, dt, gm, 0) for dt in DTYPES for gm in T.ITEM_GRAD_MODES]
    shapes += [("paper-shared", PAPER_SHAPE, dt, "atomic", 1) for dt in DTYPES]
    shapes += [(f"D{d}", (16, 8, d, 64), dt, "atomic", 0) for d in LARGE_D for dt in DTYPES]
    for phase_name, (B, M, D, N), dtype, gmode, mode in shapes:
        phase["name"] = phase_name
        kernels.set_item_grad_mode(gmode)
        dt = getattr(torch, dtype)
        user = torch.randn(B, D, generator=g).to(dt)
        items = torch.randn(N, D, generator=g).to(dt)
        pos = torch.randint(0, N, (B,), generator=g)
        neg = torch.randint(0, N, (B, M) if mode == 0 else (M,), generator=g)
        scale = torch.full((B,), 10.0)
        flags = (False, True, False, True)
        try:
            _, lse, _ = kernels.forward(user, items, pos, neg, scale, scale, None, mode, *flags)
            kernels.backward(
                torch.ones(B), user, items, pos, neg, scale, scale, None, torch.zeros(B), mode, *flags
            )
        except Exception as exc:
            report["errors"].append(f"{phase_name} {dtype} {gmode}: {type(exc).__name__}: {str(exc)[:3000]}")
    kernels.set_item_grad_mode("atomic")
    json.dump(report, open(out_path, "w"), indent=1)


def _input_dtype(args) -> str:
    dtypes = [
        str(a.dtype).replace("torch.", "")
        for a in args[:4]
        if getattr(a, "dtype", None) is not None and a.dtype.is_floating_point
    ]
    half = [d for d in dtypes if d in ("bfloat16", "float16")]
    return (half or dtypes or ["-"])[0]


def _ptxas_resources(log: str, ptx: str):
    """(registers per thread, spill bytes stored + loaded) from ptxas's ``-v`` report;
    runs the ptxas that Triton ships on the PTX when the log does not hold the report."""
    if "Used" not in log and ptx:
        import tempfile

        from triton.backends.nvidia.compiler import get_ptxas

        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            open(src, "w").write(ptx)
            target = re.search(r"\.target\s+(sm_\w+)", ptx)
            arch = target.group(1) if target else "sm_90a"
            proc = subprocess.run(
                [get_ptxas(90).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                capture_output=True,
                text=True,
            )
            log = proc.stdout + proc.stderr
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    spills = [
        int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    ]
    return (max(regs) if regs else None), (sum(spills) if spills else None)


def occupancy_warps(n_regs: int, num_warps: int, shared: int) -> int:
    """Resident warps per SM on sm_90 for a kernel of ``num_warps`` warps per block:
    65536 registers (allocated per warp in units of 256), 64 warps, 32 blocks and 228 KiB
    of shared memory per SM (1 KiB of it reserved per block)."""
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = SM90_REGS_PER_SM // (regs_per_warp * num_warps)
    by_warps = SM90_WARPS_PER_SM // num_warps
    by_smem = SM90_SMEM_PER_SM // (shared + 1024) if shared else SM90_BLOCKS_PER_SM
    return min(by_regs, by_warps, by_smem, SM90_BLOCKS_PER_SM) * num_warps


@pytest.fixture(scope="module")
def sm90_report(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed: nothing to compile")
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"sm_90 compile worker failed (rc {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    report = json.loads(out.read_text())
    if report["skip"]:
        pytest.skip(report["skip"])
    return report


def test_every_kernel_compiles_for_sm90(sm90_report):
    assert not sm90_report["errors"], "\n".join(sm90_report["errors"])
    names = {k["name"] for k in sm90_report["kernels"]}
    # every kernel of the backend was reached: rows and tiles, forward and backward, both
    # item-gradient modes, the norms pre-pass and the finalize kernel
    expected = {
        "_inv_norm_kernel",
        "_fwd_rows_kernel",
        "_fwd_tiles_kernel",
        "_fwd_merge_kernel",
        "_bwd_rows_kernel",
        "_bwd_tiles_rows_kernel",
        "_bwd_rows_finish_kernel",
        "_bwd_tiles_cols_kernel",
        "_item_finalize_kernel",
        "_item_segment_kernel",
    }
    assert expected <= names, f"never compiled: {sorted(expected - names)}"


def test_sm90_cubins_and_shared_memory(sm90_report):
    bad = [
        k
        for k in sm90_report["kernels"]
        if k["cubin_bytes"] == 0 or not k["ptx_sm90"] or k["shared"] > SM90_MAX_SHARED_BYTES
    ]
    assert sm90_report["kernels"], "no kernel was compiled"
    assert not bad, (
        f"kernels without an sm_90 cubin or over {SM90_MAX_SHARED_BYTES} B of shared memory: {bad}"
    )


def _spill_report(kernels):
    unknown = [k["name"] for k in kernels if k["n_regs"] is None or k["n_spills"] is None]
    assert not unknown, f"no ptxas -v report for: {unknown}"
    return [
        (k["name"], k["phase"], k.get("meta", ""), k["n_regs"], k["n_spills"])
        for k in kernels
        if k["n_spills"] != 0 or k["n_regs"] > SM90_MAX_REGS_PER_THREAD
    ]


def test_no_register_spills_and_at_most_255_registers(sm90_report):
    kernels = sm90_report["kernels"]
    assert kernels, "no kernel was compiled"
    bad = _spill_report(kernels)
    assert not bad, f"(kernel, phase, specialization, registers, spill bytes) over the limits: {bad}"


def test_paper_shape_kernels_do_not_spill(sm90_report):
    paper = [k for k in sm90_report["kernels"] if k["phase"].startswith("paper")]
    assert {k["phase"] for k in paper} == {"paper", "paper-shared"}
    bad = _spill_report(paper)
    assert not bad, f"(kernel, phase, specialization, registers, spill bytes) over the limits: {bad}"


def test_paper_shape_occupancy(sm90_report):
    paper = [k for k in sm90_report["kernels"] if k["phase"].startswith("paper")]
    assert paper, "no kernel was compiled at the paper shape"
    print(
        "\nsm_90 occupancy at the paper shape (B, M, D, N = %s; per-row, and shared "
        "negatives for the tile kernels):" % (PAPER_SHAPE,)
    )
    for k in sorted(paper, key=lambda k: (k["name"], k.get("meta", ""))):
        warps = occupancy_warps(k["n_regs"], k["num_warps"], k["shared"])
        print(
            f"  {k['name']:<26} {k.get('meta', ''):<58} regs {k['n_regs']:>3}  "
            f"smem {k['shared']:>6} B  -> {warps:>2}/64 warps per SM"
        )
        assert 1 <= warps <= SM90_WARPS_PER_SM, k


def test_large_d_kernels_compile(sm90_report):
    phases = {k["phase"] for k in sm90_report["kernels"]}
    assert {f"D{d}" for d in LARGE_D} <= phases, f"large-D phases compiled: {sorted(phases)}"


def _large_d(report, widths):
    return [k for k in report["kernels"] if k["phase"] in {f"D{d}" for d in widths}]


def test_large_d_kernels_do_not_spill(sm90_report):
    large = _large_d(sm90_report, LARGE_D)
    print("\nper-row kernels at D = 512, 768, 1024 (kernel, phase, specialization, registers, spill bytes):")
    for k in large:
        print("  ", (k["name"], k["phase"], k.get("meta", ""), k["n_regs"], k["n_spills"]))
    bad = _spill_report(large)
    assert not bad, f"(kernel, phase, specialization, registers, spill bytes) over the limits: {bad}"


def test_occupancy_arithmetic():
    assert occupancy_warps(32, 4, 0) == 64  # 32 regs: register file allows 2048 threads
    assert occupancy_warps(64, 8, 0) == 32  # 64 regs x 256 threads: 4 blocks
    assert occupancy_warps(255, 4, 0) == 8  # 256 regs/thread after rounding: 2 blocks
    assert occupancy_warps(32, 4, 100 * 1024) == 8  # shared memory: 2 blocks of 101 KiB


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit(pytest.main([__file__, "-v"]))
