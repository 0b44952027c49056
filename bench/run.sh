#!/usr/bin/env bash
# bench/run.sh — Sluice vs the mock model server alone vs nginx as a plain keep-alive
# reverse proxy, one worker each, interleaved in one run; then 10,000 open streams
# through Sluice. Prints absolute figures and ratios (see bench/README.md).
#
# Usage: bench/run.sh            (as root, or with sudo for apt; ~7 minutes)
# Knobs (environment):
#   ROUNDS=5            interleaved rounds (A B C per step, per round); medians are reported
#   DURATION=6          seconds per wrk run
#   CONNS=64            connections for the throughput steps
#   NS_TOKENS=64        tokens in a non-stream reply (~650-byte body)
#   ST_TOKENS=16        tokens in a stream (18 SSE events + [DONE])
#   SCALE_N=10000       open streams in step 4 (capped by the fd limit, see README)
#   SERVER_CPUS=0       CPUs for the mock, nginx and Sluice (taskset list; "" = no pinning)
#   CLIENT_CPUS=1       CPUs for wrk and the stream client
#   BUILD_DIR=…         where to build (default build-bench); SKIP_BUILD=1 uses it as is
#   BASE_PORT=28100     ports BASE+1 … BASE+8 on 127.0.0.1
#   SYSCALL_N=2000      requests per strace -c count (step 5); 0 skips it
#   SLUICE_PLAIN=1      Sluice without key-auth, quota and admin listener (the pre-issue-10 setup)
#   KEEP=1              keep the work directory (configs, logs, raw results)
#   SKIP_SCALE=1        skip step 4;  ONLY_SCALE=1  run step 4 alone
#   STEPS="ns st c1"    which of steps 1-3 to run (non-stream, stream, concurrency 1)
#   PAIRS_N=20000       step 3b: mock/proxy request pairs per round at c=1 (0 skips it)
#   KEEP_AWAKE=1        during step 3, a SCHED_IDLE busy loop on every CPU keeps the (virtual)
#                       CPUs from halting between requests; 0 turns it off (see README)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6}
CONNS=${CONNS:-64}
NS_TOKENS=${NS_TOKENS:-64}
ST_TOKENS=${ST_TOKENS:-16}
SCALE_N=${SCALE_N:-10000}
SERVER_CPUS=${SERVER_CPUS-0}
CLIENT_CPUS=${CLIENT_CPUS-1}
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
BASE_PORT=${BASE_PORT:-28100}

BENCH_TAG=bench
# shellcheck source=bench/lib.sh
. "$BENCH/lib.sh"

# ------------------------------------------------------------------ packages
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v python3 >/dev/null || need+=(python3)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v taskset >/dev/null || need+=(util-linux)
command -v strace >/dev/null || need+=(strace)
if [ ${#need[@]} -gt 0 ]; then
	log "installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	$SUDO apt-get update -qq
	for p in "${need[@]}"; do
		if [ "$p" = nginx ]; then # the light flavour is enough; plain nginx where it's gone
			$SUDO apt-get install -y -qq --no-install-recommends nginx-light >/dev/null 2>&1 ||
				$SUDO apt-get install -y -qq --no-install-recommends nginx >/dev/null
		else
			$SUDO apt-get install -y -qq --no-install-recommends "$p" >/dev/null
		fi
	done
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
# The build's own dependencies (compiler, cmake, -dev packages).
[ -x "$ROOT/scripts/deps.sh" ] && "$ROOT/scripts/deps.sh"

# ------------------------------------------------------------------ build
if [ "${SKIP_BUILD:-0}" != 1 ]; then
	log "building (RelWithDebInfo) in $BUILD_DIR"
	if ! { cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSLUICE_TESTS=OFF >/dev/null &&
		cmake --build "$BUILD_DIR" -j"$(nproc)" --target sluice sluice-mockllm >"$BUILD_DIR.log" 2>&1; }; then
		tail -20 "$BUILD_DIR.log" >&2 || true
		[ -x "$BUILD_DIR/sluice" ] && [ -x "$BUILD_DIR/sluice-mockllm" ] ||
			die "build failed and no earlier binaries in $BUILD_DIR"
		log "WARNING: build failed; benchmarking the binaries already in $BUILD_DIR"
	fi
fi
SLUICE="$BUILD_DIR/sluice"
MOCK="$BUILD_DIR/sluice-mockllm"
[ -x "$SLUICE" ] && [ -x "$MOCK" ] || die "no binaries in $BUILD_DIR"

# ------------------------------------------------------------------ limits, ports, cleanup
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
P_MOCK=$((BASE_PORT + 1)) P_NGX=$((BASE_PORT + 2)) P_NGXS=$((BASE_PORT + 3))
P_SLU=$((BASE_PORT + 4)) P_SMOCK=$((BASE_PORT + 5)) P_SSLU=$((BASE_PORT + 6))
P_ADM=$((BASE_PORT + 7)) P_SADM=$((BASE_PORT + 8))
for p in $P_MOCK $P_NGX $P_NGXS $P_SLU $P_SMOCK $P_SSLU $P_ADM $P_SADM; do
	ss -Hltn "sport = :$p" | grep -q . && die "port $p is in use (set BASE_PORT)"
done

bench_start sluice-bench



cpu_busy() { # "busy total" jiffies of one CPU from /proc/stat
	awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

# ------------------------------------------------------------------ the three targets
log "starting mock, nginx, sluice (servers on CPUs '${SERVER_CPUS:-any}', client on '${CLIENT_CPUS:-any}')"
"${SRV[@]}" "$MOCK" --listen 127.0.0.1:$P_MOCK --threads 1 --record 0 --tokens 16 \
	>"$WORK/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=("$MOCK_PID")

mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    keepalive_requests 1000000;   # don't close the load generator's connections every 1000
    upstream mock {
        server 127.0.0.1:$P_MOCK;
        keepalive 128;
        keepalive_requests 1000000;
    }
    server {                      # non-stream: proxy defaults (buffering on)
        listen 127.0.0.1:$P_NGX;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    server {                      # stream: unbuffered
        listen 127.0.0.1:$P_NGXS;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
"${SRV[@]}" "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx/stderr.log" 2>&1 &
NGX_MASTER=$!
PIDS+=("$NGX_MASTER")

sluice_bench_conf $P_SLU $P_MOCK $P_ADM 1 "$WORK/sluice.yaml"
"${SRV[@]}" "$SLUICE" -c "$WORK/sluice.yaml" >"$WORK/sluice.log" 2>&1 &
SLU_PID=$!
PIDS+=("$SLU_PID")

wait_port $P_MOCK
wait_port $P_NGX
wait_port $P_SLU
NGX_PID=""
for _ in $(seq 50); do
	NGX_PID=$(pgrep -P $NGX_MASTER nginx | head -1 || true)
	[ -n "$NGX_PID" ] && break
	sleep 0.1
done
[ -n "$NGX_PID" ] || die "no nginx worker"

URL_A=http://127.0.0.1:$P_MOCK/v1/chat/completions
url_of() { # target step
	case "$1" in
	A) echo "$URL_A" ;;
	B) if [ "$2" = st ]; then echo "http://127.0.0.1:$P_NGXS/v1/chat/completions"; else echo "http://127.0.0.1:$P_NGX/v1/chat/completions"; fi ;;
	C) echo "http://127.0.0.1:$P_SLU/v1/chat/completions" ;;
	esac
}
proxy_pid_of() { case "$1" in A) echo "" ;; B) echo "$NGX_PID" ;; C) echo "$SLU_PID" ;; esac; }

# Every target must answer 200 to both request kinds before any timing.
for t in A B C; do
	for st in false true; do
		code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Content-Type: application/json' \
			-H "Authorization: Bearer $BENCH_KEY" -d "{\"model\":\"mock-model\",\"stream\":$st,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}" \
			"$(url_of $t ns)") || true
		[ "$code" = 200 ] || die "target $t (stream=$st) answered '$code'"
	done
done

RAW="$WORK/raw.tsv"
printf 'round\tstep\ttarget\trequests\tseconds\trps\tp50_us\tp90_us\tp99_us\terrors\tproxy_cpu_us_req\tproxy_sys_us_req\tmock_cpu_us_req\tserver_cpu_busy\tclient_cpu_busy\n' >"$RAW"

run_wrk() { # round step target conns stream tokens
	local round=$1 step=$2 t=$3 conns=$4 stream=$5 tokens=$6
	local ppid out line c0=0:0 c1=0:0 m0 m1 s0 s1 k0 k1
	ppid=$(proxy_pid_of "$t")
	[ -n "$ppid" ] && c0=$(cpu_ticks "$ppid")
	m0=$(cpu_ticks $MOCK_PID)
	s0=$(cpu_busy "${SERVER_CPUS%%[,-]*}" 2>/dev/null || true)
	k0=$(cpu_busy "${CLIENT_CPUS%%[,-]*}" 2>/dev/null || true)
	local key=""
	[ "$t" = C ] && key=$BENCH_KEY # only Sluice checks a key; the others get the same bytes otherwise
	out=$(BENCH_KEY=$key BENCH_STREAM=$stream BENCH_TOKENS=$tokens "${CLI[@]}" \
		timeout $((DURATION + 30)) wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 5s -s "$BENCH/chat.lua" "$(url_of "$t" "$step")" 2>&1) || true
	[ -n "$ppid" ] && c1=$(cpu_ticks "$ppid")
	m1=$(cpu_ticks $MOCK_PID)
	s1=$(cpu_busy "${SERVER_CPUS%%[,-]*}" 2>/dev/null || true)
	k1=$(cpu_busy "${CLIENT_CPUS%%[,-]*}" 2>/dev/null || true)
	line=$(grep '^RESULT' <<<"$out" || true)
	[ -n "$line" ] || { printf '%s\n' "$out" >&2; die "wrk gave no result ($step $t)"; }
	[ "$round" = warm ] && return 0
	python3 - "$round" "$step" "$t" "$line" "$HZ" "$c0" "$c1" "$m0" "$m1" "$s0" "$s1" "$k0" "$k1" "$ppid" >>"$RAW" <<'PY'
import sys
rnd, step, t, line, hz, c0, c1, m0, m1, s0, s1, k0, k1, ppid = sys.argv[1:]
f = dict(kv.split("=", 1) for kv in line.split()[1:])
req = int(f["requests"]); sec = int(f["duration_us"]) / 1e6
errs = int(f["sockerr"]) + int(f["status_err"]) + int(f["timeouts"])
tick_us = 1e6 / int(hz)
def per_req(a, b, which=(0, 1)):  # a, b: "utime:stime" ticks
    a = list(map(int, a.split(":"))); b = list(map(int, b.split(":")))
    return sum(b[i] - a[i] for i in which) * tick_us / req if req else float("nan")
proxy = per_req(c0, c1) if ppid else float("nan")
proxy_sys = per_req(c0, c1, (1,)) if ppid else float("nan")
mock = per_req(m0, m1)
def busy(a, b):
    try:
        a = list(map(int, a.split())); b = list(map(int, b.split()))
        return (b[0] - a[0]) / (b[1] - a[1])
    except Exception:
        return float("nan")
print(f"{rnd}\t{step}\t{t}\t{req}\t{sec:.3f}\t{req/sec:.1f}\t{f['p50_us']}\t{f['p90_us']}\t{f['p99_us']}\t{errs}\t"
      f"{proxy:.2f}\t{proxy_sys:.2f}\t{mock:.2f}\t{busy(s0, s1):.3f}\t{busy(k0, k1):.3f}")
PY
	log "round $round $step $t: $(tail -1 "$RAW" | awk -F'\t' '{printf "%s req/s p50 %s µs p99 %s µs err %s proxy %s µs/req (sys %s) mock %s µs/req", $6, $7, $9, $10, $11, $12, $13}')"
}

# At concurrency 1 the CPUs idle between requests; waking a halted vCPU costs milliseconds on
# this VM (p99 2-3 ms for the mock alone), which would drown the microseconds we measure. A
# SCHED_IDLE spinner per CPU keeps them awake and yields at once to anything else.
SPIN=()
spin_start() {
	if [ "${KEEP_AWAKE:-1}" != 1 ]; then return 0; fi
	local c
	for ((c = 0; c < $(nproc); c++)); do
		chrt -i 0 taskset -c $c sh -c 'while :; do :; done' &
		SPIN+=($!)
		PIDS+=($!)
	done
}
spin_stop() {
	if [ ${#SPIN[@]} -eq 0 ]; then return 0; fi
	kill "${SPIN[@]}" 2>/dev/null || true
	wait "${SPIN[@]}" 2>/dev/null || true
	SPIN=()
}

read -r -a STEPS <<<"${STEPS:-ns st c1}"
step_args() { # step -> conns stream tokens
	case "$1" in
	ns) echo "$CONNS 0 $NS_TOKENS" ;;
	st) echo "$CONNS 1 $ST_TOKENS" ;;
	c1) echo "1 0 $NS_TOKENS" ;;
	esac
}

[ "${ONLY_SCALE:-0}" = 1 ] && ROUNDS=0
[ "$ROUNDS" -gt 0 ] && log "warm-up"
PAIRS_N=${PAIRS_N:-20000}
: >"$WORK/pairs.tsv"
SAVED=$DURATION
DURATION=2
[ "$ROUNDS" -gt 0 ] && for t in A B C; do run_wrk warm ns $t $CONNS 0 "$NS_TOKENS"; run_wrk warm st $t $CONNS 1 "$ST_TOKENS"; done
DURATION=$SAVED

log "steps 1-3: $ROUNDS rounds x (non-stream, stream, c=1) x (A mock, B nginx, C sluice), ${DURATION}s each"
for ((r = 1; r <= ROUNDS; r++)); do
	for s in "${STEPS[@]}"; do
		read -r c st tk <<<"$(step_args $s)"
		if [ $s = c1 ]; then spin_start; fi
		for t in A B C; do run_wrk $r $s $t "$c" "$st" "$tk"; done
		if [ $s = c1 ] && [ "$PAIRS_N" -gt 0 ]; then
			# Step 3b: the same at c=1, but mock and proxy requests interleaved one by one
			# (bench/c1_pairs.py), so both see the same moments of the machine's load.
			for t in B C; do
				key=""
				[ "$t" = C ] && key=$BENCH_KEY
				line=$("${CLI[@]}" timeout 300 python3 "$BENCH/c1_pairs.py" "$URL_A" "$(url_of $t ns)" \
					--n "$PAIRS_N" --tokens "$NS_TOKENS" --key "$key" | grep '^PAIRS' || true)
				printf '%s\t%s\t%s\n' "$r" "$t" "$line" >>"$WORK/pairs.tsv"
				log "round $r pairs $t: $(grep -o 'added_p50=[0-9.-]* added_p90=[0-9.-]* added_p99=[0-9.-]*' <<<"$line")"
			done
		fi
		if [ $s = c1 ]; then spin_stop; fi
	done
done

SLU_RSS_AFTER_LOAD=$(awk '/^VmRSS/ { print $2 }' /proc/$SLU_PID/status)

# ------------------------------------------------------------------ step 5: syscalls per request
# strace slows what it traces, so this runs after the timed steps, over a fixed count.
SYSCALL_N=${SYSCALL_N:-2000}
if [ "$SYSCALL_N" -gt 0 ] && [ "$ROUNDS" -gt 0 ]; then
	if command -v strace >/dev/null; then
		log "step 5: syscalls per request (strace -c -f, $SYSCALL_N requests over 4 connections)"
		strace_count "$NGX_PID" "$(url_of B ns)" "$WORK/strace-nginx-ns.txt" "$SYSCALL_N" --tokens "$NS_TOKENS" || log "strace nginx ns failed"
		strace_count "$SLU_PID" "$(url_of C ns)" "$WORK/strace-sluice-ns.txt" "$SYSCALL_N" --tokens "$NS_TOKENS" --key "$BENCH_KEY" || log "strace sluice ns failed"
		strace_count "$NGX_PID" "$(url_of B st)" "$WORK/strace-nginx-st.txt" "$SYSCALL_N" --stream --tokens "$ST_TOKENS" || log "strace nginx st failed"
		strace_count "$SLU_PID" "$(url_of C st)" "$WORK/strace-sluice-st.txt" "$SYSCALL_N" --stream --tokens "$ST_TOKENS" --key "$BENCH_KEY" || log "strace sluice st failed"
	else
		log "WARNING: no strace: step 5 skipped (apt-get install strace)"
		SYSCALL_N=0
	fi
	# The same under the 64-connection load, counted by perf in the kernel (strace slows the
	# proxy enough to change what it does: a reply already there by the next poll, say).
	log "step 5: syscalls per request under load (perf stat, wrk -c$CONNS, 4 s)"
	PSYS="$WORK/perf-syscalls.tsv"
	: >"$PSYS"
	for st in ns st; do
		for t in B C; do
			key=""
			[ "$t" = C ] && key=$BENCH_KEY
			perf_syscalls "$(proxy_pid_of $t)" "$WORK/psys-$t-$st" 5 \
				env BENCH_KEY="$key" BENCH_STREAM=$([ $st = st ] && echo 1 || echo 0) \
				BENCH_TOKENS=$([ $st = st ] && echo "$ST_TOKENS" || echo "$NS_TOKENS") \
				"${CLI[@]}" timeout 30 wrk -t1 -c"$CONNS" -d4s -s "$BENCH/chat.lua" "$(url_of $t $st)" \
				>"$WORK/psys-$t-$st.wrk" 2>&1
			req=$(grep -o 'requests=[0-9]*' "$WORK/psys-$t-$st.wrk" | cut -d= -f2)
			printf '%s\t%s\t%s\t%s\n' "$t" "$st" "$(cat "$WORK/psys-$t-$st")" "${req:-0}" >>"$PSYS"
		done
	done
fi
kill $SLU_PID $NGX_MASTER $MOCK_PID 2>/dev/null || true
wait $SLU_PID $NGX_MASTER $MOCK_PID 2>/dev/null || true

# ------------------------------------------------------------------ step 4: open streams
SCALE="$WORK/scale.txt"
: >"$SCALE"
if [ "${SKIP_SCALE:-0}" != 1 ]; then
	# Sluice holds two descriptors per stream (client + upstream), and each of its libcurl multi
	# handles (one per 256 transfers, src/upstream.c) a socket pair; stay under the fd limit.
	N=$SCALE_N
	CAP=$(((NOFILE - 100) * 256 / (2 * 256 + 2))) # and room for the probe's 8 connections
	if [ "$N" -gt "$CAP" ]; then
		log "WARNING: open-files limit is $NOFILE (hard $(ulimit -Hn)); Sluice needs 2 fds per stream: capping at $CAP streams"
		N=$CAP
	fi
	log "step 4: $N open streams through a fresh Sluice (mock itl 2 s)"
	"${SRV[@]}" "$MOCK" --listen 127.0.0.1:$P_SMOCK --threads 2 --record 0 --max-concurrency 0 \
		>"$WORK/scale-mock.log" 2>&1 &
	SMOCK_PID=$!
	PIDS+=("$SMOCK_PID")
	sluice_bench_conf $P_SSLU $P_SMOCK $P_SADM 1 "$WORK/sluice-scale.yaml"
	"${SRV[@]}" "$SLUICE" -c "$WORK/sluice-scale.yaml" >"$WORK/sluice-scale.log" 2>&1 &
	SSLU_PID=$!
	PIDS+=("$SSLU_PID")
	wait_port $P_SMOCK
	wait_port $P_SSLU
	# A few requests first, so "idle" includes the loaded code, curl and the first allocations.
	for _ in 1 2 3; do
		curl -s -o /dev/null --max-time 5 -H 'Content-Type: application/json' -H "Authorization: Bearer $BENCH_KEY" \
			-d '{"model":"mock-model","stream":true,"messages":[{"role":"user","content":"hi"}]}' \
			http://127.0.0.1:$P_SSLU/v1/chat/completions || true
	done
	sleep 0.5
	# The cost of a new request with no stream open, then with all of them open (--probe):
	# 8 connections of non-stream load for 5 s; Sluice's CPU per request net of what the open
	# streams cost by themselves (measured over a quiet 3 s just before).
	PROBE="BENCH_KEY=$BENCH_KEY BENCH_TOKENS=$NS_TOKENS ${CLI[*]} timeout 30 wrk -t1 -c8 -d5s -s $BENCH/chat.lua http://127.0.0.1:$P_SSLU/v1/chat/completions"
	"${CLI[@]}" timeout -k 5 30 python3 "$BENCH/streams.py" --port $P_SSLU --pid $SSLU_PID --n 0 --key "$BENCH_KEY" \
		--probe "$PROBE" --probe-baseline 1 --hold 0 >"$WORK/scale-idle.txt" 2>>"$WORK/streams.err" || true
	"${CLI[@]}" timeout -k 5 150 python3 "$BENCH/streams.py" --port $P_SSLU --pid $SSLU_PID --n "$N" --key "$BENCH_KEY" \
		--itl-ms 2000 --deadline 70 --hold 2 --mock-metrics "http://127.0.0.1:$P_SMOCK/metrics" \
		--probe "$PROBE" --probe-baseline 3 \
		>"$SCALE" 2>>"$WORK/streams.err" || log "stream client exited non-zero (see $WORK/streams.err)"
	sed 's/^SCALE /SCALE_IDLE /' "$WORK/scale-idle.txt" >>"$SCALE"
	cat "$SCALE" >&2
	kill $SSLU_PID $SMOCK_PID 2>/dev/null || true
fi

# ------------------------------------------------------------------ report
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git -C "$ROOT" status --porcelain -- src include CMakeLists.txt 2>/dev/null)" ] || COMMIT="$COMMIT (+ uncommitted changes in src/include)"
python3 "$BENCH/report.py" --raw "$RAW" --scale "$SCALE" --commit "$COMMIT" \
	--rounds "$ROUNDS" --duration "$DURATION" --conns "$CONNS" --ns-tokens "$NS_TOKENS" --st-tokens "$ST_TOKENS" \
	--server-cpus "${SERVER_CPUS:-any}" --client-cpus "${CLIENT_CPUS:-any}" --nofile "$NOFILE" \
	--sluice-rss-after-load "${SLU_RSS_AFTER_LOAD:-0}" --strace-dir "$WORK" --strace-n "$SYSCALL_N" \
	--perf-syscalls "${PSYS:-}" --pairs "$WORK/pairs.tsv" \
	--conditions "$(sluice_conditions)"
[ "${KEEP:-0}" = 1 ] && log "raw results: $RAW"
exit 0
