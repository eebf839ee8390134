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

Accumulation is float32 for float16/bfloat16/float32 inputs and float64 for float64
inputs (float64 is computed in float64, also in ``tl.dot``). float32 ``tl.dot`` runs with
``input_precision="ieee"`` by default (TF32 would cost ~1e-3 relative in the cosines, i.e.
whole units of logit at inverse temperatures ~1e3), with ``"tf32"`` while
``torch.backends.cuda.matmul.allow_tf32`` is True; ``ADAPTAU_TRITON_FP32_DOT=ieee|tf32|tf32x3``
overrides both.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..loss._contract import NEG_IN_BATCH, NEG_PER_ROW, NEG_SHARED, NORM_EPS
from ..loss._contract import accumulation_dtype as _acc_dtype

ITEM_GRAD_MODES = ("atomic", "segment")
_item_grad_mode = os.environ.get("ADAPTAU_TRITON_ITEM_GRAD", "atomic").strip().lower() or "atomic"
if _item_grad_mode not in ITEM_GRAD_MODES:
    raise ValueError(f"ADAPTAU_TRITON_ITEM_GRAD must be one of {ITEM_GRAD_MODES}, got {_item_grad_mode!r}")
#: ``tl.dot``'s input precision for float32 inputs when set (``ieee``, ``tf32``, ``tf32x3``);
#: empty: ``"tf32"`` while ``torch.backends.cuda.matmul.allow_tf32`` is True, else ``"ieee"``.
FP32_DOT_PRECISION = os.environ.get("ADAPTAU_TRITON_FP32_DOT", "").strip().lower()
if FP32_DOT_PRECISION not in ("", "ieee", "tf32", "tf32x3"):
    raise ValueError(f"ADAPTAU_TRITON_FP32_DOT must be ieee, tf32 or tf32x3, got {FP32_DOT_PRECISION!r}")


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


# ================================================================================ kernels
@triton.jit
def _touched_rows(j, jmask, keys_ptr, owner_ptr, KEYED: tl.constexpr):
    """Rows ``j`` of a launch over all rows (``KEYED`` false), or over the touched-row list
    ``keys``: then the row is ``keys[j]`` and only its owner (``owner[keys[j]] == j``, one
    position per distinct row) works on it."""
    if KEYED:
        rows = tl.load(keys_ptr + j, mask=jmask, other=0).to(tl.int64)
        own = tl.load(owner_ptr + rows, mask=jmask, other=-1)
        mask = jmask & (own == j)
    else:
        rows = j.to(tl.int64)
        mask = jmask
    return rows, mask


@triton.jit
def _inv_norm_kernel(
    x_ptr,
    out_ptr,
    keys_ptr,
    owner_ptr,
    R,
    D,
    EPS,
    KEYED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows, rmask = _touched_rows(j, j < R, keys_ptr, owner_ptr, KEYED)
    sq = tl.zeros([BLOCK_R], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(
            x_ptr + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & (cols < D)[None, :], other=0
        ).to(ACC)
        sq += tl.sum(x * x, 1)
    tl.store(out_ptr + rows, 1.0 / tl.maximum(tl.sqrt(sq), EPS), mask=rmask)


@triton.jit
def _normalize_bwd(x, gh, r):
    """Rows of ``x / max(||x||, eps)``: Jacobian-transpose applied to ``gh`` ([R, BD])."""
    xh = x * r[:, None]
    proj = gh - xh * tl.sum(xh * gh, 1)[:, None]
    valid = tl.sum(x * x, 1) > 1e-24  # ||x|| > eps: else the map is x/eps, linear
    return tl.where(valid[:, None], proj, gh) * r[:, None]


@triton.jit
def _lse_fold(m_run, s_run, logit):
    """Online log-sum-exp, elementwise: fold ``logit`` (−inf = absent) into (max, scaled sum)."""
    m_new = tl.maximum(m_run, logit)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s_run * tl.exp(m_run - m_safe) + tl.exp(logit - m_safe)


@triton.jit
def _lse_fold_tile(m_run, s_run, logit):
    """Online log-sum-exp over the columns of a ``[rows, cols]`` tile of logits."""
    m_new = tl.maximum(m_run, tl.max(logit, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(logit - m_safe[:, None]), 1)


@triton.jit
def _with_positive(lse, pos_logit, INCLUDE_POS: tl.constexpr):
    """log(exp(lse) + exp(pos_logit)) when the positive is in the denominator."""
    if INCLUDE_POS:
        top = tl.maximum(lse, pos_logit)
        lse = top + tl.log(tl.exp(lse - top) + tl.exp(pos_logit - top))
    return lse


@triton.jit
def _chunked_scores(
    user_ptr,
    items_ptr,
    rows,
    rmask,
    idx,
    cmask,
    D,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Raw scores ``<user[rows], items[idx]>`` as ``BLOCK_D / BLOCK_K`` dots over ``BLOCK_K``
    columns each, loaded chunk by chunk: the operands a thread holds stay ``BLOCK_K`` wide
    (float32/float64 dots run on FMA units, whose operand layout keeps the whole reduction
    width per thread)."""
    S = tl.zeros([BLOCK_B, BLOCK_N], ACC)
    for k0 in tl.static_range(0, BLOCK_D, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        km = kc < D
        Uk = tl.load(
            user_ptr + rows.to(tl.int64)[:, None] * D + kc[None, :],
            mask=rmask[:, None] & km[None, :],
            other=0,
        )
        Ck = tl.load(items_ptr + idx[:, None] * D + kc[None, :], mask=cmask[:, None] & km[None, :], other=0)
        S = tl.dot(Uk, tl.trans(Ck), acc=S, input_precision=DOT_PRECISION, out_dtype=ACC)
    return S


@triton.jit
def _tile_scores(
    U,
    user_ptr,
    items_ptr,
    cand_ptr,
    ri_ptr,
    ru,
    rows,
    rmask,
    p,
    n0,
    M,
    D,
    cols,
    dmask,
    IN_BATCH: tl.constexpr,
    NORMALIZE: tl.constexpr,
    REMOVE_HITS: tl.constexpr,
    NEED_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scores of a ``[BLOCK_B, BLOCK_N]`` tile of shared/in-batch candidates starting at ``n0``.

    Returns ``(idx, cmask, C, S, rc, keep)``: candidate item ids, their mask, the gathered raw
    rows (``[BLOCK_N, BLOCK_D]``; zeros unless ``NEED_C`` or the score dot is one
    full-width dot, ``BLOCK_K == BLOCK_D``), the (normalized) scores, the candidates'
    inverse norms (1 without ``NORMALIZE``) and which (row, candidate) pairs count.
    """
    cn = n0 + tl.arange(0, BLOCK_N)
    cmask = cn < M
    idx = tl.load(cand_ptr + cn, mask=cmask, other=0).to(tl.int64)
    if NEED_C or BLOCK_K == BLOCK_D:
        C = tl.load(
            items_ptr + idx[:, None] * D + cols[None, :], mask=cmask[:, None] & dmask[None, :], other=0
        )
    else:
        C = tl.zeros([BLOCK_N, BLOCK_D], U.dtype)
    if BLOCK_K == BLOCK_D:
        S = tl.dot(U, tl.trans(C), input_precision=DOT_PRECISION, out_dtype=ACC)
    else:
        S = _chunked_scores(
            user_ptr,
            items_ptr,
            rows,
            rmask,
            idx,
            cmask,
            D,
            BLOCK_B,
            BLOCK_N,
            BLOCK_D,
            BLOCK_K,
            ACC,
            DOT_PRECISION,
        )
    if NORMALIZE:
        rc = tl.load(ri_ptr + idx, mask=cmask, other=0)
        S = S * ru[:, None] * rc[None, :]
    else:
        rc = tl.full([BLOCK_N], 1.0, ACC)
    keep = rmask[:, None] & cmask[None, :]
    if IN_BATCH:
        keep = keep & (rows[:, None] != cn[None, :])
    if REMOVE_HITS:
        keep = keep & (p[:, None] != idx[None, :])
    return idx, cmask, C, S, rc, keep


@triton.jit
def _lse_finish(m_run, s_run):
    """Log-sum-exp of the per-lane running (max, scaled sum) pairs (−inf when all absent)."""
    mx = tl.max(m_run, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log(tl.sum(s_run * tl.exp(m_run - mx_safe), 0))


@triton.jit
def _row_block_scores(
    u,
    items_ptr,
    neg_ptr,
    ri_ptr,
    ru,
    p,
    b64,
    m0,
    M,
    D,
    cols,
    dmask,
    NORMALIZE: tl.constexpr,
    REMOVE_HITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
    """Scores of row ``b``'s per-row negatives ``m0 … m0+BLOCK_M`` (gathered by index).

    Returns ``(mm, mmask, idx, c, s, rc, keep)``: positions, their mask, item ids, the
    gathered raw rows, the (normalized) scores, the items' inverse norms (1 without
    ``NORMALIZE``) and which negatives count.
    """
    mm = m0 + tl.arange(0, BLOCK_M)
    mmask = mm < M
    idx = tl.load(neg_ptr + b64 * M + mm, mask=mmask, other=0).to(tl.int64)
    c = tl.load(
        items_ptr + idx[:, None] * D + cols[None, :], mask=mmask[:, None] & dmask[None, :], other=0
    ).to(ACC)
    s = tl.sum(c * u[None, :], 1)
    if NORMALIZE:
        rc = tl.load(ri_ptr + idx, mask=mmask, other=0)
        s = s * (ru * rc)
    else:
        rc = tl.full([BLOCK_M], 1.0, ACC)
    keep = mmask
    if REMOVE_HITS:
        keep = keep & (idx != p)
    return mm, mmask, idx, c, s, rc, keep


@triton.jit
def _fwd_rows_kernel(
    user_ptr,
    items_ptr,
    pos_ptr,
    neg_ptr,
    alpha_ptr,
    beta_ptr,
    logq_ptr,
    ru_ptr,
    ri_ptr,
    loss_ptr,
    lse_ptr,
    raw_ptr,
    M,
    D,
    HAS_LOGQ: tl.constexpr,
    INCLUDE_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    REMOVE_HITS: tl.constexpr,
    COMPUTE_RAW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    u = tl.load(user_ptr + b64 * D + cols, mask=dmask, other=0).to(ACC)
    p = tl.load(pos_ptr + b).to(tl.int64)
    alpha = tl.load(alpha_ptr + b).to(ACC)
    beta = tl.load(beta_ptr + b).to(ACC)
    ip = tl.load(items_ptr + p * D + cols, mask=dmask, other=0).to(ACC)
    s_pos = tl.sum(u * ip, 0)
    if NORMALIZE:
        ru = tl.load(ru_ptr + b)
        s_pos = s_pos * (ru * tl.load(ri_ptr + p))
    else:
        ru = tl.full([], 1.0, ACC)

    m_run = tl.full([BLOCK_M], float("-inf"), ACC)
    s_run = tl.zeros([BLOCK_M], ACC)
    m_raw = tl.full([BLOCK_M], float("-inf"), ACC)
    s_raw = tl.zeros([BLOCK_M], ACC)
    for m0 in range(0, M, BLOCK_M):
        mm, mmask, idx, c, s, rc, keep = _row_block_scores(
            u,
            items_ptr,
            neg_ptr,
            ri_ptr,
            ru,
            p,
            b64,
            m0,
            M,
            D,
            cols,
            dmask,
            NORMALIZE,
            REMOVE_HITS,
            BLOCK_M,
            ACC,
        )
        logit = beta * s
        if HAS_LOGQ:
            lq = tl.load(logq_ptr + idx, mask=mmask, other=0).to(ACC)
            logit = logit - lq
        m_run, s_run = _lse_fold(m_run, s_run, tl.where(keep, logit, float("-inf")))
        if COMPUTE_RAW:
            logit_r = s
            if HAS_LOGQ:
                logit_r = logit_r - lq
            m_raw, s_raw = _lse_fold(m_raw, s_raw, tl.where(keep, logit_r, float("-inf")))

    lse = _lse_finish(m_run, s_run)
    pos_logit = alpha * s_pos
    lse = _with_positive(lse, pos_logit, INCLUDE_POS)
    loss = tl.where(lse == float("-inf"), 0.0, lse - pos_logit)
    tl.store(lse_ptr + b, lse)
    tl.store(loss_ptr + b, loss)
    if COMPUTE_RAW:
        lse_r = _with_positive(_lse_finish(m_raw, s_raw), s_pos, INCLUDE_POS)
        tl.store(raw_ptr + b, tl.where(lse_r == float("-inf"), 0.0, lse_r - s_pos))


# ------------------------------------------------------ shared / in-batch: split grids
# The tile kernels run on a 2-D grid: axis 0 blocks of rows (forward, row backward) or of
# candidates (column backward), axis 1 ``NSPLIT`` slices of the other axis, each slice a
# whole number of blocks. Every program writes partial results of its slice; a small
# merge kernel (forward, row backward) or a sum over the slices (column backward) combines
# them in a fixed order, so the result does not depend on timing, only on the block shape.
def _tile_configs():
    """(BLOCK_B, BLOCK_N, warps): 4 warps and blocks up to 64 x 64 for 16-bit inputs
    (tensor-core dots); 8 warps and blocks up to 32 x 16 for float32/float64 (FMA dots
    hold their operands in registers: on sm_90, 64 x 64 tiles spill kilobytes and 32 x 32
    tiles 8 bytes in some specializations)."""
    shapes = (
        (64, 64, 4),
        (32, 64, 4),
        (64, 32, 4),
        (32, 32, 4),
        (16, 32, 4),
        (16, 16, 4),
        (32, 16, 8),
        (16, 32, 8),
        (16, 16, 8),
    )
    return [triton.Config({"BLOCK_B": bb, "BLOCK_N": bn}, num_warps=w) for bb, bn, w in shapes]


def _tile_cap(block_d: int) -> int:
    """Largest row or candidate block for a tile whose vectors are ``block_d`` wide."""
    return 64 if block_d <= 64 else (32 if block_d <= 256 else 16)


def _prune_tile_configs(configs, named_args, **kwargs):
    """The block shapes worth timing for one (B, M, D, dtype): the dtype's warp count
    (``_tile_configs``), blocks no wider than the problem (at least 16, ``tl.dot``'s
    minimum) and than ``_tile_cap(BLOCK_D)``, at most three. One shape (the largest) under Triton's interpreter, and when ``TUNE_TAG`` is 1
    (``torch.use_deterministic_algorithms(True)``: a fixed shape, so a fixed summation
    order across processes)."""
    cap = _tile_cap(kwargs["BLOCK_D"])
    bb_max = max(16, min(cap, triton.next_power_of_2(int(named_args["B"]))))
    bn_max = max(16, min(cap, triton.next_power_of_2(int(named_args["M"]))))
    warps = 4 if named_args["user_ptr"].dtype in (torch.float16, torch.bfloat16) else 8
    fits = [
        c
        for c in configs
        if c.num_warps == warps and c.kwargs["BLOCK_B"] <= bb_max and c.kwargs["BLOCK_N"] <= bn_max
    ]
    fits.sort(key=lambda c: -(c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_N"]))
    if _interpreting() or int(named_args.get("TUNE_TAG", 0)) == 1:
        return fits[:1]
    return fits[:3]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_TILE_TUNING = dict(
    configs=_tile_configs(),
    key=["B", "M", "D", "TUNE_TAG"],
    prune_configs_by={"early_config_prune": _prune_tile_configs},
)


@triton.jit
def _split_range(total, NSPLIT, BLOCK: tl.constexpr):
    """``[lo, hi)``: this program's slice (``program_id(1)``) of ``total`` positions cut into
    ``NSPLIT`` slices of whole ``BLOCK``s (trailing slices may be empty)."""
    chunk = tl.cdiv(tl.cdiv(total, NSPLIT), BLOCK) * BLOCK
    lo = tl.program_id(1) * chunk
    return lo, tl.minimum(lo + chunk, total)


@triton.autotune(**_TILE_TUNING)
@triton.jit
def _fwd_tiles_kernel(
    user_ptr,
    items_ptr,
    pos_ptr,
    cand_ptr,
    beta_ptr,
    logq_ptr,
    ru_ptr,
    ri_ptr,
    part_ptr,
    B,
    M,
    D,
    NSPLIT,
    TUNE_TAG,
    IN_BATCH: tl.constexpr,
    HAS_LOGQ: tl.constexpr,
    NORMALIZE: tl.constexpr,
    REMOVE_HITS: tl.constexpr,
    COMPUTE_RAW: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial log-sum-exps of one block of rows over one slice of the candidates:
    ``part[k, split, row]``, k = 0/1 the running (max, scaled sum) of the loss, 2/3 of the
    raw (α = β = 1) loss."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    U = tl.load(
        user_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
        mask=rmask[:, None] & dmask[None, :],
        other=0,
    )
    p = tl.load(pos_ptr + rows, mask=rmask, other=0).to(tl.int64)
    beta = tl.load(beta_ptr + rows, mask=rmask, other=0).to(ACC)
    if NORMALIZE:
        ru = tl.load(ru_ptr + rows, mask=rmask, other=0)
    else:
        ru = tl.full([BLOCK_B], 1.0, ACC)
    m_run = tl.full([BLOCK_B], float("-inf"), ACC)
    s_run = tl.zeros([BLOCK_B], ACC)
    m_raw = tl.full([BLOCK_B], float("-inf"), ACC)
    s_raw = tl.zeros([BLOCK_B], ACC)
    lo, hi = _split_range(M, NSPLIT, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        idx, cmask, C, S, rc, keep = _tile_scores(
            U,
            user_ptr,
            items_ptr,
            cand_ptr,
            ri_ptr,
            ru,
            rows,
            rmask,
            p,
            n0,
            hi,
            D,
            cols,
            dmask,
            IN_BATCH,
            NORMALIZE,
            REMOVE_HITS,
            False,
            BLOCK_B,
            BLOCK_N,
            BLOCK_D,
            BLOCK_K,
            ACC,
            DOT_PRECISION,
        )
        logit = beta[:, None] * S
        if HAS_LOGQ:
            lq = tl.load(logq_ptr + idx, mask=cmask, other=0).to(ACC)
            logit = logit - lq[None, :]
        m_run, s_run = _lse_fold_tile(m_run, s_run, tl.where(keep, logit, float("-inf")))
        if COMPUTE_RAW:
            logit_r = S
            if HAS_LOGQ:
                logit_r = logit_r - lq[None, :]
            m_raw, s_raw = _lse_fold_tile(m_raw, s_raw, tl.where(keep, logit_r, float("-inf")))
    out = part_ptr + tl.program_id(1) * B + rows
    tl.store(out, m_run, mask=rmask)
    tl.store(out + NSPLIT * B, s_run, mask=rmask)
    if COMPUTE_RAW:
        tl.store(out + 2 * NSPLIT * B, m_raw, mask=rmask)
        tl.store(out + 3 * NSPLIT * B, s_raw, mask=rmask)


@triton.jit
def _lse_merge(m_run, s_run, m, s):
    """Fold a partial (max, scaled sum) pair into the running one (elementwise)."""
    m_new = tl.maximum(m_run, m)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s_run * tl.exp(m_run - m_safe) + s * tl.exp(m - m_safe)


@triton.jit
def _merged_lse(part_ptr, k, rows, rmask, B, NSPLIT, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    """Log-sum-exp of partial pair ``k`` (0: loss, 1: raw) over the ``NSPLIT`` slices."""
    m_run = tl.full([BLOCK_R], float("-inf"), ACC)
    s_run = tl.zeros([BLOCK_R], ACC)
    base = part_ptr + 2 * k * NSPLIT * B + rows
    for s in range(0, NSPLIT):
        m = tl.load(base + s * B, mask=rmask, other=float("-inf"))
        sp = tl.load(base + (NSPLIT + s) * B, mask=rmask, other=0)
        m_run, s_run = _lse_merge(m_run, s_run, m, sp)
    m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
    return m_safe + tl.log(s_run)


@triton.jit
def _pos_scores(
    user_ptr,
    items_ptr,
    ru_ptr,
    ri_ptr,
    rows,
    rmask,
    p,
    D,
    NORMALIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """(Normalized) scores of rows ``rows`` with their positives ``p``, ``BLOCK_D`` columns
    at a time."""
    s_pos = tl.zeros([BLOCK_R], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        u = tl.load(user_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0).to(ACC)
        ip = tl.load(items_ptr + p[:, None] * D + cols[None, :], mask=mask, other=0).to(ACC)
        s_pos += tl.sum(u * ip, 1)
    if NORMALIZE:
        s_pos = s_pos * tl.load(ru_ptr + rows, mask=rmask, other=0) * tl.load(ri_ptr + p, mask=rmask, other=0)
    return s_pos


@triton.jit
def _fwd_merge_kernel(
    user_ptr,
    items_ptr,
    pos_ptr,
    alpha_ptr,
    ru_ptr,
    ri_ptr,
    part_ptr,
    loss_ptr,
    lse_ptr,
    raw_ptr,
    B,
    D,
    NSPLIT,
    INCLUDE_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    COMPUTE_RAW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per row: merge the slices' partial log-sum-exps, add the positive, store loss / lse /
    raw."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    p = tl.load(pos_ptr + rows, mask=rmask, other=0).to(tl.int64)
    alpha = tl.load(alpha_ptr + rows, mask=rmask, other=0).to(ACC)
    s_pos = _pos_scores(
        user_ptr, items_ptr, ru_ptr, ri_ptr, rows, rmask, p, D, NORMALIZE, BLOCK_R, BLOCK_D, ACC
    )
    pos_logit = alpha * s_pos
    lse = _with_positive(
        _merged_lse(part_ptr, 0, rows, rmask, B, NSPLIT, BLOCK_R, ACC), pos_logit, INCLUDE_POS
    )
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(loss_ptr + rows, tl.where(lse == float("-inf"), 0.0, lse - pos_logit), mask=rmask)
    if COMPUTE_RAW:
        lse_r = _with_positive(
            _merged_lse(part_ptr, 1, rows, rmask, B, NSPLIT, BLOCK_R, ACC), s_pos, INCLUDE_POS
        )
        tl.store(raw_ptr + rows, tl.where(lse_r == float("-inf"), 0.0, lse_r - s_pos), mask=rmask)


@triton.jit
def _bwd_rows_kernel(
    grad_loss_ptr,
    user_ptr,
    items_ptr,
    pos_ptr,
    neg_ptr,
    alpha_ptr,
    beta_ptr,
    logq_ptr,
    lse_ptr,
    ru_ptr,
    ri_ptr,
    grad_user_ptr,
    gi_ptr,
    w_ptr,
    wpos_ptr,
    galpha_ptr,
    gbeta_ptr,
    M,
    D,
    HAS_LOGQ: tl.constexpr,
    INCLUDE_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    REMOVE_HITS: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    lse = tl.load(lse_ptr + b).to(ACC)
    empty = lse == float("-inf")
    g = tl.where(empty, 0.0, tl.load(grad_loss_ptr + b).to(ACC))
    lse = tl.where(empty, 0.0, lse)
    u = tl.load(user_ptr + b64 * D + cols, mask=dmask, other=0).to(ACC)
    p = tl.load(pos_ptr + b).to(tl.int64)
    alpha = tl.load(alpha_ptr + b).to(ACC)
    beta = tl.load(beta_ptr + b).to(ACC)
    ip = tl.load(items_ptr + p * D + cols, mask=dmask, other=0).to(ACC)
    s_pos = tl.sum(u * ip, 0)
    if NORMALIZE:
        ru = tl.load(ru_ptr + b)
        rp = tl.load(ri_ptr + p)
        s_pos = s_pos * (ru * rp)
        uh = u * ru
        ip = ip * rp
    else:
        ru = tl.full([], 1.0, ACC)
        uh = u
    gu2 = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    gb = tl.zeros([BLOCK_M], ACC)
    mass = tl.zeros([BLOCK_M], ACC)  # Σ_m P_m: 1 - P_pos without cancellation
    for m0 in range(0, M, BLOCK_M):
        mm, mmask, idx, c, s, rc, keep = _row_block_scores(
            u,
            items_ptr,
            neg_ptr,
            ri_ptr,
            ru,
            p,
            b64,
            m0,
            M,
            D,
            cols,
            dmask,
            NORMALIZE,
            REMOVE_HITS,
            BLOCK_M,
            ACC,
        )
        logit = beta * s
        if HAS_LOGQ:
            logit = logit - tl.load(logq_ptr + idx, mask=mmask, other=0).to(ACC)
        prob = tl.where(keep, tl.exp(logit - lse), 0.0)
        mass += prob
        dl = g * prob  # d loss / d logit
        gb += dl * s
        w = dl * beta  # d loss / d score
        if NORMALIZE:
            gu2 += (w * rc)[:, None] * c
        else:
            gu2 += w[:, None] * c
        if ATOMIC:
            tl.atomic_add(
                gi_ptr + idx[:, None] * D + cols[None, :],
                w[:, None] * uh[None, :],
                mask=keep[:, None] & dmask[None, :],
                sem="relaxed",
            )
        else:
            tl.store(w_ptr + b64 * M + mm, w, mask=mmask)
    # d loss / d pos_logit = g·(P_pos - 1) = -g·Σ_m P_m (include_pos), -g (otherwise)
    if INCLUDE_POS:
        d_pos_logit = -g * tl.sum(mass, 0)
    else:
        d_pos_logit = -g
    w_pos = d_pos_logit * alpha
    gu = tl.sum(gu2, 0) + w_pos * ip
    if ATOMIC:
        tl.atomic_add(gi_ptr + p * D + cols, w_pos * uh, mask=dmask, sem="relaxed")
    else:
        tl.store(wpos_ptr + b, w_pos)
    if NORMALIZE:
        gu = tl.sum(_normalize_bwd(u[None, :], gu[None, :], ru + tl.zeros([1], ACC)), 0)
    tl.store(grad_user_ptr + b64 * D + cols, gu.to(grad_user_ptr.dtype.element_ty), mask=dmask)
    tl.store(galpha_ptr + b, d_pos_logit * s_pos)
    tl.store(gbeta_ptr + b, tl.sum(gb, 0))


@triton.autotune(**_TILE_TUNING)
@triton.jit
def _bwd_tiles_rows_kernel(
    grad_loss_ptr,
    user_ptr,
    items_ptr,
    pos_ptr,
    cand_ptr,
    beta_ptr,
    logq_ptr,
    lse_ptr,
    ru_ptr,
    ri_ptr,
    gu_part_ptr,
    sums_part_ptr,
    B,
    M,
    D,
    NSPLIT,
    TUNE_TAG,
    IN_BATCH: tl.constexpr,
    HAS_LOGQ: tl.constexpr,
    NORMALIZE: tl.constexpr,
    REMOVE_HITS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One block of rows over one slice of the candidates: the partial user gradient
    (before the positive's term and the normalization Jacobian) ``gu_part[split, row]``, and
    ``sums_part[0, split, row]`` = Σ dl·ŝ (the β gradient), ``sums_part[1, split, row]`` =
    Σ P (the negatives' probability mass)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    tile_mask = rmask[:, None] & dmask[None, :]
    lse = tl.load(lse_ptr + rows, mask=rmask, other=float("-inf")).to(ACC)
    empty = lse == float("-inf")
    g = tl.where(empty, 0.0, tl.load(grad_loss_ptr + rows, mask=rmask, other=0).to(ACC))
    lse = tl.where(empty, 0.0, lse)
    U = tl.load(user_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=tile_mask, other=0)
    p = tl.load(pos_ptr + rows, mask=rmask, other=0).to(tl.int64)
    beta = tl.load(beta_ptr + rows, mask=rmask, other=0).to(ACC)
    if NORMALIZE:
        ru = tl.load(ru_ptr + rows, mask=rmask, other=0)
    else:
        ru = tl.full([BLOCK_B], 1.0, ACC)
    gu = tl.zeros([BLOCK_B, BLOCK_D], ACC)
    gb = tl.zeros([BLOCK_B], ACC)
    mass = tl.zeros([BLOCK_B], ACC)
    lo, hi = _split_range(M, NSPLIT, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        idx, cmask, C, S, rc, keep = _tile_scores(
            U,
            user_ptr,
            items_ptr,
            cand_ptr,
            ri_ptr,
            ru,
            rows,
            rmask,
            p,
            n0,
            hi,
            D,
            cols,
            dmask,
            IN_BATCH,
            NORMALIZE,
            REMOVE_HITS,
            True,
            BLOCK_B,
            BLOCK_N,
            BLOCK_D,
            BLOCK_K,
            ACC,
            DOT_PRECISION,
        )
        logit = beta[:, None] * S
        if HAS_LOGQ:
            logit = logit - tl.load(logq_ptr + idx, mask=cmask, other=0).to(ACC)[None, :]
        prob = tl.where(keep, tl.exp(logit - lse[:, None]), 0.0)
        mass += tl.sum(prob, 1)
        dl = g[:, None] * prob
        gb += tl.sum(dl * S, 1)
        W = dl * beta[:, None]
        if NORMALIZE:
            W = W * rc[None, :]
        gu = tl.dot(W.to(C.dtype), C, acc=gu, input_precision=DOT_PRECISION, out_dtype=ACC)
    split = tl.program_id(1)
    tl.store(gu_part_ptr + (split * B + rows.to(tl.int64))[:, None] * D + cols[None, :], gu, mask=tile_mask)
    tl.store(sums_part_ptr + split * B + rows, gb, mask=rmask)
    tl.store(sums_part_ptr + (NSPLIT + split) * B + rows, mass, mask=rmask)


@triton.jit
def _bwd_rows_finish_kernel(
    grad_loss_ptr,
    user_ptr,
    items_ptr,
    pos_ptr,
    alpha_ptr,
    lse_ptr,
    ru_ptr,
    ri_ptr,
    gu_part_ptr,
    sums_part_ptr,
    grad_user_ptr,
    gi_ptr,
    wpos_ptr,
    galpha_ptr,
    gbeta_ptr,
    B,
    D,
    NSPLIT,
    INCLUDE_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per row: sum the slices' partials, add the positive's term, apply the normalization
    Jacobian; store the user and scale gradients and the positive's item-gradient weight
    (added to ``gi`` in atomic mode)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    tile_mask = rmask[:, None] & dmask[None, :]
    lse = tl.load(lse_ptr + rows, mask=rmask, other=float("-inf")).to(ACC)
    g = tl.where(lse == float("-inf"), 0.0, tl.load(grad_loss_ptr + rows, mask=rmask, other=0).to(ACC))
    rows64 = rows.to(tl.int64)
    U = tl.load(user_ptr + rows64[:, None] * D + cols[None, :], mask=tile_mask, other=0).to(ACC)
    p = tl.load(pos_ptr + rows, mask=rmask, other=0).to(tl.int64)
    alpha = tl.load(alpha_ptr + rows, mask=rmask, other=0).to(ACC)
    IP = tl.load(items_ptr + p[:, None] * D + cols[None, :], mask=tile_mask, other=0).to(ACC)
    s_pos = tl.sum(U * IP, 1)
    if NORMALIZE:
        ru = tl.load(ru_ptr + rows, mask=rmask, other=0)
        rp = tl.load(ri_ptr + p, mask=rmask, other=0)
        s_pos = s_pos * ru * rp
        IP = IP * rp[:, None]
        UH = U * ru[:, None]
    else:
        ru = tl.full([BLOCK_R], 1.0, ACC)
        UH = U
    gu = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    gb = tl.zeros([BLOCK_R], ACC)
    mass = tl.zeros([BLOCK_R], ACC)  # Σ_m P_m: 1 - P_pos without cancellation
    for s in range(0, NSPLIT):
        gu += tl.load(gu_part_ptr + (s * B + rows64)[:, None] * D + cols[None, :], mask=tile_mask, other=0)
        gb += tl.load(sums_part_ptr + s * B + rows, mask=rmask, other=0)
        mass += tl.load(sums_part_ptr + (NSPLIT + s) * B + rows, mask=rmask, other=0)
    if INCLUDE_POS:
        d_pos_logit = -g * mass
    else:
        d_pos_logit = -g
    w_pos = d_pos_logit * alpha
    gu += w_pos[:, None] * IP
    if ATOMIC:
        tl.atomic_add(
            gi_ptr + p[:, None] * D + cols[None, :], w_pos[:, None] * UH, mask=tile_mask, sem="relaxed"
        )
    else:
        tl.store(wpos_ptr + rows, w_pos, mask=rmask)
    if NORMALIZE:
        gu = _normalize_bwd(U, gu, ru)
    tl.store(
        grad_user_ptr + rows64[:, None] * D + cols[None, :],
        gu.to(grad_user_ptr.dtype.element_ty),
        mask=tile_mask,
    )
    tl.store(galpha_ptr + rows, d_pos_logit * s_pos, mask=rmask)
    tl.store(gbeta_ptr + rows, gb, mask=rmask)


@triton.autotune(**_TILE_TUNING)
@triton.jit
def _bwd_tiles_cols_kernel(
    grad_loss_ptr,
    user_ptr,
    items_ptr,
    pos_ptr,
    cand_ptr,
    beta_ptr,
    logq_ptr,
    lse_ptr,
    ru_ptr,
    ri_ptr,
    gc_part_ptr,
    B,
    M,
    D,
    NSPLIT,
    TUNE_TAG,
    IN_BATCH: tl.constexpr,
    HAS_LOGQ: tl.constexpr,
    NORMALIZE: tl.constexpr,
    REMOVE_HITS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One block of candidates over one slice of the rows: the partial candidate gradient
    ``gc_part[split, candidate] = Σ_rows w·û`` (before the normalization Jacobian)."""
    cn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cn < M
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    idx = tl.load(cand_ptr + cn, mask=cmask, other=0).to(tl.int64)
    if BLOCK_K == BLOCK_D:
        C = tl.load(
            items_ptr + idx[:, None] * D + cols[None, :], mask=cmask[:, None] & dmask[None, :], other=0
        )
    if NORMALIZE:
        rc = tl.load(ri_ptr + idx, mask=cmask, other=0)
    if HAS_LOGQ:
        lq = tl.load(logq_ptr + idx, mask=cmask, other=0).to(ACC)
    GC = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    lo, hi = _split_range(B, NSPLIT, BLOCK_B)
    for r0 in range(lo, hi, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        rmask = rows < hi
        U = tl.load(
            user_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
            mask=rmask[:, None] & dmask[None, :],
            other=0,
        )
        lse = tl.load(lse_ptr + rows, mask=rmask, other=float("-inf")).to(ACC)
        empty = lse == float("-inf")
        g = tl.where(empty, 0.0, tl.load(grad_loss_ptr + rows, mask=rmask, other=0).to(ACC))
        lse = tl.where(empty, 0.0, lse)
        beta = tl.load(beta_ptr + rows, mask=rmask, other=0).to(ACC)
        if BLOCK_K == BLOCK_D:
            S = tl.dot(U, tl.trans(C), input_precision=DOT_PRECISION, out_dtype=ACC)
        else:
            S = _chunked_scores(
                user_ptr,
                items_ptr,
                rows,
                rmask,
                idx,
                cmask,
                D,
                BLOCK_B,
                BLOCK_N,
                BLOCK_D,
                BLOCK_K,
                ACC,
                DOT_PRECISION,
            )
        if NORMALIZE:
            ru = tl.load(ru_ptr + rows, mask=rmask, other=0)
            S = S * ru[:, None] * rc[None, :]
        keep = rmask[:, None] & cmask[None, :]
        if IN_BATCH:
            keep = keep & (rows[:, None] != cn[None, :])
        if REMOVE_HITS:
            p = tl.load(pos_ptr + rows, mask=rmask, other=0).to(tl.int64)
            keep = keep & (p[:, None] != idx[None, :])
        logit = beta[:, None] * S
        if HAS_LOGQ:
            logit = logit - lq[None, :]
        W = tl.where(keep, (g * beta)[:, None] * tl.exp(logit - lse[:, None]), 0.0)
        if NORMALIZE:
            W = W * ru[:, None]
        GC = tl.dot(tl.trans(W.to(U.dtype)), U, acc=GC, input_precision=DOT_PRECISION, out_dtype=ACC)
    out = gc_part_ptr + (tl.program_id(1) * M + cn.to(tl.int64))[:, None] * D + cols[None, :]
    tl.store(out, GC, mask=cmask[:, None] & dmask[None, :])


@triton.jit
def _item_finalize_kernel(
    gi_ptr,
    items_ptr,
    ri_ptr,
    out_ptr,
    keys_ptr,
    owner_ptr,
    R,
    D,
    NORMALIZE: tl.constexpr,
    KEYED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """The normalization Jacobian and the cast of the accumulated item gradient: every row
    (``KEYED`` false) or each distinct touched row once (``out`` may be ``gi``)."""
    j = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows, rmask = _touched_rows(j, j < R, keys_ptr, owner_ptr, KEYED)
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    gh = tl.load(gi_ptr + offs, mask=mask, other=0).to(ACC)
    if NORMALIZE:
        x = tl.load(items_ptr + offs, mask=mask, other=0).to(ACC)
        r = tl.load(ri_ptr + rows, mask=rmask, other=0)
        gh = _normalize_bwd(x, gh, r)
    tl.store(out_ptr + offs, gh.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _item_segment_kernel(
    start_ptr,
    end_ptr,
    item_ptr,
    w_ptr,
    src_row_ptr,
    src_ptr,
    items_ptr,
    ri_ptr,
    out_ptr,
    D,
    NORMALIZE: tl.constexpr,
    KEYED: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """Sums one item's (sorted) contributions w·src[row], then the normalization Jacobian,
    then one store of the gradient row in the output dtype. Not ``KEYED``: program i owns
    item i, its contributions are ``[start[i], start[i + 1])``. ``KEYED``: program j is
    position j of the sorted contribution list and works only when it is the first of its
    item's run ``[start[j], end[j])`` (item ``item[j]``)."""
    j = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    start = tl.load(start_ptr + j)
    if KEYED:
        end = tl.load(end_ptr + j)
        end = tl.where(start == j, end, start)
        i64 = tl.load(item_ptr + j).to(tl.int64)
        out_mask = dmask & ((cols * 0 + start) == j)  # only the run's first position stores
    else:
        end = tl.load(start_ptr + j + 1)
        i64 = j.to(tl.int64)
        out_mask = dmask
    acc = tl.zeros([BLOCK_P, BLOCK_D], ACC)
    for j0 in range(start, end, BLOCK_P):
        jj = j0 + tl.arange(0, BLOCK_P)
        jm = jj < end
        w = tl.load(w_ptr + jj, mask=jm, other=0).to(ACC)
        r = tl.load(src_row_ptr + jj, mask=jm, other=0).to(tl.int64)
        v = tl.load(src_ptr + r[:, None] * D + cols[None, :], mask=jm[:, None] & dmask[None, :], other=0).to(
            ACC
        )
        acc += w[:, None] * v
    gh = tl.sum(acc, 0)
    if NORMALIZE:
        x = tl.load(items_ptr + i64 * D + cols, mask=dmask, other=0).to(ACC)
        r_i = tl.load(ri_ptr + i64) + tl.zeros([1], ACC)
        # (an item without contributions may have no inverse norm: ri is only set for the
        # rows a call touches; its gradient is zero)
        gh = tl.where(end > start, tl.sum(_normalize_bwd(x[None, :], gh[None, :], r_i), 0), 0.0)
    tl.store(out_ptr + i64 * D + cols, gh.to(out_ptr.dtype.element_ty), mask=out_mask)


# ============================================================================ host side
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _check_device(t: Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise RuntimeError(
        f"adaptau triton backend: tensors on {t.device} are not supported (CUDA tensors, or "
        "CPU tensors with TRITON_INTERPRET=1 set before Triton is imported)"
    )


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _rows_block_m(block_d: int, m: int) -> int:
    return max(16, min(128, 8192 // block_d, triton.next_power_of_2(m)))


def _rows_block_m_bwd(block_d: int, m: int) -> int:
    """The per-row backward's negatives per step. It holds more ``[BLOCK_M, BLOCK_D]``
    tiles than the forward (gathered rows, the user-gradient accumulator, the item-gradient
    products and their addresses): up to D = 256 at most 4096 elements (64 rows at
    D = 64, with 8 warps: 16 per thread), then 16 rows at D = 512 and 8 at D = 1024."""
    if block_d >= 512:
        return 8192 // block_d
    return max(16, min(64, 4096 // block_d, triton.next_power_of_2(m)))


def _bwd_rows_warps(block_d: int, block_m: int) -> int:
    """8 warps for tiles of 4096 elements or more, except 4 at D = 512 (16 rows)."""
    if block_d == 512:
        return 4
    return 8 if block_m * block_d >= 4096 else 4


def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: ``"ieee"`` except for float32 inputs, where
    ``ADAPTAU_TRITON_FP32_DOT`` (``ieee``, ``tf32``, ``tf32x3``) rules when set, else
    ``"tf32"`` while ``torch.backends.cuda.matmul.allow_tf32`` is True."""
    if dtype != torch.float32:
        return "ieee"
    if FP32_DOT_PRECISION:
        return FP32_DOT_PRECISION
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


#: Tests: True gives every tile kernel one full-width score dot (BLOCK_K = BLOCK_D) for
#: float32/float64 too, the shape 16-bit inputs always use.
_full_width_dots = False


def _score_chunk(dtype: torch.dtype, block_d: int) -> int:
    """``BLOCK_K``: the width of each score dot in the tile kernels. 16-bit inputs: one dot
    over ``BLOCK_D`` (tensor cores take their operands from shared memory); float32 and
    float64: chunks of 32 columns (FMA dots keep the whole reduction width per thread in
    registers)."""
    if dtype in (torch.float16, torch.bfloat16) or _full_width_dots:
        return block_d
    return min(block_d, 32)


def _num_warps(block_elems: int) -> int:
    return 4 if block_elems <= 8192 else 8


# Launches go through _launch; tests set _launch_log to a list to see every launch's
# kernel name and number of programs.
_launch_log: Optional[list] = None


def _launch(kernel, grid, *args, **kwargs) -> None:
    log = _launch_log
    if log is not None:
        name = getattr(getattr(kernel, "base_fn", kernel), "__name__", str(kernel))
        if callable(grid):
            shape = grid

            def grid(meta, shape=shape):
                dims = shape(meta)
                log.append((name, math.prod(dims)))
                return dims
        else:
            log.append((name, math.prod(grid)))
    kernel[grid](*args, **kwargs)


# Tests set _poison: every buffer a kernel should fully write (outputs, partials, inverse
# norms, per-pair weights) then starts as NaN (owner: -1) instead of uninitialized memory,
# so a read of an unwritten entry shows up as NaN.
_poison = False


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    if not _poison:
        return torch.empty(shape, dtype=dtype, device=device)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.full(shape, -1 if not dtype.is_floating_point else float("nan"), dtype=dtype, device=device)


# ------------------------------------------------------------------- split of the grid
_forced_split: Optional[int] = None


def _force_split(count: Optional[int]) -> Optional[int]:
    """Tests: every tile kernel's grid axis 1 gets ``count`` slices (``None``: chosen from
    the shape and the SM count). Returns the previous setting. ``ADAPTAU_TRITON_SPLIT``
    does the same from the environment."""
    global _forced_split
    before, _forced_split = _forced_split, count
    return before


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: one "SM", so small problems still take two slices


def _split_count(programs: int, blocks: int, device: torch.device) -> int:
    """Slices for a tile kernel whose other grid axis has ``programs`` programs and whose
    split axis has ``blocks`` blocks: enough for 2 programs per SM, at most one per
    block."""
    forced = _forced_split or int(os.environ.get("ADAPTAU_TRITON_SPLIT", "0") or 0)
    if forced > 0:
        return forced
    target = 2 * _sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(blocks, triton.cdiv(target, programs)))


def _tune_tag() -> int:
    """The autotune key's ``TUNE_TAG``: 1 under deterministic algorithms (one fixed block
    shape), else 0."""
    return 1 if torch.are_deterministic_algorithms_enabled() else 0


# --------------------------------------------------------------------------- touched rows
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


def _row_block(block_d: int) -> int:
    return max(1, min(64, 4096 // block_d))


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
