"""The backend contract of the fused loss, stated once.

The dispatcher (:mod:`adaptau.loss.ops`), the reference backend
(:mod:`adaptau.loss.reference`) and the Triton kernels (``adaptau.kernels``) import the
constants below from here; the C++/CUDA backends read the same values from
``csrc/contract.h`` (exposed as ``torch.ops.adaptau.contract_constants()``;
``tests/test_layout.py`` checks that the two agree).

Backend contract
----------------
Every backend implements the same two functions with the same positional arguments
(the C++/CUDA ones as ``torch.ops.adaptau.fused_forward`` / ``fused_backward``, the
Triton one as ``adaptau.kernels.forward`` / ``backward``, the reference one as
``adaptau.loss.reference.forward`` / ``backward``)::

    forward(user, items, pos, neg, pos_scale, neg_scale, neg_logq,
            neg_mode, include_pos, normalize, remove_hits, compute_raw)
        -> (loss [B], lse [B], raw [B] or [0])

    backward(grad_loss, user, items, pos, neg, pos_scale, neg_scale, neg_logq, lse,
             neg_mode, include_pos, normalize, remove_hits, need_scale_grads)
        -> (grad_user [B, D], grad_items [N, D], grad_pos_scale [B], grad_neg_scale [B])

What a backend receives (the dispatcher guarantees it; backends need not re-check):

* ``user`` ``[B, D]`` and ``items`` ``[N, D]``: contiguous, same floating dtype
  (float16, bfloat16, float32 or float64: :data:`FLOAT_DTYPES`) and device; ``B >= 1``,
  ``N >= 1``, ``D >= 1``.
* ``pos`` ``[B]`` and ``neg``: contiguous, same integer dtype (int32 or int64:
  :data:`INDEX_DTYPES`), every index in ``[0, N)``. ``neg`` is ``[B, M]`` for
  ``neg_mode == 0`` (:data:`NEG_PER_ROW`), ``[M]`` for ``neg_mode == 1`` (:data:`NEG_SHARED`,
  shared by all rows), and an empty ``[0]`` tensor for ``neg_mode == 2``
  (:data:`NEG_IN_BATCH`: row b's negatives are ``pos[j]`` for every ``j != b``; ``B >= 2``).
  ``M >= 1``.
* ``pos_scale``, ``neg_scale``: contiguous ``[B]`` in the accumulation dtype
  (:func:`accumulation_dtype`: float64 for float64 inputs, float32 otherwise), finite.
  The C++ ``cpu`` backend also rejects a magnitude above :data:`MAX_INVERSE_TEMPERATURE`
  (``ValueError``); the dispatcher does not check that bound yet.
* ``neg_logq``: ``None`` or a contiguous, finite ``[N]`` tensor in the accumulation dtype.

With ŝ the cosine (``normalize``: vectors divided by ``max(||v||, 1e-12)``, :data:`NORM_EPS`)
or the dot product, α = pos_scale[b], β = neg_scale[b], p = pos[b]::

    lse[b]  = log( include_pos·exp(α·ŝ(b,p)) + Σ_m keep_m·exp(β·ŝ(b,n_m) − logq[n_m]) )
    loss[b] = lse[b] − α·ŝ(b,p)

``keep_m`` is 0 when ``remove_hits`` and ``n_m == p``. A row with an empty denominator
has ``lse = -inf`` and ``loss = 0`` and gets no gradient. ``raw`` (when ``compute_raw``)
is ``loss`` with α = β = 1. Outputs are in the accumulation dtype. ``backward`` receives
``grad_loss`` ``[B]`` (accumulation dtype) and the forward's ``lse``; it returns
gradients of ``Σ_b grad_loss[b]·loss[b]``: ``grad_user``/``grad_items`` in the input dtype
(item gradients dense, duplicates accumulated), scale gradients in the accumulation
dtype (zeros are allowed when ``need_scale_grads`` is False).

The public function reduces the per-row loss with one of :data:`REDUCTIONS`.
"""

from __future__ import annotations

import torch

__all__ = [
    "NEG_PER_ROW",
    "NEG_SHARED",
    "NEG_IN_BATCH",
    "NORM_EPS",
    "MAX_INVERSE_TEMPERATURE",
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "REDUCTIONS",
    "accumulation_dtype",
]

#: ``neg_mode``: ``neg`` is ``[B, M]`` (per row), ``[M]`` (shared by every row) or empty
#: (in-batch: the other rows' positives).
NEG_PER_ROW, NEG_SHARED, NEG_IN_BATCH = 0, 1, 2

#: Norms are clamped from below by this value before dividing (as ``F.normalize``).
NORM_EPS = 1e-12

#: Largest |inverse temperature| (``pos_scale``, ``neg_scale``) the C++ backend accepts: a
#: float32 logit of 1e9 still carries the cosine to ~1e-7 relative (``csrc/contract.h``).
MAX_INVERSE_TEMPERATURE = 1e8

#: The dtypes of ``user`` / ``items``.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: The dtypes of ``pos`` / ``neg``.
INDEX_DTYPES = (torch.int32, torch.int64)

#: ``softmax_loss(reduction=...)``.
REDUCTIONS = ("mean", "sum", "none")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
