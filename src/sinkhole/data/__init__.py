"""Public-domain English text shipped with sinkhole (Project Gutenberg Shakespeare).

``sonnets`` is the analysis text (typical norms, first-token detector), ``tempest`` is the
training text of patch searches and ``twelfth_night`` is held out for verification.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from ..errors import SinkholeError

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


def corpus_words(text: str, n: int, exclude=frozenset()) -> list[str]:
    """The ``n`` most frequent lowercase alphabetic words (3+ letters) of a shipped text."""
    counts = Counter(w.lower() for w in (re.sub(r"[^A-Za-z]", "", x) for x in words(text))
                     if len(w) >= 3 and w.islower())
    return [w for w, _ in counts.most_common() if w not in exclude][:n]


def heldout_texts(source: str = "twelfth_night", n: int = 16, n_words: int = 64, seed: int = 1) -> list[str]:
    """Held-out snippets: a shipped text name (``twelfth_night`` by default) or a .txt path."""
    if source in TEXTS:
        return snippets(source, n=n, n_words=n_words, seed=seed)
    p = Path(source)
    if not p.exists():
        raise SinkholeError(f"held-out text {source!r} is neither a shipped text ({', '.join(TEXTS)}) nor a file")
    ws = re.findall(r"\S+", p.read_text(encoding="utf-8", errors="replace"))
    if len(ws) < n_words + 1:
        raise SinkholeError(f"held-out text {p} has only {len(ws)} words; need at least {n_words + 1}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(0, len(ws) - n_words)
        out.append(" ".join(ws[i:i + n_words]))
    return out
