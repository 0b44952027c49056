"""quota_helpers.py — helpers for the consumer / key-auth / token-quota tests
(test_quotas.py, test_quotas_redis.py). Additive to harness.py; Python standard library only.

What lives here:
  * RedisServer: a real `redis-server` on a free loopback port (no persistence), waited for
    with a PING loop, killable and restartable on the same port; a tiny RESP client;
  * quota_config(): a complete sluice config with consumers, limits, store, admin and
    access log (harness.gateway_config() knows none of these);
  * chat(): a chat body whose token cost, as the mock reports it, is known exactly;
  * Client: one keep-alive connection that reconnects when the gateway closes it;
  * admin helpers: GET /consumers/NAME and friends on the admin listener.
"""

import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid

import harness
from harness import HTTPConn, Raw, wait_until

CHAT = "/v1/chat/completions"
REJECTED_MSG = "Insufficient token, try in one hour"

# What the gateway adds to its prompt estimate for a one-message chat (docs/quotas.md):
# 4 tokens per message + 3 for the reply. Used only to explain reservations in messages;
# the assertions are on what the mock reported.
EST_OVERHEAD_ONE_MESSAGE = 7


def marker():
    return "q-" + uuid.uuid4().hex[:20]


def sha256_hex(text):
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# Request bodies of known cost
# ---------------------------------------------------------------------------------------

def chat(prompt_tokens, completion_tokens, mark=None, stream=False, max_tokens=True,
         mock=None, **extra):
    """A one-message chat body the mock will bill exactly prompt_tokens + completion_tokens:
    the content is ASCII of exactly 4 * prompt_tokens bytes (the mock counts ceil(bytes/4)),
    the mock is told to produce completion_tokens words, and max_tokens (unless False) caps
    the reply at the same number, so the gateway's reservation is prompt estimate +
    completion_tokens. mark (a unique string), when given, starts the content so the
    upstream request can be found."""
    size = 4 * prompt_tokens
    if mark and len(mark) + 1 > size:
        raise ValueError("prompt of %d tokens cannot hold marker %r" % (prompt_tokens, mark))
    content = ((mark + " ") if mark else "") + "x" * size
    content = content[:size]
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    if max_tokens:
        body["max_tokens"] = completion_tokens
    m = {"tokens": completion_tokens}
    m.update(mock or {})
    body["mock"] = m
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def read_access_log(path):
    """The access log's JSON lines."""
    return [json.loads(line) for line in harness.read_text(path).splitlines() if line.strip()]


def usage_of(resp):
    """(prompt, completion, total) from a non-stream 200 body."""
    u = resp.json()["usage"]
    return u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]


# ---------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------

def bearer(key):
    return {"Authorization": "Bearer " + key}


class Client:
    """Requests on one keep-alive connection, reopened when the server closed it (an error
    reply may close the connection)."""

    def __init__(self, port, headers=None, timeout=harness.DEADLINE):
        self.port = port
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.conn = None

    def post(self, body, path=CHAT, headers=None):
        h = dict(self.headers)
        h.update(headers or {})
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = HTTPConn(self.port, timeout=self.timeout)
            try:
                r = self.conn.request("POST", path, headers=h, json_body=body)
            except (harness.ConnectionClosed, ConnectionError, BrokenPipeError):
                # The server closed an idle keep-alive connection just before we wrote.
                self.close()
                if attempt:
                    raise
                continue
            if not self.conn.keeps_alive:
                self.close()
            return r
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------

def limit(tokens=None, window="1h", strategy=None, instance=None, type=None, requests=None):
    lim = {}
    if instance is not None:
        lim["instance"] = instance
    if strategy is not None:
        lim["strategy"] = Raw(strategy)
    if tokens is not None:
        lim["limit"] = tokens
    if requests is not None:
        lim["requests"] = requests
    lim["window"] = Raw(window)
    if type is not None:
        lim["type"] = Raw(type)
    return lim


def consumer(name, keys, limits=None, rejected_msg=None, rejected_code=None, routes=None,
             max_concurrent=None):
    c = {"name": name, "keys": list(keys)}
    if routes is not None:
        c["routes"] = list(routes)
    if limits:
        c["limits"] = list(limits)
    if max_concurrent is not None:
        c["max_concurrent"] = max_concurrent
    if rejected_code is not None:
        c["rejected_code"] = rejected_code
    if rejected_msg is not None:
        c["rejected_msg"] = rejected_msg
    return c


def quota_instance(name, endpoint, limits=None, **extra):
    inst = harness.instance(name, endpoint, **extra)
    # Quota tests must not have an instance taken out by passive health checks.
    inst["checks"] = {"passive": {"enabled": False}}
    if limits:
        inst["limits"] = list(limits)
    return inst


def quota_route(name, paths, targets, auth="key-auth", fallback_on=None, key_headers=None,
                max_attempts=None, models=None):
    """targets: [(instance name, priority)] or instance names."""
    r = {"name": name, "paths": list(paths), "auth": Raw(auth)}
    if models is not None:
        r["models"] = list(models)
    if key_headers is not None:
        r["key_headers"] = list(key_headers)
    if fallback_on is not None or max_attempts is not None:
        fb = {}
        if fallback_on is not None:
            fb["on"] = [Raw(t) for t in fallback_on]
        if max_attempts is not None:
            fb["max_attempts"] = max_attempts
        r["fallback"] = fb
    tl = []
    for t in targets:
        if isinstance(t, str):
            tl.append({"instance": t})
        else:
            tl.append({"instance": t[0], "priority": t[1]})
    r["targets"] = tl
    return r


def redis_store(port, on_error="allow", timeout="2s", prefix=None, password=None, db=None):
    s = {"type": Raw("redis"), "redis": {"address": "127.0.0.1:%d" % port,
                                         "timeout": Raw(timeout)},
         "on_error": Raw(on_error)}
    if prefix is not None:
        s["redis"]["prefix"] = Raw(json.dumps(prefix))
    if password is not None:
        s["redis"]["password"] = Raw(json.dumps(password))
    if db is not None:
        s["redis"]["db"] = db
    return s


def quota_config(port, instances, routes, consumers=None, store=None, admin_port=None,
                 admin_key=None, access_log=None, workers=2, log_level="debug",
                 payloads=False):
    """A complete sluice config (YAML text) for quota tests (payloads: log.payloads)."""
    cfg = {
        "server": {
            "listen": [{"address": "127.0.0.1:%d" % port}],
            "workers": workers,
            "max_body_size": Raw("1MiB"),
            "drain_timeout": Raw("10s"),
        },
        "log": {"level": Raw(log_level),
                "access_log": Raw(access_log) if access_log else Raw("off")},
    }
    if payloads:
        cfg["log"]["payloads"] = True
    if admin_port is not None:
        cfg["admin"] = {"listen": "127.0.0.1:%d" % admin_port, "key": admin_key or "none"}
    if store is not None:
        cfg["store"] = store
    cfg["instances"] = list(instances)
    if consumers:
        cfg["consumers"] = list(consumers)
    cfg["routes"] = list(routes)
    return harness.to_yaml(cfg) + "\n"


# ---------------------------------------------------------------------------------------
# Admin API
# ---------------------------------------------------------------------------------------

def admin_get(admin_port, path, key=None):
    headers = bearer(key) if key and key != "none" else None
    r = harness.http_request(admin_port, "GET", path, headers=headers)
    if r.status != 200:
        raise AssertionError("admin GET %s -> %r" % (path, r))
    return r.json()


def wait_admin(admin_port, timeout=harness.START_DEADLINE):
    def up():
        try:
            return harness.http_request(admin_port, "GET", "/healthz", timeout=5).status == 200
        except OSError:
            return False
    wait_until(up, timeout, "the admin listener on 127.0.0.1:%d to answer" % admin_port,
               interval=0.05)


def consumer_limits(admin_port, name, key=None):
    """{limit id: {"used", "remaining", "limit", "reset_s", ...}} of one consumer."""
    obj = admin_get(admin_port, "/consumers/" + name, key)
    return {l["id"]: l for l in obj.get("limits", [])}


def consumer_used(admin_port, name, key=None, limit_id=None):
    """used of the consumer's only limit (or of limit_id)."""
    lims = consumer_limits(admin_port, name, key)
    if limit_id is None:
        if len(lims) != 1:
            raise AssertionError("consumer %s has %d limits, name one: %r" % (name, len(lims), lims))
        return next(iter(lims.values()))["used"]
    if limit_id not in lims:
        raise AssertionError("no limit %r for consumer %s: %r" % (limit_id, name, sorted(lims)))
    return lims[limit_id]["used"]


def instance_limits(admin_port, name, key=None):
    for inst in admin_get(admin_port, "/instances", key):
        if inst.get("name") == name:
            return {l["id"]: l for l in inst.get("limits", [])}
    raise AssertionError("no instance %r in GET /instances" % name)


# ---------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------

def seconds_to_next_month_utc(now=None):
    now = now if now is not None else datetime.datetime.now(datetime.timezone.utc)
    if now.month == 12:
        nxt = datetime.datetime(now.year + 1, 1, 1, tzinfo=datetime.timezone.utc)
    else:
        nxt = datetime.datetime(now.year, now.month + 1, 1, tzinfo=datetime.timezone.utc)
    return (nxt - now).total_seconds()


def avoid_window_edge(window_s, margin_s):
    """Fixed windows are aligned to the clock (floor(now / W) * W). A test that must stay
    inside one window waits, by polling the clock, until at least margin_s seconds are left
    in the current one (at most margin_s seconds)."""
    wait_until(lambda: window_s - (time.time() % window_s) >= margin_s, 2 * window_s + 10,
               "a %ds window with at least %ds left" % (window_s, margin_s), interval=0.05)


def wait_window_start(window_s, within_s):
    """Poll the clock until we are at most within_s seconds into a window of window_s."""
    # Several windows of slack: on a starved machine a poll can miss one start.
    wait_until(lambda: (time.time() % window_s) <= within_s, 4 * window_s + 10,
               "the first %.1fs of a %gs window" % (within_s, window_s), interval=0.005)


def parse_seconds(value):
    """'12s' or '12' -> 12."""
    m = re.fullmatch(r"\s*(\d+)s?\s*", value or "")
    if not m:
        raise AssertionError("not a number of seconds: %r" % (value,))
    return int(m.group(1))


# ---------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------

def redis_bin():
    return os.environ.get("REDIS_SERVER_BIN", "redis-server")


class RespError(Exception):
    pass


def _resp_encode(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _resp_read(reader):
    line = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = reader.read_exact(n + 2)
        return data[:-2].decode("utf-8", "replace")
    if kind == b"*":
        n = int(rest)
        if n < 0:
            return None
        return [_resp_read(reader) for _ in range(n)]
    raise RespError("bad RESP line %r" % line)


def redis_command(port, *args, timeout=5, password=None, db=0):
    """One command on a fresh connection (after AUTH and SELECT when given); the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        reader = harness._Reader(s.recv)
        if password is not None:
            s.sendall(_resp_encode(["AUTH", password]))
            _resp_read(reader)
        if db:
            s.sendall(_resp_encode(["SELECT", db]))
            _resp_read(reader)
        s.sendall(_resp_encode(args))
        return _resp_read(reader)


class RedisServer:
    """A real redis-server on 127.0.0.1:port, no persistence. kill() is SIGKILL (an outage);
    start() again brings it back, empty, on the same port."""

    def __init__(self, workdir, name="redis", port=None, password=None):
        self.workdir = workdir
        self.name = name
        self.port = port or harness.free_port()
        self.password = password
        self.proc = None
        self.starts = 0
        self.start()

    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            raise AssertionError("redis already running")
        if shutil.which(redis_bin()) is None:
            raise AssertionError("%s not found: the Redis tests need a real redis-server "
                                 "(scripts/deps.sh installs it; REDIS_SERVER_BIN names "
                                 "another)" % redis_bin())
        self.starts += 1
        log = os.path.join(self.workdir, "%s.%d.log" % (self.name, self.starts))
        argv = [redis_bin(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.workdir, "--daemonize", "no"]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        self.proc = harness._spawn(argv, log, log, env=dict(os.environ))
        self.log_path = log

        def pong():
            if self.proc.poll() is not None:
                raise AssertionError("redis-server exited with %s:\n%s" % (
                    self.proc.returncode, harness.file_tail(log)))
            try:
                return self.cmd("PING", timeout=2) == "PONG"
            except (OSError, RespError, harness.ConnectionClosed):
                return False

        wait_until(pong, harness.START_DEADLINE,
                   "redis-server on 127.0.0.1:%d to answer PING" % self.port, interval=0.05)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL and wait until it is gone and its port refuses connections."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

        def refused():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return False
            except OSError:
                return True
        wait_until(refused, harness.DEADLINE, "redis port %d to refuse connections" % self.port)

    def stop(self):
        if self.alive():
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def pause(self):
        """SIGSTOP: connections are accepted by the kernel, nothing is answered."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def cmd(self, *args, timeout=5, db=0):
        return redis_command(self.port, *args, timeout=timeout, password=self.password, db=db)

    def keys(self, pattern="*", db=0):
        out, cursor = [], "0"
        while True:
            cursor, batch = self.cmd("SCAN", cursor, "MATCH", pattern, "COUNT", 1000, db=db)
            out += batch
            if cursor == "0":
                return sorted(set(out))

    def counter_sum(self, pattern, db=0):
        """Sum of the integer values of the counter keys matching pattern (a counter's
        reservation set, the same key + ":r", is not a counter)."""
        total = 0
        for k in self.keys(pattern, db=db):
            if k.endswith(":r"):
                continue
            v = self.cmd("GET", k, db=db)
            if v is not None:
                total += int(v)
        return total

    def live_reservations(self, pattern="*", db=0):
        """{set key: [member]} of the live reservations ("<token>:<amount>") in the
        reservation sets matching pattern; dead tokens (no ":") are left out."""
        out = {}
        for k in self.keys(pattern, db=db):
            if not k.endswith(":r"):
                continue
            live = [m for m in self.cmd("ZRANGE", k, 0, -1, db=db) if ":" in m]
            if live:
                out[k] = live
        return out


# ---------------------------------------------------------------------------------------
# Test case base
# ---------------------------------------------------------------------------------------

class QuotaTestCase(harness.SluiceTestCase):
    """SluiceTestCase plus redis-server processes (stopped after the gateways, so that a
    gateway's teardown check runs against the Redis it was using) and gateways built with
    quota_config(), each with an admin listener (key "none") and an access log file."""

    def setUp(self):
        self._redises = []
        # Registered before the harness's cleanup, so it runs after it (cleanups are LIFO).
        self.addCleanup(self._stop_redises)
        super().setUp()

    def _stop_redises(self):
        for r in self._redises:
            r.stop()

    def start_redis(self, name=None, password=None):
        r = RedisServer(self.workdir, name=name or "redis%d" % (len(self._redises) + 1),
                        password=password)
        self._redises.append(r)
        return r

    def log_files(self):
        files = super().log_files()
        for r in getattr(self, "_redises", []):
            files.append(r.log_path)
        return files

    def start_gateway(self, name=None, **cfg):
        """quota_config(**cfg) on a fresh port, with an admin listener and an access log.
        Returns the harness.Sluice with .admin_port, .access_log and .cfg (for reloads)."""
        port = harness.free_port()
        cfg.setdefault("admin_port", harness.free_port())
        n = len(self._sluices) + 1
        cfg.setdefault("access_log", os.path.join(self.workdir, "access%d.log" % n))
        text = quota_config(port, **cfg)
        gw = self.start_sluice(text, port=port, name=name)
        gw.admin_port = cfg["admin_port"]
        gw.access_log = cfg["access_log"]
        gw.cfg = cfg
        wait_admin(gw.admin_port)
        return gw

    def reload_gateway(self, gw, **changes):
        """Rewrite gw's config with changes applied, SIGHUP, wait for the reload line."""
        gw.cfg.update(changes)
        text = quota_config(gw.port, **gw.cfg)
        off = gw.reload(text)
        gw.wait_log(r"reloaded .*generation", since=off,
                    message="sluice to log that it reloaded its config")
        return off

    def used(self, gw, consumer_name, limit_id=None):
        return consumer_used(gw.admin_port, consumer_name, limit_id=limit_id)

    def assertQuotaRejection(self, resp, status=429, message=REJECTED_MSG, token_headers=True):
        """A quota refusal: status, OpenAI error shape with message, Retry-After, and the
        x-ratelimit-*-tokens headers (remaining 0) when a token limit refused."""
        self.assertOpenAIError(resp, status)
        err = resp.json()["error"]
        if message is not None:
            self.assertEqual(err["message"], message, "rejection message: %r" % resp)
        ra = resp.header("retry-after")
        self.assertIsNotNone(ra, "no Retry-After on a quota refusal: %r" % resp)
        self.assertGreaterEqual(parse_seconds(ra), 1, "Retry-After: %r" % ra)
        if token_headers:
            for h in ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                      "x-ratelimit-reset-tokens"):
                self.assertIsNotNone(resp.header(h), "no %s on a quota refusal: %r" % (h, resp))
            self.assertEqual(resp.header("x-ratelimit-remaining-tokens"), "0", repr(resp))


# ---------------------------------------------------------------------------------------
# Races
# ---------------------------------------------------------------------------------------

def make_key(name):
    """A distinctive consumer key (easy to grep for in logs)."""
    return "sk-%s-%s" % (name, marker()[2:])


def race(ports, key_, quota, threads=64, prompt=4, completion=96, ttft_ms=30):
    """`threads` clients, spread over the gateways on `ports`, start together and send
    requests of prompt + completion tokens (each held ttft_ms by the mock) until refused.
    Returns (sum of the usage of the 200s, number of 200s, [unexpected answers])."""
    import threading
    lock = threading.Lock()
    state = {"total": 0, "ok": 0, "bad": []}
    barrier = threading.Barrier(threads)

    def worker(i):
        c = Client(ports[i % len(ports)], bearer(key_))
        try:
            barrier.wait(30)
            for _ in range(quota // (prompt + completion) + 10):
                r = c.post(chat(prompt, completion, mock={"ttft_ms": ttft_ms}))
                if r.status == 429:
                    return
                if r.status != 200:
                    with lock:
                        state["bad"].append(r)
                    return
                t = usage_of(r)[2]
                with lock:
                    state["total"] += t
                    state["ok"] += 1
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            with lock:
                state["bad"].append(exc)
        finally:
            c.close()

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(90)
        if t.is_alive():
            raise AssertionError("a client thread is stuck")
    return state["total"], state["ok"], state["bad"]


def top_up(test, port, key_, max_requests, prompt=4, completion=96):
    """One connection, one request at a time, until refused (the refusal is checked).
    Returns the tokens admitted."""
    c = Client(port, bearer(key_))
    test.addCleanup(c.close)
    total = 0
    for _ in range(max_requests):
        r = c.post(chat(prompt, completion))
        if r.status != 200:
            test.assertQuotaRejection(r, message=None)
            return total
        total += usage_of(r)[2]
    raise AssertionError("the consumer was never refused after %d requests" % max_requests)
