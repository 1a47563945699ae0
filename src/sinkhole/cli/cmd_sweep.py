"""``sinkhole sweep``: repetitions each token needs to induce a sink, over many tokens."""

from __future__ import annotations


def add_parser(sub) -> None:
    from . import add_common_args, add_model_args, add_role_args  # lazy: start-up time

    p = sub.add_parser("sweep", help="sweep the vocabulary for sink-prone tokens (resumable, shardable)",
                       description="For the N most frequent tokens (or --all), run '<bos> Repeat: t t ... t' once, "
                                   "stopped after a few layers, and record the repetitions needed for the drift-layer "
                                   "norm to reach --threshold x the first token's norm; ranks the most dangerous "
                                   "tokens. Checkpointed after every batch: rerun the same command to resume. Split "
                                   "long sweeps with --shard/--num-shards or launch it with torchrun / accelerate "
                                   "launch (RANK/WORLD_SIZE are read), then join with --merge.")
    add_model_args(p)
    add_common_args(p)
    p.add_argument("--tokens", type=int, default=256, help="how many of the most frequent tokens (default 256)")
    p.add_argument("--all", action="store_true", help="sweep the whole vocabulary")
    p.add_argument("--max-reps", type=int, default=256, help="repetitions per token (default 256)")
    p.add_argument("--threshold", type=float, default=0.5, help="norm ratio that counts as a sink (default 0.5)")
    add_role_args(p, ["drift_layer"])
    p.add_argument("--prefix", default="Repeat:", help="text between BOS and the run (default 'Repeat:'; '' for none)")
    p.add_argument("--batch-size", type=int, default=16, help="tokens per forward pass (default 16)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also greedily generate N tokens per token and judge divergence (slow; default 0)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file (default: sweep-MODEL-SETTINGS.ckpt.json in the current folder, named by "
                        "the model and the settings, so sweeps of two models never collide and rerunning the same "
                        "command resumes; shards add .shardIofN)")
    p.add_argument("--shard", type=int, default=None, help="this process's shard index (default: $RANK or 0)")
    p.add_argument("--num-shards", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    p.add_argument("--merge", nargs="+", default=None, metavar="CKPT",
                   help="merge these shard checkpoints instead of sweeping (no model needed)")
    p.add_argument("--top", type=int, default=20, help="how many of the most dangerous tokens to show (default 20)")
    p.add_argument("--out", default=None, help="write the summary JSON here")
    p.set_defaults(func=run)


def default_checkpoint(model: str, layer: int, args) -> str:
    """sweep-<model>-<settings hash>.ckpt.json: one file per model and settings."""
    import hashlib
    import json
    import re

    settings = {"layer": layer, "tokens": None if args.all else args.tokens, "max_reps": args.max_reps,
                "threshold": args.threshold, "prefix": args.prefix, "generate": args.generate}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", model.rstrip("/").split("/")[-1])[:60] or "model"
    return f"sweep-{stem}-{key}.ckpt.json"


def run(args) -> int:
    import os

    from ..attack.sweep import (  # lazy: start-up time
        SweepConfig,
        SweepSummary,
        frequent_tokens,
        merge,
        shard_from_env,
        summarize,
        sweep_tokens,
    )
    from ..errors import SinkholeError  # lazy: start-up time
    from ..pipeline.engine import document  # lazy: start-up time
    from . import (  # lazy: start-up time
        check_out_file,
        circuit_from_args,
        emit,
        info,
        load_from_args,
        model_meta,
        vars_of,
    )

    check_out_file(args.out)
    model = None
    if args.merge:
        res = merge(args.merge)
    else:
        if args.tokens < 1 or args.max_reps < 1 or args.batch_size < 1 or args.generate < 0:
            raise SinkholeError("--tokens, --max-reps and --batch-size must be positive, --generate >= 0")
        env_shard, env_n = shard_from_env()
        shard = env_shard if args.shard is None else args.shard
        n_shards = env_n if args.num_shards is None else args.num_shards
        if n_shards < 1 or not (0 <= shard < n_shards):
            raise SinkholeError(f"--shard must be in 0..{n_shards - 1} and --num-shards >= 1")
        if args.device.startswith("cuda") and ":" not in args.device and "LOCAL_RANK" in os.environ:
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        if args.checkpoint is not None:
            check_out_file(args.checkpoint, "--checkpoint")
        lm = load_from_args(args)
        layer = circuit_from_args(args, lm, ["drift_layer"]).drift_layer
        base = args.checkpoint or default_checkpoint(lm.name, layer, args)
        ckpt = base if n_shards == 1 else f"{base}.shard{shard}of{n_shards}"
        check_out_file(ckpt, "--checkpoint")
        model = model_meta(lm)
        tokens = frequent_tokens(lm, None if args.all else args.tokens)[shard::n_shards]
        info(args, f"sweeping {len(tokens)} tokens (shard {shard}/{n_shards}) at layer {layer}, checkpoint {ckpt}")
        settings = SweepConfig(drift_layer=layer, max_reps=args.max_reps, threshold=args.threshold,
                               batch_size=args.batch_size, generate_tokens=args.generate, prefix=args.prefix)
        res = sweep_tokens(lm, tokens, settings, checkpoint=ckpt, quiet=args.quiet)
        if n_shards > 1:
            info(args, f"shard {shard} done; merge with: sinkhole sweep --merge {base}.shard*of{n_shards}")
    summary = summarize(res, top=args.top)
    model = model or {"name": summary["config"].get("model", "model")}
    if emit(args, document(model, {"sweep": SweepSummary.from_dict(summary)}, "sweep", vars_of(args))):
        return 0
    cfg = summary["config"]
    print(f"{summary['n_tokens']} tokens, drift layer {cfg['drift_layer']}, up to {cfg['max_reps']} repetitions: "
          f"{summary['frac_sink_within_max_reps']:.0%} reach a sink (norm ratio >= {cfg['threshold']}), median "
          f"{summary['median_reps_to_sink']} repetitions")
    print(f"{'rank':>4s} {'token':>16s} {'id':>6s} {'reps':>5s} {'ratio':>6s} {'bos-attn':>8s}")
    for i, r in enumerate(summary["top"], 1):
        print(f"{i:4d} {r['token']!r:>16s} {r['token_id']:6d} {str(r['reps_to_sink']):>5s} "
              f"{r['final_norm_ratio']:6.2f} {r['bos_attn']:8.3f}" + (f"  diverged={r['diverged']}" if "diverged" in r
                                                                     else ""))
    return 0
