"""``sinkhole export``: the prompts that diverged or reached a sink in a saved results file, for red-team tools."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a results file's diverging prompts for garak or PyRIT",
                       description="Collect every diverging or sink-reaching prompt of a results file or scan folder "
                                   "(divergence cases, minimum repetitions, sweep tokens, cluster examples) and write "
                                   "them for garak (a probe module, .py, scored by garak's RepeatDiverges), garak's "
                                   "payload schema (JSON) or PyRIT (a seed dataset, YAML). No model is loaded.")
    p.add_argument("results", help="a results.json (from 'sinkhole scan' or any command's --json/--out) or a scan "
                                   "folder")
    p.add_argument("--format", required=True, choices=["garak", "garak-payload", "pyrit"], help="what to write")
    p.add_argument("--out", required=True, help="the file to write (a .py module for garak)")
    p.add_argument("--quiet", "-q", action="store_true", help="no message on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..integrations.export import collect_prompts, write_export  # lazy: start-up time
    from ..results import load_results  # lazy: start-up time
    from . import check_export, info  # lazy: start-up time

    check_export(args.format, args.out, "--format", "--out")
    doc = load_results(args.results)
    prompts = collect_prompts(doc)
    write_export(prompts, args.format, args.out, model=(doc.get("model") or {}).get("name", "the model"))
    info(args, f"wrote {len(prompts)} prompts for {args.format} to {args.out}")
    return 0
