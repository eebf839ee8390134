"""Mixed negatives: in-batch, shared and per-row negatives in one softmax, each source with
its own logQ.

For row ``b`` with positive ``p`` the denominator is the sum over every source::

    loss_b = −α_b·ŝ(b,p) + log( [include_pos]·exp(α_b·ŝ(b,p))
                                + Σ_sources Σ_m keep_m·exp(β_b·ŝ(b,n_m) − logq_source[n_m]) )

``remove_accidental_hits`` drops, in every source, the negatives equal to the row's positive
(for in-batch: the rows with the same positive). A row whose denominator is empty
contributes 0. A source with no negatives (in-batch with one row, ``[0]`` shared, ``[B, 0]``
per-row) is left out, as long as another one is present.

How it runs: one fused call per source (``include_pos=False``, ``reduction="none"``), on any
backend, then ``loss_b = logsumexp_s(loss_{s,b})`` (plus a zero term for ``include_pos``):
with ``include_pos=False`` each source's loss is ``lse_s − α·ŝ(b,p)``, and the common
``α·ŝ(b,p)`` passes through the log-sum-exp. Sources whose row is empty are left out of it.
Gradients follow by autograd through that combination, so every backend's fused backward
serves the mixed loss; each source is one pass over the batch's vectors. With dense item
gradients and a catalog much larger than the batch's indices, the sources' item gradients
are sparse, summed, and made dense once.
:func:`mixed_reference_loss` computes the same loss in one formula, the specification the
tests hold the combination to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._contract import NORM_EPS

__all__ = ["Negatives", "as_negatives", "mixed_softmax_loss", "mixed_reference_loss"]


@dataclass
class Negatives:
    """The negative sources of one :func:`adaptau.softmax_loss` call.

    Attributes:
        in_batch: use the other rows' positives (B ≥ 2).
        shared: ``[M_s]`` item ids shared by every row.
        per_row: ``[B, M_r]`` item ids, each row its own.
        in_batch_logq: ``[N]`` log sampling probability of each item as an in-batch negative
            (or ``[B]``, one value per row's positive).
        shared_logq, per_row_logq: ``[N]`` log sampling probabilities of those sources.
    """

    in_batch: bool = False
    shared: Optional[Tensor] = None
    per_row: Optional[Tensor] = None
    in_batch_logq: Optional[Tensor] = None
    shared_logq: Optional[Tensor] = None
    per_row_logq: Optional[Tensor] = None

    def sources(self, batch: Optional[int] = None) -> List[Tuple[str, Optional[Tensor], Optional[Tensor]]]:
        """``[(name, neg for softmax_loss, logq)]`` of the sources present; with ``batch``,
        only the non-empty ones (no in-batch part for one row, no source of 0 negatives)."""
        out = []
        if self.in_batch and (batch is None or batch >= 2):
            out.append(("in_batch", None, self.in_batch_logq))
        if self.shared is not None and (batch is None or self.shared.shape[-1] > 0):
            out.append(("shared", self.shared, self.shared_logq))
        if self.per_row is not None and (batch is None or self.per_row.shape[-1] > 0):
            out.append(("per_row", self.per_row, self.per_row_logq))
        return out


def as_negatives(neg: Union[Negatives, Mapping[str, Any]]) -> Negatives:
    """A :class:`Negatives` from itself or a mapping with its field names (TypeError for
    other keys)."""
    if isinstance(neg, Negatives):
        return neg
    fields = set(Negatives.__dataclass_fields__)
    unknown = sorted(set(neg) - fields)
    if unknown:
        raise TypeError(f"neg: unknown negative source(s) {unknown}; expected some of {sorted(fields)}")
    return Negatives(**dict(neg))


def _validate(negs: Negatives, pos: Tensor, num_items: int) -> None:
    if not isinstance(negs.in_batch, bool):
        raise TypeError(f"neg.in_batch must be a bool, got {type(negs.in_batch).__name__}")
    for name in ("shared", "per_row"):
        t = getattr(negs, name)
        if t is not None and (not isinstance(t, Tensor) or t.dim() != (1 if name == "shared" else 2)):
            raise ValueError(
                f"neg.{name} must be a {'[M]' if name == 'shared' else '[B, M]'} "
                f"integer tensor, got {getattr(t, 'shape', type(t).__name__)}"
            )
        if getattr(negs, name + "_logq") is not None and t is None:
            raise ValueError(f"neg.{name}_logq is given without neg.{name}")
    if negs.in_batch_logq is not None and not negs.in_batch:
        raise ValueError("neg.in_batch_logq is given without neg.in_batch=True")
    if not negs.sources():
        raise ValueError("neg: no negative source (give in_batch=True, shared= or per_row=)")
    if not negs.sources(pos.shape[0] if isinstance(pos, Tensor) and pos.dim() else None):
        raise ValueError(
            "neg: every source is empty (in-batch needs 2 rows; shared and per_row "
            "need at least one negative)"
        )


def _in_batch_logq_table(logq: Optional[Tensor], pos: Tensor, num_items: int) -> Optional[Tensor]:
    """An ``[N]`` in-batch logQ from an ``[N]`` or per-row ``[B]`` one."""
    if logq is None or not isinstance(logq, Tensor) or logq.dim() != 1 or logq.shape[0] == num_items:
        return logq
    if logq.shape[0] != pos.shape[0]:
        raise ValueError(
            f"neg.in_batch_logq must be [N={num_items}] or [B={pos.shape[0]}], got {tuple(logq.shape)}"
        )
    return logq.new_zeros(num_items).index_put_((pos.long(),), logq)


def _empty_rows(name: str, neg: Optional[Tensor], pos: Tensor, remove_hits: bool) -> Tensor:
    """``[B]`` bool: rows whose every negative of this source is an accidental hit."""
    if not remove_hits:
        return torch.zeros(pos.shape[0], dtype=torch.bool, device=pos.device)
    p = pos.long()
    if name == "in_batch":
        return (p.unsqueeze(0) == p.unsqueeze(1)).all(1)
    if name == "shared":
        return (neg.long().unsqueeze(0) == p.unsqueeze(1)).all(1)
    return (neg.long() == p.unsqueeze(1)).all(1)


def _combine(terms: List[Tensor], empties: List[Tensor], include_pos: bool) -> Tensor:
    """``logsumexp`` over the sources of each row, leaving out empty ones; 0 for a row with
    no term at all."""
    stacked = torch.stack([t.masked_fill(e, float("-inf")) for t, e in zip(terms, empties)])
    if include_pos:
        stacked = torch.cat([stacked, stacked.new_zeros(1, stacked.shape[1])])
    nothing = torch.isinf(stacked).all(0)
    safe = stacked.masked_fill(nothing.unsqueeze(0), 0.0)  # (no NaN gradient for such rows)
    return torch.where(nothing, torch.zeros_like(safe[0]), torch.logsumexp(safe, 0))


#: With dense item gradients, the sources run with sparse ones (summed, then made dense
#: once) while the batch's item indices number at most 1/_SPARSE_SOURCES_RATIO of the
#: catalog: then one dense [N, D] gradient is built instead of one per source (at N = 1M,
#: B = 2048 with 1024 shared and 64 per-row negatives, 2 threads: 107 against 201 ms per
#: step on an Intel Xeon).
_SPARSE_SOURCES_RATIO = 4


class _DenseItemGrad(torch.autograd.Function):
    """The item table unchanged; its backward turns the sources' summed sparse gradients
    into one dense ``[N, D]`` gradient."""

    @staticmethod
    def forward(ctx, items: Tensor) -> Tensor:
        return items.view_as(items)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.to_dense() if grad.is_sparse else grad


def _index_count(sources, batch: int) -> int:
    """How many item indices the batch reads: its positives and every source's negatives."""
    count = batch
    for name, neg, _ in sources:
        count += batch if name == "in_batch" else neg.numel()
    return count


def mixed_softmax_loss(
    user: Tensor,
    items: Tensor,
    pos: Tensor,
    neg,
    pos_scale,
    neg_scale,
    *,
    include_pos: bool,
    normalize: bool,
    remove_accidental_hits: bool,
    reduction: str,
    return_raw: bool,
    backend: str,
    item_grad: str,
):
    """:func:`adaptau.softmax_loss` with ``neg`` a :class:`Negatives` (or a mapping): one
    fused call per source, combined per row (module docstring)."""
    from .ops import softmax_loss

    negs = as_negatives(neg)
    if not isinstance(items, Tensor) or not isinstance(pos, Tensor):
        raise TypeError("items and pos must be tensors")
    num_items = items.shape[0] if items.dim() == 2 else 0
    _validate(negs, pos, num_items)
    sources = negs.sources(pos.shape[0])
    source_item_grad = item_grad
    if (
        item_grad == "dense"
        and items.requires_grad
        and len(sources) > 1
        and _SPARSE_SOURCES_RATIO * _index_count(sources, pos.shape[0]) <= num_items
    ):
        items, source_item_grad = _DenseItemGrad.apply(items), "sparse"
    terms, raws, empties = [], [], []
    for name, source, logq in sources:
        if name == "in_batch":
            logq = _in_batch_logq_table(logq, pos, num_items)
        out = softmax_loss(
            user,
            items,
            pos,
            source,
            pos_scale,
            neg_scale,
            include_pos=False,
            normalize=normalize,
            neg_logq=logq,
            remove_accidental_hits=remove_accidental_hits,
            reduction="none",
            return_raw=return_raw,
            backend=backend,
            item_grad=source_item_grad,
        )
        loss, raw = out if return_raw else (out, None)
        terms.append(loss)
        raws.append(raw)
        empties.append(_empty_rows(name, source, pos, remove_accidental_hits))
    loss = _combine(terms, empties, include_pos)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    if return_raw:
        return loss, _combine(raws, empties, include_pos).detach()
    return loss


def mixed_reference_loss(
    user: Tensor,
    items: Tensor,
    pos: Tensor,
    neg,
    pos_scale,
    neg_scale,
    *,
    include_pos: bool = False,
    normalize: bool = True,
    remove_accidental_hits: bool = False,
) -> Tensor:
    """The mixed loss ``[B]`` in one formula (the specification; plain autograd ops): every
    source's logits side by side in one ``[B, Σ M_s]`` log-sum-exp. Scales are floats or
    ``[B]`` tensors."""
    negs = as_negatives(neg)
    batch, num_items = user.shape[0], items.shape[0]
    p = pos.long()
    u = F.normalize(user, dim=-1, eps=NORM_EPS) if normalize else user
    it = F.normalize(items, dim=-1, eps=NORM_EPS) if normalize else items
    alpha = torch.as_tensor(pos_scale, dtype=u.dtype).expand(batch)
    beta = torch.as_tensor(neg_scale, dtype=u.dtype).expand(batch)
    pos_logit = alpha * (u * it[p]).sum(-1)
    logits, keeps = [], []
    for name, source, logq in negs.sources(batch):
        if name == "in_batch":
            index = p.unsqueeze(0).expand(batch, -1)
            keep = ~torch.eye(batch, dtype=torch.bool, device=u.device)
            logq = _in_batch_logq_table(logq, pos, num_items)
        elif name == "shared":
            index = source.long().unsqueeze(0).expand(batch, -1)
            keep = torch.ones(index.shape, dtype=torch.bool, device=u.device)
        else:
            index = source.long()
            keep = torch.ones(index.shape, dtype=torch.bool, device=u.device)
        logit = beta.unsqueeze(1) * torch.einsum("bd,bmd->bm", u, it[index])
        if logq is not None:
            logit = logit - logq.to(u.dtype)[index]
        if remove_accidental_hits:
            keep = keep & (index != p.unsqueeze(1))
        logits.append(logit)
        keeps.append(keep)
    logit = torch.cat(logits, 1).masked_fill(~torch.cat(keeps, 1), float("-inf"))
    if include_pos:
        logit = torch.cat([logit, pos_logit.unsqueeze(1)], 1)
    empty = torch.isinf(logit).all(1)
    lse = torch.logsumexp(logit.masked_fill(empty.unsqueeze(1), 0.0), 1)
    return torch.where(empty, torch.zeros_like(lse), lse - pos_logit)
