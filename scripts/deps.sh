#!/usr/bin/env bash
# deps.sh — install the Debian packages Sluice builds, tests and runs with (idempotent).
# Usage: scripts/deps.sh [extra-package ...]
set -euo pipefail

# openssl (CLI), prometheus (promtool) and chromium (headless): the operations tests
# (tests/integration/test_operations.py, test_status_page.py, test_tls_notify.py).
# nodejs and npm: the OpenAI SDK test (tests/integration/test_openai_sdk.py, tests/sdk/);
# only when no `node` is on PATH, so a node installed another way (NodeSource, nvm) is kept.
# clang and libclang-rt-14-dev (libFuzzer, clang's sanitizer runtimes): the clang build and
# the fuzz targets (scripts/test.sh, scripts/fuzz.sh, tests/fuzz/).
NODE_PKGS=()
command -v node >/dev/null 2>&1 || NODE_PKGS=(nodejs npm)
PKGS=(build-essential cmake pkg-config
      libevent-dev libcurl4-openssl-dev libjansson-dev libssl-dev libhiredis-dev
      libyaml-dev libpcre2-dev libcmocka-dev clang libclang-rt-14-dev
      python3 curl redis-server openssl prometheus chromium
      ${NODE_PKGS[@]+"${NODE_PKGS[@]}"} "$@")

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "deps: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
