"""``sinkhole cluster``: non-repeating token sequences that trigger the sink circuit."""

from __future__ import annotations


def add_parser(sub) -> None:
    from . import add_common_args, add_model_args, add_role_args  # lazy: start-up time

    p = sub.add_parser("cluster", help="cluster attack: sequences of different tokens that induce a sink",
                       description="Cluster the most frequent tokens by their layer-0 output (or embedding), build "
                                   "random sequences from one cluster with no token repeated back to back, and "
                                   "compare how often they induce a sink with random sequences of the same length; "
                                   "generate on the strongest examples.")
    add_model_args(p)
    add_common_args(p)
    p.add_argument("--space", choices=["layer0", "embedding"], default="layer0", help="feature space (default layer0)")
    p.add_argument("--pool", type=int, default=1000, help="candidate tokens: the N most frequent (default 1000)")
    p.add_argument("--clusters", type=int, default=12, help="number of clusters / seed tokens (default 12)")
    p.add_argument("--size", type=int, default=8, help="tokens per cluster (default 8)")
    p.add_argument("--length", type=int, default=256, help="sequence length in tokens (default 256)")
    p.add_argument("--seqs", type=int, default=2, help="random sequences per cluster (default 2)")
    p.add_argument("--threshold", type=float, default=0.5, help="norm ratio that counts as a sink (default 0.5)")
    add_role_args(p, ["drift_layer"])
    p.add_argument("--examples", type=int, default=4, help="sequences per kind to generate from (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per example (default 32)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..attack.cluster import (  # lazy: start-up time
        ClusterConfig,
        ClusterResult,
        cluster_attack,
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

    if min(args.pool, args.clusters, args.length, args.seqs) < 1 or args.size < 2 or args.max_new_tokens < 0:
        raise SinkholeError("--pool, --clusters, --length and --seqs must be positive and --size at least 2")
    if args.size > args.pool:
        raise SinkholeError("--size cannot exceed --pool")
    check_out_file(args.out)
    lm = load_from_args(args)
    if lm.n_ctx and args.length + 64 > lm.n_ctx:
        raise SinkholeError(f"--length {args.length} is too long for the model's context of {lm.n_ctx}")
    layer = circuit_from_args(args, lm, ["drift_layer"]).drift_layer
    cfg = ClusterConfig(pool_size=args.pool, n_seeds=args.clusters, size=args.size, length=args.length,
                        space=args.space, drift_layer=layer, threshold=args.threshold, seqs_per_cluster=args.seqs,
                        n_examples=args.examples, max_new_tokens=args.max_new_tokens, seed=args.seed)
    res = cluster_attack(lm, cfg, quiet=args.quiet)
    if emit(args, document(model_meta(lm), {"cluster": ClusterResult.from_dict(res)}, "cluster", vars_of(args))):
        return 0
    m = res["method"]
    print(f"{m['n_clusters']} clusters of {m['cluster_size']} tokens ({m['space']} cosine), sequences of "
          f"{m['length']} tokens, sink = norm ratio >= {m['threshold']} at drift layer {m['drift_layer']}")
    print(f"sink rate: cluster {res['sink_rate_cluster']:.2f} vs random {res['sink_rate_random']:.2f}; mean norm "
          f"ratio {res['mean_norm_ratio_cluster']:.2f} vs {res['mean_norm_ratio_random']:.2f}")
    print(f"diverged on generation: cluster {res['diverged_examples_cluster']}, random "
          f"{res['diverged_examples_random']}")
    for e in res["examples"]:
        info(args, f"  [{e['kind']}] {e['tokens']} ratio {e['norm_ratio']:.2f} diverged={e['diverged']}: "
                   f"...{e['prompt_tail'][-50:]!r} -> {e['text'][:70]!r}")
    return 0
