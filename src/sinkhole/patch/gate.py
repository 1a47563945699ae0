"""Moved to :mod:`sinkhole.decoding.gate`. This path is a shim for one release (0.1.x); nothing inside sinkhole uses it."""

import sys
import warnings

from ..decoding import gate as _moved

warnings.warn("sinkhole.patch.gate moved to sinkhole.decoding.gate; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
