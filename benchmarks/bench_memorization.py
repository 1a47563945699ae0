"""Benchmark: building and querying the memorisation index on a synthetic corpus.

Writes ``--mb`` MB of synthetic text (words of the shipped texts in random order, 64 KB documents,
half as .txt files and half as .jsonl lines), builds the index in a child process (so its peak
RSS is the build's own), then times ``--queries`` lookups of 1,000-byte texts, half of which
contain a 200-byte span copied from the corpus (each must be found) and half not.

Usage::

    python benchmarks/bench_memorization.py --mb 1024 --save memorization_1gb
"""

from __future__ import annotations

import argparse  # noqa: F401  (argparse.SUPPRESS)
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parser, report, save, smoke_out  # noqa: E402

SMOKE = True


def _write_corpus(root: Path, mb: float, seed: int = 0) -> int:
    from sinkhole.data import words

    vocab = [w for w in words("sonnets") + words("tempest")]
    rng = random.Random(seed)
    target, n, k = int(mb * 1024 * 1024), 0, 0
    jl = open(root / "docs.jsonl", "w", encoding="utf-8")
    while n < target:
        doc = " ".join(rng.choice(vocab) for _ in range(11000))[:65536]
        if k % 2:
            jl.write(json.dumps({"text": doc}) + "\n")
        else:
            (root / f"doc{k:06d}.txt").write_text(doc, encoding="utf-8")
        n += len(doc.encode("utf-8"))
        k += 1
    jl.close()
    return n


def main(argv=None) -> int:
    p = parser(__doc__, model=None, smoke=True)
    p.add_argument("--mb", type=float, default=64)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--build-only-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:  # one small document file and a few queries
        args.mb, args.queries = 0.2, 10
        smoke_out(args, "memorization")
    from sinkhole.attack.memorization import build_index

    if args.build_only_child:
        corpus, folder = args.build_only_child.split("::")
        t = time.perf_counter()
        idx = build_index(corpus, folder=folder, quiet=True)
        print(json.dumps({"seconds": time.perf_counter() - t,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "info": idx.info.to_dict()}))
        return 0
    root = Path(tempfile.mkdtemp(prefix="sinkhole-memo-"))
    try:
        t = time.perf_counter()
        n = _write_corpus(root / "corpus", args.mb) if (root / "corpus").mkdir() is None else 0
        write_s = time.perf_counter() - t
        child = subprocess.run([sys.executable, __file__, "--build-only-child", f"{root / 'corpus'}::{root / 'index'}"],
                               capture_output=True, text=True, check=True)
        build = json.loads(child.stdout.strip().splitlines()[-1])
        from sinkhole.attack.memorization import CorpusIndex

        idx = CorpusIndex(root / "index")
        rng = random.Random(1)
        corpus = idx.corpus
        hits, found, times = 0, 0, []
        for q in range(args.queries):
            filler = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(1000))
            if q % 2 == 0:
                pos = rng.randrange(0, len(corpus) - 300)
                span = bytes(corpus[pos:pos + 200]).decode("utf-8", errors="ignore").replace("\0", " ")
                text = filler[:400] + span + filler[400 + len(span):]
                hits += 1
            else:
                text = filler
            t = time.perf_counter()
            sp = idx.spans(text)
            times.append(time.perf_counter() - t)
            found += bool(sp) and q % 2 == 0
        times.sort()
        row = {"benchmark": "memorization_index", "command": "python benchmarks/bench_memorization.py " +
               " ".join(argv or sys.argv[1:]), "machine": machine(), "corpus_mb": round(n / 2**20, 1),
               "write_corpus_s": round(write_s, 1), "build_s": round(build["seconds"], 1),
               "build_s_per_mb": round(build["seconds"] / (n / 2**20), 4),
               "build_peak_rss_mib": round(build["peak_rss_mib"], 1),
               "peak_rss_mib_per_mb": round(build["peak_rss_mib"] / (n / 2**20), 3),
               "index_mib": round(build["info"]["index_bytes"] / 2**20, 1), "n_windows": build["info"]["n_windows"],
               "queries": args.queries, "planted_found": f"{found}/{hits}",
               "query_ms_median": round(1000 * times[len(times) // 2], 2), "query_ms_max": round(1000 * times[-1], 2)}
        print(json.dumps(row))
        report(save(args, row), {k: row[k] for k in ("build_s", "build_peak_rss_mib", "planted_found")})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
