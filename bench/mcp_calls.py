#!/usr/bin/env python3
"""mcp_calls.py — sequential MCP tools/call latency on one keep-alive connection.

Initialises a session at URL (Streamable HTTP: POST initialize, notifications/initialized),
then sends N tools/call messages one after the other and prints one JSON line: the number of
calls, and the median / p90 / p99 / mean latency in microseconds. Used by bench/mcp.sh
twice: through Sluice and straight at the MCP server.

Usage: mcp_calls.py URL TOOL N [KEY]
"""
import http.client
import json
import statistics
import sys
import time
from urllib.parse import urlparse


def main():
    url, tool, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    key = sys.argv[4] if len(sys.argv) > 4 else None
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if key:
        headers["Authorization"] = "Bearer " + key

    def post(msg):
        conn.request("POST", u.path, body=json.dumps(msg), headers=headers)
        r = conn.getresponse()
        body = r.read()
        return r, body

    r, _ = post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "bench", "version": "1"}}})
    if r.status != 200:
        sys.exit("initialize: HTTP %d" % r.status)
    headers["Mcp-Session-Id"] = r.getheader("mcp-session-id")
    headers["MCP-Protocol-Version"] = "2025-06-18"
    post({"jsonrpc": "2.0", "method": "notifications/initialized"})
    lat = []
    for i in range(1, n + 1):
        msg = {"jsonrpc": "2.0", "id": i, "method": "tools/call",
               "params": {"name": tool, "arguments": {"query": "q%d" % i}}}
        t0 = time.perf_counter_ns()
        r, body = post(msg)
        lat.append((time.perf_counter_ns() - t0) / 1000)
        if r.status != 200 or b"results for" not in body:
            sys.exit("call %d: HTTP %d %r" % (i, r.status, body[:200]))
    conn.request("DELETE", u.path, headers=headers)
    conn.getresponse().read()
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
    print(json.dumps({"calls": n, "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99),
                      "mean_us": statistics.fmean(lat)}))


if __name__ == "__main__":
    main()
