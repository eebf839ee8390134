"""Triton kernels of adaptau (installed as ``adaptau.kernels``).

Not written yet: ``AVAILABLE`` is False, so ``adaptau.ops`` never selects this backend.
"""
AVAILABLE = False
