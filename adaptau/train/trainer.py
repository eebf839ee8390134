"""The training loop: :class:`Trainer` (one run), :func:`train` and :func:`evaluate_run`.

A run folder (``--out``, default ``runs/<name>``) holds

* ``config.json``   the resolved configuration (plus protocol note, dataset statistics)
* ``metrics.jsonl`` one JSON object per epoch (loss, w₀, τ range, seconds, metrics when evaluated)
* ``last.pt``       everything needed to resume: model, optimizer, controller, RNG states
* ``best.pt``       the model and controller of the best evaluation so far
* ``summary.json``  best_epoch, valid and test metrics, seconds_per_epoch, world_size, data, backend
* ``train.log``     the log lines, ``curves.png``, ``tau_hist.png``, ``tau_activity.png``
* ``users.tsv`` / ``items.tsv``  the id mapping when the loader remapped ids

Checkpoints are written atomically (temp file in the same folder, fsync, ``os.replace``).
A folder that already holds a run is refused unless the run is resumed or ``overwrite``
is given, and a running trainer holds an exclusive lock on ``.lock`` in its folder, so two
runs never write one folder; temp files that a killed run left behind are removed when the
next run takes the lock.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as dist
from .data import Dataset, Split, csr_pairs, load_dataset, prepare
from .evaluate import format_metrics, full_ranking, item_popularity
from .models import add_sampled_l2_grad_, add_sparse_sampled_l2_grad_, build_model, sampled_l2
from .host import keep_freed_heap
from .checkpoints import (CheckpointError, rng_state, set_rng_state,
                          load_checkpoint)
from .config import (TrainConfig, read_run_config, resolve_device)
from . import plots
from .run_folder import RUN_FILES, RunLock, atomic_save, choose_run_folder, write_run_config
from .run_folder import append_line as _append_line
from .run_folder import atomic_write_text as _atomic_write_text
from .run_folder import dumps as _dumps
from .run_folder import _json_default
from .sampling import BatchIterator, NegativeSampler, hard_negatives
from ..loss import ops
from ..loss.ops import cpu_capability

__all__ = ["Trainer", "train", "evaluate_run", "NonFiniteLossError"]


# ---------------------------------------------------------------------------- utilities
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


def _snapshot_epochs(epoch: int) -> bool:
    """Epochs whose per-user scales are kept for the τ histogram: 0, 1, 2, 4, 8, …"""
    return epoch == 0 or (epoch & (epoch - 1)) == 0


def _dist_info() -> Tuple[int, int]:
    return dist.rank_and_world()


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
        return 0 < self.patience <= self.bad_evals


def epoch_line(rec: Dict[str, Any], best: Optional[Dict[str, Any]]) -> str:
    """The log line of one epoch's record (``*`` marks the best evaluation)."""
    parts = [f"epoch {rec['epoch']:4d}", f"loss {rec['loss']:.4f}", f"w0 {rec['w0']:.3g}",
             f"tau {rec['tau_min']:.3g}..{rec['tau_max']:.3g} (med {rec['tau_median']:.3g})"]
    if "metrics" in rec:
        m = rec["metrics"]
        shown = [k for k in m if k.split("@")[0] in ("recall", "ndcg")]
        parts.append(" ".join(f"{k} {m[k]:.4f}" for k in shown)
                     + (" *" if best and best["epoch"] == rec["epoch"] else ""))
    parts.append(f"{rec['seconds']:.1f}s")
    return " | ".join(parts)


# ------------------------------------------------------------------------------ trainer
class Trainer:
    """One run. ``Trainer(cfg).fit()`` trains and returns the summary dict.

    ``resume``: a run folder whose ``last.pt`` is continued (same optimizer, RNG and
    controller state); ``cfg.epochs`` may be raised to train further. ``overwrite``: replace
    the run files of a ``cfg.out`` that already holds a run (else that is a ValueError).
    """

    def __new__(cls, cfg: Optional[TrainConfig] = None, *args, **kwargs):
        # --shard-tables: the TorchRec trainer (imported only then: it imports torchrec)
        if cls is Trainer and cfg is not None and getattr(cfg, "shard_tables", "off") != "off":
            from .sharded import ShardedTrainer

            cls = ShardedTrainer
        return super().__new__(cls)

    def __init__(self, cfg: TrainConfig, *, resume: Optional[str] = None, log=print,
                 dataset: Optional[Dataset] = None, overwrite: bool = False) -> None:
        cfg.validate()
        self.cfg = cfg
        self.log_fn = log
        # torchrun workers (WORLD_SIZE > 1) join the group here: gloo on CPU, NCCL on CUDA
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = dist.init_from_env(resolve_device(cfg.device))
        self.rank, self.world_size = _dist_info()
        self.is_main = self.rank == 0
        # reuse freed host memory instead of page-faulting it in again every step
        self.heap_kept = (self.device.type == "cpu" and os.environ.get("ADAPTAU_KEEP_FREED_HEAP") != "0"
                          and keep_freed_heap())

        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2 ** 32))
        torch.manual_seed(cfg.seed)

        t0 = time.time()
        self.dataset = dataset if dataset is not None else load_dataset(cfg.data, seed=cfg.seed, split=cfg.split)
        self.split: Split = prepare(self.dataset, cfg.protocol, seed=cfg.seed,
                                    valid_fraction=cfg.valid_fraction)
        self.load_seconds = time.time() - t0
        ds, sp_ = self.dataset, self.split
        self.num_users, self.num_items = ds.num_users, ds.num_items
        train_u, train_i = csr_pairs(sp_.train)
        self.train_users = torch.as_tensor(train_u, device=self.device)
        self.train_items = torch.as_tensor(train_i, device=self.device)
        self.activity = np.diff(sp_.train.indptr)
        self.popularity = item_popularity(sp_.train)

        self.model = build_model(cfg.model, self.num_users, self.num_items, sp_.train, dim=cfg.dim,
                                 dropout=cfg.dropout, layers=cfg.layers, init_std=cfg.init_std)
        self.model.to(self.device)
        if cfg.sampler == "mixed" and self.world_size > 1:
            raise ValueError("--sampler mixed runs in one process: its in-batch part would need "
                             "every rank's positives (use --sampler in-batch or shared under DDP)")
        self._setup_model()
        from ..loss.temperature import AdapTau

        self.controller = AdapTau(self.train_users, self.train_items, num_users=self.num_users,
                                  num_items=self.num_items, mode=cfg.tau, tau=cfg.tau_value,
                                  base=cfg.base, smoothing=cfg.smoothing, warmup=cfg.warmup,
                                  active_quantile=cfg.active_quantile)
        self.sampler = NegativeSampler(cfg.sampler, self.num_items, cfg.negatives, train=sp_.train,
                                       gamma=cfg.pop_gamma, device=self.device, pool=cfg.mixed_pool)
        # global batches of cfg.batch_size rows, the same on every rank (shared seed); each
        # rank keeps rows rank, rank + world_size, … of each (see _train_epoch)
        self.batches = BatchIterator(self.train_users, self.train_items, cfg.batch_size,
                                     drop_last=cfg.sampler in ("in-batch", "mixed") and
                                     self.train_users.numel() >= cfg.batch_size)
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

        self.out = choose_run_folder(cfg, self.dataset.name, resume=resume, overwrite=overwrite,
                                     world_size=self.world_size, is_main=self.is_main)
        self._lock = RunLock(self.out) if self.is_main else None
        if overwrite and not resume and self.is_main:
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
        if resume:
            self._load_last()
        self.metric = cfg.selection_metric

    def _setup_model(self) -> None:
        """Set ``step_module`` (the backbone's part of a step; DistributedDataParallel when
        world_size > 1, which also broadcasts rank 0's initial weights), ``sparse`` and
        ``optimizer`` for ``self.model``."""
        cfg = self.cfg
        self.step_module = dist.wrap_model(dist.StepModule(self.model), self.device)
        self.sparse = cfg.sparse_grad != "off"
        if self.sparse and self.world_size > 1:
            raise ValueError("--sparse-grad runs in one process (DDP all-reduces dense gradients); "
                             "with several processes add --shard-tables row-wise")
        self.model.sparse = self.sparse
        if cfg.sparse_grad == "sparse-adam":
            self.optimizer = torch.optim.SparseAdam(list(self.model.parameters()), lr=cfg.lr)
        elif cfg.sparse_grad == "adagrad":
            self.optimizer = torch.optim.Adagrad(self.model.parameters(), lr=cfg.lr)
        else:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr,
                                              **({"fused": True} if self.device.type in ("cpu", "cuda") else {}))

    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        self.log_fn(msg)
        _append_line(self.out / "train.log", msg)

    # -- state ----------------------------------------------------------------------------
    def _check_finite_weights(self, epoch: int) -> None:
        """NonFiniteLossError when a parameter holds NaN or infinity after an epoch (the
        optimizer's last step can diverge after the last finite loss): such weights are
        never written to last.pt or best.pt."""
        for name, value in self.model.named_parameters():
            if not bool(torch.isfinite(value.detach()).all()):
                raise NonFiniteLossError(f"non-finite weights in {name} after epoch {epoch}; try a "
                                         f"lower --lr. {self._last_good_checkpoint()}")

    def _last_good_checkpoint(self) -> str:
        """Where the run can be picked up again after a stop, as a sentence for the user."""
        last = self.out / "last.pt"
        if not last.is_file():
            return "No checkpoint was written (the run stopped in its first epoch)."
        done = self.history[-1]["epoch"] + 1 if self.history else self.start_epoch
        return f"The last good checkpoint is {last} (after epoch {done - 1})."

    def _save_last(self, epoch_done: int) -> None:
        """Write last.pt on rank 0. Collective when world_size > 1: call it on every rank."""
        controller = self.controller.state_dict()
        if self.world_size > 1:  # the epoch's per-user loss sums of every rank, reduced
            for key in ("loss_sum", "loss_count"):
                controller[key] = dist.all_reduce_sum(
                    getattr(self.controller, "_" + key)).detach().cpu()
        model_state, optimizer_state = self._model_state(), self._optimizer_state()
        if not self.is_main:
            return
        atomic_save({
            "epoch": epoch_done,
            "model": model_state,
            "optimizer": optimizer_state,
            "controller": controller,
            "rng": rng_state(self.shuffle_gen, self.neg_gen),
            "world_size": self.world_size,
            "history": self.history,
            "best": self.stopping.best,
            "bad_evals": self.stopping.bad_evals,
            "train_seconds": self.train_seconds,
            "tau_snapshots": self.tau_snapshots,
            "config": dataclasses.asdict(self.cfg),
        }, self.out / "last.pt")

    def _model_state(self) -> Dict[str, torch.Tensor]:
        """The model's state for last.pt (collective in subclasses: call it on every rank)."""
        return self.model.state_dict()

    def _optimizer_state(self) -> Dict[str, Any]:
        """The optimizer's state for last.pt (collective in subclasses: call on every rank)."""
        return self.optimizer.state_dict()

    def _restore_model_and_optimizer(self, ckpt: Dict[str, Any]) -> None:
        """Load last.pt's model and optimizer state (``ckpt`` already checked to fit)."""
        if isinstance(ckpt.get("optimizer"), dict) and "torchrec_fused" in ckpt["optimizer"]:
            raise CheckpointError(f"{self.out / 'last.pt'}: written by a --shard-tables run "
                                  "(TorchRec fused optimizer state); resume it with --shard-tables "
                                  f"{ckpt.get('config', {}).get('shard_tables', 'row-wise')}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])

    def _load_last(self) -> None:
        ckpt = load_checkpoint(self.out / "last.pt", self.device, cfg=self.cfg, model=self.model)
        self._restore_model_and_optimizer(ckpt)
        self.controller.load_state_dict(ckpt["controller"])
        if self.rank != 0:  # rank 0 holds the saved (already reduced) sums; the next
            self.controller._loss_sum.zero_()    # begin_epoch all-reduces them
            self.controller._loss_count.zero_()
        set_rng_state(ckpt["rng"], self.shuffle_gen, self.neg_gen)
        self.start_epoch = int(ckpt["epoch"])
        self.history = list(ckpt["history"])
        self.stopping.best, self.stopping.bad_evals = ckpt["best"], int(ckpt["bad_evals"])
        self.train_seconds = float(ckpt["train_seconds"])
        self.tau_snapshots = dict(ckpt["tau_snapshots"])
        if self.is_main:  # metrics.jsonl may hold lines past the checkpoint: rewrite it
            _atomic_write_text(self.out / "metrics.jsonl",
                               "".join(json.dumps(h, default=_json_default) + "\n" for h in self.history))

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def ranking_tables(self) -> Tuple[torch.Tensor, torch.Tensor]:
        was = self.model.training
        self.model.eval()
        users, items = self.model.tables()
        self.model.train(was)
        if self.cfg.rank_cosine:
            users, items = F.normalize(users, dim=-1), F.normalize(items, dim=-1)
        return users.detach(), items.detach()

    def evaluate(self, which: str = "select") -> Dict[str, float]:
        users, items = self.ranking_tables()
        if which == "select":
            test, exclude = self.split.select, self.split.select_exclude
        else:
            test, exclude = self.split.test, self.split.test_exclude
        return full_ranking(users, items, test, exclude, ks=self.cfg.topk,
                            item_popularity=self.popularity)

    # -- training -------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> Dict[str, Any]:
        cfg, model = self.cfg, self.model
        from .. import softmax_loss  # (looked up on the package: tests monkeypatch it)

        with torch.no_grad():
            model.eval()
            user_table, item_table = model.tables()
            self.controller.begin_epoch(epoch, user_table.detach(), item_table.detach())
        model.train()
        # The epoch's loss sum stays on the device; off the CPU the finiteness check reads
        # it back once every HOST_CHECK_EVERY steps instead of every step (a host read per
        # step stalls a GPU's launch queue), so a divergence is caught within that many steps.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        rows, checked = 0, 0
        check_every = 1 if self.device.type == "cpu" else HOST_CHECK_EVERY
        from tqdm.auto import tqdm

        bar = tqdm(total=len(self.batches), desc=f"epoch {epoch}", leave=False, unit="batch",
                   disable=not (self.is_main and _progress_enabled(cfg.progress)))
        world, rank = self.world_size, self.rank
        direct_l2 = cfg.l2 > 0 and self._l2_on_leaves()
        need_raw = self.controller.needs_raw_loss  # (global / fixed τ: no raw losses needed)
        for step, (users, pos) in enumerate(self.batches.epoch(self.shuffle_gen), 1):
            # (users, pos) is the global batch, identical on every rank
            if users.numel() < (2 if cfg.sampler in ("in-batch", "mixed") else 1) * world:
                continue  # too small to give every rank its rows (all ranks skip it alike)
            neg, neg_logq = self.sampler.sample(users, pos, self.neg_gen)
            sampled = neg.shared if cfg.sampler == "mixed" else neg  # (for the L2: rows beyond the batch's)
            batch_g = (users, pos, None if cfg.sampler == "in-batch" else sampled)
            if world > 1:  # this rank's rows: rank, rank + world, …
                mine = torch.arange(rank, users.numel(), world, device=users.device)
                if cfg.sampler == "in-batch":  # the other rows of the *global* batch
                    neg = dist.global_in_batch_negatives(pos, mine)
                elif neg is not None and neg.dim() == 2:
                    neg = neg[mine]
                users, pos = users[mine], pos[mine]
            u, item_table, ego_u, ego_i = self.step_module(users)
            if cfg.hard_negatives:
                neg = dataclasses.replace(neg, per_row=hard_negatives(u, item_table, pos, cfg.hard_negatives,
                                                                     self.neg_gen, cfg.normalize))
            pos_scale, neg_scale = self.controller.scales(users)
            out = softmax_loss(u, item_table, pos, neg, pos_scale, neg_scale,
                               include_pos=cfg.include_pos, normalize=cfg.normalize,
                               neg_logq=neg_logq, remove_accidental_hits=cfg.remove_hits,
                               return_raw=need_raw, backend=cfg.backend,
                               item_grad="sparse" if self.sparse else "dense")
            loss, raw = out if need_raw else (out, None)
            if cfg.l2 > 0 and not direct_l2:  # (in-batch: negatives are positives, already counted)
                loss = loss + cfg.l2 * sampled_l2(ego_u, ego_i, users, pos,
                                                  None if cfg.sampler == "in-batch" else sampled)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over ranks here
            add_l2 = add_sparse_sampled_l2_grad_ if self.sparse else add_sampled_l2_grad_
            l2_value = add_l2(cfg.l2, *batch_g, ego_u, ego_i) if direct_l2 else 0.0
            self.optimizer.step()
            if need_raw:
                self.controller.observe(users, raw)
            total += (loss.detach() + l2_value).double() * users.numel()
            rows += users.numel()
            if step % check_every == 0 or step == len(self.batches):
                self._check_finite_loss(total, epoch, checked + 1, step)
                checked = step
            bar.update(1)
        bar.close()
        self._check_finite_loss(total, epoch, checked + 1, len(self.batches))
        return {"loss": float(total) / max(rows, 1)}

    def _check_finite_loss(self, total: torch.Tensor, epoch: int, first: int, last: int) -> None:
        """NonFiniteLossError when the epoch's loss sum so far is NaN or infinite (a host read)."""
        if first > last or bool(torch.isfinite(total)):
            return
        steps = f"step {last}" if first == last else f"steps {first}..{last}"
        raise NonFiniteLossError(
            f"non-finite training loss at epoch {epoch}, {steps} of {len(self.batches)}: "
            f"w0={self.controller.w0:.4g}; try a lower --lr or a larger --tau-value / "
            f"--smoothing. {self._last_good_checkpoint()}")

    def _l2_on_leaves(self) -> bool:
        """True when the L2 tables (layer-0 embeddings) are parameters, so the L2 gradient
        can be added to their ``.grad`` directly (MF and LightGCN)."""
        ego_u, ego_i = self.model.ego()
        params = {id(p) for p in self.model.parameters()}
        return id(ego_u) in params and id(ego_i) in params and ego_u is not ego_i

    def fit(self) -> Dict[str, Any]:
        """Train to the end (or the stop) and return the summary; the run folder's lock is
        released when it returns or raises."""
        try:
            return self._fit()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            write_run_config(self.out, self.cfg, self.split.note, self.dataset)
        ds_stats = self.dataset.stats()
        if self.start_epoch == 0:
            self.log(f"adaptau train: {self.dataset!r}")
            for note in self.dataset.notes:
                self.log(f"  note: {note}")
            self.log(f"  {self.split.note}")
            self.log(f"  model {cfg.model} dim {cfg.dim}, tau {cfg.tau}, sampler {cfg.sampler}"
                     f" ({cfg.negatives if cfg.sampler != 'in-batch' else cfg.batch_size - 1} neg),"
                     f" batch {cfg.batch_size}, lr {cfg.lr}, l2 {cfg.l2}, {len(self.batches)} steps/epoch,"
                     f" device {self.device}, world size {self.world_size} -> {self.out}")
            if self.heap_kept:
                self.log("  host memory: freed heap blocks are kept for reuse (keep_freed_heap;"
                         " ADAPTAU_KEEP_FREED_HEAP=0 turns it off)")
            if not cfg.normalize and cfg.tau != "fixed":
                self.log("  note: --no-normalize with --tau adaptive/global multiplies raw dot products "
                         "by w0; the usual inner-product baseline is --tau fixed --tau-value 1")
        elif self.start_epoch >= cfg.epochs or self.stopping.should_stop:
            return self._already_finished(ds_stats)
        else:
            self.log(f"resuming {self.out} at epoch {self.start_epoch} (of {cfg.epochs})")
        if cpu_capability() is not None:
            self.log(f"  cpu kernels: {cpu_capability()} (ADAPTAU_CPU_CAPABILITY=default|avx2|avx512 forces a level)")
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
            if _snapshot_epochs(epoch):
                self.tau_snapshots[epoch] = self.controller.user_scale.detach().cpu().clone()
            last = epoch + 1 == cfg.epochs
            if (epoch + 1) % cfg.eval_every == 0 or last:
                if self.is_main:
                    t1 = time.time()
                    metrics = self.evaluate("select")
                    rec["metrics"] = metrics
                    rec["eval_seconds"] = round(time.time() - t1, 3)
                    if self.stopping.update(epoch, metrics, metrics[self.metric]):
                        atomic_save({"epoch": epoch, "model": self.model.state_dict(),
                                     "controller": self.controller.state_dict(),
                                     "metrics": metrics, "config": dataclasses.asdict(cfg)},
                                    self.out / "best.pt")
            self.history.append(rec)
            self._save_last(epoch + 1)  # collective; rank 0 writes
            if self.is_main:
                _append_line(self.out / "metrics.jsonl", json.dumps(rec, default=_json_default))
                self.log(epoch_line(rec, self.stopping.best))
            stop = self.stopping.should_stop
            if self.world_size > 1:
                flag = torch.tensor([int(stop)], device=self.device)
                torch.distributed.broadcast(flag, 0)
                stop = bool(flag.item())
            if stop:
                self.log(f"early stop: {self.metric} did not improve for {cfg.patience} evaluations "
                         f"(best {self.stopping.best['value']:.4f} at epoch {self.stopping.best['epoch']})")
                self.status = "early-stopped"
                break
        else:
            self.status = "completed"
        return self._finish(ds_stats, stopped)

    def _already_finished(self, ds_stats: Dict[str, Any]) -> Dict[str, Any]:
        """A resumed run whose budget is spent (or that stopped early): nothing is trained,
        and its summary.json is kept as it is (written anew only when it is missing)."""
        self.status = "completed" if self.start_epoch >= self.cfg.epochs else "early-stopped"
        summary_path = self.out / "summary.json"
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            summary = None
        if not isinstance(summary, dict):
            return self._finish(ds_stats, None)
        self.log(f"{self.out} has finished ({summary.get('status', self.status)} after "
                 f"{self.start_epoch} epochs): nothing to train; raise --epochs (or --patience) "
                 "to continue it")
        return summary if self.is_main else {}

    def _finish(self, ds_stats: Dict[str, Any], stopped: Optional[str]) -> Dict[str, Any]:
        cfg = self.cfg
        if not self.is_main:
            return {}
        valid = test = None
        best_epoch = None
        if self.stopping.best is not None:
            best_epoch = self.stopping.best["epoch"]
            ckpt = load_checkpoint(self.out / "best.pt", self.device, cfg=self.cfg, model=self.model)
            current = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(ckpt["model"])
            valid = ckpt["metrics"]
            test = self.evaluate("test") if self.split.select_name != "test" else dict(valid)
            self.model.load_state_dict(current)
        epochs_run = len(self.history)
        summary = {
            "status": self.status,
            "epoch_numbering": "epochs count from 0: best_epoch 0 is the first epoch",
            "message": stopped,
            "protocol": cfg.protocol,
            "protocol_note": self.split.note,
            "selection_split": self.split.select_name,
            "selection_metric": self.metric,
            "best_epoch": best_epoch,
            "valid": valid,
            "test": test,
            "epochs_run": epochs_run,
            "seconds_per_epoch": self.train_seconds / max(1, epochs_run),
            "train_seconds": self.train_seconds,
            "world_size": self.world_size,
            "global_batch": cfg.batch_size,
            "rows_per_rank": -(-cfg.batch_size // self.world_size),
            "device": str(self.device),
            "backend": self.backend_used,
            "dataset": ds_stats,
            "final_w0": float(self.controller.w0),
            "final_tau": self.controller.summary(),
        }
        _atomic_write_text(self.out / "summary.json", _dumps(summary))
        try:
            plots.run_plots(self.history, self.metric, self.tau_snapshots,
                            self.controller.user_scale.cpu(), self.activity, self.out)
        except Exception as exc:  # plots are a convenience; never lose a run over them
            self.log(f"warning: plotting failed: {exc!r}")
        if test is not None:
            rows = {self.split.select_name: valid}
            if self.split.select_name != "test":
                rows["test"] = test
            self.log(f"best epoch {best_epoch} (selected on {self.split.select_name} by {self.metric}); "
                     f"{summary['seconds_per_epoch']:.2f} s/epoch, backend {self.backend_used}")
            self.log(format_metrics(rows, cfg.topk))
            if cfg.protocol == "paper":
                self.log("NOTE: paper protocol — the epoch was selected on the test split.")
        self.log(f"run folder: {self.out}")
        return summary

def train(cfg: TrainConfig, *, resume: Optional[str] = None, log=print,
          overwrite: bool = False) -> Dict[str, Any]:
    """Train a run (or continue ``resume``; ``overwrite`` replaces a run in ``cfg.out``)
    and return its summary."""
    return Trainer(cfg, resume=resume, log=log, overwrite=overwrite).fit()


def evaluate_run(run: str, *, checkpoint: str = "best", log=print,
                 data: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Re-evaluate a saved run folder: its ``best.pt`` (or ``last.pt``) on the selection
    split and on test. Writes ``eval.json`` into the folder and returns the metrics."""
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
    trainer.model = build_model(cfg.model, trainer.dataset.num_users, trainer.dataset.num_items,
                                trainer.split.train, dim=cfg.dim, dropout=cfg.dropout,
                                layers=cfg.layers, init_std=cfg.init_std).to(trainer.device)
    ckpt = load_checkpoint(ckpt_path, trainer.device, cfg=cfg, model=trainer.model)
    trainer.model.load_state_dict(ckpt["model"])
    t0 = time.time()
    rows = {trainer.split.select_name: trainer.evaluate("select")}
    if trainer.split.select_name != "test":
        rows["test"] = trainer.evaluate("test")
    result = {"checkpoint": str(ckpt_path), "epoch": ckpt.get("epoch"), "protocol": cfg.protocol,
              "metrics": rows, "seconds": time.time() - t0}
    _atomic_write_text(run_dir / "eval.json", _dumps(result))
    when = (f"after {ckpt.get('epoch')} epochs" if checkpoint == "last"
            else f"best epoch {ckpt.get('epoch')}")
    log(f"{ckpt_path} ({when}, {cfg.protocol} protocol, ranked by "
        f"{'cosine' if cfg.rank_cosine else 'dot product'})")
    log(format_metrics(rows, cfg.topk))
    return rows
