#!/usr/bin/env bash
# bench/mcp.sh — what the MCP gateway adds to a tool call (bench/README.md, "MCP").
#
# One real MCP server (tests/mcp/servers.mjs, the official SDK's Streamable HTTP transport:
# every call answered as an SSE stream) and Sluice in front of it on a `type: mcp` route with
# key-auth, a tool filter and a consumer rate limit (memory store), access log on. Rounds
# alternate: N sequential tools/call on one keep-alive connection straight to the server,
# then the same through Sluice (bench/mcp_calls.py). Reported: latency per call both ways and
# the difference (added latency), and Sluice's CPU time per call (utime+stime of the process
# over the calls through it, divided by their number).
#
# With BASE_BIN (another sluice binary, e.g. built at an earlier commit), every round also
# runs the same calls through it, right after the ones through SLUICE, on a gateway of its
# own: a before/after comparison under the same conditions. With CALLGRIND=1, each binary
# then runs CG_CALLS calls under callgrind (after a warm-up), for instructions per call: a
# count that the machine's noise does not move (bench/callgrind_summary.py).
#
# Usage: bench/mcp.sh     (~1 minute, ~3 with BASE_BIN and CALLGRIND; needs node + tests/mcp's
#                          node_modules, python3; valgrind for CALLGRIND)
# Knobs: ROUNDS=5 CALLS=2000 SERVER_CPUS=0 CLIENT_CPUS=1 BUILD_DIR=build SKIP_BUILD=1
#        BASE_PORT=28600 KEEP=1 BASE_BIN=path CALLGRIND=1 CG_CALLS=1000
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
ROUNDS=${ROUNDS:-5}
CALLS=${CALLS:-2000}
SERVER_CPUS=${SERVER_CPUS-0}
CLIENT_CPUS=${CLIENT_CPUS-1}
BUILD_DIR=${BUILD_DIR:-build}
BASE_PORT=${BASE_PORT:-28600}
BENCH_TAG=mcp
. "$BENCH/lib.sh"

command -v node > /dev/null || die "node is needed"
[ -d "$ROOT/tests/mcp/node_modules" ] || (cd "$ROOT/tests/mcp" && npm ci --no-audit --no-fund > /dev/null)
if [ "${SKIP_BUILD:-0}" != 1 ]; then
	cmake -S "$ROOT" -B "$ROOT/$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
	cmake --build "$ROOT/$BUILD_DIR" -j2 --target sluice > /dev/null
fi
SLUICE="$ROOT/$BUILD_DIR/sluice"
bench_start mcp-bench

MCP_PORT=$((BASE_PORT + 1)) GW_PORT=$((BASE_PORT + 2)) BASE_GW_PORT=$((BASE_PORT + 3))
CG_PORT=$((BASE_PORT + 4))
BASE_BIN=${BASE_BIN:-}
CG_CALLS=${CG_CALLS:-1000}
"${SRV[@]}" node "$ROOT/tests/mcp/servers.mjs" --kind search --port "$MCP_PORT" > "$WORK/server.log" 2>&1 &
PIDS+=($!)
wait_port "$MCP_PORT"
gateway_yaml() { # port access-log
	cat <<YAML
server: { listen: [{ address: 127.0.0.1:$1 }], workers: 1 }
log: { level: warn, access_log: $2 }
mcp_servers:
  - { name: search, endpoint: "http://127.0.0.1:$MCP_PORT/mcp", auth: { header: { Authorization: "Bearer upstream" } } }
consumers:
  - { name: bench, keys: [bench-key], mcp_tools: { allow: ["search__*"], limits: [{ requests: 100000000, window: 1h }] } }
routes:
  - { name: tools, type: mcp, paths: [/mcp], auth: key-auth, mcp: { servers: [search], tools: { deny: ["*__delete_*"] } } }
YAML
}
gateway_yaml "$GW_PORT" "$WORK/access.log" > "$WORK/sluice.yaml"
"${SRV[@]}" "$SLUICE" -c "$WORK/sluice.yaml" 2> "$WORK/sluice.log" &
GW_PID=$!
PIDS+=($GW_PID)
wait_port "$GW_PORT"
if [ -n "$BASE_BIN" ]; then
	[ -x "$BASE_BIN" ] || die "BASE_BIN $BASE_BIN is not an executable"
	gateway_yaml "$BASE_GW_PORT" "$WORK/access-base.log" > "$WORK/base.yaml"
	"${SRV[@]}" "$BASE_BIN" -c "$WORK/base.yaml" 2> "$WORK/base.log" &
	BASE_PID=$!
	PIDS+=($BASE_PID)
	wait_port "$BASE_GW_PORT"
fi

run() { "${CLI[@]}" python3 "$BENCH/mcp_calls.py" "$@"; }
run "http://127.0.0.1:$MCP_PORT/mcp" search 3000 > /dev/null # warm-up: the server's JIT, connections
run "http://127.0.0.1:$GW_PORT/mcp" search__search 3000 bench-key > /dev/null
[ -n "$BASE_BIN" ] && run "http://127.0.0.1:$BASE_GW_PORT/mcp" search__search 3000 bench-key > /dev/null

# through PID's gateway on PORT: "<calls' JSON> <cpu ticks before> <after>"
through() { # pid port
	local before after out
	before=$(cpu_ticks "$1")
	out=$(run "http://127.0.0.1:$2/mcp" search__search "$CALLS" bench-key)
	after=$(cpu_ticks "$1")
	printf '%s %s %s' "$out" "$before" "$after"
}

printf 'round\tdirect_p50_us\tdirect_p99_us\tsluice_p50_us\tsluice_p99_us\tadded_p50_us\tadded_mean_us\tcpu_us_per_call\tof_which_kernel'
[ -n "$BASE_BIN" ] && printf '\tbase_p50_us\tbase_added_p50_us\tbase_cpu_us_per_call\tbase_of_which_kernel'
printf '\n'
for r in $(seq 1 "$ROUNDS"); do
	d=$(run "http://127.0.0.1:$MCP_PORT/mcp" search "$CALLS")
	b=""
	# the two gateways take turns at going first
	[ -n "$BASE_BIN" ] && [ $((r % 2)) = 0 ] && b=$(through "$BASE_PID" "$BASE_GW_PORT")
	s=$(through "$GW_PID" "$GW_PORT")
	[ -n "$BASE_BIN" ] && [ $((r % 2)) = 1 ] && b=$(through "$BASE_PID" "$BASE_GW_PORT")
	python3 - "$r" "$d" "$HZ" "$CALLS" "$s" "$b" <<'PY'
import json, sys
r, d, hz, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
msgs = n + 3  # the calls plus initialize, initialized, DELETE
cols = [r, "%.0f" % d["p50_us"], "%.0f" % d["p99_us"]]
for i, arg in enumerate(sys.argv[5:]):
    if not arg:
        continue
    calls, b, a = arg.rsplit(" ", 2)
    s = json.loads(calls)
    au, ak = (int(x) for x in a.split(":"))
    bu, bk = (int(x) for x in b.split(":"))
    cpu = (au + ak - bu - bk) / hz * 1e6 / msgs
    kern = (ak - bk) / hz * 1e6 / msgs
    if i == 0:
        cols += ["%.0f" % s["p50_us"], "%.0f" % s["p99_us"], "%.0f" % (s["p50_us"] - d["p50_us"]),
                 "%.0f" % (s["mean_us"] - d["mean_us"]), "%.1f" % cpu, "%.1f" % kern]
    else:
        cols += ["%.0f" % s["p50_us"], "%.0f" % (s["p50_us"] - d["p50_us"]), "%.1f" % cpu, "%.1f" % kern]
print("\t".join(cols))
PY
done
log "access log lines: $(grep -c '"type":"mcp"' "$WORK/access.log")"

# ------------------------------------------------------------------ callgrind
if [ "${CALLGRIND:-0}" = 1 ]; then
	command -v valgrind > /dev/null || die "CALLGRIND=1 needs valgrind"
	kill "$GW_PID" ${BASE_PID:+"$BASE_PID"} 2> /dev/null || true
	wait "$GW_PID" ${BASE_PID:+"$BASE_PID"} 2> /dev/null || true
	gateway_yaml "$CG_PORT" "$WORK/access-cg.log" > "$WORK/cg.yaml"
	for bin in "$SLUICE" ${BASE_BIN:+"$BASE_BIN"}; do
		label=$([ "$bin" = "$SLUICE" ] && echo sluice || echo base)
		"${SRV[@]}" valgrind --tool=callgrind --callgrind-out-file="$WORK/cg-$label.out" \
			"$bin" -c "$WORK/cg.yaml" 2> "$WORK/cg-$label.log" &
		CG_PID=$!
		PIDS+=($CG_PID)
		wait_port "$CG_PORT" 60
		run "http://127.0.0.1:$CG_PORT/mcp" search__search 300 bench-key > /dev/null
		callgrind_control -z "$CG_PID" > /dev/null 2>&1
		run "http://127.0.0.1:$CG_PORT/mcp" search__search "$CG_CALLS" bench-key > /dev/null
		callgrind_control -d "$CG_PID" > /dev/null 2>&1
		kill "$CG_PID"
		wait "$CG_PID" 2> /dev/null || true
		python3 "$BENCH/callgrind_summary.py" "$WORK/cg-$label.out.1" "$CG_CALLS" "MCP tools/call, $label ($bin)"
	done
fi
