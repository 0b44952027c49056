#!/usr/bin/env bash
# run.sh — quick start: install what is missing, build, start sluice-mockllm and sluice
# on conf/sluice.yaml, and print a request to paste. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target sluice sluice-mockllm

build/sluice -t -c conf/sluice.yaml
build/sluice-mockllm --listen 127.0.0.1:8001 --itl 50 --tokens 24 >/dev/null &
mock=$!
trap 'kill $mock 2>/dev/null || true' EXIT

cat <<'MSG'

Sluice is starting on http://127.0.0.1:8080 (mock model on 127.0.0.1:8001). Try:

  curl -s http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"model":"qwen","messages":[{"role":"user","content":"Hello"}]}'

  curl -sN http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"model":"qwen","stream":true,"messages":[{"role":"user","content":"Hello"}]}'

Any OpenAI SDK works with base_url http://127.0.0.1:8080/v1. Ctrl-C stops.

MSG
build/sluice -c conf/sluice.yaml
