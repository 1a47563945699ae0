"""``sinkhole scan --quick`` end to end on the real SmolLM2: every step runs, the report renders
with the paper's phenomenon visible (a first-token norm far above the typical norm)."""

from __future__ import annotations

import json

import pytest

import sinkhole.cli as cli


@pytest.mark.real
def test_quick_scan_on_smollm2(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_from_args", lambda args: smollm2)
    out = tmp_path / "scan"
    rc = cli.main(["scan", "--quick", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert not doc.get("errors")
    assert doc["model"]["name"] == "smollm2-135m-instruct" and doc["options"]["quick"] is True
    ln = doc["results"]["layer_norms"]
    assert max(r for r in ln["ratio"] if r is not None) > 20  # the massive first-token norm (paper Sec. 3)
    html = (out / "report.html").read_text()
    assert 'class="verdict' in html and "class='section-error'" not in html
    names = {p.stem for p in (out / "figures").glob("*.svg")}
    assert names and all(f'data-figure="{n}"' in html for n in names)
    assert "step timings:" in err
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings["steps"]) == set(doc["steps"])
