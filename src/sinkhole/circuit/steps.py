"""Moved to :mod:`sinkhole.pipeline.steps_circuit`. This path is a shim for one release (0.1.x); nothing inside sinkhole uses it."""

import sys
import warnings

from ..pipeline import steps_circuit as _moved

warnings.warn("sinkhole.circuit.steps moved to sinkhole.pipeline.steps_circuit; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
