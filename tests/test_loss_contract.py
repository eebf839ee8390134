"""The loss contract, one suite with the backend as a parameter.

Every case of tests/_cases.py (each negative mode: per-row [B, M], shared [M], in-batch;
each option; int32 and int64 indices; float32 and float64), with the inputs, float64
reference and tolerances of that module, the ones the Triton interpreter, GPU and
CUDA-emulation tests use:

  * the backend's forward and backward functions: loss, lse, raw and the user, item and
    scale gradients against the float64 reference (``check_backend_functions``);
  * the ``api-`` cases through ``adaptau.softmax_loss`` and autograd (``check_public_api``);
  * determinism: the same inputs twice give bitwise identical outputs and gradients.

Backends: every one ``adaptau.available_backends("cpu")`` lists, except ``triton``: its
interpreter has to be chosen before Triton is imported, so tests/test_triton_backend.py runs
these cases for it in a subprocess. The fused ``cpu`` backend's own grid (shapes, thread
counts, CPU capabilities, its saved state) is tests/test_cpu_backend.py.
"""

import pytest
import torch

import adaptau
from _cases import CASES, check_backend_functions, check_public_api, make_inputs
from adaptau.loss import ops

pytestmark = pytest.mark.filterwarnings("ignore:adaptau. no fused backend")

BACKENDS = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            "cpu" not in adaptau.available_backends("cpu"),
            reason="the adaptau C++ CPU kernel is not built (adaptau._C missing or without a CPU kernel)",
        ),
    ),
    "reference",
]
FUNCTION_CASES = [name for name, spec in CASES.items() if not spec.get("api")]
API_CASES = [name for name, spec in CASES.items() if spec.get("api")]

# (backend, case) pairs outside the float32 tolerances of tests/_cases.py, as strict xfails
# (each fails the suite once it passes). Both are cases at inverse temperature 1e4 with
# include_pos: lse ~ 1e3-1e4 carries a float32 rounding of ~5e-4, which becomes
# α·5e-4 ~ 5 in the positive's softmax weight p = exp(α·ŝ⁺ - lse) that the gradients use.
_FLOAT32_LSE_GAP = {
    ("cpu", "shared-large_scale_include_pos"): "the GEMM modes' backward: a row whose positive "
    "holds all the probability (reference gradient 0) gets gradients of ~0.4",
    ("cpu", "inbatch-large_scale_include_pos"): "the GEMM modes' backward: user gradient off by "
    "~3.5e-3 absolute (bound 3e-3)",
    ("reference", "inbatch-large_scale_include_pos"): "the reference computed in float32: user "
    "gradient off by ~8e-3 absolute (bound 3e-3)",
}


@pytest.mark.parametrize("case", FUNCTION_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_match_reference(request, backend, case):
    if (backend, case) in _FLOAT32_LSE_GAP:
        request.applymarker(pytest.mark.xfail(strict=True, reason=_FLOAT32_LSE_GAP[backend, case]))
    forward, backward = ops._implementation(backend)
    problems = check_backend_functions(case, CASES[case], forward, backward)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", API_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_public_api_and_autograd_match_reference(backend, case):
    problems = check_public_api(case, CASES[case], backend)
    assert not problems, "\n".join(problems)


def _run_case(backend, case):
    spec = CASES[case]
    x = make_inputs(case, spec)
    options = (
        spec["mode"],
        bool(spec.get("include_pos", False)),
        bool(spec.get("normalize", True)),
        bool(spec.get("remove_hits", False)),
    )
    forward, backward = ops._implementation(backend)
    loss, lse, raw = forward(
        x["user"], x["items"], x["pos"], x["neg"], x["alpha"], x["beta"], x["logq"], *options, True
    )
    grads = backward(
        x["grad_loss"],
        x["user"],
        x["items"],
        x["pos"],
        x["neg"],
        x["alpha"],
        x["beta"],
        x["logq"],
        lse,
        *options,
        True,
    )
    return (loss, lse, raw, *grads)


@pytest.mark.parametrize("case", FUNCTION_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic(backend, case):
    first, second = _run_case(backend, case), _run_case(backend, case)
    names = ("loss", "lse", "raw", "grad_user", "grad_items", "grad_pos_scale", "grad_neg_scale")
    for name, a, b in zip(names, first, second):
        assert torch.equal(a, b), f"{backend} {case}: {name} differs between two runs"
