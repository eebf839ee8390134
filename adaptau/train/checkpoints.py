"""Checkpoints: :class:`Checkpointer` (a run's ``last.pt`` and ``best.pt``), read safely
(tensors and plain values only), checked against the model they are loaded into, and the
RNG states in a form ``weights_only`` loading accepts; :func:`save_run_state` and
:func:`resume_run_state` write and restore a trainer's whole state through them."""

from __future__ import annotations

from pathlib import Path
import dataclasses
import random
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import distributed as dist

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "load_checkpoint",
    "check_checkpoint_fits",
    "rng_state",
    "set_rng_state",
    "save_run_state",
    "resume_run_state",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely (corrupt, truncated, or holding objects
    other than tensors and plain Python values)."""


def load_checkpoint(
    path: Path,
    device: Union[str, torch.device] = "cpu",
    *,
    cfg: Optional["TrainConfig"] = None,
    model: Optional[torch.nn.Module] = None,
) -> Dict[str, Any]:
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
        raise CheckpointError(
            f"{path}: cannot be read as an adaptau checkpoint (tensors and "
            f"plain values only): {type(exc).__name__}: {first}"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an adaptau checkpoint (no 'model' entry)")
    if cfg is not None and model is not None:
        check_checkpoint_fits(ckpt, path, cfg, model)
    return ckpt


def check_checkpoint_fits(
    ckpt: Dict[str, Any], path: Path, cfg: "TrainConfig", model: torch.nn.Module
) -> None:
    """CheckpointError (one line) when ``ckpt`` was written for another model: another
    model, dim or (LightGCN) layers in its config, or other tensor names or shapes."""
    saved = ckpt.get("config") or {}
    fields = ("model", "dim") + (("layers",) if cfg.model == "lightgcn" else ())
    differ = [
        f"{k}={saved.get(k)!r} (this run: {getattr(cfg, k)!r})"
        for k in fields
        if k in saved and saved[k] != getattr(cfg, k)
    ]
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}
    if not differ and mine != theirs:
        bad = sorted(set(mine) ^ set(theirs)) or [k for k in mine if mine[k] != theirs.get(k)]
        differ = [f"tensor {bad[0]}: {theirs.get(bad[0])} in the file, {mine.get(bad[0])} here"]
    if differ:
        raise CheckpointError(f"{path}: written for another model: {'; '.join(differ)}")


def _numpy_state_plain(state: tuple) -> list:
    """numpy's legacy RNG state with its key array as a tensor (weights_only can load it)."""
    name, keys, pos, has_gauss, gauss = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)]


def _numpy_state_from_plain(state: list) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)


def rng_state(*generators: torch.Generator) -> Dict[str, Any]:
    """Every random stream a run draws from, as tensors and plain values: the trainer's
    ``generators`` (shuffling, negatives), torch's, numpy's, Python's and CUDA's."""
    state = {
        "generators": [g.get_state() for g in generators],
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_plain(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], *generators: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved (the same generators, in the same order; a state
    saved with ``shuffle_gen``/``neg_gen`` keys is read too)."""
    saved = state.get("generators") or [state["shuffle_gen"], state["neg_gen"]]
    for g, s in zip(generators, saved):
        g.set_state(s)
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """A run's checkpoints in its ``folder``, written atomically
    (:func:`adaptau.train.run_folder.atomic_save`) and read with :func:`load_checkpoint`,
    checked against ``cfg`` and the model they are loaded into.

    * ``last.pt`` — everything a resumed run continues from: ``epoch`` (epochs done),
      ``model``, ``optimizer``, ``controller``, ``rng`` (:func:`rng_state`),
      ``world_size``, ``history`` (the epoch records), ``best`` / ``bad_evals`` (the early
      stopping state), ``train_seconds``, ``tau_snapshots`` and ``config``.
    * ``best.pt`` — the best evaluation so far: ``epoch``, ``model``, ``controller``,
      ``metrics`` and ``config``.

    The caller decides which rank writes (rank 0).
    """

    def __init__(self, folder: Path, cfg: "TrainConfig", device: Union[str, torch.device] = "cpu") -> None:
        self.folder = Path(folder)
        self.cfg = cfg
        self.device = device
        self.last_path = self.folder / "last.pt"
        self.best_path = self.folder / "best.pt"

    @staticmethod
    def is_snapshot_epoch(epoch: int) -> bool:
        """Epochs whose per-user scales ``last.pt`` keeps for the τ histogram: 0, 1, 2, 4, 8, …"""
        return epoch == 0 or (epoch & (epoch - 1)) == 0

    # -- writing ----------------------------------------------------------------------------
    def save_last(
        self,
        epochs_done: int,
        *,
        model: Dict[str, Any],
        optimizer: Dict[str, Any],
        controller: Dict[str, Any],
        generators: Sequence[torch.Generator],
        world_size: int,
        history: List[Dict[str, Any]],
        best: Optional[Dict[str, Any]],
        bad_evals: int,
        train_seconds: float,
        tau_snapshots: Dict[int, torch.Tensor],
    ) -> None:
        """Write ``last.pt`` after ``epochs_done`` epochs (the RNG states are read here)."""
        from .run_folder import atomic_save

        atomic_save(
            {
                "epoch": epochs_done,
                "model": model,
                "optimizer": optimizer,
                "controller": controller,
                "rng": rng_state(*generators),
                "world_size": world_size,
                "history": history,
                "best": best,
                "bad_evals": bad_evals,
                "train_seconds": train_seconds,
                "tau_snapshots": tau_snapshots,
                "config": dataclasses.asdict(self.cfg),
            },
            self.last_path,
        )

    def save_best(
        self, epoch: int, *, model: Dict[str, Any], controller: Dict[str, Any], metrics: Dict[str, float]
    ) -> None:
        """Write ``best.pt``: the state after ``epoch`` and its ``metrics``."""
        from .run_folder import atomic_save

        atomic_save(
            {
                "epoch": epoch,
                "model": model,
                "controller": controller,
                "metrics": metrics,
                "config": dataclasses.asdict(self.cfg),
            },
            self.best_path,
        )

    # -- reading ----------------------------------------------------------------------------
    def load_last(self, model: torch.nn.Module) -> Dict[str, Any]:
        """``last.pt``, checked to fit ``model`` (:class:`CheckpointError` when it does not)."""
        return load_checkpoint(self.last_path, self.device, cfg=self.cfg, model=model)

    def load_best(self, model: torch.nn.Module) -> Dict[str, Any]:
        """``best.pt``, checked to fit ``model`` (:class:`CheckpointError` when it does not)."""
        return load_checkpoint(self.best_path, self.device, cfg=self.cfg, model=model)

    @staticmethod
    def restore_progress(
        ckpt: Dict[str, Any], *generators: torch.Generator
    ) -> Tuple[int, List[Dict[str, Any]], Optional[Dict[str, Any]], int, float, Dict[int, torch.Tensor]]:
        """Set the RNG states ``last.pt`` saved (``generators`` in the order saved) and return
        where the run stands: ``(epochs done, history, best, bad_evals, train_seconds,
        tau_snapshots)``."""
        set_rng_state(ckpt["rng"], *generators)
        return (
            int(ckpt["epoch"]),
            list(ckpt["history"]),
            ckpt["best"],
            int(ckpt["bad_evals"]),
            float(ckpt["train_seconds"]),
            dict(ckpt["tau_snapshots"]),
        )

    def last_good(self, epochs_done: int) -> str:
        """Where a stopped run can be picked up again, as a sentence for the user."""
        if not self.last_path.is_file():
            return "No checkpoint was written (the run stopped in its first epoch)."
        return f"The last good checkpoint is {self.last_path} (after epoch {epochs_done - 1})."


def save_run_state(trainer, epochs_done: int) -> None:
    """Write the trainer's last.pt on rank 0: weights, optimizer, controller, RNG states and
    progress after ``epochs_done`` epochs. Collective when world_size > 1: call it on every rank."""
    controller = trainer.controller.state_dict()
    if trainer.world_size > 1:  # the epoch's per-user loss sums of every rank, reduced
        for key in ("loss_sum", "loss_count"):
            controller[key] = dist.all_reduce_sum(getattr(trainer.controller, "_" + key)).detach().cpu()
    model_state, optimizer_state = trainer._model_state(), trainer._optimizer_state()
    if trainer.is_main:
        trainer.checkpoints.save_last(
            epochs_done,
            model=model_state,
            optimizer=optimizer_state,
            controller=controller,
            generators=(trainer.shuffle_gen, trainer.neg_gen),
            world_size=trainer.world_size,
            history=trainer.history,
            best=trainer.stopping.best,
            bad_evals=trainer.stopping.bad_evals,
            train_seconds=trainer.train_seconds,
            tau_snapshots=trainer.tau_snapshots,
        )


def resume_run_state(trainer) -> None:
    """Continue the trainer from its last.pt: weights, optimizer, controller, RNG states and
    progress."""
    ckpt = trainer.checkpoints.load_last(trainer.model)
    trainer._restore_model_and_optimizer(ckpt)
    trainer.controller.load_state_dict(ckpt["controller"])
    if trainer.rank != 0:  # rank 0 holds the saved (already reduced) sums; the next
        trainer.controller._loss_sum.zero_()  # begin_epoch all-reduces them
        trainer.controller._loss_count.zero_()
    (
        trainer.start_epoch,
        trainer.history,
        trainer.stopping.best,
        trainer.stopping.bad_evals,
        trainer.train_seconds,
        trainer.tau_snapshots,
    ) = trainer.checkpoints.restore_progress(ckpt, trainer.shuffle_gen, trainer.neg_gen)
    trainer.run.rewrite_metrics(trainer.history)  # it may hold lines past the checkpoint
