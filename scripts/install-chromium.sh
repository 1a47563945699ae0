#!/usr/bin/env bash
# Install Debian's chromium for the report's headless-browser test (tests/test_report_browser.py).
# Called by scripts/setup.sh --test (and so by .ci/run). Does nothing when chromium is already there.
# Needs root (or sudo) and apt; on other systems install chromium yourself or set SINKHOLE_CHROMIUM.
set -euo pipefail
for c in chromium chromium-browser google-chrome; do
  if command -v "$c" >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v "$c")"
    exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: apt-get not found; install chromium by hand (or set SINKHOLE_CHROMIUM)" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-chromium: need root to run apt-get; rerun as root or install chromium by hand" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "chromium installed: $(command -v chromium)"
