"""The run gate's rule on plain token ids, with no torch: one place for what the gate hides.

:mod:`sinkhole.decoding.gate` attaches this rule to a loaded model (its hooks read it through tensor
wrappers); :mod:`sinkhole.guard` applies it to the requests of a served model, where no torch is installed.
The rule itself (which tokens are *excess*, how a stretch of them is cut into blocks of the run's period,
which blocks are hidden and from when) is documented in :mod:`sinkhole.decoding.gate`.

Every function here takes a sequence of token ids (``-1`` marks a padding position: never excess, and a
window holding one is not a run) and runs in time linear in its length (the window's counts are kept
incrementally), so a 100,000-character prompt is checked in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import SinkholeError

NEVER = 2 ** 62  # the expiry of a token that is never hidden


@dataclass
class RunGate:
    """The gate's rule (see :mod:`sinkhole.decoding.gate`); stored in a patch's JSON under ``gate`` and in a
    guard profile."""

    window: int = 32
    max_distinct: int = 8
    min_count: int = 2
    hold: int = 0
    cluster: bool = False  # also hide stretches with no exact repeating unit (cluster sequences, and digits)
    confirm: float | None = None  # the state check: hide a stretch only once its layer-0 state is first-token-like
    span: int = 32  # how many of a stretch's excess tokens the state check averages over

    def check(self) -> None:
        if not isinstance(self.cluster, bool):
            raise SinkholeError(f"run gate cluster must be true or false (got {self.cluster!r})")
        if self.confirm is not None and (isinstance(self.confirm, bool) or not isinstance(self.confirm, (int, float))
                                         or not 0 < self.confirm < 10):
            raise SinkholeError(f"run gate confirm must be null or a distance between 0 and 10 (got {self.confirm!r})")
        for name in ("window", "max_distinct", "min_count", "hold", "span"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "hold" else 1):
                what = "a non-negative" if name == "hold" else "a positive"
                raise SinkholeError(f"run gate {name} must be {what} integer (got {v!r})")
        if self.max_distinct > self.window or self.min_count > self.window:
            raise SinkholeError("run gate max_distinct and min_count must not exceed its window")

    def to_dict(self) -> dict:
        d = {"window": self.window, "max_distinct": self.max_distinct, "min_count": self.min_count,
             "hold": self.hold, "cluster": self.cluster}
        if self.confirm is not None:
            d.update(confirm=self.confirm, span=self.span)
        return d

    @classmethod
    def from_dict(cls, d) -> "RunGate":
        if not isinstance(d, dict):
            raise SinkholeError("the patch's 'gate' must be an object with window, max_distinct and min_count")
        unknown = set(d) - {"window", "max_distinct", "min_count", "hold", "cluster", "confirm", "span"}
        if unknown:
            raise SinkholeError(f"the patch's gate has unknown field(s) {sorted(unknown)}; "
                                "use window, max_distinct, min_count, hold, cluster, confirm, span")
        g = cls(**d)
        g.check()
        return g

    def describe(self) -> str:
        return (f"run gate: a token already seen {self.min_count}+ times among the previous {self.window} tokens, "
                f"when those hold at most {self.max_distinct} distinct tokens, is hidden from later attention and "
                "does not advance the position"
                + (f", once its run has more than {self.hold} such tokens" if self.hold else "")
                + ("; runs without a repeating unit too" if self.cluster or self.confirm is not None else
                   "; only in runs that repeat a unit exactly")
                + (f"; only once the run's layer-0 state is first-token-like (mean distance to its unit's state at the "
                   f"start of a sequence <= {self.confirm:g} over {self.span} tokens)"
                   if self.confirm is not None else ""))


def excess(ids: Sequence[int], gate: RunGate) -> list[bool]:
    """Which tokens are excess: token t is when the ``window`` tokens before it hold at most ``max_distinct``
    distinct tokens, none of them padding, and t is already among them at least ``min_count`` times."""
    n, w = len(ids), gate.window
    out = [False] * n
    if n <= w:
        return out
    counts: dict[int, int] = {}
    pads = 0
    for x in ids[:w]:
        counts[x] = counts.get(x, 0) + 1
        pads += x < 0
    for t in range(w, n):
        cur = ids[t]
        out[t] = (pads == 0 and cur >= 0 and len(counts) <= gate.max_distinct
                  and counts.get(cur, 0) >= gate.min_count)
        old = ids[t - w]  # slide the window one token on
        c = counts[old] - 1
        if c:
            counts[old] = c
        else:
            del counts[old]
        pads += (cur < 0) - (old < 0)
        counts[cur] = counts.get(cur, 0) + 1
    return out


def run_period(ids: Sequence[int], r0: int, most: int) -> int:
    """The run's period at ``r0``: the smallest p <= ``most`` with the 3p tokens before r0 and r0 itself
    repeating with period p (three whole repetitions of the unit, then its first token again; with the
    default window of 32 and at most 8 distinct tokens they always lie inside the run); 0 when there is
    none (a cluster sequence, or the digits of close numbers, have no unit)."""
    for p in range(1, most + 1):
        lo = max(0, r0 - 3 * p)
        if r0 + 1 - lo > p and all(ids[i] == ids[i + p] for i in range(lo, r0 + 1 - p)):
            return p
    return 0


def stretches(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """(start, end) of every stretch of consecutive True in ``flags`` (both ends inclusive)."""
    out, start = [], None
    for i, f in enumerate(flags):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i - 1))
            start = None
    if start is not None:
        out.append((start, len(flags) - 1))
    return out


def expiry(ids: Sequence[int], gate: RunGate, ex: Sequence[bool] | None = None,
           confirm: Callable[[int, int], int | None] | None = None) -> list[int]:
    """From which position on each token is hidden (``NEVER``: never).

    A stretch of excess tokens is cut into blocks of the run's period p: a block stays visible until the
    next block of the same stretch starts, and the stretch's last block stays visible for good; nothing is
    hidden before the stretch passes ``hold``. A stretch with no exact unit is hidden only with
    ``cluster`` (then token by token). With the state check (``gate.confirm``), ``confirm(r0, r1)`` says at
    which token the stretch ``r0..r1`` is confirmed (None: not, and then nothing of it is hidden)."""
    n = len(ids)
    ex = excess(ids, gate) if ex is None else ex
    out = [NEVER] * n
    for r0, r1 in stretches(ex):
        p = run_period(ids, r0, gate.max_distinct)
        first = r0 + gate.hold
        if gate.confirm is not None:
            c = confirm(r0, r1) if confirm is not None else None
            if c is None:
                continue
            p = p or 1
            # from the first block that starts after the confirmation: every token still visible then had its
            # position counted with the same tokens hidden as the queries after it
            first = max(first, r0 + -(-(c + 1 - r0) // p) * p)
            if first > r1:  # confirmed in the stretch's last block: no block starts after it
                continue
        elif p == 0:
            if not gate.cluster:
                continue
            p = 1
        if r1 - r0 < gate.hold:  # a stretch of at most ``hold`` excess tokens stays whole
            continue
        for k in range(r0, r1 + 1):
            nxt = r0 + ((k - r0) // p + 1) * p  # where the next block starts
            out[k] = max(nxt, first) if nxt <= r1 else NEVER
    return out


def kept(ids: Sequence[int], gate: RunGate, exp: Sequence[int] | None = None) -> list[bool]:
    """Which tokens the end of ``ids`` still sees (what :func:`collapse` keeps); ``exp``: the ids' :func:`expiry`,
    when the caller has it already."""
    n = len(ids)
    return [e >= n for e in (expiry(ids, gate) if exp is None else exp)]


def require_model_free(gate: RunGate) -> None:
    """Refuse a gate with the state check where the rule is applied without the model (here, and in the guard)."""
    if gate.confirm is not None:
        raise SinkholeError("a run gate with the state check (confirm) reads the model's state; the guard and the "
                            "torch-free rule apply the gate without it (remove confirm)")


def collapse(ids: Sequence[int], gate: RunGate) -> list[int]:
    """``ids`` without the tokens the gate hides from the end of the sequence: what the gated model reads
    at the last token, as a prompt (a gate with the state check needs the model: see
    :func:`sinkhole.decoding.gate.collapse`)."""
    require_model_free(gate)
    return [x for x, k in zip(ids, kept(ids, gate)) if k]


@dataclass
class Run:
    """A run the gate shortens: tokens ``start`` (inclusive) to ``end`` (exclusive), its unit (one repetition,
    or its first token where the run has no exact unit), and how many of its tokens the gate hides."""

    start: int
    end: int
    unit: tuple
    hidden: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def reps(self) -> float:
        return self.length / max(len(self.unit), 1)


def runs(ids: Sequence[int], gate: RunGate, exp: Sequence[int] | None = None) -> list[Run]:
    """Every run whose tokens the gate hides from the end of ``ids``, with where it starts (the run is followed
    back from its first excess token for as long as the unit repeats); ``exp``: the ids' :func:`expiry`, when the
    caller has it already."""
    n = len(ids)
    exp = expiry(ids, gate) if exp is None else exp
    out = []
    for r0, r1 in stretches([e < NEVER for e in exp]):
        p = run_period(ids, r0, gate.max_distinct) or 1
        start = r0
        while start > 0 and ids[start - 1] == ids[start - 1 + p]:
            start -= 1
        end = r1 + 1
        while end < n and end - p >= 0 and ids[end] == ids[end - p] and exp[end] >= NEVER:
            end += 1
        out.append(Run(start, end, tuple(ids[r0:r0 + p]), sum(1 for e in exp[r0:r1 + 1] if e < n)))
    return out
