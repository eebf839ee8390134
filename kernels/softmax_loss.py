"""Triton forward/backward of the fused sampled-softmax loss (contract: ``adaptau.loss._contract``).

Layout of the work
------------------
* ``_inv_norm_kernel``: a small pre-pass, ``r = 1 / max(||x||, 1e-12)`` for every user row
  and for the item rows the call touches (only with ``normalize``). Scores are computed on
  the *raw* vectors and scaled afterwards, ``ŝ = <u, i>·r_u·r_i``, so half-precision
  inputs feed the dot products unrounded and nothing normalized is ever written back.
* Per-row negatives (``neg_mode == 0``): one program per row; it gathers ``BLOCK_M`` item
  rows by index into registers, dots them with the row's user vector and keeps a running
  max / sum (log-sum-exp). No ``[B, M, D]`` tensor exists anywhere.
* Shared (``1``) and in-batch (``2``) negatives: the candidate list is common to every row,
  so scores are ``tl.dot`` tiles ``[BLOCK_B, BLOCK_N]`` with a flash-style running max, on
  a 2-D grid (flash-decoding): axis 0 blocks of rows, axis 1 ``NSPLIT`` slices of the
  candidates, each program writing a partial (max, scaled sum); ``_fwd_merge_kernel``
  merges them per row and adds the positive. The backward recomputes the scores from
  ``lse``: a row kernel on the same grid writes partial user gradients, scale-gradient
  sums and probability masses, ``_bwd_rows_finish_kernel`` adds them up per row (positive
  term, Jacobian); a column kernel (blocks of candidates × slices of the rows) writes
  partial candidate gradients ``Wᵀ·Û``, summed over the slices in a fixed order.
  ``NSPLIT`` gives about two programs per SM (``_split_count``); the block shapes are
  autotuned, keyed on ``(B, M, D)``.
* Item gradients: ``"atomic"`` adds ``w·û`` into an fp32 (fp64 for fp64 inputs) ``[N, D]``
  buffer with atomics, then ``_item_finalize_kernel`` applies the normalization Jacobian
  and casts; ``"segment"`` writes the per-pair weights, sorts the (item, contribution)
  list by item and lets one program own each item's run (deterministic, no atomics, the
  Jacobian fused in).
* Touched rows: when a call's indices (positives and negatives, repeats included) are
  fewer than the table's rows, the inverse norms, the finalize pass and the segment
  programs run over those indices, each distinct row once (``_touched``), so no kernel
  launches work proportional to N; a dense ``[N, D]`` gradient still needs its zero fill.

Modules
-------
This module holds the entry points (``forward``, ``backward``, the item-gradient mode) and
the host side that allocates and launches the work; ``launch`` holds the launch choices
(block sizes, warps, dot precision, grid split) and the launch and buffer wrappers. The
kernels:
``norm_kernels`` (``_inv_norm_kernel``, the normalization Jacobian), ``row_kernels``
(per-row negatives), ``tile_fwd_kernels`` and ``tile_bwd_kernels`` (shared and in-batch
negatives; their grid split, block-shape tuning and score tile in ``_tile_common``),
``item_grad_kernels`` (finalize and segment); ``_jit_common`` holds the ``@triton.jit``
helpers several of them call.

Accumulation is float32 for float16/bfloat16/float32 inputs and float64 for float64
inputs (float64 is computed in float64, also in ``tl.dot``). float32 ``tl.dot`` runs with
``input_precision="ieee"`` by default (TF32 would cost ~1e-3 relative in the cosines, i.e.
whole units of logit at inverse temperatures ~1e3), with ``"tf32"`` while
``torch.backends.cuda.matmul.allow_tf32`` is True; ``ADAPTAU_TRITON_FP32_DOT=ieee|tf32|tf32x3``
overrides both.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from ..loss._contract import NEG_IN_BATCH, NEG_PER_ROW, NEG_SHARED, NORM_EPS
from ..loss._contract import accumulation_dtype as _acc_dtype
from .item_grad_kernels import _item_finalize_kernel, _item_segment_kernel
from .launch import (
    _TL_DTYPES,
    _block_d,
    _bwd_rows_warps,
    _dot_precision,
    _empty,
    _launch,
    _num_warps,
    _row_block,
    _rows_block_m,
    _rows_block_m_bwd,
    _score_chunk,
    _split_count,
    _tune_tag,
)
from .norm_kernels import _inv_norm_kernel
from .row_kernels import _bwd_rows_kernel, _fwd_rows_kernel
from .tile_bwd_kernels import _bwd_rows_finish_kernel, _bwd_tiles_cols_kernel, _bwd_tiles_rows_kernel
from .tile_fwd_kernels import _fwd_merge_kernel, _fwd_tiles_kernel

ITEM_GRAD_MODES = ("atomic", "segment")
_item_grad_mode = os.environ.get("ADAPTAU_TRITON_ITEM_GRAD", "atomic").strip().lower() or "atomic"
if _item_grad_mode not in ITEM_GRAD_MODES:
    raise ValueError(f"ADAPTAU_TRITON_ITEM_GRAD must be one of {ITEM_GRAD_MODES}, got {_item_grad_mode!r}")


def set_item_grad_mode(mode: str) -> None:
    """Select how item gradients are accumulated: ``"atomic"`` or ``"segment"``."""
    global _item_grad_mode
    if mode not in ITEM_GRAD_MODES:
        raise ValueError(f"item grad mode must be one of {ITEM_GRAD_MODES}, got {mode!r}")
    _item_grad_mode = mode


def get_item_grad_mode() -> str:
    """The item-gradient mode that :func:`set_item_grad_mode` (or the environment) chose."""
    return _item_grad_mode


def effective_item_grad_mode() -> str:
    """The mode a backward uses: ``"segment"`` whenever
    ``torch.use_deterministic_algorithms(True)`` is on (atomics add in a varying order),
    else the chosen one."""
    return "segment" if torch.are_deterministic_algorithms_enabled() else _item_grad_mode


def _check_device(t: Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise RuntimeError(
        f"adaptau triton backend: tensors on {t.device} are not supported (CUDA tensors, or "
        "CPU tensors with TRITON_INTERPRET=1 set before Triton is imported)"
    )


def _touched(num_items: int, parts, device: torch.device):
    """``(keys, owner)`` for a call whose item indices (``parts``) are fewer than the table's
    rows, else ``None`` (work on every row). ``keys`` is every index of the call (with
    repeats); ``owner[keys[j]]`` is one position j' with ``keys[j'] == keys[j]``, so the
    per-row passes launch over ``keys`` and each distinct row is done once; ``owner``'s
    other N entries are never written nor read (no work proportional to N)."""
    total = sum(t.numel() for t in parts)
    if total >= num_items:
        return None
    keys = torch.cat([t.reshape(-1).long() for t in parts])
    dtype = torch.int32 if total < 2**31 else torch.int64
    owner = _empty(num_items, dtype, device)
    owner.index_put_((keys,), torch.arange(total, dtype=dtype, device=device))
    return keys, owner


def _inv_norms(x: Tensor, acc: torch.dtype, touched=None) -> Tensor:
    """``1 / max(||x_r||, eps)`` for every row of ``x``, or only for the rows in ``touched``
    (the other entries are left unset)."""
    rows, dim = x.shape
    out = _empty(rows, acc, x.device)
    block_d = min(_block_d(dim), 256)
    block_r = _row_block(block_d)
    keys, owner = touched if touched is not None else (out, out)
    count = keys.numel() if touched is not None else rows
    _launch(
        _inv_norm_kernel,
        (triton.cdiv(count, block_r),),
        x,
        out,
        keys,
        owner,
        count,
        dim,
        NORM_EPS,
        KEYED=touched is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        ACC=_TL_DTYPES[acc],
    )
    return out


def _neg_parts(pos: Tensor, neg: Tensor, neg_mode: int):
    return (pos,) if neg_mode == NEG_IN_BATCH else (pos, neg)


def forward(
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
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backend forward (contract in :mod:`adaptau.loss._contract`): ``(loss, lse, raw or [0])``."""
    _check_device(user)
    batch, dim = user.shape
    acc = _acc_dtype(user.dtype)
    tl_acc = _TL_DTYPES[acc]
    dev = user.device
    dummy = torch.empty(1, dtype=acc, device=dev)
    ru = _inv_norms(user, acc) if normalize else dummy
    if normalize:
        ri = _inv_norms(items, acc, _touched(items.shape[0], _neg_parts(pos, neg, neg_mode), dev))
    else:
        ri = dummy
    loss = _empty(batch, acc, dev)
    lse = _empty(batch, acc, dev)
    raw = _empty(batch if compute_raw else 0, acc, dev)
    raw_arg = raw if compute_raw else dummy
    logq = neg_logq if neg_logq is not None else dummy
    block_d = _block_d(dim)
    if neg_mode == NEG_PER_ROW:
        m = neg.shape[1]
        block_m = _rows_block_m(block_d, m)
        _launch(
            _fwd_rows_kernel,
            (batch,),
            user,
            items,
            pos,
            neg,
            pos_scale,
            neg_scale,
            logq,
            ru,
            ri,
            loss,
            lse,
            raw_arg,
            m,
            dim,
            HAS_LOGQ=neg_logq is not None,
            INCLUDE_POS=bool(include_pos),
            NORMALIZE=bool(normalize),
            REMOVE_HITS=bool(remove_hits),
            COMPUTE_RAW=bool(compute_raw),
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            ACC=tl_acc,
            num_warps=_num_warps(block_m * block_d),
        )
    elif neg_mode in (NEG_SHARED, NEG_IN_BATCH):
        cand = neg if neg_mode == NEG_SHARED else pos
        m = cand.shape[0]
        nsplit = _split_count(triton.cdiv(batch, 64), triton.cdiv(m, 128), dev)
        part = _empty((4 if compute_raw else 2) * nsplit * batch, acc, dev)
        _launch(
            _fwd_tiles_kernel,
            lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), nsplit),
            user,
            items,
            pos,
            cand,
            neg_scale,
            logq,
            ru,
            ri,
            part,
            batch,
            m,
            dim,
            nsplit,
            _tune_tag(),
            IN_BATCH=neg_mode == NEG_IN_BATCH,
            HAS_LOGQ=neg_logq is not None,
            NORMALIZE=bool(normalize),
            REMOVE_HITS=bool(remove_hits),
            COMPUTE_RAW=bool(compute_raw),
            BLOCK_D=block_d,
            BLOCK_K=_score_chunk(user.dtype, block_d),
            ACC=tl_acc,
            DOT_PRECISION=_dot_precision(user.dtype),
        )
        block_dm = min(block_d, 128)
        block_r = max(1, min(64, 2048 // block_dm))
        _launch(
            _fwd_merge_kernel,
            (triton.cdiv(batch, block_r),),
            user,
            items,
            pos,
            pos_scale,
            ru,
            ri,
            part,
            loss,
            lse,
            raw_arg,
            batch,
            dim,
            nsplit,
            INCLUDE_POS=bool(include_pos),
            NORMALIZE=bool(normalize),
            COMPUTE_RAW=bool(compute_raw),
            BLOCK_R=block_r,
            BLOCK_D=block_dm,
            ACC=tl_acc,
        )
    else:
        raise ValueError(f"unknown neg_mode {neg_mode}")
    return loss, lse, raw


def _segment_reduce(
    keys: Tensor,
    weights: Tensor,
    src_rows: Tensor,
    src: Tensor,
    items: Tensor,
    ri: Tensor,
    normalize: bool,
    acc: torch.dtype,
) -> Tensor:
    """grad_items[i] = J_i · Σ_{j: keys[j]=i} weights[j]·src[src_rows[j]] (J_i: normalization).

    With at least as many contributions as table rows, one program per row; with fewer,
    one program per contribution, the first of each item's sorted run doing the work, and
    the other rows are zeros (no work proportional to the table beyond that fill)."""
    num_items, dim = items.shape
    keys = keys.long()
    sorted_keys, order = torch.sort(keys, stable=True)
    w_sorted = weights.index_select(0, order).contiguous()
    rows_sorted = src_rows.index_select(0, order).contiguous()
    block_d = _block_d(dim)
    block_p = max(16, min(64, 4096 // block_d))
    if keys.numel() < num_items:
        starts = torch.searchsorted(sorted_keys, sorted_keys)
        ends = torch.searchsorted(sorted_keys, sorted_keys, right=True)
        grad_items = torch.zeros_like(items)
        grid, item_ids, keyed = (keys.numel(),), sorted_keys, True
    else:
        counts = torch.bincount(sorted_keys, minlength=num_items)
        starts = torch.zeros(num_items + 1, dtype=torch.int64, device=items.device)
        torch.cumsum(counts, 0, out=starts[1:])
        ends = item_ids = starts
        grad_items = _empty(items.shape, items.dtype, items.device)
        grid, keyed = (num_items,), False
    _launch(
        _item_segment_kernel,
        grid,
        starts,
        ends,
        item_ids,
        w_sorted,
        rows_sorted,
        src.contiguous(),
        items,
        ri,
        grad_items,
        dim,
        NORMALIZE=bool(normalize),
        KEYED=keyed,
        BLOCK_P=block_p,
        BLOCK_D=block_d,
        ACC=_TL_DTYPES[acc],
    )
    return grad_items


def backward(
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
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backend backward: ``(grad_user, grad_items, grad_pos_scale, grad_neg_scale)``."""
    _check_device(user)
    batch, dim = user.shape
    num_items = items.shape[0]
    acc = _acc_dtype(user.dtype)
    tl_acc = _TL_DTYPES[acc]
    dev = user.device
    atomic = effective_item_grad_mode() == "atomic"
    dummy = torch.empty(1, dtype=acc, device=dev)
    needs_rows = normalize or (atomic and items.dtype != acc)
    touched = _touched(num_items, _neg_parts(pos, neg, neg_mode), dev) if needs_rows else None
    ru = _inv_norms(user, acc) if normalize else dummy
    ri = _inv_norms(items, acc, touched) if normalize else dummy
    logq = neg_logq if neg_logq is not None else dummy
    grad_loss = grad_loss.to(acc).contiguous()
    lse = lse.to(acc).contiguous()
    grad_user = _empty(user.shape, user.dtype, dev)
    galpha = _empty(batch, acc, dev)
    gbeta = _empty(batch, acc, dev)
    gi = torch.zeros((num_items, dim), dtype=acc, device=dev) if atomic else dummy
    wpos = dummy if atomic else _empty(batch, acc, dev)
    block_d = _block_d(dim)
    flags = dict(
        HAS_LOGQ=neg_logq is not None,
        NORMALIZE=bool(normalize),
        REMOVE_HITS=bool(remove_hits),
        BLOCK_D=block_d,
        ACC=tl_acc,
    )

    if neg_mode == NEG_PER_ROW:
        m = neg.shape[1]
        w = dummy if atomic else _empty((batch, m), acc, dev)
        block_m = _rows_block_m_bwd(block_d, m)
        _launch(
            _bwd_rows_kernel,
            (batch,),
            grad_loss,
            user,
            items,
            pos,
            neg,
            pos_scale,
            neg_scale,
            logq,
            lse,
            ru,
            ri,
            grad_user,
            gi,
            w,
            wpos,
            galpha,
            gbeta,
            m,
            dim,
            INCLUDE_POS=bool(include_pos),
            ATOMIC=atomic,
            BLOCK_M=block_m,
            num_warps=_bwd_rows_warps(block_d, block_m),
            **flags,
        )
        if not atomic:
            src = user.to(acc) * ru[:, None] if normalize else user.to(acc)
            rows = torch.arange(batch, device=dev)
            keys = torch.cat([neg.reshape(-1).long(), pos.long()])
            weights = torch.cat([w.reshape(-1), wpos])
            src_rows = torch.cat([rows.repeat_interleave(m), rows])
            grad_items = _segment_reduce(keys, weights, src_rows, src, items, ri, normalize, acc)
    elif neg_mode in (NEG_SHARED, NEG_IN_BATCH):
        cand = neg if neg_mode == NEG_SHARED else pos
        m = cand.shape[0]
        tiles = dict(
            IN_BATCH=neg_mode == NEG_IN_BATCH,
            DOT_PRECISION=_dot_precision(user.dtype),
            BLOCK_K=_score_chunk(user.dtype, block_d),
            **flags,
        )
        tag = _tune_tag()
        nsplit = _split_count(triton.cdiv(batch, 64), triton.cdiv(m, 128), dev)
        gu_part = _empty((nsplit, batch, dim), acc, dev)
        sums_part = _empty(2 * nsplit * batch, acc, dev)
        _launch(
            _bwd_tiles_rows_kernel,
            lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), nsplit),
            grad_loss,
            user,
            items,
            pos,
            cand,
            neg_scale,
            logq,
            lse,
            ru,
            ri,
            gu_part,
            sums_part,
            batch,
            m,
            dim,
            nsplit,
            tag,
            **tiles,
        )
        block_r = max(1, min(32, 2048 // block_d))
        _launch(
            _bwd_rows_finish_kernel,
            (triton.cdiv(batch, block_r),),
            grad_loss,
            user,
            items,
            pos,
            pos_scale,
            lse,
            ru,
            ri,
            gu_part,
            sums_part,
            grad_user,
            gi,
            wpos,
            galpha,
            gbeta,
            batch,
            dim,
            nsplit,
            INCLUDE_POS=bool(include_pos),
            NORMALIZE=bool(normalize),
            ATOMIC=atomic,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            ACC=tl_acc,
        )
        nsplit_c = _split_count(triton.cdiv(m, 64), triton.cdiv(batch, 128), dev)
        gc_part = _empty((nsplit_c, m, dim), acc, dev)
        _launch(
            _bwd_tiles_cols_kernel,
            lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), nsplit_c),
            grad_loss,
            user,
            items,
            pos,
            cand,
            neg_scale,
            logq,
            lse,
            ru,
            ri,
            gc_part,
            batch,
            m,
            dim,
            nsplit_c,
            tag,
            **tiles,
        )
        gcand = gc_part[0] if nsplit_c == 1 else gc_part.sum(0)  # fixed order: deterministic
        if atomic:
            gi.index_add_(0, cand.long(), gcand)
        else:
            u_src = user.to(acc) * ru[:, None] if normalize else user.to(acc)
            src = torch.cat([u_src, gcand])
            keys = torch.cat([pos.long(), cand.long()])
            weights = torch.cat([wpos, torch.ones(m, dtype=acc, device=dev)])
            src_rows = torch.arange(batch + m, device=dev)
            grad_items = _segment_reduce(keys, weights, src_rows, src, items, ri, normalize, acc)
    else:
        raise ValueError(f"unknown neg_mode {neg_mode}")

    if atomic:
        if not normalize and items.dtype == acc:
            grad_items = gi
        else:
            if touched is None:
                grad_items, count = _empty(items.shape, items.dtype, dev), num_items
                keys = owner = gi
            else:
                keys, owner = touched
                grad_items = gi if items.dtype == acc else torch.zeros_like(items)
                count = keys.numel()
            block_r = _row_block(block_d)
            _launch(
                _item_finalize_kernel,
                (triton.cdiv(count, block_r),),
                gi,
                items,
                ri,
                grad_items,
                keys,
                owner,
                count,
                dim,
                NORMALIZE=bool(normalize),
                KEYED=touched is not None,
                BLOCK_R=block_r,
                BLOCK_D=block_d,
                ACC=tl_acc,
            )
    # need_scale_grads: the scale gradients cost nothing extra, so they are always computed
    return grad_user, grad_items, galpha, gbeta
