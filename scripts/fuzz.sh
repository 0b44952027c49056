#!/usr/bin/env bash
# fuzz.sh — build the libFuzzer targets (clang, ASan + UBSan, in build-fuzz) and fuzz one.
# Usage: scripts/fuzz.sh TARGET SECONDS    TARGET: sse or fuzz_sse (tests/fuzz/fuzz_sse.c)
#        scripts/fuzz.sh --list             the targets, one a line
# Exits non-zero on any finding (crash, leak, UBSan report, timeout, out-of-memory); the
# input that found it is kept in build-fuzz/fuzz-work/TARGET/artifacts/. The seeds in
# tests/fuzz/corpus/fuzz_NAME/ (or corpus/NAME/) are read, never written: new inputs go to the work directory,
# which later runs start from. FUZZ_JOBS=N runs N processes at once (N CPUs busy).
set -euo pipefail
cd "$(dirname "$0")/.."

build=${SLUICE_FUZZ_BUILD:-build-fuzz}

if [ "${1:-}" = "--list" ]; then
  for f in tests/fuzz/fuzz_*.c; do basename "$f" .c; done
  exit 0
fi
if [ $# -ne 2 ] || ! [[ "$2" =~ ^[0-9]+$ ]]; then
  sed -n '3,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
name=fuzz_${1#fuzz_}
secs=$2
if [ ! -f "tests/fuzz/$name.c" ]; then
  echo "fuzz: no target tests/fuzz/$name.c (scripts/fuzz.sh --list)" >&2
  exit 2
fi

# Configure once, then let the build tool decide what is stale (a no-op when nothing is).
# -O1: the usual trade for fuzzing (fast, yet stack traces still make sense); Debug keeps
# the code's own assertions.
if [ ! -f "$build/CMakeCache.txt" ]; then
  CC=${FUZZ_CC:-clang} cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS=-O1 \
    -DSLUICE_FUZZ=ON -DSLUICE_TESTS=OFF -DSLUICE_WERROR=ON >/dev/null
fi
cmake --build "$build" -j"${FUZZ_BUILD_JOBS:-2}" --target "$name" >/dev/null

work="$build/fuzz-work/$name"
mkdir -p "$work/corpus" "$work/artifacts"
args=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1
      -artifact_prefix="$work/artifacts/")
# Seeds and dictionary under the target's name, with or without the fuzz_ prefix.
short=${name#fuzz_}
for d in "tests/fuzz/$name.dict" "tests/fuzz/$short.dict"; do
  [ -f "$d" ] && { args+=(-dict="$d"); break; }
done
seeds=()
for d in "tests/fuzz/corpus/$name" "tests/fuzz/corpus/$short"; do
  [ -d "$d" ] && seeds+=("$d")
done
jobs=${FUZZ_JOBS:-1}
[ "$jobs" -gt 1 ] && args+=(-fork="$jobs" -ignore_crashes=0)

echo "fuzz: $name for ${secs}s (${jobs} process(es)); work in $work" >&2
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=1:abort_on_error=0:quarantine_size_mb=64"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}print_stacktrace=1:halt_on_error=1"
log="$work/last.log"
set +e
TIMEFORMAT='%U %S'
{ time "$build/tests/fuzz/$name" "${args[@]}" "$work/corpus" ${seeds[@]+"${seeds[@]}"} \
    >"$log" 2>&1; } 2>"$work/last.cpu"
rc=$?
set -e
if [ $rc -ne 0 ]; then
  tail -n 60 "$log" >&2
  echo "fuzz: $name FOUND SOMETHING (exit $rc); inputs in $work/artifacts/, log $log" >&2
  exit 1
fi
# The run's figures, for the record: executions, CPU time (user + system, all processes).
runs=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#')
cpu=$(awk '{printf "%.1f", ($1 + $2) / 60}' "$work/last.cpu")
echo "fuzz: $name clean: ${secs}s, $cpu CPU-minutes, $runs inputs" >&2
