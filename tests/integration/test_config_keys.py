"""test_config_keys.py — the behaviour of configuration keys that no other integration test
exercised (docs/configuration.md, "Every key"; tests/unit/test_config_keys.c checks that every
key of the contract and of conf/ has a row there and that unknown keys are refused):

  * server.expose_instance_header: true adds x-sluice-instance, false leaves it out;
  * instances[].tls_verify: against a TLS upstream with a self-signed certificate (a second
    sluice with a TLS listener, in front of the mock), false is served and true is refused;
  * instances[].auth.query: URL-encoded and appended with ? or &;
  * log.error_log: a path gets the error log;
  * instances[].keepalive.pool: 0 keeps no upstream connection (every request opens one, seen
    through a recording relay); a pool reuses one.
"""

import os

import harness
import ops_helpers as ops
from harness import Raw, wait_until

CHAT = "/v1/chat/completions"


def body(content="hi"):
    return {"model": "x", "messages": [{"role": "user", "content": content}],
            "mock": {"tokens": 3}}


class ConfigKeysTest(harness.SluiceTestCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()

    def chat(self, port, content="hi"):
        return harness.http_request(port, "POST", CHAT, json_body=body(content))

    def test_expose_instance_header(self):
        for expose in (True, False):
            gw = self.start_sluice(instances=[harness.instance("m", self.mock.url())],
                                   routes=[harness.route("chat", [CHAT], "m")],
                                   server={"expose_instance_header": expose})
            r = self.chat(gw.port)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("x-sluice-instance"), "m" if expose else None, r)
            gw.stop_and_check()

    def test_tls_verify(self):
        # the TLS upstream: a sluice serving the mock on a TLS listener with a certificate
        # nobody trusts
        cert, key = ops.make_cert(self.workdir, "upstream", "sluice-test-upstream")
        plain, tls = harness.free_port(), harness.free_port()
        up_cfg = ops.ops_config(plain, [harness.instance("m", self.mock.url())],
                                [harness.route("chat", [CHAT], "m")],
                                listen=[{"address": "127.0.0.1:%d" % plain},
                                        {"address": "127.0.0.1:%d" % tls,
                                         "tls": {"cert": cert, "key": key}}])
        ops.start_gateway(self, up_cfg, plain)
        endpoint = "https://127.0.0.1:%d%s" % (tls, CHAT)

        for verify in (False, True):
            gw = self.start_sluice(
                instances=[harness.instance("tls", endpoint, tls_verify=verify,
                                            checks={"passive": {"enabled": False}})],
                routes=[harness.route("chat", [CHAT], "tls")])
            before = len(self.mock.requests(CHAT))
            r = self.chat(gw.port, "verify %s" % verify)
            if verify:
                self.assertEqual(r.status, 502, r)
                self.assertEqual(len(self.mock.requests(CHAT)), before,
                                 "a request crossed an unverified TLS connection")
            else:
                self.assertEqual(r.status, 200, r)
                self.assertEqual(len(self.mock.requests(CHAT)), before + 1)
            gw.stop_and_check()

    def test_auth_query_appended_encoded(self):
        for endpoint, want in ((self.mock.url(), "key=a%20b%26c&v=1"),
                               (self.mock.url(CHAT + "?api-version=2"),
                                "api-version=2&key=a%20b%26c&v=1")):
            inst = harness.instance("m", endpoint, auth={"query": {"key": "a b&c", "v": "1"}})
            gw = self.start_sluice(instances=[inst], routes=[harness.route("chat", [CHAT], "m")])
            self.mock.clear()
            self.assertEqual(self.chat(gw.port).status, 200)
            q = self.mock.requests(CHAT)[-1]
            self.assertEqual(q["query"], want, q)
            gw.stop_and_check()

    def test_error_log_path(self):
        path = os.path.join(self.workdir, "error.log")
        port = harness.free_port()
        cfg = ops.ops_config(port, [harness.instance("m", self.mock.url())],
                             [harness.route("chat", [CHAT], "m")], error_log=path)
        gw = ops.start_gateway(self, cfg, port)
        self.assertEqual(self.chat(port).status, 200)
        # the startup line goes to the file (level debug: the request's line too)
        wait_until(lambda: os.path.exists(path) and "listening" in harness.read_text(path),
                   message="the error log at %s to hold the startup line" % path)
        self.assertNotIn("listening", harness.read_text(gw.stderr_path))

    def test_keepalive_pool_zero_keeps_no_connection(self):
        n = 4
        for pool, want in ((0, n), (4, 1)):
            tap = harness.Tap(self.mock.port)
            self.addCleanup(tap.close)
            inst = harness.instance("m", tap.url(), keepalive={"pool": pool, "idle": Raw("60s")})
            gw = self.start_sluice(instances=[inst], routes=[harness.route("chat", [CHAT], "m")],
                                   server={"workers": 1})
            for i in range(n):
                self.assertEqual(self.chat(gw.port, "pool %d #%d" % (pool, i)).status, 200)
            self.assertEqual(len(tap.conns), want,
                             "pool %d: %d upstream connections for %d sequential requests"
                             % (pool, len(tap.conns), n))
            gw.stop_and_check()


if __name__ == "__main__":
    harness.main()
