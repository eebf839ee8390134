"""The Adap-τ temperature controller and the Lambert W function it needs.

See ``docs/design.md`` §3 and Chen et al., "Adap-τ: Adaptively Modulating Embedding Magnitude
for Recommendation" (WWW 2023). All "temperatures" here are *inverse* temperatures: the
multiplier of the cosine score.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lambertw", "AdapTau", "AlignmentGap", "mean_normalized_rows"]

_INV_E = math.exp(-1.0)


# ------------------------------------------------------------------------------ lambertw
def _initial_guess(x: Tensor) -> Tensor:
    """A start within a few percent of W₀(x), for x ≥ −1/e (float64)."""
    # Near the branch point: series in p = sqrt(2(e·x + 1)).
    p = torch.sqrt(torch.clamp(2.0 * (math.e * x + 1.0), min=0.0))
    near_branch = -1.0 + p - p * p / 3.0 + (11.0 / 72.0) * p * p * p
    # Moderate x: Winitzki's approximation.
    l1p = torch.log1p(torch.clamp(x, min=-0.32))
    winitzki = l1p * (1.0 - torch.log1p(l1p) / (2.0 + l1p))
    # Large x: asymptotic expansion.
    lx = torch.log(torch.clamp(x, min=3.0))
    llx = torch.log(lx)
    asymptotic = lx - llx + llx / lx
    return torch.where(x < -0.32, near_branch, torch.where(x < 3.0, winitzki, asymptotic))


def lambertw(x: Tensor, iterations: int = 5) -> Tensor:
    """Principal branch W₀ of the Lambert W function, elementwise (``w·exp(w) = x``).

    Computed on ``x``'s device by Halley iteration from a close start (no lookup table):
    on ``w·eʷ − x`` for ``x ≤ 1`` and on the overflow-free ``w + ln w − ln x`` above.
    The work is done in float64 and the result returned in ``x``'s dtype (float32 or
    float64). ``W(−1/e) = −1``, ``W(0) = 0``, ``W(+inf) = +inf``, NaN stays NaN.

    Args:
        x: float tensor of any shape, every element ≥ −1/e. An element below −1/e by
            no more than a few rounding steps of ``x``'s dtype is taken as the branch
            point.
        iterations: Halley steps (5 reaches float64 round-off from the start used).

    Returns:
        Tensor of ``x``'s shape and dtype.

    Raises:
        TypeError: ``x`` is not a floating tensor.
        ValueError: an element is clearly below −1/e (outside the real domain).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("lambertw expects a floating-point tensor")
    out_dtype = x.dtype
    work = torch.float32 if x.device.type == "mps" else torch.float64
    # Within a rounding step or two of −1/e (in x's dtype) counts as the branch point.
    ulp = torch.finfo(out_dtype).eps / 4.0  # spacing of floats in [0.25, 0.5)
    xw = x.detach().to(work)
    below = xw < -_INV_E - 2.0 * ulp
    if bool(below.any()):
        bad = float(xw[below].flatten()[0])
        raise ValueError(f"lambertw: input {bad!r} is below -1/e, outside W0's real domain")
    at_branch = xw <= -_INV_E + ulp
    xs = torch.where(at_branch, torch.full_like(xw, -_INV_E), xw)

    w = _initial_guess(xs)
    small = xs <= 1.0
    log_x = torch.log(torch.clamp(xs, min=1.0))
    for _ in range(iterations):
        # Halley on f(w) = w·eʷ − x (x ≤ 1).
        ew = torch.exp(w)
        f = w * ew - xs
        wp1 = w + 1.0
        wp1_safe = torch.where(wp1.abs() < 1e-300, torch.full_like(wp1, 1e-300), wp1)
        denom = ew * wp1_safe - (w + 2.0) * f / (2.0 * wp1_safe)
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)
        step_small = f / denom
        # Halley on g(w) = w + ln w − ln x (x > 1, where w > 0.5).
        wpos = torch.clamp(w, min=1e-3)
        g = wpos + torch.log(wpos) - log_x
        g1 = 1.0 + 1.0 / wpos
        g2 = -1.0 / (wpos * wpos)
        step_large = 2.0 * g * g1 / (2.0 * g1 * g1 - g * g2)
        step = torch.where(small, step_small, step_large)
        step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
        w = w - step
    w = torch.where(at_branch, torch.full_like(w, -1.0), w)
    w = torch.where(xs == 0, torch.zeros_like(w), w)
    w = torch.where(torch.isposinf(xs), xs, w)
    w = torch.where(torch.isnan(xs), xs, w)
    return w.to(out_dtype)


# ------------------------------------------------------------------------------- AdapTau
def _distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@torch.no_grad()
def mean_normalized_rows(rows: Tensor) -> Tensor:
    """ē: the mean of the L2-normalized rows of a table whose rows are split across the
    ranks of the default process group (each rank passes its own ``[n_r, D]`` rows; n_r may
    be 0). Each rank sums its normalized rows and counts them; both are all-reduced, so
    every rank gets the ``[D]`` float64 mean over the whole table. Without a process group,
    the mean of ``rows``.
    """
    total = torch.cat(
        [
            F.normalize(rows.detach().double(), dim=-1).sum(0),
            rows.new_tensor([rows.shape[0]], dtype=torch.float64),
        ]
    )
    if _distributed_ready():
        torch.distributed.all_reduce(total)
    return total[:-1] / total[-1].clamp(min=1)


def _check_pairs(user_ids: Tensor, item_ids: Tensor) -> None:
    """The training pairs AdapTau is built from: two 1-D integer tensors of one length,
    non-empty, with non-negative ids."""
    for name, ids in (("user_ids", user_ids), ("item_ids", item_ids)):
        if not isinstance(ids, Tensor) or ids.dtype not in (
            torch.int32,
            torch.int64,
            torch.int16,
            torch.uint8,
        ):
            raise TypeError(f"{name} must be an integer tensor")
        if ids.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    if user_ids.shape != item_ids.shape:
        raise ValueError("user_ids and item_ids must have the same length")
    if user_ids.numel() == 0:
        raise ValueError("no training interactions")
    if int(user_ids.min()) < 0 or int(item_ids.min()) < 0:
        raise ValueError("ids must be non-negative")


def _check_settings(mode, modes, tau, base, smoothing, warmup, active_quantile) -> None:
    """AdapTau's settings, each in its range (ValueError naming the first that is not)."""
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}")
    if not (isinstance(base, str) and base == "mean") and not (
        isinstance(base, (int, float)) and not isinstance(base, bool) and 0.0 < base < 1.0
    ):
        raise ValueError(f"base must be 'mean' or a quantile in (0, 1), got {base!r}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= active_quantile < 1.0:
        raise ValueError(f"active_quantile must be in [0, 1), got {active_quantile}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")


class AlignmentGap:
    """p̄ − ā of Adap-τ's w₀ rule: the mean cosine of the active users' training pairs
    minus those users' mean alignment with the mean normalized item ē.

    Args:
        users: ``[P]`` int64 user of every training pair.
        items: ``[P]`` int64 item of every training pair.
        active: ``[num_users]`` bool, the users whose pairs count.
        num_items: N.
    """

    def __init__(self, users: Tensor, items: Tensor, active: Tensor, num_items: int) -> None:
        pair_active = active[users]
        self.num_users, self.num_items = int(active.shape[0]), int(num_items)
        self._active = active
        self._pair_users = users[pair_active]
        self._pair_items = items[pair_active]
        self._pair_matrix: Optional[Tensor] = None  # built on first use (see whole)

    def whole(self, user_vectors: Tensor, item_vectors: Tensor) -> float:
        """p̄ − ā: mean cosine of active users' train pairs minus their mean alignment.

        The pairs' cosines are summed as Σ_u ⟨û, Σ_{i ∈ pairs(u)} v̂_i⟩: one sparse
        ``[users, items] @ [items, D]`` product (duplicate pairs count twice, as in the
        mean) instead of gathering both rows of every pair (~0.8 s per epoch on Gowalla's
        810k pairs in float64, against ~30 ms).
        """
        u = F.normalize(user_vectors.detach().double(), dim=-1)
        v = F.normalize(item_vectors.detach().double(), dim=-1)
        A = self._pair_matrix
        if A is None or A.device != u.device:
            ones = torch.ones(self._pair_users.numel(), dtype=torch.float64)
            coo = torch.sparse_coo_tensor(
                torch.stack([self._pair_users.cpu(), self._pair_items.cpu()]),
                ones,
                (self.num_users, self.num_items),
                check_invariants=True,
            )
            with warnings.catch_warnings():  # CSR (2x faster than COO here) warns it is beta
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                A = self._pair_matrix = coo.coalesce().to_sparse_csr().to(u.device)
        p_bar = float((u * (A @ v)).sum()) / self._pair_users.numel()
        e_bar = v.mean(0)
        a_bar = float((u[self._active.to(u.device)] @ e_bar).mean())
        return p_bar - a_bar

    @torch.no_grad()
    def sharded(self, user_rows: Tensor, user_start: int, item_rows: Tensor, item_start: int) -> float:
        """p̄ − ā (as :meth:`whole` computes it) from row blocks of tables sharded across
        the ranks of the default process group.

        Each rank passes its own contiguous blocks: ``user_rows`` ``[n_u, D]`` are users
        ``user_start … user_start + n_u − 1`` and ``item_rows`` ``[n_i, D]`` items
        ``item_start …``; together the blocks of all ranks cover each table once. Collective
        (call it on every rank); without a process group the blocks are the whole tables.
        What travels: ē as a sum of normalized local rows and a count
        (:func:`mean_normalized_rows`), the pair sums ``A[:, block] @ v̂_block`` as one
        ``[num_users, D]`` float64 all-reduce, and three scalars.
        """
        u = F.normalize(user_rows.detach().double(), dim=-1)
        v = F.normalize(item_rows.detach().double(), dim=-1)
        dev = u.device
        e_bar = mean_normalized_rows(item_rows)
        # Σ over Y′ of cos(u, i) = Σ_u ⟨û_u, Σ_{i ∈ pairs(u)} v̂_i⟩: this rank's items first
        pu, pi = self._pair_users.to(dev), self._pair_items.to(dev)
        mine = (pi >= item_start) & (pi < item_start + v.shape[0])
        partial = torch.zeros(self.num_users, v.shape[1], dtype=torch.float64, device=dev)
        partial.index_add_(0, pu[mine], v.index_select(0, pi[mine] - item_start))
        if _distributed_ready():
            torch.distributed.all_reduce(partial)
        block = slice(int(user_start), int(user_start) + u.shape[0])
        active = self._active.to(dev)[block]
        sums = torch.stack([(u * partial[block]).sum(), (u[active] @ e_bar.double()).sum()])
        if _distributed_ready():
            torch.distributed.all_reduce(sums)
        p_bar = float(sums[0]) / self._pair_users.numel()
        a_bar = float(sums[1]) / int(self._active.sum())
        return p_bar - a_bar


class AdapTau:
    """Per-user inverse temperatures by the Adap-τ rule, updated once per epoch.

    Usage per epoch: ``begin_epoch(epoch, user_table, item_table)`` before the first step;
    each step ``pos_scale, neg_scale = ctl.scales(users)`` → ``softmax_loss(...,
    pos_scale, neg_scale, return_raw=True)`` → ``ctl.observe(users, raw)`` (the raw losses
    feed mode ``"adaptive"`` only: see :attr:`needs_raw_loss`).

    What ``begin_epoch`` computes (``docs/design.md`` §3), with n_u the train-interaction
    count of user u, θ the ``active_quantile``-quantile of n_u over users with at least
    one interaction, U′ = {u : n_u > θ}, Y′ their train pairs, |I| the item count::

        c  = 2·(ln 0.5 + ln(|U′|·|I|) − ln|Y′|)
        w₀ = c / 1.4                                   while epoch < warmup
        w₀ = c / (2·(p̄ − ā))                           afterwards
        β_u = w₀·exp(−W₀(clamp((r̄_u − base)/t₂, −1/e, 1000)))

    p̄ is the mean cosine over Y′, ā the mean over U′ of ⟨û, mean of the normalized item
    vectors⟩; if p̄ − ā < ``MIN_GAP`` the previous w₀ is kept. r̄_u is user u's mean raw
    loss (α = β = 1) over the previous epoch's rows, ``base`` its mean over the users
    seen then (or its ``base``-quantile), t₂ = ``smoothing``. Users not seen in the
    previous epoch (all users in the first) get β_u = w₀. Training rows use α = w₀ for
    the positive and β_u for the negatives.

    Args:
        user_ids: ``[E]`` int tensor, the user of each training interaction.
        item_ids: ``[E]`` int tensor, the item of each training interaction.
        num_users, num_items: table sizes (default: 1 + the largest id).
        mode: ``"adaptive"`` (Adap-τ), ``"global"`` (Adap-τ-0, β_u = w₀) or ``"fixed"``
            (α = β = 1/``tau``).
        tau: the temperature of ``mode="fixed"``.
        base: ``"mean"`` or a quantile level in (0, 1) for the per-user baseline.
        smoothing: t₂ > 0.
        warmup: number of epochs that use the warm-up w₀.
        active_quantile: θ's quantile level in [0, 1).
    """

    MODES = ("adaptive", "global", "fixed")
    #: Below this the post-warm-up gap p̄ − ā is treated as not clearly positive.
    MIN_GAP = 1e-3

    def __init__(
        self,
        user_ids: Tensor,
        item_ids: Tensor,
        *,
        num_users: Optional[int] = None,
        num_items: Optional[int] = None,
        mode: str = "adaptive",
        tau: float = 0.1,
        base: Union[str, float] = "mean",
        smoothing: float = 1.0,
        warmup: int = 10,
        active_quantile: float = 0.2,
    ) -> None:
        _check_pairs(user_ids, item_ids)
        _check_settings(mode, self.MODES, tau, base, smoothing, warmup, active_quantile)

        device = user_ids.device
        self.num_users = int(num_users) if num_users is not None else int(user_ids.max()) + 1
        self.num_items = int(num_items) if num_items is not None else int(item_ids.max()) + 1
        if int(user_ids.max()) >= self.num_users or int(item_ids.max()) >= self.num_items:
            raise ValueError("an id is not below num_users / num_items")
        self.mode, self.tau, self.base = mode, float(tau), base
        self.smoothing, self.warmup, self.active_quantile = (
            float(smoothing),
            int(warmup),
            float(active_quantile),
        )

        users = user_ids.long()
        counts = torch.bincount(users, minlength=self.num_users).to(torch.float64)
        threshold = torch.quantile(counts[counts > 0], self.active_quantile)
        active = counts > threshold
        num_active_pairs = float(counts[active].sum())
        if num_active_pairs == 0:  # every user at the threshold: fall back to all users
            active = counts > 0
            num_active_pairs = float(counts[active].sum())
        self._gap = AlignmentGap(users, item_ids.long(), active, self.num_items)
        self.c = 2.0 * (
            math.log(0.5) + math.log(float(active.sum()) * self.num_items) - math.log(num_active_pairs)
        )

        self.epoch = -1
        self.w0 = 1.0 / self.tau if mode == "fixed" else self.c / 1.4
        self.user_scale = torch.full((self.num_users,), self.w0, dtype=torch.float32, device=device)
        self._loss_sum = torch.zeros(self.num_users, dtype=torch.float64, device=device)
        self._loss_count = torch.zeros(self.num_users, dtype=torch.float64, device=device)

    # -- per epoch ----------------------------------------------------------------------
    @torch.no_grad()
    def begin_epoch(
        self,
        epoch: int,
        user_vectors: Optional[Tensor] = None,
        item_vectors: Optional[Tensor] = None,
        *,
        alignment_gap: Optional[float] = None,
    ) -> None:
        """Compute w₀ and the per-user scales for ``epoch`` (call before its first step).

        Args:
            epoch: 0-based epoch number (compared with ``warmup``).
            user_vectors: ``[num_users, D]`` the model's final user vectors (no dropout).
            item_vectors: ``[num_items, D]`` the model's final item vectors. Both are
                needed only after warm-up in modes ``"adaptive"``/``"global"``, unless
                ``alignment_gap`` is given.
            alignment_gap: p̄ − ā computed by the caller, for tables that no process holds
                whole (:meth:`sharded_alignment_gap`); the tables are then not read.
        """
        self.epoch = int(epoch)
        sums, counts = self._loss_sum, self._loss_count
        if _distributed_ready():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)

        if self.mode == "fixed":
            self.w0 = 1.0 / self.tau
        elif self.epoch < self.warmup:
            self.w0 = self.c / 1.4
        else:
            if alignment_gap is not None:
                gap = float(alignment_gap)
            else:
                if user_vectors is None or item_vectors is None:
                    raise ValueError("begin_epoch after warm-up needs user_vectors and item_vectors")
                self._check_tables(user_vectors, item_vectors)
                gap = self._alignment_gap(user_vectors, item_vectors)
            if gap > self.MIN_GAP:
                self.w0 = self.c / (2.0 * gap)

        device = self.user_scale.device
        scale = torch.full((self.num_users,), self.w0, dtype=torch.float64, device=device)
        if self.mode == "adaptive":
            seen = counts > 0
            if bool(seen.any()):
                mean_loss = sums[seen] / counts[seen]
                if self.base == "mean":
                    baseline = mean_loss.mean()
                else:
                    baseline = torch.quantile(mean_loss, float(self.base))
                z = ((mean_loss - baseline) / self.smoothing).clamp(-_INV_E, 1000.0)
                scale[seen] = self.w0 * torch.exp(-lambertw(z))
        self.user_scale = scale.to(torch.float32)
        self._loss_sum = torch.zeros_like(sums)
        self._loss_count = torch.zeros_like(counts)

    def _check_tables(self, user_vectors: Tensor, item_vectors: Tensor) -> None:
        if user_vectors.dim() != 2 or user_vectors.shape[0] != self.num_users:
            raise ValueError(
                f"user_vectors must be [num_users={self.num_users}, D], got {tuple(user_vectors.shape)}"
            )
        if item_vectors.dim() != 2 or item_vectors.shape[0] != self.num_items:
            raise ValueError(
                f"item_vectors must be [num_items={self.num_items}, D], got {tuple(item_vectors.shape)}"
            )

    def _alignment_gap(self, user_vectors: Tensor, item_vectors: Tensor) -> float:
        """p̄ − ā from whole tables (:meth:`AlignmentGap.whole`)."""
        return self._gap.whole(user_vectors, item_vectors)

    @torch.no_grad()
    def sharded_alignment_gap(
        self, user_rows: Tensor, user_start: int, item_rows: Tensor, item_start: int
    ) -> float:
        """p̄ − ā (as :meth:`begin_epoch` computes it from whole tables) from row blocks of
        tables sharded across the ranks of the default process group
        (:meth:`AlignmentGap.sharded`: the arguments, and what travels). Collective."""
        return self._gap.sharded(user_rows, user_start, item_rows, item_start)

    # -- per step -----------------------------------------------------------------------
    def scales(self, users: Tensor) -> Tuple[float, Tensor]:
        """``(pos_scale, neg_scale)`` for rows of ``users`` (``[B]`` int): w₀ and β[users] ``[B]``."""
        scale = self.user_scale
        if scale.device != users.device:
            scale = self.user_scale = scale.to(users.device)
        return self.w0, scale[users.long()]  # w0 is 1/tau in mode "fixed"

    @property
    def needs_raw_loss(self) -> bool:
        """Whether the scales depend on the rows' raw losses: only ``mode="adaptive"`` reads
        what :meth:`observe` accumulates. In modes ``"global"`` and ``"fixed"`` a caller may
        skip ``return_raw`` and :meth:`observe` (the fused kernels then compute one
        exponential per score instead of two)."""
        return self.mode == "adaptive"

    @torch.no_grad()
    def observe(self, users: Tensor, raw: Tensor) -> None:
        """Accumulate each row's raw loss (``[B]``, α = β = 1) into per-user sums and counts."""
        if users.shape != raw.shape or users.dim() != 1:
            raise ValueError(f"users {tuple(users.shape)} and raw {tuple(raw.shape)} must be the same [B]")
        if self._loss_sum.device != raw.device:
            self._loss_sum = self._loss_sum.to(raw.device)
            self._loss_count = self._loss_count.to(raw.device)
        index = users.long().to(raw.device)
        # bincount: one pass, no per-thread scatter buffers (index_add_ is slow on a busy CPU)
        self._loss_sum += torch.bincount(
            index, weights=raw.detach().to(torch.float64), minlength=self.num_users
        )
        self._loss_count += torch.bincount(index, minlength=self.num_users).to(torch.float64)

    # -- reporting and state ------------------------------------------------------------
    def summary(self) -> Dict[str, float]:
        """w₀ and min / median / max of the per-user temperature τ = 1/β, for logs."""
        tau = 1.0 / self.user_scale.double()
        return {
            "w0": float(self.w0),
            "tau_min": float(tau.min()),
            "tau_median": float(tau.median()),
            "tau_max": float(tau.max()),
        }

    def state_dict(self) -> Dict[str, object]:
        """Everything needed to resume: w₀, epoch, per-user scales and running sums."""
        return {
            "mode": self.mode,
            "tau": self.tau,
            "base": self.base,
            "smoothing": self.smoothing,
            "warmup": self.warmup,
            "active_quantile": self.active_quantile,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "epoch": self.epoch,
            "w0": self.w0,
            "c": self.c,
            "user_scale": self.user_scale.detach().cpu().clone(),
            "loss_sum": self._loss_sum.detach().cpu().clone(),
            "loss_count": self._loss_count.detach().cpu().clone(),
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore what :meth:`state_dict` saved (the table sizes must match)."""
        if state["num_users"] != self.num_users or state["num_items"] != self.num_items:
            raise ValueError("state_dict was saved for different num_users / num_items")
        for key in ("mode", "tau", "base", "smoothing", "warmup", "active_quantile", "epoch", "w0", "c"):
            setattr(self, key, state[key])
        device = self.user_scale.device
        self.user_scale = state["user_scale"].to(device=device, dtype=torch.float32)
        self._loss_sum = state["loss_sum"].to(device=device, dtype=torch.float64)
        self._loss_count = state["loss_count"].to(device=device, dtype=torch.float64)

    def __repr__(self) -> str:
        return (
            f"AdapTau(mode={self.mode!r}, num_users={self.num_users}, num_items={self.num_items}, "
            f"w0={self.w0:.4g}, warmup={self.warmup}, base={self.base!r}, smoothing={self.smoothing})"
        )
