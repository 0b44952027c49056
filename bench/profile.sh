#!/usr/bin/env bash
# bench/profile.sh — where Sluice spends its CPU per request (complements bench/run.sh).
#
#  1. syscalls per request (strace -c) for nginx and Sluice, 2,000 requests each;
#  2. perf record of Sluice's worker under the 64-connection non-stream load (kernel included);
#  3. callgrind: instructions per request on a fixed run of N requests (after a warm-up),
#     by library (self cost) and by entry point (inclusive), non-stream and stream.
#
# Usage: bench/profile.sh           (~2-3 minutes; needs valgrind, strace, linux-perf — installed)
# Knobs: N=2000, BUILD_DIR, SKIP_BUILD=1, BASE_PORT=28200, KEEP=1 (keep perf/callgrind files),
#        SERVER_CPUS=0 CLIENT_CPUS=1 (as in run.sh), SKIP_STRACE=1 SKIP_PERF=1 SKIP_CALLGRIND=1
#        (leave a step out), SLUICE_PLAIN=1 (see run.sh)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
N=${N:-2000}
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
BASE_PORT=${BASE_PORT:-28200}
SERVER_CPUS=${SERVER_CPUS-0}
CLIENT_CPUS=${CLIENT_CPUS-1}
BENCH_TAG=profile
# shellcheck source=bench/lib.sh
. "$BENCH/lib.sh"

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v strace >/dev/null || need+=(strace)
command -v perf >/dev/null || need+=(linux-perf)
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
	log "installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	$SUDO apt-get update -qq
	$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ "${SKIP_BUILD:-0}" != 1 ]; then
	[ -x "$ROOT/scripts/deps.sh" ] && "$ROOT/scripts/deps.sh"
	cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSLUICE_TESTS=OFF >/dev/null &&
		cmake --build "$BUILD_DIR" -j"$(nproc)" --target sluice sluice-mockllm >"$BUILD_DIR.log" 2>&1 ||
		log "WARNING: build failed; profiling the binaries already in $BUILD_DIR"
fi
SLUICE="$BUILD_DIR/sluice"
MOCK="$BUILD_DIR/sluice-mockllm"
[ -x "$SLUICE" ] && [ -x "$MOCK" ] || die "no binaries in $BUILD_DIR"

P_MOCK=$((BASE_PORT + 1)) P_NGX=$((BASE_PORT + 2)) P_SLU=$((BASE_PORT + 3))
for p in $P_MOCK $P_NGX $P_SLU $((BASE_PORT + 4)); do
	ss -Hltn "sport = :$p" | grep -q . && die "port $p is in use (set BASE_PORT)"
done
bench_start sluice-profile

"${SRV[@]}" "$MOCK" --listen 127.0.0.1:$P_MOCK --threads 1 --record 0 >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    keepalive_requests 1000000;
    upstream mock { server 127.0.0.1:$P_MOCK; keepalive 128; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$P_NGX;
        location / { proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
    }
}
EOF
"${SRV[@]}" "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx/stderr.log" 2>&1 &
NGX_MASTER=$!
PIDS+=("$NGX_MASTER")
P_ADM=$((BASE_PORT + 4))
sluice_bench_conf $P_SLU $P_MOCK $P_ADM 1 "$WORK/sluice.yaml"
start_sluice() { # [wrapper...]
	"${SRV[@]}" "$@" "$SLUICE" -c "$WORK/sluice.yaml" >>"$WORK/sluice.log" 2>&1 &
	SLU_PID=$!
	PIDS+=("$SLU_PID")
	wait_port $P_SLU 60
}
wait_port $P_MOCK
wait_port $P_NGX
NGX_PID=$(pgrep -P $NGX_MASTER nginx | head -1)
start_sluice

nreq() { "${CLI[@]}" python3 "$BENCH/nreq.py" "$@"; }
URL_N=http://127.0.0.1:$P_NGX/v1/chat/completions
URL_S=http://127.0.0.1:$P_SLU/v1/chat/completions

# ------------------------------------------------------------------ 1. syscalls
OUT="$WORK/report.md"
echo "$(sluice_conditions); commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" >"$OUT"
echo >>"$OUT"
if [ "${SKIP_STRACE:-0}" != 1 ]; then
log "1. syscalls per request (strace -c, $N requests over 4 connections)"
strace_count "$NGX_PID" "$URL_N" "$WORK/strace-nginx-ns.txt" "$N" --tokens 64
strace_count "$SLU_PID" "$URL_S" "$WORK/strace-sluice-ns.txt" "$N" --tokens 64 --key "$BENCH_KEY"
strace_count "$NGX_PID" "$URL_N" "$WORK/strace-nginx-st.txt" "$N" --stream --tokens 16
strace_count "$SLU_PID" "$URL_S" "$WORK/strace-sluice-st.txt" "$N" --stream --tokens 16 --key "$BENCH_KEY"
python3 - "$WORK" "$N" >>"$OUT" <<'PY'
import re, sys
work, n = sys.argv[1], int(sys.argv[2])
def load(label):
    d = {}
    for line in open(f"{work}/strace-{label}.txt"):
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            d[f[-1]] = int(f[3])
    return d
print(f"**Syscalls per request** (strace -c, {n} requests over 4 keep-alive connections)\n")
print("| syscall | nginx non-stream | Sluice non-stream | nginx stream | Sluice stream |")
print("|---|---:|---:|---:|---:|")
cols = [load(l) for l in ("nginx-ns", "sluice-ns", "nginx-st", "sluice-st")]
names = sorted(set().union(*cols), key=lambda k: -max(c.get(k, 0) for c in cols))
for k in names:
    if max(c.get(k, 0) for c in cols) / n >= 0.05:
        print(f"| {k} | " + " | ".join(f"{c.get(k, 0) / n:.2f}" for c in cols) + " |")
print("| **total** | " + " | ".join(f"**{sum(c.values()) / n:.2f}**" for c in cols) + " |\n")
PY
fi

# ------------------------------------------------------------------ 2. perf
if [ "${SKIP_PERF:-0}" != 1 ]; then
log "2. perf record on Sluice under 64-connection non-stream load"
BENCH_KEY=$BENCH_KEY BENCH_TOKENS=64 "${CLI[@]}" timeout 30 wrk -t1 -c64 -d10s -s "$BENCH/chat.lua" "$URL_S" >"$WORK/wrk-perf.txt" 2>&1 &
WRK=$!
sleep 2
perf record -q -F 1999 -g -p "$SLU_PID" -o "$WORK/perf.data" -- sleep 6 >/dev/null 2>&1 || log "perf record failed"
wait $WRK || true
if [ -s "$WORK/perf.data" ]; then
	{
		echo "**perf, Sluice worker under 64-connection non-stream load** (share of its CPU samples)"
		echo
		echo '```'
		perf report -i "$WORK/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -10 || true
		echo
		perf report -i "$WORK/perf.data" --no-children --sort dso,sym --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -30 || true
		echo '```'
		echo
	} >>"$OUT"
fi
fi

# ------------------------------------------------------------------ 3. callgrind
kill $SLU_PID
wait $SLU_PID 2>/dev/null || true
callgrind_run() { # label nreq-args...
	local label=$1
	shift
	start_sluice valgrind --tool=callgrind --callgrind-out-file="$WORK/cg-$label.out"
	nreq "$URL_S" 200 "$@"
	callgrind_control -z $SLU_PID >/dev/null 2>&1
	nreq "$URL_S" "$N" "$@"
	callgrind_control -d $SLU_PID >/dev/null 2>&1
	kill $SLU_PID
	wait $SLU_PID 2>/dev/null || true
	python3 "$BENCH/callgrind_summary.py" "$WORK/cg-$label.out.1" "$N" "$label" >>"$OUT"
}
if [ "${SKIP_CALLGRIND:-0}" != 1 ]; then
	log "3. callgrind, $N non-stream requests"
	callgrind_run non-stream --tokens 64 --key "$BENCH_KEY"
	log "3. callgrind, $N stream requests (16 tokens)"
	callgrind_run stream --stream --tokens 16 --key "$BENCH_KEY"
fi

cat "$OUT"
[ "${KEEP:-0}" = 1 ] && log "perf.data, callgrind files: $WORK"
exit 0
