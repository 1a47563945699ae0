"""The user-facing docs (README.md and docs/*.md, docs/history.md aside) are written for users.

Checked here, each by a helper that a synthetic bad string shows can fail:

* no issue numbers (``issue 28``, ``issues 15-17``, ``(#21)``) and no work-session ordinals
  (``this session``, ``the ninth session``); docs/history.md keeps the story and is exempt;
* no absolute path of a machine (``/work/...``, ``/root/...``, ``/home/NAME``, ``/tmp/...``);
* every count of architecture families (``16 architecture families``) equals
  ``len(sinkhole.models.adapters.SUPPORTED)``, the one source of that number;
* no markdown table cell longer than 300 characters;
* every relative link between the docs points at a file that exists and, with ``#anchor``, at one of its
  headings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXEMPT = {"history.md"}  # the story of the project: issue numbers and sessions may stay there


def user_docs() -> list[Path]:
    """README.md and every docs/*.md except the history."""
    out = [ROOT / "README.md"] if (ROOT / "README.md").exists() else []
    return out + sorted(p for p in DOCS.glob("*.md") if p.name not in EXEMPT)


def all_docs() -> list[Path]:
    out = [ROOT / "README.md"] if (ROOT / "README.md").exists() else []
    return out + sorted(DOCS.glob("*.md"))


def _lines(text: str):
    for i, line in enumerate(text.splitlines(), 1):
        yield i, line


# -- issue numbers and session ordinals ---------------------------------------------------------------

ORDINALS = (r"first|second|third|(?!with\b|both\b)\w+th|founding|this|last|next|previous|earlier|later")
LAB_PATTERNS = [
    re.compile(r"\bissues?\s+#?\d+", re.I),              # issue 28, issues 15-17, issue #12
    re.compile(r"\(#\d+\)"),                             # (#21)
    re.compile(rf"\b(?:{ORDINALS})\s+(?:working\s+)?sessions?\b", re.I),  # this session, the ninth session
    re.compile(r"\bsessions?\s+\d+", re.I),              # sessions 1-6
    re.compile(r"\bsession\s+by\s+session\b", re.I),
]


def lab_notes(text: str) -> list[str]:
    """Every issue number or work-session ordinal in text, as 'line: match'."""
    hits = []
    for i, line in _lines(text):
        for pat in LAB_PATTERNS:
            hits += [f"{i}: {m.group(0)}" for m in pat.finditer(line)]
    return hits


# -- absolute paths ---------------------------------------------------------------------------------------

ABS_PATH = re.compile(r"(/work/|/root/|/home/\w+|/tmp/)")


def absolute_paths(text: str) -> list[str]:
    return [f"{i}: {m.group(0)}" for i, line in _lines(text) for m in ABS_PATH.finditer(line)]


# -- counts of architecture families ---------------------------------------------------------------------

NUMBER_WORDS = {w: n for n, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
COUNT = re.compile(
    r"\b(\d+|" + "|".join(NUMBER_WORDS) + r")\s+(?:supported\s+)?(?:model\s+)?architecture\s+families\b"
    r"|\b(\d+|" + "|".join(NUMBER_WORDS) + r")\s+(?:supported\s+)?families\s+of\s+(?:model\s+)?architectures?\b",
    re.I)


def family_counts(text: str) -> list[tuple[int, int]]:
    """[(line, count)] for every 'N architecture families' / 'N families of architecture' in text."""
    out = []
    for i, line in _lines(text):
        for m in COUNT.finditer(line):
            word = (m.group(1) or m.group(2)).lower()
            out.append((i, int(word) if word.isdigit() else NUMBER_WORDS[word]))
    return out


def wrong_family_counts(text: str, n: int) -> list[str]:
    return [f"{i}: {c} (should be {n})" for i, c in family_counts(text) if c != n]


# -- table cells -----------------------------------------------------------------------------------------

MAX_CELL = 300


def table_cells(text: str) -> list[tuple[int, str]]:
    """[(line, cell)] of every markdown table row outside fenced code blocks."""
    out, fenced = [], False
    for i, line in _lines(text):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        s = line.strip()
        if fenced or not (s.startswith("|") and s.endswith("|") and len(s) > 1):
            continue
        # split on pipes that are not escaped (\|) and not inside `code`
        cells, cur, code, prev = [], "", False, ""
        for ch in s[1:-1]:
            if ch == "`":
                code = not code
            if ch == "|" and not code and prev != "\\":
                cells.append(cur)
                cur = ""
            else:
                cur += ch
            prev = ch
        cells.append(cur)
        out += [(i, c.strip()) for c in cells]
    return out


def long_cells(text: str, limit: int = MAX_CELL) -> list[str]:
    return [f"{i}: {len(c)} chars: {c[:60]}..." for i, c in table_cells(text) if len(c) > limit]


# -- links between the docs ------------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"`|\*\*?|__", "", heading.strip().lower())
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", h)
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def anchors(text: str) -> set[str]:
    out, seen, fenced = set(), {}, False
    for _, line in _lines(text):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.*)", line)
        if m:
            s = slug(m.group(1))
            k = seen.get(s, 0)
            out.add(s if k == 0 else f"{s}-{k}")
            seen[s] = k + 1
    return out


def broken_links(path: Path) -> list[str]:
    bad = []
    for i, line in _lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(line):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{i}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
                bad.append(f"{i}: {target} (no such heading)")
    return bad


# -- the checks on the real docs -------------------------------------------------------------------------

def _id(p: Path) -> str:
    return str(p.relative_to(ROOT))


@pytest.mark.parametrize("doc", user_docs(), ids=_id)
def test_no_issue_numbers_or_session_ordinals(doc):
    assert lab_notes(doc.read_text(encoding="utf-8")) == [], f"{_id(doc)}: lab-notebook references"


@pytest.mark.parametrize("doc", user_docs(), ids=_id)
def test_no_absolute_paths(doc):
    assert absolute_paths(doc.read_text(encoding="utf-8")) == [], f"{_id(doc)}: absolute paths of a machine"


@pytest.mark.parametrize("doc", all_docs(), ids=_id)
def test_architecture_family_counts_come_from_supported(doc):
    from sinkhole.models.adapters import SUPPORTED

    assert wrong_family_counts(doc.read_text(encoding="utf-8"), len(SUPPORTED)) == []


@pytest.mark.parametrize("doc", user_docs(), ids=_id)
def test_table_cells_are_short(doc):
    assert long_cells(doc.read_text(encoding="utf-8")) == [], f"{_id(doc)}: table cells over {MAX_CELL} chars"


OWNED = ["findings.md", "circuit.md", "divergence.md", "fix.md", "experimental.md", "history.md",
         "architecture.md", "reliability.md", "results-schema.md"]


@pytest.mark.parametrize("name", [n for n in OWNED if (DOCS / n).exists()])
def test_links_between_docs_resolve(name):
    assert broken_links(DOCS / name) == []


def test_the_topic_files_exist_and_findings_is_an_index():
    for name in ("circuit.md", "divergence.md", "fix.md", "experimental.md"):
        assert (DOCS / name).exists(), name
    index = (DOCS / "findings.md").read_text(encoding="utf-8")
    assert len(index.splitlines()) < 40
    for name in ("circuit.md", "divergence.md", "fix.md", "experimental.md"):
        assert f"({name})" in index


# -- each helper can fail ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    "## 6. A stock model file (issue 28)", "issues 15-17 measured it", "see issue #12", "the patch (#21)",
    "measured in this session", "the fourteenth session found", "The founding session's setting",
    "in the third session", "sessions 1-6", "Time, session by session", "the last session",
])
def test_lab_notes_catches(bad):
    assert lab_notes(bad)


@pytest.mark.parametrize("good", [
    "[3.3](fix.md#33-smollm2-on-the-broad-set)", "a chat session with the model", "the 16-repetition floor",
    "tissue 3 of the model", "see [Seeds](#seeds)", "both sessions of garak", "a session with the model",
])
def test_lab_notes_spares(good):
    assert lab_notes(good) == []


@pytest.mark.parametrize("bad", ["cd /work/main", "--keep /tmp/stock.pt", "/root/.cache/x", "/home/alice/models"])
def test_absolute_paths_catches(bad):
    assert absolute_paths(bad)


def test_absolute_paths_spares_relative_ones():
    assert absolute_paths("python studies/stock/study_stock.py --keep stock.pt --out out/smollm2") == []


def test_family_counts_are_read_and_checked():
    text = ("tiny models of all 16 architecture families\nthirteen supported architecture families\n"
            "12 attack families\n14 families of architectures")
    assert family_counts(text) == [(1, 16), (2, 13), (4, 14)]
    assert wrong_family_counts(text, 16) == ["2: 13 (should be 16)", "4: 14 (should be 16)"]


def test_long_cells_catches_a_long_cell_and_spares_code_pipes():
    long = "x" * 301
    assert long_cells(f"| a | b |\n|---|---|\n| {long} | ok |")
    assert long_cells(f"| a | b |\n|---|---|\n| {'y' * 300} | ok |") == []
    assert table_cells("| `a | b` | c |") == [(1, "`a | b`"), (1, "c")]
    assert long_cells(f"```\n| {long} |\n```") == []  # inside a code block: not a table


def test_broken_links_catches_a_missing_file_and_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Some section (x)\n", encoding="utf-8")
    doc = tmp_path / "b.md"
    doc.write_text("[ok](a.md#some-section-x) [no](missing.md) [bad](a.md#nothing) [web](https://x.org)\n",
                   encoding="utf-8")
    assert broken_links(doc) == ["1: missing.md (no such file)", "1: a.md#nothing (no such heading)"]
