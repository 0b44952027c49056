"""soak.py — the soak run behind scripts/soak.sh (issue 12 §4): one sluice (the ASan build,
or the optimised one for RSS) under a mixed load for MINUTES, then SIGTERM.

The load (a fixed rate, spread over a few client threads) mixes, by weight:
  chat        non-stream chat                                   → 200
  stream      streamed chat, with or without include_usage      → a whole stream, [DONE]
  fallback    a route whose first instance answers 503          → 200 from the second
  cut         a stream the upstream cuts after 3 tokens         → `event: error` (provoked)
  not_found   an unknown model                                  → 404 (provoked)
  bad_json    a body that is not JSON                           → 400 (provoked)
  bad_key     a wrong key                                       → 401 (provoked)
  quota       a consumer with 20 requests a minute              → 200 or 429 (provoked)
  abort       a client that leaves mid-stream or before the answer (provoked)
with a SIGHUP every 30 s (two configurations, alternating) and a log rotation (rename +
SIGUSR1) every 2 minutes; counters in a real redis-server on a free loopback port.

It fails (exit 1) on: any answer but the expected one for its kind; sluice not exiting 0 on
SIGTERM; any sanitizer report (ASan, LSan, UBSan) from sluice or the mocks; with --release,
RSS outside ±10 % of its minute-2 value at any later minute (the target). It prints the RSS
of sluice each minute and writes summary.json to the output directory.
"""

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402
import quota_helpers as qh  # noqa: E402
from fault_helpers import fd_census  # noqa: E402
from harness import HTTPConn, Raw  # noqa: E402

CHAT = "/v1/chat/completions"
KEY = "sk-soak-" + uuid.uuid4().hex[:16]
SMALL_KEY = "sk-soak-small-" + uuid.uuid4().hex[:12]
WEIGHTS = [("chat", 30), ("stream", 25), ("fallback", 10), ("cut", 5), ("not_found", 4),
           ("bad_json", 3), ("bad_key", 3), ("quota", 8), ("abort", 12)]
RELOAD_EVERY = 30.0
ROTATE_EVERY = 120.0
RSS_TOLERANCE = 0.10


def log(msg):
    sys.stdout.write("%s soak: %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stdout.flush()


def config(port, admin_port, redis_port, mocks, access_log, variant):
    def inst(name, mock, **extra):
        i = harness.instance(name, mock.url(), timeouts={"first_byte": "10s", "idle": "10s"})
        i["checks"] = {"passive": {"enabled": False}}
        i.update(extra)
        return i

    cfg = {
        "server": {"listen": [{"address": "127.0.0.1:%d" % port}], "workers": 2,
                   "max_body_size": Raw("1MiB"), "drain_timeout": Raw("10s"),
                   "client_timeout": Raw("30s"), "keepalive_timeout": Raw("30s")},
        "admin": {"listen": "127.0.0.1:%d" % admin_port, "key": "none"},
        "log": {"level": Raw("info"), "access_log": access_log},
        "store": qh.redis_store(redis_port, on_error="allow", timeout="500ms"),
        "instances": [inst("primary", mocks["primary"], options={"variant": variant}),
                      inst("second", mocks["second"]),
                      inst("flaky", mocks["flaky"])],
        "consumers": [
            {"name": "tenant", "keys": [KEY],
             "limits": [{"strategy": Raw("total_tokens"), "limit": 10 ** 12,
                         "window": Raw("1h")}]},
            {"name": "small", "keys": [SMALL_KEY],
             "limits": [{"requests": 20, "window": Raw("1m")}]},
        ],
        "routes": [
            {"name": "chat", "paths": [CHAT], "models": ["m"], "auth": Raw("key-auth"),
             "targets": [{"instance": "primary", "priority": 10},
                         {"instance": "second", "priority": 5}]},
            {"name": "fb", "paths": [CHAT], "models": ["m-fb"], "auth": Raw("key-auth"),
             "targets": [{"instance": "flaky", "priority": 10},
                         {"instance": "second", "priority": 5}]},
        ],
    }
    return harness.to_yaml(cfg) + "\n"


def body(model, stream=False, usage=False, **mock):
    b = {"model": model, "messages": [{"role": "user", "content": "soak " + uuid.uuid4().hex}],
         "max_tokens": 64, "mock": mock}
    if stream:
        b["stream"] = True
        if usage:
            b["stream_options"] = {"include_usage": True}
    return b


class Client:
    """One client thread's keep-alive connection and its requests by kind."""

    def __init__(self, port, rng):
        self.port = port
        self.rng = rng
        self.conn = None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _request(self, payload, headers, raw=None):
        if self.conn is None:
            self.conn = HTTPConn(self.port, timeout=60)
        c = self.conn
        if raw is not None:
            c.send_request("POST", CHAT, headers=headers, body=raw)
        else:
            c.send_request("POST", CHAT, headers=headers, json_body=payload)
        return c

    def _finish(self, c, complete=True):
        if not complete or not c.keeps_alive:
            self.close()

    def plain(self, payload, headers=None, raw=None):
        c = self._request(payload, headers or {"Authorization": "Bearer " + KEY}, raw)
        r = c.read_response()
        self._finish(c, r.complete)
        return r

    def stream(self, payload):
        c = self._request(payload, {"Authorization": "Bearer " + KEY})
        head = c.read_head()
        if head.status != 200:
            c.read_body()
            self._finish(c)
            return head, [], False
        events = list(c.iter_events())
        complete = c.body_state.get("complete", False)
        self._finish(c, complete)
        return head, events, complete

    def run(self, kind):
        """None when the answer is the one expected for kind, else a description."""
        rng = self.rng
        if kind == "chat":
            r = self.plain(body("m", tokens=8, ttft_ms=5))
            return None if r.status == 200 and r.json().get("usage") else repr(r)
        if kind in ("stream", "fallback"):
            model = "m" if kind == "stream" else "m-fb"
            if kind == "fallback" and rng.random() < 0.5:
                r = self.plain(body(model, tokens=8))
                ok = r.status == 200 and r.header("x-sluice-instance") == "second"
                return None if ok else repr(r)
            head, events, complete = self.stream(body(model, True, rng.random() < 0.5,
                                                      tokens=16, itl_ms=2))
            ok = (head.status == 200 and complete and events and events[-1].is_done and
                  not any(e.is_error for e in events))
            if kind == "fallback":
                ok = ok and head.header("x-sluice-instance") == "second"
            return None if ok else "%r %r" % (head, events[-3:])
        if kind == "cut":
            head, events, complete = self.stream(body("m", True, tokens=10, itl_ms=2,
                                                      disconnect_after=3))
            ok = (head.status == 200 and events and events[-1].is_error and
                  not any(e.is_done for e in events))
            return None if ok else "%r %r" % (head, events[-3:])
        if kind == "not_found":
            r = self.plain(body("no-such-model"))
            return None if r.status == 404 and harness.is_openai_error(r) else repr(r)
        if kind == "bad_json":
            r = self.plain(None, raw=b'{"model": "m", "messages": [')
            return None if r.status == 400 and harness.is_openai_error(r) else repr(r)
        if kind == "bad_key":
            r = self.plain(body("m"), headers={"Authorization": "Bearer sk-wrong"})
            return None if r.status == 401 and harness.is_openai_error(r) else repr(r)
        if kind == "quota":
            r = self.plain(body("m", tokens=4), headers={"Authorization": "Bearer " + SMALL_KEY})
            return None if r.status in (200, 429) else repr(r)
        if kind == "abort":
            # Leave mid-stream, or before a slow non-stream answer.
            self.close()
            c = HTTPConn(self.port, timeout=60)
            try:
                if rng.random() < 0.5:
                    c.send_request("POST", CHAT, headers={"Authorization": "Bearer " + KEY},
                                   json_body=body("m", True, tokens=50, itl_ms=20))
                    head = c.read_head()
                    for _ in c.iter_events():
                        break
                    if head.status != 200:
                        return repr(head)
                else:
                    c.send_request("POST", CHAT, headers={"Authorization": "Bearer " + KEY},
                                   json_body=body("m", tokens=4, ttft_ms=300))
            finally:
                c.close()
            return None
        raise ValueError(kind)


class Load:
    def __init__(self, port, threads, rate, seed):
        self.port = port
        self.interval = threads / float(rate)
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.counts = {k: 0 for k, _ in WEIGHTS}
        self.failures = []
        self.threads = [threading.Thread(target=self._run, args=(random.Random(seed + i),),
                                         daemon=True) for i in range(threads)]

    def start(self):
        for t in self.threads:
            t.start()

    def _run(self, rng):
        kinds = [k for k, _ in WEIGHTS]
        weights = [w for _, w in WEIGHTS]
        client = Client(self.port, rng)
        next_at = time.monotonic()
        while not self.stop_ev.is_set():
            kind = rng.choices(kinds, weights)[0]
            try:
                bad = client.run(kind)
            except Exception as exc:  # noqa: BLE001 - a client-visible failure
                client.close()
                bad = "exception: %r" % (exc,)
            with self.lock:
                self.counts[kind] += 1
                if bad is not None:
                    self.failures.append((time.time(), kind, bad[:600]))
            next_at += self.interval
            self.stop_ev.wait(max(0.0, next_at - time.monotonic()))
        client.close()

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(90)

    def total(self):
        with self.lock:
            return sum(self.counts.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--mode", choices=("asan", "release"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rate", type=float, default=120.0, help="requests per second, all threads")
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--seed", type=int, default=12)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    out = args.out

    redis = qh.RedisServer(out, name="redis")
    mocks = {"primary": harness.Mock(out, (), name="primary"),
             "second": harness.Mock(out, (), name="second"),
             "flaky": harness.Mock(out, ("--status", "503"), name="flaky")}
    port, admin_port = harness.free_port(), harness.free_port()
    access_log = os.path.join(out, "access.log")
    texts = [config(port, admin_port, redis.port, mocks, access_log, v) for v in ("a", "b")]
    gw = harness.Sluice(out, texts[0], name="sluice", port=port)
    qh.wait_admin(admin_port)
    log("sluice %s (pid %d) on 127.0.0.1:%d, admin %d, redis %d; %g minutes at %g req/s"
        % (harness.sluice_bin(), gw.pid, port, admin_port, redis.port, args.minutes, args.rate))

    load = Load(port, args.threads, args.rate, args.seed)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    load.start()
    rss, reloads, rotations = [], 0, 0
    next_rss, next_reload, next_rotate = start + 60, start + RELOAD_EVERY, start + ROTATE_EVERY
    problems = []
    try:
        while True:
            now = time.monotonic()
            if not gw.alive():
                problems.append("sluice died (exit %s)" % gw.proc.returncode)
                break
            if now >= deadline:
                rss.append((int(round((now - start) / 60)), gw.rss_kib()))  # the last minute
                log("end: RSS %d KiB, %d requests" % (rss[-1][1], load.total()))
                break
            if now >= next_reload:
                reloads += 1
                gw.reload(texts[reloads % 2])
                next_reload += RELOAD_EVERY
            if now >= next_rotate:
                rotations += 1
                os.replace(access_log, access_log + ".1")
                os.kill(gw.pid, signal.SIGUSR1)
                next_rotate += ROTATE_EVERY
            if now >= next_rss:
                minute = int(round((now - start) / 60))
                kib = gw.rss_kib()
                rss.append((minute, kib))
                with load.lock:
                    nfail = len(load.failures)
                log("minute %d: RSS %d KiB, %d requests, %d unexpected, %d fds" % (
                    minute, kib, load.total(), nfail, len(os.listdir("/proc/%d/fd" % gw.pid))))
                next_rss += 60
            time.sleep(min(1.0, max(0.01, min(deadline, next_reload, next_rotate, next_rss)
                                    - time.monotonic())))
    finally:
        load.stop()

    # Settle, then look at what is left.
    settled = None
    t_end = time.monotonic() + 60
    while time.monotonic() < t_end and gw.alive():
        try:
            st = json.loads(harness.http_request(admin_port, "GET", "/status").body)
        except Exception:  # noqa: BLE001 - retried
            st = None
        if st and st["active_requests"] == 0 and st["open_connections"] == 0:
            settled = st
            break
        time.sleep(0.2)
    census = fd_census(gw.pid, client_ports=(port,)) if gw.alive() else None
    if settled is None:
        problems.append("in-flight requests or client connections never drained")
    elif census["client"]:
        problems.append("client sockets still held after the load: %r" % census)
    try:
        gw.stop_and_check()
    except AssertionError as exc:
        problems.append("sluice at SIGTERM: %s" % exc)
    for m in mocks.values():
        m.stop()
        try:
            m.check_sanitizers()
        except AssertionError as exc:
            problems.append(str(exc))
    redis.stop()

    with load.lock:
        failures = list(load.failures)
        counts = dict(load.counts)
    if failures:
        problems.append("%d unexpected answers; first: %s" % (
            len(failures), "\n  ".join("%s %s" % (k, b) for _, k, b in failures[:10])))
    rss_verdict = "n/a (ran less than 3 minutes)"
    ref = [kib for minute, kib in rss if minute == 2]
    if ref:
        later = [kib for minute, kib in rss if minute >= 2]
        spread = (max(later) - min(later)) / float(ref[0])
        worst = max(abs(k - ref[0]) / float(ref[0]) for k in later)
        flat = worst <= RSS_TOLERANCE
        rss_verdict = "%s: minute 2 = %d KiB, min %d, max %d, largest deviation %.1f %%, " \
                      "spread %.1f %%" % ("flat" if flat else "NOT flat", ref[0], min(later),
                                          max(later), worst * 100, spread * 100)
        if not flat and args.mode == "release":
            problems.append("RSS not flat within ±%d %% after minute 2 (%s)" % (
                RSS_TOLERANCE * 100, rss_verdict))
    elapsed = time.monotonic() - start
    summary = {"mode": args.mode, "binary": harness.sluice_bin(), "minutes": args.minutes,
               "elapsed_s": round(elapsed, 1), "requests": sum(counts.values()),
               "rate_per_s": round(sum(counts.values()) / elapsed, 1), "by_kind": counts,
               "reloads": reloads, "rotations": rotations, "rss_kib_by_minute": rss,
               "rss": rss_verdict, "fds_after": census, "unexpected": len(failures),
               "problems": problems}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log("%d requests in %.0f s (%.1f/s): %s" % (summary["requests"], elapsed,
                                                 summary["rate_per_s"], counts))
    log("%d reloads, %d log rotations; RSS %s" % (reloads, rotations, rss_verdict))
    log("RSS by minute (KiB): %s" % " ".join("%d:%d" % mk for mk in rss))
    if problems:
        for p in problems:
            log("FAIL: " + p)
        log("output in %s" % out)
        return 1
    log("PASS (output in %s)" % out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        harness._kill_all()
