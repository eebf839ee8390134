"""Full-ranking evaluation: every user against every item, seen items masked.

Definitions (per evaluated user u with test set T_u and top-K list L_u; averages are over
users with a non-empty test row, as in the LightGCN / Adap-τ evaluation code):

* ``recall@K``    = |L_u ∩ T_u| / |T_u|
* ``precision@K`` = |L_u ∩ T_u| / K
* ``hit@K``       = 1 if L_u ∩ T_u is non-empty
* ``ndcg@K``      = DCG/IDCG with DCG = Σ_{r<K} [L_u[r] ∈ T_u] / log2(r + 2) and IDCG the same
  sum over the first min(|T_u|, K) positions
* ``mrr@K``       = 1 / (rank of the first hit in L_u), 0 without a hit (ranks from 1)
* ``map@K``       = Σ_{r≤K} [L_u[r] ∈ T_u] · precision@r / min(|T_u|, K) (RecBole's MAP@K)
* ``coverage@K``  = |∪_u L_u| / num_items (share of the catalog recommended to anyone)
* ``arp@K``       = mean over users of the mean popularity of L_u (needs ``item_popularity``)
* ``tail@K``      = share of all recommended slots that hold one of the least popular 80%
  of items (``floor(0.8·num_items)`` items by ascending popularity, ties by item id;
  needs ``item_popularity``)

``arp`` and ``tail`` need item popularity, which the function cannot know for sure from
its inputs, so they are **omitted** when ``item_popularity`` is None (the trainer passes
the training interaction counts). Items listed in ``exclude`` are never recommended; a
slot that can only be filled by an excluded item (fewer than K candidates left) counts as
a miss.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

__all__ = ["full_ranking", "by_user_degree", "item_popularity", "format_metrics", "METRICS"]

METRICS = ("recall", "ndcg", "precision", "hit", "mrr", "map", "arp", "coverage", "tail")
_PER_USER = ("recall", "ndcg", "precision", "hit", "mrr", "map")


def item_popularity(interactions: sp.spmatrix) -> np.ndarray:
    """Interaction count of each item (column sums of a user × item matrix)."""
    return np.asarray(interactions.sum(axis=0)).ravel().astype(np.float64)


def _csr(m, name: str, shape) -> sp.csr_matrix:
    if not sp.issparse(m):
        raise TypeError(f"{name} must be a scipy.sparse matrix, got {type(m).__name__}")
    m = m.tocsr()
    if m.shape != shape:
        raise ValueError(f"{name} has shape {m.shape}, expected [num_users, num_items] = {shape}")
    return m


@torch.no_grad()
def full_ranking(
    user_vectors: Tensor,
    item_vectors: Tensor,
    test: sp.spmatrix,
    exclude: Optional[sp.spmatrix] = None,
    ks: Union[int, Sequence[int]] = (20,),
    *,
    item_popularity: Optional[Union[np.ndarray, Tensor]] = None,
    chunk_size: Optional[int] = None,
) -> Dict[str, float]:
    """Rank all items for every user with a test item; return the metrics at each K.

    Args:
        user_vectors: ``[num_users, D]`` scoring vectors (scores are dot products; pass
            normalized item vectors to rank by cosine).
        item_vectors: ``[num_items, D]``.
        test: CSR ``[num_users, num_items]``, the held-out items (non-zeros).
        exclude: CSR of the same shape, items never to recommend (train, and valid at test
            time); ``None`` masks nothing.
        ks: cut-offs.
        item_popularity: ``[num_items]`` popularity (e.g. train counts) for ``arp``/``tail``;
            those keys are omitted when it is None.
        chunk_size: users scored at once (default: about 8M scores per chunk).

    Returns:
        ``{"recall@20": …, "ndcg@20": …, "precision@20": …, "hit@20": …, "mrr@20": …,
        "map@20": …, "coverage@20": …,
        ["arp@20": …, "tail@20": …]}`` for each K. With no evaluable user every value is 0.
    """
    if user_vectors.dim() != 2 or item_vectors.dim() != 2:
        raise ValueError("user_vectors and item_vectors must be 2-D")
    num_users, num_items = user_vectors.shape[0], item_vectors.shape[0]
    ks = [int(ks)] if isinstance(ks, (int, np.integer)) else [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    test = _csr(test, "test", (num_users, num_items))
    if exclude is not None:
        exclude = _csr(exclude, "exclude", (num_users, num_items))
    device = user_vectors.device
    items_t = item_vectors.detach()
    users_t = user_vectors.detach().to(items_t.dtype)
    kmax = min(max(ks), num_items)

    pop = None
    tail_mask = None
    if item_popularity is not None:
        pop_np = np.asarray(
            item_popularity.cpu() if isinstance(item_popularity, Tensor) else item_popularity,
            dtype=np.float64,
        ).ravel()
        if pop_np.shape[0] != num_items:
            raise ValueError(f"item_popularity has {pop_np.shape[0]} entries, expected {num_items}")
        pop = torch.as_tensor(pop_np, device=device)
        order = np.argsort(pop_np, kind="stable")
        tail = np.zeros(num_items, dtype=bool)
        tail[order[: int(math.floor(0.8 * num_items))]] = True
        tail_mask = torch.as_tensor(tail, device=device)

    test_sizes = np.diff(test.indptr)
    eval_users = np.flatnonzero(test_sizes > 0)
    n_eval = eval_users.size
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, device=device, dtype=torch.float64))
    ideal = torch.cumsum(discount, 0)

    sums = {f"{m}@{k}": 0.0 for k in ks for m in _PER_USER + ("arp", "tail")}
    ranks = torch.arange(1, kmax + 1, device=device, dtype=torch.float64)
    covered = {k: torch.zeros(num_items, dtype=torch.bool, device=device) for k in ks}
    if chunk_size is None:
        chunk_size = max(1, (1 << 23) // max(1, num_items))
    for start in range(0, n_eval, chunk_size):
        rows = eval_users[start : start + chunk_size]
        c = rows.size
        rows_t = torch.as_tensor(rows, device=device)
        scores = users_t[rows_t] @ items_t.T
        scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
        if exclude is not None:
            sub = exclude[rows]
            r = torch.as_tensor(np.repeat(np.arange(c), np.diff(sub.indptr)), device=device)
            col = torch.as_tensor(sub.indices.astype(np.int64), device=device)
            scores[r, col] = float("-inf")
        top_scores, top = torch.topk(scores, kmax, dim=1)
        valid = torch.isfinite(top_scores) | (top_scores > 0)  # -inf slots are misses
        tsub = test[rows]
        truth = torch.zeros(c, num_items, dtype=torch.bool, device=device)
        r = torch.as_tensor(np.repeat(np.arange(c), np.diff(tsub.indptr)), device=device)
        truth[r, torch.as_tensor(tsub.indices.astype(np.int64), device=device)] = True
        hits = (truth.gather(1, top) & valid).double()
        n_test = torch.as_tensor(test_sizes[rows], device=device, dtype=torch.float64)
        for k in ks:
            kk = min(k, kmax)
            h = hits[:, :kk]
            nh = h.sum(1)
            sums[f"recall@{k}"] += float((nh / n_test).sum())
            sums[f"precision@{k}"] += float((nh / k).sum())
            sums[f"hit@{k}"] += float((nh > 0).double().sum())
            dcg = (h * discount[:kk]).sum(1)
            idcg = ideal[(torch.clamp(n_test, max=kk) - 1).long()]
            sums[f"ndcg@{k}"] += float((dcg / idcg).sum())
            first = torch.where(h > 0, ranks[:kk], torch.full_like(h, math.inf)).amin(1)
            sums[f"mrr@{k}"] += float((1.0 / first).sum())
            precision_at = h.cumsum(1) / ranks[:kk]
            sums[f"map@{k}"] += float(((precision_at * h).sum(1) / torch.clamp(n_test, max=k)).sum())
            topk_items = top[:, :kk]
            vk = valid[:, :kk]
            covered[k][topk_items[vk]] = True
            if pop is not None:
                slots = vk.double().sum(1).clamp(min=1)
                sums[f"arp@{k}"] += float(((pop[topk_items] * vk).sum(1) / slots).sum())
                sums[f"tail@{k}"] += float((tail_mask[topk_items] & vk).double().sum())

    out: Dict[str, float] = {}
    for k in ks:
        denom = max(n_eval, 1)
        for m in _PER_USER:
            out[f"{m}@{k}"] = sums[f"{m}@{k}"] / denom
        if pop is not None:
            out[f"arp@{k}"] = sums[f"arp@{k}"] / denom
        out[f"coverage@{k}"] = float(covered[k].double().sum()) / num_items if n_eval else 0.0
        if pop is not None:
            out[f"tail@{k}"] = sums[f"tail@{k}"] / max(1, n_eval * min(k, kmax))
    return out


def by_user_degree(
    user_vectors: Tensor,
    item_vectors: Tensor,
    test: sp.spmatrix,
    exclude: Optional[sp.spmatrix],
    degree: np.ndarray,
    groups: int,
    ks: Union[int, Sequence[int]] = (20,),
    *,
    item_popularity: Optional[Union[np.ndarray, Tensor]] = None,
) -> Dict[str, Dict[str, float]]:
    """:func:`full_ranking` per user group: users with a test item are cut into ``groups``
    groups of about equal size by ``degree`` (``[num_users]``, e.g. training interactions per
    user), and each group is ranked on its own. Returns ``{"degree 16-30 (1247 users)":
    metrics, ...}`` from the lightest users to the heaviest; users of equal degree share a
    group, so a group may be larger than its share."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    test = _csr(test, "test", (user_vectors.shape[0], item_vectors.shape[0]))
    degree = np.asarray(degree)
    if degree.shape != (test.shape[0],):
        raise ValueError(f"degree must have shape [{test.shape[0]}], got {list(degree.shape)}")
    evaluated = np.flatnonzero(np.diff(test.indptr) > 0)
    order = evaluated[np.argsort(degree[evaluated], kind="stable")]
    out: Dict[str, Dict[str, float]] = {}
    start = 0
    for g in range(groups):
        stop = max(start, (g + 1) * len(order) // groups)
        while 0 < stop < len(order) and degree[order[stop]] == degree[order[stop - 1]]:
            stop += 1  # users of one degree stay in one group
        members = order[start:stop]
        start = stop
        if len(members) == 0:
            continue
        in_group = np.zeros(test.shape[0], dtype=bool)
        in_group[members] = True
        stored = np.repeat(in_group, np.diff(test.indptr))
        indptr = np.concatenate([[0], np.cumsum(np.where(in_group, np.diff(test.indptr), 0))])
        group_test = sp.csr_matrix((test.data[stored], test.indices[stored], indptr), shape=test.shape)
        lo, hi = degree[members[0]], degree[members[-1]]
        out[f"degree {lo}-{hi} ({len(members)} users)"] = full_ranking(
            user_vectors, item_vectors, group_test, exclude, ks, item_popularity=item_popularity
        )
    return out


def format_metrics(rows: Dict[str, Dict[str, float]], ks: Iterable[int] = (20,)) -> str:
    """A plain-text table: one line per split (``rows`` maps split name → metrics)."""
    names = [m for m in METRICS]
    cols = []
    for k in ks:
        for m in names:
            key = f"{m}@{k}"
            if any(key in r for r in rows.values()):
                cols.append(key)
    width = max(12, *(len(c) + 2 for c in cols)) if cols else 12
    label = max(8, *(len(split) + 1 for split in rows)) if rows else 8
    head = f"{'split':<{label}}" + "".join(f"{c:>{width}}" for c in cols)
    lines = [head, "-" * len(head)]
    for split, r in rows.items():
        vals = "".join(f"{r[c]:>{width}.4f}" if c in r else f"{'-':>{width}}" for c in cols)
        lines.append(f"{split:<{label}}{vals}")
    return "\n".join(lines)
