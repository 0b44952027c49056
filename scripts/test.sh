#!/usr/bin/env bash
# test.sh — install what is missing, build the matrix, run the whole suite, fuzz every target.
# Exits non-zero on any failure or warning. Usage: scripts/test.sh [--fast]
#   build       gcc RelWithDebInfo   whole suite
#   build-asan  gcc Debug, ASan+UBSan whole suite            (skipped by --fast)
#   build-rel   gcc Release (-O3)     compile only
#   build-clang clang Release         compile only
#   build-fuzz  clang, libFuzzer      each target FUZZ_SECONDS (default 20) (skipped by --fast)
# Every build is -Werror (SLUICE_WERROR=ON); a plain `cmake` build is not.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh
jobs=$(nproc)
fast=0
[ "${1:-}" = "--fast" ] && fast=1

configure() { # DIR [cmake args...]
  local dir=$1
  shift
  cmake -S . -B "$dir" -DSLUICE_WERROR=ON "$@" >/dev/null
}

echo "== build (gcc RelWithDebInfo)"
configure build -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j"$jobs"
echo "== test (gcc RelWithDebInfo)"
ctest --test-dir build --output-on-failure -j2

if [ $fast -eq 0 ]; then
  echo "== build (gcc Debug, ASan + UBSan)"
  configure build-asan -DCMAKE_BUILD_TYPE=Debug -DSLUICE_SANITIZE=ON
  cmake --build build-asan -j"$jobs"
  echo "== test (gcc Debug, ASan + UBSan)"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  SLUICE_SANITIZED=1 \
    ctest --test-dir build-asan --output-on-failure -j2
fi

# Compile only: warnings these compilers and levels find (gcc's -O3 flow analysis, clang's
# own diagnostics) fail the run; the suite has already run on the same code above.
echo "== compile (gcc Release)"
configure build-rel -DCMAKE_BUILD_TYPE=Release
cmake --build build-rel -j"$jobs"
echo "== compile (clang Release)"
configure build-clang -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Release
cmake --build build-clang -j"$jobs"

if [ $fast -eq 0 ]; then
  # Every target, for a bounded time each; its seeds are replayed first.
  secs=${FUZZ_SECONDS:-20}
  for t in $(scripts/fuzz.sh --list); do
    echo "== fuzz $t (${secs}s)"
    scripts/fuzz.sh "$t" "$secs"
  done
fi
echo "== all tests passed"
