"""Old flat module paths (``adaptau.ops``, ``adaptau.data`` …), kept for one release.

Each old module is a two-line shim::

    from adaptau._deprecated import moved
    moved(__name__, "adaptau.loss.ops")

:func:`moved` warns once (``DeprecationWarning``, naming the new path) and replaces the shim
in ``sys.modules`` by the new module, so ``import adaptau.ops`` and ``from adaptau import ops``
give the very same module object: private names and monkeypatching keep working.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
import warnings

__all__ = ["moved", "MOVED"]

#: old module path -> new module path
MOVED = {
    "adaptau.ops": "adaptau.loss.ops",
    "adaptau.reference": "adaptau.loss.reference",
    "adaptau.temperature": "adaptau.loss.temperature",
    "adaptau.nn": "adaptau.loss.nn",
    "adaptau.data": "adaptau.train.data",
    "adaptau.synthetic": "adaptau.train.synthetic",
    "adaptau.sampling": "adaptau.train.sampling",
    "adaptau.models": "adaptau.train.models",
    "adaptau.evaluate": "adaptau.train.evaluate",
    "adaptau.distributed": "adaptau.train.distributed",
    "adaptau.plots": "adaptau.train.plots",
    "adaptau.cli": "adaptau.train.cli",
}


def moved(old: str, new: str) -> None:
    """Called by the shim module ``old``: warn, then alias ``sys.modules[old]`` to ``new``."""
    if old == "__main__":  # ``python -m adaptau.cli …``: run the new module as the program
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        # stacklevel 2: the shim itself, i.e. __main__, where the default filters show it
        warnings.warn(
            f"python -m {spec.name if spec else 'adaptau.<module>'} is deprecated; use python -m {new}",
            DeprecationWarning,
            stacklevel=2,
        )
        runpy.run_module(new, run_name="__main__", alter_sys=True)
        return
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; import {new} instead",
        DeprecationWarning,
        stacklevel=_importer_level(),
    )
    sys.modules[old] = importlib.import_module(new)


_HERE = os.path.dirname(os.path.abspath(__file__))


def _importer_level() -> int:
    """``stacklevel`` for a warning issued in :func:`moved` that names the code importing the
    shim (so the default filters show it when that is ``__main__``): the first frame that is
    neither importlib's nor a module of this folder (the shims, ``adaptau/__init__.py`` whose
    ``__getattr__`` imports them). ``warnings`` skips importlib's frozen ``_bootstrap``
    frames without counting them, so they are not counted here either."""
    frame, level = sys._getframe(2), 1  # frame: the caller of moved(); level 1 is moved()
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name and "_bootstrap" in name:
            frame = frame.f_back
            continue
        level += 1
        if "importlib" not in name and os.path.dirname(os.path.abspath(name)) != _HERE:
            break
        frame = frame.f_back
    return level
