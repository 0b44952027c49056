"""fault_helpers.py — shared machinery for the fault-injection tests (test_faults_*.py):
a gateway with an admin listener, an access log and a consumer whose reservations can be
watched; an fd census of the sluice process; a "settled" check (nothing in flight, no client
connection, no reservation, no fd left over); a bounded load generator; metric deltas.
Additive to harness.py, ops_helpers.py and quota_helpers.py; Python standard library only.

What lives here:
  * fault_instance(), fault_config(): config with per-instance timeouts and passive checks,
    key-auth routes, a consumer with a token limit, admin, access log, server limits;
  * FaultCase: a SluiceTestCase (via quota_helpers.QuotaTestCase, so Redis servers can be
    started too) with start_gateway(), admin readers, access-log lookup by request id,
    assertSettled() and fd_census();
  * BoundedLoad: threads with a fixed number of requests each (stream and non-stream mixed),
    every result classified (ok / error event / HTTP error / exception);
  * metric deltas on the admin /metrics (ops_helpers.Exposition).
"""

import json
import os
import threading
import time
import uuid

import harness
import ops_helpers as ops
import quota_helpers as qh
from harness import HTTPConn, Raw, wait_until

CHAT = "/v1/chat/completions"
KEY = "sk-fault-" + uuid.uuid4().hex[:16]
CONSUMER = "tenant"
# The consumer's token limit: large enough never to refuse, so that "used" after the
# faults shows whether a reservation was left behind (each request reserves its
# max_tokens, RESERVE, on top of its prompt estimate).
TOKEN_LIMIT = 10 ** 9
RESERVE = 50000
# ASan: the heaviest cases run with smaller counts.
SLOW = os.environ.get("SLUICE_SANITIZED") == "1"


def marker():
    return "f-" + uuid.uuid4().hex[:16]


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------

def fault_instance(name, endpoint, first_byte="10s", idle="10s", total="60s", connect="2s",
                   passive=False, cooldown=None, pool=None, **extra):
    """An instance; passive health checks off unless asked for, so that a faulty instance
    stays in rotation and every request meets the same fault."""
    inst = harness.instance(name, endpoint, timeouts={
        "connect": connect, "first_byte": first_byte, "idle": idle, "total": total})
    if passive:
        p = {"unhealthy": {"http_statuses": [500, 502, 503, 504], "http_failures": 2,
                           "tcp_failures": 2, "timeouts": 2}}
        if cooldown:
            p["cooldown"] = Raw(cooldown)
        inst["checks"] = {"passive": p}
    else:
        inst["checks"] = {"passive": {"enabled": False}}
    if pool is not None:
        inst["keepalive"] = {"pool": pool, "idle": Raw("60s")}
    inst.update(extra)
    return inst


def fault_route(name, models, targets, fallback_on=None, max_attempts=None, auth="key-auth"):
    """targets: [(instance, priority)]."""
    r = {"name": name, "paths": [CHAT], "models": list(models), "auth": Raw(auth)}
    if fallback_on is not None or max_attempts is not None:
        fb = {}
        if fallback_on is not None:
            fb["on"] = [Raw(t) for t in fallback_on]
        if max_attempts is not None:
            fb["max_attempts"] = max_attempts
        r["fallback"] = fb
    r["targets"] = [{"instance": i, "priority": p} for i, p in targets]
    return r


def fault_consumers(extra=()):
    return [{"name": CONSUMER, "keys": [KEY],
             "limits": [{"strategy": Raw("total_tokens"), "limit": TOKEN_LIMIT,
                         "window": Raw("1h")}],
             "max_concurrent": 10000}] + list(extra)


def fault_config(port, admin_port, instances, routes, consumers=None, store=None,
                 access_log=None, server=None, workers=2, log_level="debug"):
    srv = {"listen": [{"address": "127.0.0.1:%d" % port}], "workers": workers,
           "max_body_size": Raw("1MiB"), "drain_timeout": Raw("10s")}
    for k, v in (server or {}).items():
        srv[k] = Raw(v) if isinstance(v, str) else v
    cfg = {"server": srv, "admin": {"listen": "127.0.0.1:%d" % admin_port, "key": "none"},
           "log": {"level": Raw(log_level),
                   "access_log": access_log if access_log else Raw("off")}}
    if store is not None:
        cfg["store"] = store
    cfg["instances"] = list(instances)
    cfg["consumers"] = fault_consumers() if consumers is None else list(consumers)
    cfg["routes"] = list(routes)
    return harness.to_yaml(cfg) + "\n"


def chat_body(model, stream=False, mark=None, tokens=3, max_tokens=RESERVE, usage=False,
              **mock):
    """A chat body for `model`; the mock answers `tokens` tokens (mock: other overrides).
    usage: a stream asks for its usage chunk (so the client knows what it was charged)."""
    m = {"tokens": tokens}
    m.update(mock)
    body = {"model": model, "messages": [{"role": "user", "content": mark or marker()}],
            "max_tokens": max_tokens, "mock": m}
    if stream:
        body["stream"] = True
        if usage:
            body["stream_options"] = {"include_usage": True}
    return body


def auth(key=KEY, request_id=None):
    h = {"Authorization": "Bearer " + key}
    if request_id:
        h["x-request-id"] = request_id
    return h


# ---------------------------------------------------------------------------------------
# fd census: what the sluice process holds
# ---------------------------------------------------------------------------------------

def _tcp_table(pid):
    """{inode: (local port, remote port, state)} for the process's network namespace."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            with open("/proc/%d/net/%s" % (pid, name)) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
                    out[inode] = (int(local.rsplit(":", 1)[1], 16),
                                  int(remote.rsplit(":", 1)[1], 16), state)
        except OSError:
            pass
    return out


def fd_census(pid, client_ports=(), upstream_ports=()):
    """Counts of the process's descriptors: 'total'; 'listen' (TCP listeners); 'client' (TCP
    sockets whose local port is one of client_ports: connections accepted from clients);
    'up:<port>' for each of upstream_ports (connections to that upstream); 'tcp_other';
    'other' (files, pipes, eventfds, unix sockets...)."""
    links = []
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            links.append(os.readlink(os.path.join(fd_dir, fd)))
        except OSError:
            pass  # closed while we looked
    table = _tcp_table(pid)
    c = {"total": len(links), "listen": 0, "client": 0, "tcp_other": 0, "other": 0}
    for p in upstream_ports:
        c["up:%d" % p] = 0
    for link in links:
        if link.startswith("socket:["):
            t = table.get(link[8:-1])
            if t is not None:
                lport, rport, state = t
                if state == "0A":
                    c["listen"] += 1
                elif lport in client_ports:
                    c["client"] += 1
                elif rport in upstream_ports:
                    c["up:%d" % rport] += 1
                else:
                    c["tcp_other"] += 1
                continue
        c["other"] += 1
    return c


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------

def metric(expo, name, **labels):
    return expo.value(name, 0, **labels)


def delta(before, after, name, **labels):
    return metric(after, name, **labels) - metric(before, name, **labels)


# ---------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------

class Outcome:
    """One request of a BoundedLoad."""
    __slots__ = ("kind", "status", "instance", "stream", "detail", "error_code", "n_content",
                 "usage")

    def __init__(self, kind, status=None, instance=None, stream=False, detail=None,
                 error_code=None, n_content=0, usage=None):
        self.kind, self.status, self.instance, self.stream = kind, status, instance, stream
        self.detail, self.error_code, self.n_content = detail, error_code, n_content
        self.usage = usage  # total_tokens the client was told (a stream: when it asked)

    def __repr__(self):
        return "<%s %s %s%s %s %s>" % (self.kind, self.status, self.instance,
                                       " stream" if self.stream else "", self.error_code or "",
                                       (self.detail or "")[:200])


def run_one(conn_holder, port, body, headers, timeout):
    """Send one request on conn_holder[0] (opened when None, dropped when not reusable);
    return an Outcome: ok, error_event (a stream that ended with `event: error`),
    truncated (a stream that ended without [DONE] and without an error event), http
    (a non-200 answer), exception (no answer)."""
    stream = bool(body.get("stream"))
    try:
        if conn_holder[0] is None:
            conn_holder[0] = HTTPConn(port, timeout=timeout)
        c = conn_holder[0]
        c.send_request("POST", CHAT, headers=headers, json_body=body)
        head = c.read_head()
        inst = head.header("x-sluice-instance")
        if head.status != 200 or not stream:
            r = c.read_body()
            if not c.keeps_alive or not r.complete:
                c.close()
                conn_holder[0] = None
            if r.status == 200:
                try:
                    usage = r.json()["usage"]["total_tokens"]
                except (ValueError, KeyError, TypeError):
                    usage = None
                return Outcome("ok", 200, inst, stream, usage=usage)
            code = None
            try:
                code = r.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                pass
            return Outcome("http", r.status, inst, stream, r.body[:300].decode("latin-1"), code)
        events = list(c.iter_events())
        complete = c.body_state.get("complete", False)
        if not c.keeps_alive or not complete:
            c.close()
            conn_holder[0] = None
        n_content = sum(1 for e in events if e.content())
        errs = [e for e in events if e.is_error]
        if errs:
            code = None
            try:
                code = errs[-1].json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                pass
            return Outcome("error_event", 200, inst, True, errs[-1].raw[:300].decode("latin-1"),
                           code, n_content)
        usage = None
        for e in events:
            if e.is_usage_only():
                usage = e.json()["usage"]["total_tokens"]
        if complete and events and events[-1].is_done:
            return Outcome("ok", 200, inst, True, n_content=n_content, usage=usage)
        return Outcome("truncated", 200, inst, True, repr(events[-2:]), n_content=n_content)
    except Exception as exc:  # noqa: BLE001 - a client-visible failure, recorded
        if conn_holder[0] is not None:
            conn_holder[0].close()
            conn_holder[0] = None
        return Outcome("exception", stream=stream, detail=repr(exc))


class BoundedLoad:
    """`threads` clients, each sending at most `per_thread` requests one after the other on
    a keep-alive connection (reopened after an answer that closes it). body_fn(thread, i)
    gives each request's JSON body (its "stream" field decides how it is read). Ends by
    itself after its count, or earlier on stop(); join() waits for it (bounded)."""

    def __init__(self, port, threads, per_thread, body_fn, headers=None, timeout=None,
                 pause=0.0):
        self.port = port
        self.per_thread = per_thread
        self.body_fn = body_fn
        self.headers = headers if headers is not None else auth()
        self.timeout = timeout or harness.DEADLINE + 30
        self.pause = pause
        self.results = []
        self.lock = threading.Lock()
        self.done_count = 0
        self.stop_ev = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True)
                        for t in range(threads)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def _run(self, t):
        holder = [None]
        for i in range(self.per_thread):
            if self.stop_ev.is_set():
                break
            res = run_one(holder, self.port, self.body_fn(t, i), self.headers, self.timeout)
            with self.lock:
                self.results.append(res)
                self.done_count += 1
            if self.pause:
                self.stop_ev.wait(self.pause)
        if holder[0] is not None:
            holder[0].close()

    def stop(self):
        self.stop_ev.set()
        return self.join()

    def count(self):
        with self.lock:
            return self.done_count

    def join(self, timeout=300):
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
            if t.is_alive():
                raise AssertionError("a load thread is stuck after %ds (%d of %d done)" % (
                    timeout, self.count(), self.per_thread * len(self.threads)))
        return self.snapshot()

    def snapshot(self):
        with self.lock:
            return list(self.results)

    def failures(self):
        return [r for r in self.snapshot() if r.kind != "ok"]


# ---------------------------------------------------------------------------------------
# Test case base
# ---------------------------------------------------------------------------------------

class FaultCase(qh.QuotaTestCase):
    """Gateways with an admin listener (key none) and an access log; helpers to read the
    admin API and to check that nothing is left over after a fault."""

    def start_gateway(self, instances, routes, name=None, consumers=None, store=None,
                      server=None, workers=2, access_log=True, log_level="debug"):
        port = harness.free_port()
        admin_port = harness.free_port()
        n = len(self._sluices) + 1
        log_path = os.path.join(self.workdir, "access%d.log" % n) if access_log is True \
            else access_log
        cfg = dict(instances=instances, routes=routes, consumers=consumers, store=store,
                   access_log=log_path or None, server=server, workers=workers,
                   log_level=log_level)
        gw = self.start_sluice(fault_config(port, admin_port, **cfg), port=port, name=name,
                               wait=False)
        gw.admin_port = admin_port
        gw.access_log = log_path
        gw.cfg = cfg
        gw.admin = ops.Admin(admin_port)
        qh.wait_admin(admin_port)
        gw.wait_ready()
        return gw

    def reconfigure(self, gw, **changes):
        """Rewrite gw's config with changes applied; returns the text (no signal sent)."""
        gw.cfg.update(changes)
        text = fault_config(gw.port, gw.admin_port, **gw.cfg)
        gw.write_config(text)
        return text

    # -- admin -----------------------------------------------------------------------
    def status(self, gw):
        return gw.admin.json("/status")

    def instances(self, gw):
        return {i["name"]: i for i in gw.admin.json("/instances")}

    def consumer(self, gw, name=CONSUMER):
        return gw.admin.json("/consumers/" + name)

    def used(self, gw, name=CONSUMER):
        lims = self.consumer(gw, name)["limits"]
        return sum(l["used"] for l in lims if l.get("kind") != "requests")

    def metrics(self, gw):
        return gw.admin.metrics()

    # -- access log ------------------------------------------------------------------
    def access_lines(self, gw):
        out = []
        for line in harness.read_text(gw.access_log).splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def access_entry(self, gw, request_id):
        """The access-log line of one request (waited for: it is written after the reply)."""
        def find():
            for e in self.access_lines(gw):
                if e.get("request_id") == request_id:
                    return e
            return None
        return wait_until(find, message="the access log line of request %s" % request_id)

    # -- leaks -----------------------------------------------------------------------
    def wait_no_clients(self, gw):
        """Until sluice has closed its side of every client connection (after readiness
        probes, before a baseline census)."""
        wait_until(lambda: self.census(gw)["client"] == 0,
                   message="sluice to close the probe connections")

    def census(self, gw, upstream_ports=()):
        return fd_census(gw.pid, client_ports=(gw.port,), upstream_ports=upstream_ports)

    def assertSettled(self, gw, baseline, upstream_ports=(), pooled_ports=(), max_used=None,
                      pool_bound=None, timeout=None):
        """Wait until nothing is left over from the traffic: no request in flight (status,
        instances, consumer), no client connection open (admin and fds), no connection to
        an upstream in upstream_ports, every other descriptor as in baseline (a census taken
        before the traffic, with no client connected) — except idle pooled connections to
        the upstreams in pooled_ports, which are bounded by pool_bound each. max_used: the
        consumer's quota use must not exceed it (no reservation left behind)."""
        ports = tuple(upstream_ports) + tuple(pooled_ports)
        last = {}

        def settled():
            st = self.status(gw)
            insts = self.instances(gw)
            cons = self.consumer(gw)
            c = self.census(gw, ports)
            last.update(status=st, inflight={k: v["inflight"] for k, v in insts.items()},
                        consumer_in_flight=cons.get("in_flight"), census=c)
            if st["active_requests"] != 0 or st["open_connections"] != 0:
                return False
            if any(v["inflight"] != 0 for v in insts.values()) or cons.get("in_flight"):
                return False
            if c["client"] != 0 or any(c["up:%d" % p] for p in upstream_ports):
                return False
            pooled = sum(c["up:%d" % p] - baseline.get("up:%d" % p, 0) for p in pooled_ports)
            return (c["listen"] == baseline["listen"] and c["other"] == baseline["other"] and
                    c["tcp_other"] == baseline["tcp_other"] and
                    c["total"] == baseline["total"] + pooled)

        wait_until(settled, timeout or harness.DEADLINE,
                   lambda: "everything to settle (baseline %r, last %r)" % (baseline, last))
        if pool_bound is not None:
            for p in pooled_ports:
                self.assertLessEqual(last["census"]["up:%d" % p], pool_bound,
                                     "connections to upstream port %d: %r" % (p, last))
        if max_used is not None:
            used = self.used(gw)
            self.assertLessEqual(used, max_used,
                                 "quota use %d after the traffic settled: a reservation was "
                                 "left behind (%r)" % (used, self.consumer(gw)))
        return last

    def assertServing(self, gw, model, n=3, instance=None):
        """n plain requests on model answer 200 (from instance when given)."""
        for _ in range(n):
            r = harness.http_request(gw.port, "POST", CHAT, headers=auth(),
                                     json_body=chat_body(model, max_tokens=10))
            self.assertEqual(r.status, 200, "not serving %s: %r" % (model, r))
            if instance:
                self.assertEqual(r.header("x-sluice-instance"), instance, repr(r))
