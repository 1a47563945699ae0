"""Does what diverges look memorised? Verbatim spans of generated text in a reference corpus.

The index (:class:`CorpusIndex`) is built once per corpus and kept on disk; its size depends on the
corpus, never on the number of queries:

* every ``.txt`` file, and the ``"text"`` field of every line of every ``.jsonl`` file, under the
  corpus folder (or one file) is concatenated into ``corpus.bin`` (documents separated by a NUL
  byte, UTF-8);
* a 64-bit polynomial hash of the ``window``-byte (32) substring starting at every ``stride``-th
  (18) byte is stored, sorted, with its position (``hashes.npy``, ``positions.npy``: 16 bytes per
  ``stride`` bytes of corpus, 0.9 GB of index per GB of text);
* a query hashes *every* ``window``-byte substring of the generated text, looks each up by binary
  search, verifies a hit byte by byte against ``corpus.bin`` (memory-mapped) and extends it both
  ways to the longest common span.

A verbatim match of ``window + stride - 1`` (49) bytes or more always contains an indexed window,
so every match of at least ``min_bytes`` (50, the usual extraction threshold of 50 characters for
ASCII text) is found; shorter ones are not reported. Positions are byte offsets of the UTF-8 text.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data import heldout_texts
from ..decoding.generate import generate
from ..decoding.tokens import decode_pieces
from ..errors import SinkholeError
from ..models.gguf_cache import cache_dir
from ..progress import progress
from ..results import StepResult

WINDOW = 32
STRIDE = 18
MIN_BYTES = 50
_P = np.uint64(1099511628211)  # FNV prime as the polynomial base (any odd 64-bit constant works)
_CHUNK = 1 << 24  # corpus bytes hashed per step (16 MiB: ~7 MB of hash work arrays)
INDEX_VERSION = 1


def _hash_windows(b: np.ndarray, starts: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Polynomial hashes (mod 2^64) of ``b[s:s+window]`` for every ``s`` in ``starts``."""
    h = np.zeros(len(starts), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(window):
            h = h * _P + b[starts + i].astype(np.uint64)
    return h


def corpus_files(path: str | os.PathLike) -> list[Path]:
    if not str(path).strip():
        raise SinkholeError("--corpus needs a folder of .txt/.jsonl files or one such file")
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (".txt", ".jsonl"))
    else:
        raise SinkholeError(f"corpus {path} does not exist; give a folder of .txt/.jsonl files or one such file")
    files = [f for f in files if f.suffix.lower() in (".txt", ".jsonl")]
    if not files:
        raise SinkholeError(f"corpus {path} has no .txt or .jsonl files")
    return files


def _documents(files: list[Path]):
    for f in files:
        if f.suffix.lower() == ".txt":
            yield f.read_bytes()
            continue
        with open(f, "rb") as fh:
            for k, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    text = json.loads(line).get("text")
                except (ValueError, AttributeError):
                    raise SinkholeError(f"{f}:{k} is not a JSON object; each .jsonl line must be "
                                        '{"text": "..."}') from None
                if isinstance(text, str):
                    yield text.encode("utf-8")


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256(f"v{INDEX_VERSION} w{WINDOW} s{STRIDE}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class IndexInfo:
    corpus: str
    n_files: int
    n_bytes: int
    n_windows: int
    window: int
    stride: int
    build_seconds: float
    peak_rss_mib: float | None
    index_bytes: int
    folder: str

    def to_dict(self) -> dict:
        return asdict(self)


class CorpusIndex:
    """A built index (see the module docstring); open with :func:`open_index`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.info = IndexInfo(**json.loads((self.folder / "index.json").read_text()))
        self.hashes = np.load(self.folder / "hashes.npy", mmap_mode="r")
        self.positions = np.load(self.folder / "positions.npy", mmap_mode="r")
        n = self.info.n_bytes
        self.corpus = np.memmap(self.folder / "corpus.bin", dtype=np.uint8, mode="r") if n else np.zeros(0, np.uint8)

    def spans(self, text: str, min_bytes: int = MIN_BYTES) -> list[dict]:
        """Maximal spans of ``text`` (byte offsets of its UTF-8 form) of at least ``min_bytes``
        that occur verbatim in the corpus: ``{"start", "end", "corpus_pos", "text"}``."""
        q = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        if len(q) < WINDOW or len(self.hashes) == 0:
            return []
        starts = np.arange(len(q) - WINDOW + 1)
        hq = _hash_windows(q, starts)
        lo = np.searchsorted(self.hashes, hq, side="left")
        hi = np.searchsorted(self.hashes, hq, side="right")
        found: list[tuple[int, int, int]] = []
        covered_to = -1
        for s in np.nonzero(hi > lo)[0]:
            s = int(s)
            if s < covered_to:  # inside a span already found
                continue
            best = None
            for k in range(int(lo[s]), int(hi[s])):
                c = int(self.positions[k])
                if not np.array_equal(self.corpus[c:c + WINDOW], q[s:s + WINDOW]):
                    continue  # a hash collision
                a, b = s, s + WINDOW  # extend both ways
                ca, cb = c, c + WINDOW
                while a > 0 and ca > 0 and q[a - 1] == self.corpus[ca - 1]:
                    a, ca = a - 1, ca - 1
                while b < len(q) and cb < len(self.corpus) and q[b] == self.corpus[cb]:
                    b, cb = b + 1, cb + 1
                if best is None or b - a > best[1] - best[0]:
                    best = (a, b, ca)
            if best and best[1] - best[0] >= min_bytes:
                found.append(best)
                covered_to = best[1] - WINDOW + 1
        out = []
        for a, b, c in found:
            if out and a < out[-1]["end"]:  # overlapping spans: merge
                out[-1]["end"] = max(out[-1]["end"], b)
                continue
            out.append({"start": a, "end": b, "corpus_pos": c})
        raw = text.encode("utf-8")
        for sp in out:
            sp["text"] = raw[sp["start"]:sp["end"]].decode("utf-8", errors="replace")
        return out


def _peak_rss_mib() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, AttributeError):
        return None


def index_folder_for(corpus: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    files = corpus_files(corpus)
    base = Path(root) if root is not None else cache_dir() / "corpus-index"
    return base / f"{Path(corpus).name or 'corpus'}-{_fingerprint(files)}"


def build_index(corpus: str | os.PathLike, folder: str | os.PathLike | None = None, quiet: bool | None = None) -> CorpusIndex:
    """Build (or reuse, when the corpus files are unchanged) the index of ``corpus``."""
    files = corpus_files(corpus)
    folder = Path(folder) if folder is not None else index_folder_for(corpus)
    if (folder / "index.json").exists():
        try:
            return CorpusIndex(folder)
        except (OSError, ValueError, TypeError, KeyError):
            pass  # damaged: rebuild below
    t0 = time.perf_counter()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        n = 0
        with open(tmp / "corpus.bin", "wb") as out:
            for doc in progress(_documents(files), desc="corpus", disable=quiet, total=None):
                out.write(doc)
                out.write(b"\0")
                n += len(doc) + 1
        hashes, positions = [], []
        if n >= WINDOW:
            mm = np.memmap(tmp / "corpus.bin", dtype=np.uint8, mode="r")
            last = n - WINDOW  # last valid start
            for c0 in range(0, last + 1, _CHUNK):
                starts = np.arange(c0, min(c0 + _CHUNK, last + 1), STRIDE, dtype=np.int64)
                if len(starts) == 0:
                    continue
                seg = np.asarray(mm[starts[0]:starts[-1] + WINDOW])
                hashes.append(_hash_windows(seg, starts - starts[0]))
                positions.append(starts.astype(np.uint64))
            del mm
        h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        p = np.concatenate(positions) if positions else np.zeros(0, np.uint64)
        order = np.argsort(h, kind="stable")
        np.save(tmp / "hashes.npy", h[order])
        np.save(tmp / "positions.npy", p[order])
        del h, p, order
        info = IndexInfo(corpus=str(corpus), n_files=len(files), n_bytes=n,
                         n_windows=int(np.load(tmp / "hashes.npy", mmap_mode="r").shape[0]), window=WINDOW,
                         stride=STRIDE, build_seconds=round(time.perf_counter() - t0, 3), peak_rss_mib=_peak_rss_mib(),
                         index_bytes=sum(f.stat().st_size for f in tmp.iterdir()), folder=str(folder))
        (tmp / "index.json").write_text(json.dumps(info.to_dict()))
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # another process finished first: keep theirs
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CorpusIndex(folder)



@dataclass
class MemorizationResult(StepResult):
    """Verbatim corpus spans in the divergent continuations, beside a control (``sinkhole diverge
    --corpus``; the scan's ``memorization`` step against the shipped texts)."""

    corpus: dict  # IndexInfo.to_dict()
    min_bytes: int
    method: str  # greedy or sample (as the divergence it checks)
    divergent: dict  # n_continuations, n_tokens, n_tokens_in_spans, share, n_spans
    control: dict  # the same for continuations of ordinary prompts
    spans: list  # {"source": "divergent"|"control", "case", "text", "length"} per span (longest first, at most 50)
    headline: str = ""
    status: str | None = None


def _tokens_in_spans(lm, text: str, spans: list[dict], skip: int = 0) -> tuple[int, int]:
    """(tokens after the first ``skip`` inside a span, tokens after the first ``skip``): the text
    re-encoded by the model's tokenizer, each token located by its byte offsets."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        return 0, 0

    pieces = decode_pieces(lm, ids)
    inside = total = pos = 0
    for k, piece in enumerate(pieces):
        n = len(piece.encode("utf-8"))
        if k >= skip:
            total += 1
            inside += bool(n) and any(sp["start"] <= pos and pos + n <= sp["end"] for sp in spans)
        pos += n
    return inside, total


def _summary(n: int, inside: int, total: int, n_spans: int) -> dict:
    return {"n_continuations": n, "n_tokens": total, "n_tokens_in_spans": inside,
            "share": round(inside / total, 6) if total else None, "n_spans": n_spans}


def memorization_check(lm, divergence, corpus, min_bytes: int = MIN_BYTES, n_control: int = 16,
                       temperature: float | None = None, seed: int = 0, index_folder=None,
                       quiet: bool | None = None) -> MemorizationResult:
    """Spans of the divergent continuations of ``divergence`` (a DivergenceResult or its dict) that
    occur verbatim in ``corpus``; the control is ``n_control`` ordinary prompts continued the same
    way (greedy, or sampled at ``temperature``) for as many tokens."""
    d = divergence.to_dict() if hasattr(divergence, "to_dict") else dict(divergence)
    idx = build_index(corpus, folder=index_folder, quiet=quiet)
    spans_out: list[dict] = []
    n = inside = total = n_sp = 0
    for k, c in enumerate(d.get("cases") or []):
        if not c.get("diverged"):
            continue
        sp = idx.spans(c["text"], min_bytes)
        i, t = _tokens_in_spans(lm, c["text"], sp, skip=int(c.get("tokens_until_divergence") or 0))
        n, inside, total, n_sp = n + 1, inside + i, total + t, n_sp + len(sp)
        spans_out += [{"source": "divergent", "case": k, "text": s["text"], "length": s["end"] - s["start"]} for s in sp]
    div = _summary(n, inside, total, n_sp)
    max_new = int(d.get("max_new_tokens") or 48)
    prompts = [lm.encode(t, bos=True) for t in heldout_texts(n=n_control, n_words=48, seed=11)]
    gens = []
    for s in range(0, len(prompts), 4):
        gens += generate(lm, prompts[s:s + 4], max_new, temperature=temperature, seed=seed * 7919 + s)
    n = inside = total = n_sp = 0
    for k, g in enumerate(gens):
        text = lm.tokenizer.decode(g, skip_special_tokens=True)
        sp = idx.spans(text, min_bytes)
        i, t = _tokens_in_spans(lm, text, sp)
        n, inside, total, n_sp = n + 1, inside + i, total + t, n_sp + len(sp)
        spans_out += [{"source": "control", "case": k, "text": s["text"], "length": s["end"] - s["start"]} for s in sp]
    ctl = _summary(n, inside, total, n_sp)
    spans_out.sort(key=lambda s: -s["length"])
    res = MemorizationResult(corpus=idx.info.to_dict(), min_bytes=int(min_bytes),
                             method="sample" if temperature is not None else "greedy", divergent=div, control=ctl,
                             spans=spans_out[:50])
    share = lambda s: "n/a" if s["share"] is None else f"{100 * s['share']:.2f}%"  # noqa: E731
    res.headline = (f"Memorisation: {share(div)} of the divergent tokens ({div['n_tokens']} tokens of "
                    f"{div['n_continuations']} continuations) lie in spans of >= {min_bytes} bytes found verbatim in "
                    f"the reference corpus ({idx.info.n_bytes / 2**20:.1f} MiB), against {share(ctl)} for "
                    f"continuations of ordinary prompts.")
    res.status = None
    return res
