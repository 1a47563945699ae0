"""``sinkhole guard``: the fix where the model is served: a LiteLLM proxy config with the sinkhole guardrail in front
of an OpenAI-compatible upstream (llama.cpp's server, vLLM, Ollama, ...)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ..models.loading import DEFAULT_MODEL, EMBEDDED  # lazy: start-up time

    p = sub.add_parser("guard", help="write a LiteLLM proxy config that guards a served model against long runs",
                       description="Write a LiteLLM proxy config (FILE) that exposes the upstream OpenAI-compatible "
                                   "server under --model-name with the sinkhole guardrail on every request: runs in "
                                   "the prompt are collapsed by the run gate's rule (or refused, --mode reject) and "
                                   "an answer that turns into a run past the model's limit is stopped. Beside FILE it "
                                   "writes FILE's stem + '.sinkhole/' (the guard profile and the model's tokenizer); "
                                   "the proxy needs no torch and no weights. Start it with: "
                                   "LITELLM_MASTER_KEY=sk-... LITELLM_LOCAL_MODEL_COST_MAP=True litellm --config FILE")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"the served model, for its tokenizer: embedded name ({', '.join(EMBEDDED)}), local HF "
                        f"folder or .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--upstream", required=True,
                   help="the OpenAI-compatible server's URL, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--litellm-config", required=True, metavar="FILE", help="the LiteLLM config file to write (.yaml)")
    p.add_argument("--model-name", help="the name the proxy exposes the model under (default: the MODEL argument)")
    p.add_argument("--upstream-model", help="the model's name at the upstream (default: --model-name)")
    p.add_argument("--upstream-kind", choices=["openai", "vllm"], default="openai",
                   help="vllm: also send vLLM's repetition_detection (0.17+) with every request (default: openai)")
    p.add_argument("--mode", choices=["collapse", "reject"], default="collapse",
                   help="prompt runs past the limit: collapse them (default) or refuse the request (status 400)")
    p.add_argument("--output", choices=["stop", "off"], default="stop",
                   help="answers that become a run past the limit: stop them (default) or leave them")
    p.add_argument("--litellm-hook", choices=["guardrail", "callback"], default="guardrail",
                   help="how the proxy loads the guard: as a guardrail (default; listed among the proxy's guardrails) "
                        "or as a plain callback (a module written beside FILE; LiteLLM relays streams on its fast "
                        "path, the higher throughput where the proxy is the bottleneck)")
    p.add_argument("--profile", help="the guard-profile.json a scan wrote (or its results.json): the model's "
                                     "measured limits (default: the run gate's rule, uncalibrated)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own tokenizer code to run")
    p.add_argument("--quiet", "-q", action="store_true", help="no message on stderr")
    p.set_defaults(func=run)


def _profile(args, name: str):
    import json
    from pathlib import Path

    from ..errors import SinkholeError  # lazy: start-up time
    from ..guard.profile import PROFILE_KIND, GuardProfile, profile_from_results  # lazy: start-up time
    from ..results import load_results  # lazy: start-up time

    if not args.profile:
        return GuardProfile(model=name)
    path = Path(args.profile)
    if path.is_dir():
        path = path / "guard-profile.json" if (path / "guard-profile.json").exists() else path / "results.json"
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SinkholeError(f"--profile {path} does not exist; pass the guard-profile.json a scan wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise SinkholeError(f"--profile {path} is not a JSON file; pass the guard-profile.json a scan wrote") from None
    if isinstance(head, dict) and head.get("kind") == PROFILE_KIND:
        return GuardProfile.from_dict(head, where=str(path))
    return profile_from_results(load_results(str(path)))


def _tokenizer_json(args, dest) -> None:
    import shutil
    from pathlib import Path

    from ..errors import SinkholeError  # lazy: start-up time
    from ..models.loading import resolve_spec  # lazy: start-up time
    from ..models.quiet import quiet_hf  # lazy: start-up time

    spec = resolve_spec(args.model, progress=not args.quiet)
    src = Path(str(spec.folder))
    if src.is_dir() and (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", dest)
        return
    from transformers import AutoTokenizer  # lazy: start-up time

    try:
        with quiet_hf():
            tok = AutoTokenizer.from_pretrained(str(spec.folder), trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise SinkholeError(f"could not load the tokenizer of {args.model} ({str(err).splitlines()[0][:120]}); "
                            "pass a local model folder or .gguf file") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise SinkholeError(f"{args.model} has no fast tokenizer (tokenizer.json), which the guard reads without "
                            "torch; pass a model folder that has one")
    backend.save(str(dest))


def run(args) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from ..guard.config import (callback_module, callback_source, check_upstream, litellm_config,  # lazy: start-up time
                                write_config)
    from ..guard.core import PROFILE_FILE, TOKENIZER_FILE  # lazy: start-up time
    from . import check_out_file, info  # lazy: start-up time

    upstream = check_upstream(args.upstream)
    path = check_out_file(args.litellm_config, "--litellm-config")
    model = str(args.model)
    name = args.model_name or (Path(model).stem if model.lower().endswith(".gguf") else model)
    profile = _profile(args, name)
    folder = path.with_name(path.stem + ".sinkhole")
    tmp = Path(tempfile.mkdtemp(prefix=".sinkhole-guard-", dir=path.resolve().parent))
    try:
        _tokenizer_json(args, tmp / TOKENIZER_FILE)
        profile.save(tmp / PROFILE_FILE)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.litellm_hook == "callback":
        write_config(callback_module(path), callback_source(folder, args.mode, args.output, args.upstream_kind))
    write_config(path, litellm_config(path, folder, upstream, name, args.upstream_model or name, args.mode,
                                      args.output, args.upstream_kind, args.litellm_hook))
    info(args, f"wrote {path} and {folder}/ ({profile.describe()}); start the proxy with: "
               f"LITELLM_MASTER_KEY=sk-... LITELLM_LOCAL_MODEL_COST_MAP=True litellm --config {path}")
    return 0
