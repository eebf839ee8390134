"""Deprecated: moved to :mod:`adaptau.train.evaluate` (this alias is kept for one release)."""

from adaptau._deprecated import moved

moved(__name__, "adaptau.train.evaluate")
