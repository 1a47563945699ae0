"""Moved to :mod:`sinkhole.attack.memorization`. This path is a shim for one release (0.1.x); nothing inside sinkhole uses it."""

import sys
import warnings

from .attack import memorization as _moved

warnings.warn("sinkhole.memorization moved to sinkhole.attack.memorization; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
