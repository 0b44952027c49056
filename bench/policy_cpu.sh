#!/usr/bin/env bash
# bench/policy_cpu.sh — CPU per request (ns of user + kernel time, summed over the Sluice
# process's threads from /proc/PID/task/*/schedstat) of the chat route with and without the six
# built-in policies of pipeline.sh, for two builds, the cases interleaved round by round.
# Prints one line per round, build (A, B) and mode (ns, st): identity NS policed NS.
# Usage: bench/policy_cpu.sh BIN_A BIN_B [ROUNDS=3] [N=10000]   (MOCK=path/to/sluice-mockllm)
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
A=$1 B=$2 ROUNDS=${3:-3} N=${4:-10000}
W=$(mktemp -d /tmp/policy-cpu.XXXXXX)
PM=28851 PS=28852
"${MOCK:-$BENCH/../build/sluice-mockllm}" --listen 127.0.0.1:$PM --threads 1 --record 0 >/dev/null 2>&1 &
MOCK_PID=$!
trap 'kill $MOCK_PID 2>/dev/null || true; rm -rf "$W"' EXIT
cat >$W/c.yaml <<Y
server: { listen: [{ address: 127.0.0.1:$PS }], workers: 1 }
log: { level: warn, access_log: off }
instances:
  - { name: mock, provider: openai-compatible, endpoint: "http://127.0.0.1:$PM/v1/chat/completions", keepalive: { pool: 128 } }
routes:
  - name: chat
    paths: [/v1/chat/completions]
    models: [mock-model]
    auth: none
    targets: [{ instance: mock }]
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
Y
wait_port() { for _ in $(seq 200); do ss -Hltn "sport = :$1" | grep -q . && return 0; sleep 0.05; done; echo "nothing on port $1" >&2; exit 1; }
wait_port $PM
cpu_ns() { local t=0; for f in /proc/$1/task/*/schedstat; do t=$((t + $(cut -d' ' -f1 $f))); done; echo $t; }
run() { # bin model streamflag
	taskset -c 0 "$1" -c $W/c.yaml >/dev/null 2>&1 &
	local pid=$!
	wait_port $PS
	taskset -c 1 python3 $BENCH/nreq.py http://127.0.0.1:$PS/v1/chat/completions 500 --model $2 $3 >/dev/null || echo "nreq failed" >&2
	local a=$(cpu_ns $pid)
	taskset -c 1 python3 $BENCH/nreq.py http://127.0.0.1:$PS/v1/chat/completions $N --model $2 $3 >/dev/null
	local b=$(cpu_ns $pid)
	kill $pid; wait $pid 2>/dev/null || true
	echo $(((b - a) / N))
}
for r in $(seq $ROUNDS); do
	for bin in A B; do
		eval exe=\$$bin
		for mode in "ns:--tokens 64" "st:--stream --tokens 16"; do
			m=${mode%%:*} f=${mode#*:}
			id=$(run $exe mock-model "$f")
			po=$(run $exe policed "$f")
			echo "$r $bin $m identity $id policed $po"
		done
	done
done
