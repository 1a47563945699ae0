"""Moved to :mod:`sinkhole.integrations.export`. This path is a shim for one release (0.1.x); nothing inside sinkhole uses it."""

import sys
import warnings

from ..integrations import export as _moved

warnings.warn("sinkhole.attack.export moved to sinkhole.integrations.export; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
