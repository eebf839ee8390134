"""One epoch of training and its step: :class:`EpochLoop`, the part of
:class:`adaptau.train.Trainer` that trains.

:meth:`EpochLoop._train_epoch` cuts the epoch's global batches (the same on every rank),
runs :meth:`EpochLoop.train_step` on each and keeps the epoch's loss, checking that it stays
finite. :class:`adaptau.train.sharded.ShardedTrainer` replaces the step (and the start of
the epoch), not the loop.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Dict, Tuple

import torch

from . import distributed as dist
from .models import add_sampled_l2_grad_, add_sparse_sampled_l2_grad_, sampled_l2
from .sampling import hard_negatives

__all__ = ["EpochLoop", "NonFiniteLossError", "HOST_CHECK_EVERY"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


#: Off the CPU, the training loop reads the loss back to the host once every this many steps.
HOST_CHECK_EVERY = 64


def _progress_enabled(mode: str) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("true", "1")


class EpochLoop:
    """The epoch loop and one training step of a trainer.

    A subclass (:class:`adaptau.train.Trainer`) sets what they use: ``cfg``, ``device``,
    ``rank``, ``world_size``, ``is_main``, ``model``, ``step_module``, ``optimizer``,
    ``sparse``, ``direct_l2``, ``controller``, ``sampler``, ``batches``, ``shuffle_gen``,
    ``neg_gen``, and :meth:`_last_good_checkpoint` for the messages; ``item_rows_only``
    (``step_module(users, items)`` gives the batch's item rows, not the table) defaults to off.
    """

    item_rows_only = False

    def _begin_epoch(self, epoch: int) -> None:
        """Start the controller's epoch from the current tables; the model in train mode."""
        with torch.no_grad():
            self.model.eval()
            user_table, item_table = self.model.tables()
            self.controller.begin_epoch(epoch, user_table.detach(), item_table.detach())
        self.model.train()

    def _train_epoch(self, epoch: int) -> Dict[str, Any]:
        """One pass over the training pairs, one :meth:`train_step` per global batch;
        ``{"loss": the epoch's mean loss}``."""
        self._begin_epoch(epoch)
        # The epoch's loss sum stays on the device; off the CPU the finiteness check reads
        # it back once every HOST_CHECK_EVERY steps instead of every step (a host read per
        # step stalls a GPU's launch queue), so a divergence is caught within that many steps.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        rows, checked = 0, 0
        check_every = 1 if self.device.type == "cpu" else HOST_CHECK_EVERY
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(self.batches),
            desc=f"epoch {epoch}",
            leave=False,
            unit="batch",
            disable=not (self.is_main and _progress_enabled(self.cfg.progress)),
        )
        smallest = (2 if self.cfg.sampler in ("in-batch", "mixed") else 1) * self.world_size
        for step, (users, pos) in enumerate(self.batches.epoch(self.shuffle_gen), 1):
            # (users, pos) is the global batch, identical on every rank
            if users.numel() < smallest:
                continue  # too small to give every rank its rows (all ranks skip it alike)
            loss, weight = self.train_step(users, pos, epoch=epoch, step=step)
            total += loss * weight
            rows += weight
            if step % check_every == 0 or step == len(self.batches):
                self._check_finite_loss(total, epoch, checked + 1, step)
                checked = step
            bar.update(1)
        bar.close()
        self._check_finite_loss(total, epoch, checked + 1, len(self.batches))
        return {"loss": float(total) / max(rows, 1)}

    def _rank_rows(self, users: torch.Tensor, pos: torch.Tensor, neg):
        """This rank's part of the global batch: rows rank, rank + world_size, … of ``users``,
        ``pos`` and per-row negatives ``neg`` (in-batch: the other rows of the global batch)."""
        if self.world_size == 1:
            return users, pos, neg
        mine = torch.arange(self.rank, users.numel(), self.world_size, device=users.device)
        if self.cfg.sampler == "in-batch":  # the other rows of the *global* batch
            neg = dist.global_in_batch_negatives(pos, mine)
        elif neg is not None and neg.dim() == 2:
            neg = neg[mine]
        return users[mine], pos[mine], neg

    def train_step(
        self, users: torch.Tensor, pos: torch.Tensor, *, epoch: int = 0, step: int = 0
    ) -> Tuple[torch.Tensor, int]:
        """One optimizer step on the global batch ``(users, pos)``, the same on every rank:
        negatives for the whole batch from the shared stream, this rank's rows
        (:meth:`_rank_rows`), the loss and its sampled L2, the backward (DDP averages the
        gradients over ranks), the optimizer step, and the raw losses for the controller.

        Returns the step's loss (a float64 tensor on the device: no host read) and the
        number of rows it is the mean over. ``epoch`` and ``step`` say where the step is
        (for messages)."""
        cfg = self.cfg
        from .. import softmax_loss  # (looked up on the package: tests monkeypatch it)

        neg, neg_logq = self.sampler.sample(users, pos, self.neg_gen)
        sampled = neg.shared if cfg.sampler == "mixed" else neg  # (for the L2: rows beyond the batch's)
        batch_g = (users, pos, None if cfg.sampler == "in-batch" else sampled)
        users, pos, neg = self._rank_rows(users, pos, neg)
        loss_pos, loss_neg = pos, neg
        if self.item_rows_only:
            # the loss reads only the batch's items: compute those rows, with local indices
            from ..loss.ops import compact

            items, loss_pos, loss_neg = compact(pos, neg, num_items=self.model.num_items)
            if neg_logq is not None:
                neg_logq = neg_logq.index_select(0, items)
            u, item_table, ego_u, ego_i = self.step_module(users, items)
        else:
            u, item_table, ego_u, ego_i = self.step_module(users)
        if cfg.hard_negatives:
            loss_neg = dataclasses.replace(
                neg,
                per_row=hard_negatives(u, item_table, pos, cfg.hard_negatives, self.neg_gen, cfg.normalize),
            )
        need_raw = self.controller.needs_raw_loss  # (global / fixed τ: no raw losses needed)
        pos_scale, neg_scale = self.controller.scales(users)
        out = softmax_loss(
            u,
            item_table,
            loss_pos,
            loss_neg,
            pos_scale,
            neg_scale,
            include_pos=cfg.include_pos,
            normalize=cfg.normalize,
            neg_logq=neg_logq,
            remove_accidental_hits=cfg.remove_hits,
            return_raw=need_raw,
            backend=cfg.backend,
            item_grad="sparse" if self.sparse else "dense",
        )
        loss, raw = out if need_raw else (out, None)
        if cfg.l2 > 0 and not self.direct_l2:  # (in-batch: negatives are positives, already counted)
            loss = loss + cfg.l2 * sampled_l2(
                ego_u, ego_i, users, pos, None if cfg.sampler == "in-batch" else sampled
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over ranks here
        add_l2 = add_sparse_sampled_l2_grad_ if self.sparse else add_sampled_l2_grad_
        l2_value = add_l2(cfg.l2, *batch_g, ego_u, ego_i) if self.direct_l2 else 0.0
        self.optimizer.step()
        if need_raw:
            self.controller.observe(users, raw)
        return (loss.detach() + l2_value).double(), users.numel()

    def _check_finite_loss(self, total: torch.Tensor, epoch: int, first: int, last: int) -> None:
        """NonFiniteLossError when the epoch's loss sum so far is NaN or infinite (a host read)."""
        if first > last or bool(torch.isfinite(total)):
            return
        steps = f"step {last}" if first == last else f"steps {first}..{last}"
        raise NonFiniteLossError(
            f"non-finite training loss at epoch {epoch}, {steps} of {len(self.batches)}: "
            f"w0={self.controller.w0:.4g}; try a lower --lr or a larger --tau-value / "
            f"--smoothing. {self._last_good_checkpoint()}"
        )

    def _l2_on_leaves(self) -> bool:
        """True when the L2 tables (layer-0 embeddings) are parameters, so the L2 gradient
        can be added to their ``.grad`` directly (MF and LightGCN)."""
        ego_u, ego_i = self.model.ego()
        params = {id(p) for p in self.model.parameters()}
        return id(ego_u) in params and id(ego_i) in params and ego_u is not ego_i
