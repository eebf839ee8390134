"""adaptau: a fused sampled-softmax loss with adaptive temperature (Adap-τ) for PyTorch.

Public API:
    softmax_loss(user, items, pos, neg, pos_scale, neg_scale, ...)  the fused operator
    available_backends(device)                                      usable backends here
    lambertw(x)                                                     principal-branch Lambert W
    AdapTau(user_ids, item_ids, ...)                                the temperature controller
    AdapTauLoss(user_ids, item_ids, ...)                            drop-in nn.Module loss
    full_ranking, load_dataset, TrainConfig, Trainer                the trainer (imported lazily;
                                                                    adaptau.train.train(cfg) runs one)
"""
from .nn import AdapTauLoss
from .ops import BACKENDS, available_backends, softmax_loss
from .temperature import AdapTau, lambertw

__version__ = "0.1.0"

__all__ = ["softmax_loss", "available_backends", "BACKENDS", "lambertw", "AdapTau",
           "AdapTauLoss", "full_ranking", "load_dataset", "TrainConfig", "Trainer", "__version__"]

_LAZY = {"full_ranking": "evaluate", "load_dataset": "data", "TrainConfig": "train", "Trainer": "train"}


def __getattr__(name):
    """Trainer entry points, imported on first use so ``import adaptau`` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'adaptau' has no attribute {name!r}")
