"""Deprecated: moved to :mod:`adaptau.loss.nn` (this alias is kept for one release)."""

from adaptau._deprecated import moved

moved(__name__, "adaptau.loss.nn")
