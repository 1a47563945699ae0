"""Report sections of the attack module, built from real (tiny-model) results."""

from sinkhole.attack.cluster import ClusterConfig, cluster_attack
from sinkhole.attack.diverge import DivergeConfig, diverge
from sinkhole.attack.sweep import SweepConfig, frequent_tokens, summarize, sweep_tokens
from sinkhole.report.sections_attack import cluster_section, divergence_section, sweep_section
from sinkhole.results import clean


def test_sections_render_from_results(tiny):
    div = diverge(tiny, ["poem", "a"], [2, 6], ["raw", "repeat"], DivergeConfig(max_new_tokens=3), quiet=True)
    sw = summarize(sweep_tokens(tiny, frequent_tokens(tiny, 8), SweepConfig(max_reps=12), quiet=True), top=5)
    cl = cluster_attack(tiny, ClusterConfig(pool_size=30, n_seeds=2, size=3, length=20, seqs_per_cluster=1,
                                            n_examples=1, max_new_tokens=2), quiet=True)
    doc = clean({"results": {"divergence": div, "sweep": sw, "cluster": cl}})
    html, figs = divergence_section(doc)
    assert "Divergence by generation" in html and "raw" in html and "garak" in html
    assert len(figs) == 1 and figs[0].axes[0]["xlabel"] and figs[0].axes[0]["ylabel"]
    html, figs = sweep_section(doc)
    assert "Most sink-prone tokens" in html and html.count("<tr>") >= 6
    assert figs and all(a["xlabel"] and a["ylabel"] for f in figs for a in f.axes)
    html, figs = cluster_section(doc)
    assert "random (control)" in html and figs == []
    assert divergence_section({"results": {}}) is None and sweep_section({}) is None
    assert cluster_section({"results": {"cluster": {}}}) is None
