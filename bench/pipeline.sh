#!/usr/bin/env bash
# bench/pipeline.sh — what the provider adapters and the policies cost per request, in CPU
# instructions (callgrind: deterministic, so a shared noisy machine can still compare) and in
# heap allocations (valgrind's heap summary), against sluice-mockllm.
#
#  1. the OpenAI pass-through (identity) path: this tree vs a base commit (BASE_REF), non-stream
#     and stream — the fast path must not get slower;
#  2. translation: chat → Anthropic, Messages → chat, Responses → chat, per request and per
#     stream event (the per-event figure is the slope between two stream lengths);
#  3. the same chat route with every built-in request and response policy that needs no other
#     service (prompt_guard, prompt_decorator, request_override, request_limits,
#     response_guard, loop_guard) vs without: the ratio;
#  4. heap allocations per request on the route without policies, this tree vs BASE_REF.
#
# Usage: bench/pipeline.sh            (~4-6 minutes; needs valgrind — installed when missing)
# Knobs: N=1000 requests per callgrind run, BASE_REF=3d4b00d, BUILD_DIR, BASE_DIR,
#        SKIP_BUILD=1, BASE_PORT=28300, KEEP=1, SERVER_CPUS=0 CLIENT_CPUS=1 (as in run.sh),
#        ONLY=policies (just this tree's identity and policed routes: 3 and its reference,
#        no base build; ~2 minutes)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
N=${N:-1000}
BASE_REF=${BASE_REF:-3d4b00d}
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
BASE_DIR=${BASE_DIR:-$ROOT/build-bench-base}
BASE_PORT=${BASE_PORT:-28300}
SERVER_CPUS=${SERVER_CPUS-0}
CLIENT_CPUS=${CLIENT_CPUS-1}
ONLY=${ONLY:-}
BENCH_TAG=pipeline
# shellcheck source=bench/lib.sh
. "$BENCH/lib.sh"

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v valgrind >/dev/null; then
	log "installing valgrind"
	export DEBIAN_FRONTEND=noninteractive
	$SUDO apt-get update -qq
	$SUDO apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi

# ------------------------------------------------------------------ builds
build() { # source-dir build-dir
	cmake -S "$1" -B "$2" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSLUICE_TESTS=OFF >/dev/null &&
		cmake --build "$2" -j2 --target sluice sluice-mockllm >"$2.log" 2>&1
}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
	build "$ROOT" "$BUILD_DIR" || log "WARNING: build failed; using the binaries in $BUILD_DIR"
	if [ "$ONLY" != policies ] && [ ! -x "$BASE_DIR/sluice" ]; then
		log "building $BASE_REF into $BASE_DIR"
		src="$BASE_DIR-src"
		rm -rf "$src" && mkdir -p "$src"
		git -C "$ROOT" archive "$BASE_REF" | tar -x -C "$src"
		build "$src" "$BASE_DIR" || die "cannot build $BASE_REF"
	fi
fi
SLUICE="$BUILD_DIR/sluice"
BASE_SLUICE="$BASE_DIR/sluice"
MOCK="$BUILD_DIR/sluice-mockllm"
[ -x "$SLUICE" ] && [ -x "$MOCK" ] || die "no binaries"
[ "$ONLY" = policies ] || [ -x "$BASE_SLUICE" ] || die "no base binary"

P_MOCK=$((BASE_PORT + 1)) P_SLU=$((BASE_PORT + 2))
for p in $P_MOCK $P_SLU; do
	ss -Hltn "sport = :$p" | grep -q . && die "port $p is in use (set BASE_PORT)"
done
bench_start sluice-pipeline

"${SRV[@]}" "$MOCK" --listen 127.0.0.1:$P_MOCK --threads 1 --record 0 >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
wait_port $P_MOCK

# The base understands only what the identity route needs; this tree gets every route.
IDENTITY_ROUTES="
  - name: chat
    paths: [/v1/chat/completions]
    models: [mock-model]
    auth: none
    targets: [{ instance: mock }]"
cat >"$WORK/base.yaml" <<EOF
server: { listen: [{ address: 127.0.0.1:$P_SLU }], workers: 1 }
log: { level: warn, access_log: off }
instances:
  - { name: mock, provider: openai-compatible, endpoint: "http://127.0.0.1:$P_MOCK/v1/chat/completions", keepalive: { pool: 128 } }
routes:$IDENTITY_ROUTES
EOF
cat >"$WORK/new.yaml" <<EOF
server: { listen: [{ address: 127.0.0.1:$P_SLU }], workers: 1 }
log: { level: warn, access_log: off }
instances:
  - { name: mock, provider: openai-compatible, endpoint: "http://127.0.0.1:$P_MOCK/v1/chat/completions", keepalive: { pool: 128 } }
  - { name: claude, provider: anthropic, endpoint: "http://127.0.0.1:$P_MOCK/v1/messages", model: claude-up, keepalive: { pool: 128 } }
routes:$IDENTITY_ROUTES
  - name: policed
    paths: [/v1/chat/completions]
    models: [policed]
    auth: none
    targets: [{ instance: mock }]
    plugins:
      - prompt_guard: { deny: ["(?i)ignore (all )?previous instructions"] }
      - prompt_decorator: { prepend: [{ role: system, content: "Answer in the user's language." }] }
      - request_override: { cap: { max_tokens: 4096 }, remove: [logit_bias] }
      - request_limits: { max_messages: 200, max_prompt_tokens: 32000, deny_params: [logprobs] }
      - response_guard: { deny: ["\\\\b\\\\d{16}\\\\b"] }
      - loop_guard: { max_repeats: 8, window: 512 }
  - name: to-claude
    paths: [/v1/chat/completions]
    models: [claude]
    auth: none
    targets: [{ instance: claude }]
  - name: messages
    paths: [/v1/messages]
    auth: none
    targets: [{ instance: mock }]
  - name: responses
    paths: [/v1/responses]
    auth: none
    targets: [{ instance: mock }]
EOF
"$SLUICE" -t -c "$WORK/new.yaml" >/dev/null || die "new.yaml does not load"

start_sluice() { # binary config [wrapper...]
	local bin=$1 cfg=$2
	shift 2
	"${SRV[@]}" "$@" "$bin" -c "$cfg" >>"$WORK/sluice.log" 2>&1 &
	SLU_PID=$!
	PIDS+=("$SLU_PID")
	wait_port $P_SLU 60
}
stop_sluice() {
	kill "$SLU_PID"
	wait "$SLU_PID" 2>/dev/null || true
}
nreq() { "${CLI[@]}" python3 "$BENCH/nreq.py" "$@"; }
URL=http://127.0.0.1:$P_SLU

# Instructions of N requests (after a warm-up), total over the process: printed per request.
CG_CASES=()
cg() { # label binary config path nreq-args...
	local label=$1 bin=$2 cfg=$3 path=$4
	shift 4
	start_sluice "$bin" "$cfg" valgrind --tool=callgrind --callgrind-out-file="$WORK/cg-$label.out"
	nreq "$URL$path" 100 "$@"
	callgrind_control -z "$SLU_PID" >/dev/null 2>&1
	nreq "$URL$path" "$N" "$@"
	callgrind_control -d "$SLU_PID" >/dev/null 2>&1
	stop_sluice
	local ir
	ir=$(awk '/^summary:/ { print $2 }' "$WORK/cg-$label.out.1")
	echo "$label $ir" >>"$WORK/cg.txt"
	log "  $label: $((ir / N)) instructions per request"
}

# Heap allocations per request: (allocations after 2N requests − after N requests) / N,
# each from valgrind's heap summary at exit.
allocs() { # label binary config path nreq-args...
	local label=$1 bin=$2 cfg=$3 path=$4 n
	shift 4
	for n in $N $((2 * N)); do
		start_sluice "$bin" "$cfg" valgrind --tool=memcheck --leak-check=no \
			--log-file="$WORK/mc-$label-$n.txt"
		nreq "$URL$path" "$n" "$@"
		stop_sluice
	done
	local a b
	a=$(grep -o '[0-9,]* allocs' "$WORK/mc-$label-$N.txt" | tr -d ', allocs')
	b=$(grep -o '[0-9,]* allocs' "$WORK/mc-$label-$((2 * N)).txt" | tr -d ', allocs')
	echo "$label $a $b" >>"$WORK/allocs.txt"
	log "  $label: $(((b - a) / N)) allocations per request"
}

: >"$WORK/cg.txt"
: >"$WORK/allocs.txt"
if [ "$ONLY" = policies ]; then
	log "identity and policed routes only ($N requests per run)"
	cg new-ns "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --tokens 64
	cg new-st16 "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --stream --tokens 16
	cg new-st48 "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --stream --tokens 48
	cg policed-ns "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --model policed --tokens 64
	cg policed-st16 "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --model policed --stream --tokens 16
	cg policed-st48 "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --model policed --stream --tokens 48
else
	log "1. identity, this tree vs $BASE_REF ($N requests per run)"
	cg base-ns "$BASE_SLUICE" "$WORK/base.yaml" /v1/chat/completions --tokens 64
	cg new-ns "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --tokens 64
	cg base-st16 "$BASE_SLUICE" "$WORK/base.yaml" /v1/chat/completions --stream --tokens 16
	cg new-st16 "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --stream --tokens 16
	cg new-st48 "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --stream --tokens 48
	log "2. translation"
	for p in "claude chat /v1/chat/completions" "mock-model messages /v1/messages" \
		"mock-model responses /v1/responses"; do
		set -- $p
		cg "$2-$1-ns" "$SLUICE" "$WORK/new.yaml" "$3" --model "$1" --proto "$2" --tokens 64
		cg "$2-$1-st16" "$SLUICE" "$WORK/new.yaml" "$3" --model "$1" --proto "$2" --stream --tokens 16
		cg "$2-$1-st48" "$SLUICE" "$WORK/new.yaml" "$3" --model "$1" --proto "$2" --stream --tokens 48
	done
	log "3. policies"
	cg policed-ns "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --model policed --tokens 64
	cg policed-st16 "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --model policed --stream --tokens 16
	cg policed-st48 "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --model policed --stream --tokens 48
	log "4. allocations"
	allocs base-ns "$BASE_SLUICE" "$WORK/base.yaml" /v1/chat/completions --tokens 64
	allocs new-ns "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --tokens 64
	allocs base-st "$BASE_SLUICE" "$WORK/base.yaml" /v1/chat/completions --stream --tokens 16
	allocs new-st "$SLUICE" "$WORK/new.yaml" /v1/chat/completions --stream --tokens 16
fi
python3 - "$WORK" "$N" <<'PY'
import sys
work, n = sys.argv[1], int(sys.argv[2])
ir = {l.split()[0]: int(l.split()[1]) / n for l in open(f"{work}/cg.txt")}
al = {l.split()[0]: (int(l.split()[2]) - int(l.split()[1])) / n for l in open(f"{work}/allocs.txt")}
def k(x):
    return f"{x / 1000:.1f}k"
def per_event(prefix):
    return (ir[prefix + "-st48"] - ir[prefix + "-st16"]) / 32
print(f"**Instructions per request** (callgrind, {n} requests after 100 of warm-up, the whole process)\n")
if "base-ns" not in ir:
    print("| path | non-stream | stream, 16 tokens | per stream event |")
    print("|---|---:|---:|---:|")
    print(f"| identity | {k(ir['new-ns'])} | {k(ir['new-st16'])} | {k(per_event('new'))} |")
    print(f"| chat, 6 policies | {k(ir['policed-ns'])} ({ir['policed-ns'] / ir['new-ns']:.2f}×) | "
          f"{k(ir['policed-st16'])} ({ir['policed-st16'] / ir['new-st16']:.2f}×) | "
          f"{k(per_event('policed'))} ({per_event('policed') / per_event('new'):.2f}×) |")
    sys.exit(0)
print("| path | non-stream | stream, 16 tokens | per stream event |")
print("|---|---:|---:|---:|")
print(f"| identity, base | {k(ir['base-ns'])} | {k(ir['base-st16'])} | |")
print(f"| identity, this tree | {k(ir['new-ns'])} ({ir['new-ns'] / ir['base-ns'] - 1:+.1%}) | "
      f"{k(ir['new-st16'])} ({ir['new-st16'] / ir['base-st16'] - 1:+.1%}) | {k(per_event('new'))} |")
for label, prefix in (("chat → Anthropic", "chat-claude"), ("Messages → chat", "messages-mock-model"),
                      ("Responses → chat", "responses-mock-model")):
    print(f"| {label} | {k(ir[prefix + '-ns'])} | {k(ir[prefix + '-st16'])} | {k(per_event(prefix))} |")
print(f"| chat, 6 policies | {k(ir['policed-ns'])} ({ir['policed-ns'] / ir['new-ns']:.2f}×) | "
      f"{k(ir['policed-st16'])} ({ir['policed-st16'] / ir['new-st16']:.2f}×) | "
      f"{k(per_event('policed'))} ({per_event('policed') / per_event('new'):.2f}×) |")
print()
print("**Heap allocations per request** (valgrind, the difference between N and 2N requests)\n")
print("| path | base | this tree |")
print("|---|---:|---:|")
print(f"| identity non-stream | {al['base-ns']:.2f} | {al['new-ns']:.2f} |")
print(f"| identity stream, 16 tokens | {al['base-st']:.2f} | {al['new-st']:.2f} |")
PY
