"""Moved to :mod:`sinkhole.decoding.engines`. This path is a shim for one release (0.1.x); nothing inside sinkhole uses it."""

import sys
import warnings

from .decoding import engines as _moved

warnings.warn("sinkhole.engines moved to sinkhole.decoding.engines; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
