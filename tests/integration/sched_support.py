"""sched_support.py — helpers for the scheduling tests (test_scheduling.py, test_scenario1.py).

Not a test file (no test_ prefix): ctest does not pick it up. Python standard library only.

  * config(): a whole sluice config with the sections harness.gateway_config() leaves out
    (admin, alerts, consumers, per-route balancer/fallback/targets);
  * WebhookReceiver: a tiny HTTP server on a free loopback port that records every POST;
  * admin_instances(): GET /instances on the admin listener, keyed by instance name;
  * restart_mock() / kill_mock(): a mock dies with SIGKILL and comes back on the same port;
  * LoadGen: continuous non-stream load from a few threads, every response recorded with
    its status and x-sluice-instance header;
  * chat(): one non-stream chat request with a unique marker.
"""

import http.server
import json
import os
import threading
import time
import uuid

import harness
from harness import HTTPConn, Raw, http_request, to_yaml

CHAT = "/v1/chat/completions"
# scripts/test.sh sets SLUICE_SANITIZED=1 for the ASan/UBSan run (everything 3-5x slower).
SANITIZED = os.environ.get("SLUICE_SANITIZED") == "1"


def marker():
    return "m-" + uuid.uuid4().hex


def body(mark=None, **extra):
    b = {"model": "m", "messages": [{"role": "user", "content": mark or marker()}],
         "mock": {"tokens": 2}}
    b.update(extra)
    return b


def chat(port, mark=None, path=CHAT, headers=None, **extra):
    """One non-stream chat request on a fresh connection; returns the Response."""
    return http_request(port, "POST", path, headers=headers, json_body=body(mark, **extra))


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------

def inst(name, mock_or_url, **extra):
    """An instance (harness.instance) whose endpoint is a mock's chat URL or a given URL."""
    url = mock_or_url if isinstance(mock_or_url, str) else mock_or_url.url(CHAT)
    return harness.instance(name, url, **extra)


PROBE_BODY = json.dumps({"model": "probe", "messages": [{"role": "user", "content": "0"}],
                         "stream": False, "max_tokens": 1}, separators=(",", ":"))


def active_checks(interval="200ms", unhealthy_interval=None, successes=1, failures=1,
                  timeout="1s", method="POST", path=CHAT, req_body=PROBE_BODY,
                  headers=("Content-Type: application/json",), **extra):
    """checks.active with short intervals and thresholds of one (the seed's shape).
    req_body=None: no body."""
    a = {"type": "http", "http_method": method, "http_path": path}
    if req_body is not None:
        a["http_req_body"] = req_body
    if headers:
        a["req_headers"] = list(headers)
    a.update({
        "timeout": Raw(timeout),
        "healthy": {"interval": Raw(interval), "http_statuses": [200, 302],
                    "successes": successes},
        "unhealthy": {"interval": Raw(unhealthy_interval or interval),
                      "http_statuses": [404, 429, 500, 501, 502, 503, 504, 505],
                      "http_failures": failures, "tcp_failures": failures,
                      "timeouts": failures},
    })
    a.update(extra)
    return a


def rte(name, paths, targets, auth="none", **extra):
    """A route. targets: [(instance, priority, weight)] or [instance name]."""
    r = {"name": name, "paths": list(paths), "auth": Raw(auth)}
    r.update(extra)
    ts = []
    for t in targets:
        if isinstance(t, str):
            ts.append({"instance": t})
        else:
            d = {"instance": t[0], "priority": t[1]}
            if len(t) > 2:
                d["weight"] = t[2]
            ts.append(d)
    r["targets"] = ts
    return r


def config(port, instances, routes, workers=2, admin_port=None, webhook_port=None,
           webhook_headers=None, consumers=None, access_log="off", log_level="debug"):
    cfg = {
        "server": {"listen": [{"address": "127.0.0.1:%d" % port}], "workers": workers,
                   "max_body_size": Raw("1MiB"), "drain_timeout": Raw("10s")},
        "log": {"level": Raw(log_level), "access_log": Raw(access_log)},
    }
    if admin_port:
        cfg["admin"] = {"listen": "127.0.0.1:%d" % admin_port, "key": Raw("none")}
    if webhook_port:
        cfg["alerts"] = {"webhook": {"url": "http://127.0.0.1:%d/hook" % webhook_port,
                                     "timeout": Raw("2s")}}
        if webhook_headers:
            cfg["alerts"]["webhook"]["headers"] = dict(webhook_headers)
    cfg["instances"] = instances
    if consumers:
        cfg["consumers"] = consumers
    cfg["routes"] = routes
    return to_yaml(cfg) + "\n"


# ---------------------------------------------------------------------------------------
# Admin API
# ---------------------------------------------------------------------------------------

def admin_instances(admin_port, key=None):
    headers = {"Authorization": "Bearer " + key} if key else None
    r = http_request(admin_port, "GET", "/instances", headers=headers, timeout=10)
    if r.status != 200:
        raise AssertionError("GET /instances -> %r" % r)
    return {i["name"]: i for i in r.json()}


def wait_health(admin_port, name, healthy, key=None, timeout=harness.DEADLINE):
    last = {}

    def check():
        last["i"] = admin_instances(admin_port, key)[name]
        return last["i"]["healthy"] is healthy

    harness.wait_until(check, timeout, lambda: "instance %s to be %s in GET /instances (last: %s)"
                       % (name, "healthy" if healthy else "unhealthy", last.get("i")))
    return last["i"]


# ---------------------------------------------------------------------------------------
# Webhook receiver
# ---------------------------------------------------------------------------------------

class WebhookReceiver:
    """Records every POST: (monotonic time, path, headers, parsed JSON or raw bytes)."""

    def __init__(self, port=0):
        self.events = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except ValueError:
                    obj = raw
                with outer.lock:
                    outer.events.append((time.monotonic(), self.path,
                                         {k.lower(): v for k, v in self.headers.items()}, obj))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def health_events(self):
        with self.lock:
            return [e[3] for e in self.events
                    if isinstance(e[3], dict) and e[3].get("event") == "instance_health"]

    def wait_health_events(self, n, timeout=harness.DEADLINE):
        return harness.wait_until(lambda: len(self.health_events()) >= n and self.health_events(),
                                  timeout, lambda: "%d instance_health events at the webhook "
                                  "(have %r)" % (n, self.health_events()))

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------
# Mocks that die and come back
# ---------------------------------------------------------------------------------------

def kill_mock(mock):
    """SIGKILL: no goodbye, connections reset, the port free again once reaped."""
    mock.proc.kill()
    mock.proc.wait(10)


def restart_mock(tc, old, *args, name=None):
    """A new mock on the port `old` listened on (the later --listen wins)."""
    return tc.start_mock("--listen", "127.0.0.1:%d" % old.port, *args,
                         name=name or (old.name + "-restarted"))


# ---------------------------------------------------------------------------------------
# Continuous load
# ---------------------------------------------------------------------------------------

class Result:
    __slots__ = ("t0", "t1", "status", "instance", "error", "body")

    def __init__(self, t0, t1, status, instance, error=None, body=b""):
        self.t0, self.t1, self.status, self.instance, self.error = t0, t1, status, instance, error
        self.body = body

    @property
    def ok(self):
        return self.error is None and self.status == 200

    def __repr__(self):
        return "<%.3f %s %s %s>" % (self.t1, self.status, self.instance,
                                    self.error or self.body[:200])


class LoadGen:
    """`threads` clients, each sending non-stream chat requests on a keep-alive connection
    (a new one after any failure), with a pause of `pause` s between requests so the probes
    and the mocks are not starved on a small machine. Every response is recorded."""

    def __init__(self, port, threads=3, path=CHAT, pause=0.005, body_fn=None):
        self.port, self.path, self.pause = port, path, pause
        self.body_fn = body_fn or (lambda: body())
        self.results = []
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def _run(self):
        conn = None
        while not self.stop_ev.is_set():
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = HTTPConn(self.port, timeout=30)
                r = conn.request("POST", self.path, json_body=self.body_fn())
                res = Result(t0, time.monotonic(), r.status, r.header("x-sluice-instance"),
                             body=r.body if r.status != 200 else b"")
                if not conn.keeps_alive:
                    conn.close()
                    conn = None
            except Exception as exc:  # noqa: BLE001 - recorded as a client-visible error
                res = Result(t0, time.monotonic(), None, None, error=repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
            with self.lock:
                self.results.append(res)
            self.stop_ev.wait(self.pause)
        if conn is not None:
            conn.close()

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(40)

    def snapshot(self):
        with self.lock:
            return list(self.results)

    def since(self, t):
        """Results of requests started at or after monotonic time t."""
        return [r for r in self.snapshot() if r.t0 >= t]

    def errors(self):
        return [r for r in self.snapshot() if not r.ok]

    def wait_all_from(self, instance, since, n=10, timeout=harness.DEADLINE):
        """Until the last n responses of requests started after `since` all came from
        `instance` (and there are at least n)."""
        def check():
            rs = sorted(self.since(since), key=lambda r: r.t1)
            return len(rs) >= n and all(r.instance == instance for r in rs[-n:])

        harness.wait_until(check, timeout, lambda: "the last %d responses to come from %s "
                           "(last: %r)" % (n, instance, sorted(self.since(since),
                                                               key=lambda r: r.t1)[-n:]))


# ---------------------------------------------------------------------------------------
# A fixed-answer upstream, for answers the mock cannot give (extra response headers)
# ---------------------------------------------------------------------------------------

class FixedUpstream:
    """Answers every POST with the same status, headers and body; counts requests."""

    def __init__(self, status, headers=(), body=b'{"error":{"message":"slow down",'
                 b'"type":"rate_limit_error","param":null,"code":"rate_limited"}}',
                 content_type="application/json"):
        self.count = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                with outer.lock:
                    outer.count += 1
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path=CHAT):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
