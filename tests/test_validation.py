"""Every bad input of docs/design.md §2 raises a clear exception before any kernel runs."""

import math
import re

import pytest
import torch

import adaptau

B, N, D, M = 4, 10, 6, 3


def good():
    return dict(
        user=torch.randn(B, D),
        items=torch.randn(N, D),
        pos=torch.randint(0, N, (B,)),
        neg=torch.randint(0, N, (B, M)),
        pos_scale=5.0,
        neg_scale=5.0,
    )


def call(**changes):
    args = good()
    kwargs = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    return adaptau.softmax_loss(
        args["user"],
        args["items"],
        args["pos"],
        args["neg"],
        args["pos_scale"],
        args["neg_scale"],
        backend="reference",
        **kwargs,
    )


CASES = [
    # (description, changes, exception type, message fragment)
    ("user 1-D", dict(user=torch.randn(D)), ValueError, "user must be 2-D"),
    ("items 3-D", dict(items=torch.randn(N, D, 1)), ValueError, "items must be 2-D"),
    ("dim mismatch", dict(items=torch.randn(N, D + 1)), ValueError, "sizes must match"),
    ("integer user", dict(user=torch.ones(B, D, dtype=torch.int64)), TypeError, "user must be"),
    ("user not a tensor", dict(user=[[0.0] * D] * B), TypeError, "must be a tensor"),
    (
        "empty batch",
        dict(
            user=torch.randn(0, D),
            pos=torch.zeros(0, dtype=torch.long),
            neg=torch.zeros(0, M, dtype=torch.long),
        ),
        ValueError,
        "at least one row",
    ),
    ("empty item table", dict(items=torch.randn(0, D)), ValueError, "item table"),
    ("float pos", dict(pos=torch.zeros(B)), TypeError, "pos must be int32 or int64"),
    ("pos wrong length", dict(pos=torch.zeros(B + 1, dtype=torch.long)), ValueError, "pos must be [B=4]"),
    ("pos 2-D", dict(pos=torch.zeros(B, 1, dtype=torch.long)), ValueError, "pos must be"),
    ("float neg", dict(neg=torch.zeros(B, M)), TypeError, "neg must be int32 or int64"),
    ("neg wrong rows", dict(neg=torch.zeros(B + 1, M, dtype=torch.long)), ValueError, "per-row neg"),
    ("neg 3-D", dict(neg=torch.zeros(B, M, 1, dtype=torch.long)), ValueError, "neg must be"),
    ("empty per-row negatives", dict(neg=torch.zeros(B, 0, dtype=torch.long)), ValueError, "empty"),
    ("empty shared negatives", dict(neg=torch.zeros(0, dtype=torch.long)), ValueError, "empty"),
    (
        "in-batch with one row",
        dict(user=torch.randn(1, D), pos=torch.zeros(1, dtype=torch.long), neg=None),
        ValueError,
        "at least 2 rows",
    ),
    ("pos out of range", dict(pos=torch.tensor([0, 1, N, 2])), IndexError, "pos[2] = 10"),
    ("negative pos", dict(pos=torch.tensor([0, -1, 2, 2])), IndexError, "pos[1] = -1"),
    (
        "neg out of range",
        dict(neg=torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 99], [0, 0, 0]])),
        IndexError,
        "neg[2, 2] = 99",
    ),
    ("shared neg out of range", dict(neg=torch.tensor([1, 12, 3])), IndexError, "neg[1] = 12"),
    ("nan scale", dict(pos_scale=float("nan")), ValueError, "pos_scale must be finite"),
    ("inf scale", dict(neg_scale=math.inf), ValueError, "neg_scale must be finite"),
    (
        "nan tensor scale",
        dict(neg_scale=torch.tensor([1.0, float("nan"), 1.0, 1.0])),
        ValueError,
        "neg_scale must be finite",
    ),
    ("scale wrong length", dict(pos_scale=torch.ones(B + 2)), ValueError, "pos_scale must be"),
    ("integer tensor scale", dict(pos_scale=torch.ones(B, dtype=torch.long)), TypeError, "floating"),
    ("string scale", dict(pos_scale="hot"), TypeError, "pos_scale must be a float"),
    ("logq wrong size", dict(neg_logq=torch.zeros(N - 1)), ValueError, "neg_logq must be [N=10]"),
    ("logq non-finite", dict(neg_logq=torch.full((N,), -math.inf)), ValueError, "neg_logq must be finite"),
    ("bad reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("bad backend", dict(backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("description,changes,exc,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises(description, changes, exc, fragment):
    changes = dict(changes)
    backend = changes.pop("backend", None)
    if backend is not None:
        args = good()
        with pytest.raises(exc, match=fragment):
            adaptau.softmax_loss(*args.values(), backend=backend)
        return
    with pytest.raises(exc) as info:
        call(**changes)
    assert fragment in str(info.value)


def test_unavailable_backend_is_a_clear_error():
    args = good()
    if "cuda" not in adaptau.available_backends("cpu"):
        with pytest.raises(ValueError, match="not usable"):
            adaptau.softmax_loss(*args.values(), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_device_mismatch():
    args = good()
    with pytest.raises(ValueError, match="device|on cuda|on cpu"):
        adaptau.softmax_loss(args["user"], args["items"].cuda(), args["pos"], args["neg"], 1.0, 1.0)


def test_device_mismatch_meta():
    """Same check without a GPU: a meta-device tensor is on a different device."""
    args = good()
    with pytest.raises(ValueError, match="items is on meta"):
        adaptau.softmax_loss(args["user"], args["items"].to("meta"), args["pos"], args["neg"], 1.0, 1.0)
    with pytest.raises(ValueError, match="pos is on meta"):
        adaptau.softmax_loss(args["user"], args["items"], args["pos"].to("meta"), args["neg"], 1.0, 1.0)


def test_mixed_index_dtypes_take_the_negatives_dtype():
    """int64 positives with int32 negatives (the CPU sampler) narrow pos, after its range
    check; a too-large int64 positive is an IndexError, never a wrapped-around index."""
    import adaptau

    torch.manual_seed(0)
    user, items = torch.randn(3, 4), torch.randn(7, 4)
    neg = torch.randint(0, 7, (3, 5))
    pos = torch.tensor([1, 2, 6])
    ref = adaptau.softmax_loss(user, items, pos, neg, 2.0, 2.0, backend="reference")
    for p, n in ((pos, neg.int()), (pos.int(), neg)):
        got = adaptau.softmax_loss(user, items, p, n, 2.0, 2.0, backend="reference")
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(IndexError, match="pos"):
        adaptau.softmax_loss(user, items, torch.tensor([1, 2, 2**32 + 1]), neg.int(), 2.0, 2.0)


INDEX_CASES = [
    # (pos, neg, message): the first bad index in row-major order, pos before neg
    ([0, 1, N, 2], "rows", "pos[2] = 10 is out of range"),
    ([0, -1, 2, 2], "rows", "pos[1] = -1 is out of range"),
    ([0, 1, 2, 3], [[1, 2, 3], [4, 5, 6], [7, 8, 99], [-1, 0, 0]], "neg[2, 2] = 99 is out of range"),
    ([0, 1, 2, 3], [[1, 2, 3], [4, -5, 6], [7, 8, 9], [0, 0, 11]], "neg[1, 1] = -5 is out of range"),
    ([0, 1, 2, 3], [1, 12, 3], "neg[1] = 12 is out of range"),
    ([0, 1, 2, 3], [1, 2**31 + 5, 3], "neg[1] = 2147483653 is out of range"),
    # low 32 bits a valid index (3): the int64 range check must see the high bits
    (
        [0, 1, 2, 3],
        [[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 2**32 + 3, 1]],
        "neg[3, 1] = 4294967299 is out of range",
    ),
    ([0, 1, N + 3, 3], None, "pos[2] = 13 is out of range"),
]


def _fits_int32(neg):
    if neg is None or neg == "rows":
        return True
    return all(abs(v) < 2**31 for r in neg for v in (r if isinstance(r, list) else [r]))


@pytest.mark.skipif("cpu" not in adaptau.available_backends("cpu"), reason="C++ extension not built")
@pytest.mark.parametrize(
    "case,dtype",
    [
        (i, dt)
        for i, c in enumerate(INDEX_CASES)
        for dt in (torch.int64, torch.int32)
        if dt == torch.int64 or _fits_int32(c[1])
    ],
)
def test_cpu_backend_raises_the_same_index_errors(case, dtype):
    """The cpu backend range-checks indices in the kernel (ops.py skips its own pass over
    them for that backend); the exception and message are those of the Python check."""
    pos, neg, message = INDEX_CASES[case]
    if neg == "rows":
        neg = [[1, 2, 3]] * B
    pos = torch.tensor(pos, dtype=dtype)
    neg = None if neg is None else torch.tensor(neg, dtype=dtype)
    for backend in ("reference", "cpu"):
        with pytest.raises(IndexError, match=message.replace("[", r"\[")):
            adaptau.softmax_loss(torch.randn(B, D), torch.randn(N, D), pos, neg, 1.0, 1.0, backend=backend)


FINITE_CASES = [
    # (changes, message): tensors the Python check would reject, whatever their dtype
    (
        dict(neg_scale=torch.tensor([1.0, float("nan"), 1.0, 1.0])),
        "neg_scale must be finite; neg_scale[1] = nan",
    ),
    (dict(pos_scale=torch.tensor([1.0, 1.0, 1.0, math.inf])), "pos_scale must be finite; pos_scale[3] = inf"),
    (dict(pos_scale=torch.tensor(-math.inf)), "pos_scale must be finite; pos_scale[0] = -inf"),
    (
        dict(neg_logq=torch.cat([torch.zeros(N - 1), torch.tensor([float("nan")])])),
        "neg_logq must be finite; neg_logq[9] = nan",
    ),
    (dict(neg_logq=torch.full((N,), -math.inf)), "neg_logq must be finite; neg_logq[0] = -inf"),
    (
        dict(neg_scale=torch.tensor([1.0, -2.5e8, 3.0, 1e10])),
        "neg_scale must be an inverse temperature with |value| <= 1e+08; neg_scale[1] = -2.5e+08",
    ),
    (
        dict(pos_scale=torch.tensor([1.0, 1.0, 1e12, 1.0])),
        "pos_scale must be an inverse temperature with |value| <= 1e+08; pos_scale[2] = 1e+12",
    ),
]


@pytest.mark.skipif("cpu" not in adaptau.available_backends("cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("case", range(len(FINITE_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("neg_mode", ["per_row", "shared"])
def test_cpu_backend_raises_the_same_finiteness_errors(case, dtype, neg_mode):
    """The cpu backend checks the scales and neg_logq in the kernel (ops.py skips its own
    check for that backend); the exception and message are those of the Python check."""
    changes, message = FINITE_CASES[case]
    args = good()
    args["user"], args["items"] = args["user"].to(dtype), args["items"].to(dtype)
    if neg_mode == "shared":
        args["neg"] = args["neg"][0]
    kwargs = {}
    for name, value in changes.items():
        if name == "neg_logq":
            kwargs[name] = value.to(dtype)
        else:
            args[name] = value.to(dtype)
    for backend in ("reference", "cpu"):
        with pytest.raises(ValueError) as info:
            adaptau.softmax_loss(*args.values(), backend=backend, **kwargs)
        assert str(info.value).splitlines()[0] == message, backend
    # and it is the kernel that raises: the op itself, called without ops.py's checks
    scales = [
        torch.as_tensor(args[k], dtype=dtype).reshape(-1).expand(B).contiguous()
        for k in ("pos_scale", "neg_scale")
    ]
    grad_loss, lse = torch.ones(B, dtype=dtype), torch.zeros(B, dtype=dtype)
    for op, lead, tail in (
        (torch.ops.adaptau.fused_forward, (), ()),
        (torch.ops.adaptau.fused_backward, (grad_loss,), (lse,)),
    ):
        with pytest.raises(ValueError) as info:
            op(
                *lead,
                args["user"],
                args["items"],
                args["pos"],
                args["neg"],
                *scales,
                kwargs.get("neg_logq"),
                *tail,
                0 if neg_mode == "per_row" else 1,
                False,
                True,
                False,
                False,
            )
        assert str(info.value).splitlines()[0] == message, op


def test_a_float_scale_beyond_the_range_is_refused():
    for scale in (1e10, -1.5e8):
        with pytest.raises(ValueError, match=r"\|value\| <= 1e\+08, got"):
            adaptau.softmax_loss(*list(good().values())[:4], 1.0, scale)


@pytest.mark.parametrize("backend", [b for b in adaptau.available_backends("cpu") if b != "triton"])
def test_double_backward_is_a_clear_error(backend):
    """The fused backward is not differentiable: differentiating a gradient raises (as a
    once_differentiable backward does) instead of returning zeros."""
    args = good()
    user = args["user"].clone().requires_grad_(True)
    items = args["items"].clone().requires_grad_(True)
    loss = adaptau.softmax_loss(user, items, args["pos"], args["neg"], 2.0, 3.0, backend=backend)
    (grad_user,) = torch.autograd.grad(loss * torch.ones((), requires_grad=True), user, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_user.pow(2).sum().backward()


_HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero")


@pytest.fixture
def count_host_reads(monkeypatch):
    """Counts the calls that read a tensor's values back to the host (a device sync on CUDA)."""
    calls = []
    for name in _HOST_READS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("neg_kind", ["per_row", "shared", "in_batch", "int32"])
def test_the_cuda_call_path_reads_nothing_back(monkeypatch, count_host_reads, neg_kind):
    """With the checks on the device (as for CUDA tensors), the dispatcher's path up to the
    backend's kernel makes no host read: a stand-in backend on CPU tensors, counted."""
    from adaptau.loss import ops

    monkeypatch.setattr(ops, "_checks_on_device", lambda t: True)
    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device_type: "triton")

    def fake_forward(user, items, pos, neg, a, b, logq, mode, *flags):
        return user.new_zeros(user.shape[0]), user.new_zeros(user.shape[0]), user.new_zeros(user.shape[0])

    monkeypatch.setattr(ops, "_implementation", lambda name: (fake_forward, None))
    neg = {
        "per_row": torch.randint(0, N, (B, M)),
        "shared": torch.randint(0, N, (M,)),
        "in_batch": None,
        "int32": torch.randint(0, N, (B, M), dtype=torch.int32),
    }[neg_kind]
    args = good()
    count_host_reads.clear()
    adaptau.softmax_loss(
        args["user"],
        args["items"],
        args["pos"],
        neg,
        torch.full((B,), 5.0),
        5.0,
        neg_logq=torch.zeros(N),
        reduction="none",
    )
    assert count_host_reads == []


@pytest.mark.parametrize(
    "changes,fragment",
    [
        (dict(pos=torch.tensor([0, 1, N, 2])), "pos: an index is out of range"),
        (
            dict(neg=torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, -1], [0, 0, 0]])),
            "neg: an index is out of range",
        ),
        (
            dict(pos=torch.tensor([0, 1, 2**32 + 1, 2]), neg=torch.zeros(B, M, dtype=torch.int32)),
            "pos: an index is out of range",
        ),
        (dict(neg_scale=torch.tensor([1.0, float("nan"), 1.0, 1.0])), "neg_scale must be finite"),
        (dict(pos_scale=torch.full((B,), 1e9)), "pos_scale must be finite with |value| <= 1e+08"),
        (dict(neg_logq=torch.full((N,), float("inf"))), "neg_logq must be finite"),
    ],
)
def test_device_side_checks_refuse_bad_values(monkeypatch, changes, fragment):
    """The device-side asserts catch what the host checks catch (on CPU they raise at once)."""
    from adaptau.loss import ops

    monkeypatch.setattr(ops, "_checks_on_device", lambda t: True)
    with pytest.raises(RuntimeError, match=re.escape(fragment)):
        call(**changes)


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_mode_takes_triton_segment_gradients(deterministic):
    kernels = pytest.importorskip("adaptau.kernels", reason="needs the Triton kernels module")
    if not kernels.AVAILABLE:
        pytest.skip("triton is not installed")
    kernels.set_item_grad_mode("atomic")
    assert kernels.effective_item_grad_mode() == "segment"
    torch.use_deterministic_algorithms(False)
    assert kernels.effective_item_grad_mode() == "atomic"


def test_deterministic_mode_refuses_the_cuda_backward(monkeypatch, deterministic):
    """The CUDA C++ backend accumulates item gradients with atomics only: under
    torch.use_deterministic_algorithms(True) its backward raises PyTorch's usual error."""
    from adaptau.loss import ops

    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device_type: "cuda")

    def fake_forward(user, items, pos, neg, a, b, logq, mode, *flags):
        z = user.new_zeros(user.shape[0])
        return z + (user.sum() + items.sum()) * 0, z, z

    monkeypatch.setattr(ops, "_implementation", lambda name: (fake_forward, None))
    args = good()
    user = args["user"].requires_grad_(True)
    loss = adaptau.softmax_loss(user, args["items"], args["pos"], args["neg"], 5.0, 5.0)
    with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
        loss.backward()


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: (loss rtol, gradient atol relative to the largest reference gradient) by the table's dtype:
#: the computation runs in the table's dtype (accumulating in float32 or float64).
_PAIR_TOL = {
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
}


@pytest.mark.parametrize("user_dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("items_dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("backend", [b for b in adaptau.available_backends("cpu") if b != "triton"])
def test_every_dtype_pair_matches_the_float64_reference(seed, user_dtype, items_dtype, backend):
    """user and items may differ in dtype: user is cast to the table's dtype, the gradients
    come back in each input's dtype, and the values match the float64 reference computed
    on the inputs as rounded to the table's dtype."""
    g = torch.Generator().manual_seed(seed)
    u64, i64 = (
        torch.randn(6, 16, generator=g, dtype=torch.float64),
        torch.randn(30, 16, generator=g, dtype=torch.float64),
    )
    pos, neg = torch.randint(0, 30, (6,), generator=g), torch.randint(0, 30, (6, 9), generator=g)
    u = u64.to(user_dtype).detach().clone().requires_grad_(True)
    it = i64.to(items_dtype).detach().clone().requires_grad_(True)
    loss = adaptau.softmax_loss(u, it, pos, neg, 8.0, 8.0, reduction="sum", backend=backend)
    loss.backward()
    assert u.grad.dtype == user_dtype and it.grad.dtype == items_dtype
    ru = u64.to(user_dtype).to(items_dtype).double().detach().clone().requires_grad_(True)
    ri = i64.to(items_dtype).double().detach().clone().requires_grad_(True)
    ref = adaptau.softmax_loss(ru, ri, pos, neg, 8.0, 8.0, reduction="sum", backend="reference")
    ref.backward()
    rtol, gtol = _PAIR_TOL[items_dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=rtol)
    user_gtol = max(gtol, _PAIR_TOL[user_dtype][1])  # (the user gradient is rounded to user's dtype)
    for got, want, tol in ((u.grad, ru.grad, user_gtol), (it.grad, ri.grad, gtol)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
