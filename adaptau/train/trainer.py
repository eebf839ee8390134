"""A training run from start to end: :class:`Trainer` (one run), :func:`train` and
:func:`evaluate_run`.

The trainer is built from parts, each in its own module:

* :class:`~adaptau.train.run_folder.RunFolder` — the run folder and its files (the log,
  ``config.json``, ``metrics.jsonl``, ``summary.json``, the plots; the list of files is in
  :mod:`adaptau.train.run_folder`) and the lock that keeps a second run out of it;
* :class:`~adaptau.train.checkpoints.Checkpointer` — ``last.pt`` (resume) and ``best.pt``;
* :class:`EarlyStopping` (here) — epoch selection and patience;
* :class:`~adaptau.train.epoch.EpochLoop` — one epoch and its step,
  :meth:`~adaptau.train.epoch.EpochLoop.train_step` (:class:`Trainer` is one;
  :class:`~adaptau.train.sharded.ShardedTrainer` replaces the step, not the loop);
* :mod:`adaptau.train.summary` — the end of the run: ``summary.json``, the plots, the
  closing log lines.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as dist
from .checkpoints import Checkpointer, CheckpointError, load_checkpoint, resume_run_state, save_run_state
from .config import TrainConfig, read_run_config, resolve_device
from .epoch import EpochLoop, NonFiniteLossError
from .data import Dataset, Split, csr_pairs, load_dataset, prepare
from .evaluate import by_user_degree, format_metrics, full_ranking, item_popularity
from .host import keep_freed_heap
from .models import build_model
from .run_folder import RunFolder
from .run_folder import atomic_write_text as _atomic_write_text
from .run_folder import dumps as _dumps
from .sampling import BatchIterator, NegativeSampler
from .summary import epoch_line, finish_run, finished_run, opening_lines
from ..loss import ops
from ..loss.ops import cpu_capability

__all__ = ["Trainer", "train", "evaluate_run", "NonFiniteLossError", "EarlyStopping", "epoch_line"]


# ----------------------------------------------------------------------- early stopping
class EarlyStopping:
    """Epoch selection and patience: the best evaluation so far (``{"epoch", "value",
    "metrics"}``, larger values better) and the evaluations since without improvement, which
    count only from epoch ``patience_from`` on; ``patience`` 0 never stops."""

    def __init__(self, patience: int, patience_from: int = 0) -> None:
        self.patience, self.patience_from = patience, patience_from
        self.best: Optional[Dict[str, Any]] = None
        self.bad_evals = 0

    def update(self, epoch: int, metrics: Dict[str, float], value: float) -> bool:
        """Record an evaluation; True when it is the new best."""
        if self.best is None or value > self.best["value"]:
            self.best = {"epoch": epoch, "value": value, "metrics": metrics}
            self.bad_evals = 0
            return True
        if epoch >= self.patience_from:
            self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` evaluations in a row did not improve (never when 0)."""
        return 0 < self.patience <= self.bad_evals


# ------------------------------------------------------------------------------ trainer
def temperature_controller(cfg: TrainConfig, users: torch.Tensor, items: torch.Tensor, dataset: Dataset):
    """The run's :class:`~adaptau.AdapTau`, from the training pairs ``users``/``items``
    (``[P]`` each) and the settings ``--tau``, ``--tau-value``, ``--base``, ``--smoothing``,
    ``--warmup`` and ``--active-quantile``."""
    from ..loss.temperature import AdapTau

    return AdapTau(
        users,
        items,
        num_users=dataset.num_users,
        num_items=dataset.num_items,
        mode=cfg.tau,
        tau=cfg.tau_value,
        base=cfg.base,
        smoothing=cfg.smoothing,
        warmup=cfg.warmup,
        active_quantile=cfg.active_quantile,
    )


class Trainer(EpochLoop):
    """One run. ``Trainer(cfg).fit()`` trains and returns the summary dict.

    ``resume``: a run folder whose ``last.pt`` is continued (same optimizer, RNG and
    controller state); ``cfg.epochs`` may be raised to train further. ``overwrite``: replace
    the run files of a ``cfg.out`` that already holds a run (else that is a ValueError).

    Attributes:
        run: the :class:`~adaptau.train.run_folder.RunFolder` (``out``: its path).
        checkpoints: the :class:`~adaptau.train.checkpoints.Checkpointer` of ``last.pt`` /
            ``best.pt``.
        stopping: the :class:`EarlyStopping` state.
        start_epoch, history, train_seconds, tau_snapshots: where the run stands (restored
            from ``last.pt`` on resume).
    """

    def __new__(cls, cfg: Optional[TrainConfig] = None, *args, **kwargs):
        # --shard-tables: the TorchRec trainer (imported only then: it imports torchrec)
        if cls is Trainer and cfg is not None and getattr(cfg, "shard_tables", "off") != "off":
            from .sharded import ShardedTrainer

            cls = ShardedTrainer
        return super().__new__(cls)

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: Optional[str] = None,
        log=print,
        dataset: Optional[Dataset] = None,
        overwrite: bool = False,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        # torchrun workers (WORLD_SIZE > 1) join the group here: gloo on CPU, NCCL on CUDA
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = dist.init_from_env(resolve_device(cfg.device))
        self.rank, self.world_size = dist.rank_and_world()
        self.is_main = self.rank == 0
        # reuse freed host memory instead of page-faulting it in again every step
        self.heap_kept = (
            self.device.type == "cpu"
            and os.environ.get("ADAPTAU_KEEP_FREED_HEAP") != "0"
            and keep_freed_heap()
        )

        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        torch.manual_seed(cfg.seed)

        t0 = time.time()
        self.dataset = (
            dataset if dataset is not None else load_dataset(cfg.data, seed=cfg.seed, split=cfg.split)
        )
        self.split: Split = prepare(
            self.dataset, cfg.protocol, seed=cfg.seed, valid_fraction=cfg.valid_fraction
        )
        self.load_seconds = time.time() - t0
        ds, sp_ = self.dataset, self.split
        self.num_users, self.num_items = ds.num_users, ds.num_items
        train_u, train_i = csr_pairs(sp_.train)
        self.train_users = torch.as_tensor(train_u, device=self.device)
        self.train_items = torch.as_tensor(train_i, device=self.device)
        self.activity = np.diff(sp_.train.indptr)
        self.popularity = item_popularity(sp_.train)

        self.model = build_model(
            cfg.model,
            self.num_users,
            self.num_items,
            sp_.train,
            dim=cfg.dim,
            dropout=cfg.dropout,
            layers=cfg.layers,
            init_std=cfg.init_std,
        )
        self.model.to(self.device)
        if cfg.sampler == "mixed" and self.world_size > 1:
            raise ValueError(
                "--sampler mixed runs in one process: its in-batch part would need "
                "every rank's positives (use --sampler in-batch or shared under DDP)"
            )
        self._setup_model()
        self.direct_l2 = cfg.l2 > 0 and self._l2_on_leaves()  # the L2 gradient added to .grad (train_step)
        self.controller = temperature_controller(cfg, self.train_users, self.train_items, ds)
        self.sampler = NegativeSampler(
            cfg.sampler,
            self.num_items,
            cfg.negatives,
            train=sp_.train,
            gamma=cfg.pop_gamma,
            device=self.device,
            pool=cfg.mixed_pool,
        )
        # global batches of cfg.batch_size rows, the same on every rank (shared seed); each
        # rank keeps rows rank, rank + world_size, … of each (see _rank_rows)
        self.batches = BatchIterator(
            self.train_users,
            self.train_items,
            cfg.batch_size,
            drop_last=cfg.sampler in ("in-batch", "mixed") and self.train_users.numel() >= cfg.batch_size,
        )
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        self.shuffle_gen = torch.Generator(device=gen_device).manual_seed(cfg.seed)
        # negatives are drawn for the whole global batch from one stream shared by all ranks
        self.neg_gen = torch.Generator(device=gen_device).manual_seed(cfg.seed + 7919)

        self.start_epoch = 0
        self.history: List[Dict[str, Any]] = []
        # Evaluations of warm-up epochs do not count towards patience: the Adap-τ rule
        # (adaptive / global) only starts setting the temperatures after the warm-up, so a
        # run must not stop before it has seen them act.
        self.stopping = EarlyStopping(cfg.patience, cfg.warmup if cfg.tau in ("adaptive", "global") else 0)
        self.train_seconds = 0.0
        self.tau_snapshots: Dict[int, torch.Tensor] = {}
        self.backend_used = ops.resolve_backend(cfg.backend, self.device.type)
        self.status = "running"

        self.run = RunFolder.open(
            cfg,
            self.dataset.name,
            resume=resume,
            overwrite=overwrite,
            world_size=self.world_size,
            is_main=self.is_main,
            echo=log,
        )
        self.out = self.run.path
        self.checkpoints = Checkpointer(self.out, cfg, self.device)
        if resume:
            resume_run_state(self)
        self.metric = cfg.selection_metric

    def _setup_model(self) -> None:
        """Set ``step_module`` (the backbone's part of a step; DistributedDataParallel when
        world_size > 1, which also broadcasts rank 0's initial weights), ``sparse`` and
        ``optimizer`` for ``self.model``."""
        cfg = self.cfg
        self.step_module = dist.wrap_model(dist.StepModule(self.model), self.device)
        self.sparse = cfg.sparse_grad != "off"
        if self.sparse and self.world_size > 1:
            raise ValueError(
                "--sparse-grad runs in one process (DDP all-reduces dense gradients); "
                "with several processes add --shard-tables row-wise"
            )
        self.model.sparse = self.sparse
        # LightGCN on the CPU: the batch's rows only, unless hard or mixed negatives read the
        # whole table (on a GPU, building the row block would add host syncs to every step)
        self.item_rows_only = (hasattr(self.model, "rows") and self.device.type == "cpu") and not (
            self.sparse or cfg.hard_negatives or cfg.sampler == "mixed"
        )
        if cfg.sparse_grad == "sparse-adam":
            self.optimizer = torch.optim.SparseAdam(list(self.model.parameters()), lr=cfg.lr)
        elif cfg.sparse_grad == "adagrad":
            self.optimizer = torch.optim.Adagrad(self.model.parameters(), lr=cfg.lr)
        else:
            self.optimizer = torch.optim.Adam(
                self.model.parameters(),
                lr=cfg.lr,
                **({"fused": True} if self.device.type in ("cpu", "cuda") else {}),
            )

    def log(self, msg: str) -> None:
        """Show ``msg`` and append it to ``train.log`` (rank 0 only)."""
        self.run.log(msg)

    # -- state ----------------------------------------------------------------------------
    def _check_finite_weights(self, epoch: int) -> None:
        """NonFiniteLossError when a parameter holds NaN or infinity after an epoch (the
        optimizer's last step can diverge after the last finite loss): such weights are
        never written to last.pt or best.pt."""
        for name, value in self.model.named_parameters():
            if not bool(torch.isfinite(value.detach()).all()):
                raise NonFiniteLossError(
                    f"non-finite weights in {name} after epoch {epoch}; try a "
                    f"lower --lr. {self._last_good_checkpoint()}"
                )

    def _last_good_checkpoint(self) -> str:
        """Where the run can be picked up again after a stop, as a sentence for the user."""
        return self.checkpoints.last_good(self.history[-1]["epoch"] + 1 if self.history else self.start_epoch)

    def _model_state(self) -> Dict[str, torch.Tensor]:
        """The model's state for last.pt (collective in subclasses: call it on every rank)."""
        return self.model.state_dict()

    def _optimizer_state(self) -> Dict[str, Any]:
        """The optimizer's state for last.pt (collective in subclasses: call on every rank)."""
        return self.optimizer.state_dict()

    def _restore_model_and_optimizer(self, ckpt: Dict[str, Any]) -> None:
        """Load last.pt's model and optimizer state (``ckpt`` already checked to fit)."""
        if isinstance(ckpt.get("optimizer"), dict) and "torchrec_fused" in ckpt["optimizer"]:
            raise CheckpointError(
                f"{self.checkpoints.last_path}: written by a --shard-tables run "
                "(TorchRec fused optimizer state); resume it with --shard-tables "
                f"{ckpt.get('config', {}).get('shard_tables', 'row-wise')}"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def ranking_tables(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The user and item tables that rank items (eval mode; normalized with ``rank_cosine``)."""
        was = self.model.training
        self.model.eval()
        users, items = self.model.tables()
        self.model.train(was)
        if self.cfg.rank_cosine:
            users, items = F.normalize(users, dim=-1), F.normalize(items, dim=-1)
        return users.detach(), items.detach()

    def evaluate(self, which: str = "select") -> Dict[str, float]:
        """Full-ranking metrics on the selection split (``"select"``) or on ``"test"``."""
        users, items = self.ranking_tables()
        if which == "select":
            test, exclude = self.split.select, self.split.select_exclude
        else:
            test, exclude = self.split.test, self.split.test_exclude
        return full_ranking(users, items, test, exclude, ks=self.cfg.topk, item_popularity=self.popularity)

    # -- the run --------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train to the end (or the stop) and return the summary; the run folder's lock is
        released when it returns or raises."""
        try:
            return self._fit()
        finally:
            self.run.release()

    def _fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.run.write_config(cfg, self.split.note, self.dataset)
        ds_stats = self.dataset.stats()
        if self.start_epoch == 0:
            for line in opening_lines(self):
                self.log(line)
        elif self.start_epoch >= cfg.epochs or self.stopping.should_stop:
            return finished_run(self, ds_stats)
        else:
            self.log(f"resuming {self.out} at epoch {self.start_epoch} (of {cfg.epochs})")
        if cpu_capability() is not None:
            self.log(
                f"  cpu kernels: {cpu_capability()} (ADAPTAU_CPU_CAPABILITY=default|avx2|avx512 forces a level)"
            )
        stopped = None
        for epoch in range(self.start_epoch, cfg.epochs):
            t0 = time.time()
            try:
                rec = self._train_epoch(epoch)
                self._check_finite_weights(epoch)
            except NonFiniteLossError as exc:
                self.status = "diverged"
                stopped = str(exc)
                self.log(f"STOPPED: {exc}")
                break
            seconds = time.time() - t0
            self.train_seconds += seconds
            rec = {"epoch": epoch, **rec, "seconds": round(seconds, 3), **self.controller.summary()}
            if Checkpointer.is_snapshot_epoch(epoch):
                self.tau_snapshots[epoch] = self.controller.user_scale.detach().cpu().clone()
            if ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs) and self.is_main:
                self._evaluate_epoch(epoch, rec)
            self.history.append(rec)
            save_run_state(self, epoch + 1)  # collective; rank 0 writes
            self.run.append_metrics(rec)
            if self.is_main:
                self.log(epoch_line(rec, self.stopping.best))
            stop = self.stopping.should_stop
            if self.world_size > 1:
                flag = torch.tensor([int(stop)], device=self.device)
                torch.distributed.broadcast(flag, 0)
                stop = bool(flag.item())
            if stop:
                self.log(
                    f"early stop: {self.metric} did not improve for {cfg.patience} evaluations "
                    f"(best {self.stopping.best['value']:.4f} at epoch {self.stopping.best['epoch']})"
                )
                self.status = "early-stopped"
                break
        else:
            self.status = "completed"
        return finish_run(self, ds_stats, stopped)

    def _evaluate_epoch(self, epoch: int, rec: Dict[str, Any]) -> None:
        """Rank 0: evaluate on the selection split into ``rec``; best.pt when it is the best."""
        t1 = time.time()
        metrics = self.evaluate("select")
        rec["metrics"] = metrics
        rec["eval_seconds"] = round(time.time() - t1, 3)
        if self.stopping.update(epoch, metrics, metrics[self.metric]):
            self.checkpoints.save_best(
                epoch, model=self.model.state_dict(), controller=self.controller.state_dict(), metrics=metrics
            )


def train(
    cfg: TrainConfig, *, resume: Optional[str] = None, log=print, overwrite: bool = False
) -> Dict[str, Any]:
    """Train a run (or continue ``resume``; ``overwrite`` replaces a run in ``cfg.out``)
    and return its summary."""
    return Trainer(cfg, resume=resume, log=log, overwrite=overwrite).fit()


def evaluate_run(
    run: str, *, checkpoint: str = "best", log=print, data: Optional[str] = None, by_degree: int = 0
) -> Dict[str, Dict[str, float]]:
    """Re-evaluate a saved run folder: its ``best.pt`` (or ``last.pt``) on the selection
    split and on test, and with ``by_degree=G`` also test per group of users (``G`` groups by
    training interactions, see :func:`~adaptau.train.evaluate.by_user_degree`). Writes
    ``eval.json`` into the folder and returns the metrics."""
    run_dir = Path(run)
    cfg = read_run_config(run_dir, flag="--run")
    if data is not None:
        cfg.data = data
    ckpt_path = run_dir / f"{checkpoint}.pt"
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path} not found")
    cfg.out = str(run_dir)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = cfg
    trainer.device = resolve_device(cfg.device)
    trainer.dataset = load_dataset(cfg.data, seed=cfg.seed, split=cfg.split)
    trainer.split = prepare(trainer.dataset, cfg.protocol, seed=cfg.seed, valid_fraction=cfg.valid_fraction)
    trainer.popularity = item_popularity(trainer.split.train)
    trainer.model = build_model(
        cfg.model,
        trainer.dataset.num_users,
        trainer.dataset.num_items,
        trainer.split.train,
        dim=cfg.dim,
        dropout=cfg.dropout,
        layers=cfg.layers,
        init_std=cfg.init_std,
    ).to(trainer.device)
    ckpt = load_checkpoint(ckpt_path, trainer.device, cfg=cfg, model=trainer.model)
    trainer.model.load_state_dict(ckpt["model"])
    t0 = time.time()
    rows = {trainer.split.select_name: trainer.evaluate("select")}
    if trainer.split.select_name != "test":
        rows["test"] = trainer.evaluate("test")
    if by_degree:
        users, items = trainer.ranking_tables()
        degree = np.diff(trainer.split.train.tocsr().indptr)
        groups = by_user_degree(
            users,
            items,
            trainer.split.test,
            trainer.split.test_exclude,
            degree,
            by_degree,
            ks=cfg.topk,
            item_popularity=trainer.popularity,
        )
        rows.update({f"test, {name}": metrics for name, metrics in groups.items()})
    result = {
        "checkpoint": str(ckpt_path),
        "epoch": ckpt.get("epoch"),
        "protocol": cfg.protocol,
        "metrics": rows,
        "seconds": time.time() - t0,
    }
    _atomic_write_text(run_dir / "eval.json", _dumps(result))
    when = f"after {ckpt.get('epoch')} epochs" if checkpoint == "last" else f"best epoch {ckpt.get('epoch')}"
    log(
        f"{ckpt_path} ({when}, {cfg.protocol} protocol, ranked by "
        f"{'cosine' if cfg.rank_cosine else 'dot product'})"
    )
    log(format_metrics(rows, cfg.topk))
    return rows
