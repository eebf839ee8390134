"""Negative samplers and the batch iterator, vectorized in torch.

Every sampler draws from an explicit :class:`torch.Generator` (the trainer saves its state
in checkpoints, so a resumed run draws the same negatives) and returns
``(neg, neg_logq)`` ready for :func:`adaptau.softmax_loss`:

* ``uniform``    — ``[B, M]`` uniform with replacement (the paper's MF sampler); on the CPU
  int32 from the parallel counter-based ``torch.ops.adaptau.uniform_negatives``, seeded by
  one draw from the generator.
* ``exclude``    — ``[B, M]`` uniform over the items the row's user has not interacted
  with in train (rejection sampling over the whole batch at once).
* ``popularity`` — ``[B, M]`` drawn ∝ count(item)^γ, with ``neg_logq = log(N·q)`` (zero
  for the uniform distribution) so the loss corrects for the sampling bias.
* ``shared``     — ``[M]`` uniform negatives shared by every row of the batch.
* ``in-batch``   — ``None``: each row's negatives are the other rows' positives.
* ``mixed``      — :class:`adaptau.Negatives`: in-batch negatives plus a pool of ``M`` shared
  ones, uniform or ∝ count(item)^γ (``pool``), in one softmax (Mixed Negative Sampling, Yang
  et al. 2020). Each source's logQ is the log of an item's expected count among that
  source's negatives of a row: ``log((B−1)·p(i))`` in-batch, with p the items' share of the
  training interactions (how positives are drawn), and ``log(M·q(i))`` for the pool
  (``log(M/N)`` when uniform), so the mixed denominator estimates the full softmax's.

:func:`dropout` is inverted dropout with its mask from the same parallel generator.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _extension

__all__ = ["SAMPLERS", "NegativeSampler", "make_sampler", "BatchIterator", "dropout", "hard_negatives"]

SAMPLERS = ("uniform", "exclude", "popularity", "shared", "in-batch", "mixed")
#: Pools of the ``mixed`` sampler's shared negatives.
MIXED_POOLS = ("uniform", "popularity")

# the extension registers torch.ops.adaptau.uniform_negatives and dropout_mask
_HAS_PARALLEL_UNIFORM = _extension.has_op("uniform_negatives")
_HAS_DROPOUT_MASK = _extension.has_op("dropout_mask")
#: The exclude sampler keeps a bit per (user, item) pair up to this size (ML-1M: 2.3 MB),
#: and binary-searches the sorted training pairs beyond it.
_SEEN_BITMAP_BYTES = 32 << 20


def dropout(x: Tensor, p: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Inverted dropout, as ``F.dropout(x, p, training=True)``: each element of ``x`` (any
    shape) is zeroed with probability ``p`` and the rest are scaled by ``1/(1-p)``.

    On the CPU the mask comes from the parallel counter-based
    ``torch.ops.adaptau.dropout_mask`` ([numel] float32), seeded by one draw from
    ``generator`` (torch's default generator when None, which the trainer checkpoints): about
    ten times faster than ``F.dropout``, whose ``bernoulli_`` costs ~1.5-2 ms for the paper's
    2048 × 64 batch rows per step. Elsewhere, and for ``p >= 1``, ``F.dropout`` itself.
    Differentiable in ``x`` (the mask is a constant).
    """
    if p <= 0:
        return x
    if x.device.type != "cpu" or not _HAS_DROPOUT_MASK or p >= 1:
        return F.dropout(x, p, training=True)
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), generator=generator))
    mask = torch.ops.adaptau.dropout_mask(1, x.numel(), float(p), seed)
    return x * mask.view(x.shape).to(x.dtype)


class NegativeSampler:
    """Draws negatives for a batch. See the module docstring for the kinds."""

    def __init__(
        self,
        kind: str,
        num_items: int,
        num_negatives: int,
        *,
        train: Optional[sp.csr_matrix] = None,
        gamma: float = 1.0,
        device: torch.device = torch.device("cpu"),
        max_rounds: int = 100,
        pool: str = "uniform",
    ) -> None:
        if kind not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {kind!r}")
        if kind != "in-batch" and num_negatives < 1:
            raise ValueError(f"--negatives must be >= 1 for sampler {kind!r}, got {num_negatives}")
        self.kind, self.num_items, self.num_negatives = kind, int(num_items), int(num_negatives)
        self.device = torch.device(device)
        self.max_rounds = max_rounds
        self.neg_logq: Optional[Tensor] = None
        self._probs: Optional[Tensor] = None
        self._keys: Optional[Tensor] = None
        if pool not in MIXED_POOLS:
            raise ValueError(f"--mixed-pool must be one of {MIXED_POOLS}, got {pool!r}")
        self.pool = pool
        if kind in ("popularity", "exclude", "mixed") and train is None:
            raise ValueError(f"sampler {kind!r} needs the train matrix")
        if kind == "mixed":
            counts = torch.as_tensor(np.asarray(train.sum(axis=0)).ravel(), dtype=torch.float64)
            share = counts.clamp(min=0.5) / counts.sum()  # (an unseen item: half a count)
            self._log_positive_share = share.log().to(self.device, torch.float32)
            if pool == "popularity":
                weights = counts.clamp(min=0) ** float(gamma)
                weights = torch.where(counts > 0, weights, weights[counts > 0].min())
                q = weights / weights.sum()
                self._probs = q.to(self.device, torch.float32)
                self._pool_logq = torch.log(q * self.num_negatives).to(self.device, torch.float32)
            else:
                self._pool_logq = torch.full(
                    (self.num_items,), float(np.log(self.num_negatives / self.num_items)), device=self.device
                )
        if kind == "popularity":
            counts = torch.as_tensor(np.asarray(train.sum(axis=0)).ravel(), dtype=torch.float64)
            weights = counts.clamp(min=0) ** float(gamma)
            if gamma > 0:
                # items never seen in train would never be drawn: give them the least weight
                weights = torch.where(
                    counts > 0,
                    weights,
                    weights[counts > 0].min() if bool((counts > 0).any()) else torch.ones(()),
                )
            probs = weights / weights.sum()
            self._probs = probs.to(self.device, torch.float32)
            self.neg_logq = torch.log(probs * self.num_items).to(self.device, torch.float32)
        if kind == "exclude":
            train = train.tocsr()
            users = np.repeat(np.arange(train.shape[0], dtype=np.int64), np.diff(train.indptr))
            keys = users * self.num_items + train.indices.astype(np.int64)
            self._keys = torch.as_tensor(np.sort(keys), device=self.device)
            # membership: a bit per (user, item) while that fits in _SEEN_BITMAP_BYTES (one
            # gather per check), else a binary search in the sorted keys
            self._seen_bits: Optional[Tensor] = None
            if train.shape[0] * self.num_items <= 8 * _SEEN_BITMAP_BYTES:
                bits = np.zeros((train.shape[0] * self.num_items + 7) // 8, dtype=np.uint8)
                np.bitwise_or.at(bits, keys >> 3, (1 << (keys & 7)).astype(np.uint8))
                self._seen_bits = torch.as_tensor(bits, device=self.device)
            full = np.flatnonzero(np.diff(train.indptr) >= self.num_items)
            self._full_users = set(full.tolist())

    def _uniform(self, shape, generator: torch.Generator) -> Tensor:
        if self.device.type == "cpu" and _HAS_PARALLEL_UNIFORM:
            # one draw from the (checkpointed) generator seeds the parallel counter-based
            # sampler of csrc/sampling_cpu.cpp: int32, ~3x faster than torch.randint here
            seed = int(torch.randint(-(2**63), 2**63 - 1, (), generator=generator))
            rows, cols = (1, shape[0]) if len(shape) == 1 else shape
            out = torch.ops.adaptau.uniform_negatives(rows, cols, self.num_items, seed)
            return out.view(shape)
        return torch.randint(self.num_items, shape, generator=generator, device=self.device)

    def _is_seen(self, users: Tensor, items: Tensor) -> Tensor:
        keys = users * self.num_items + items
        if self._seen_bits is not None:
            return ((self._seen_bits[keys >> 3] >> (keys & 7).to(torch.uint8)) & 1).bool()
        pos = torch.searchsorted(self._keys, keys).clamp(max=self._keys.numel() - 1)
        return self._keys[pos] == keys

    def sample(
        self, users: Tensor, pos: Tensor, generator: torch.Generator
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """``(neg, neg_logq)`` for a batch of ``users`` / positives ``pos`` (both ``[B]``)."""
        batch, m = users.shape[0], self.num_negatives
        if self.kind == "in-batch":
            return None, None
        if self.kind == "mixed":
            from ..loss.mixed import Negatives

            if self.pool == "popularity":
                shared = torch.multinomial(self._probs, m, replacement=True, generator=generator)
            else:
                shared = self._uniform((m,), generator)
            return Negatives(
                in_batch=True,
                in_batch_logq=self._log_positive_share + float(np.log(batch - 1)),
                shared=shared,
                shared_logq=self._pool_logq,
            ), None
        if self.kind == "shared":
            return self._uniform((m,), generator), None
        if self.kind == "uniform":
            return self._uniform((batch, m), generator), None
        if self.kind == "popularity":
            neg = torch.multinomial(self._probs, batch * m, replacement=True, generator=generator)
            return neg.view(batch, m), self.neg_logq
        # exclude: resample only the rejected slots, all rows at once, until none is left
        if self._full_users and any(int(u) in self._full_users for u in users.unique().tolist()):
            raise ValueError(
                "sampler 'exclude': a user has interacted with every item, there is no negative to draw"
            )
        # Each round redraws the slots (in row-major order) whose draw the user has seen and
        # checks only those: the rejected set shrinks geometrically, so a batch with heavy
        # users costs about one check of the [B, M] draws instead of one per round.
        neg = self._uniform((batch, m), generator)
        flat = neg.view(-1)
        slot_users = users.long().repeat_interleave(m)
        slots = torch.nonzero(self._is_seen(slot_users, flat)).squeeze(1)
        for _ in range(self.max_rounds):
            if slots.numel() == 0:
                break
            draw = self._uniform((slots.numel(),), generator).to(flat.dtype)
            flat[slots] = draw
            slots = slots[self._is_seen(slot_users[slots], draw)]
        else:
            raise RuntimeError(
                f"sampler 'exclude': {slots.numel()} negatives still hit train "
                f"items after {self.max_rounds} rounds (users with nearly every item?)"
            )
        return neg, None


def make_sampler(
    kind: str,
    num_items: int,
    num_negatives: int,
    train: sp.csr_matrix,
    *,
    gamma: float = 1.0,
    device="cpu",
    pool: str = "uniform",
) -> NegativeSampler:
    return NegativeSampler(
        kind, num_items, num_negatives, train=train, gamma=gamma, device=torch.device(device), pool=pool
    )


class BatchIterator:
    """Shuffled mini-batches of train pairs, one pass per epoch, drawn from ``generator``.

    ``rank``/``world_size`` shard every batch across processes (each rank gets a strided
    slice of the same shuffled batch, so all ranks take the same number of steps).
    """

    def __init__(
        self,
        users: Tensor,
        items: Tensor,
        batch_size: int,
        *,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.users, self.items = users, items
        self.batch_size, self.drop_last = int(batch_size), drop_last
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        n = self.users.numel()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, generator: torch.Generator) -> Iterator[Tuple[Tensor, Tensor]]:
        n = self.users.numel()
        perm = torch.randperm(n, generator=generator, device=generator.device)
        perm = perm.to(self.users.device)
        for b in range(len(self)):
            idx = perm[b * self.batch_size : (b + 1) * self.batch_size]
            if self.world_size > 1:
                idx = idx[self.rank :: self.world_size]
            yield self.users[idx], self.items[idx]


@torch.no_grad()
def hard_negatives(
    user: Tensor,
    item_table: Tensor,
    pos: Tensor,
    count: int,
    generator: torch.Generator,
    normalize: bool = True,
) -> Tensor:
    """``[B, count]`` per-row hard negatives (``--hard-negatives``): the ``count`` best-scoring
    of ``8·count`` uniform candidates per row under the current vectors (``user [B, D]``,
    ``item_table [N, D]``; cosine when ``normalize``), the row's positive excluded. They are
    chosen by score, not drawn from a distribution, so they carry no logQ."""
    cand = torch.randint(
        0, item_table.shape[0], (user.shape[0], 8 * count), generator=generator, device=user.device
    )
    uq, it = user.detach(), item_table.detach()[cand]
    if normalize:
        uq, it = F.normalize(uq, dim=-1), F.normalize(it, dim=-1)
    scores = torch.einsum("bd,bcd->bc", uq, it).masked_fill(cand == pos.unsqueeze(1), float("-inf"))
    return cand.gather(1, scores.topk(count, dim=1).indices)
