"""The HTML report: built only from results.json, self-contained, every figure captioned and
labelled, sections isolated from each other's failures, ``sinkhole report DIR`` without a model."""

from __future__ import annotations

import json
import re

import pytest

import sinkhole.report.html as H
import sinkhole.report.markup as M
from helpers_report import tiny_scan
from sinkhole.report.figures import Figure, new
from sinkhole.results import SCHEMA_VERSION, write_json


def _doc(**results) -> dict:
    return {"schema_version": SCHEMA_VERSION, "sinkhole_version": "test", "model": {"name": "m"},
            "options": {"seed": 0, "quick": True}, "steps": ["model", *results], "results": results}


def _div(headline: str, status: str | None, n: int = 4) -> dict:
    """A valid divergence step result with the given verdict line."""
    from sinkhole.attack.diverge import DivergenceResult

    return DivergenceResult(n_cases=n, rate=0.5, garak_rate=0.25, either_rate=0.5, judges_agree=0.75,
                            min_reps_diverged=64, mean_tokens_until_divergence=3.0, by_template={},
                            by_template_reps=[], multi_token_words=[], max_new_tokens=8, method="generate",
                            cases=[], headline=headline, status=status).to_dict()


class _Sections:
    def __init__(self, monkeypatch):
        import sinkhole.report.layout as layout

        self.layout, self.mp = layout, monkeypatch

    def add(self, name, fn):
        self.mp.setattr(self.layout, "SECTIONS", self.layout.ordered(list(self.layout.SECTIONS) + [(name, fn)]))


@pytest.fixture
def sections_guard(monkeypatch):
    """Add report sections for one test (report/layout.SECTIONS is restored afterwards)."""
    return _Sections(monkeypatch)


def test_tiny_scan_report_has_every_section_and_figure():
    doc, out, figs = tiny_scan()
    assert not doc.get("errors"), doc.get("errors")
    html = (out / "report.html").read_text()
    assert figs, "a full scan must produce figures"
    for f in figs:
        assert html.count(f'data-figure="{f.name}"') == 1
        assert (out / "figures" / f"{f.name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / "figures" / f"{f.name}.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert "class='section-error'" not in html
    # the verdict comes before every section
    assert html.index('class="verdict') < html.index("<section")


def test_every_figure_has_a_caption_and_axis_labels():
    _, _, figs = tiny_scan()
    for f in figs:
        cap = f.caption.strip()
        assert len(cap) >= 30 and cap.endswith("."), f"{f.name}: caption should be a sentence saying what to look for"
        assert f.axes, f"{f.name}: no axes"
        for ax in f.axes:
            if ax["colorbar"]:
                assert ax["xlabel"] or ax["ylabel"], f"{f.name}: colorbar without a label"
            elif ax["has_data"]:
                assert ax["xlabel"] and ax["ylabel"], f"{f.name}: axes without labels {ax}"


def test_report_is_self_contained():
    _, out, _ = tiny_scan()
    html = (out / "report.html").read_text()
    # nothing is fetched: no external src/href/url(), no @import, no external scripts or fonts
    for m in re.finditer(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html):
        url = m.group(1)
        assert url.startswith(("data:", "#", "figures/")), url
    assert not re.search(r"url\((?!#|data:)", html)
    assert "@import" not in html and "@font-face" not in html
    assert "<script src" not in html and "<link" not in html


def test_render_is_deterministic():
    doc, _, _ = tiny_scan()
    a, _ = H.render(doc)
    b, _ = H.render(json.loads(json.dumps(doc)))
    assert a == b


def test_table_of_contents_lists_every_titled_section():
    doc, _, _ = tiny_scan()
    html, _ = H.render(doc)
    toc = re.search(r"<nav class='toc'.*?</nav>", html, re.S).group(0)
    for sec in re.finditer(r'<section id="(sec-[^"]+)"[^>]*><h2[^>]*>', html):
        assert f"href='#{sec.group(1)}'" in toc


def test_verdict_from_step_headlines(sections_guard):
    bad = _doc(divergence=_div("12 of 16 prompts diverged, the earliest at 200 repetitions.", "bad"),
               patch={"summary": "The patch stops 12 of 12 divergences; perplexity +0.1%.", "chosen": None,
                      "config": {}, "search": {}, "verification": {"targets": {"all": True}}})
    html, _ = H.render(bad)
    v = re.search(r'<div class="verdict (\w+)">(.*?)</div>', html, re.S)
    assert v.group(1) == "bad" and "Vulnerable" in v.group(2)
    assert "12 of 16 prompts diverged" in v.group(2) and "The patch stops" in v.group(2)
    assert v.group(2).index("12 of 16") < v.group(2).index("The patch")  # pipeline order
    good, _ = H.render(_doc(divergence=_div("0 of 16 prompts diverged.", "good")))
    assert 'class="verdict good"' in good and "Not vulnerable" in good
    none, _ = H.render(_doc())
    assert 'class="verdict unknown"' in none and "not measured" in none


def test_verdict_uses_the_patch_summary_and_a_renamed_field_fails_at_load(sections_guard):
    from sinkhole.errors import SinkholeError

    html, _ = H.render(_doc(patch={"summary": "Patch (clamp): divergence 50% -> 0%.", "chosen": "clamp",
                                   "config": {}, "search": {}, "verification": {"targets": {"all": True}}}))
    v = re.search(r'<div class="verdict (\w+)">(.*?)</div>', html, re.S)
    assert "Patch (clamp): divergence 50% -&gt; 0%." in v.group(2)
    renamed = _div("x", "bad")
    renamed["rate_run"] = renamed.pop("rate")  # the old name of the run judge's rate
    with pytest.raises(SinkholeError, match="rate_run"):
        H.render(_doc(divergence=renamed))


def test_verdict_escapes_html(sections_guard):
    html, _ = H.render(_doc(divergence=_div("<script>alert(1)</script>", "bad")))
    assert "<script>alert(1)" not in html and "&lt;script&gt;" in html


def test_a_broken_section_does_not_lose_the_report(sections_guard, monkeypatch):
    monkeypatch.delenv("SINKHOLE_DEBUG", raising=False)

    def _broken(doc):
        raise KeyError("curves")

    def _fine(doc):
        fig, ax = new(3, 2)
        ax[0][0].plot([0, 1], [1, 2])
        ax[0][0].set_xlabel("x (tokens)")
        ax[0][0].set_ylabel("y (norm)")
        return "<h2>Fine</h2>", [Figure("zz_fine", "A line that goes up: look at the slope.", fig)]

    sections_guard.add("zz_broken", _broken)
    sections_guard.add("zz_fine", _fine)
    html, figs = H.render(_doc())
    assert "class='section-error'" in html and "KeyError" in html
    assert 'data-figure="zz_fine"' in html and [f.name for f in figs][-1] == "zz_fine"
    monkeypatch.setenv("SINKHOLE_DEBUG", "1")
    with pytest.raises(KeyError):
        H.render(_doc())


def test_duplicate_figure_names_get_distinct_files(sections_guard, tmp_path):
    def make(doc):
        fig, ax = new(3, 2)
        ax[0][0].plot([0, 1], [0, 1])
        return "<h2>Dup</h2>", [Figure("dup", "Two figures with one name: both must be kept.", fig)]

    sections_guard.add("zz_a", make)
    sections_guard.add("zz_b", make)
    H.write_report(_doc(), tmp_path)
    assert (tmp_path / "figures" / "dup.png").exists() and (tmp_path / "figures" / "dup-2.png").exists()


def test_failed_steps_are_listed(sections_guard):
    doc = _doc()
    doc["errors"] = {"cluster": "RuntimeError: out of memory"}
    html, _ = H.render(doc)
    assert "Some steps failed" in html and "out of memory" in html


def test_figure_files_are_deterministic(tmp_path):
    def fig():
        f, ax = new(3, 2)
        ax[0][0].plot([0, 1, 2], [3, 1, 2])
        ax[0][0].set_xlabel("a")
        ax[0][0].set_ylabel("b")
        return Figure("det", "Deterministic output: same bytes twice.", f)

    a, b = fig(), fig()
    assert a.svg == b.svg and a.png == b.png


@pytest.mark.parametrize("x, s", [(None, "–"), (0.5, "0.5"), (12.345, "12.3"), (1234.5, "1,234"),
                                  (0.00123, "0.00123"), (3, "3"), (123456, "123,456"), (True, "yes"),
                                  (float("nan"), "–"), ("<b>", "&lt;b&gt;")])
def test_fmt(x, s):
    assert M.fmt(x) == s


def test_table_aligns_numbers_and_escapes_text():
    t = M.table(["a", "b"], [["<x>", 1.5], [M.raw("<i>ok</i>"), None]])
    assert "&lt;x&gt;" in t and '<td class="num">1.50</td>' in t and "<td><i>ok</i></td>" in t


# ----------------------------------------------------------------------------- sinkhole report DIR


def test_cli_report_rerenders_without_a_model(tmp_path, monkeypatch, capsys):
    import sinkhole.models.loading as loading
    from sinkhole.cli import main

    doc, out, figs = tiny_scan()
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("report must not load a model"))
    d = tmp_path / "copy"
    d.mkdir()
    (d / "results.json").write_text((out / "results.json").read_text())
    assert main(["report", str(d)]) == 0
    assert capsys.readouterr().out.strip() == str(d / "report.html")
    assert (d / "report.html").read_text() == (out / "report.html").read_text()
    assert sorted(p.name for p in (d / "figures").iterdir()) == sorted(p.name for p in (out / "figures").iterdir())
    # a results.json path and another --out work too
    assert main(["report", str(d / "results.json"), "--out", str(tmp_path / "other"), "-q"]) == 0
    assert (tmp_path / "other" / "report.html").exists() and capsys.readouterr().out == ""


@pytest.mark.parametrize("content, needle", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ('{"results": {}}', "schema_version"),
    ('{"schema_version": 999, "results": {}}', "schema_version 999"),
])
def test_cli_report_bad_input_is_one_line(tmp_path, capsys, content, needle):
    from sinkhole.cli import main

    if content is not None:
        (tmp_path / "results.json").write_text(content)
    rc = main(["report", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.startswith("sinkhole: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "report.html").exists()


def test_cli_report_reads_timings(tmp_path, capsys):
    from sinkhole.cli import main

    write_json(tmp_path / "results.json", _doc())
    write_json(tmp_path / "timings.json", {"steps": {"layer_norms": 12.5}, "load_model_s": 3.0, "total_s": 15.5})
    assert main(["report", str(tmp_path), "-q"]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "Scan timings" in html and "12.5" in html
