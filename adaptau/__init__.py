"""adaptau: a fused sampled-softmax loss with adaptive temperature (Adap-τ) for PyTorch.

Public API:
    softmax_loss(user, items, pos, neg, pos_scale, neg_scale, ...)  the fused operator
    available_backends(device)                                      usable backends here
    lambertw(x)                                                     principal-branch Lambert W
    AdapTau(user_ids, item_ids, ...)                                the temperature controller
    AdapTauLoss(user_ids, item_ids, ...)                            drop-in nn.Module loss
"""
from .nn import AdapTauLoss
from .ops import BACKENDS, available_backends, softmax_loss
from .temperature import AdapTau, lambertw

__version__ = "0.1.0"

__all__ = ["softmax_loss", "available_backends", "BACKENDS", "lambertw", "AdapTau",
           "AdapTauLoss", "__version__"]
