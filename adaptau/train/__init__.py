"""The trainer: data, negative sampling, models, evaluation, data parallelism and the CLI
around :mod:`adaptau.loss`.

Modules:
    trainer      ``TrainConfig``, ``Trainer``, ``train`` and the run folder
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

The names of :mod:`adaptau.train.trainer` are re-exported here, so
``from adaptau.train import Trainer, TrainConfig, train`` works as before the split.
"""
from .trainer import (
    PRESETS,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    atomic_save,
    evaluate_run,
    keep_freed_heap,
    load_config_file,
    train,
)

__all__ = ["TrainConfig", "PRESETS", "Trainer", "train", "evaluate_run", "NonFiniteLossError",
           "load_config_file", "atomic_save", "keep_freed_heap"]


def __getattr__(name: str):
    # Before the split adaptau.train was the trainer module itself: its other names
    # (private helpers, what it imported) stay readable here.
    from . import trainer

    try:
        return getattr(trainer, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
