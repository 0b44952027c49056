# lib.sh — what bench/run.sh, quota.sh and profile.sh share: logging, a work directory whose
# processes are killed on exit, CPU pinning prefixes, and port / CPU-time helpers.
# Source it after setting BENCH_TAG (the log prefix); bench_start needs SERVER_CPUS and
# CLIENT_CPUS (empty = no pinning).

log() { printf '[%s %s] %s\n' "$BENCH_TAG" "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Kill what PIDS holds (politely, then not), keep WORK when asked to or on failure.
cleanup() {
	local rc=$?
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	sleep 0.3
	for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	if [ "${KEEP:-0}" = 1 ] || [ $rc -ne 0 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
	exit $rc
}

# bench_start NAME: a work directory /tmp/NAME.XXXXXX (WORK), the PIDS list cleaned up on
# exit, and the command prefixes SRV / CLI that pin to the server / client CPUs (taskset
# execs the command, so $! of a background "${SRV[@]}" cmd & is the command's own pid).
bench_start() {
	WORK=$(mktemp -d "/tmp/$1.XXXXXX")
	chmod 755 "$WORK" # nginx workers run as an unprivileged user
	PIDS=()
	trap cleanup EXIT
	trap 'exit 130' INT TERM
	SRV=()
	CLI=()
	[ -n "$SERVER_CPUS" ] && SRV=(taskset -c "$SERVER_CPUS")
	[ -n "$CLIENT_CPUS" ] && CLI=(taskset -c "$CLIENT_CPUS")
	return 0
}

wait_port() { # port [seconds]
	local i
	for ((i = 0; i < ${2:-10} * 20; i++)); do
		ss -Hltn "sport = :$1" | grep -q . && return 0
		sleep 0.05
	done
	die "nothing listening on port $1"
}

HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 ":" $15 }' "/proc/$1/stat"; } # utime:stime, all threads

# The key the benchmark's consumer sends (a literal key: Sluice hashes it at load).
BENCH_KEY=${BENCH_KEY:-bench-key-0123456789}

# sluice_bench_conf PORT UPSTREAM_PORT ADMIN_PORT WORKERS FILE: the Sluice under test, in issue
# 10's conditions: key-auth (one consumer), a token quota on the consumer (memory store, never
# reached), the admin listener with /metrics, no access log. SLUICE_PLAIN=1 gives the older
# configuration instead: auth: none, no quota, no admin listener.
sluice_bench_conf() {
	local port=$1 up=$2 admin=$3 workers=$4 file=$5
	{
		cat <<EOF2
server:
  listen:
    - address: 127.0.0.1:$port
  workers: $workers
log: { level: warn, access_log: off }
EOF2
		[ "${SLUICE_PLAIN:-0}" = 1 ] || cat <<EOF2
admin: { listen: "127.0.0.1:$admin", key: none }
store: { type: memory }
EOF2
		cat <<EOF2
instances:
  - name: mock
    provider: openai-compatible
    endpoint: http://127.0.0.1:$up/v1/chat/completions
    keepalive: { pool: 128 }
    timeouts: { connect: 2s, first_byte: 30s, idle: 60s, total: 10m }
EOF2
		[ "${SLUICE_PLAIN:-0}" = 1 ] || cat <<EOF2
consumers:
  - name: bench
    keys: ["$BENCH_KEY"]
    limits:
      - { instance: mock, strategy: total_tokens, limit: 1000000000000, window: 1h }
EOF2
		cat <<EOF2
routes:
  - name: chat
    paths: [/v1/chat/completions]
    auth: $([ "${SLUICE_PLAIN:-0}" = 1 ] && echo none || echo key-auth)
    targets: [{ instance: mock }]
EOF2
	} >"$file"
}

# sluice_conditions: one line for the report saying how Sluice was configured.
sluice_conditions() {
	if [ "${SLUICE_PLAIN:-0}" = 1 ]; then
		echo "Sluice: auth none, no quota, no admin listener"
	else
		echo "Sluice: key-auth (one consumer), a token quota on it (memory store), admin listener with /metrics"
	fi
}

# strace_count PID URL OUTFILE N nreq-args...: syscalls of PID (all threads) over exactly N
# requests sent by bench/nreq.py (after 200 untraced ones), as strace -c -f writes them.
strace_count() {
	local pid=$1 url=$2 out=$3 n=$4
	shift 4
	"${CLI[@]}" python3 "$BENCH/nreq.py" "$url" 200 "$@" || return 1
	strace -qq -c -f -p "$pid" -o "$out" &
	local sp=$!
	sleep 1
	"${CLI[@]}" python3 "$BENCH/nreq.py" "$url" "$n" "$@" || { kill -INT $sp; return 1; }
	kill -INT $sp
	wait $sp 2>/dev/null || true
}

# perf_syscalls PID OUT SECONDS cmd...: every syscall PID's threads enter while cmd runs
# (perf stat on the raw_syscalls:sys_enter tracepoint: counted in the kernel, so the
# process is not slowed the way strace slows it). Writes the count to OUT ("" if perf
# cannot count here).
perf_syscalls() {
	local pid=$1 out=$2 secs=$3
	shift 3
	: >"$out"
	command -v perf >/dev/null || return 0
	perf stat -x, -e raw_syscalls:sys_enter -p "$pid" -o "$out.raw" -- sleep "$secs" >/dev/null 2>&1 &
	local pp=$!
	sleep 0.3
	"$@"
	wait $pp 2>/dev/null || true
	awk -F, '/raw_syscalls:sys_enter/ && $1 ~ /^[0-9]+$/ { print $1 }' "$out.raw" >"$out" 2>/dev/null || true
}
