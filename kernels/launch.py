"""How the host side launches the kernels: the Triton types of the accumulation dtypes,
block sizes and warp counts, ``tl.dot``'s input precision (``_dot_precision``,
``ADAPTAU_TRITON_FP32_DOT``), the split count of the tile kernels' grid (``_split_count``,
``ADAPTAU_TRITON_SPLIT``) and their autotune tag, and the wrappers every launch and
buffer goes through (``_launch``, ``_empty``), with the switches tests set on this module
(``_launch_log``, ``_poison``, ``_force_split``, ``_full_width_dots``).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


#: ``tl.dot``'s input precision for float32 inputs when set (``ieee``, ``tf32``, ``tf32x3``);
#: empty: ``"tf32"`` while ``torch.backends.cuda.matmul.allow_tf32`` is True, else ``"ieee"``.
FP32_DOT_PRECISION = os.environ.get("ADAPTAU_TRITON_FP32_DOT", "").strip().lower()
if FP32_DOT_PRECISION not in ("", "ieee", "tf32", "tf32x3"):
    raise ValueError(f"ADAPTAU_TRITON_FP32_DOT must be ieee, tf32 or tf32x3, got {FP32_DOT_PRECISION!r}")


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


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


def _num_warps(block_elems: int) -> int:
    return 4 if block_elems <= 8192 else 8


def _row_block(block_d: int) -> int:
    return max(1, min(64, 4096 // block_d))


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
