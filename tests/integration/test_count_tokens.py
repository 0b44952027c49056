"""test_count_tokens.py — POST /v1/messages/count_tokens passed through to an Anthropic upstream
(issue 9; docs/providers.md).

Sluice passes count_tokens through only to an instance on Anthropic's own endpoint
(https://api.anthropic.com/v1/messages, the provider's default): a custom endpoint may be a
proxy without one, and gets the gateway's estimate (test_protocols.py). To reach the mock
through that default endpoint, the test runs sluice with https_proxy pointing at a CONNECT
proxy of its own that terminates the TLS with a self-signed certificate (the instance has
tls_verify: false) and relays the plaintext to sluice-mockllm, which speaks the Messages API
and count_tokens. So the real path is exercised: the default count_tokens URL, libcurl over
TLS, the Anthropic headers, the model rewrite, the answer relayed.

Checked: the answer is the mock's count; the upstream saw the count_tokens path on
api.anthropic.com with the instance's key and the client's anthropic-version (and neither
the client's key nor the Authorization header); the model is the instance's; an upstream
error is relayed in the Messages shape; no tokens are charged (a consumer token limit of
1 stays untouched); chat on the same instance still goes to /v1/messages; a count costs no
tokens, so spent token budgets — the consumer's and the instance's own — do not refuse it,
passed through or answered by the gateway's estimate (qwen, a chat instance), and it charges
none; but it is a request, and request rates (requests:) still count and refuse it.
"""

import json
import os
import select
import socket
import ssl
import threading

import harness
import ops_helpers as ops
import quota_helpers as qh
from harness import Raw, wait_until

COUNT = "/v1/messages/count_tokens"
MESSAGES = "/v1/messages"
CHAT = "/v1/chat/completions"
VERSION = {"anthropic-version": "2023-06-01"}


class TLSConnectProxy:
    """An HTTP CONNECT proxy that answers every CONNECT itself: it completes the TLS handshake
    with the given certificate and relays the decrypted bytes to 127.0.0.1:target_port.
    Records the CONNECT targets."""

    def __init__(self, cert, key, target_port):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.target_port = target_port
        self.targets = []
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        for s in [self.lsock] + self.socks:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            self.socks.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = c.recv(4096)
                if not chunk:
                    return
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode()
            method, target, _ = line.split(" ", 2)
            self.targets.append(target)
            if method != "CONNECT":
                c.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            tls = self.ctx.wrap_socket(c, server_side=True)
            up = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            self.socks.append(up)
            self._relay(tls, up)
        except (OSError, ValueError, ssl.SSLError):
            pass
        finally:
            c.close()

    @staticmethod
    def _relay(tls, up):
        # One thread, both directions: an SSLSocket must not be read and written from two
        # threads at once. Bytes already decrypted (pending) are read before waiting again.
        while True:
            ready = [tls] if tls.pending() else select.select([tls, up], [], [], 30)[0]
            if not ready:
                return
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                (up if s is tls else tls).sendall(data)


class CountTokensPassThroughTest(harness.SluiceTestCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        cert, key = ops.make_cert(self.workdir, "anthropic", "api.anthropic.com")
        self.proxy = TLSConnectProxy(cert, key, self.mock.port)
        self.addCleanup(self.proxy.close)
        self.access_log = os.path.join(self.workdir, "access.log")
        self.admin_port = harness.free_port()
        self.port = harness.free_port()
        # provider anthropic, no endpoint: Anthropic's own, where count_tokens is served
        inst = {"name": "claude", "provider": Raw("anthropic"), "model": "claude-up",
                "tls_verify": False,
                "auth": {"header": {"x-api-key": "sk-ant-instance"}},
                "checks": {"passive": {"enabled": False}},
                "limits": [{"limit": 1, "window": Raw("1h")}]}
        # a chat instance: count_tokens there is the gateway's estimate
        qwen = harness.instance("qwen", self.mock.url(CHAT), model="qwen-up",
                                checks={"passive": {"enabled": False}})
        routes = [{"name": "messages", "paths": [MESSAGES, COUNT, CHAT], "models": ["claude"],
                   "auth": Raw("key-auth"), "targets": [{"instance": "claude"}]},
                  {"name": "estimate", "paths": [COUNT], "models": ["qwen"],
                   "auth": Raw("key-auth"), "targets": [{"instance": "qwen"}]}]
        # app: a token budget of 1; rated: no token budget of its own, 3 requests an hour
        consumers = [ops.consumer("app", ["app-key"],
                                  limits=[{"limit": 1, "window": Raw("1h")}]),
                     ops.consumer("rated", ["rated-key"],
                                  limits=[{"requests": 3, "window": Raw("1h")}])]
        cfg = ops.ops_config(self.port, [inst, qwen], routes, consumers=consumers,
                             admin_port=self.admin_port, access_log=self.access_log)
        env = {"https_proxy": "http://127.0.0.1:%d" % self.proxy.port,
               "HTTPS_PROXY": "http://127.0.0.1:%d" % self.proxy.port, "no_proxy": ""}
        self.gw = ops.start_gateway(self, cfg, self.port, self.admin_port, env=env)

    def count(self, body, headers=None, key="app-key"):
        h = {"x-api-key": key}
        h.update(VERSION if headers is None else headers)
        return harness.http_request(self.port, "POST", COUNT, headers=h, json_body=body)

    def chat(self, key="app-key"):
        return harness.http_request(
            self.port, "POST", CHAT, headers={"x-api-key": key},
            json_body={"model": "claude", "max_tokens": 5, "mock": {"tokens": 2},
                       "messages": [{"role": "user", "content": "hi"}]})

    def used(self):
        """Every limit's use: the consumers' and the claude instance's own."""
        u = {}
        for name in ("app", "rated"):
            u.update({k: v["used"] for k, v in qh.consumer_limits(
                self.admin_port, name, ops.ADMIN_KEY).items()})
        u.update({k: v["used"] for k, v in qh.instance_limits(
            self.admin_port, "claude", ops.ADMIN_KEY).items()})
        return u

    def test_passed_through_to_the_default_endpoint(self):
        body = {"model": "claude", "system": "be brief",
                "messages": [{"role": "user", "content": "one two three four five six"}]}
        r = self.count(body)
        self.assertEqual(r.status, 200, r)
        n = r.json()["input_tokens"]
        q = self.mock.requests(COUNT)
        self.assertEqual(len(q), 1, "the count went to the upstream, not the estimate")
        q = q[0]
        self.assertEqual(self.proxy.targets, ["api.anthropic.com:443"])
        self.assertEqual(q["headers"]["host"], "api.anthropic.com")
        self.assertEqual(q["headers"]["x-api-key"], "sk-ant-instance")
        self.assertEqual(q["headers"]["anthropic-version"], "2023-06-01")
        self.assertNotIn("authorization", q["headers"])
        up = json.loads(q["body"])
        self.assertEqual(up["model"], "claude-up", "the instance's model")
        self.assertEqual(up["messages"], body["messages"])
        # the mock's own count for the same prompt, asked directly
        direct = harness.http_request(self.mock.port, "POST", COUNT, headers=VERSION,
                                      json_body=dict(body, model="claude-up"))
        self.assertEqual(n, direct.json()["input_tokens"])
        # count_tokens costs nothing: the consumer's limit of 1 token still admits a count,
        # and the access log charges no usage
        r2 = self.count(body)
        self.assertEqual(r2.status, 200, r2)
        line = wait_until(lambda: [json.loads(l) for l in harness.read_text(
            self.access_log).splitlines() if r.header("x-request-id") in l],
            message="the count's access-log line")[0]
        self.assertEqual((line["route"], line["instance"], line["status"]),
                         ("messages", "claude", 200), line)
        self.assertFalse(line["usage"] and line["usage"].get("total"), line)

    def test_upstream_error_relayed(self):
        body = {"model": "claude", "messages": [{"role": "user", "content": "x"}],
                "mock": {"status": 400}}
        r = self.count(body)
        self.assertEqual(r.status, 400, r)
        e = r.json()
        self.assertEqual(e["type"], "error", e)
        self.assertEqual(e["error"]["type"], "invalid_request_error", e)
        self.assertEqual(len(self.mock.requests(COUNT)), 1)

    def test_chat_on_the_same_instance_goes_to_messages(self):
        r = self.chat()
        self.assertEqual(r.status, 200, r)
        self.assertEqual(len(self.mock.requests(MESSAGES)), 1)
        self.assertEqual(self.mock.requests(COUNT), [])

    def test_spent_token_budgets_do_not_refuse_a_count(self):
        # A completion spends the consumer's token budget and the instance's own (1 each).
        self.assertEqual(self.chat().status, 200)
        r = self.chat()
        self.assertEqual((r.status, r.json()["error"]["code"]), (429, "quota_exceeded"), r)
        self.assertIn("consumer:app:*:total_tokens:1h", r.json()["error"]["message"])
        spent = self.used()
        self.assertGreater(spent["consumer:app:*:total_tokens:1h"], 1, spent)
        self.assertGreater(spent["instance:claude:total_tokens:1h"], 1, spent)
        # A count costs no tokens: passed through to the instance, and estimated on qwen,
        # both are answered, and neither charges anything.
        body = {"model": "claude", "messages": [{"role": "user", "content": "hi"}]}
        r = self.count(body)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(len(self.mock.requests(COUNT)), 1, "passed through")
        r = self.count(dict(body, model="qwen"))
        self.assertEqual(r.status, 200, r)
        self.assertGreater(r.json()["input_tokens"], 0, r)
        self.assertEqual(len(self.mock.requests(COUNT)), 1, "the estimate: no upstream call")
        self.assertEqual(self.used(), spent, "a count charges no tokens")
        # the budget is still spent for completions
        r = self.chat()
        self.assertEqual((r.status, r.json()["error"]["code"]), (429, "quota_exceeded"), r)

    def test_request_rate_still_refuses_a_count(self):
        # rated has no token budget; its chat spends the instance's own (1 token).
        self.assertEqual(self.chat("rated-key").status, 200)
        r = self.chat("rated-key")
        self.assertEqual((r.status, r.json()["error"]["code"]), (429, "quota_exceeded"), r)
        self.assertIn("instance:claude:total_tokens:1h", r.json()["error"]["message"])
        rate = "consumer:rated:*:requests:1h"
        self.assertEqual(self.used()[rate], 1, "the refused chat did not count")
        # Counts are requests: each counts on the request rate, passed through or estimated,
        # the instance's spent token budget notwithstanding ...
        body = {"model": "claude", "messages": [{"role": "user", "content": "hi"}]}
        self.assertEqual(self.count(body, key="rated-key").status, 200)
        self.assertEqual(self.count(dict(body, model="qwen"), key="rated-key").status, 200)
        self.assertEqual(self.used()[rate], 3)
        # ... and the spent rate refuses both, the estimate too, before any upstream call.
        for model in ("claude", "qwen"):
            r = self.count(dict(body, model=model), key="rated-key")
            self.assertEqual((r.status, r.json()["error"]["code"]), (429, "quota_exceeded"),
                             (model, r))
            self.assertIn(rate, r.json()["error"]["message"])
            self.assertTrue(r.header("retry-after"), r)
        self.assertEqual(len(self.mock.requests(COUNT)), 1)
        self.assertEqual(self.used()[rate], 3)


if __name__ == "__main__":
    harness.main()
