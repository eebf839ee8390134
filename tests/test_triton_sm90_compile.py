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

Checks per compiled kernel: a cubin was produced, the PTX targets sm_90, and the shared
memory a block needs is at most 227 KiB (the most an sm_90 block can be given).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HAS_TRITON = importlib.util.find_spec("triton") is not None
SM90_MAX_SHARED_BYTES = 227 * 1024
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
        report["skip"] = (f"Triton {triton.__version__}: no driver.set_active / JITFunction.run "
                          "to compile without a GPU")
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

    driver.set_active(Sm90Target())
    run = jit.JITFunction.run
    seen = set()

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (self.__name__, getattr(kernel, "hash", id(kernel)))
        if key not in seen:
            seen.add(key)
            asm = getattr(kernel, "asm", {})
            report["kernels"].append({
                "name": self.__name__,
                "shared": int(kernel.metadata.shared),
                "num_warps": int(kernel.metadata.num_warps),
                "cubin_bytes": len(asm.get("cubin", b"")),
                "ptx_sm90": ".target sm_90" in asm.get("ptx", ""),
            })
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
                flags = (bool(spec.get("include_pos", False)), bool(spec.get("normalize", True)),
                         bool(spec.get("remove_hits", False)), True)
                try:
                    _, lse, _ = kernels.forward(x["user"], x["items"], x["pos"], x["neg"],
                                                x["alpha"], x["beta"], x["logq"], spec["mode"],
                                                *flags)
                    kernels.backward(x["grad_loss"], x["user"], x["items"], x["pos"], x["neg"],
                                     x["alpha"], x["beta"], x["logq"], lse, spec["mode"], *flags)
                except Exception as exc:
                    report["errors"].append(f"{case} {dtype} {gmode}: {type(exc).__name__}: "
                                            f"{str(exc)[:3000]}")
    kernels.set_item_grad_mode("atomic")
    json.dump(report, open(out_path, "w"), indent=1)


@pytest.fixture(scope="module")
def sm90_report(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed: nothing to compile")
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"sm_90 compile worker failed (rc {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    report = json.loads(out.read_text())
    if report["skip"]:
        pytest.skip(report["skip"])
    return report


def test_every_kernel_compiles_for_sm90(sm90_report):
    assert not sm90_report["errors"], "\n".join(sm90_report["errors"])
    names = {k["name"] for k in sm90_report["kernels"]}
    # every kernel of the backend was reached: rows and tiles, forward and backward, both
    # item-gradient modes, the norms pre-pass and the finalize kernel
    expected = {"_inv_norm_kernel", "_fwd_rows_kernel", "_fwd_tiles_kernel", "_bwd_rows_kernel",
                "_bwd_tiles_rows_kernel", "_bwd_tiles_cols_kernel", "_item_finalize_kernel",
                "_item_segment_kernel"}
    assert expected <= names, f"never compiled: {sorted(expected - names)}"


def test_sm90_cubins_and_shared_memory(sm90_report):
    bad = [k for k in sm90_report["kernels"]
           if k["cubin_bytes"] == 0 or not k["ptx_sm90"] or k["shared"] > SM90_MAX_SHARED_BYTES]
    assert sm90_report["kernels"], "no kernel was compiled"
    assert not bad, f"kernels without an sm_90 cubin or over {SM90_MAX_SHARED_BYTES} B of shared memory: {bad}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit(pytest.main([__file__, "-v"]))
