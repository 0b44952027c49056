"""test_lifecycle.py — config validation (-t), SIGHUP reload (under continuous load, with zero
failed requests; an invalid file keeps the old config and logs every error), SIGTERM drain
(an in-flight stream finishes, new connections are refused, exit status 0; drain_timeout
bounds the wait)."""

import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid

import harness
from harness import HTTPConn, gateway_config, http_request, instance, route, stream_request

CHAT = "/v1/chat/completions"
VARIANTS = {"A": ("model-A", 0.25), "B": ("model-B", 0.75)}


def marker():
    return "m-" + uuid.uuid4().hex


def variant_config(port, mock, variant, **server):
    model, temp = VARIANTS[variant]
    return gateway_config(
        port,
        instances=[instance("mock", mock.url(CHAT), model=model, options={"temperature": temp})],
        routes=[route("chat", [CHAT], "mock")],
        server=server or None,
        log_level="info")


def invalid_config(text):
    """Two errors at known lines: an unknown key (line 2) and a dangling instance reference.
    Returns (text, line of the dangling reference)."""
    lines = text.rstrip("\n").split("\n")
    assert lines[0] == "server:", lines[0]
    lines.insert(1, "  bogus_key: 1")
    idx = next(i for i, l in enumerate(lines) if l.strip() == "- instance: mock")
    lines[idx] = lines[idx].replace("instance: mock", "instance: no-such-instance")
    return "\n".join(lines) + "\n", idx + 1


class ValidateTest(harness.SluiceTestCase):

    def test_validate_flag(self):
        port = harness.free_port()
        mock_url = "http://127.0.0.1:9/v1/chat/completions"

        class FakeMock:
            def url(self, path):
                return mock_url

        good = variant_config(port, FakeMock(), "A")
        bad, dangling_line = invalid_config(good)
        paths = {}
        for name, text in (("good", good), ("bad", bad)):
            paths[name] = "%s/%s.yaml" % (self.workdir, name)
            with open(paths[name], "w") as f:
                f.write(text)
        self.assertTrue(os.access(harness.sluice_bin(), os.X_OK),
                        "sluice binary not found: %s (set SLUICE_BIN)" % harness.sluice_bin())
        p = subprocess.run([harness.sluice_bin(), "-t", "-c", paths["good"]], capture_output=True,
                           timeout=harness.DEADLINE, env=harness.sanitizer_env())
        out = (p.stdout + p.stderr).decode("utf-8", "replace")
        self.assertEqual(p.returncode, 0, "sluice -t on a valid file: %s" % out)
        self.assertIsNone(harness.sanitizer_report(out), out)

        p = subprocess.run([harness.sluice_bin(), "-t", "-c", paths["bad"]], capture_output=True,
                           timeout=harness.DEADLINE, env=harness.sanitizer_env())
        out = (p.stdout + p.stderr).decode("utf-8", "replace")
        self.assertEqual(p.returncode, 1, "sluice -t on an invalid file: %s" % out)
        self.assertIsNone(harness.sanitizer_report(out), out)
        # the unknown key is named either in the key path or in the message
        self.assertRegex(out, r"bad\.yaml:2:\d+: server(\.bogus_key)?: .*bogus_key")
        self.assertRegex(out, r"bad\.yaml:%d:\d+: routes\[0\]\.targets\[0\]\.instance: \S"
                         % dangling_line)


class ReloadTest(harness.SluiceTestCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        self.port = harness.free_port()
        self.sluice = self.start_sluice(variant_config(self.port, self.mock, "A"), port=self.port)

    def probe(self):
        """(model, temperature) the upstream received for a fresh request."""
        m = marker()
        r = http_request(self.port, "POST", CHAT, json_body={
            "model": "client", "messages": [{"role": "user", "content": m}],
            "mock": {"tokens": 1}})
        self.assertEqual(r.status, 200, r)
        body = json.loads(self.mock.wait_request(m)["body"])
        return body["model"], body["temperature"]

    def wait_variant(self, variant, what):
        want = VARIANTS[variant]
        seen = {}

        def check():
            seen["v"] = self.probe()
            return seen["v"] == want

        harness.wait_until(check, harness.DEADLINE,
                           lambda: "%s: requests to reflect config %s %r (last seen %r)"
                           % (what, variant, want, seen.get("v")))

    def test_reloads_under_load_zero_failures(self):
        self.wait_variant("A", "initial config")
        stop = threading.Event()
        failures = []
        counts = {}
        lock = threading.Lock()

        def fail(kind, n, what):
            with lock:
                failures.append("%s #%d: %s" % (kind, n, what))

        def worker(kind):
            n = 0
            conn = None
            while not stop.is_set():
                n += 1
                body = {"model": "client", "messages": [{"role": "user", "content": "%s-%d" % (kind, n)}],
                        "mock": {"tokens": 3, "itl_ms": 0}}
                try:
                    if kind.startswith("keepalive"):
                        if conn is None:
                            conn = HTTPConn(self.port)
                        r = conn.request("POST", CHAT, json_body=body)
                        if r.status != 200 or not r.complete:
                            fail(kind, n, repr(r))
                        else:
                            r.json()
                        if not conn.keeps_alive:
                            conn.close()
                            conn = None
                    elif kind == "fresh":
                        r = http_request(self.port, "POST", CHAT, json_body=body)
                        if r.status != 200:
                            fail(kind, n, repr(r))
                        else:
                            r.json()
                    else:
                        body["stream"] = True
                        head, events, complete, rest = stream_request(self.port, CHAT, body)
                        if head.status != 200 or not complete or not events or not events[-1].is_done:
                            fail(kind, n, "stream %r complete=%r events=%r" % (head, complete,
                                                                              events[-3:]))
                    with lock:
                        counts[kind] = counts.get(kind, 0) + 1
                except Exception as exc:  # noqa: BLE001
                    fail(kind, n, repr(exc))
                    if conn is not None:
                        conn.close()
                        conn = None
            if conn is not None:
                conn.close()

        kinds = ["keepalive-1", "keepalive-2", "fresh", "stream"]
        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in kinds]
        for t in threads:
            t.start()
        try:
            harness.wait_until(lambda: all(counts.get(k, 0) >= 3 for k in kinds),
                               harness.DEADLINE, lambda: "load to get going (%r)" % counts)
            current = "A"
            for i in range(10):
                current = "B" if current == "A" else "A"
                before = dict(counts)
                self.sluice.reload(variant_config(self.port, self.mock, current))
                self.wait_variant(current, "reload %d" % (i + 1))
                # load keeps running across this reload
                harness.wait_until(lambda: all(counts.get(k, 0) >= before.get(k, 0) + 3
                                               for k in kinds),
                                   harness.DEADLINE,
                                   lambda: "load to continue after reload %d (%r)" % (i + 1, counts))
        finally:
            stop.set()
            for t in threads:
                t.join(harness.DEADLINE)
        self.assertFalse(any(t.is_alive() for t in threads), "load threads stuck")
        harness.note("requests completed during the reloads: %r" % counts)
        self.assertEqual(failures, [], "requests failed during reloads (%d ok: %r)"
                         % (sum(counts.values()), counts))
        self.assertEqual(current, "A")
        for _ in range(5):
            self.assertEqual(self.probe(), VARIANTS["A"])
        # every request went up with one whole config, never a mix of two
        allowed = set(VARIANTS.values())
        for q in self.mock.requests(CHAT):
            b = json.loads(q["body"])
            self.assertIn((b.get("model"), b.get("temperature")), allowed, b)
        self.assertTrue(self.sluice.alive())

    def test_invalid_reload_keeps_old_config(self):
        self.wait_variant("A", "initial config")
        good = variant_config(self.port, self.mock, "A")
        bad, dangling_line = invalid_config(good)
        off = self.sluice.reload(bad)
        name = re.escape("sluice.yaml")
        self.sluice.wait_log(r"%s:2:\d+: server(\.bogus_key)?: .*bogus_key" % name, since=off,
                             message="the unknown-key error (file:2:col: server...bogus_key) "
                                     "in the log after the invalid reload")
        self.sluice.wait_log(r"%s:%d:\d+: routes\[0\]\.targets\[0\]\.instance" % (name, dangling_line),
                             since=off, message="the dangling-reference error in the log "
                                                "(every error is logged, not only the first)")
        self.assertTrue(self.sluice.alive(), "sluice exited on an invalid reload")
        for _ in range(5):
            self.assertEqual(self.probe(), VARIANTS["A"], "the old config must keep serving")
        # a later valid reload still works
        self.sluice.reload(variant_config(self.port, self.mock, "B"))
        self.wait_variant("B", "valid reload after an invalid one")

    def test_reload_keeps_listening_address(self):
        """Reloading the same file changes nothing visible and drops no connection."""
        with HTTPConn(self.port) as c:
            r = c.request("POST", CHAT, json_body={"model": "x", "messages": [
                {"role": "user", "content": "1"}]})
            self.assertEqual(r.status, 200, r)
            self.sluice.reload()
            self.wait_variant("A", "same-file reload")
            r = c.request("POST", CHAT, json_body={"model": "x", "messages": [
                {"role": "user", "content": "2"}]})
            self.assertEqual(r.status, 200, "keep-alive connection broken by a reload: %r" % r)


class KeyReloadTest(harness.SluiceTestCase):
    """A key a reload removes stops working at once, also on a keep-alive connection whose
    earlier requests were answered with it (auth remembers keys that matched, per snapshot)."""

    KEEP, DROP = "sk-kept-0123456789", "sk-dropped-0123456789"

    def config(self, keys):
        text = gateway_config(
            self.port, instances=[instance("mock", self.mock.url(CHAT))],
            routes=[route("chat", [CHAT], "mock", auth=harness.Raw("key-auth"))],
            server={"workers": 1}, log_level="info")
        return text + "consumers:\n  - name: alice\n    keys: [%s]\n" % ", ".join(keys)

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        self.port = harness.free_port()
        self.sluice = self.start_sluice(self.config([self.KEEP, self.DROP]), port=self.port)

    def ask(self, conn, key):
        return conn.request("POST", CHAT, headers={"Authorization": "Bearer " + key},
                            json_body={"model": "m", "messages": [{"role": "user", "content": "x"}],
                                       "mock": {"tokens": 1}})

    def test_removed_key_refused_on_open_connection(self):
        with HTTPConn(self.port) as c:
            for _ in range(3):
                self.assertEqual(self.ask(c, self.DROP).status, 200)
            self.assertEqual(self.ask(c, self.KEEP).status, 200)
            off = self.sluice.reload(self.config([self.KEEP]))
            self.sluice.wait_log(r"reloaded .*: generation 2", since=off,
                                 message="the reload that removes a key")
            r = self.ask(c, self.DROP)
            self.assertEqual(r.status, 401, "a removed key still served on a kept-alive "
                                            "connection: %r" % r)
            self.assertEqual(self.ask(c, self.KEEP).status, 200)
            self.assertEqual(self.ask(c, self.DROP).status, 401)
        with HTTPConn(self.port) as c:
            self.assertEqual(self.ask(c, self.DROP).status, 401)
            self.assertEqual(self.ask(c, self.KEEP).status, 200)


def connect_refused(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()
    return False


class DrainTest(harness.SluiceTestCase):

    def start(self, drain_timeout):
        self.mock = self.start_mock()
        self.port = harness.free_port()
        self.sluice = self.start_sluice(
            gateway_config(self.port,
                           instances=[instance("mock", self.mock.url(CHAT),
                                               timeouts={"idle": "20s", "total": "120s"})],
                           routes=[route("chat", [CHAT], "mock")],
                           server={"drain_timeout": drain_timeout}),
            port=self.port)

    def test_sigterm_lets_inflight_stream_finish(self):
        self.start("60s")
        tokens = 40
        c = HTTPConn(self.port, timeout=60)
        try:
            c.send_request("POST", CHAT, json_body={
                "model": "x", "stream": True, "messages": [{"role": "user", "content": "long"}],
                "mock": {"tokens": tokens, "itl_ms": 300}})
            head = c.read_head()
            self.assertEqual(head.status, 200, head)
            it = c.iter_events()
            events = []
            for ev in it:
                events.append(ev)
                if ev.content():
                    break
            self.sluice.terminate()
            harness.wait_until(lambda: connect_refused(self.port), harness.DEADLINE,
                               "new connections to be refused after SIGTERM")
            self.assertTrue(self.sluice.alive(),
                            "sluice exited with a stream in flight (rc %s)" % self.sluice.proc.returncode)
            self.assertEqual(self.mock.stats()["completed"], 0,
                             "the stream ended before the refusal was checked")
            events.extend(it)
            self.assertStreamComplete(head, events, c.body_state.get("complete"), c.sse_rest)
            self.assertEqual(len([e for e in events if e.content()]), tokens)
        finally:
            c.close()
        rc = self.sluice.wait_exit()
        self.assertEqual(rc, 0, "sluice exit status after draining: %r" % rc)
        st = self.mock.stats()
        self.assertEqual((st["completed"], st["cancelled"]), (1, 0), st)

    def test_sigterm_idle_keepalive_connection_does_not_block_exit(self):
        self.start("60s")
        with HTTPConn(self.port, timeout=60) as c:
            r = c.request("POST", CHAT, json_body={"model": "x", "messages": [
                {"role": "user", "content": "1"}]})
            self.assertEqual(r.status, 200, r)
            t0 = time.monotonic()
            self.sluice.terminate()
            rc = self.sluice.wait_exit(timeout=40)
            self.assertIsNotNone(rc, "sluice waited for an idle keep-alive connection")
            self.assertEqual(rc, 0)
            self.assertLess(time.monotonic() - t0, 40)

    def test_drain_timeout_bounds_shutdown(self):
        self.start("2s")
        c = HTTPConn(self.port, timeout=60)
        try:
            c.send_request("POST", CHAT, json_body={
                "model": "x", "stream": True, "messages": [{"role": "user", "content": "long"}],
                "mock": {"tokens": 10000, "itl_ms": 100}})  # 1000 s: far beyond drain_timeout
            head = c.read_head()
            self.assertEqual(head.status, 200, head)
            it = c.iter_events()
            events = []
            for ev in it:
                events.append(ev)
                if ev.content():
                    break
            self.sluice.terminate()
            rc = self.sluice.wait_exit(timeout=30)
            self.assertIsNotNone(rc, "sluice did not exit after drain_timeout (2s) passed")
            self.assertEqual(rc, 0)
            try:
                events.extend(it)
            except OSError:
                pass
            self.assertFalse(any(e.is_done for e in events),
                             "a cut stream must not look complete: %r" % events[-3:])
        finally:
            c.close()


if __name__ == "__main__":
    harness.main()
