"""The loss: the fused sampled-softmax operator, its backends' shared contract, and the
Adap-τ temperature controller. Importing it imports nothing of the trainer
(:mod:`adaptau.train`).

Modules:
    _contract    the backend contract and its constants (neg modes, norm epsilon, dtypes)
    ops          ``softmax_loss``: input checks, backend choice, the torch.library custom ops
    reference    the plain-PyTorch reference backend (the executable specification)
    temperature  ``AdapTau``, the per-user temperature controller, and ``lambertw``
    nn           ``AdapTauLoss``, the loss and a controller as one ``nn.Module``
"""

from .nn import AdapTauLoss
from .mixed import Negatives
from .ops import BACKENDS, available_backends, compact, cpu_capability, resolve_backend, softmax_loss
from .temperature import AdapTau, lambertw

__all__ = [
    "softmax_loss",
    "Negatives",
    "compact",
    "available_backends",
    "resolve_backend",
    "cpu_capability",
    "BACKENDS",
    "AdapTau",
    "lambertw",
    "AdapTauLoss",
]
