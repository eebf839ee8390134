"""The plain-PyTorch reference backend: the executable specification of the operator.

It implements the backend contract stated in :mod:`adaptau.loss._contract` (``forward``
and ``backward``) with ordinary tensor operations. It gathers the ``[B, M, D]`` block of
negative item rows, so it is slow and memory hungry at the paper's sizes, but it is
exact in float64 and is what every other backend is tested against.

The backward pass recomputes the scores and applies the closed-form derivatives
(written out below); the tests check them against autograd on the forward formula and
with ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._contract import NEG_IN_BATCH, NEG_PER_ROW, NEG_SHARED, NORM_EPS, accumulation_dtype


def _prepare(user, items, pos, neg, neg_mode, normalize):
    """Normalized vectors, the scores of every (row, candidate) pair and the keep mask."""
    pos = pos.long()
    batch = user.shape[0]
    if normalize:
        user_hat = F.normalize(user, dim=-1, eps=NORM_EPS)
        items_hat = F.normalize(items, dim=-1, eps=NORM_EPS)
    else:
        user_hat, items_hat = user, items
    pos_score = (user_hat * items_hat[pos]).sum(-1)  # [B]
    if neg_mode == NEG_PER_ROW:
        neg_index = neg.long()  # [B, M]
        neg_score = torch.einsum("bd,bmd->bm", user_hat, items_hat[neg_index])
        keep = torch.ones_like(neg_score, dtype=torch.bool)
    elif neg_mode == NEG_SHARED:
        neg_index = neg.long().unsqueeze(0).expand(batch, -1)  # [B, M]
        neg_score = user_hat @ items_hat[neg.long()].T
        keep = torch.ones_like(neg_score, dtype=torch.bool)
    elif neg_mode == NEG_IN_BATCH:
        neg_index = pos.unsqueeze(0).expand(batch, -1)  # [B, B]: row b sees every positive ...
        neg_score = user_hat @ items_hat[pos].T
        keep = ~torch.eye(batch, dtype=torch.bool, device=user.device)  # ... but its own
    else:
        raise ValueError(f"unknown neg_mode {neg_mode}")
    return pos, user_hat, items_hat, pos_score, neg_index, neg_score, keep


def _logits(
    pos, pos_score, neg_index, neg_score, keep, pos_scale, neg_scale, neg_logq, include_pos, remove_hits
):
    """Scaled logits, the log-denominator ``lse`` and the per-row loss."""
    batch = pos_score.shape[0]
    if remove_hits:
        keep = keep & (neg_index != pos.unsqueeze(1))
    neg_logit = neg_scale.unsqueeze(1) * neg_score
    if neg_logq is not None:
        neg_logit = neg_logit - neg_logq[neg_index]
    neg_logit = neg_logit.masked_fill(~keep, float("-inf"))
    pos_logit = pos_scale * pos_score
    if include_pos:
        lse = torch.logaddexp(torch.logsumexp(neg_logit, dim=1), pos_logit)
        empty = torch.zeros(batch, dtype=torch.bool, device=pos_score.device)
    else:
        lse = torch.logsumexp(neg_logit, dim=1)  # -inf for an empty row
        empty = ~keep.any(dim=1)
    loss = torch.where(empty, torch.zeros_like(lse), lse - pos_logit)
    return keep, pos_logit, neg_logit, lse, loss, empty


def forward(
    user: Tensor,
    items: Tensor,
    pos: Tensor,
    neg: Tensor,
    pos_scale: Tensor,
    neg_scale: Tensor,
    neg_logq: Optional[Tensor],
    neg_mode: int,
    include_pos: bool,
    normalize: bool,
    remove_hits: bool,
    compute_raw: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backend forward (contract in :mod:`adaptau.loss._contract`):
    ``(loss [B], lse [B], raw [B] or [0])``."""
    acc = accumulation_dtype(user.dtype)
    logq = None if neg_logq is None else neg_logq.to(acc)
    pos, _, _, pos_score, neg_index, neg_score, keep = _prepare(
        user.to(acc), items.to(acc), pos, neg, neg_mode, normalize
    )

    def loss_with(alpha, beta):
        _, _, _, lse, loss, _ = _logits(
            pos, pos_score, neg_index, neg_score, keep, alpha, beta, logq, include_pos, remove_hits
        )
        return loss, lse

    loss, lse = loss_with(pos_scale.to(acc), neg_scale.to(acc))
    if compute_raw:  # the same scores with α = β = 1
        ones = torch.ones_like(loss)
        raw, _ = loss_with(ones, ones)
    else:
        raw = loss.new_empty(0)
    return loss, lse, raw


def _normalize_backward(x: Tensor, x_hat: Tensor, grad_hat: Tensor) -> Tensor:
    """Gradient through ``x / max(||x||, eps)`` (row-wise)."""
    norm = x.norm(dim=-1, keepdim=True)
    projected = grad_hat - x_hat * (x_hat * grad_hat).sum(-1, keepdim=True)
    return torch.where(norm > NORM_EPS, projected / norm.clamp_min(NORM_EPS), grad_hat / NORM_EPS)


def backward(
    grad_loss: Tensor,
    user: Tensor,
    items: Tensor,
    pos: Tensor,
    neg: Tensor,
    pos_scale: Tensor,
    neg_scale: Tensor,
    neg_logq: Optional[Tensor],
    lse: Tensor,
    neg_mode: int,
    include_pos: bool,
    normalize: bool,
    remove_hits: bool,
    need_scale_grads: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backend backward: ``(grad_user [B, D], grad_items [N, D], grad_pos_scale [B], grad_neg_scale [B])``.

    With g = grad_loss[b] (0 for an empty row), P_m = exp(neg_logit_m − lse) and
    P_pos = include_pos·exp(α·ŝ_pos − lse)::

        ∂/∂ŝ(b,p)   = g·α·(P_pos − 1)        ∂/∂α = g·ŝ_pos·(P_pos − 1)
        ∂/∂ŝ(b,n_m) = g·β·P_m                ∂/∂β = g·Σ_m P_m·ŝ(b,n_m)

    then ŝ(b,i) = ⟨û_b, î_i⟩ spreads to û and î (duplicates accumulate), and the
    normalization's Jacobian maps those to the raw vectors.
    """
    acc = accumulation_dtype(user.dtype)
    u, it = user.to(acc), items.to(acc)
    alpha, beta = pos_scale.to(acc), neg_scale.to(acc)
    logq = None if neg_logq is None else neg_logq.to(acc)
    pos, u_hat, it_hat, pos_score, neg_index, neg_score, keep = _prepare(u, it, pos, neg, neg_mode, normalize)
    keep, pos_logit, neg_logit, lse, _, empty = _logits(
        pos, pos_score, neg_index, neg_score, keep, alpha, beta, logq, include_pos, remove_hits
    )
    g = torch.where(empty, torch.zeros_like(lse), grad_loss.to(acc))
    safe_lse = torch.where(empty, torch.zeros_like(lse), lse)
    p_neg = torch.exp(neg_logit - safe_lse.unsqueeze(1))  # 0 where masked
    p_pos = torch.exp(pos_logit - safe_lse) if include_pos else torch.zeros_like(lse)
    d_pos_logit = g * (p_pos - 1.0)  # [B]
    d_neg_logit = g.unsqueeze(1) * p_neg  # [B, M']
    d_pos_score = d_pos_logit * alpha
    d_neg_score = d_neg_logit * beta.unsqueeze(1)

    grad_u_hat = d_pos_score.unsqueeze(1) * it_hat[pos]
    grad_it_hat = torch.zeros_like(it_hat)
    grad_it_hat.index_add_(0, pos, d_pos_score.unsqueeze(1) * u_hat)
    if neg_mode == NEG_PER_ROW:
        grad_u_hat = grad_u_hat + torch.einsum("bm,bmd->bd", d_neg_score, it_hat[neg_index])
        grad_it_hat.index_add_(
            0,
            neg_index.reshape(-1),
            (d_neg_score.unsqueeze(2) * u_hat.unsqueeze(1)).reshape(-1, u_hat.shape[1]),
        )
    else:
        candidates = neg_index[0]  # the same candidate list for every row
        grad_u_hat = grad_u_hat + d_neg_score @ it_hat[candidates]
        grad_it_hat.index_add_(0, candidates, d_neg_score.T @ u_hat)

    if normalize:
        grad_u = _normalize_backward(u, u_hat, grad_u_hat)
        grad_it = _normalize_backward(it, it_hat, grad_it_hat)
    else:
        grad_u, grad_it = grad_u_hat, grad_it_hat
    if need_scale_grads:
        grad_alpha = d_pos_logit * pos_score
        grad_beta = (d_neg_logit * neg_score).sum(1)
    else:
        grad_alpha = torch.zeros_like(lse)
        grad_beta = torch.zeros_like(lse)
    return grad_u.to(user.dtype), grad_it.to(items.dtype), grad_alpha, grad_beta
