"""Deprecated: moved to :mod:`adaptau.loss.reference` (this alias is kept for one release)."""

from adaptau._deprecated import moved

moved(__name__, "adaptau.loss.reference")
