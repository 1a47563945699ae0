"""Progress bars (tqdm on stderr with ETA), silenced by ``--quiet`` or when not a terminal in CI."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def progress(iterable=None, desc: str = "", total: int | None = None, disable: bool | None = None, **kw):
    """A tqdm bar on stderr; disabled by --quiet (``set_quiet``) or ``disable=True``."""
    off = _QUIET if disable is None else (disable or _QUIET)
    if os.environ.get("SINKHOLE_NO_PROGRESS"):
        off = True
    return tqdm(iterable, desc=desc, total=total, disable=off, file=sys.stderr, leave=False,
                dynamic_ncols=True, **kw)
