"""adaptau: a fused sampled-softmax loss with adaptive temperature (Adap-τ) for PyTorch.

Public API:
    softmax_loss(user, items, pos, neg, pos_scale, neg_scale, ...)  the fused operator
    Negatives(in_batch=, shared=, per_row=, *_logq=)                mixed negative sources
    compact(pos, neg)                                               the rows a batch touches
    available_backends(device)                                      usable backends here
    resolve_backend(backend, device_type)                           the backend a call runs on
    cpu_capability()                                                the cpu backend's SIMD level
    lambertw(x)                                                     principal-branch Lambert W
    AdapTau(user_ids, item_ids, ...)                                the temperature controller
    AdapTauLoss(user_ids, item_ids, ...)                            drop-in nn.Module loss
    full_ranking, load_dataset, TrainConfig, Trainer                the trainer (imported lazily;
                                                                    adaptau.train.train(cfg) runs one)

Subpackages: :mod:`adaptau.loss` (the operator, its backends' contract, the controller;
imported here) and :mod:`adaptau.train` (data, samplers, models, evaluation, the trainer,
the CLI; imported on first use). The old flat module paths (``adaptau.ops``,
``adaptau.data`` …) still import, with a ``DeprecationWarning``, for one release.
"""

from .loss import (
    BACKENDS,
    AdapTau,
    AdapTauLoss,
    Negatives,
    available_backends,
    compact,
    cpu_capability,
    lambertw,
    resolve_backend,
    softmax_loss,
)

__version__ = "0.2.0"

__all__ = [
    "softmax_loss",
    "Negatives",
    "compact",
    "available_backends",
    "resolve_backend",
    "cpu_capability",
    "BACKENDS",
    "lambertw",
    "AdapTau",
    "AdapTauLoss",
    "full_ranking",
    "load_dataset",
    "TrainConfig",
    "Trainer",
    "__version__",
]

_LAZY = {
    "full_ranking": "train.evaluate",
    "load_dataset": "train.data",
    "TrainConfig": "train.trainer",
    "Trainer": "train.trainer",
}


def __getattr__(name):
    """Trainer entry points, imported on first use so ``import adaptau`` stays light; and the
    old flat module names (``adaptau.ops`` …), which import their deprecation shims."""
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    from ._deprecated import MOVED

    if f"{__name__}.{name}" in MOVED:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'adaptau' has no attribute {name!r}")
