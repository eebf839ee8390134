"""The trainer: data, negative sampling, models, evaluation, data parallelism and the CLI
around :mod:`adaptau.loss`.

Modules:
    config       ``TrainConfig``: every setting, its coercion and validation; presets
    trainer      ``Trainer``, ``train``, ``evaluate_run``: a run from start to end
    epoch        ``EpochLoop``: one epoch of training and its step (``train_step``)
    run_folder   ``RunFolder``: a run folder's files, the run lock, atomic writes
    checkpoints  ``Checkpointer``: last.pt and best.pt; reading checkpoints safely
    summary      the end of a run: summary.json, the closing and per-epoch log lines
    host         allocator tuning (``keep_freed_heap``)
    data         dataset loaders, name resolution, protocols, ``make_synthetic``
    synthetic    the synthetic interaction generator (arrays only)
    sampling     negative samplers, batch iterator, inverted dropout
    models       MF and LightGCN, sampled L2
    evaluate     full-ranking metrics
    distributed  torch.distributed: process group, DDP, launcher
    sharded      TorchRec row-wise sharded MF tables (``--shard-tables``; imports torchrec,
                 so it is imported only when used)
    plots        training curves and temperature histograms
    cli          the ``adaptau`` command line (``python -m adaptau``)

The main names are re-exported here: ``from adaptau.train import Trainer, TrainConfig, train``.
"""

from .config import PRESETS, TrainConfig, load_config_file
from .host import keep_freed_heap
from .run_folder import atomic_save
from .trainer import NonFiniteLossError, Trainer, evaluate_run, train

__all__ = [
    "TrainConfig",
    "PRESETS",
    "Trainer",
    "train",
    "evaluate_run",
    "NonFiniteLossError",
    "load_config_file",
    "atomic_save",
    "keep_freed_heap",
]


def __getattr__(name: str):
    # adaptau.train of 0.1 was the trainer module itself: the names it held stay readable
    # here, from the trainer module and the modules of the trainer's parts.
    import importlib

    for part in ("trainer", "epoch", "summary", "checkpoints", "run_folder"):
        module = importlib.import_module(f".{part}", __name__)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
