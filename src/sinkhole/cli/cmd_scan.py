"""``sinkhole scan``: the whole pipeline, results.json + report.html + figures."""

from __future__ import annotations

import dataclasses
import sys


def add_parser(sub) -> None:
    from . import add_common_args, add_model_args  # lazy: start-up time

    p = sub.add_parser("scan", help="run the whole pipeline and write results.json and report.html",
                       description="Run every analysis on a model and write DIR/results.json, DIR/report.html, "
                                   "DIR/figures/*.png|svg and DIR/timings.json. Finished steps are checkpointed: "
                                   "after Ctrl-C, rerun the same command with --resume to continue.")
    add_model_args(p)
    add_common_args(p)
    p.add_argument("--out", default="sinkhole-out", help="output folder (default: ./sinkhole-out)")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished steps of an interrupted (or finished) scan in --out with the same "
                        "model and options, and run only the rest")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="a JSON file of scan options (the 'options' of a results.json works); flags override it")
    add_option_args(p)
    p.set_defaults(func=run)


# flags that add_common_args already defines
_COMMON = {"seed"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_option_args(p) -> None:
    """One flag per ScanOptions field, with the field's help and its quick/full defaults."""
    from ..pipeline.engine import ScanOptions  # lazy: start-up time

    for f in dataclasses.fields(ScanOptions):
        if f.name in _COMMON:
            continue
        md, dflt = f.metadata, f.default
        extra = f" (default {md['full']}, {md['quick']} with --quick)" if md.get("full") is not None else (
            f" (default {dflt})" if dflt not in (None, False, True) else "")
        if md["kind"] == "bool":
            if dflt:
                p.add_argument(_flag("no_" + f.name), dest=f.name, action="store_false", default=None,
                               help="do not " + md["help"].split(": ", 1)[-1])
            else:
                p.add_argument(_flag(f.name), dest=f.name, action="store_true", default=None, help=md["help"])
        else:
            p.add_argument(_flag(f.name), dest=f.name, default=None, metavar=md["kind"].upper(),
                           type={"int": int, "float": float, "layer": int}.get(md["kind"]), help=md["help"] + extra)


def _parse(kind: str, text, flag: str):
    from ..attack.prompts import parse_int_list, parse_words  # lazy: start-up time
    from ..errors import SinkholeError  # lazy: start-up time
    from ..patch.search import check_families  # lazy: start-up time

    if kind == "words":
        return parse_words(text, flag)
    if kind in ("ints", "layers"):
        return parse_int_list(text, flag, minimum=0 if kind == "layers" else 1)
    if kind == "layer":
        if isinstance(text, bool) or not isinstance(text, int) or text < 0:
            raise SinkholeError(f"{flag} must be a layer index (an integer >= 0)")
        return text
    if kind == "families":
        fams = parse_words(text, flag)
        check_families(fams)
        return fams
    if kind in ("int", "float"):
        try:
            v = int(text) if kind == "int" else float(text)
        except (TypeError, ValueError):
            raise SinkholeError(f"{flag} must be a positive {'integer' if kind == 'int' else 'number'}") from None
        if not v > 0 or v != v:
            raise SinkholeError(f"{flag} must be a positive {'integer' if kind == 'int' else 'number'}")
        return v
    if kind == "bool":
        if not isinstance(text, bool):
            raise SinkholeError(f"{flag} must be true or false")
        return text
    raise ValueError(kind)


def build_options(args):
    """The scan options from --config and the flags (checked before any model loads)."""
    from ..errors import SinkholeError  # lazy: start-up time
    from ..pipeline.engine import ScanOptions  # lazy: start-up time
    from ..results import read_json_file  # lazy: start-up time

    values: dict = {}
    if args.config:
        _, cfg = read_json_file(args.config, "options.json", missing="--config {path} not found",
                                invalid="--config {path} is not valid JSON ({err})")
        if not isinstance(cfg, dict):
            raise SinkholeError("--config must hold a JSON object of scan options")
        values.update(cfg)
    for f in dataclasses.fields(ScanOptions):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in _COMMON:
            values[f.name] = v
    known = {f.name: f for f in dataclasses.fields(ScanOptions)}
    bad = sorted(set(values) - set(known))
    if bad:
        raise SinkholeError(f"unknown scan option(s) {bad} in --config; use {', '.join(known)}")
    for k, v in list(values.items()):
        if v is not None and k != "seed":
            values[k] = _parse(known[k].metadata["kind"], v, _flag(k))
    if args.seed != 0 or "seed" not in values:  # --seed (default 0) overrides the file's seed when given
        values["seed"] = int(args.seed)
    if not isinstance(values["seed"], int) or isinstance(values["seed"], bool):
        raise SinkholeError("the seed in --config must be an integer")
    if values.get("frac") is not None and values["frac"] > 1:
        raise SinkholeError("--frac must be in (0, 1], e.g. --frac 0.5")
    return ScanOptions(**values).resolved()


def fit_context(opts, lm, explicit: bool):
    """Check the options against the loaded model: role overrides within its layers, norm-curve runs
    shortened to its context (an error when the user asked for more)."""
    from ..circuit.circuit import ROLE_NAMES, role_value  # lazy: start-up time
    from ..errors import SinkholeError  # lazy: start-up time

    for role in ROLE_NAMES:  # before any step: the circuit step applies them (Circuit.with_roles)
        if getattr(opts, role) is not None:
            role_value(role, getattr(opts, role), lm.adapter.n_layers)
    longest = max(len(lm.word_ids(w)) for w in opts.words)
    if lm.n_ctx and opts.curve_reps * longest + 8 > lm.n_ctx:
        if explicit:
            raise SinkholeError(f"--curve-reps {opts.curve_reps} exceeds the model's context of {lm.n_ctx} tokens; "
                                "lower it")
        reps = max(1, (lm.n_ctx - 8) // longest)
        opts = dataclasses.replace(opts, curve_reps=reps, conv_reps=min(opts.conv_reps, reps),
                                   attn_reps=[n for n in opts.attn_reps if n <= reps] or [min(16, reps)])
    return opts


def run(args) -> int:
    import time

    from ..guard.profile import profile_from_results  # lazy: start-up time
    from ..pipeline.engine import PARTIAL, ScanInterrupted  # lazy: start-up time
    from ..pipeline.registry import run_scan  # lazy: start-up time
    from ..report.html import write_report  # lazy: start-up time
    from ..results import dumps, prepare_out_dir, write_json  # lazy: start-up time
    from . import info, load_from_args  # lazy: start-up time

    options = build_options(args)  # bad options fail before the model loads
    out = prepare_out_dir(args.out)
    t0 = time.perf_counter()
    lm = load_from_args(args)
    t_load = round(time.perf_counter() - t0, 2)
    options = fit_context(options, lm, explicit=args.curve_reps is not None)
    try:
        res = run_scan(lm, options, out, resume=args.resume, log=lambda m: info(args, m))
    except ScanInterrupted as stop:
        print(f"sinkhole: interrupted during step '{stop.step}'; {len(stop.done)} finished step(s) kept in "
              f"{stop.partial}; rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    doc = res["doc"]
    timings = res["timings"]
    write_json(out / "results.json", doc)
    write_json(out / "timings.json", {"load_model_s": t_load, "steps": timings,
                                      "total_s": round(t_load + sum(timings.values()), 2)})
    report = write_report(doc, out)
    profile_from_results(doc).save(out / "guard-profile.json")
    (out / PARTIAL).unlink(missing_ok=True)
    width = max([len(k) for k in timings] + [10])
    info(args, "step timings:\n" + f"  {'load model':{width}s} {t_load:7.1f}s\n" + "".join(
        f"  {k:{width}s} {v:7.1f}s\n" for k, v in timings.items()) +
        f"  {'total':{width}s} {t_load + sum(timings.values()):7.1f}s")
    if args.json:
        sys.stdout.write(dumps(doc))
    else:
        info(args, f"wrote {out / 'results.json'}, {report}, {out / 'figures'}/ and {out / 'guard-profile.json'} "
                   "(for sinkhole guard --profile)")
    if doc.get("errors"):
        info(args, f"{len(doc['errors'])} step(s) failed: {', '.join(doc['errors'])}; see results.json 'errors', "
                   "fix and rerun with --resume")
        return 1
    return 0
