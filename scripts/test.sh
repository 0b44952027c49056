#!/usr/bin/env bash
# test.sh — install what is missing, build (normal and ASan+UBSan), run the whole suite.
# Exits non-zero on any failure. Usage: scripts/test.sh [--fast] (skip the sanitizer build)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh
jobs=$(nproc)

echo "== build (RelWithDebInfo)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$jobs"
echo "== test (RelWithDebInfo)"
ctest --test-dir build --output-on-failure -j2

if [ "${1:-}" != "--fast" ]; then
  echo "== build (ASan + UBSan)"
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DSLUICE_SANITIZE=ON >/dev/null
  cmake --build build-asan -j"$jobs"
  echo "== test (ASan + UBSan)"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  SLUICE_SANITIZED=1 \
    ctest --test-dir build-asan --output-on-failure -j2
fi
echo "== all tests passed"
