"""Kernels of per-row negatives (``neg_mode == 0``), one program per row.

``_fwd_rows_kernel`` gathers ``BLOCK_M`` item rows at a time by index, dots them with the
row's user vector and keeps a running log-sum-exp per lane; ``_bwd_rows_kernel`` recomputes
the scores from the saved ``lse`` and writes the user and scale gradients and the item
gradients (atomic adds, or the per-pair weights of the segment reduction).
``_row_block_scores`` is the scoring step both share.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit_common import _lse_finish, _lse_fold, _with_positive
from .norm_kernels import _normalize_bwd


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
