"""What the kernels of shared and in-batch negatives (``neg_mode`` 1 and 2) share: the
split of their grid, their autotuned block shapes and the scoring of a tile.

The tile kernels run on a 2-D grid: axis 0 blocks of rows (forward, row backward) or of
candidates (column backward), axis 1 ``NSPLIT`` slices of the other axis, each slice a
whole number of blocks (``_split_range``). Every program writes partial results of its
slice; a small merge kernel (forward, row backward) or a sum over the slices (column
backward) combines them in a fixed order, so the result does not depend on timing, only on
the block shape. The block shapes are autotuned (``_TILE_TUNING``: ``_tile_configs``,
pruned per problem by ``_prune_tile_configs``). ``_tile_scores`` scores a
``[BLOCK_B, BLOCK_N]`` tile of candidates, with ``_chunked_scores`` for the score dot in
``BLOCK_K``-column chunks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


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
