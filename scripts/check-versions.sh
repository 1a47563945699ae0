#!/usr/bin/env bash
# Run the whole test suite against other versions of sinkhole's dependencies than the pinned ones.
#
# Usage: bash scripts/check-versions.sh newest|oldest [pytest args...]
#   newest  every dependency at its newest release within the major version CI tested (./.venv-newest):
#           catches a new release that breaks sinkhole before a user installs it
#   oldest  every dependency at the lower bound of pyproject.toml's range (./.venv-oldest)
# Prints the versions it tested and one verdict line; exit 0 when the suite passed. A failure there means:
# support the new version (then widen pyproject.toml's range and re-lock: python scripts/requirements.py
# lock), not only tighten the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
case "$mode" in
  newest|oldest) shift ;;
  *) echo "usage: bash scripts/check-versions.sh newest|oldest [pytest args...]" >&2; exit 2 ;;
esac
venv=.venv-$mode
bash scripts/setup.sh --test --"$mode"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
names = ["torch", "transformers", "accelerate", "safetensors", "gguf", "numpy", "tokenizers", "huggingface_hub",
         "matplotlib", "tqdm", "lm_eval", "pytest", "hypothesis"]
print("check-versions: " + ", ".join(f"{n} {md.version(n)}" for n in names))
PY
set +e
HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q "$@"
rc=$?
set -e
if [ $rc -eq 0 ]; then echo "check-versions: the suite passes with the $mode versions"
else echo "check-versions: the suite FAILS with the $mode versions (pytest exit $rc)"; fi
exit $rc
