"""Item-gradient kernels. ``_item_finalize_kernel`` applies the normalization Jacobian to
the ``"atomic"`` mode's accumulated gradient and casts it to the table's dtype;
``_item_segment_kernel`` sums each item's run of sorted contributions (the deterministic
``"segment"`` mode), the Jacobian fused in. Both run over every row or over the rows a call
touches.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit_common import _touched_rows
from .norm_kernels import _normalize_bwd


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
