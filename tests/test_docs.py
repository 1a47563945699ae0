"""The user-facing docs (README.md and docs/*.md, docs/history.md aside) are written for users.

Checked here, each by a helper that a synthetic bad string shows can fail:

* no issue numbers (``issue 28``, ``issues 15-17``, ``(#21)``) and no work-session ordinals
  (``this session``, ``the ninth session``); docs/history.md keeps the story and is exempt;
* no absolute path of a machine (``/work/...``, ``/root/...``, ``/home/NAME``, ``/tmp/...``);
* every count of architecture families (``16 architecture families``) equals
  ``len(sinkhole.models.adapters.SUPPORTED)``, the one source of that number;
* no markdown table cell longer than 300 characters;
* every relative link of README.md and every docs/*.md (docs/history.md included) points at a file that
  exists, relative to the doc, and, with ``#anchor`` into a .md file, at one of its headings (GitHub's
  anchors: lower case, punctuation dropped, spaces to hyphens, a repeated heading -1, -2, ...); links with a
  scheme (https:) and links inside code are skipped.
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

# [text](target) and ![alt](target), the target optionally in <...> and followed by a "title"
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens; a link in the heading counts by its text, code and emphasis by their content."""
    h = heading.strip().rstrip("#").strip().lower()  # a closing run of #'s is not part of the heading
    h = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", h)
    h = re.sub(r"`|\*\*?|__", "", h)
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def _prose_lines(text: str, blank_code: bool = True):
    """(line number, line) outside fenced code blocks, inline code spans blanked out unless blank_code is
    False."""
    fenced = None
    for i, line in _lines(text):
        m = re.match(r"\s*(```+|~~~+)", line)
        if m:
            fence = m.group(1)[0] * 3
            if fenced is None:
                fenced = fence
            elif fence == fenced:
                fenced = None
            continue
        if fenced is None:
            yield i, CODE_SPAN.sub(lambda c: " " * len(c.group(0)), line) if blank_code else line


def anchors(text: str) -> set[str]:
    """Every anchor GitHub makes in a markdown file: one per ATX heading (``#`` to ``######``, outside code
    blocks), a repeated heading getting -1, -2, ... in order, plus explicit ``<a name=...>``/``<a id=...>``."""
    out, seen = set(), {}
    for _, line in _prose_lines(text, blank_code=False):
        out.update(HTML_ANCHOR.findall(line))
        m = re.match(r" {0,3}#{1,6}\s+(.*)", line)
        if m:
            s = slug(m.group(1))
            k = seen.get(s, 0)
            out.add(s if k == 0 else f"{s}-{k}")
            seen[s] = k + 1
    return out


def _anchors_of(path: Path, cache: dict) -> set[str]:
    if path not in cache:
        cache[path] = anchors(path.read_text(encoding="utf-8"))
    return cache[path]


def broken_links(path: Path) -> list[str]:
    """Every relative link of a markdown file whose file does not exist (relative to the file) or whose
    ``#anchor`` into a .md file matches none of its headings, as 'line: target (why)'. Links with a scheme
    (https:, mailto:) are skipped, and so are links inside code."""
    bad, cache = [], {}
    for i, line in _prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(line):
            target = m.group(1)
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{i}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors_of(dest, cache):
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


@pytest.mark.parametrize("doc", all_docs(), ids=_id)
def test_relative_links_resolve(doc):
    assert broken_links(doc) == [], f"{_id(doc)}: links to a missing file or heading"


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


def test_broken_links_catches_an_old_findings_anchor(tmp_path):
    """The links the split of findings.md broke: a section number or an anchor that moved to a topic file."""
    (tmp_path / "findings.md").write_text("# Findings\n\n| file |\n|---|\n| [fix.md](fix.md) |\n", encoding="utf-8")
    (tmp_path / "fix.md").write_text("# The fix\n\n## Seeds\n", encoding="utf-8")
    doc = tmp_path / "results.md"
    doc.write_text("| a | [seeds](findings.md#seeds) |\n| b | [seeds](fix.md#seeds) |\n"
                   "[findings 3.3](findings.md#33-smollm2-on-the-broad-set)\n", encoding="utf-8")
    assert broken_links(doc) == ["1: findings.md#seeds (no such heading)",
                                 "3: findings.md#33-smollm2-on-the-broad-set (no such heading)"]


def test_anchors_follow_github():
    text = ("# Title\n## The paper's neuron patch: the baseline\n### In llama.cpp\n## Seeds\n## Seeds\n## Seeds\n"
            "## `sinkhole scan` runs\n## 3.1 The broad set (`sinkhole.attack.families`, issue 5)\n"
            "## SmolLM2-135M-Instruct (Llama, 30 layers, d_mlp 1536)\n## A [link](x.md) here ##\n"
            "```\n# a comment in code\n```\n<a name=\"custom\"></a>\n")
    assert anchors(text) == {
        "title", "the-papers-neuron-patch-the-baseline", "in-llamacpp", "seeds", "seeds-1", "seeds-2",
        "sinkhole-scan-runs", "31-the-broad-set-sinkholeattackfamilies-issue-5",
        "smollm2-135m-instruct-llama-30-layers-d_mlp-1536", "a-link-here", "custom"}


def test_broken_links_resolves_duplicate_headings_and_skips_code(tmp_path):
    (tmp_path / "a.md").write_text("# A\n## Time\ntext\n## Time\n", encoding="utf-8")
    doc = tmp_path / "b.md"
    doc.write_text("[1](a.md#time) [2](a.md#time-1) [3](a.md#time-2) [self](#b) [img](a.md \"a title\")\n"
                   "`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n# B\n", encoding="utf-8")
    assert broken_links(doc) == ["1: a.md#time-2 (no such heading)"]
