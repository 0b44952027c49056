#!/usr/bin/env python3
"""Send exactly N chat completion requests over keep-alive connections (for callgrind runs).

Usage: nreq.py URL N [--conns C] [--stream] [--tokens T] [--key K] [--model M] [--proto chat|messages|responses]
exits non-zero if any reply is not 200. The same prompt in every protocol (bench/pipeline.sh).
"""
import argparse
import http.client
import json
import sys
import threading
import urllib.parse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("n", type=int)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--model", default="mock-model")
    ap.add_argument("--proto", choices=("chat", "messages", "responses"), default="chat")
    ap.add_argument("--key", default="", help="send Authorization: Bearer KEY")
    a = ap.parse_args()
    u = urllib.parse.urlsplit(a.url)
    system = "You are a concise assistant. Answer in one short paragraph."
    user = ("Summarise why a gateway in front of several model providers "
            "helps with quotas, fallback and observability.")
    # The same ~330-byte body as chat.lua (and its equivalent in the other protocols).
    req = {"model": a.model, "stream": a.stream, "mock": {"tokens": a.tokens},
           "temperature": 0.2, "max_tokens": 256,
           "messages": [{"role": "system", "content": system},
                        {"role": "user", "content": user}]}
    if a.proto == "messages":
        req["system"] = system
        req["messages"] = [{"role": "user", "content": user}]
    elif a.proto == "responses":
        del req["messages"], req["max_tokens"]
        req.update(instructions=system, input=user, max_output_tokens=256)
    body = json.dumps(req, separators=(",", ":")).encode()
    bad = []
    headers = {"Content-Type": "application/json"}
    if a.key:
        headers["Authorization"] = "Bearer " + a.key

    def worker(count):
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        for _ in range(count):
            c.request("POST", u.path, body, headers)
            r = c.getresponse()
            r.read()
            if r.status != 200:
                bad.append(r.status)
        c.close()

    per = [a.n // a.conns + (1 if i < a.n % a.conns else 0) for i in range(a.conns)]
    ts = [threading.Thread(target=worker, args=(k,)) for k in per if k]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if bad:
        print(f"{len(bad)} non-200 replies, e.g. {bad[:5]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
