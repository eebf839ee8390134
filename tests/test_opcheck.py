"""torch.library.opcheck over adaptau's registered operators on the CPU.

opcheck runs an operator on real inputs and checks its registration against what it did:
the schema (no undeclared mutation or aliasing of inputs), the fake (meta) kernel (same
output shapes, dtypes and strides as the real kernel, so FakeTensor tracing and
torch.compile see the right outputs), the autograd registration, and AOT dispatch with
dynamic shapes (compiled forward and backward equal to eager).

Operators:
  * adaptau::softmax_loss_forward / softmax_loss_backward (adaptau/loss/ops.py: fake
    kernels and the autograd formula in Python), once per CPU backend they dispatch to;
  * adaptau::fused_forward / fused_backward (csrc/registration.cpp: schemas and Meta
    kernels; csrc/softmax_loss_cpu.cpp: the CPU kernels), the ``cpu`` backend's own ops;
  * adaptau::item_counts (csrc/sampling_cpu.cpp, Meta kernel in csrc/registration.cpp);
  * adaptau::compact_indices (csrc/compact_cpu.cpp, fake kernel in adaptau/loss/ops.py).
Inputs are the cases of tests/_cases.py: per-row [B, M], shared [M] and in-batch negatives,
int64 and int32 indices, float32 and float64, with and without the options.
"""

import pytest
import torch
from torch.library import opcheck

import adaptau
from _cases import CASES, make_inputs

HAVE_CPU_KERNEL = "cpu" in adaptau.available_backends("cpu")
NEEDS_CPU_KERNEL = pytest.mark.skipif(
    not HAVE_CPU_KERNEL,
    reason="the adaptau C++ CPU kernel is not built (adaptau._C missing or without a CPU kernel)",
)

OPCHECK_CASES = (
    "perrow-base",
    "perrow-all_options",
    "perrow-int32",
    "perrow-many_negatives",
    "shared-logq",
    "shared-remove_hits",
    "shared-float64",
    "inbatch-base",
    "inbatch-include_pos",
    "inbatch-many_rows",
)
BACKENDS = [pytest.param("cpu", marks=NEEDS_CPU_KERNEL), "reference"]
EVERY_TEST = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _options(spec):
    return (
        spec["mode"],
        bool(spec.get("include_pos", False)),
        bool(spec.get("normalize", True)),
        bool(spec.get("remove_hits", False)),
    )


def _forward_args(name, requires_grad):
    """The forward's arguments up to neg_mode's options (compute_raw and backend follow)."""
    spec = CASES[name]
    x = make_inputs(name, spec)
    user, items, alpha, beta = (
        x[k].requires_grad_(requires_grad) for k in ("user", "items", "alpha", "beta")
    )
    return (user, items, x["pos"], x["neg"], alpha, beta, x["logq"], *_options(spec)), x


def _assert_opcheck(op, args):
    result = opcheck(op, args, test_utils=EVERY_TEST)
    assert result == {test: "SUCCESS" for test in EVERY_TEST}, result


@pytest.mark.parametrize("compute_raw", [True, False], ids=["raw", "no_raw"])
@pytest.mark.parametrize("name", OPCHECK_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_loss_forward(backend, name, compute_raw):
    args, _ = _forward_args(name, requires_grad=True)
    _assert_opcheck(torch.ops.adaptau.softmax_loss_forward.default, (*args, compute_raw, backend))


@pytest.mark.parametrize("name", OPCHECK_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_loss_backward(backend, name):
    args, x = _forward_args(name, requires_grad=False)
    _, lse, _ = torch.ops.adaptau.softmax_loss_forward(*args, True, backend)
    user, items, pos, neg, alpha, beta, logq, *options = args
    _assert_opcheck(
        torch.ops.adaptau.softmax_loss_backward.default,
        (x["grad_loss"], user, items, pos, neg, alpha, beta, logq, lse, *options, True, backend),
    )


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_fused_forward_and_backward(name):
    args, x = _forward_args(name, requires_grad=False)
    _assert_opcheck(torch.ops.adaptau.fused_forward.default, (*args, True))
    _, lse, _ = torch.ops.adaptau.fused_forward(*args, True)
    user, items, pos, neg, alpha, beta, logq, *options = args
    _assert_opcheck(
        torch.ops.adaptau.fused_backward.default,
        (x["grad_loss"], user, items, pos, neg, alpha, beta, logq, lse, *options, True),
    )


@NEEDS_CPU_KERNEL
def test_fused_forward_is_not_differentiated_directly():
    """The gradient is the public op's (softmax_loss_forward's autograd formula): a backward
    through the backend's own op raises instead of returning no gradient."""
    args, _ = _forward_args("perrow-base", requires_grad=True)
    loss, _, _ = torch.ops.adaptau.fused_forward(*args, True)
    with pytest.raises(RuntimeError, match="not implemented"):
        loss.sum().backward()


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_item_counts(index_dtype):
    indices = torch.randint(0, 13, (5, 7), generator=torch.Generator().manual_seed(0)).to(index_dtype)
    _assert_opcheck(torch.ops.adaptau.item_counts.default, (indices, 13))


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("neg_shape", [(5, 7), (9,), (0,)], ids=["per-row", "shared", "none"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_compact_indices(neg_shape, index_dtype):
    """The touched-rows compaction: its fake gives unique_ids a data-dependent length."""
    g = torch.Generator().manual_seed(3)
    pos = torch.randint(0, 40, (5,), generator=g).to(index_dtype)
    neg = torch.randint(0, 40, neg_shape, generator=g).to(index_dtype)
    _assert_opcheck(torch.ops.adaptau.compact_indices.default, (pos, neg, 40))
