"""Moved to :mod:`sinkhole.pipeline.registry`. This path is a shim for one release (0.1.x); nothing inside sinkhole uses it."""

import sys
import warnings

from .pipeline import registry as _moved

warnings.warn("sinkhole.scan_steps moved to sinkhole.pipeline.registry; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
