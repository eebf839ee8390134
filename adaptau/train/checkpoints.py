"""Checkpoints: read safely (tensors and plain values only), checked against the model they
are loaded into, and the numpy RNG state in a form ``weights_only`` loading accepts."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

import random

import numpy as np
import torch

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["CheckpointError", "load_checkpoint", "check_checkpoint_fits", "rng_state", "set_rng_state"]


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


def _numpy_state_plain(state: tuple) -> list:
    """numpy's legacy RNG state with its key array as a tensor (weights_only can load it)."""
    name, keys, pos, has_gauss, gauss = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
            float(gauss)]


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
