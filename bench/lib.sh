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
