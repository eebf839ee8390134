"""``@triton.jit`` helpers that several kernel modules call: ``_touched_rows`` (the rows and
mask of a launch over all rows or over a call's touched-row list) and the online
log-sum-exp steps: folds of logits per lane (``_lse_fold``) and per tile row
(``_lse_fold_tile``), the lanes' final reduction (``_lse_finish``), the merge of partial
(max, scaled sum) pairs (``_lse_merge``) and the positive's term (``_with_positive``).
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _lse_finish(m_run, s_run):
    """Log-sum-exp of the per-lane running (max, scaled sum) pairs (−inf when all absent)."""
    mx = tl.max(m_run, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log(tl.sum(s_run * tl.exp(m_run - mx_safe), 0))


@triton.jit
def _lse_merge(m_run, s_run, m, s):
    """Fold a partial (max, scaled sum) pair into the running one (elementwise)."""
    m_new = tl.maximum(m_run, m)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s_run * tl.exp(m_run - m_safe) + s * tl.exp(m - m_safe)
