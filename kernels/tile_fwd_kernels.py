"""Forward kernels of shared and in-batch negatives, on the split grid of
:mod:`._tile_common`.

``_fwd_tiles_kernel`` writes the partial log-sum-exps of one block of rows over one slice
of the candidates; ``_fwd_merge_kernel`` merges the slices' partials per row
(``_merged_lse``), adds the positive (``_pos_scores``) and stores loss, lse and raw.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit_common import _lse_fold_tile, _lse_merge, _with_positive
from ._tile_common import _TILE_TUNING, _split_range, _tile_scores


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
