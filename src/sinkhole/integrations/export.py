"""Export the most effective prompts sinkhole found to the red-team tools users already run.

``collect_prompts(doc)`` gathers, from a results document (a scan's ``results.json`` or the
``--json`` of ``diverge``/``sweep``/``cluster``), the prompts that diverged or reached a sink:

* the divergence step's diverged cases (their prompt text, word and repetition count);
* the minimum-repetition search: each word at its minimum count (and twice it, to be safe);
* the sweep's most sink-prone tokens, repeated ``sweep_reps`` times after garak's wording;
* the cluster attack's diverged example sequences.

``write_export(prompts, fmt, path)`` writes them as

* ``garak``: a garak probe module (a subclass of garak's own ``divergence.Repeat``, so garak's
  ``RepeatDiverges`` detector scores it, with each prompt's repeated word in the attempt notes).
  Copy it into garak's ``probes`` package and run ``garak --model_type huggingface --model_name
  MODEL --probes sinkhole_divergence.SinkholeRepeat``;
* ``garak-payload``: a garak payload group (JSON in garak's payload schema), for probes that take
  payloads;
* ``pyrit``: a PyRIT seed dataset (YAML), loaded with
  ``pyrit.models.SeedDataset.from_yaml_file(PATH)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..attack.prompts import GARAK_TEXT
from ..errors import SinkholeError
from ..results import write_atomic

FORMATS = ("garak", "garak-payload", "pyrit")
GARAK_WORDING = GARAK_TEXT["garak_this"]  # garak's divergence.Repeat wording


def prompt_text(word: str, reps: int, template: str) -> str:
    """The user-facing text of a divergence case: what a red-team tool sends (it applies the chat
    template itself). ``chat_assistant`` pre-fills the assistant turn, which a user prompt cannot
    do: its text is the user turn with the run inside the quotes, as ``chat_user``."""
    run = " ".join([word] * int(reps))
    if template == "raw":
        return run
    if template == "repeat":
        return "Repeat: " + run
    key = "garak_this" if template in ("chat_user", "chat_assistant") else template
    return GARAK_TEXT[key].replace("[XX]", run)


def _from_case(c: dict, source: str) -> dict | None:
    try:
        text = prompt_text(c["word"], c["reps"], c["template"])
    except KeyError:  # a template this version does not know
        return None
    return {"prompt": text, "word": c.get("word", ""), "reps": c.get("reps"), "source": source}


def collect_prompts(doc: dict, sweep_top: int = 10, sweep_reps: int = 400) -> list[dict]:
    """The prompts worth exporting from a results document (module docstring), deduplicated."""
    res = doc.get("results") or {}
    out: list[dict] = []
    div = res.get("divergence") or {}
    for c in div.get("cases") or []:
        if c.get("diverged") or c.get("garak_diverged"):
            p = _from_case(c, "divergence")
            if p:
                out.append(p)
    mr = res.get("min_reps") or {}
    for w in mr.get("words") or []:
        if w.get("min_reps"):
            for n in (w["min_reps"], 2 * w["min_reps"]):
                out.append({"prompt": GARAK_WORDING.replace("[XX]", " ".join([w["word"]] * n)), "word": w["word"],
                            "reps": n, "source": "min_reps"})
    sw = res.get("sweep") or {}
    for r in (sw.get("top") or [])[:sweep_top]:
        if r.get("reps_to_sink") is not None:
            tok = str(r.get("token", "")).strip()
            if tok:
                out.append({"prompt": GARAK_WORDING.replace("[XX]", " ".join([tok] * sweep_reps)), "word": tok,
                            "reps": sweep_reps, "source": "sweep"})
    cl = res.get("cluster") or {}
    for e in cl.get("examples") or []:
        if e.get("diverged") and e.get("prompt"):
            out.append({"prompt": e["prompt"], "word": "", "reps": None, "source": "cluster"})
    seen, uniq = set(), []
    for p in out:
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            uniq.append(p)
    return uniq


def _garak_module(prompts: list[dict], model: str) -> str:
    lines = [
        '"""Prompts that made ' + model.replace('"', "'") + ' diverge or reach an attention sink, found by sinkhole.',
        "",
        "Copy this file into garak's probes package (python -c 'import garak.probes, os; "
        "print(os.path.dirname(garak.probes.__file__))')",
        "and run: garak --model_type huggingface --model_name MODEL --probes sinkhole_divergence.SinkholeRepeat",
        '"""',
        "",
        "from garak.probes.divergence import Repeat",
        "",
        "",
        "class SinkholeRepeat(Repeat):",
        '    """Repeated-token divergence prompts exported by sinkhole (scored by garak\'s RepeatDiverges)."""',
        "",
        '    goal = "get the model to leak data by asking it to repeat words"',
        "    active = False  # runs when named, not in garak's default sweep",
        f"    sinkhole_prompts = {json.dumps([p['prompt'] for p in prompts], ensure_ascii=False)}",
        f"    sinkhole_words = {json.dumps([p['word'] for p in prompts], ensure_ascii=False)}",
        "",
        "    def __init__(self, config_root=None):",
        "        if config_root is None:",
        "            from garak import _config as config_root",
        "        super().__init__(config_root=config_root)",
        "        self.prompts = list(self.sinkhole_prompts)",
        "        self.repeat_words = list(self.sinkhole_words)",
        "",
    ]
    return "\n".join(lines)


def _pyrit_yaml(prompts: list[dict], model: str) -> str:
    def q(s: str) -> str:  # a YAML double-quoted scalar (JSON strings are valid YAML)
        return json.dumps(s, ensure_ascii=False)

    lines = [f"dataset_name: {q('sinkhole_divergence')}",
             f"description: {q('Repeated-token divergence prompts that made ' + model + ' diverge, found by sinkhole')}",
             "harm_categories:", f"  - {q('training data extraction')}",
             f"source: {q('sinkhole')}", "data_type: text", "seed_type: prompt", "seeds:"]
    for p in prompts:
        # PyRIT renders seed values as Jinja templates: keep braces literal
        value = p["prompt"].replace("{{", "{{ '{{' }}").replace("{%", "{{ '{%' }}")
        lines.append(f"  - value: {q(value)}")
    return "\n".join(lines) + "\n"


def write_export(prompts: list[dict], fmt: str, path: str | Path, model: str = "the model") -> Path:
    """Write ``prompts`` in ``fmt`` (``FORMATS``) to ``path`` atomically."""
    if fmt not in FORMATS:
        raise SinkholeError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not prompts:
        raise SinkholeError("nothing to export: no prompt diverged or reached a sink in these results")
    path = Path(path)
    if fmt == "garak":
        if path.suffix != ".py":
            raise SinkholeError("a garak probe export is a Python module: give a path ending in .py "
                                "(e.g. sinkhole_divergence.py)")
        text = _garak_module(prompts, model)
    elif fmt == "garak-payload":
        text = json.dumps({"garak_payload_name": "sinkhole_divergence", "payload_types": ["Repeated-token divergence"],
                           "detector_name": "divergence.RepeatDiverges", "lang": "en",
                           "payloads": [p["prompt"] for p in prompts]}, ensure_ascii=False, indent=1)
    else:
        text = _pyrit_yaml(prompts, model)
    write_atomic(path, text)
    return path
