"""The trainer: config, the training loop, checkpoints, the run folder.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as dist
from .data import Dataset, Split, csr_pairs, load_dataset, prepare
from .evaluate import format_metrics, full_ranking, item_popularity
from .models import add_row_l2_grad_, build_model, sampled_item_counts, sampled_l2
from .sampling import SAMPLERS, BatchIterator, NegativeSampler
from ..loss.ops import compact as adaptau_compact
from ..loss.ops import cpu_capability

__all__ = ["TrainConfig", "PRESETS", "Trainer", "train", "evaluate_run", "NonFiniteLossError",
           "load_config_file", "atomic_save", "keep_freed_heap"]


# ------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Every knob of a run. Field names match the CLI flags (``--batch-size`` → batch_size)."""

    data: Optional[str] = None            # path, dataset name, or None = embedded synthetic
    protocol: str = "clean"               # "clean" | "paper"
    model: str = "mf"                     # "mf" | "lightgcn"
    layers: int = 3                       # LightGCN propagation layers
    dim: int = 64
    dropout: float = 0.0                  # MF: dropout on the user rows of a batch
    init_std: float = 0.1
    tau: str = "adaptive"                 # "adaptive" | "global" | "fixed"
    tau_value: float = 0.1                # the temperature of --tau fixed
    normalize: bool = True                # False: inner-product scores (baseline)
    rank: str = "auto"                    # ranking scores: "cosine" | "dot" | "auto" (= training)
    negatives: int = 128
    sampler: str = "uniform"
    pop_gamma: float = 0.75               # popularity sampler exponent
    include_pos: bool = False
    remove_hits: bool = False
    backend: str = "auto"
    batch_size: int = 1024
    lr: float = 1e-2
    l2: float = 1e-6
    sparse_grad: str = "off"              # MF only: "sparse-adam" | "adagrad" update the touched rows
    epochs: int = 20
    patience: int = 5                     # evaluations without improvement before stopping (0: off;
                                          # with tau adaptive/global, none during the warm-up)
    eval_every: int = 1
    topk: List[int] = field(default_factory=lambda: [20])
    metric: Optional[str] = None          # selection metric, default recall@<first topk>
    seed: int = 2023
    device: str = "auto"
    warmup: int = 5
    base: Union[str, float] = "mean"
    smoothing: float = 1.0
    active_quantile: float = 0.2
    valid_fraction: float = 0.1
    name: Optional[str] = None
    out: Optional[str] = None
    progress: str = "auto"                # "auto" | "on" | "off"

    @classmethod
    def fields(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def update(self, values: Dict[str, Any], where: str = "config") -> "TrainConfig":
        known = set(self.fields())
        for key, value in values.items():
            k = key.replace("-", "_")
            if k not in known:
                raise ValueError(f"{where}: unknown setting {key!r}; known: {sorted(known)}")
            if k == "topk" and isinstance(value, (int, str)):
                value = [int(v) for v in str(value).split(",")]
            if k == "base" and isinstance(value, str) and value != "mean":
                value = float(value)
            setattr(self, k, value)
        return self

    def validate(self) -> None:
        if self.protocol not in ("clean", "paper"):
            raise ValueError(f"--protocol must be clean or paper, got {self.protocol!r}")
        if self.model not in ("mf", "lightgcn"):
            raise ValueError(f"--model must be mf or lightgcn, got {self.model!r}")
        if self.tau not in ("adaptive", "global", "fixed"):
            raise ValueError(f"--tau must be adaptive, global or fixed, got {self.tau!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.rank not in ("auto", "cosine", "dot"):
            raise ValueError(f"--rank must be auto, cosine or dot, got {self.rank!r}")
        for name in ("dim", "batch_size", "epochs", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.l2 < 0:
            raise ValueError(f"--l2 must be >= 0, got {self.l2}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.sparse_grad not in SPARSE_OPTIMIZERS:
            raise ValueError(f"--sparse-grad must be one of {SPARSE_OPTIMIZERS}, got {self.sparse_grad!r}")
        if self.sparse_grad != "off" and self.model != "mf":
            raise ValueError("--sparse-grad is for MF: LightGCN propagates over the whole graph, so "
                             "its table gradients are dense (it trains with dense Adam)")
        if self.sampler == "in-batch" and self.batch_size < 2:
            raise ValueError("--sampler in-batch needs --batch-size >= 2")
        if not self.topk or min(self.topk) < 1:
            raise ValueError(f"--topk must be positive, got {self.topk}")

    @property
    def selection_metric(self) -> str:
        return self.metric or f"recall@{self.topk[0]}"

    @property
    def rank_cosine(self) -> bool:
        return self.normalize if self.rank == "auto" else self.rank == "cosine"


#: Hyper-parameters of the paper's Gowalla runs (../shared/data/README.md). The epoch
#: budget / patience are ours (the paper's logs ran 309–366 epochs for MF, 142–152 for
#: LightGCN with early stopping).
PRESETS: Dict[str, Dict[str, Any]] = {
    "gowalla-mf-paper": dict(
        data="gowalla", protocol="paper", model="mf", dim=64, batch_size=2048, negatives=1024,
        sampler="uniform", lr=1e-4, l2=1e-9, dropout=0.1, tau="adaptive", warmup=100, base=0.9,
        smoothing=0.25, epochs=1000, eval_every=5, patience=10, topk=[20], rank="cosine"),
    "gowalla-lightgcn-paper": dict(
        data="gowalla", protocol="paper", model="lightgcn", layers=3, dim=64, batch_size=2048,
        sampler="in-batch", lr=1e-3, l2=1e-5, tau="adaptive", warmup=100, base="mean",
        smoothing=0.6, epochs=1000, eval_every=5, patience=10, topk=[20], rank="dot"),
}


def load_config_file(path: str) -> Dict[str, Any]:
    """A YAML or JSON mapping of config fields."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = p.read_text()
    if p.suffix == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(values).__name__}")
    return values


# ---------------------------------------------------------------------------- utilities
class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


#: The files a run writes into its folder (``--overwrite`` removes exactly these).
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "train.log",
             "eval.json", "curves.png", "tau_hist.png", "tau_activity.png")


class _RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock`` for the life of the trainer (the OS drops
    it when the process dies, so a killed run never leaves the folder locked)."""

    def __init__(self, folder: Path) -> None:
        import fcntl

        self.path = Path(folder) / ".lock"
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "?"
            self._fh.close()
            raise ValueError(f"{folder} is in use by another adaptau run (pid {holder}); "
                             "wait for it, or choose another --out") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(str(os.getpid()))
        self._fh.flush()
        for stale in Path(folder).glob(".*.tmp-*"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        """Drop the lock (closing the file does); idempotent."""
        if not self._fh.closed:
            self._fh.close()


#: ``--sparse-grad`` values: off (dense gradients, Adam) or the optimizer of sparse ones.
SPARSE_OPTIMIZERS = ("off", "sparse-adam", "adagrad")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely (corrupt, truncated, or holding objects
    other than tensors and plain Python values)."""


def load_checkpoint(path: Path, device: Union[str, torch.device] = "cpu", *,
                    cfg: Optional["TrainConfig"] = None,
                    model: Optional[torch.nn.Module] = None) -> Dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``: tensors and plain Python
    values only, so a run folder from someone else cannot execute code when loaded. With
    ``cfg`` and ``model``, also :func:`check_checkpoint_fits` it to them.

    Raises:
        CheckpointError: the file is corrupt, truncated, holds anything else, or was
            written for another model (one line, naming the file).
    """
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, RuntimeError (zip) ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: cannot be read as an adaptau checkpoint (tensors and "
                              f"plain values only): {type(exc).__name__}: {first}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an adaptau checkpoint (no 'model' entry)")
    if cfg is not None and model is not None:
        check_checkpoint_fits(ckpt, path, cfg, model)
    return ckpt


def check_checkpoint_fits(ckpt: Dict[str, Any], path: Path, cfg: "TrainConfig",
                          model: torch.nn.Module) -> None:
    """CheckpointError (one line) when ``ckpt`` was written for another model: another
    model, dim or (LightGCN) layers in its config, or other tensor names or shapes."""
    saved = ckpt.get("config") or {}
    fields = ("model", "dim") + (("layers",) if cfg.model == "lightgcn" else ())
    differ = [f"{k}={saved.get(k)!r} (this run: {getattr(cfg, k)!r})" for k in fields
              if k in saved and saved[k] != getattr(cfg, k)]
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}
    if not differ and mine != theirs:
        bad = sorted(set(mine) ^ set(theirs)) or [k for k in mine if mine[k] != theirs.get(k)]
        differ = [f"tensor {bad[0]}: {theirs.get(bad[0])} in the file, {mine.get(bad[0])} here"]
    if differ:
        raise CheckpointError(f"{path}: written for another model: {'; '.join(differ)}")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _numpy_state_plain(state: tuple) -> list:
    """numpy's legacy RNG state with its key array as a tensor (weights_only can load it)."""
    name, keys, pos, has_gauss, gauss = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
            float(gauss)]


def _numpy_state_from_plain(state: list) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=_json_default)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return dev


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


# ------------------------------------------------------------------------ host memory
def keep_freed_heap(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of handing it back to
    the OS; returns True when applied, False where the C library is not glibc.

    A CPU training step allocates and frees the same multi-megabyte blocks every time (the
    ``[B, M]`` negatives, the dense user-table gradient, the L2 rows, ...). With glibc's
    defaults a freed block above the mmap threshold is unmapped and the top of the heap is
    trimmed, so the next step page-faults the same memory in again: about 800 page faults
    per step at the paper's MF shape, ~1 s of an epoch. This sets (``mallopt(3)``)
    ``M_MMAP_THRESHOLD`` to ``mmap_threshold`` bytes (allocations below it come from the
    heap) and ``M_TRIM_THRESHOLD`` to ``trim_threshold`` bytes (free heap memory up to it
    stays mapped): ~65 faults per step. It affects the whole process, which then keeps
    its peak heap resident (as jemalloc or tcmalloc do, which PyTorch's CPU tuning guide
    suggests preloading instead). The :class:`Trainer` calls it on CPU unless the
    environment sets ``ADAPTAU_KEEP_FREED_HEAP=0``.
    """
    import ctypes
    import platform

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, int(mmap_threshold))) and bool(
        libc.mallopt(m_trim_threshold, int(trim_threshold)))


# ------------------------------------------------------------------------------ trainer
class Trainer:
    """One run. ``Trainer(cfg).fit()`` trains and returns the summary dict.

    ``resume``: a run folder whose ``last.pt`` is continued (same optimizer, RNG and
    controller state); ``cfg.epochs`` may be raised to train further. ``overwrite``: replace
    the run files of a ``cfg.out`` that already holds a run (else that is a ValueError).
    """

    def __init__(self, cfg: TrainConfig, *, resume: Optional[str] = None, log=print,
                 dataset: Optional[Dataset] = None, overwrite: bool = False) -> None:
        cfg.validate()
        self.cfg = cfg
        self.log_fn = log
        # torchrun workers (WORLD_SIZE > 1) join the group here: gloo on CPU, NCCL on CUDA
        self.device = dist.init_from_env(_resolve_device(cfg.device))
        self.rank, self.world_size = _dist_info()
        self.is_main = self.rank == 0
        # reuse freed host memory instead of page-faulting it in again every step
        self.heap_kept = (self.device.type == "cpu" and os.environ.get("ADAPTAU_KEEP_FREED_HEAP") != "0"
                          and keep_freed_heap())

        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2 ** 32))
        torch.manual_seed(cfg.seed)

        t0 = time.time()
        self.dataset = dataset if dataset is not None else load_dataset(cfg.data, seed=cfg.seed)
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
        # the backbone's part of a step; DistributedDataParallel when world_size > 1
        # (which also broadcasts rank 0's initial weights)
        self.step_module = dist.wrap_model(dist.StepModule(self.model), self.device)
        self.sparse = cfg.sparse_grad != "off"
        if self.sparse and self.world_size > 1:
            raise ValueError("--sparse-grad runs in one process (DDP all-reduces dense gradients)")
        self.model.sparse = self.sparse
        if cfg.sparse_grad == "sparse-adam":
            self.optimizer = torch.optim.SparseAdam(list(self.model.parameters()), lr=cfg.lr)
        elif cfg.sparse_grad == "adagrad":
            self.optimizer = torch.optim.Adagrad(self.model.parameters(), lr=cfg.lr)
        else:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr,
                                              **({"fused": True} if self.device.type in ("cpu", "cuda") else {}))
        from ..loss.temperature import AdapTau

        self.controller = AdapTau(self.train_users, self.train_items, num_users=self.num_users,
                                  num_items=self.num_items, mode=cfg.tau, tau=cfg.tau_value,
                                  base=cfg.base, smoothing=cfg.smoothing, warmup=cfg.warmup,
                                  active_quantile=cfg.active_quantile)
        self.sampler = NegativeSampler(cfg.sampler, self.num_items, cfg.negatives, train=sp_.train,
                                       gamma=cfg.pop_gamma, device=self.device)
        # global batches of cfg.batch_size rows, the same on every rank (shared seed); each
        # rank keeps rows rank, rank + world_size, … of each (see _train_epoch)
        self.batches = BatchIterator(self.train_users, self.train_items, cfg.batch_size,
                                     drop_last=cfg.sampler == "in-batch" and
                                     self.train_users.numel() >= cfg.batch_size)
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        self.shuffle_gen = torch.Generator(device=gen_device).manual_seed(cfg.seed)
        # negatives are drawn for the whole global batch from one stream shared by all ranks
        self.neg_gen = torch.Generator(device=gen_device).manual_seed(cfg.seed + 7919)

        self.start_epoch = 0
        self.history: List[Dict[str, Any]] = []
        self.best: Optional[Dict[str, Any]] = None
        self.bad_evals = 0
        # Evaluations of warm-up epochs do not count towards patience: the Adap-τ rule
        # (adaptive / global) only starts setting the temperatures after the warm-up, so a
        # run must not stop before it has seen them act.
        self._patience_from = cfg.warmup if cfg.tau in ("adaptive", "global") else 0
        self.train_seconds = 0.0
        self.tau_snapshots: Dict[int, torch.Tensor] = {}
        self.backend_used: Optional[str] = None
        self.status = "running"

        self._overwrite = overwrite
        self.out = self._run_folder(resume)
        self._lock = _RunLock(self.out) if self.is_main else None
        if overwrite and not resume and self.is_main:
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
        if resume:
            self._load_last()
        self.metric = cfg.selection_metric

    # -- folders and logging ------------------------------------------------------------
    def _default_name(self) -> str:
        cfg = self.cfg
        base = f"{self.dataset.name}-{cfg.model}-{cfg.tau}"
        return base if cfg.protocol == "clean" else base + "-paper"

    def _run_folder(self, resume: Optional[str]) -> Path:
        if resume:
            out = Path(resume)
            if not (out / "last.pt").is_file():
                raise FileNotFoundError(f"--resume {resume}: no last.pt in that folder")
            return out
        if self.world_size > 1:  # rank 0 picks the folder (the default name probes the disk)
            out = Path(dist.broadcast_object(str(self._new_run_folder()) if self.is_main else None))
            if self.is_main:
                out.mkdir(parents=True, exist_ok=True)
            return out
        out = self._new_run_folder()
        used = [f for f in RUN_FILES if (out / f).exists()]
        if used and not self._overwrite:
            raise ValueError(f"--out {out} already holds a run ({', '.join(used)}): continue it "
                             f"with --resume {out}, replace it with --overwrite, or choose "
                             "another --out")
        out.mkdir(parents=True, exist_ok=True)
        return out

    def _new_run_folder(self) -> Path:
        if self.cfg.out:
            out = Path(self.cfg.out)
        else:
            out = Path("runs") / (self.cfg.name or self._default_name())
            if (out / "last.pt").exists() or (out / "config.json").exists():
                k = 1
                while Path(f"{out}-{k}").exists():
                    k += 1
                out = Path(f"{out}-{k}")
        return out

    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        self.log_fn(msg)
        with open(self.out / "train.log", "a") as fh:
            fh.write(msg + "\n")

    # -- state ----------------------------------------------------------------------------
    def _rng_state(self) -> Dict[str, Any]:
        state = {
            "shuffle_gen": self.shuffle_gen.get_state(),
            "neg_gen": self.neg_gen.get_state(),
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_plain(np.random.get_state()),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: Dict[str, Any]) -> None:
        self.shuffle_gen.set_state(state["shuffle_gen"])
        self.neg_gen.set_state(state["neg_gen"])
        torch.set_rng_state(state["torch"])
        np.random.set_state(_numpy_state_from_plain(state["numpy"]))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def _check_finite_weights(self, epoch: int) -> None:
        """NonFiniteLossError when a parameter holds NaN or infinity after an epoch (the
        optimizer's last step can diverge after the last finite loss): such weights are
        never written to last.pt or best.pt."""
        for name, value in self.model.named_parameters():
            if not bool(torch.isfinite(value.detach()).all()):
                raise NonFiniteLossError(
                    f"non-finite weights in {name} after epoch {epoch}; try a lower --lr. "
                    f"The last good checkpoint is {self.out / 'last.pt'}")

    def _save_last(self, epoch_done: int) -> None:
        """Write last.pt on rank 0. Collective when world_size > 1: call it on every rank."""
        controller = self.controller.state_dict()
        if self.world_size > 1:  # the epoch's per-user loss sums of every rank, reduced
            for key in ("loss_sum", "loss_count"):
                controller[key] = dist.all_reduce_sum(
                    getattr(self.controller, "_" + key)).detach().cpu()
        if not self.is_main:
            return
        atomic_save({
            "epoch": epoch_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "controller": controller,
            "rng": self._rng_state(),
            "world_size": self.world_size,
            "history": self.history,
            "best": self.best,
            "bad_evals": self.bad_evals,
            "train_seconds": self.train_seconds,
            "tau_snapshots": self.tau_snapshots,
            "config": dataclasses.asdict(self.cfg),
        }, self.out / "last.pt")

    def _load_last(self) -> None:
        ckpt = load_checkpoint(self.out / "last.pt", self.device, cfg=self.cfg, model=self.model)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.controller.load_state_dict(ckpt["controller"])
        if self.rank != 0:  # rank 0 holds the saved (already reduced) sums; the next
            self.controller._loss_sum.zero_()    # begin_epoch all-reduces them
            self.controller._loss_count.zero_()
        self._set_rng_state(ckpt["rng"])
        self.start_epoch = int(ckpt["epoch"])
        self.history = list(ckpt["history"])
        self.best = ckpt["best"]
        self.bad_evals = int(ckpt["bad_evals"])
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
        from ..loss import ops

        with torch.no_grad():
            model.eval()
            user_table, item_table = model.tables()
            self.controller.begin_epoch(epoch, user_table.detach(), item_table.detach())
        model.train()
        if self.backend_used is None:
            self.backend_used = ops._resolve_backend(cfg.backend, self.device.type)
        total, rows = 0.0, 0
        from tqdm.auto import tqdm

        bar = tqdm(total=len(self.batches), desc=f"epoch {epoch}", leave=False, unit="batch",
                   disable=not (self.is_main and _progress_enabled(cfg.progress)))
        world, rank = self.world_size, self.rank
        direct_l2 = cfg.l2 > 0 and self._l2_on_leaves()
        need_raw = self.controller.needs_raw_loss  # (global / fixed τ: no raw losses needed)
        for users, pos in self.batches.epoch(self.shuffle_gen):
            # (users, pos) is the global batch, identical on every rank
            if users.numel() < (2 if cfg.sampler == "in-batch" else 1) * world:
                continue  # too small to give every rank its rows (all ranks skip it alike)
            neg, neg_logq = self.sampler.sample(users, pos, self.neg_gen)
            batch_g = (users, pos, None if cfg.sampler == "in-batch" else neg)
            if world > 1:  # this rank's rows: rank, rank + world, …
                mine = torch.arange(rank, users.numel(), world, device=users.device)
                if cfg.sampler == "in-batch":  # the other rows of the *global* batch
                    neg = dist.global_in_batch_negatives(pos, mine)
                elif neg is not None and neg.dim() == 2:
                    neg = neg[mine]
                users, pos = users[mine], pos[mine]
            u, item_table, ego_u, ego_i = self.step_module(users)
            pos_scale, neg_scale = self.controller.scales(users)
            out = softmax_loss(u, item_table, pos, neg, pos_scale, neg_scale,
                               include_pos=cfg.include_pos, normalize=cfg.normalize,
                               neg_logq=neg_logq, remove_accidental_hits=cfg.remove_hits,
                               return_raw=need_raw, backend=cfg.backend,
                               item_grad="sparse" if self.sparse else "dense")
            loss, raw = out if need_raw else (out, None)
            if cfg.l2 > 0 and not direct_l2:  # (in-batch: negatives are positives, already counted)
                loss = loss + cfg.l2 * sampled_l2(ego_u, ego_i, users, pos,
                                                  None if cfg.sampler == "in-batch" else neg)
            if not bool(torch.isfinite(loss.detach())):
                raise NonFiniteLossError(
                    f"non-finite training loss ({float(loss.detach())}) at epoch {epoch}, step {bar.n}: "
                    f"w0={self.controller.w0:.4g}; try a lower --lr or a larger --tau-value / "
                    f"--smoothing. The last good checkpoint is {self.out / 'last.pt'}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over ranks here
            add_l2 = self._add_sparse_l2_grad if self.sparse else self._add_l2_grad
            l2_value = add_l2(*batch_g, ego_u, ego_i) if direct_l2 else 0.0
            self.optimizer.step()
            if need_raw:
                self.controller.observe(users, raw)
            total += (float(loss.detach()) + l2_value) * users.numel()
            rows += users.numel()
            bar.update(1)
        bar.close()
        return {"loss": total / max(rows, 1)}

    def _l2_on_leaves(self) -> bool:
        """True when the L2 tables (layer-0 embeddings) are parameters, so the L2 gradient
        can be added to their ``.grad`` directly (MF and LightGCN)."""
        ego_u, ego_i = self.model.ego()
        params = {id(p) for p in self.model.parameters()}
        return id(ego_u) in params and id(ego_i) in params and ego_u is not ego_i

    @torch.no_grad()
    def _add_l2_grad(self, users: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor],
                     user_w: torch.Tensor, item_w: torch.Tensor) -> float:
        """Add the gradient of ``l2 · sampled_l2(...)`` of the *global* batch to the tables'
        ``.grad`` (after backward, so after DDP's all-reduce: every rank adds the same) and
        return its value. Same formula as :func:`adaptau.train.models.sampled_l2`, without the
        autograd graph: ``0.5·(Σ‖U[u]‖² + Σ_items count·‖I‖²)/B`` with the item counts of
        :func:`adaptau.train.models.sampled_item_counts`."""
        c = self.cfg.l2 / users.numel()
        counts = sampled_item_counts(pos, neg, item_w.shape[0], torch.int64)
        idx = users.long()
        u_rows = user_w.index_select(0, idx)
        for w in (user_w, item_w):
            if w.grad is None:
                w.grad = torch.zeros_like(w)
        user_w.grad.index_add_(0, idx, u_rows, alpha=c)
        item_value = add_row_l2_grad_(item_w.grad, item_w, counts, c)  # one pass over the table
        return 0.5 * c * (float(u_rows.pow(2).sum()) + item_value)

    @torch.no_grad()
    def _add_sparse_l2_grad(self, users: torch.Tensor, pos: torch.Tensor,
                            neg: Optional[torch.Tensor], user_w: torch.Tensor,
                            item_w: torch.Tensor) -> float:
        """:meth:`_add_l2_grad` for sparse gradients (``--sparse-grad``): the same value and
        gradient, added as sparse rows of the batch's users and touched items only."""
        c = self.cfg.l2 / users.numel()
        ids, pos_local, neg_local = adaptau_compact(pos, neg, num_items=item_w.shape[0])
        counts = sampled_item_counts(pos_local, neg_local, ids.numel(), item_w.dtype)
        idx = users.long()
        u_rows = user_w.index_select(0, idx)
        i_rows = item_w.index_select(0, ids)
        for w, index, values in ((user_w, idx, u_rows * c), (item_w, ids, i_rows * (c * counts[:, None]))):
            extra = torch.sparse_coo_tensor(index.unsqueeze(0), values, w.shape, check_invariants=False)
            w.grad = extra if w.grad is None else w.grad + extra
        return 0.5 * c * (float(u_rows.pow(2).sum()) + float((i_rows.pow(2).sum(1) * counts).sum()))

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
            self._write_config()
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
                    value = metrics[self.metric]
                    if self.best is None or value > self.best["value"]:
                        self.best = {"epoch": epoch, "value": value, "metrics": metrics}
                        self.bad_evals = 0
                        atomic_save({"epoch": epoch, "model": self.model.state_dict(),
                                     "controller": self.controller.state_dict(),
                                     "metrics": metrics, "config": dataclasses.asdict(cfg)},
                                    self.out / "best.pt")
                    elif epoch >= self._patience_from:
                        self.bad_evals += 1
            self.history.append(rec)
            self._save_last(epoch + 1)  # collective; rank 0 writes
            if self.is_main:
                with open(self.out / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(rec, default=_json_default) + "\n")
                self.log(self._epoch_line(rec))
            stop = cfg.patience > 0 and self.bad_evals >= cfg.patience
            if self.world_size > 1:
                flag = torch.tensor([int(stop)], device=self.device)
                torch.distributed.broadcast(flag, 0)
                stop = bool(flag.item())
            if stop:
                self.log(f"early stop: {self.metric} did not improve for {cfg.patience} evaluations "
                         f"(best {self.best['value']:.4f} at epoch {self.best['epoch']})")
                self.status = "early-stopped"
                break
        else:
            self.status = "completed"
        return self._finish(ds_stats, stopped)

    def _epoch_line(self, rec: Dict[str, Any]) -> str:
        parts = [f"epoch {rec['epoch']:4d}", f"loss {rec['loss']:.4f}", f"w0 {rec['w0']:.3g}",
                 f"tau {rec['tau_min']:.3g}..{rec['tau_max']:.3g} (med {rec['tau_median']:.3g})"]
        if "metrics" in rec:
            m = rec["metrics"]
            shown = [k for k in m if k.split("@")[0] in ("recall", "ndcg")]
            parts.append(" ".join(f"{k} {m[k]:.4f}" for k in shown)
                         + (" *" if self.best and self.best["epoch"] == rec["epoch"] else ""))
        parts.append(f"{rec['seconds']:.1f}s")
        return " | ".join(parts)

    def _write_config(self) -> None:
        cfg = dataclasses.asdict(self.cfg)
        from .. import __version__

        payload = {**cfg, "_protocol_note": self.split.note, "_dataset": self.dataset.stats(),
                   "_adaptau_version": __version__, "_torch_version": torch.__version__}
        _atomic_write_text(self.out / "config.json", _dumps(payload))
        for side, ids in (("users", self.dataset.user_ids), ("items", self.dataset.item_ids)):
            if ids is not None and not (self.out / f"{side}.tsv").exists():
                _atomic_write_text(self.out / f"{side}.tsv",
                                   "index\tid\n" + "".join(f"{k}\t{x}\n" for k, x in enumerate(ids)))

    def _finish(self, ds_stats: Dict[str, Any], stopped: Optional[str]) -> Dict[str, Any]:
        cfg = self.cfg
        if not self.is_main:
            return {}
        valid = test = None
        best_epoch = None
        if self.best is not None:
            best_epoch = self.best["epoch"]
            ckpt = load_checkpoint(self.out / "best.pt", self.device, cfg=self.cfg, model=self.model)
            current = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(ckpt["model"])
            valid = ckpt["metrics"]
            test = self.evaluate("test") if self.split.select_name != "test" else dict(valid)
            self.model.load_state_dict(current)
        epochs_run = len(self.history)
        summary = {
            "status": self.status,
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
            self._plots()
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

    def _plots(self) -> None:
        from . import plots

        if self.history:
            plots.training_curves(self.history, self.metric, self.out / "curves.png")
        snaps = dict(self.tau_snapshots)
        snaps[self.history[-1]["epoch"] if self.history else 0] = self.controller.user_scale.cpu()
        plots.tau_histograms({k: v.numpy() for k, v in snaps.items()}, self.out / "tau_hist.png")
        plots.tau_vs_activity(self.controller.user_scale.cpu().numpy(), self.activity,
                              self.out / "tau_activity.png",
                              self.history[-1]["epoch"] if self.history else None)


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
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--run {run}: no config.json (is it a run folder?)")
    values = {k: v for k, v in json.loads(cfg_path.read_text()).items() if not k.startswith("_")}
    cfg = TrainConfig().update(values)
    if data is not None:
        cfg.data = data
    ckpt_path = run_dir / f"{checkpoint}.pt"
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path} not found")
    cfg.out = str(run_dir)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = cfg
    trainer.device = _resolve_device(cfg.device)
    trainer.dataset = load_dataset(cfg.data, seed=cfg.seed)
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
