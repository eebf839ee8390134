"""The normalization's kernels: ``_inv_norm_kernel``, the pre-pass
``r = 1 / max(||x||, eps)`` over every row of a table or over the rows a call touches, and
``_normalize_bwd``, the Jacobian-transpose of ``x / max(||x||, eps)`` that the backward
kernels apply to their gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit_common import _touched_rows


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
