#!/usr/bin/env bash
# bench/quota.sh — what key-auth and token quotas cost, and how far past a quota 64
# concurrent clients get with Sluice's reservation vs post-hoc charging (bench/README.md,
# "Quotas").
#
#   1. Throughput: non-stream chat through three Sluice configurations against one mock,
#      interleaved rounds: (a) auth: none, no limits; (b) key-auth, one consumer with a token
#      limit, a request-rate limit and an instance limit (all huge), memory store; (c) the
#      same on a Redis store (a redis-server started here).
#   2. Overshoot: a 10,000-token consumer quota, 64 concurrent clients sending until each is
#      refused; memory and Redis stores; reservation (default) vs post-hoc
#      (SLUICE_QUOTA_POSTHOC=1, a benchmark-only switch in src/quota.c).
#
# Usage: bench/quota.sh          (~2 minutes; needs wrk, redis-server, python3, taskset)
# Knobs (environment):
#   ROUNDS=5 DURATION=5 CONNS=64 NS_TOKENS=64   step 1
#   REPS=5 CLIENTS=64 QUOTA=10000 TTFT_MS=20     step 2
#   SERVER_CPUS=0 CLIENT_CPUS=1                  taskset lists ("" = no pinning)
#   BUILD_DIR=build-qbench  SKIP_BUILD=1         build location, reuse the binaries
#   BASE_PORT=28400                              ports BASE+1 … BASE+13 on 127.0.0.1
#   KEEP=1                                       keep the work directory (configs, logs)
#   LABEL=…                                      what was built, for the report (default: git HEAD)
#   SKIP_THROUGHPUT=1 / SKIP_OVERSHOOT=1
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
NS_TOKENS=${NS_TOKENS:-64}
REPS=${REPS:-5}
CLIENTS=${CLIENTS:-64}
QUOTA=${QUOTA:-10000}
TTFT_MS=${TTFT_MS:-20}
SERVER_CPUS=${SERVER_CPUS-0}
CLIENT_CPUS=${CLIENT_CPUS-1}
BUILD_DIR=${BUILD_DIR:-$ROOT/build-qbench}
BASE_PORT=${BASE_PORT:-28400}

BENCH_TAG=quota-bench
# shellcheck source=bench/lib.sh
. "$BENCH/lib.sh"

for c in wrk redis-server python3 taskset curl ss; do
	command -v $c >/dev/null || die "$c not found (Debian: apt-get install wrk redis-server python3 util-linux curl iproute2)"
done

# ------------------------------------------------------------------ build
if [ "${SKIP_BUILD:-0}" != 1 ]; then
	log "building (RelWithDebInfo) in $BUILD_DIR"
	cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSLUICE_TESTS=OFF >/dev/null
	cmake --build "$BUILD_DIR" -j2 --target sluice sluice-mockllm >"$BUILD_DIR.log" 2>&1 ||
		{ tail -20 "$BUILD_DIR.log" >&2; die "build failed"; }
fi
SLUICE="$BUILD_DIR/sluice"
MOCK="$BUILD_DIR/sluice-mockllm"
[ -x "$SLUICE" ] && [ -x "$MOCK" ] || die "no binaries in $BUILD_DIR"

# ------------------------------------------------------------------ ports, cleanup
P_MOCK=$((BASE_PORT + 1)) P_A=$((BASE_PORT + 2)) P_B=$((BASE_PORT + 3)) P_C=$((BASE_PORT + 4))
P_REDIS=$((BASE_PORT + 5))
P_OV=($((BASE_PORT + 6)) $((BASE_PORT + 7)) $((BASE_PORT + 8)) $((BASE_PORT + 9)))
P_ADM=($((BASE_PORT + 10)) $((BASE_PORT + 11)) $((BASE_PORT + 12)) $((BASE_PORT + 13)))
for p in $P_MOCK $P_A $P_B $P_C $P_REDIS "${P_OV[@]}" "${P_ADM[@]}"; do
	ss -Hltn "sport = :$p" | grep -q . && die "port $p is in use (set BASE_PORT)"
done

bench_start sluice-qbench
trap 'log "error: line $LINENO: $BASH_COMMAND"' ERR



# ------------------------------------------------------------------ servers
log "starting mock, redis-server and 3 + 4 Sluice processes (servers on CPUs '${SERVER_CPUS:-any}', clients on '${CLIENT_CPUS:-any}')"
"${SRV[@]}" "$MOCK" --listen 127.0.0.1:$P_MOCK --threads 1 --record 0 >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
"${SRV[@]}" redis-server --bind 127.0.0.1 --port $P_REDIS --save '' --appendonly no \
	--dir "$WORK" --logfile "$WORK/redis.log" >/dev/null 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")

KEY=qbench-key # the consumer's key in step 1 (a literal key: hashed at load)
# sluice_conf port store(none|memory|redis) file
sluice_conf() {
	local port=$1 store=$2 file=$3
	{
		cat <<EOF
server:
  listen:
    - address: 127.0.0.1:$port
  workers: 1
log: { level: warn, access_log: off }
EOF
		case $store in
		memory) echo "store: { type: memory }" ;;
		redis) echo "store: { type: redis, redis: { address: \"127.0.0.1:$P_REDIS\", prefix: \"qbench-$port:\" } }" ;;
		esac
		cat <<EOF
instances:
  - name: mock
    provider: openai-compatible
    endpoint: http://127.0.0.1:$P_MOCK/v1/chat/completions
    keepalive: { pool: 128 }
    timeouts: { connect: 2s, first_byte: 30s, idle: 60s, total: 10m }
EOF
		if [ "$store" != none ]; then
			echo "    limits: [{ limit: 1000000000000, window: 1h }]"
			cat <<EOF
consumers:
  - name: bench
    keys: ["$KEY"]
    limits:
      - { instance: mock, limit: 1000000000000, window: 1h }
      - { requests: 1000000000000, window: 1h }
EOF
		fi
		cat <<EOF
routes:
  - name: chat
    paths: [/v1/chat/completions]
    auth: $([ "$store" = none ] && echo none || echo key-auth)
    targets: [{ instance: mock }]
EOF
	} >"$file"
}

# Step 1: A = auth none, B = memory, C = redis.
sluice_conf $P_A none "$WORK/a.yaml"
sluice_conf $P_B memory "$WORK/b.yaml"
sluice_conf $P_C redis "$WORK/c.yaml"
declare -A SPID
for t in A B C; do
	"${SRV[@]}" "$SLUICE" -c "$WORK/${t,,}.yaml" >"$WORK/sluice-$t.log" 2>&1 &
	SPID[$t]=$!
	PIDS+=($!)
done

# Step 2: four processes, consumers q1..qREPS with QUOTA tokens a day each (a fresh quota per
# trial); mem/redis × reservation/post-hoc. Each has an admin listener to read the counter.
OV_NAMES=(memory-reservation memory-posthoc redis-reservation redis-posthoc)
consumers_yaml() {
	local r
	echo "consumers:"
	for ((r = 1; r <= REPS; r++)); do
		echo "  - { name: q$r, keys: [\"qbench-key-$r\"], limits: [{ limit: $QUOTA, window: 1d }] }"
	done
}
for i in 0 1 2 3; do
	name=${OV_NAMES[$i]}
	store=${name%%-*}
	f="$WORK/ov-$name.yaml"
	{
		cat <<EOF
server:
  listen:
    - address: 127.0.0.1:${P_OV[$i]}
  workers: 1
admin: { listen: "127.0.0.1:${P_ADM[$i]}", key: none }
log: { level: warn, access_log: off }
EOF
		if [ "$store" = redis ]; then
			echo "store: { type: redis, redis: { address: \"127.0.0.1:$P_REDIS\", prefix: \"qbench-ov-$name-$$:\" } }"
		else
			echo "store: { type: memory }"
		fi
		cat <<EOF
instances:
  - name: mock
    provider: openai-compatible
    endpoint: http://127.0.0.1:$P_MOCK/v1/chat/completions
    keepalive: { pool: 128 }
    timeouts: { connect: 2s, first_byte: 30s, idle: 60s, total: 10m }
EOF
		consumers_yaml
		cat <<EOF
routes:
  - name: chat
    paths: [/v1/chat/completions]
    auth: key-auth
    targets: [{ instance: mock }]
EOF
	} >"$f"
	if [ "${name#*-}" = posthoc ]; then
		SLUICE_QUOTA_POSTHOC=1 "${SRV[@]}" "$SLUICE" -c "$f" >"$WORK/sluice-$name.log" 2>&1 &
	else
		env -u SLUICE_QUOTA_POSTHOC "${SRV[@]}" "$SLUICE" -c "$f" >"$WORK/sluice-$name.log" 2>&1 &
	fi
	PIDS+=($!)
done

for p in $P_MOCK $P_REDIS $P_A $P_B $P_C "${P_OV[@]}" "${P_ADM[@]}"; do wait_port $p; done
URL() { echo "http://127.0.0.1:$1/v1/chat/completions"; }
for p in $P_A $P_B $P_C; do
	code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Content-Type: application/json' \
		-H "Authorization: Bearer $KEY" \
		-d '{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}' "$(URL $p)") || true
	[ "$code" = 200 ] || die "Sluice on port $p answered '$code'"
done
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Content-Type: application/json' \
	-d '{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}' "$(URL $P_B)") || true
[ "$code" = 401 ] || die "key-auth is not on (no key answered '$code')"
grep -q 'benchmark mode' "$WORK/sluice-memory-posthoc.log" || die "post-hoc switch not seen in the log"
! grep -q 'benchmark mode' "$WORK/sluice-memory-reservation.log" || die "post-hoc switch on by default"

# ------------------------------------------------------------------ step 1: throughput
RAW="$WORK/throughput.tsv"
printf 'round\ttarget\trequests\tseconds\trps\tp50_us\tp99_us\terrors\tsluice_cpu_us_req\tmock_cpu_us_req\tredis_cpu_us_req\n' >"$RAW"
run_wrk() { # round target port
	local round=$1 t=$2 port=$3 c0 c1 m0 m1 r0 r1 out line
	c0=$(cpu_ticks "${SPID[$t]}")
	m0=$(cpu_ticks $MOCK_PID)
	r0=$(cpu_ticks $REDIS_PID)
	out=$(BENCH_STREAM=0 BENCH_TOKENS=$NS_TOKENS "${CLI[@]}" timeout $((DURATION + 30)) \
		wrk -t1 -c"$CONNS" -d"${DURATION}s" --timeout 5s -H "Authorization: Bearer $KEY" \
		-s "$BENCH/chat.lua" "$(URL "$port")" 2>&1) || true
	c1=$(cpu_ticks "${SPID[$t]}")
	m1=$(cpu_ticks $MOCK_PID)
	r1=$(cpu_ticks $REDIS_PID)
	line=$(grep '^RESULT' <<<"$out" || true)
	[ -n "$line" ] || { printf '%s\n' "$out" >&2; die "wrk gave no result ($t)"; }
	[ "$round" = warm ] && return 0
	python3 - "$round" "$t" "$line" "$HZ" "$c0" "$c1" "$m0" "$m1" "$r0" "$r1" >>"$RAW" <<'PY'
import sys
rnd, t, line, hz, c0, c1, m0, m1, r0, r1 = sys.argv[1:]
f = dict(kv.split("=", 1) for kv in line.split()[1:])
req = int(f["requests"]); sec = int(f["duration_us"]) / 1e6
errs = int(f["sockerr"]) + int(f["status_err"]) + int(f["timeouts"])
def per_req(a, b):
    a = list(map(int, a.split(":"))); b = list(map(int, b.split(":")))
    return (sum(b) - sum(a)) * 1e6 / int(hz) / req if req else float("nan")
print(f"{rnd}\t{t}\t{req}\t{sec:.3f}\t{req/sec:.1f}\t{f['p50_us']}\t{f['p99_us']}\t{errs}\t"
      f"{per_req(c0, c1):.2f}\t{per_req(m0, m1):.2f}\t{per_req(r0, r1):.2f}")
PY
	log "round $round $t: $(tail -1 "$RAW" | awk -F'\t' '{printf "%s req/s p50 %s µs p99 %s µs err %s sluice %s µs/req mock %s redis %s", $5, $6, $7, $8, $9, $10, $11}')"
}

T0=$(date +%s)
if [ "${SKIP_THROUGHPUT:-0}" != 1 ]; then
	log "warm-up"
	SAVED=$DURATION
	DURATION=2
	run_wrk warm A $P_A
	run_wrk warm B $P_B
	run_wrk warm C $P_C
	DURATION=$SAVED
	log "step 1: $ROUNDS rounds x (A none, B memory, C redis), ${DURATION}s each, $CONNS connections"
	for ((r = 1; r <= ROUNDS; r++)); do
		run_wrk $r A $P_A
		run_wrk $r B $P_B
		run_wrk $r C $P_C
	done
fi

# ------------------------------------------------------------------ step 2: overshoot
OV="$WORK/overshoot.txt"
: >"$OV"
if [ "${SKIP_OVERSHOOT:-0}" != 1 ]; then
	log "step 2: overshoot, $REPS reps x 4 targets, $CLIENTS clients, quota $QUOTA, mock ttft ${TTFT_MS} ms"
	args=()
	for i in 0 1 2 3; do args+=(--target "${OV_NAMES[$i]}=${P_OV[$i]}:${P_ADM[$i]}"); done
	"${CLI[@]}" timeout -k 5 $((REPS * 4 * 40 + 30)) python3 "$BENCH/quota_overshoot.py" "${args[@]}" \
		--reps "$REPS" --clients "$CLIENTS" --quota "$QUOTA" --ttft-ms "$TTFT_MS" --markdown \
		>"$OV" 2> >(tee "$WORK/overshoot-trials.txt" >&2) || die "overshoot client failed"
fi

# ------------------------------------------------------------------ report
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git -C "$ROOT" status --porcelain -- src include CMakeLists.txt 2>/dev/null)" ] || COMMIT="$COMMIT (+ uncommitted changes in src/include)"
COMMIT=${LABEL:-$COMMIT}
echo
echo "Run of $(date -u '+%Y-%m-%d %H:%M') UTC at commit $COMMIT; $(($(date +%s) - T0)) s of measurement"
if [ "${SKIP_THROUGHPUT:-0}" != 1 ]; then
	echo
	echo "**1. Non-stream, $CONNS connections** (median of $ROUNDS interleaved rounds of ${DURATION} s)"
	echo
	python3 - "$RAW" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
names = {"A": "(a) auth: none, no limits", "B": "(b) key-auth + 3 limits, memory store",
         "C": "(c) key-auth + 3 limits, Redis store"}
med = {}
for t in "ABC":
    rs = [r for r in rows if r["target"] == t]
    if not rs:
        continue
    m = lambda k: statistics.median(float(r[k]) for r in rs)
    med[t] = {k: m(k) for k in ("rps", "p50_us", "p99_us", "sluice_cpu_us_req", "mock_cpu_us_req", "redis_cpu_us_req")}
    med[t]["errors"] = sum(int(r["errors"]) for r in rs)
    med[t]["rps_range"] = (min(float(r["rps"]) for r in rs), max(float(r["rps"]) for r in rs))
print("| configuration | req/s (min–max) | p50 µs | p99 µs | Sluice CPU µs/req | mock CPU µs/req | redis-server CPU µs/req | errors |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for t, v in med.items():
    print(f"| {names[t]} | {v['rps']:,.0f} ({v['rps_range'][0]:,.0f}–{v['rps_range'][1]:,.0f}) | {v['p50_us']:,.0f} | {v['p99_us']:,.0f} | "
          f"{v['sluice_cpu_us_req']:.1f} | {v['mock_cpu_us_req']:.1f} | "
          f"{(format(v['redis_cpu_us_req'], '.1f') if t == 'C' else '–')} | {v['errors']} |")
if "A" in med:
    a = med["A"]
    print()
    print("| ratio vs (a) | req/s | p50 | p99 | Sluice CPU/req | Sluice CPU/req incl. redis-server |")
    print("|---|---:|---:|---:|---:|---:|")
    for t in "BC":
        if t not in med:
            continue
        v = med[t]
        inc = v["sluice_cpu_us_req"] + (v["redis_cpu_us_req"] if t == "C" else 0)
        print(f"| {names[t]} | {v['rps']/a['rps']:.2f} | {v['p50_us']/a['p50_us']:.2f} | {v['p99_us']/a['p99_us']:.2f} | "
              f"{v['sluice_cpu_us_req']/a['sluice_cpu_us_req']:.2f} | {inc/a['sluice_cpu_us_req']:.2f} |")
PY
fi
if [ "${SKIP_OVERSHOOT:-0}" != 1 ]; then
	echo
	echo "**2. Overshoot, $CLIENTS concurrent clients, consumer quota $QUOTA tokens** ($REPS trials per row, interleaved)"
	echo
	cat "$OV"
fi
[ "${KEEP:-0}" = 1 ] && log "raw results in $WORK"
exit 0
