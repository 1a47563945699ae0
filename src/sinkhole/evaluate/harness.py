"""Moved to :mod:`sinkhole.integrations.lm_eval`. This path is a shim for one release (0.1.x); nothing inside sinkhole uses it."""

import sys
import warnings

from ..integrations import lm_eval as _moved

warnings.warn("sinkhole.evaluate.harness moved to sinkhole.integrations.lm_eval; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
