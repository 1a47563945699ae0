"""Moved to :mod:`sinkhole.integrations.garak`. This path is a shim for one release (0.1.x); nothing inside sinkhole uses it."""

import sys
import warnings

from .integrations import garak as _moved

warnings.warn("sinkhole.garak_target moved to sinkhole.integrations.garak; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
