#!/usr/bin/env python3
"""bench/quota_overshoot.py — how far past a token quota 64 concurrent clients get.

Used by bench/quota.sh (step 2). Each trial is one consumer with a fresh quota (consumer
q<rep>, key qbench-key-<rep>, limit --quota tokens) on one Sluice target. --clients threads
start together; each keeps one keep-alive connection and sends the same chat request
(max_tokens = completion tokens = --completion, a prompt the mock bills --prompt-tokens for,
a mock time to first token of --ttft-ms so many requests are in flight at once) until it is
refused (429), then stops. Total charged = the sum of usage.total_tokens of the 200
responses. After the trial the target's admin API (GET /consumers/q<rep>) gives the
counter's "used", to check that it equals what was charged (no reservation left behind).

Targets are given as NAME=PORT:ADMINPORT and run interleaved: rep 1 on every target, then
rep 2, and so on. Prints one "TRIAL" line per trial, then a table (or, with --markdown, a
Markdown table) of medians and ranges per target.

Python standard library only.
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time


def chat_body(prompt_tokens, completion, ttft_ms):
    # The mock bills ceil(content bytes / 4) prompt tokens; Sluice's estimate is
    # ceil(bytes / 4) + 4 per message + 3, plus max_tokens (docs/quotas.md §4).
    return json.dumps({
        "model": "mock-model",
        "max_tokens": completion,
        "messages": [{"role": "user", "content": "x" * (4 * prompt_tokens)}],
        "mock": {"tokens": completion, "ttft_ms": ttft_ms},
    }).encode()


class Trial:
    def __init__(self):
        self.lock = threading.Lock()
        self.charged = 0
        self.ok = 0
        self.refused = 0
        self.errors = 0
        self.other = {}
        self.per_request = set()
        self.inflight = 0
        self.max_inflight = 0


def client(port, key, body, start, deadline, tr, timeout):
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + key}
    conn = None
    start.wait()
    while time.monotonic() < deadline:
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            with tr.lock:
                tr.inflight += 1
                tr.max_inflight = max(tr.max_inflight, tr.inflight)
            try:
                conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
            finally:
                with tr.lock:
                    tr.inflight -= 1
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn = None
            with tr.lock:
                tr.errors += 1
            if tr.errors > 1000:
                break
            continue
        if r.status == 200:
            total = json.loads(data)["usage"]["total_tokens"]
            with tr.lock:
                tr.charged += total
                tr.ok += 1
                tr.per_request.add(total)
        elif r.status == 429:
            with tr.lock:
                tr.refused += 1
            break
        else:
            with tr.lock:
                tr.other[r.status] = tr.other.get(r.status, 0) + 1
            break
        if r.getheader("connection", "").lower() == "close":
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def admin_used(admin_port, consumer):
    c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        c.request("GET", "/consumers/" + consumer)
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            return None
        limits = json.loads(data).get("limits", [])
        return sum(l.get("used", 0) for l in limits if l.get("limit") is not None and "requests" not in l.get("id", ""))
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        c.close()


def run_trial(port, admin_port, rep, a):
    body = chat_body(a.prompt_tokens, a.completion, a.ttft_ms)
    tr = Trial()
    start = threading.Event()
    t0 = time.monotonic()
    deadline = t0 + a.deadline
    threads = [threading.Thread(target=client, daemon=True,
                                args=(port, "qbench-key-%d" % rep, body, start, deadline, tr, a.deadline))
               for _ in range(a.clients)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    start.set()
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic() + 5))
    elapsed = time.monotonic() - t0
    time.sleep(a.settle_wait)  # settlements, and the admin's 1 s view of Redis
    used = admin_used(admin_port, "q%d" % rep)
    return tr, elapsed, used


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", required=True, help="NAME=PORT:ADMINPORT")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--quota", type=int, default=10000)
    ap.add_argument("--prompt-tokens", type=int, default=10)
    ap.add_argument("--completion", type=int, default=100)
    ap.add_argument("--ttft-ms", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=30, help="seconds per trial at most")
    ap.add_argument("--settle-wait", type=float, default=1.5)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()

    targets = []
    for spec in a.target:
        name, ports = spec.split("=", 1)
        p, ap_ = ports.split(":")
        targets.append((name, int(p), int(ap_)))

    per_req = a.prompt_tokens + a.completion
    results = {name: [] for name, _, _ in targets}
    for rep in range(1, a.reps + 1):
        for name, port, admin_port in targets:
            tr, elapsed, used = run_trial(port, admin_port, rep, a)
            over = tr.charged - a.quota
            results[name].append((tr, used))
            print("TRIAL target=%s rep=%d ok=%d refused=%d other=%s errors=%d charged=%d "
                  "overshoot=%d overshoot_req=%.1f counter=%s max_inflight=%d per_request=%s secs=%.2f"
                  % (name, rep, tr.ok, tr.refused, json.dumps(tr.other, separators=(",", ":")),
                     tr.errors, tr.charged, over, over / per_req, used, tr.max_inflight,
                     ",".join(map(str, sorted(tr.per_request))), elapsed),
                  file=sys.stderr, flush=True)

    rows = []
    for name, _, _ in targets:
        trs = results[name]
        charged = [t.charged for t, _ in trs]
        over = [c - a.quota for c in charged]
        oks = [t.ok for t, _ in trs]
        counter_ok = all(u == t.charged for t, u in trs)
        clean = all(t.refused == a.clients and not t.other and t.errors == 0 for t, _ in trs)
        bound = sum(1 for c in charged if c <= a.quota + per_req)
        rows.append((name, a.quota, statistics.median(charged), min(charged), max(charged),
                     statistics.median(over), max(over), statistics.median(over) / per_req,
                     max(over) / per_req, statistics.median(oks), bound, len(trs), counter_ok, clean))

    if a.markdown:
        print("| target | quota | total charged, median (min–max) | overshoot tokens, median (max) "
              "| overshoot in requests, median (max) | 200s, median | ≤ quota + 1 request | counter = charged | all 64 refused, no errors |")
        print("|---|---:|---:|---:|---:|---:|---:|---|---|")
        for (name, q, cm, cmin, cmax, om, omax, rm, rmax, okm, bound, n, cok, clean) in rows:
            print("| %s | %s | %s (%s–%s) | %s (%s) | %.1f (%.1f) | %s | %d of %d | %s | %s |"
                  % (name, f"{q:,}", f"{cm:,.0f}", f"{cmin:,}", f"{cmax:,}", f"{om:+,.0f}",
                     f"{omax:+,}", rm, rmax, f"{okm:.0f}", bound, n, "yes" if cok else "NO",
                     "yes" if clean else "NO"))
    else:
        print("%-22s %7s %22s %20s %18s %6s %8s %8s %6s" % (
            "target", "quota", "charged med (min-max)", "overshoot med (max)", "in requests", "200s",
            "<=q+1req", "counter", "clean"))
        for (name, q, cm, cmin, cmax, om, omax, rm, rmax, okm, bound, n, cok, clean) in rows:
            print("%-22s %7d %22s %20s %18s %6.0f %8s %8s %6s" % (
                name, q, "%.0f (%d-%d)" % (cm, cmin, cmax), "%+.0f (%+d)" % (om, omax),
                "%.1f (%.1f)" % (rm, rmax), okm, "%d/%d" % (bound, n), "ok" if cok else "DIFF",
                "yes" if clean else "NO"))
    print("per request: %d tokens charged (%d prompt + %d completion); Sluice reserves %d "
          "(prompt estimate %d + max_tokens %d)" % (
              per_req, a.prompt_tokens, a.completion,
              a.prompt_tokens + 7 + a.completion, a.prompt_tokens + 7, a.completion))


if __name__ == "__main__":
    main()
