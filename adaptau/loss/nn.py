"""``AdapTauLoss``: the fused loss and an Adap-τ controller as one drop-in ``nn.Module``."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .ops import softmax_loss
from .temperature import AdapTau

__all__ = ["AdapTauLoss"]


class AdapTauLoss(nn.Module):
    """Sampled-softmax loss whose inverse temperatures come from an :class:`AdapTau`.

    Each ``forward`` reads the controller's scales for the rows' users, calls
    :func:`adaptau.softmax_loss` with ``return_raw=True`` and, in training mode, feeds the
    raw per-row loss back to the controller. Call :meth:`begin_epoch` before each epoch.
    The controller's state travels in this module's ``state_dict``.

    Args:
        user_ids, item_ids: ``[E]`` int tensors, the training interactions.
        include_pos, normalize, remove_accidental_hits, reduction, backend: passed to
            :func:`adaptau.softmax_loss`.
        **controller_options: passed to :class:`AdapTau` (``mode``, ``tau``, ``base``,
            ``smoothing``, ``warmup``, ``active_quantile``, ``num_users``, ``num_items``).
    """

    def __init__(
        self,
        user_ids: Tensor,
        item_ids: Tensor,
        *,
        include_pos: bool = False,
        normalize: bool = True,
        remove_accidental_hits: bool = False,
        reduction: str = "mean",
        backend: str = "auto",
        **controller_options,
    ) -> None:
        super().__init__()
        self.controller = AdapTau(user_ids, item_ids, **controller_options)
        self.include_pos = include_pos
        self.normalize = normalize
        self.remove_accidental_hits = remove_accidental_hits
        self.reduction = reduction
        self.backend = backend

    def begin_epoch(
        self, epoch: int, user_vectors: Optional[Tensor] = None, item_vectors: Optional[Tensor] = None
    ) -> None:
        """Pass-through to :meth:`AdapTau.begin_epoch` (full ``[num_users, D]``/``[num_items, D]`` tables)."""
        self.controller.begin_epoch(epoch, user_vectors, item_vectors)

    def forward(
        self,
        user: Tensor,
        items: Tensor,
        pos: Tensor,
        neg: Optional[Tensor],
        user_ids: Tensor,
        neg_logq: Optional[Tensor] = None,
    ) -> Tensor:
        """Loss of a batch.

        Args:
            user: ``[B, D]`` the rows' user vectors. items: ``[N, D]`` item table.
            pos: ``[B]`` positive item per row. neg: ``[B, M]``, ``[M]`` or ``None`` (in-batch).
            user_ids: ``[B]`` the user id of each row (selects its temperature).
            neg_logq: optional ``[N]`` log sampling probabilities.

        Returns:
            The reduced loss (``[B]`` for ``reduction="none"``).
        """
        pos_scale, neg_scale = self.controller.scales(user_ids)
        observe = self.training and self.controller.needs_raw_loss
        out = softmax_loss(
            user,
            items,
            pos,
            neg,
            pos_scale,
            neg_scale,
            include_pos=self.include_pos,
            normalize=self.normalize,
            neg_logq=neg_logq,
            remove_accidental_hits=self.remove_accidental_hits,
            reduction=self.reduction,
            return_raw=observe,
            backend=self.backend,
        )
        if not observe:
            return out
        loss, raw = out
        self.controller.observe(user_ids, raw)
        return loss

    def get_extra_state(self):
        return self.controller.state_dict()

    def set_extra_state(self, state) -> None:
        self.controller.load_state_dict(state)

    def extra_repr(self) -> str:
        return f"{self.controller!r}, include_pos={self.include_pos}, normalize={self.normalize}"
