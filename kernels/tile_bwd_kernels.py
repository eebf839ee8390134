"""Backward kernels of shared and in-batch negatives, on the split grid of
:mod:`._tile_common`; they recompute the scores from the saved ``lse``.

``_bwd_tiles_rows_kernel`` (blocks of rows x slices of the candidates) writes partial user
gradients, Σ dl·ŝ and Σ P; ``_bwd_rows_finish_kernel`` adds them up per row in slice
order, adds the positive's term and applies the normalization Jacobian;
``_bwd_tiles_cols_kernel`` (blocks of candidates x slices of the rows) writes partial
candidate gradients ``Wᵀ·Û``. None of them uses atomics except the finish kernel's
positive term in the atomic item-gradient mode.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tile_common import _TILE_TUNING, _chunked_scores, _split_range, _tile_scores
from .norm_kernels import _normalize_bwd


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
