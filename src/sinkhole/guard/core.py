"""The guard: the run gate's rule applied to the requests and answers of a served model, with no model loaded.

A :class:`Guard` holds the served model's tokenizer (a ``tokenizer.json`` read by the ``tokenizers`` library,
no torch) and a :class:`~sinkhole.guard.profile.GuardProfile`. On the prompt side it tokenizes each text, asks
the rule (:mod:`sinkhole.decoding.runs`) which tokens the gate would hide, and

* ``collapse`` (default): removes exactly those tokens' characters from the text, so that the text the upstream
  tokenizes is the gate's collapse (checked by encoding it again: where the tokenizer merges across the cut
  differently, the decoded collapse is used instead, and the report says whether the ids match exactly);
* ``reject``: refuses the request with one line that names the run, its length and this model's limit.

Text with nothing to hide is returned as the very same object: ordinary requests reach the upstream
byte-identical. On the answer side, an :class:`OutputWatch` follows the text the model writes and says where
to stop it: at the first token from which the gate would hide part of a run the model wrote itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..decoding.runs import NEVER, excess, expiry, kept, require_model_free, runs
from ..errors import SinkholeError
from .profile import GuardProfile

MODES = ("collapse", "reject")
OUTPUT_MODES = ("stop", "off")
PROFILE_FILE = "guard-profile.json"
TOKENIZER_FILE = "tokenizer.json"
WATCH_CHARS = 65536  # the output watch reads at most this many of the answer's last characters


class GuardRejected(SinkholeError):
    """A request the guard refuses (mode ``reject``): the proxy answers it with status 400 and this message."""

    status_code = 400


@dataclass
class RunFound:
    """One run the guard shortened or refused: where (``part``: the message index and content part, or the
    prompt's index), its unit as text, its length, and how many of its tokens the gate hides."""

    part: str
    unit: str
    reps: float
    tokens: int
    hidden: int

    def describe(self) -> str:
        return f"{self.part}: {self.unit!r} repeated {self.reps:g} times ({self.tokens} tokens)"


@dataclass
class GuardReport:
    """What the guard did to one request."""

    runs: list = field(default_factory=list)  # RunFound
    exact: bool = True  # every rewritten text encodes to the gate's collapse of its ids
    skipped: list = field(default_factory=list)  # parts left untouched because they could not be read (why)

    @property
    def changed(self) -> bool:
        return bool(self.runs)

    def to_dict(self) -> dict:
        return {"runs": [asdict(r) for r in self.runs], "exact": self.exact, "skipped": list(self.skipped)}


class Tokenizer:
    """The served model's tokenizer from a ``tokenizer.json`` (the ``tokenizers`` library: no torch). Special
    tokens are never added: the guard reads the text as the user wrote it."""

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer as _T
        except ImportError:  # pragma: no cover - the serve extra installs it
            raise SinkholeError("the guard needs the 'tokenizers' package; run: pip install 'sinkhole[serve]'") \
                from None
        try:
            self.tok = _T.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exceptions for unreadable files
            raise SinkholeError(f"cannot read the tokenizer {path} ({str(err)[:80]}); pass the tokenizer.json of "
                                "the served model") from None

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, the character where each token starts). A token starts where the one before it ends, so the
        tokens cut the text into consecutive pieces with each token's leading space in its own piece (the
        library's offsets leave that space out), and the text from any token's start on encodes to the same tokens
        in byte-level vocabularies."""
        enc = self.tok.encode(text, add_special_tokens=False)
        ends = [b for _, b in enc.offsets]
        return list(enc.ids), [0] + ends[:-1]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def _spans(starts: list[int], n_chars: int) -> list[tuple[int, int]]:
    """Each token's characters: from its start to the next token's start (a token that shares its start with
    the next, a byte of a character split over several tokens, owns none; the last token owns the rest)."""
    out = []
    for i, a in enumerate(starts):
        b = starts[i + 1] if i + 1 < len(starts) else n_chars
        out.append((a, max(a, b)))
    return out


class Guard:
    """The run gate in front of a served model: :meth:`text`, :meth:`request` and :meth:`watch`."""

    def __init__(self, profile: GuardProfile, tokenizer, mode: str = "collapse", output: str = "stop"):
        if mode not in MODES:
            raise SinkholeError(f"unknown guard mode {mode!r}; use one of {', '.join(MODES)}")
        if output not in OUTPUT_MODES:
            raise SinkholeError(f"unknown guard output mode {output!r}; use one of {', '.join(OUTPUT_MODES)}")
        require_model_free(profile.gate)
        self.profile, self.tok, self.mode, self.output = profile, tokenizer, mode, output
        self.gate = profile.gate

    @classmethod
    def from_folder(cls, folder, mode: str = "collapse", output: str = "stop") -> "Guard":
        """The guard of a folder ``sinkhole guard`` wrote (guard-profile.json and tokenizer.json)."""
        folder = Path(folder)
        if not (folder / PROFILE_FILE).is_file() or not (folder / TOKENIZER_FILE).is_file():
            raise SinkholeError(f"{folder} holds no {PROFILE_FILE} and {TOKENIZER_FILE}; write it with "
                                "sinkhole guard MODEL --litellm-config FILE")
        return cls(GuardProfile.load(folder / PROFILE_FILE), Tokenizer(folder / TOKENIZER_FILE), mode, output)

    # --- prompts ----------------------------------------------------------------------------
    def _found(self, ids: list[int], exp: list[int], part: str) -> list[RunFound]:
        return [RunFound(part, self.tok.decode(list(r.unit)), round(r.reps, 1), r.length, r.hidden)
                for r in runs(ids, self.gate, exp)]

    def _kept(self, ids: list[int]) -> tuple[list[int], list[bool]]:
        """(the rule's expiry of each token, whether the end of ``ids`` still sees it): read once per text."""
        exp = expiry(ids, self.gate)
        return exp, kept(ids, self.gate, exp)

    def ids(self, ids: Sequence[int], part: str = "prompt", report: GuardReport | None = None) -> list[int]:
        """A prompt given as token ids: the gate's collapse of it (``reject``: raises :class:`GuardRejected`)."""
        ids = [int(x) for x in ids]
        exp, keep = self._kept(ids)
        if all(keep):
            return ids
        found = self._found(ids, exp, part)
        self._refuse(found)
        if report is not None:
            report.runs.extend(found)
        return [x for x, k in zip(ids, keep) if k]

    def text(self, text: str, part: str = "prompt", report: GuardReport | None = None) -> str:
        """``text`` with the tokens the gate hides removed (the same object when nothing is hidden)."""
        try:
            ids, starts = self.tok.encode(text)
        except Exception as err:  # lone surrogates and other text the tokenizer cannot take: pass it on untouched
            if report is not None:
                report.skipped.append(f"{part}: the tokenizer cannot read it ({type(err).__name__})")
            return text
        exp, keep = self._kept(ids)
        if all(keep):
            return text
        found = self._found(ids, exp, part)
        self._refuse(found)
        spans = _spans(starts, len(text))
        out, cur = [], 0
        for (a, b), k in zip(spans, keep):
            if not k:
                out.append(text[cur:a])
                cur = max(cur, b)
        out.append(text[cur:])
        new = "".join(out)
        want = [x for x, k in zip(ids, keep) if k]
        exact = self.tok.encode(new)[0] == want
        if not exact:  # the tokenizer merges across the cut: the decoded collapse, where that encodes exactly
            alt = self.tok.decode(want)
            if self.tok.encode(alt)[0] == want:
                new, exact = alt, True
        if report is not None:
            report.runs.extend(found)
            report.exact = report.exact and exact
        return new

    def _refuse(self, found: list[RunFound]) -> None:
        if self.mode == "reject" and found:
            r = max(found, key=lambda r: r.tokens)
            raise GuardRejected(
                f"sinkhole guard: {r.describe()}; this model handles runs of about "
                f"{self.gate.window + self.gate.hold} tokens ({self.profile.describe().split(':')[0]}); "
                "shorten the run and send the request again")

    def request(self, data: dict, kind: str) -> tuple[dict, GuardReport]:
        """An OpenAI-style request body (``kind``: ``chat`` or ``completion``) with every text the model reads
        guarded: each message's string content and text parts (tool calls, images and other parts pass through
        untouched), or the completion prompt (text, texts or token ids). Returns the body (the same object when
        nothing changed) and the report; raises :class:`GuardRejected` in ``reject`` mode."""
        report = GuardReport()
        if not isinstance(data, dict):
            return data, report
        if kind == "chat":
            msgs = data.get("messages")
            if not isinstance(msgs, list):
                return data, report
            new_msgs = list(msgs)
            for i, m in enumerate(msgs):
                if not isinstance(m, dict):
                    continue
                c = m.get("content")
                if isinstance(c, str):
                    nc = self.text(c, f"message {i}", report)
                elif isinstance(c, list):
                    nc = list(c)
                    for j, part in enumerate(c):
                        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                            t = self.text(part["text"], f"message {i} part {j}", report)
                            if t is not part["text"]:
                                nc[j] = {**part, "text": t}
                    if all(a is b for a, b in zip(nc, c)):
                        nc = c
                else:
                    continue
                if nc is not c:
                    new_msgs[i] = {**m, "content": nc}
            if report.changed:
                data = {**data, "messages": new_msgs}
            return data, report
        if kind == "completion":
            p = data.get("prompt")
            new = self._prompt(p, report)
            if report.changed:
                data = {**data, "prompt": new}
            return data, report
        raise SinkholeError(f"unknown request kind {kind!r}; use chat or completion")

    def _prompt(self, p: Any, report: GuardReport) -> Any:
        if isinstance(p, str):
            return self.text(p, "prompt", report)
        if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return self.ids(p, "prompt", report)
        if isinstance(p, list):
            out = []
            for i, x in enumerate(p):
                if isinstance(x, str):
                    out.append(self.text(x, f"prompt {i}", report))
                elif isinstance(x, list) and x and all(isinstance(y, int) and not isinstance(y, bool) for y in x):
                    out.append(self.ids(x, f"prompt {i}", report))
                else:
                    out.append(x)
            return out
        return p

    # --- answers ----------------------------------------------------------------------------
    def watch(self, context: str = "") -> "OutputWatch":
        """A watch over one answer; ``context`` is the text the answer continues (a completion's prompt), so that
        a run the prompt starts and the answer goes on with counts whole."""
        return OutputWatch(self, context)

    def stop_at(self, text: str, context: str = "") -> int | None:
        """Where to end an answer ``text`` (that continues ``context``): the character of ``text`` where the first
        token starts from which the gate would hide part of a run (None: nowhere). Only the last ``WATCH_CHARS``
        characters are read."""
        cut = self._scan(context + text)[0]
        return None if cut is None else max(cut - len(context), 0)

    def _scan(self, text: str) -> tuple[int | None, int]:
        """(the first character from which the gate hides part of a run in ``text``, or None; where the text's last
        token starts: it may still grow as more text comes)."""
        if self.output == "off" or not text:
            return None, len(text)
        base = max(0, len(text) - WATCH_CHARS)
        try:
            ids, starts = self.tok.encode(text[base:])
        except Exception:
            return None, len(text)
        if not ids:
            return None, len(text)
        first = min(expiry(ids, self.gate), default=NEVER)
        return (base + starts[first] if first < len(ids) else None), base + starts[-1]


class OutputWatch:
    """Follows one answer as it streams: :meth:`feed` takes the next piece of text and returns the part to pass
    on (all but the last word, whose tokens may still change); :meth:`flush` returns the rest at the end. Once a run the
    model writes itself passes the gate's limit, ``stopped`` turns true: what is passed on is then the answer up to
    :meth:`Guard.stop_at` (tested on answers cut into random pieces), and every later piece is dropped.

    Incremental, so a long answer costs linear time: only the text from the last word's start is encoded again
    with each piece, and the rule is read (over the last ``window + hold`` and a few units of tokens, which holds
    any stretch that can start hiding now) only when a new token is excess, which ordinary text rarely has."""

    def __init__(self, guard: Guard, context: str = ""):
        self.guard = guard
        self.text = context[-WATCH_CHARS:] if guard.output != "off" else ""
        self.k = len(self.text)  # the answer starts here in ``text``
        self.sent = self.k
        self.stopped = False
        self.ids: list[int] = []
        self.starts: list[int] = []
        self.ok = True  # the tokenizer reads the text (else the watch only passes text on)
        if self.text:
            self._encode_from(0)
        g = guard.gate
        self.tail = g.window + g.hold + 4 * g.max_distinct + 16

    def _encode_from(self, pos: int) -> int:
        """Encode ``text[pos:]`` again, replacing the tokens from ``pos`` on; returns the first new token's index."""
        i = len(self.starts)
        while i > 0 and self.starts[i - 1] >= pos:
            i -= 1
        try:
            ids, starts = self.guard.tok.encode(self.text[pos:])
        except Exception:
            self.ok = False
            return i
        self.ids[i:] = ids
        self.starts[i:] = [pos + a for a in starts]
        return i

    def feed(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        self.text += piece
        if self.guard.output == "off" or not self.ok:
            return self.flush()
        first = self._encode_from(self._word_start())
        g = self.guard.gate
        lo = max(0, first - g.window)  # the rule's own reading of the new tokens, with the window before them
        new_excess = any(excess(self.ids[lo:], g)[first - lo:])
        if new_excess:
            lo = max(0, len(self.ids) - self.tail)
            exp = expiry(self.ids[lo:], g)
            hid = min(exp, default=NEVER)
            if hid < len(exp):
                cut = self.starts[lo + hid]
                if cut - self.k < len(self.text) - self.k:
                    self.stopped = True
                    self.text = self.text[:max(cut, self.sent)]
                    return self.flush()
        end = max(self._word_start(), self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def _word_start(self) -> int:
        """Where the text's last word starts (the last token that starts with a space, at most 16 tokens back):
        the tokens before it no longer change as text comes, the ones from it on may merge differently."""
        j = len(self.starts) - 1
        while j > 0 and j > len(self.starts) - 16 and not self.text[self.starts[j]:self.starts[j] + 1].isspace():
            j -= 1
        return self.starts[j] if j >= 0 and self.starts[j] >= self.k else self.k

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
