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
# Usage: bench/mcp.sh     (~1 minute; needs node + tests/mcp's node_modules, python3)
# Knobs: ROUNDS=5 CALLS=2000 SERVER_CPUS=0 CLIENT_CPUS=1 BUILD_DIR=build SKIP_BUILD=1
#        BASE_PORT=28600 KEEP=1
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

MCP_PORT=$((BASE_PORT + 1)) GW_PORT=$((BASE_PORT + 2))
"${SRV[@]}" node "$ROOT/tests/mcp/servers.mjs" --kind search --port "$MCP_PORT" > "$WORK/server.log" 2>&1 &
PIDS+=($!)
wait_port "$MCP_PORT"
cat > "$WORK/sluice.yaml" <<YAML
server: { listen: [{ address: 127.0.0.1:$GW_PORT }], workers: 1 }
log: { level: warn, access_log: $WORK/access.log }
mcp_servers:
  - { name: search, endpoint: "http://127.0.0.1:$MCP_PORT/mcp", auth: { header: { Authorization: "Bearer upstream" } } }
consumers:
  - { name: bench, keys: [bench-key], mcp_tools: { allow: ["search__*"], limits: [{ requests: 100000000, window: 1h }] } }
routes:
  - { name: tools, type: mcp, paths: [/mcp], auth: key-auth, mcp: { servers: [search], tools: { deny: ["*__delete_*"] } } }
YAML
"${SRV[@]}" "$SLUICE" -c "$WORK/sluice.yaml" 2> "$WORK/sluice.log" &
GW_PID=$!
PIDS+=($GW_PID)
wait_port "$GW_PORT"

run() { "${CLI[@]}" python3 "$BENCH/mcp_calls.py" "$@"; }
run "http://127.0.0.1:$MCP_PORT/mcp" search 3000 > /dev/null # warm-up: the server's JIT, connections
run "http://127.0.0.1:$GW_PORT/mcp" search__search 3000 bench-key > /dev/null

printf 'round\tdirect_p50_us\tdirect_p99_us\tsluice_p50_us\tsluice_p99_us\tadded_p50_us\tadded_mean_us\tcpu_us_per_call\tof_which_kernel\n'
for r in $(seq 1 "$ROUNDS"); do
	d=$(run "http://127.0.0.1:$MCP_PORT/mcp" search "$CALLS")
	before=$(cpu_ticks "$GW_PID")
	s=$(run "http://127.0.0.1:$GW_PORT/mcp" search__search "$CALLS" bench-key)
	after=$(cpu_ticks "$GW_PID")
	python3 - "$r" "$d" "$s" "$before" "$after" "$HZ" "$CALLS" <<'PY'
import json, sys
r, d, s, b, a, hz, n = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
au, ak = (int(x) for x in a.split(":"))
bu, bk = (int(x) for x in b.split(":"))
msgs = n + 3  # the calls plus initialize, initialized, DELETE
cpu = (au + ak - bu - bk) / hz * 1e6 / msgs
kern = (ak - bk) / hz * 1e6 / msgs
print("\t".join([r, "%.0f" % d["p50_us"], "%.0f" % d["p99_us"], "%.0f" % s["p50_us"], "%.0f" % s["p99_us"],
                 "%.0f" % (s["p50_us"] - d["p50_us"]), "%.0f" % (s["mean_us"] - d["mean_us"]), "%.1f" % cpu, "%.1f" % kern]))
PY
done
log "access log lines: $(grep -c '"type":"mcp"' "$WORK/access.log")"
