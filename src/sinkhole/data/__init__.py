"""Public-domain English text shipped with sinkhole (Project Gutenberg Shakespeare).

``sonnets`` is the analysis text (typical norms, first-token detector), ``tempest`` is the
training text of patch searches and ``twelfth_night`` is held out for verification.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from importlib.resources import files

TEXTS = ("sonnets", "tempest", "twelfth_night")


@lru_cache(maxsize=None)
def load_text(name: str = "sonnets") -> str:
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose from {', '.join(TEXTS)}")
    return files(__package__).joinpath(f"{name}.txt").read_text(encoding="utf-8")


def words(name: str = "sonnets") -> list[str]:
    body = load_text(name)
    return re.findall(r"\S+", body[body.find("\n\n", 200):])


def snippets(name: str = "sonnets", n: int = 32, n_words: int = 40, seed: int = 0) -> list[str]:
    """``n`` runs of ``n_words`` consecutive words, at seeded random offsets."""
    ws = words(name)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(0, max(1, len(ws) - n_words))
        out.append(" ".join(ws[i : i + n_words]))
    return out
