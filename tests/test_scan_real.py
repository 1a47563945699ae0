"""``sinkhole scan --quick`` end to end on the real SmolLM2: the CLI runs, the report renders with
the paper's phenomenon visible (a first-token norm far above the typical norm) and passes the
browser check. To stay in the CI budget only the light steps run; SINKHOLE_FULL_REAL=1 runs every
step (several minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import os

import pytest

import sinkhole.cli as cli
import sinkhole.pipeline.registry as scan
from sinkhole.report.browser import find_chromium


@pytest.fixture
def light_steps(monkeypatch):
    import sinkhole.pipeline.registry as scan_steps

    if not os.environ.get("SINKHOLE_FULL_REAL"):  # norm_curves finds the circuit itself (about a second)
        light = [s for s in scan.PIPELINE if s.name in ("model", "layer_norms", "norm_curves")]
        monkeypatch.setattr(scan_steps, "PIPELINE", scan.pipeline(light))


@pytest.mark.real
def test_quick_scan_on_smollm2(smollm2, tmp_path, monkeypatch, capsys, light_steps):
    monkeypatch.setattr(cli, "load_from_args", lambda args: smollm2)
    out = tmp_path / "scan"
    rc = cli.main(["scan", "--quick", "--out", str(out), "--curve-reps", "200"])
    err = capsys.readouterr().err
    assert rc == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert not doc.get("errors")
    assert doc["model"]["name"] == "smollm2-135m-instruct" and doc["options"]["quick"] is True
    ln = doc["results"]["layer_norms"]
    assert max(r for r in ln["ratio"] if r is not None) > 20  # the massive first-token norm (paper Sec. 3)
    assert doc["results"]["norm_curves"]["layer"] == 11  # the circuit's massive layer
    html = (out / "report.html").read_text()
    assert 'class="verdict' in html and "class='section-error'" not in html
    names = {p.stem for p in (out / "figures").glob("*.svg")}
    assert {"layer_norms", "fig2_norm_vs_reps"} <= names
    assert all(f'data-figure="{n}"' in html for n in names)
    assert "step timings:" in err
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings["steps"]) == set(doc["steps"])
    if find_chromium():
        from sinkhole.report.browser import check_page

        info = check_page(out / "report.html")
        assert info["console_errors"] == [] and info["figures_ok"] == f"{len(names)}/{len(names)}"
