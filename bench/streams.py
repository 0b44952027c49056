#!/usr/bin/env python3
"""Open N concurrent keep-alive stream requests through a gateway and report its RSS per stream.

Each connection POSTs one chat completion with "stream": true and asks the mock (body "mock"
object) for a long inter-token delay, so every stream stays open. Once every stream has
received its first SSE event, the gateway's VmRSS is read from /proc and compared with its
idle VmRSS taken before the first connection. Everything is bounded by --deadline seconds;
all connections are closed on exit. Prints one line starting with "SCALE".
"""
import argparse
import asyncio
import json
import os
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def cpu_s(pid):
    """utime + stime of the process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def probe(pid, cmd, baseline_s):
    """Gateway CPU per request of a load run (cmd: wrk with bench/chat.lua) while the streams
    are open, net of what the open streams cost by themselves over a quiet baseline."""
    c0, t0 = cpu_s(pid), time.monotonic()
    await asyncio.sleep(baseline_s)
    c1, t1 = cpu_s(pid), time.monotonic()
    rate = (c1 - c0) / (t1 - t0)  # CPU seconds per second spent on the open streams alone
    p = await asyncio.create_subprocess_shell(cmd, stdout=asyncio.subprocess.PIPE,
                                              stderr=asyncio.subprocess.STDOUT)
    out, _ = await p.communicate()
    c2, t2 = cpu_s(pid), time.monotonic()
    line = next((l for l in out.decode(errors="replace").splitlines() if l.startswith("RESULT")), "")
    f = dict(kv.split("=", 1) for kv in line.split()[1:]) if line else {}
    req = int(f.get("requests", 0))
    if not req:
        return {"probe_requests": 0}
    net = (c2 - c1) - rate * (t2 - t1)
    return {"probe_requests": req,
            "probe_rps": round(req / (int(f["duration_us"]) / 1e6)),
            "probe_p50_us": f.get("p50_us"), "probe_p99_us": f.get("p99_us"),
            "probe_cpu_us_req": round(1e6 * net / req, 1),
            "streams_cpu_pct": round(100 * rate, 1)}


def n_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--pid", type=int, required=True, help="gateway process to measure")
    ap.add_argument("--key", default="", help="send Authorization: Bearer KEY")
    ap.add_argument("--itl-ms", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--parallel-connects", type=int, default=200)
    ap.add_argument("--deadline", type=float, default=100.0)
    ap.add_argument("--mock-metrics", default="",
                    help="the mock's /metrics URL: report its running count at the peak")
    ap.add_argument("--probe", default="",
                    help="shell command (wrk + chat.lua) run while all streams are open")
    ap.add_argument("--probe-baseline", type=float, default=3.0)
    ap.add_argument("--hold", type=float, default=2.0,
                    help="seconds to keep all streams open after the last first event")
    a = ap.parse_args()

    body = json.dumps({
        "model": "mock-model", "stream": True,
        "mock": {"tokens": a.tokens, "itl_ms": a.itl_ms},
        "messages": [{"role": "user", "content": "Stream a long answer slowly, please."}],
    }).encode()
    auth = f"Authorization: Bearer {a.key}\r\n" if a.key else ""
    req = (f"POST {a.path} HTTP/1.1\r\nHost: {a.host}:{a.port}\r\n{auth}"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    t0 = time.monotonic()
    end = t0 + a.deadline
    idle = rss_kib(a.pid)
    idle_fds = n_fds(a.pid)
    gate = asyncio.Semaphore(a.parallel_connects)
    writers = []
    counts = {"first": 0, "failed": 0, "status": {}}
    all_first = asyncio.Event()

    def settle():
        if counts["first"] + counts["failed"] >= a.n:
            all_first.set()

    async def one(i):
        # No per-operation timeouts: main() bounds everything and cancels the tasks.
        try:
            async with gate:
                for attempt in range(5):
                    try:
                        r, w = await asyncio.open_connection(a.host, a.port)
                        break
                    except (ConnectionError, OSError):
                        if attempt == 4:
                            raise
                        await asyncio.sleep(0.2)
                writers.append(w)
                w.write(req)
                head = await r.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1].decode(errors="replace")
                counts["status"][status] = counts["status"].get(status, 0) + 1
                if status != "200":
                    raise RuntimeError(status)
            buf = b""
            while b"data:" not in buf:
                chunk = await r.read(4096)
                if not chunk:
                    raise ConnectionError("closed before the first event")
                buf += chunk
            counts["first"] += 1
            settle()
            # Keep the stream open and keep reading, so no back-pressure builds up.
            while await r.read(65536):
                pass
        except asyncio.CancelledError:
            raise
        except Exception:
            counts["failed"] += 1
            settle()

    tasks = [asyncio.create_task(one(i)) for i in range(a.n)]
    if a.n == 0:  # probe-only run: the same measurement with no stream open
        all_first.set()
    try:
        await asyncio.wait_for(all_first.wait(), max(0.1, end - time.monotonic()))
    except asyncio.TimeoutError:
        pass
    t_open = time.monotonic() - t0
    await asyncio.sleep(a.hold)  # let the gateway settle; streams keep flowing at itl
    loaded = rss_kib(a.pid)
    loaded_fds = n_fds(a.pid)
    pr = {}
    if a.probe:
        pr = await probe(a.pid, a.probe, a.probe_baseline)
    running = -1
    if a.mock_metrics:
        try:
            import urllib.request
            text = urllib.request.urlopen(a.mock_metrics, timeout=2).read().decode()
            for line in text.splitlines():
                if line.startswith("vllm:num_requests_running"):
                    running = int(float(line.split()[-1]))
        except Exception:
            pass
    ok = counts["first"]
    # Close everything.
    for t in tasks:
        t.cancel()
    for w in writers:
        try:
            w.close()
        except Exception:
            pass
    if tasks:
        await asyncio.wait(tasks, timeout=10)
        await asyncio.sleep(2.0)
    after = rss_kib(a.pid)
    per = (loaded - idle) / ok if ok else float("nan")
    print(f"SCALE n={a.n} ok={ok} failed={counts['failed']} statuses={json.dumps(counts['status'], separators=(',', ':'))} "
          f"open_s={t_open:.1f} idle_rss_kib={idle} loaded_rss_kib={loaded} after_close_rss_kib={after} "
          f"per_stream_kib={per:.1f} idle_fds={idle_fds} loaded_fds={loaded_fds} mock_running={running} "
          + " ".join(f"{k}={v}" for k, v in pr.items()), flush=True)
    return 0 if ok == a.n else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
