-- wrk script: POST a ~300-byte chat completion request; print one machine-readable line.
-- BENCH_STREAM=1 asks for a stream; BENCH_TOKENS=N asks the mock for N tokens (body "mock"
-- object, which every target passes through untouched). BENCH_KEY=K adds "Authorization: Bearer K"
-- (nginx ignores it; Sluice's key-auth checks it).
local stream = os.getenv("BENCH_STREAM") == "1"
local tokens = tonumber(os.getenv("BENCH_TOKENS") or "16")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
wrk.body = string.format(
  '{"model":"mock-model","stream":%s,"mock":{"tokens":%d},"temperature":0.2,"max_tokens":256,' ..
  '"messages":[{"role":"system","content":"You are a concise assistant. Answer in one short paragraph."},' ..
  '{"role":"user","content":"Summarise why a gateway in front of several model providers helps with quotas, fallback and observability."}]}',
  stream and "true" or "false", tokens)

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d sockerr=%d status_err=%d timeouts=%d p50_us=%d p90_us=%d p99_us=%d mean_us=%.1f bytes=%d body_len=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, summary.bytes, #wrk.body))
end
