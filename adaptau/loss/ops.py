"""``softmax_loss``: input checks, backend choice and the torch.library custom ops.

This is the only module that chooses between backends. What every backend implements and
may assume (the backend contract), and the constants it shares with them, are in
:mod:`adaptau.loss._contract`.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _extension  # registers torch.ops.adaptau.fused_forward / fused_backward
from . import reference
from ._contract import FLOAT_DTYPES as _FLOAT_DTYPES
from ._contract import INDEX_DTYPES as _INDEX_DTYPES
from ._contract import MAX_INVERSE_TEMPERATURE, NEG_IN_BATCH, NEG_PER_ROW, NEG_SHARED, accumulation_dtype
from ._contract import REDUCTIONS as _REDUCTIONS
from .mixed import Negatives, mixed_softmax_loss

# the package works without the extension (reference backend)
_C_IMPORT_ERROR: Optional[BaseException] = _extension.IMPORT_ERROR

__all__ = ["softmax_loss", "compact", "available_backends", "BACKENDS", "cpu_capability"]

#: Every backend name ``softmax_loss`` knows, besides ``"auto"``.
BACKENDS = ("reference", "cpu", "triton", "cuda")

ScaleLike = Union[float, int, Tensor]


# ----------------------------------------------------------------------------- backends
@functools.lru_cache(maxsize=None)  # (the extension's kernels do not change after import)
def _has_fused_kernel(dispatch_key: str) -> bool:
    if _C_IMPORT_ERROR is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("adaptau::fused_forward", dispatch_key)
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def _triton_usable(device_type: str) -> bool:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if device_type not in ("cpu", "cuda"):
        return False
    try:
        from .. import kernels
    except ImportError:
        return False
    return bool(getattr(kernels, "AVAILABLE", False))


def available_backends(device: Union[str, torch.device] = "cpu") -> List[str]:
    """Backends usable here for tensors on ``device``, fastest first (``"reference"`` last).

    ``"cpu"`` needs the compiled extension; ``"cuda"`` a CUDA build of it; ``"triton"``
    needs Triton and a CUDA device, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    device_type = torch.device(device).type
    found = []
    if device_type == "cuda":
        if _triton_usable("cuda"):
            found.append("triton")
        if _has_fused_kernel("CUDA"):
            found.append("cuda")
    elif device_type == "cpu":
        if _has_fused_kernel("CPU"):
            found.append("cpu")
        if _triton_usable("cpu"):
            found.append("triton")
    found.append("reference")
    return found


def cpu_capability() -> Optional[str]:
    """The instruction-set level of the ``"cpu"`` backend's kernels in this process.

    ``"avx512"`` (AVX-512 F/BW/DQ/VL, 16 float32 lanes), ``"avx2"`` (AVX2 + FMA, 8 lanes)
    or ``"default"`` (portable x86-64 without AVX, or a non-x86 build; one lane); ``None``
    when the C++ extension is not built. The extension carries every level its
    architecture has and picks the highest the CPU supports on first use; the environment
    variable ``ADAPTAU_CPU_CAPABILITY=default|avx2|avx512``, read then, forces a level at or
    below it. Results agree across levels within rounding, not bitwise; on one level they
    are bitwise reproducible across runs and thread counts.

    Raises ``ValueError`` when ``ADAPTAU_CPU_CAPABILITY`` names no level, or one above what
    the CPU supports (the same error the first ``"cpu"`` backend call would raise).
    """
    if not _extension.has_op("cpu_capability"):
        return None
    return torch.ops.adaptau.cpu_capability()


def _cpu_capabilities() -> List[str]:
    """The levels this CPU and build support, lowest first (``[]`` without the extension)."""
    if not _extension.has_op("cpu_capabilities"):
        return []
    return list(torch.ops.adaptau.cpu_capabilities())


def _set_cpu_capability(name: str) -> str:
    """Switches the ``"cpu"`` backend to level ``name`` for the rest of the process (tests,
    benchmarks); returns the level before ("" when none was chosen yet). ``ValueError``
    for a level the CPU does not support."""
    return torch.ops.adaptau._set_cpu_capability(name)


_warned_fallback = set()


def resolve_backend(backend: str, device_type: str) -> str:
    """The backend a call with ``backend`` (``"auto"`` or a name) runs on for tensors of
    ``device_type`` (``"cpu"``, ``"cuda"``): ``"auto"`` takes triton, then cuda on CUDA
    tensors, cpu on CPU tensors, else the reference backend (with a one-time warning).
    ValueError for a named backend that is not usable there."""
    usable = available_backends(device_type)
    if backend == "auto":
        if device_type == "cuda" and "triton" in usable:
            return "triton"
        if device_type == "cuda" and "cuda" in usable:
            return "cuda"
        if device_type == "cpu" and "cpu" in usable:
            return "cpu"
        if device_type not in _warned_fallback:
            _warned_fallback.add(device_type)
            why = f" (extension not importable: {_C_IMPORT_ERROR})" if _C_IMPORT_ERROR else ""
            warnings.warn(
                f"adaptau: no fused backend for {device_type} tensors{why}; "
                "using the slow 'reference' backend",
                RuntimeWarning,
                stacklevel=3,
            )
        return "reference"
    if backend not in usable:
        raise ValueError(
            f"backend {backend!r} is not usable for {device_type} tensors here; available: {usable}"
        )
    return backend


def _implementation(name: str):
    if name == "reference":
        return reference.forward, reference.backward
    if name in ("cpu", "cuda"):
        return torch.ops.adaptau.fused_forward.default, torch.ops.adaptau.fused_backward.default
    if name == "triton":
        from .. import kernels

        return kernels.forward, kernels.backward
    raise ValueError(f"unknown backend {name!r}")


# ------------------------------------------------------------------ data-dependent checks
def _check_index_range(name: str, index: Tensor, num_items: int) -> None:
    if index.numel() == 0:
        return
    low, high = torch.aminmax(index)
    if int(low) >= 0 and int(high) < num_items:
        return
    bad = ((index < 0) | (index >= num_items)).nonzero()[0].tolist()
    where = ", ".join(str(i) for i in bad)
    value = int(index[tuple(bad)])
    raise IndexError(f"{name}[{where}] = {value} is out of range for an item table with {num_items} rows")


def _check_finite(name: str, value: Tensor, limit: float = math.inf) -> None:
    """ValueError naming the first NaN or infinity of ``value``, or (scales: ``limit`` =
    MAX_INVERSE_TEMPERATURE) the first value beyond ``±limit``; the cpu kernel raises the
    same messages."""
    if value.numel() and not bool(torch.isfinite(value).all()):
        bad = (~torch.isfinite(value)).nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite; {name}{bad} = {float(value[tuple(bad)])}")
    if math.isfinite(limit) and value.numel() and bool((value.abs() > limit).any()):
        bad = (value.abs() > limit).nonzero()[0].tolist()
        raise ValueError(
            f"{name} must be an inverse temperature with |value| <= {limit:g}; "
            f"{name}{bad} = {float(value[tuple(bad)]):g}"
        )


def _backend_for(backend: str, user: Tensor, items: Tensor) -> str:
    """The backend that runs this call: the resolved one, except that a cpu-backend call
    with a NaN or an infinity in the vectors runs on the reference backend (the cpu
    kernel's running-max log-sum-exp is written for finite scores; the reference
    propagates them as PyTorch does). Forward and backward of one call choose alike."""
    resolved = resolve_backend(backend, user.device.type)
    if resolved == "cpu" and not (torch.ops.adaptau.all_finite(user) and torch.ops.adaptau.all_finite(items)):
        return "reference"
    return resolved


def _checks_on_device(t: Tensor) -> bool:
    """True when the value checks of a call on ``t``'s device run as device-side asserts
    (CUDA, unless ``ADAPTAU_CHECK_INDICES=1``): no host synchronisation per call, and a bad
    value raises at the next synchronisation, with a message that names the argument."""
    return t.device.type == "cuda" and os.environ.get("ADAPTAU_CHECK_INDICES") != "1"


def _assert_values_async(
    num_items: int, pos: Tensor, neg: Tensor, pos_scale: Tensor, neg_scale: Tensor, neg_logq: Optional[Tensor]
) -> None:
    """:func:`_check_values` as ``torch._assert_async`` (queued on the device, never read
    back). A failed assert stops the device's queue before the backend's kernel runs, so
    no kernel reads through a bad index; ``ADAPTAU_CHECK_INDICES=1`` gives the exact
    messages of the host checks instead (one host read per check)."""
    for name, index in (("pos", pos), ("neg", neg)):
        if index.numel():
            torch._assert_async(
                ((index >= 0) & (index < num_items)).all(),
                f"{name}: an index is out of range for an item table with "
                f"{num_items} rows (ADAPTAU_CHECK_INDICES=1 names it)",
            )
    for name, scale in (("pos_scale", pos_scale), ("neg_scale", neg_scale)):
        torch._assert_async(
            (scale.abs() <= MAX_INVERSE_TEMPERATURE).all(),
            f"{name} must be finite with |value| <= {MAX_INVERSE_TEMPERATURE:g}",
        )
    if neg_logq is not None:
        torch._assert_async(torch.isfinite(neg_logq).all(), "neg_logq must be finite")


def _check_values(
    num_items: int, pos: Tensor, neg: Tensor, pos_scale: Tensor, neg_scale: Tensor, neg_logq: Optional[Tensor]
) -> None:
    if _checks_on_device(pos):
        _assert_values_async(num_items, pos, neg, pos_scale, neg_scale, neg_logq)
        return
    _check_index_range("pos", pos, num_items)
    _check_index_range("neg", neg, num_items)
    _check_finite("pos_scale", pos_scale, MAX_INVERSE_TEMPERATURE)
    _check_finite("neg_scale", neg_scale, MAX_INVERSE_TEMPERATURE)
    if neg_logq is not None:
        _check_finite("neg_logq", neg_logq)


# ------------------------------------------------------------------------- custom ops
# Two operators in the adaptau namespace (the C++ extension's TORCH_LIBRARY block holds the
# backends' own fused_forward / fused_backward): schemas defined here, one Python kernel
# each for every device (it picks the backend), a fake kernel so torch.compile can trace
# them, and the autograd formula. Registered with the plain torch.library API rather than
# the @torch.library.custom_op decorator: the decorator's per-call wrappers cost ~0.2 ms
# of Python per forward and again per backward, more than the fused CPU kernel itself
# at small batch sizes.
_LIB = torch.library.Library("adaptau", "FRAGMENT")
_LIB.define(
    "softmax_loss_forward(Tensor user, Tensor items, Tensor pos, Tensor neg, "
    "Tensor pos_scale, Tensor neg_scale, Tensor? neg_logq, int neg_mode, bool include_pos, "
    "bool normalize, bool remove_hits, bool compute_raw, str backend) -> (Tensor, Tensor, Tensor)"
)
_LIB.define(
    "softmax_loss_backward(Tensor grad_loss, Tensor user, Tensor items, Tensor pos, Tensor neg, "
    "Tensor pos_scale, Tensor neg_scale, Tensor? neg_logq, Tensor lse, int neg_mode, "
    "bool include_pos, bool normalize, bool remove_hits, bool need_scale_grads, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def _alert_not_deterministic(what: str) -> None:
    """PyTorch's error (or, with ``warn_only=True``, warning) for an op without a
    deterministic implementation under ``torch.use_deterministic_algorithms(True)``."""
    msg = (
        f"{what} does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for "
        "this operation, or you can use the 'warn_only=True' option, if that's acceptable "
        "for your application."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg)
    else:
        raise RuntimeError(msg)


@torch.compiler.disable
def _forward_kernel(
    user: Tensor,
    items: Tensor,
    pos: Tensor,
    neg: Tensor,
    pos_scale: Tensor,
    neg_scale: Tensor,
    neg_logq: Optional[Tensor],
    neg_mode: int,
    include_pos: bool,
    normalize: bool,
    remove_hits: bool,
    compute_raw: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    resolved = _backend_for(backend, user, items)
    # The cpu kernel checks the values itself, before it uses any, and raises the same
    # exceptions: every index (vectorized, while converting or sorting them; checking here
    # too would read the [B, M] negatives twice) and the scales' and neg_logq's finiteness
    # (here that would cost more than the whole kernel at small sizes).
    if resolved != "cpu":
        _check_values(items.shape[0], pos, neg, pos_scale, neg_scale, neg_logq)
    forward, _ = _implementation(resolved)
    loss, lse, raw = forward(
        user,
        items,
        pos,
        neg,
        pos_scale,
        neg_scale,
        neg_logq,
        neg_mode,
        include_pos,
        normalize,
        remove_hits,
        compute_raw,
    )
    return loss, lse, raw


@torch.compiler.disable
def _backward_kernel(
    grad_loss: Tensor,
    user: Tensor,
    items: Tensor,
    pos: Tensor,
    neg: Tensor,
    pos_scale: Tensor,
    neg_scale: Tensor,
    neg_logq: Optional[Tensor],
    lse: Tensor,
    neg_mode: int,
    include_pos: bool,
    normalize: bool,
    remove_hits: bool,
    need_scale_grads: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    resolved = _backend_for(backend, user, items)
    if resolved == "cuda" and torch.are_deterministic_algorithms_enabled():
        _alert_not_deterministic(
            "adaptau's cuda backend backward (its item gradient is "
            "accumulated with atomics; the triton backend has a "
            "deterministic mode)"
        )
    _, backward = _implementation(resolved)
    grad_user, grad_items, grad_pos_scale, grad_neg_scale = backward(
        grad_loss,
        user,
        items,
        pos,
        neg,
        pos_scale,
        neg_scale,
        neg_logq,
        lse,
        neg_mode,
        include_pos,
        normalize,
        remove_hits,
        need_scale_grads,
    )
    return grad_user, grad_items, grad_pos_scale, grad_neg_scale


_LIB.impl("softmax_loss_forward", _forward_kernel, "CompositeExplicitAutograd")
_LIB.impl("softmax_loss_backward", _backward_kernel, "CompositeExplicitAutograd")
_forward_op = torch.ops.adaptau.softmax_loss_forward.default
_backward_op = torch.ops.adaptau.softmax_loss_backward.default


def _autocast_kernel(op, dispatch_key):
    """The op's kernel under ``torch.autocast``: it runs with autocast off, in the dtype of
    its inputs (``softmax_loss`` has already cast ``user`` to the table's dtype), so a
    backend's internal products (the reference's matmuls) are not lowered to the autocast
    dtype. Losses stay float32 (float64 for float64 inputs)."""
    keys = torch._C.DispatchKeySet(dispatch_key)

    def kernel(_keyset, *args):
        with torch._C._ExcludeDispatchKeyGuard(keys):
            return op(*args)

    return kernel


for _device in ("cpu", "cuda"):
    _autocast_key = "Autocast" + torch._C._dispatch_key_for_device(_device)
    for _name, _op in (("softmax_loss_forward", _forward_op), ("softmax_loss_backward", _backward_op)):
        _LIB.impl(
            _name,
            _autocast_kernel(_op, getattr(torch._C.DispatchKey, _autocast_key)),
            _autocast_key,
            with_keyset=True,
        )


@torch.library.register_fake("adaptau::softmax_loss_forward", lib=_LIB)
def _forward_fake(
    user,
    items,
    pos,
    neg,
    pos_scale,
    neg_scale,
    neg_logq,
    neg_mode,
    include_pos,
    normalize,
    remove_hits,
    compute_raw,
    backend,
):
    acc = accumulation_dtype(user.dtype)
    batch = user.shape[0]
    loss = user.new_empty((batch,), dtype=acc)
    lse = user.new_empty((batch,), dtype=acc)
    raw = user.new_empty((batch if compute_raw else 0,), dtype=acc)
    return loss, lse, raw


@torch.library.register_fake("adaptau::softmax_loss_backward", lib=_LIB)
def _backward_fake(
    grad_loss,
    user,
    items,
    pos,
    neg,
    pos_scale,
    neg_scale,
    neg_logq,
    lse,
    neg_mode,
    include_pos,
    normalize,
    remove_hits,
    need_scale_grads,
    backend,
):
    return (
        torch.empty_like(user),
        torch.empty_like(items),
        torch.empty_like(pos_scale),
        torch.empty_like(neg_scale),
    )


def _setup_context(ctx, inputs, output):
    (
        user,
        items,
        pos,
        neg,
        pos_scale,
        neg_scale,
        neg_logq,
        neg_mode,
        include_pos,
        normalize,
        remove_hits,
        compute_raw,
        backend,
    ) = inputs
    ctx.save_for_backward(user, items, pos, neg, pos_scale, neg_scale, neg_logq, output[1])
    ctx.options = (neg_mode, include_pos, normalize, remove_hits, backend)


# once_differentiable: the fused backward is not itself differentiable, so a double
# backward (create_graph=True, then differentiating a gradient) raises PyTorch's usual
# error instead of silently giving zeros.
@torch.autograd.function.once_differentiable
def _backward(ctx, grad_loss, grad_lse, grad_raw):
    user, items, pos, neg, pos_scale, neg_scale, neg_logq, lse = ctx.saved_tensors
    neg_mode, include_pos, normalize, remove_hits, backend = ctx.options
    need = ctx.needs_input_grad
    need_scale_grads = bool(need[4] or need[5])
    grad_user, grad_items, grad_pos_scale, grad_neg_scale = _backward_op(
        grad_loss.contiguous(),
        user,
        items,
        pos,
        neg,
        pos_scale,
        neg_scale,
        neg_logq,
        lse,
        neg_mode,
        include_pos,
        normalize,
        remove_hits,
        need_scale_grads,
        backend,
    )
    return (
        grad_user if need[0] else None,
        grad_items if need[1] else None,
        None,
        None,
        grad_pos_scale if need[4] else None,
        grad_neg_scale if need[5] else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "adaptau::softmax_loss_forward", _backward, setup_context=_setup_context, lib=_LIB
)


# ---------------------------------------------------------------------- public function
def _as_scale(name: str, scale: ScaleLike, batch: int, like: Tensor, acc: torch.dtype) -> Tensor:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(scale).__name__}")
    if not isinstance(scale, Tensor):
        # (under torch.compile(dynamic=True) a float scale is symbolic: it becomes a tensor
        # here and the backend's own value checks below refuse a bad one)
        if torch.compiler.is_compiling():
            return torch.full((batch,), scale, dtype=acc, device=like.device)
        if not math.isfinite(scale):
            raise ValueError(f"{name} must be finite, got {scale}")
        if abs(scale) > MAX_INVERSE_TEMPERATURE:
            raise ValueError(
                f"{name} must be an inverse temperature with |value| <= "
                f"{MAX_INVERSE_TEMPERATURE:g}, got {scale:g}"
            )
        return torch.full((batch,), float(scale), dtype=acc, device=like.device)
    if not scale.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {scale.dtype}")
    if scale.device != like.device:
        raise ValueError(f"{name} is on {scale.device} but user is on {like.device}")
    if scale.dim() == 0 or (scale.dim() == 1 and scale.shape[0] == 1):
        return scale.reshape(()).to(acc).expand(batch).contiguous()
    if scale.dim() != 1 or scale.shape[0] != batch:
        raise ValueError(
            f"{name} must be a float, a scalar tensor or [B={batch}], got shape {tuple(scale.shape)}"
        )
    return scale.to(acc).contiguous()


def _check_index_tensor(name: str, index: Tensor, like: Tensor) -> None:
    if not isinstance(index, Tensor):
        raise TypeError(f"{name} must be an integer tensor, got {type(index).__name__}")
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {index.dtype}")
    if index.device != like.device:
        raise ValueError(f"{name} is on {index.device} but user is on {like.device}")


# ------------------------------------------------------------------- touched rows only
#: compact_indices (a bitmap of num_items bits) is used while num_items / 64 is at most this
#: many times the number of indices plus 2^20 words; beyond, torch.unique (a sort) is cheaper.
_COMPACT_BITMAP_RATIO = 4


if _extension.has_op("compact_indices"):

    @torch.library.register_fake("adaptau::compact_indices", lib=_LIB)
    def _compact_indices_fake(pos: Tensor, neg: Tensor, num_items: int):
        """Output shapes for FakeTensor tracing: ``unique_ids`` has a data-dependent length."""
        count = torch.library.get_ctx().new_dynamic_size()
        return pos.new_empty((count,), dtype=torch.int64), torch.empty_like(pos), torch.empty_like(neg)


def compact(
    pos: Tensor, neg: Optional[Tensor] = None, *, num_items: Optional[int] = None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The distinct items a batch touches, and its indices as positions among them.

    For callers who look rows up themselves (a sharded embedding collection, a cache, any
    table that is not one dense tensor): gather ``table[unique_ids]`` into a compact
    ``[K, D]`` tensor and call :func:`softmax_loss` with it and the local indices; the
    loss is the same as on the full table, and the gradient reaches only the K rows.

    Args:
        pos: ``[B]`` int32/int64 positive items.
        neg: per-row ``[B, M]`` or shared ``[M]`` negatives (int32/int64), or ``None``
            (in-batch negatives are the positives themselves).
        num_items: the catalog size N, for the range check (default: max index + 1).

    Returns:
        ``(unique_ids, pos_local, neg_local)``: ``unique_ids`` ``[K]`` int64, ascending;
        ``pos_local`` (``[B]``) and ``neg_local`` (``neg``'s shape, or ``None``) in the
        dtypes of ``pos`` and ``neg``, with ``unique_ids[pos_local] == pos``.

    Raises:
        TypeError: non-integer or non-tensor indices.
        IndexError: an index outside ``[0, num_items)`` (the message names it).
    """
    _check_index_tensor("pos", pos, pos)
    if neg is not None:
        _check_index_tensor("neg", neg, pos)
    parts = [("pos", pos)] + ([("neg", neg)] if neg is not None else [])
    if num_items is None:
        num_items = 1 + max((int(t.max()) for _, t in parts if t.numel()), default=0)
    num_items = int(num_items)
    total = sum(t.numel() for _, t in parts)
    if (
        pos.device.type == "cpu"
        and num_items < 2**31
        and num_items // 64 <= _COMPACT_BITMAP_RATIO * total + 2**20
        and _extension.has_op("compact_indices")
    ):
        unique_ids, pos_local, neg_local = torch.ops.adaptau.compact_indices(
            pos, neg if neg is not None else pos.new_empty((0,)), num_items
        )
        if unique_ids.numel() == 0 and total:  # an index is out of range: name it
            for name, t in parts:
                _check_index_range(name, t, num_items)
        return unique_ids, pos_local, (neg_local if neg is not None else None)
    for name, t in parts:
        _check_index_range(name, t, num_items)
    flat = torch.cat([t.reshape(-1).long() for _, t in parts])
    unique_ids, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    pos_local = inverse[: pos.numel()].to(pos.dtype).reshape(pos.shape)
    neg_local = None if neg is None else inverse[pos.numel() :].to(neg.dtype).reshape(neg.shape)
    return unique_ids, pos_local, neg_local


class _TouchedRows(torch.autograd.Function):
    """``items[ids]`` (``ids`` unique and ascending) whose gradient is a sparse COO ``[N, D]``
    tensor with one row per id, in ascending order, built as coalesced (what
    ``torch.autograd.grad`` returns; ``F.embedding(sparse=True)`` gives one row per lookup
    instead). PyTorch's gradient accumulation into ``.grad`` may re-wrap it without the
    coalesced flag; its rows stay unique and ordered."""

    @staticmethod
    def forward(ctx, items: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.table_shape = items.shape
        return items.index_select(0, ids)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(
            ids.unsqueeze(0), grad, ctx.table_shape, is_coalesced=True, check_invariants=False
        ), None


def softmax_loss(
    user: Tensor,
    items: Tensor,
    pos: Tensor,
    neg: Optional[Tensor],
    pos_scale: ScaleLike,
    neg_scale: ScaleLike,
    *,
    include_pos: bool = False,
    normalize: bool = True,
    neg_logq: Optional[Tensor] = None,
    remove_accidental_hits: bool = False,
    reduction: str = "mean",
    return_raw: bool = False,
    backend: str = "auto",
    item_grad: str = "dense",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Fused sampled-softmax loss over cosine (or dot) scores with per-row temperatures.

    For row ``b`` with positive ``p = pos[b]`` and negatives ``n_1 … n_M``::

        loss_b = −α_b·ŝ(b,p) + log( [include_pos]·exp(α_b·ŝ(b,p))
                                    + Σ_m keep_m·exp(β_b·ŝ(b,n_m) − logq[n_m]) )

    where ŝ is the cosine of ``user[b]`` and the item row (the dot product when
    ``normalize=False``), α = ``pos_scale``, β = ``neg_scale`` (inverse temperatures),
    and ``keep_m = 0`` for a negative equal to the positive when
    ``remove_accidental_hits``. A row whose denominator is empty contributes 0.

    Args:
        user: ``[B, D]`` float tensor of query vectors.
        items: ``[N, D]`` item table on ``user``'s device. When the dtypes differ, ``user``
            is cast to the table's dtype (the table is never copied), so a bf16 tower under
            ``torch.autocast`` works with an fp32 table; the loss is computed as for two
            tensors of the table's dtype.
        pos: ``[B]`` int32/int64, each row's positive item index (taken to ``neg``'s
            dtype when they differ).
        neg: ``[B, M]`` per-row negatives, ``[M]`` negatives shared by every row,
            ``None`` for in-batch negatives (row b uses the other rows' positives; B ≥ 2),
            or :class:`adaptau.Negatives` (or a mapping of its fields) to mix in-batch,
            shared and per-row negatives in one softmax, each with its own logQ
            (:mod:`adaptau.loss.mixed`).
        pos_scale: float, scalar tensor or ``[B]`` tensor: α (may require grad).
        neg_scale: float, scalar tensor or ``[B]`` tensor: β (may require grad).
        include_pos: put the positive in the denominator (textbook softmax).
        normalize: L2-normalize user and item vectors (norms clamped at 1e-12).
        neg_logq: optional ``[N]`` log sampling probabilities, subtracted from each
            scaled negative logit (sampled-softmax correction).
        remove_accidental_hits: drop negatives equal to the row's positive.
        reduction: ``"mean"`` (over rows), ``"sum"`` or ``"none"`` (``[B]``).
        return_raw: also return ``raw`` ``[B]``: the per-row loss with α = β = 1,
            detached (what :class:`adaptau.AdapTau` observes).
        backend: ``"auto"`` (fastest available for the device), ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"``; see :func:`available_backends`.

        item_grad: ``"dense"`` (``items.grad`` is a dense ``[N, D]`` tensor) or
            ``"sparse"``: only the rows the batch touches are gathered, computed and
            returned, as a coalesced sparse COO ``[N, D]`` gradient with one row per
            touched item (as ``nn.Embedding(sparse=True)``), for ``torch.optim.SparseAdam``
            or ``Adagrad``; no work proportional to N. Same loss and gradient values.

    Returns:
        The loss (scalar, or ``[B]`` for ``reduction="none"``) in float32 (float64 for
        float64 inputs); with ``return_raw``, the pair ``(loss, raw)``.

    Raises:
        TypeError: wrong tensor or dtype (non-float vectors, non-integer indices).
        ValueError: wrong rank or shape, device mismatch, empty negative set, in-batch
            with one row, non-finite scale or ``neg_logq``, unknown option.
        IndexError: an index outside ``[0, N)`` (the message names it).
    """
    if isinstance(neg, (Negatives, Mapping)):
        if neg_logq is not None:
            raise ValueError(
                "neg_logq is for a single negative source; with adaptau.Negatives give "
                "each source's own (in_batch_logq, shared_logq, per_row_logq)"
            )
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        return mixed_softmax_loss(
            user,
            items,
            pos,
            neg,
            pos_scale,
            neg_scale,
            include_pos=include_pos,
            normalize=normalize,
            remove_accidental_hits=remove_accidental_hits,
            reduction=reduction,
            return_raw=return_raw,
            backend=backend,
            item_grad=item_grad,
        )
    for name, t in (("user", user), ("items", items)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if items.device != user.device:
        raise ValueError(f"items is on {items.device} but user is on {user.device}")
    if items.dtype != user.dtype:
        # The table's dtype rules: the [B, D] query rows are cast to it (a bf16 tower over an
        # fp32 table, as under torch.autocast), never the [N, D] table; autograd casts the
        # user gradient back.
        user = user.to(items.dtype)
    batch, dim = user.shape
    num_items = items.shape[0]
    if batch == 0:
        raise ValueError("user is empty: the batch needs at least one row")
    if dim == 0 or items.shape[1] != dim:
        raise ValueError(
            f"user is [B, {dim}] but items is {list(items.shape)}: the vector "
            "sizes must match and be non-zero"
        )
    if num_items == 0:
        raise ValueError("items is empty: the item table needs at least one row")
    _check_index_tensor("pos", pos, user)
    if pos.dim() != 1 or pos.shape[0] != batch:
        raise ValueError(f"pos must be [B={batch}], got shape {tuple(pos.shape)}")

    if neg is None:
        if batch < 2:
            raise ValueError("in-batch negatives (neg=None) need at least 2 rows")
        neg_mode = NEG_IN_BATCH
        neg = pos.new_empty((0,))
    else:
        _check_index_tensor("neg", neg, user)
        if neg.dim() == 2:
            if neg.shape[0] != batch:
                raise ValueError(f"per-row neg must be [B={batch}, M], got {tuple(neg.shape)}")
            neg_mode = NEG_PER_ROW
        elif neg.dim() == 1:
            neg_mode = NEG_SHARED
        else:
            raise ValueError(f"neg must be [B, M], [M] or None, got shape {tuple(neg.shape)}")
        if neg.shape[-1] == 0:
            raise ValueError("the negative set is empty (M = 0)")
    if pos.dtype != neg.dtype:
        # pos ([B]) takes neg's dtype: neg is the big one, and int32 negatives (the CPU
        # trainer's sampler) stay int32. Narrowing is safe once pos is known to be in range.
        if neg.dtype == torch.int32:
            if _checks_on_device(pos):
                torch._assert_async(
                    ((pos >= 0) & (pos < num_items)).all(),
                    f"pos: an index is out of range for an item table with "
                    f"{num_items} rows (ADAPTAU_CHECK_INDICES=1 names it)",
                )
            else:
                _check_index_range("pos", pos, num_items)
        pos = pos.to(neg.dtype)

    acc = accumulation_dtype(user.dtype)
    alpha = _as_scale("pos_scale", pos_scale, batch, user, acc)
    beta = _as_scale("neg_scale", neg_scale, batch, user, acc)
    if neg_logq is not None:
        if not isinstance(neg_logq, Tensor) or not neg_logq.is_floating_point():
            raise TypeError("neg_logq must be a floating tensor")
        if neg_logq.dim() != 1 or neg_logq.shape[0] != num_items:
            raise ValueError(f"neg_logq must be [N={num_items}], got {tuple(neg_logq.shape)}")
        if neg_logq.device != user.device:
            raise ValueError(f"neg_logq is on {neg_logq.device} but user is on {user.device}")
        neg_logq = neg_logq.detach().to(acc).contiguous()
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if item_grad not in ("dense", "sparse"):
        raise ValueError(f"item_grad must be 'dense' or 'sparse', got {item_grad!r}")
    if item_grad == "sparse":  # the batch's own rows as a [K, D] table; local indices
        ids, pos, neg_local = compact(pos, None if neg_mode == NEG_IN_BATCH else neg, num_items=num_items)
        neg = neg if neg_local is None else neg_local
        items = _TouchedRows.apply(items, ids)
        if neg_logq is not None:
            neg_logq = neg_logq[ids]
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")

    loss, _lse, raw = _forward_op(
        user.contiguous(),
        items.contiguous(),
        pos.contiguous(),
        neg.contiguous(),
        alpha,
        beta,
        neg_logq,
        neg_mode,
        bool(include_pos),
        bool(normalize),
        bool(remove_accidental_hits),
        bool(return_raw),
        backend,
    )
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    if return_raw:
        return loss, raw.detach()
    return loss
