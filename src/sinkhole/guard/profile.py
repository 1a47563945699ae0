"""The guard profile: what a served model's guard needs to know about *this* model, in one small JSON file.

``sinkhole scan`` writes it beside results.json (``guard-profile.json``); ``sinkhole guard`` copies it, with the
model's tokenizer, into the folder its LiteLLM config points at. It holds the run gate's rule and the limits the
scan measured:

* ``safe_reps``: the longest run this model was seen to handle, the smaller of
  - the ``min_reps`` step's last count that kept repeating, for the word that diverged first, and
  - the sweep's fewest repetitions for a token's drift-layer state to turn first-token-like (``reps_to_sink``),
    minus one, over the tokens that are not sink-sized at their first copy already;
* the gate's ``hold`` follows from it: a run whose excess stretch stays within ``hold`` tokens passes untouched,
  a longer one is shortened to the gate's floor. So a model that handles long runs (Gemma-3-270M, which does
  not diverge) keeps them, and one that diverges early (SmolLM2) gets the gate's own rule (``hold`` 0).

A profile written without those steps (or by hand) is marked ``calibrated: false`` and uses the gate's defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..decoding.runs import RunGate
from ..errors import SinkholeError
from ..results import write_atomic

PROFILE_KIND = "sinkhole-guard-profile"
PROFILE_VERSION = 1


@dataclass
class GuardProfile:
    """The run gate the guard applies and the limits it was calibrated from."""

    model: str
    gate: RunGate = field(default_factory=RunGate)
    calibrated: bool = False
    safe_reps: int | None = None  # the longest run (in repetitions) this model was seen to handle
    limits: dict = field(default_factory=dict)  # what the scan measured, and where each number came from

    def to_dict(self) -> dict:
        return {"kind": PROFILE_KIND, "version": PROFILE_VERSION, "model": self.model, "gate": self.gate.to_dict(),
                "calibrated": self.calibrated, "safe_reps": self.safe_reps, "limits": self.limits}

    @classmethod
    def from_dict(cls, d, where: str = "the guard profile") -> "GuardProfile":
        if not isinstance(d, dict) or d.get("kind") != PROFILE_KIND:
            raise SinkholeError(f"{where} is not a sinkhole guard profile (no \"kind\": \"{PROFILE_KIND}\"); "
                                "write one with sinkhole scan (guard-profile.json) or sinkhole guard")
        if d.get("version") != PROFILE_VERSION:
            raise SinkholeError(f"{where} has version {d.get('version')!r}; this sinkhole reads version "
                                f"{PROFILE_VERSION}: write it again with this sinkhole")
        gate = RunGate.from_dict(d.get("gate", {}))
        if gate.confirm is not None:
            raise SinkholeError(f"{where}: the guard applies the gate without reading the model; remove 'confirm'")
        safe = d.get("safe_reps")
        if safe is not None and (not isinstance(safe, int) or isinstance(safe, bool) or safe < 0):
            raise SinkholeError(f"{where}: safe_reps must be null or a non-negative integer (got {safe!r})")
        model = d.get("model")
        if not isinstance(model, str) or not model:
            raise SinkholeError(f"{where}: 'model' must be the model's name")
        return cls(model=model, gate=gate, calibrated=bool(d.get("calibrated")), safe_reps=safe,
                   limits=d.get("limits") if isinstance(d.get("limits"), dict) else {})

    def save(self, path) -> Path:
        path = Path(path)
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "GuardProfile":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SinkholeError(f"guard profile {path} does not exist; write one with sinkhole scan "
                                "(DIR/guard-profile.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SinkholeError(f"cannot read guard profile {path} ({type(err).__name__}); pass the "
                                "guard-profile.json a scan wrote") from None
        return cls.from_dict(d, where=str(path))

    def describe(self) -> str:
        if not self.calibrated:
            return (f"uncalibrated: the run gate's defaults (a run is cut back to about {self.gate.window} tokens); "
                    "calibrate with sinkhole scan")
        return (f"calibrated on {self.model}: runs of up to {self.safe_reps} repetitions pass untouched "
                f"(hold {self.gate.hold}), longer ones are cut back to about {self.gate.window + self.gate.hold} "
                "tokens")


def _min_reps_limit(step: dict) -> tuple[int | None, dict]:
    """(safe repetitions, evidence) from the min_reps step: the last count that kept repeating for the word that
    diverged first (words the model never followed, repeated_below false, say nothing about runs); the step's
    largest count when no word diverged."""
    words = [w for w in step.get("words", []) if isinstance(w, dict)]
    div = [w for w in words if w.get("min_reps") is not None and w.get("repeated_below", True)]
    if div:
        w = min(div, key=lambda w: w["min_reps"])
        kept = (w.get("bracket") or [0])[0] or 0
        return int(kept), {"word": w.get("word"), "min_reps": w["min_reps"], "kept_repeating_at": kept}
    never = [w for w in words if w.get("min_reps") is None]
    if never:
        top = min(int(w.get("max_reps") or 0) for w in never)
        return top, {"diverged": False, "max_reps": top}
    return None, {}


def _sweep_limit(step: dict) -> tuple[int | None, dict]:
    """(safe repetitions, evidence) from the sweep: one less than the fewest repetitions for a swept token's
    drift-layer state to reach the sink threshold; the sweep's length when none did. A token whose state is
    sink-sized at its first copy (SmolLM2's lone space) is a sink by itself, not by repeating: it says nothing
    about how long a run the model handles, and is left out (named in the evidence)."""
    rows = [r for r in step.get("top", []) if isinstance(r, dict) and r.get("reps_to_sink") is not None]
    alone = [r.get("token") for r in rows if r["reps_to_sink"] <= 1]
    rows = [r for r in rows if r["reps_to_sink"] > 1]
    if rows:
        r = min(rows, key=lambda r: r["reps_to_sink"])
        ev = {"token": r.get("token"), "reps_to_sink": r["reps_to_sink"]}
        if alone:
            ev["sink_at_first_copy"] = alone
        return int(r["reps_to_sink"]) - 1, ev
    top = (step.get("config") or {}).get("max_reps")
    if isinstance(top, int) and step.get("n_tokens"):
        return top, {"reached": False, "max_reps": top}
    return None, {}


def profile_from_results(doc: dict, gate: RunGate | None = None) -> GuardProfile:
    """The guard profile of a scan's results (results.json as a dict): ``safe_reps`` is the smaller of the
    ``min_reps`` and ``sweep`` limits that ran; ``hold`` lets runs up to it pass (a single-token run's excess
    stretch starts about ``window`` tokens in)."""
    gate = RunGate(**(gate or RunGate()).to_dict())
    model = ((doc.get("model") or {}).get("name")) or "model"
    res = doc.get("results") or {}
    limits, found = {}, []
    for name, fn in (("min_reps", _min_reps_limit), ("sweep", _sweep_limit)):
        if isinstance(res.get(name), dict):
            v, ev = fn(res[name])
            if v is not None:
                limits[name] = {"safe_reps": v, **ev}
                found.append(v)
    if not found:
        return GuardProfile(model=model, gate=gate, limits=limits)
    safe = min(found)
    gate.hold = max(0, safe - gate.window)
    return GuardProfile(model=model, gate=gate, calibrated=True, safe_reps=safe, limits=limits)
