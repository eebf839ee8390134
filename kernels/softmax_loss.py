"""Triton forward/backward of the fused sampled-softmax loss (contract: ``adaptau.loss._contract``).

Layout of the work
------------------
* ``_inv_norm_kernel``: a tiny pre-pass, ``r = 1 / max(||x||, 1e-12)`` for every user row
  and every item-table row (only with ``normalize``). Scores are computed on the *raw*
  vectors and scaled afterwards, ``ŝ = <u, i>·r_u·r_i``, so half-precision inputs feed the
  dot products unrounded and nothing normalized is ever written back.
* Per-row negatives (``neg_mode == 0``): one program per row; it gathers ``BLOCK_M`` item
  rows by index into registers, dots them with the row's user vector and keeps a running
  max / sum (log-sum-exp). No ``[B, M, D]`` tensor exists anywhere.
* Shared (``1``) and in-batch (``2``) negatives: the candidate list is common to every row,
  so scores are ``tl.dot`` tiles ``[BLOCK_B, BLOCK_N]`` with a flash-style running max.
  The backward pass runs a row kernel (user gradients, scale gradients) and a column
  kernel (per-candidate gradients ``Wᵀ·Û``), both recomputing the scores from ``lse``.
* Item gradients: ``"atomic"`` adds ``w·û`` into an fp32 (fp64 for fp64 inputs) ``[N, D]``
  buffer with atomics, then ``_item_finalize_kernel`` applies the normalization Jacobian
  and casts; ``"segment"`` writes the per-pair weights, sorts the (item, contribution)
  list by item and lets one program own each item row (deterministic, no atomics, the
  Jacobian fused in).

Accumulation is float32 for float16/bfloat16/float32 inputs and float64 for float64
inputs (float64 is computed in float64, also in ``tl.dot``). float32 ``tl.dot`` runs with
``input_precision="ieee"`` by default (TF32 would cost ~1e-3 relative in the cosines, i.e.
whole units of logit at inverse temperatures ~1e3); ``ADAPTAU_TRITON_FP32_DOT=tf32x3``
or ``tf32`` trades accuracy for tensor-core speed.
"""
from __future__ import annotations

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
    raise ValueError(f"ADAPTAU_TRITON_ITEM_GRAD must be one of {ITEM_GRAD_MODES}, "
                     f"got {_item_grad_mode!r}")
FP32_DOT_PRECISION = os.environ.get("ADAPTAU_TRITON_FP32_DOT", "ieee").strip().lower() or "ieee"


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
def _inv_norm_kernel(x_ptr, out_ptr, R, D, EPS,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
                mask=rmask[:, None] & (cols < D)[None, :], other=0).to(ACC)
    norm = tl.sqrt(tl.sum(x * x, 1))
    tl.store(out_ptr + rows, 1.0 / tl.maximum(norm, EPS), mask=rmask)


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
def _tile_scores(U, items_ptr, cand_ptr, ri_ptr, ru, rows, rmask, p, n0, M, D, cols, dmask,
                 IN_BATCH: tl.constexpr, NORMALIZE: tl.constexpr, REMOVE_HITS: tl.constexpr,
                 BLOCK_N: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores of a ``[BLOCK_B, BLOCK_N]`` tile of shared/in-batch candidates starting at ``n0``.

    Returns ``(idx, cmask, C, S, rc, keep)``: candidate item ids, their mask, the gathered raw
    rows, the (normalized) scores, the candidates' inverse norms (1 without ``NORMALIZE``)
    and which (row, candidate) pairs count.
    """
    cn = n0 + tl.arange(0, BLOCK_N)
    cmask = cn < M
    idx = tl.load(cand_ptr + cn, mask=cmask, other=0).to(tl.int64)
    C = tl.load(items_ptr + idx[:, None] * D + cols[None, :],
                mask=cmask[:, None] & dmask[None, :], other=0)
    S = tl.dot(U, tl.trans(C), input_precision=DOT_PRECISION, out_dtype=ACC)
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
def _row_block_scores(u, items_ptr, neg_ptr, ri_ptr, ru, p, b64, m0, M, D, cols, dmask,
                      NORMALIZE: tl.constexpr, REMOVE_HITS: tl.constexpr,
                      BLOCK_M: tl.constexpr, ACC: tl.constexpr):
    """Scores of row ``b``'s per-row negatives ``m0 … m0+BLOCK_M`` (gathered by index).

    Returns ``(mm, mmask, idx, c, s, rc, keep)``: positions, their mask, item ids, the
    gathered raw rows, the (normalized) scores, the items' inverse norms (1 without
    ``NORMALIZE``) and which negatives count.
    """
    mm = m0 + tl.arange(0, BLOCK_M)
    mmask = mm < M
    idx = tl.load(neg_ptr + b64 * M + mm, mask=mmask, other=0).to(tl.int64)
    c = tl.load(items_ptr + idx[:, None] * D + cols[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0).to(ACC)
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
def _fwd_rows_kernel(user_ptr, items_ptr, pos_ptr, neg_ptr, alpha_ptr, beta_ptr, logq_ptr,
                     ru_ptr, ri_ptr, loss_ptr, lse_ptr, raw_ptr, M, D,
                     HAS_LOGQ: tl.constexpr, INCLUDE_POS: tl.constexpr,
                     NORMALIZE: tl.constexpr, REMOVE_HITS: tl.constexpr,
                     COMPUTE_RAW: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr, ACC: tl.constexpr):
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
            u, items_ptr, neg_ptr, ri_ptr, ru, p, b64, m0, M, D, cols, dmask,
            NORMALIZE, REMOVE_HITS, BLOCK_M, ACC)
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


@triton.jit
def _fwd_tiles_kernel(user_ptr, items_ptr, pos_ptr, cand_ptr, alpha_ptr, beta_ptr, logq_ptr,
                      ru_ptr, ri_ptr, loss_ptr, lse_ptr, raw_ptr, B, M, D,
                      IN_BATCH: tl.constexpr, HAS_LOGQ: tl.constexpr,
                      INCLUDE_POS: tl.constexpr, NORMALIZE: tl.constexpr,
                      REMOVE_HITS: tl.constexpr, COMPUTE_RAW: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    U = tl.load(user_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0)
    p = tl.load(pos_ptr + rows, mask=rmask, other=0).to(tl.int64)
    alpha = tl.load(alpha_ptr + rows, mask=rmask, other=0).to(ACC)
    beta = tl.load(beta_ptr + rows, mask=rmask, other=0).to(ACC)
    IP = tl.load(items_ptr + p[:, None] * D + cols[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0).to(ACC)
    s_pos = tl.sum(U.to(ACC) * IP, 1)
    if NORMALIZE:
        ru = tl.load(ru_ptr + rows, mask=rmask, other=0)
        s_pos = s_pos * ru * tl.load(ri_ptr + p, mask=rmask, other=0)
    else:
        ru = tl.full([BLOCK_B], 1.0, ACC)

    m_run = tl.full([BLOCK_B], float("-inf"), ACC)
    s_run = tl.zeros([BLOCK_B], ACC)
    m_raw = tl.full([BLOCK_B], float("-inf"), ACC)
    s_raw = tl.zeros([BLOCK_B], ACC)
    for n0 in range(0, M, BLOCK_N):
        idx, cmask, C, S, rc, keep = _tile_scores(
            U, items_ptr, cand_ptr, ri_ptr, ru, rows, rmask, p, n0, M, D, cols, dmask,
            IN_BATCH, NORMALIZE, REMOVE_HITS, BLOCK_N, ACC, DOT_PRECISION)
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

    m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
    lse = m_safe + tl.log(s_run)
    pos_logit = alpha * s_pos
    lse = _with_positive(lse, pos_logit, INCLUDE_POS)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(loss_ptr + rows, tl.where(lse == float("-inf"), 0.0, lse - pos_logit), mask=rmask)
    if COMPUTE_RAW:
        m_safe_r = tl.where(m_raw == float("-inf"), 0.0, m_raw)
        lse_r = _with_positive(m_safe_r + tl.log(s_raw), s_pos, INCLUDE_POS)
        tl.store(raw_ptr + rows, tl.where(lse_r == float("-inf"), 0.0, lse_r - s_pos), mask=rmask)


@triton.jit
def _bwd_rows_kernel(grad_loss_ptr, user_ptr, items_ptr, pos_ptr, neg_ptr, alpha_ptr,
                     beta_ptr, logq_ptr, lse_ptr, ru_ptr, ri_ptr,
                     grad_user_ptr, gi_ptr, w_ptr, wpos_ptr, galpha_ptr, gbeta_ptr, M, D,
                     HAS_LOGQ: tl.constexpr, INCLUDE_POS: tl.constexpr,
                     NORMALIZE: tl.constexpr, REMOVE_HITS: tl.constexpr, ATOMIC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
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
            u, items_ptr, neg_ptr, ri_ptr, ru, p, b64, m0, M, D, cols, dmask,
            NORMALIZE, REMOVE_HITS, BLOCK_M, ACC)
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
            tl.atomic_add(gi_ptr + idx[:, None] * D + cols[None, :], w[:, None] * uh[None, :],
                          mask=keep[:, None] & dmask[None, :], sem="relaxed")
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


@triton.jit
def _bwd_tiles_rows_kernel(grad_loss_ptr, user_ptr, items_ptr, pos_ptr, cand_ptr, alpha_ptr,
                           beta_ptr, logq_ptr, lse_ptr, ru_ptr, ri_ptr,
                           grad_user_ptr, gi_ptr, wpos_ptr, galpha_ptr, gbeta_ptr, B, M, D,
                           IN_BATCH: tl.constexpr, HAS_LOGQ: tl.constexpr,
                           INCLUDE_POS: tl.constexpr, NORMALIZE: tl.constexpr,
                           REMOVE_HITS: tl.constexpr, ATOMIC: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    tile_mask = rmask[:, None] & dmask[None, :]
    lse = tl.load(lse_ptr + rows, mask=rmask, other=float("-inf")).to(ACC)
    empty = lse == float("-inf")
    g = tl.where(empty, 0.0, tl.load(grad_loss_ptr + rows, mask=rmask, other=0).to(ACC))
    lse = tl.where(empty, 0.0, lse)
    U = tl.load(user_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=tile_mask,
                other=0)
    Ua = U.to(ACC)
    p = tl.load(pos_ptr + rows, mask=rmask, other=0).to(tl.int64)
    alpha = tl.load(alpha_ptr + rows, mask=rmask, other=0).to(ACC)
    beta = tl.load(beta_ptr + rows, mask=rmask, other=0).to(ACC)
    IP = tl.load(items_ptr + p[:, None] * D + cols[None, :], mask=tile_mask, other=0).to(ACC)
    s_pos = tl.sum(Ua * IP, 1)
    if NORMALIZE:
        ru = tl.load(ru_ptr + rows, mask=rmask, other=0)
        rp = tl.load(ri_ptr + p, mask=rmask, other=0)
        s_pos = s_pos * ru * rp
        IP = IP * rp[:, None]
        UH = Ua * ru[:, None]
    else:
        ru = tl.full([BLOCK_B], 1.0, ACC)
        UH = Ua
    gu = tl.zeros([BLOCK_B, BLOCK_D], ACC)
    gb = tl.zeros([BLOCK_B], ACC)
    mass = tl.zeros([BLOCK_B], ACC)  # Σ_m P_m: 1 - P_pos without cancellation
    for n0 in range(0, M, BLOCK_N):
        idx, cmask, C, S, rc, keep = _tile_scores(
            U, items_ptr, cand_ptr, ri_ptr, ru, rows, rmask, p, n0, M, D, cols, dmask,
            IN_BATCH, NORMALIZE, REMOVE_HITS, BLOCK_N, ACC, DOT_PRECISION)
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
    if INCLUDE_POS:
        d_pos_logit = -g * mass
    else:
        d_pos_logit = -g
    w_pos = d_pos_logit * alpha
    gu += w_pos[:, None] * IP
    if ATOMIC:
        tl.atomic_add(gi_ptr + p[:, None] * D + cols[None, :], w_pos[:, None] * UH,
                      mask=tile_mask, sem="relaxed")
    else:
        tl.store(wpos_ptr + rows, w_pos, mask=rmask)
    if NORMALIZE:
        gu = _normalize_bwd(Ua, gu, ru)
    tl.store(grad_user_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
             gu.to(grad_user_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(galpha_ptr + rows, d_pos_logit * s_pos, mask=rmask)
    tl.store(gbeta_ptr + rows, gb, mask=rmask)


@triton.jit
def _bwd_tiles_cols_kernel(grad_loss_ptr, user_ptr, items_ptr, pos_ptr, cand_ptr, beta_ptr,
                           logq_ptr, lse_ptr, ru_ptr, ri_ptr, gi_ptr, gcand_ptr, B, M, D,
                           IN_BATCH: tl.constexpr, HAS_LOGQ: tl.constexpr,
                           NORMALIZE: tl.constexpr, REMOVE_HITS: tl.constexpr,
                           ATOMIC: tl.constexpr, BLOCK_B: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    cn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cn < M
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    idx = tl.load(cand_ptr + cn, mask=cmask, other=0).to(tl.int64)
    C = tl.load(items_ptr + idx[:, None] * D + cols[None, :],
                mask=cmask[:, None] & dmask[None, :], other=0)
    if NORMALIZE:
        rc = tl.load(ri_ptr + idx, mask=cmask, other=0)
    if HAS_LOGQ:
        lq = tl.load(logq_ptr + idx, mask=cmask, other=0).to(ACC)
    GC = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        U = tl.load(user_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=float("-inf")).to(ACC)
        empty = lse == float("-inf")
        g = tl.where(empty, 0.0, tl.load(grad_loss_ptr + rows, mask=rmask, other=0).to(ACC))
        lse = tl.where(empty, 0.0, lse)
        beta = tl.load(beta_ptr + rows, mask=rmask, other=0).to(ACC)
        S = tl.dot(U, tl.trans(C), input_precision=DOT_PRECISION, out_dtype=ACC)
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
        GC = tl.dot(tl.trans(W.to(U.dtype)), U, acc=GC, input_precision=DOT_PRECISION,
                    out_dtype=ACC)
    out_mask = cmask[:, None] & dmask[None, :]
    if ATOMIC:
        tl.atomic_add(gi_ptr + idx[:, None] * D + cols[None, :], GC, mask=out_mask,
                      sem="relaxed")
    else:
        tl.store(gcand_ptr + cn.to(tl.int64)[:, None] * D + cols[None, :], GC, mask=out_mask)


@triton.jit
def _item_finalize_kernel(gi_ptr, items_ptr, ri_ptr, out_ptr, N, D, NORMALIZE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    gh = tl.load(gi_ptr + offs, mask=mask, other=0).to(ACC)
    if NORMALIZE:
        x = tl.load(items_ptr + offs, mask=mask, other=0).to(ACC)
        r = tl.load(ri_ptr + rows, mask=rmask, other=0)
        gh = _normalize_bwd(x, gh, r)
    tl.store(out_ptr + offs, gh.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _item_segment_kernel(offsets_ptr, w_ptr, src_row_ptr, src_ptr, items_ptr, ri_ptr, out_ptr,
                         D, NORMALIZE: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """One program per item row: sums its (sorted) contributions w·src[row], then the
    normalization Jacobian, then one store of the gradient row in the output dtype."""
    i = tl.program_id(0)
    i64 = i.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    start = tl.load(offsets_ptr + i)
    end = tl.load(offsets_ptr + i + 1)
    acc = tl.zeros([BLOCK_P, BLOCK_D], ACC)
    for j0 in range(start, end, BLOCK_P):
        j = j0 + tl.arange(0, BLOCK_P)
        jm = j < end
        w = tl.load(w_ptr + j, mask=jm, other=0).to(ACC)
        r = tl.load(src_row_ptr + j, mask=jm, other=0).to(tl.int64)
        v = tl.load(src_ptr + r[:, None] * D + cols[None, :], mask=jm[:, None] & dmask[None, :],
                    other=0).to(ACC)
        acc += w[:, None] * v
    gh = tl.sum(acc, 0)
    if NORMALIZE:
        x = tl.load(items_ptr + i64 * D + cols, mask=dmask, other=0).to(ACC)
        r_i = tl.load(ri_ptr + i) + tl.zeros([1], ACC)
        gh = tl.sum(_normalize_bwd(x[None, :], gh[None, :], r_i), 0)
    tl.store(out_ptr + i64 * D + cols, gh.to(out_ptr.dtype.element_ty), mask=dmask)


# ============================================================================ host side
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _check_device(t: Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise RuntimeError(
        f"adaptau triton backend: tensors on {t.device} are not supported (CUDA tensors, or "
        "CPU tensors with TRITON_INTERPRET=1 set before Triton is imported)")


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _rows_block_m(block_d: int, m: int) -> int:
    return max(16, min(128, 8192 // block_d, triton.next_power_of_2(m)))


def _tile_blocks(block_d: int, batch: int, m: int) -> Tuple[int, int]:
    cap = 64 if block_d <= 64 else (32 if block_d <= 256 else 16)
    bb = max(16, min(cap, triton.next_power_of_2(batch)))
    bn = max(16, min(cap, triton.next_power_of_2(m)))
    return bb, bn


def _dot_precision(dtype: torch.dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "ieee"


def _num_warps(block_elems: int) -> int:
    return 4 if block_elems <= 8192 else 8


def _inv_norms(x: Tensor, acc: torch.dtype) -> Tensor:
    rows, dim = x.shape
    out = torch.empty(rows, dtype=acc, device=x.device)
    block_d = _block_d(dim)
    block_r = max(1, min(64, 4096 // block_d))
    _inv_norm_kernel[(triton.cdiv(rows, block_r),)](
        x, out, rows, dim, NORM_EPS, BLOCK_R=block_r, BLOCK_D=block_d, ACC=_TL_DTYPES[acc])
    return out


def forward(user: Tensor, items: Tensor, pos: Tensor, neg: Tensor, pos_scale: Tensor,
            neg_scale: Tensor, neg_logq: Optional[Tensor], neg_mode: int, include_pos: bool,
            normalize: bool, remove_hits: bool, compute_raw: bool
            ) -> Tuple[Tensor, Tensor, Tensor]:
    """Backend forward (contract in :mod:`adaptau.loss._contract`): ``(loss, lse, raw or [0])``."""
    _check_device(user)
    batch, dim = user.shape
    acc = _acc_dtype(user.dtype)
    tl_acc = _TL_DTYPES[acc]
    dev = user.device
    dummy = torch.empty(1, dtype=acc, device=dev)
    ru = _inv_norms(user, acc) if normalize else dummy
    ri = _inv_norms(items, acc) if normalize else dummy
    loss = torch.empty(batch, dtype=acc, device=dev)
    lse = torch.empty(batch, dtype=acc, device=dev)
    raw = torch.empty(batch if compute_raw else 0, dtype=acc, device=dev)
    raw_arg = raw if compute_raw else dummy
    logq = neg_logq if neg_logq is not None else dummy
    block_d = _block_d(dim)
    flags = dict(HAS_LOGQ=neg_logq is not None, INCLUDE_POS=bool(include_pos),
                 NORMALIZE=bool(normalize), REMOVE_HITS=bool(remove_hits),
                 COMPUTE_RAW=bool(compute_raw), BLOCK_D=block_d, ACC=tl_acc)
    if neg_mode == NEG_PER_ROW:
        m = neg.shape[1]
        block_m = _rows_block_m(block_d, m)
        _fwd_rows_kernel[(batch,)](
            user, items, pos, neg, pos_scale, neg_scale, logq, ru, ri, loss, lse, raw_arg,
            m, dim, BLOCK_M=block_m, num_warps=_num_warps(block_m * block_d), **flags)
    elif neg_mode in (NEG_SHARED, NEG_IN_BATCH):
        cand = neg if neg_mode == NEG_SHARED else pos
        m = cand.shape[0]
        bb, bn = _tile_blocks(block_d, batch, m)
        _fwd_tiles_kernel[(triton.cdiv(batch, bb),)](
            user, items, pos, cand, pos_scale, neg_scale, logq, ru, ri, loss, lse, raw_arg,
            batch, m, dim, IN_BATCH=neg_mode == NEG_IN_BATCH, BLOCK_B=bb, BLOCK_N=bn,
            DOT_PRECISION=_dot_precision(user.dtype), num_warps=4, **flags)
    else:
        raise ValueError(f"unknown neg_mode {neg_mode}")
    return loss, lse, raw


def _segment_reduce(keys: Tensor, weights: Tensor, src_rows: Tensor, src: Tensor,
                    items: Tensor, ri: Tensor, normalize: bool, acc: torch.dtype) -> Tensor:
    """grad_items[i] = J_i · Σ_{j: keys[j]=i} weights[j]·src[src_rows[j]] (J_i: normalization)."""
    num_items, dim = items.shape
    keys = keys.long()
    sorted_keys, order = torch.sort(keys, stable=True)
    counts = torch.bincount(sorted_keys, minlength=num_items)
    offsets = torch.zeros(num_items + 1, dtype=torch.int64, device=items.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    w_sorted = weights.index_select(0, order).contiguous()
    rows_sorted = src_rows.index_select(0, order).contiguous()
    grad_items = torch.empty_like(items)
    block_d = _block_d(dim)
    block_p = max(16, min(64, 4096 // block_d))
    _item_segment_kernel[(num_items,)](
        offsets, w_sorted, rows_sorted, src.contiguous(), items, ri, grad_items, dim,
        NORMALIZE=bool(normalize), BLOCK_P=block_p, BLOCK_D=block_d, ACC=_TL_DTYPES[acc])
    return grad_items


def backward(grad_loss: Tensor, user: Tensor, items: Tensor, pos: Tensor, neg: Tensor,
             pos_scale: Tensor, neg_scale: Tensor, neg_logq: Optional[Tensor], lse: Tensor,
             neg_mode: int, include_pos: bool, normalize: bool, remove_hits: bool,
             need_scale_grads: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backend backward: ``(grad_user, grad_items, grad_pos_scale, grad_neg_scale)``."""
    _check_device(user)
    batch, dim = user.shape
    num_items = items.shape[0]
    acc = _acc_dtype(user.dtype)
    tl_acc = _TL_DTYPES[acc]
    dev = user.device
    atomic = effective_item_grad_mode() == "atomic"
    dummy = torch.empty(1, dtype=acc, device=dev)
    ru = _inv_norms(user, acc) if normalize else dummy
    ri = _inv_norms(items, acc) if normalize else dummy
    logq = neg_logq if neg_logq is not None else dummy
    grad_loss = grad_loss.to(acc).contiguous()
    lse = lse.to(acc).contiguous()
    grad_user = torch.empty_like(user)
    galpha = torch.empty(batch, dtype=acc, device=dev)
    gbeta = torch.empty(batch, dtype=acc, device=dev)
    gi = torch.zeros((num_items, dim), dtype=acc, device=dev) if atomic else dummy
    wpos = dummy if atomic else torch.empty(batch, dtype=acc, device=dev)
    block_d = _block_d(dim)
    common = dict(HAS_LOGQ=neg_logq is not None, NORMALIZE=bool(normalize),
                  REMOVE_HITS=bool(remove_hits), ATOMIC=atomic, BLOCK_D=block_d, ACC=tl_acc)

    if neg_mode == NEG_PER_ROW:
        m = neg.shape[1]
        w = dummy if atomic else torch.empty((batch, m), dtype=acc, device=dev)
        block_m = _rows_block_m(block_d, m)
        _bwd_rows_kernel[(batch,)](
            grad_loss, user, items, pos, neg, pos_scale, neg_scale, logq, lse, ru, ri,
            grad_user, gi, w, wpos, galpha, gbeta, m, dim, INCLUDE_POS=bool(include_pos),
            BLOCK_M=block_m, num_warps=_num_warps(block_m * block_d), **common)
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
        bb, bn = _tile_blocks(block_d, batch, m)
        prec = _dot_precision(user.dtype)
        in_batch = neg_mode == NEG_IN_BATCH
        _bwd_tiles_rows_kernel[(triton.cdiv(batch, bb),)](
            grad_loss, user, items, pos, cand, pos_scale, neg_scale, logq, lse, ru, ri,
            grad_user, gi, wpos, galpha, gbeta, batch, m, dim, IN_BATCH=in_batch,
            INCLUDE_POS=bool(include_pos), BLOCK_B=bb, BLOCK_N=bn, DOT_PRECISION=prec,
            num_warps=4, **common)
        gcand = dummy if atomic else torch.empty((m, dim), dtype=acc, device=dev)
        _bwd_tiles_cols_kernel[(triton.cdiv(m, bn),)](
            grad_loss, user, items, pos, cand, neg_scale, logq, lse, ru, ri, gi, gcand,
            batch, m, dim, IN_BATCH=in_batch, BLOCK_B=bb, BLOCK_N=bn, DOT_PRECISION=prec,
            num_warps=4, **common)
        if not atomic:
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
            grad_items = torch.empty_like(items)
            block_r = max(1, min(64, 4096 // block_d))
            _item_finalize_kernel[(triton.cdiv(num_items, block_r),)](
                gi, items, ri, grad_items, num_items, dim, NORMALIZE=bool(normalize),
                BLOCK_R=block_r, BLOCK_D=block_d, ACC=tl_acc)
    # need_scale_grads: the scale gradients cost nothing extra, so they are always computed
    return grad_user, grad_items, galpha, gbeta
