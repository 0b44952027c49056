#!/usr/bin/env bash
# soak.sh — a mixed load against one sluice for MINUTES, then SIGTERM; fails on any sanitizer
# report or any failure the load did not provoke, and prints sluice's RSS each minute.
#
# Usage: scripts/soak.sh [--release] MINUTES [extra soak.py options, e.g. --rate 80]
#   default    the ASan + UBSan build in build-asan/ (configured and built when missing):
#              leaks and memory errors are the verdict; RSS is printed but not judged
#   --release  the optimised build in build/ (RelWithDebInfo, built when missing): RSS
#              must stay within ±10 % of its minute-2 value to the end
#
# The load, the reload and rotation schedule and the verdict are in tests/integration/soak.py.
# Output (logs, access log, summary.json) goes to tests/output/soak/<mode>-<time>/. Not part
# of ctest: too long. It stops by itself (the run is also bounded by timeout(1)).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=asan
if [ "${1:-}" = "--release" ]; then
  mode=release
  shift
fi
minutes=${1:-}
if ! [[ "$minutes" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "usage: scripts/soak.sh [--release] MINUTES [soak.py options]" >&2
  exit 2
fi
shift

if [ "$mode" = asan ]; then
  dir=build-asan
  flags=(-DCMAKE_BUILD_TYPE=Debug -DSLUICE_SANITIZE=ON)
  export SLUICE_SANITIZED=1
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
else
  dir=build
  flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo)
fi
if [ ! -f "$dir/CMakeCache.txt" ]; then
  echo "== configure $dir"
  cmake -S . -B "$dir" "${flags[@]}" >/dev/null
fi
echo "== build $dir (sluice, sluice-mockllm)"
cmake --build "$dir" -j2 --target sluice sluice-mockllm

export SLUICE_BIN=$PWD/$dir/sluice MOCKLLM_BIN=$PWD/$dir/sluice-mockllm SLUICE_SOURCE_DIR=$PWD
out=tests/output/soak/$mode-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
bound=$(python3 -c "print(int(float('$minutes') * 60 + 300))")
echo "== soak: $minutes min, $mode build, output in $out"
timeout --signal=TERM --kill-after=30 "$bound" \
  python3 tests/integration/soak.py --minutes "$minutes" --mode "$mode" --out "$out" "$@" \
  2>&1 | tee "$out/soak.log"
exit "${PIPESTATUS[0]}"
