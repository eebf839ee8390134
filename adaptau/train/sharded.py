"""Row-wise sharded MF tables with TorchRec: ``adaptau train --shard-tables row-wise``.

Imported only when the flag is used (``import adaptau`` never imports torchrec). How a run
works, under ``torchrun … -m adaptau train --shard-tables row-wise`` or ``adaptau train
--nproc N --shard-tables row-wise`` (one process without either: a 1-rank group):

* **Tables** — the user and the item table are two tables of one TorchRec
  ``EmbeddingCollection`` under ``DistributedModelParallel``. TorchRec's planner places
  them with ``ParameterConstraints(sharding_types=[ROW_WISE])``: rank r holds rows
  ``[r·⌈n/W⌉, (r+1)·⌈n/W⌉)`` of each table (the last block is shorter). Their initial
  values are the 1-process MF's (same seed), copied block by block into the shards.
* **Optimizer** — TorchRec's fused optimizer: fbgemm's table-batched embedding kernel
  applies the update inside the backward, to the rows the step touched.
  ``--sparse-grad adagrad`` → ``EXACT_ADAGRAD`` (``torch.optim.Adagrad``'s update,
  eps 1e-10); ``--sparse-grad sparse-adam`` → ``ADAM`` (fused Adam on the touched rows,
  like ``SparseAdam``; fbgemm builds it for CUDA only, so a CPU run refuses it).
* **Step** — data as under DDP (:mod:`adaptau.train.distributed`): every rank cuts the
  same global batch and keeps rows ``r, r+W, …``; negatives come from one shared stream.
  :func:`adaptau.compact` turns the rank's ``pos ∪ neg`` into K unique ids and local
  indices; one ``KeyedJaggedTensor`` (key ``user``: the rank's batch users, key ``item``:
  the K ids) goes through the sharded collection, whose input all-to-all sends the ids to
  the ranks owning their rows and whose output all-to-all brings back ``[B_r, D]`` and
  ``[K, D]``. :func:`adaptau.softmax_loss` runs on that compact table; the rank's loss is
  its rows' summed loss over the *global* batch size, plus the sampled L2 of the same rows.
  The backward all-to-all routes the row gradients to the owning shards, where the
  contributions of all ranks add up to the global-batch gradient and the fused optimizer
  applies it.
* **Adap-τ** — the whole-table quantities are summed per shard and all-reduced
  (:meth:`adaptau.AdapTau.sharded_alignment_gap`, :func:`adaptau.loss.temperature.mean_normalized_rows`);
  the per-user loss sums are all-reduced as under DDP.
* **Evaluation and checkpoints: gathered to rank 0.** After every epoch the shards are
  gathered (``ShardedTensor.gather``) into a plain MF on rank 0, which ranks all items with
  :func:`adaptau.train.evaluate.full_ranking` exactly as a 1-process run and writes
  ``best.pt`` / ``last.pt`` in the format of a 1-process MF run (``adaptau eval`` reads
  them in one process). ``last.pt`` also holds the fused optimizer's state, gathered,
  under ``optimizer["torchrec_fused"]``; ``--resume`` scatters tables and state back into
  the shards, for any number of ranks. Rank 0 therefore needs host memory for both
  tables (Last.fm to Gowalla scale: megabytes); a catalog beyond one host would need
  shard-by-shard top-K merging instead, which this module does not implement.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import distributed as dist
from .models import sampled_item_counts
from .sampling import dropout as inverted_dropout
from .checkpoints import CheckpointError
from .trainer import NonFiniteLossError, Trainer
from ..loss.ops import compact as adaptau_compact

__all__ = ["TorchRecMissing", "require_torchrec", "ShardedTables", "ShardedTrainer", "FUSED_OPTIMIZERS"]

INSTALL_HINT = (
    "pip install --no-build-isolation -e '.[torchrec]' torch==2.13.0 && pip install "
    "--no-deps torchrec==1.9.2 (in this order; see docs/distributed.md)"
)


class TorchRecMissing(ImportError, ValueError):
    """TorchRec (or fbgemm's CPU/GPU kernels) cannot be imported."""


def require_torchrec() -> None:
    """Import torchrec and fbgemm_gpu, or raise :class:`TorchRecMissing` (one line,
    saying how to install them)."""
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except Exception as exc:  # ImportError, or fbgemm's OSError for a library built for another torch
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TorchRecMissing(
            f"--shard-tables needs TorchRec with fbgemm ({type(exc).__name__}: "
            f"{first}); install it with: {INSTALL_HINT}"
        ) from None


#: ``--sparse-grad`` → (optimizer class TorchRec maps to an fbgemm ``EmbOptimType``, its
#: arguments besides lr, the EmbOptimType's name).
FUSED_OPTIMIZERS: Dict[str, Tuple[str, Dict[str, Any], str]] = {
    "adagrad": ("Adagrad", {"eps": 1e-10}, "EXACT_ADAGRAD"),
    "sparse-adam": ("Adam", {"eps": 1e-8}, "ADAM"),
}

_TABLES = ("user", "item")

# TorchRec's state_dict holds ShardedTensors, whose every use warns about their deprecation
warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TorchRec's planner and ShardedTensor warn about their own deprecations and about
    estimates a CPU run does not use on every call: keep them out of the run's log."""
    logger = logging.getLogger("torchrec.distributed.planner")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


class ShardedTables:
    """The MF user and item tables, row-wise sharded over the default process group.

    Args:
        num_users, num_items: table rows U and N.
        dim: D.
        optimizer: ``"adagrad"`` or ``"sparse-adam"`` (see :data:`FUSED_OPTIMIZERS`).
        lr: learning rate of the fused optimizer.
        device: this rank's device (``cpu``, or ``cuda:LOCAL_RANK``).

    Attributes:
        module: the ``DistributedModelParallel`` around the ``EmbeddingCollection``.
        plan: TorchRec's sharding plan (one ``ParameterSharding`` per table).
        blocks: ``{"user": (start, rows), "item": (start, rows)}``: this rank's row block.
    """

    def __init__(
        self, num_users: int, num_items: int, dim: int, *, optimizer: str, lr: float, device: torch.device
    ) -> None:
        require_torchrec()
        from torchrec import EmbeddingCollection, EmbeddingConfig
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
        from torchrec.distributed.types import ShardingType
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        if optimizer not in FUSED_OPTIMIZERS:
            raise ValueError(
                f"--shard-tables: no fused optimizer for --sparse-grad {optimizer!r}; "
                f"choose one of {sorted(FUSED_OPTIMIZERS)}"
            )
        if optimizer == "sparse-adam" and device.type != "cuda":
            raise ValueError(
                "--shard-tables on the CPU: fbgemm's CPU embedding kernels have no "
                "fused Adam (EXACT_ADAGRAD, EXACT_ROWWISE_ADAGRAD and EXACT_SGD only); "
                "use --sparse-grad adagrad"
            )
        if not dist.is_initialized():
            raise RuntimeError("ShardedTables needs a process group (ShardedTrainer starts one)")
        self.sizes = {"user": int(num_users), "item": int(num_items)}
        self.dim, self.device = int(dim), device
        self.optimizer_name = optimizer
        name, extra, self.emb_optim = FUSED_OPTIMIZERS[optimizer]
        collection = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=t, embedding_dim=self.dim, num_embeddings=self.sizes[t], feature_names=[t]
                )
                for t in _TABLES
            ],
            device=torch.device("meta"),
        )
        apply_optimizer_in_backward(
            getattr(torch.optim, name), collection.parameters(), {"lr": float(lr), **extra}
        )
        world = torch.distributed.get_world_size()
        with _quiet():
            planner = EmbeddingShardingPlanner(
                topology=Topology(world_size=world, compute_device=device.type),
                constraints={
                    t: ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value]) for t in _TABLES
                },
            )
            sharders = [EmbeddingCollectionSharder()]
            self.plan = planner.collective_plan(collection, sharders, torch.distributed.GroupMember.WORLD)
            self.module = DistributedModelParallel(
                collection, device=device, plan=self.plan, sharders=sharders
            )
        self.blocks: Dict[str, Tuple[int, int]] = {}
        for t in _TABLES:
            (shard,) = self._weight(t).local_shards()
            self.blocks[t] = (int(shard.metadata.shard_offsets[0]), int(shard.metadata.shard_sizes[0]))

    # -- shards -------------------------------------------------------------------------
    def _weight(self, table: str):
        with _quiet():
            return self.module.state_dict()[f"embeddings.{table}.weight"]

    def local_rows(self, table: str) -> Tensor:
        """This rank's ``[rows, D]`` block of ``table`` (a view of the shard)."""
        with _quiet():
            (shard,) = self._weight(table).local_shards()
        return shard.tensor

    def shard_rows(self, table: str) -> List[Tuple[int, int]]:
        """``[(start, rows)]`` of every rank's block of ``table``, by rank (from the plan)."""
        ps = next(p[table] for p in self.plan.plan.values() if table in p)
        return [(int(m.shard_offsets[0]), int(m.shard_sizes[0])) for m in ps.sharding_spec.shards]

    def table_bytes(self) -> int:
        """Bytes of this rank's table rows (both tables)."""
        return sum(self.local_rows(t).numel() * self.local_rows(t).element_size() for t in _TABLES)

    def optimizer_bytes(self) -> int:
        """Bytes of this rank's fused optimizer state (both tables)."""
        return sum(
            int(s.tensor.numel() * s.tensor.element_size())
            for _, st in self._optimizer_tensors()
            for s in st.local_shards()
        )

    @torch.no_grad()
    def load_full(self, user: Tensor, item: Tensor) -> None:
        """Copy each rank's block of the whole ``[U, D]`` / ``[N, D]`` tables into its shards."""
        for t, full in (("user", user), ("item", item)):
            start, rows = self.blocks[t]
            self.local_rows(t).copy_(full[start : start + rows].to(self.device))

    def _gather(self, st, dst: int) -> Optional[Tensor]:
        with _quiet():
            out = None
            if dist.rank_and_world()[0] == dst:
                out = torch.empty(
                    tuple(st.size()), dtype=st.local_shards()[0].tensor.dtype, device=self.device
                )
            st.gather(dst=dst, out=out)
        return out

    @torch.no_grad()
    def gather(self, dst: int = 0) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Both whole tables ``([U, D], [N, D])`` on rank ``dst``, ``(None, None)`` elsewhere.
        Collective."""
        return tuple(self._gather(self._weight(t), dst) for t in _TABLES)  # type: ignore[return-value]

    def _optimizer_tensors(self):
        with _quiet():
            state = self.module.fused_optimizer.state_dict()["state"]
        for t in _TABLES:
            for key, value in sorted(state[f"embeddings.{t}.weight"].items()):
                if hasattr(value, "local_shards"):
                    yield key, value

    @torch.no_grad()
    def gather_optimizer_state(self, dst: int = 0) -> Dict[str, Any]:
        """The fused optimizer's state, each sharded tensor gathered whole on rank ``dst``:
        ``{"optimizer": "adagrad", "emb_optim": "EXACT_ADAGRAD", "state": {"item.momentum1":
        [N, D], …}}`` (``state`` empty on other ranks). Collective."""
        state = {}
        for key, st in list(self._optimizer_tensors()):
            full = self._gather(st, dst)
            if full is not None:
                state[key] = full.cpu()
        return {"optimizer": self.optimizer_name, "emb_optim": self.emb_optim, "state": state}

    @torch.no_grad()
    def load_optimizer_state(self, saved: Dict[str, Any], where: str) -> None:
        """Scatter what :meth:`gather_optimizer_state` saved back into the shards."""
        if saved.get("optimizer") != self.optimizer_name:
            raise CheckpointError(
                f"{where}: its fused optimizer is {saved.get('optimizer')!r}, "
                f"this run's --sparse-grad is {self.optimizer_name!r}"
            )
        for key, st in self._optimizer_tensors():
            if key not in saved["state"]:
                raise CheckpointError(f"{where}: no fused optimizer state {key!r}")
            full = saved["state"][key]
            for shard in st.local_shards():
                off, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                index = tuple(slice(o, o + s) for o, s in zip(off, size))
                shard.tensor.copy_(full[index].to(shard.tensor.device, shard.tensor.dtype))

    # -- per step -----------------------------------------------------------------------
    def lookup(self, users: Tensor, items: Tensor) -> Tuple[Tensor, Tensor]:
        """Rows of ``users`` (``[B]``, repeats allowed) and ``items`` (``[K]``) from the
        sharded tables: ``([B, D], [K, D])``, in the order asked. Collective (every rank
        calls it once per step, with its own ids); the backward routes the rows' gradients
        to the owning ranks, where the fused optimizer applies them."""
        from torchrec import KeyedJaggedTensor

        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(_TABLES),
            values=torch.cat([users.long(), items.long()]).to(self.device),
            lengths=torch.tensor([users.numel(), items.numel()], dtype=torch.int32, device=self.device),
        )
        out = self.module(kjt)
        return out["user"].values(), out["item"].values()


class ShardedTrainer(Trainer):
    """:class:`adaptau.train.Trainer` with TorchRec row-wise sharded MF tables
    (``cfg.shard_tables == "row-wise"``); see the module docstring. ``Trainer(cfg)`` returns
    one when ``cfg.shard_tables`` is set.

    It keeps the trainer's run and epoch loop and replaces the parts the tables change: the
    model setup, :meth:`train_step`, the start of an epoch, the optimizer's state in
    ``last.pt`` and the finiteness check of the weights (which gathers the shards into rank
    0's MF, so that ``last.pt`` / ``best.pt`` hold the whole tables).
    """

    def __init__(self, cfg, **kwargs) -> None:
        require_torchrec()
        self._own_group = False
        if dist.env_world_size() <= 1 and not dist.is_initialized():
            # one process: a 1-rank gloo group, since DistributedModelParallel needs one
            torch.distributed.init_process_group(
                "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
            )
            self._own_group = True
        try:
            super().__init__(cfg, **kwargs)
        except BaseException:
            self._leave_group()
            raise
        if not self.is_main:  # rank 0 keeps the gathered tables (evaluation, checkpoints)
            for p in self.model.parameters():
                p.data = p.data.new_empty((0, p.shape[1]))

    def _leave_group(self) -> None:
        if self._own_group and dist.is_initialized():
            torch.distributed.destroy_process_group()
            self._own_group = False

    def fit(self) -> Dict[str, Any]:
        """:meth:`Trainer.fit`; the 1-rank process group started here ends with it."""
        try:
            return super().fit()
        finally:
            self._leave_group()

    # -- setup and state ------------------------------------------------------------------
    def _setup_model(self) -> None:
        cfg = self.cfg
        self.sparse = True
        self.tables = ShardedTables(
            self.num_users, self.num_items, cfg.dim, optimizer=cfg.sparse_grad, lr=cfg.lr, device=self.device
        )
        self.tables.load_full(self.model.user.weight.detach(), self.model.item.weight.detach())
        self.step_module = self.tables.module
        self.optimizer = self.tables.module.fused_optimizer

    def _optimizer_state(self) -> Dict[str, Any]:
        return {"torchrec_fused": self.tables.gather_optimizer_state(0)}

    def _restore_model_and_optimizer(self, ckpt: Dict[str, Any]) -> None:
        where = str(self.checkpoints.last_path)
        saved = ckpt.get("optimizer")
        if not (isinstance(saved, dict) and "torchrec_fused" in saved):
            raise CheckpointError(
                f"{where}: written by a run without --shard-tables; resume it without --shard-tables"
            )
        self.model.load_state_dict(ckpt["model"])
        self.tables.load_full(self.model.user.weight.detach(), self.model.item.weight.detach())
        self.tables.load_optimizer_state(saved["torchrec_fused"], where)

    @torch.no_grad()
    def _sync_mirror(self) -> bool:
        """Gather the shards into rank 0's MF (collective); True when every shard is finite."""
        finite = torch.tensor(
            [float(all(bool(torch.isfinite(self.tables.local_rows(t)).all()) for t in _TABLES))],
            device=self.device,
        )
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        user, item = self.tables.gather(0)
        if self.is_main:
            self.model.user.weight.copy_(user)
            self.model.item.weight.copy_(item)
        return bool(finite.item() > 0)

    def _check_finite_weights(self, epoch: int) -> None:
        if not self._sync_mirror():  # the same answer on every rank
            raise NonFiniteLossError(
                f"non-finite weights in the sharded tables after epoch {epoch}; try a lower "
                f"--lr. The last good checkpoint is {self.out / 'last.pt'}"
            )

    # -- Adap-τ -----------------------------------------------------------------------------
    @torch.no_grad()
    def _begin_epoch(self, epoch: int) -> None:
        """Start the controller's epoch from the shards (the whole-table quantities summed
        per shard and all-reduced); the first epoch of the run also logs the table layout."""
        if epoch == self.start_epoch:
            (u0, nu), (i0, ni) = self.tables.blocks["user"], self.tables.blocks["item"]
            self.log(
                f"  tables: TorchRec row-wise over {self.world_size} rank(s), fused "
                f"{self.tables.emb_optim}; rank 0 holds users {u0}..{u0 + nu - 1}, items "
                f"{i0}..{i0 + ni - 1}; evaluation and checkpoints gather them to rank 0"
            )
        ctl = self.controller
        gap = None
        if ctl.mode != "fixed" and epoch >= ctl.warmup:
            (u0, _), (i0, _) = self.tables.blocks["user"], self.tables.blocks["item"]
            gap = ctl.sharded_alignment_gap(
                self.tables.local_rows("user"), u0, self.tables.local_rows("item"), i0
            )
        ctl.begin_epoch(epoch, alignment_gap=gap)

    # -- training -------------------------------------------------------------------------
    def train_step(self, users: Tensor, pos: Tensor, *, epoch: int = 0, step: int = 0) -> Tuple[Tensor, int]:
        """One step on the global batch ``(users, pos)`` with the sharded tables: this rank's
        rows and their negatives compacted to unique item ids, looked up in the shards, the
        loss summed over the rank's rows over the *global* batch size plus the sampled L2,
        all-reduced (NonFiniteLossError on every rank when it is not finite, before the
        tables change), and the backward, in which the fused optimizer updates the shards.

        Returns the global batch's mean loss (float64) and the global batch size."""
        cfg = self.cfg
        from .. import softmax_loss  # (looked up on the package: tests monkeypatch it)

        in_batch = cfg.sampler == "in-batch"
        global_batch = users.numel()
        neg, neg_logq = self.sampler.sample(users, pos, self.neg_gen)
        users, pos, neg = self._rank_rows(users, pos, neg)
        ids, pos_local, neg_local = adaptau_compact(pos, neg, num_items=self.num_items)
        ego_u, item_rows = self.tables.lookup(users, ids)
        u = ego_u
        if cfg.dropout > 0:
            u = inverted_dropout(ego_u, cfg.dropout)
        need_raw = self.controller.needs_raw_loss
        pos_scale, neg_scale = self.controller.scales(users)
        out = softmax_loss(
            u,
            item_rows,
            pos_local,
            neg_local,
            pos_scale,
            neg_scale,
            include_pos=cfg.include_pos,
            normalize=cfg.normalize,
            neg_logq=None if neg_logq is None else neg_logq[ids],
            remove_accidental_hits=cfg.remove_hits,
            reduction="sum",
            return_raw=need_raw,
            backend=cfg.backend,
        )
        loss, raw = out if need_raw else (out, None)
        loss = loss / global_batch  # summed over ranks: the global batch's mean
        if cfg.l2 > 0:  # (in-batch: negatives are positives, already counted)
            counts = sampled_item_counts(
                pos_local, None if in_batch else neg_local, ids.numel(), item_rows.dtype
            )
            loss = (
                loss
                + cfg.l2
                * 0.5
                * (ego_u.pow(2).sum() + (item_rows.pow(2).sum(1) * counts).sum())
                / global_batch
            )
        total = dist.all_reduce_sum(loss.detach().double().reshape(1))  # on every rank
        if not bool(torch.isfinite(total).all()):
            raise NonFiniteLossError(
                f"non-finite training loss ({float(total)}) at epoch {epoch}, step {step} of "
                f"{len(self.batches)}: w0={self.controller.w0:.4g}; try a lower --lr or a larger "
                f"--tau-value / --smoothing. {self._last_good_checkpoint()}"
            )
        loss.backward()  # all-to-all to the owning shards; the fused optimizer updates them
        if need_raw:
            self.controller.observe(users, raw)
        return total.reshape(()), global_batch
