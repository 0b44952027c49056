#!/usr/bin/env bash
# bench/device.sh — how Sluice and nginx scale with workers, on a machine with cores to spare.
#
# Self-contained (builds, installs what it needs, cleans up): for each worker count in
# WORKERS, one nginx (worker_processes W) and one Sluice (workers: W, issue 10's conditions:
# key-auth, a token quota, the admin listener) are pinned to the first W of PROXY_CPUS; one
# sluice-mockllm on MOCK_CPUS and wrk on CLIENT_CPUS keep to their own cores, so what is
# measured is the proxies' scaling. Rounds are interleaved (every W, both proxies, both
# request kinds, per round); medians are printed as the same tables as bench/run.sh:
# req/s, latency, proxy CPU µs per request and Sluice ÷ nginx, plus the scaling over W=1.
#
# Written for a 16-core box: WORKERS="1 2 4 8", PROXY_CPUS=0-7, MOCK_CPUS=8-11 (4 mock
# threads), CLIENT_CPUS=12-15 (4 wrk threads). On a smaller machine it picks a layout that
# fits and says so; on 2 cores (this project's VM) it runs W=1 and 2 with everything
# sharing both cores, where the CPU-per-request columns are the meaningful ones.
#
# Knobs: WORKERS, PROXY_CPUS, MOCK_CPUS, CLIENT_CPUS (taskset lists), MOCK_THREADS,
# WRK_THREADS, CONNS (256), ROUNDS (3), DURATION (10 s), NS_TOKENS (64), ST_TOKENS (16),
# BUILD_DIR, SKIP_BUILD=1, BASE_PORT (28700), KEEP=1, SLUICE_PLAIN=1 (see run.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
NCPU=$(nproc)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-256}
NS_TOKENS=${NS_TOKENS:-64}
ST_TOKENS=${ST_TOKENS:-16}
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
BASE_PORT=${BASE_PORT:-28700}
if [ "$NCPU" -ge 16 ]; then
	: "${WORKERS:=1 2 4 8}" "${PROXY_CPUS:=0-7}" "${MOCK_CPUS:=8-11}" "${CLIENT_CPUS:=12-15}"
	: "${MOCK_THREADS:=4}" "${WRK_THREADS:=4}"
	LAYOUT="proxies on CPUs $PROXY_CPUS, mock on $MOCK_CPUS, wrk on $CLIENT_CPUS"
elif [ "$NCPU" -ge 4 ]; then
	half=$((NCPU / 2))
	w="1" && [ "$half" -ge 2 ] && w="1 2" && [ "$half" -ge 4 ] && w="1 2 4"
	: "${WORKERS:=$w}" "${PROXY_CPUS:=0-$((half - 1))}" "${MOCK_CPUS:=$half}"
	: "${CLIENT_CPUS:=$((half + 1))-$((NCPU - 1))}" "${MOCK_THREADS:=1}" "${WRK_THREADS:=$((NCPU - half - 1))}"
	LAYOUT="$NCPU CPUs: proxies on $PROXY_CPUS, mock on $MOCK_CPUS, wrk on $CLIENT_CPUS (a 16-core box runs W up to 8)"
else
	: "${WORKERS:=1 2}" "${PROXY_CPUS:=}" "${MOCK_CPUS:=}" "${CLIENT_CPUS:=}"
	: "${MOCK_THREADS:=1}" "${WRK_THREADS:=1}"
	LAYOUT="$NCPU CPUs: no pinning, proxies, mock and wrk share every CPU (only CPU per request is meaningful)"
fi
[ "$WRK_THREADS" -lt 1 ] && WRK_THREADS=1

BENCH_TAG=device
# shellcheck source=bench/lib.sh
. "$BENCH/lib.sh"

# ------------------------------------------------------------------ packages and build
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v python3 >/dev/null || need+=(python3)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v taskset >/dev/null || need+=(util-linux)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
	log "installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	$SUDO apt-get update -qq
	$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [ "${SKIP_BUILD:-0}" != 1 ]; then
	[ -x "$ROOT/scripts/deps.sh" ] && "$ROOT/scripts/deps.sh"
	log "building (RelWithDebInfo) in $BUILD_DIR"
	cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSLUICE_TESTS=OFF >/dev/null
	cmake --build "$BUILD_DIR" -j"$NCPU" --target sluice sluice-mockllm >"$BUILD_DIR.log" 2>&1 ||
		die "build failed (see $BUILD_DIR.log)"
fi
SLUICE="$BUILD_DIR/sluice"
MOCK="$BUILD_DIR/sluice-mockllm"
[ -x "$SLUICE" ] && [ -x "$MOCK" ] || die "no binaries in $BUILD_DIR"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

SERVER_CPUS="" # lib.sh's prefixes are not used here: every process gets its own list
bench_start sluice-device
# pin CPUS cmd...: exec cmd, under taskset when a list is given. Only in a subshell (a
# background job or $(...)): it replaces the shell, so $! is the command's own pid.
pin() {
	local c=$1
	shift
	if [ -n "$c" ]; then exec taskset -c "$c" "$@"; else exec "$@"; fi
}
# The first n CPUs of a taskset list ("0-7" or "0,2,4"), as a list.
first_cpus() {
	python3 - "$1" "$2" <<'PY'
import sys
spec, n = sys.argv[1], int(sys.argv[2])
cpus = []
for part in spec.split(","):
    if "-" in part:
        a, b = part.split("-")
        cpus += range(int(a), int(b) + 1)
    elif part:
        cpus.append(int(part))
print(",".join(map(str, cpus[:n])))
PY
}

P_MOCK=$((BASE_PORT + 1))
for p in $(seq $((BASE_PORT + 1)) $((BASE_PORT + 1 + 4 * 9))); do
	ss -Hltn "sport = :$p" | grep -q . && die "port $p is in use (set BASE_PORT)"
done
log "layout: $LAYOUT; workers: $WORKERS"
pin "$MOCK_CPUS" "$MOCK" --listen 127.0.0.1:$P_MOCK --threads "$MOCK_THREADS" --record 0 >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
wait_port $P_MOCK

declare -A NGX_MASTER SLU_PID PCPUS P_NGX P_NGXS P_SLU
i=0
for w in $WORKERS; do
	i=$((i + 1))
	P_NGX[$w]=$((BASE_PORT + 4 * i + 1))
	P_NGXS[$w]=$((BASE_PORT + 4 * i + 2))
	P_SLU[$w]=$((BASE_PORT + 4 * i + 3))
	adm=$((BASE_PORT + 4 * i + 4))
	PCPUS[$w]=""
	[ -n "$PROXY_CPUS" ] && PCPUS[$w]=$(first_cpus "$PROXY_CPUS" "$w")
	d="$WORK/nginx-$w"
	mkdir -p "$d"
	cat >"$d/nginx.conf" <<EOF
worker_processes $w;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path $d/body;
    proxy_temp_path $d/proxy;
    keepalive_requests 1000000;
    upstream mock { server 127.0.0.1:$P_MOCK; keepalive 128; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:${P_NGX[$w]} reuseport;
        location / { proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
    server {
        listen 127.0.0.1:${P_NGXS[$w]} reuseport;
        location / { proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
    }
}
EOF
	pin "${PCPUS[$w]}" "$NGINX" -p "$d" -c "$d/nginx.conf" >"$d/stderr.log" 2>&1 &
	NGX_MASTER[$w]=$!
	PIDS+=("${NGX_MASTER[$w]}")
	sluice_bench_conf "${P_SLU[$w]}" $P_MOCK $adm "$w" "$WORK/sluice-$w.yaml"
	pin "${PCPUS[$w]}" "$SLUICE" -c "$WORK/sluice-$w.yaml" >"$WORK/sluice-$w.log" 2>&1 &
	SLU_PID[$w]=$!
	PIDS+=("${SLU_PID[$w]}")
	wait_port "${P_NGX[$w]}"
	wait_port "${P_SLU[$w]}"
done

# CPU ticks of a proxy: Sluice's process (all threads), nginx's workers (the master idles).
proxy_ticks() { # target w
	if [ "$1" = C ]; then
		cpu_ticks "${SLU_PID[$2]}"
	else
		local u=0 s=0 p t
		for p in $(pgrep -P "${NGX_MASTER[$2]}" nginx); do
			t=$(cpu_ticks "$p")
			u=$((u + ${t%%:*}))
			s=$((s + ${t##*:}))
		done
		echo "$u:$s"
	fi
}
url() { # target w step
	if [ "$1" = C ]; then
		echo "http://127.0.0.1:${P_SLU[$2]}/v1/chat/completions"
	elif [ "$3" = st ]; then
		echo "http://127.0.0.1:${P_NGXS[$2]}/v1/chat/completions"
	else
		echo "http://127.0.0.1:${P_NGX[$2]}/v1/chat/completions"
	fi
}
for w in $WORKERS; do
	for t in B C; do
		code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Content-Type: application/json' \
			-H "Authorization: Bearer $BENCH_KEY" \
			-d '{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}' "$(url $t "$w" ns)") || true
		[ "$code" = 200 ] || die "target $t with $w workers answered '$code'"
	done
done

RAW="$WORK/raw.tsv"
printf 'round\tworkers\tstep\ttarget\trequests\tseconds\trps\tp50_us\tp99_us\terrors\tproxy_cpu_us_req\n' >"$RAW"
run_one() { # round w step target seconds
	local r=$1 w=$2 st=$3 t=$4 secs=$5 key="" c0 c1 out line
	[ "$t" = C ] && key=$BENCH_KEY
	c0=$(proxy_ticks "$t" "$w")
	out=$(BENCH_KEY=$key BENCH_STREAM=$([ "$st" = st ] && echo 1 || echo 0) \
		BENCH_TOKENS=$([ "$st" = st ] && echo "$ST_TOKENS" || echo "$NS_TOKENS") \
		pin "$CLIENT_CPUS" timeout $((secs + 30)) wrk -t"$WRK_THREADS" -c"$CONNS" -d"${secs}s" --timeout 5s \
		-s "$BENCH/chat.lua" "$(url "$t" "$w" "$st")" 2>&1) || true
	c1=$(proxy_ticks "$t" "$w")
	line=$(grep '^RESULT' <<<"$out" || true)
	[ -n "$line" ] || { printf '%s\n' "$out" >&2; die "wrk gave no result"; }
	[ "$r" = warm ] && return 0
	python3 - "$r" "$w" "$st" "$t" "$line" "$HZ" "$c0" "$c1" >>"$RAW" <<'PY'
import sys
r, w, st, t, line, hz, c0, c1 = sys.argv[1:]
f = dict(kv.split("=", 1) for kv in line.split()[1:])
req = int(f["requests"]); sec = int(f["duration_us"]) / 1e6
errs = int(f["sockerr"]) + int(f["status_err"]) + int(f["timeouts"])
a = list(map(int, c0.split(":"))); b = list(map(int, c1.split(":")))
cpu = (b[0] - a[0] + b[1] - a[1]) * 1e6 / int(hz) / req if req else float("nan")
print(f"{r}\t{w}\t{st}\t{t}\t{req}\t{sec:.3f}\t{req/sec:.1f}\t{f['p50_us']}\t{f['p99_us']}\t{errs}\t{cpu:.2f}")
PY
	log "round $r W=$w $st $t: $(tail -1 "$RAW" | awk -F'\t' '{printf "%s req/s p99 %s µs proxy %s µs/req", $7, $9, $11}')"
}

log "warm-up"
for w in $WORKERS; do for t in B C; do for st in ns st; do run_one warm "$w" $st $t 2; done; done; done
log "$ROUNDS rounds x workers ($WORKERS) x (non-stream, stream) x (nginx, Sluice), ${DURATION}s each"
for ((r = 1; r <= ROUNDS; r++)); do
	for w in $WORKERS; do
		for st in ns st; do
			for t in B C; do run_one $r "$w" $st $t "$DURATION"; done
		done
	done
done

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
python3 - "$RAW" "$COMMIT" "$LAYOUT" "$(sluice_conditions)" "$ROUNDS" "$DURATION" "$CONNS" "$NCPU" <<'PY'
import csv, statistics, sys, platform, datetime
raw, commit, layout, cond, rounds, dur, conns, ncpu = sys.argv[1:]
rows = list(csv.DictReader(open(raw), delimiter="\t"))
def med(w, st, t, k):
    xs = [float(r[k]) for r in rows if r["workers"] == w and r["step"] == st and r["target"] == t]
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")
def fmt(x, nd=0):
    return "–" if x != x else f"{x:,.{nd}f}"
ws = sorted({r["workers"] for r in rows}, key=int)
print(f"Run {datetime.datetime.now():%Y-%m-%d %H:%M}, commit {commit}, {platform.node()}, {ncpu} CPUs; {layout}; "
      f"{rounds} interleaved rounds × {dur} s, wrk -c{conns}, medians. {cond}.\n")
for st, title in (("ns", "Non-stream (64-token replies)"), ("st", "Stream (16 tokens)")):
    print(f"**{title}**\n")
    print("| workers | target | req/s | × W=1 | p50 µs | p99 µs | proxy CPU µs/req | errors |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for w in ws:
        for t, name in (("B", "nginx"), ("C", "Sluice")):
            rps = med(w, st, t, "rps"); base = med(ws[0], st, t, "rps")
            errs = sum(int(r["errors"]) for r in rows if r["workers"] == w and r["step"] == st and r["target"] == t)
            print(f"| {w} | {name} | {fmt(rps)} | {fmt(rps / base, 2) if base == base and base else '–'} | "
                  f"{fmt(med(w, st, t, 'p50_us'))} | {fmt(med(w, st, t, 'p99_us'))} | {fmt(med(w, st, t, 'proxy_cpu_us_req'), 1)} | {errs} |")
    print()
print("**Sluice ÷ nginx**\n")
print("| workers | CPU per request, non-stream | CPU per request, stream | req/s, non-stream | req/s, stream |")
print("|---:|---:|---:|---:|---:|")
for w in ws:
    def r(st, k):
        b = med(w, st, "B", k)
        return med(w, st, "C", k) / b if b == b and b else float("nan")
    print(f"| {w} | {fmt(r('ns', 'proxy_cpu_us_req'), 2)}× | {fmt(r('st', 'proxy_cpu_us_req'), 2)}× | "
          f"{fmt(r('ns', 'rps'), 2)} | {fmt(r('st', 'rps'), 2)} |")
print()
PY
[ "${KEEP:-0}" = 1 ] && log "raw results: $RAW"
exit 0
