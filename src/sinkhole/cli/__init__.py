"""The ``sinkhole`` command line. Thin: parse, call the library, print, exit with a clear code.

Each command lives in ``sinkhole.cli.cmd_<name>`` with ``add_parser(subparsers)`` and
``run(args) -> int``; add a new command by appending its name to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMANDS = ["scan", "report", "models", "diverge", "minreps", "export", "patch", "guard", "eval", "circuit", "sweep",
            "cluster", "experimental"]


# What Ctrl-C keeps, per command (commands without a checkpoint write their results at the end).
INTERRUPT_HINTS = {
    "scan": "finished steps are kept, rerun with --resume to continue",
    "sweep": "finished batches are kept in the checkpoint, rerun the same command to continue",
    "patch": "nothing was exported (the output folder is written only when the patch is complete); rerun the "
             "same command to start the search again",
    "experimental": "nothing was exported (the output folder is written only when it is complete); rerun the same "
                    "command to start again",
}


def _terminate(signum, frame):
    """SIGTERM (a job scheduler, ``kill``, a container stop) ends a command like Ctrl-C: finished
    work is kept, nothing is left half-written, and the message says how to continue."""
    raise KeyboardInterrupt


def add_model_args(p: argparse.ArgumentParser, model_optional: bool = True) -> None:
    from ..models.loading import DEFAULT_MODEL, EMBEDDED  # lazy: start-up time

    p.add_argument("model", nargs="?" if model_optional else None, default=DEFAULT_MODEL,
                   help=f"embedded name ({', '.join(EMBEDDED)}), local HF folder, .gguf file or hub id "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps, or auto (device_map='auto')")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run (off by default)")
    p.add_argument("--strict-cache", action="store_true",
                   help="refuse a damaged cache entry of dequantized GGUF weights instead of rebuilding it")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or step messages")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


ROLE_HELP = {
    "drift_layer": "layer at which a run's norm is compared with the first token's (default: the circuit's "
                   "drift layer)",
    "massive_layer": "layer whose sink neurons the paper's patch clamps (default: the circuit's massive layer)",
    "marking_layers": "comma-separated layers that mark the first token, where the caps and the fine-tune act "
                      "(default: the circuit's marking layers)",
}


def add_role_args(p: argparse.ArgumentParser, roles: list[str]) -> None:
    """An explicit override flag for each circuit role a command uses."""
    for r in roles:
        p.add_argument(f"--{r.replace('_', '-')}", dest=r, default=None, type=None if r == "marking_layers" else int,
                       help=ROLE_HELP[r])


def circuit_from_args(args, lm, roles: list[str]):
    """The model's circuit (``circuit.discover``) with the command's role overrides; prints which
    role and layer the command uses."""
    from ..attack.prompts import parse_int_list  # lazy: start-up time
    from ..circuit import discover  # lazy: start-up time

    c = discover(lm)
    vals = {r: getattr(args, r, None) for r in roles}
    if vals.get("marking_layers") is not None:
        vals["marking_layers"] = parse_int_list(vals["marking_layers"], "--marking-layers", minimum=0)
    c = c.with_roles(lm.adapter.n_layers, **vals)
    for r in roles:
        info(args, f"{args.command}: {c.describe(r)}")
    return c


def load_from_args(args):
    from ..models.loading import load_model  # lazy: start-up time

    return load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                      progress=not getattr(args, "quiet", False), strict_cache=args.strict_cache)


def check_out_file(path, flag: str = "--out"):
    """Fail before any work when ``flag``'s file path cannot be written: it names a folder, or
    its folder does not exist. Returns the path (or None when not given)."""
    if not path:
        return None
    from pathlib import Path

    from ..errors import SinkholeError  # lazy: start-up time

    p = Path(path)
    if p.is_dir():
        raise SinkholeError(f"{flag} {p} is a folder; pass a file path in an existing folder")
    parent = p.resolve().parent
    if not parent.is_dir():
        raise SinkholeError(f"{flag}: folder {parent} does not exist; create it first or pass a file path in an "
                            "existing folder")
    return p


def add_export_args(p) -> None:
    """``--export FORMAT --export-file F``: the prompts of this run that diverged, for red-team tools."""
    g = p.add_argument_group("export prompts to red-team tools (--export)")
    g.add_argument("--export", default=None, choices=["garak", "garak-payload", "pyrit"],
                   help="write the prompts that diverged (or reached a sink) for garak (a probe module, .py), "
                        "garak's payload schema (JSON) or PyRIT (a seed dataset, YAML) to --export-file; "
                        "'sinkhole export' does the same from a saved results file")
    g.add_argument("--export-file", default=None, help="where --export writes (required with --export)")


def check_export(fmt, path, fmt_flag: str = "--export", file_flag: str = "--export-file") -> None:
    """Refuse, before any work, an export with no format, no file, a garak module not ending in .py, or a
    file in a folder that does not exist."""
    from ..errors import SinkholeError  # lazy: start-up time

    if not fmt:
        raise SinkholeError(f"{file_flag} needs {fmt_flag} garak|garak-payload|pyrit")
    if not path:
        raise SinkholeError(f"{fmt_flag} needs {file_flag} PATH (e.g. sinkhole_divergence.py for garak, "
                            "seeds.yaml for pyrit)")
    if fmt == "garak" and not path.endswith(".py"):
        raise SinkholeError(f"{fmt_flag} garak writes a Python probe module: give a {file_flag} ending in .py")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise SinkholeError(f"{file_flag}: folder {parent} does not exist; create it first")


def maybe_export(args, doc: dict) -> None:
    """Write ``doc``'s diverging prompts where ``--export``/``--export-file`` ask (nothing without ``--export``)."""
    if not args.export:
        return
    from ..integrations.export import collect_prompts, write_export  # lazy: start-up time

    prompts = collect_prompts(doc)
    if not prompts:
        info(args, "--export: no prompt diverged, so nothing was written")
        return
    write_export(prompts, args.export, args.export_file, model=doc.get("model", {}).get("name", "the model"))
    info(args, f"wrote {len(prompts)} prompts for {args.export} to {args.export_file}")


def vars_of(args) -> dict:
    """The command's options, as recorded in its results document (paths and output switches stay
    out, so the same command gives the same document wherever it runs)."""
    skip = {"func", "command", "model", "json", "quiet", "out", "device", "trust_remote_code", "checkpoint",
            "merge", "shard", "num_shards"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def model_meta(lm):
    from ..models.loading import model_info  # lazy: start-up time

    return model_info(lm)


def emit(args, doc) -> bool:
    """Write ``doc`` to ``--out`` (atomically) and print it with ``--json``; True when printed."""
    from ..results import dumps, write_json  # lazy: start-up time

    if getattr(args, "out", None):
        write_json(args.out, doc)
    if getattr(args, "json", False):
        sys.stdout.write(dumps(doc))
        return True
    return False


def info(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (no usage block); subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"sinkhole: error: {' '.join(message.split())}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__  # lazy: start-up time

    parser = _Parser(
        prog="sinkhole",
        description="Find, explain and fix the repeated-token divergence of language models.",
    )
    parser.add_argument("--version", action="version", version=f"sinkhole {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"sinkhole.cli.cmd_{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _say(text: str) -> None:
    """One line on stderr, whatever bytes the user's paths or words hold (a file name that is not
    UTF-8 arrives as surrogate escapes and is shown escaped)."""
    print(text.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)


def _main(argv: list[str] | None) -> int:
    from ..errors import SinkholeError  # lazy: start-up time

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if any("\x00" in a for a in (sys.argv[1:] if argv is None else argv)):  # only possible in-process
        _say("sinkhole: error: an argument contains a NUL byte; pass plain text")
        return 2
    logging.basicConfig(level=logging.WARNING, format="sinkhole: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from ..progress import set_quiet  # lazy: start-up time

    quiet = bool(getattr(args, "quiet", False))
    set_quiet(quiet)  # every call sets it: one process may run several commands (tests, notebooks)
    logging.getLogger("sinkhole").setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except SinkholeError as err:
        _say(f"sinkhole: error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        hint = INTERRUPT_HINTS.get(args.command, "no result was written")
        _say(f"sinkhole: interrupted; {hint}")
        return 130
    except BrokenPipeError:
        return 0
    except OSError as err:  # the file system refused a path the user gave (too long, not a folder, ...)
        if os.environ.get("SINKHOLE_DEBUG"):
            raise
        where = f" ({str(err.filename)[:200]})" if err.filename else ""
        _say(f"sinkhole: error: {err.strerror or type(err).__name__}{where}; check the paths you passed")
        return 2
    except Exception as err:  # last resort: one line, no traceback unless asked
        if os.environ.get("SINKHOLE_DEBUG"):
            raise
        msg = str(err).splitlines()[0][:300] if str(err) else ""
        _say(f"sinkhole: internal error: {type(err).__name__}: {msg} (set SINKHOLE_DEBUG=1 for a traceback "
             "and please report it)")
        return 1


def entry() -> None:
    sys.exit(main())
