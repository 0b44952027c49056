#!/usr/bin/env python3
"""Added latency at concurrency 1, measured in pairs: one request straight to the mock, then the
same request through the proxy, alternating, each on its own keep-alive connection.

wrk measures the mock and the proxy in separate runs seconds apart, so a burst of load from
another tenant lands in one run and not the other, and on a shared machine the p99 difference
is mostly that. Here both see the same moments: the added p50/p90/p99 is the proxy's
percentile minus the mock's over the same interleaved sequence, and the per-pair difference
(proxy − mock of the two requests sent back to back) has percentiles too.

Usage: c1_pairs.py MOCK_URL PROXY_URL [--n N] [--tokens T] [--key K] [--warmup W]
Prints one line starting with "PAIRS" (microseconds).
"""
import argparse
import json
import socket
import sys
import time
import urllib.parse


def connect(url):
    u = urllib.parse.urlsplit(url)
    s = socket.create_connection((u.hostname, u.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s, u


def one(sock, req, buf):
    """Send req, read one Content-Length response; returns (status, leftover)."""
    sock.sendall(req)
    data = buf
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    return status, rest[length:]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mock")
    ap.add_argument("proxy")
    ap.add_argument("--n", type=int, default=20000, help="pairs")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--key", default="")
    a = ap.parse_args()
    body = json.dumps({
        "model": "mock-model", "stream": False, "mock": {"tokens": a.tokens},
        "temperature": 0.2, "max_tokens": 256,
        "messages": [
            {"role": "system", "content": "You are a concise assistant. Answer in one short paragraph."},
            {"role": "user", "content": "Summarise why a gateway in front of several model providers "
                                        "helps with quotas, fallback and observability."}],
    }, separators=(",", ":")).encode()
    conns = []
    for url, key in ((a.mock, ""), (a.proxy, a.key)):
        s, u = connect(url)
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        req = (f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n{auth}"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        conns.append([s, req, b""])
    lat = ([], [])
    diff = []
    bad = 0
    for i in range(a.warmup + a.n):
        t = [0, 0]
        for k in (0, 1):
            s, req, buf = conns[k]
            t0 = time.perf_counter_ns()
            status, conns[k][2] = one(s, req, buf)
            t[k] = (time.perf_counter_ns() - t0) / 1000
            bad += status != 200
        if i >= a.warmup:
            lat[0].append(t[0])
            lat[1].append(t[1])
            diff.append(t[1] - t[0])
    f = {}
    for name, xs in (("mock", lat[0]), ("proxy", lat[1]), ("pair_diff", diff)):
        for p in (50, 90, 99):
            f[f"{name}_p{p}"] = round(pct(xs, p), 1)
    for p in (50, 90, 99):
        f[f"added_p{p}"] = round(f[f"proxy_p{p}"] - f[f"mock_p{p}"], 1)
    print("PAIRS n=%d errors=%d " % (a.n, bad) + " ".join(f"{k}={v}" for k, v in f.items()), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
