"""test_errors.py — the error contract (design.md §9): malformed client input → 400/404/413 in
the OpenAI error shape without reaching the upstream, and the server keeps serving; upstream
refused → 502; upstream timeouts (connect, first_byte, total, hang) → 504 before the first
byte; failures after the stream started → an SSE `error` event and no data: [DONE]."""

import json
import socket
import uuid

import harness
from harness import HTTPConn, http_request, instance, route, stream_request

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GOOD = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "mock": {"tokens": 2}}


def marker():
    return "m-" + uuid.uuid4().hex


class InputErrorTest(harness.SluiceTestCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        self.sluice = self.start_sluice(
            instances=[instance("mock", self.mock.url(CHAT)),
                       instance("mock-completions", self.mock.url(COMPLETIONS))],
            routes=[route("chat", [CHAT], "mock"),
                    route("completions", [COMPLETIONS], "mock-completions")],
            server={"max_body_size": "64KiB"})
        self.port = self.sluice.port
        self.good = 0

    def assert_serving(self):
        """A good request right after a bad one is answered normally."""
        r = http_request(self.port, "POST", CHAT, json_body=GOOD)
        self.assertEqual(r.status, 200, "the server stopped serving after a bad request: %r" % r)
        self.good += 1

    def assert_mock_saw_only_good(self):
        self.assertEqual(self.mock.stats()["requests"], self.good,
                         "a rejected request was forwarded upstream: %r" % self.mock.requests())

    def send_raw(self, method, path, body, content_type="application/json", headers=None):
        with HTTPConn(self.port) as c:
            c.send_request(method, path, headers=headers, body=body, content_type=content_type)
            return c.read_response()

    def test_malformed_json_400(self):
        for body in (b'{"model": "x", "messages": [', b"not json at all", b"{'single': 1}",
                     b'{"model": "x"} trailing', b'{"model": "\xff\xfe"}', b"{", b"   "):
            r = self.send_raw("POST", CHAT, body)
            self.assertOpenAIError(r, 400)
            self.assert_serving()
        self.assert_mock_saw_only_good()

    def test_non_object_json_400(self):
        for body in (b"[1, 2]", b'"a string"', b"42", b"null", b"true", b"[]"):
            r = self.send_raw("POST", CHAT, body)
            self.assertOpenAIError(r, 400)
            self.assert_serving()
        self.assert_mock_saw_only_good()

    def test_empty_body_400(self):
        r = self.send_raw("POST", CHAT, b"")                     # Content-Length: 0
        self.assertOpenAIError(r, 400)
        self.assert_serving()
        with HTTPConn(self.port) as c:                           # no body, no Content-Length
            c.send_request("POST", CHAT, headers={"Content-Type": "application/json"})
            r = c.read_response()
        self.assertOpenAIError(r, 400)
        self.assert_serving()
        self.assert_mock_saw_only_good()

    def test_wrong_content_type_400(self):
        body = json.dumps(GOOD).encode()
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                      "application/jsonx"):
            r = self.send_raw("POST", CHAT, body, content_type=ctype)
            self.assertOpenAIError(r, 400)
            self.assert_serving()
        self.assert_mock_saw_only_good()

    def test_missing_content_type_400(self):
        r = self.send_raw("POST", CHAT, json.dumps(GOOD).encode(), content_type=None)
        self.assertOpenAIError(r, 400)
        self.assert_serving()
        self.assert_mock_saw_only_good()

    def test_json_content_type_with_parameters_accepted(self):
        for ctype in ("application/json; charset=utf-8", "Application/JSON"):
            r = self.send_raw("POST", CHAT, json.dumps(GOOD).encode(), content_type=ctype)
            self.assertEqual(r.status, 200, "%s: %r" % (ctype, r))

    def test_unknown_path_404(self):
        for method, path in (("POST", "/v1/unknown"), ("GET", "/nope"),
                             ("POST", "/v1/chat/completions/extra"), ("POST", "/")):
            if method == "POST":
                r = http_request(self.port, method, path, json_body=GOOD)
            else:
                r = http_request(self.port, method, path)
            self.assertOpenAIError(r, 404)
            self.assert_serving()
        self.assert_mock_saw_only_good()

    def test_query_string_does_not_change_the_route(self):
        r = http_request(self.port, "POST", CHAT + "?api-version=2024-01-01", json_body=GOOD)
        self.assertEqual(r.status, 200, r)

    def test_body_over_limit_413_without_reading_it(self):
        """Content-Length above max_body_size is answered 413 before the body is sent."""
        with HTTPConn(self.port, timeout=harness.DEADLINE) as c:
            c.send_request("POST", CHAT, headers={"Content-Type": "application/json",
                                                  "Content-Length": str(10 * 1024 * 1024)})
            try:
                r = c.read_response()
            except socket.timeout:
                self.fail("no answer to a 10 MiB Content-Length before the body was sent: "
                          "sluice waits for a body it will refuse")
        self.assertOpenAIError(r, 413)
        self.assert_serving()
        self.assert_mock_saw_only_good()

    def test_body_over_limit_413_when_sent(self):
        big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 100000}]})
        with HTTPConn(self.port) as c:
            try:
                c.send_request("POST", CHAT, body=big.encode())
            except (BrokenPipeError, ConnectionResetError):
                pass  # the gateway may answer and close before taking the whole body
            r = c.read_response()
        self.assertOpenAIError(r, 413)
        self.assert_serving()
        self.assert_mock_saw_only_good()

    def test_body_under_limit_accepted(self):
        m = marker()
        r = http_request(self.port, "POST", CHAT, json_body={
            "model": "m", "messages": [{"role": "user", "content": m + "y" * 60000}],
            "mock": {"tokens": 2}})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(len(self.mock.wait_request(m)["body"]) > 60000, True,
                         "the body reached the upstream truncated")


def blackhole():
    """A listening socket whose accept queue is full: SYNs to it are dropped, so a connect
    hangs until the client's connect timeout. Returns (port, [sockets to keep]) or None."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    keep = [lsock]
    for _ in range(4):
        f = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        f.setblocking(False)
        try:
            f.connect(("127.0.0.1", port))
        except (BlockingIOError, OSError):
            pass
        keep.append(f)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(("127.0.0.1", port))
        ok = False
    except socket.timeout:
        ok = True
    except OSError:
        ok = False
    probe.close()
    if not ok:
        for s in keep:
            s.close()
        return None
    return port, keep


class UpstreamErrorTest(harness.SluiceTestCase):
    """Each test starts its own sluice, with at most two failures per instance (so passive
    health, when it lands, does not turn a 502/504 into a 503)."""

    def gateway(self, chat_endpoint, timeouts=None):
        self.mock = self.start_mock()
        self.sluice = self.start_sluice(
            instances=[instance("bad", chat_endpoint, timeouts=timeouts),
                       instance("good", self.mock.url(COMPLETIONS))],
            routes=[route("chat", [CHAT], "bad"), route("completions", [COMPLETIONS], "good")])
        self.port = self.sluice.port

    def assert_still_serving(self):
        r = http_request(self.port, "POST", COMPLETIONS,
                         json_body={"model": "m", "prompt": "p", "mock": {"tokens": 2}})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("x-sluice-instance"), "good")

    def assert_error_stream(self, head, events, min_content):
        self.assertEqual(head.status, 200, head)
        self.assertTrue(events, "no events at all")
        self.assertGreaterEqual(len([e for e in events if e.content()]), min_content, events)
        self.assertFalse(any(e.is_done for e in events),
                         "data: [DONE] after an upstream failure: %r" % events[-3:])
        last = events[-1]
        self.assertTrue(last.is_error, "the stream did not end with an `event: error`: %r"
                        % events[-3:])
        self.assertTrue(harness.is_openai_error(last.data),
                        "error event data is not an OpenAI error object: %r" % last.raw)
        self.assertEqual(sum(1 for e in events if e.is_error), 1, events)

    def test_connection_refused_502(self):
        self.gateway("http://127.0.0.1:%d/v1/chat/completions" % harness.closed_port())
        r = http_request(self.port, "POST", CHAT, json_body=GOOD)
        self.assertOpenAIError(r, 502)
        self.assertEqual(r.header("x-request-id") is not None, True)
        self.assert_still_serving()

    def test_connection_refused_stream_502(self):
        self.gateway("http://127.0.0.1:%d/v1/chat/completions" % harness.closed_port())
        r = http_request(self.port, "POST", CHAT, json_body=dict(GOOD, stream=True))
        self.assertOpenAIError(r, 502)
        self.assert_still_serving()

    def test_first_byte_timeout_504(self):
        self.gateway_with_mock_chat(timeouts={"first_byte": "1s", "total": "60s"})
        r = http_request(self.port, "POST", CHAT, json_body=dict(GOOD, mock={"ttft_ms": 8000}))
        self.assertOpenAIError(r, 504)
        r = http_request(self.port, "POST", CHAT,
                         json_body=dict(GOOD, stream=True, mock={"ttft_ms": 8000}))
        self.assertOpenAIError(r, 504)
        self.assert_still_serving()

    def test_hanging_upstream_504(self):
        self.gateway_with_mock_chat(timeouts={"first_byte": "1s", "total": "60s"})
        r = http_request(self.port, "POST", CHAT,
                         json_body=dict(GOOD, stream=True, mock={"hang": True}))
        self.assertOpenAIError(r, 504)
        self.assert_still_serving()

    def test_total_timeout_504(self):
        self.gateway_with_mock_chat(timeouts={"first_byte": "30s", "total": "2s"})
        r = http_request(self.port, "POST", CHAT, json_body=dict(GOOD, mock={"ttft_ms": 8000}))
        self.assertOpenAIError(r, 504)
        self.assert_still_serving()

    def test_connect_timeout_504(self):
        bh = blackhole()
        if bh is None:
            self.skipTest("cannot make a black-hole listener on this kernel")
        port, keep = bh
        self.addCleanup(lambda: [s.close() for s in keep])
        self.gateway("http://127.0.0.1:%d/v1/chat/completions" % port,
                     timeouts={"connect": "1s", "first_byte": "30s", "total": "60s"})
        r = http_request(self.port, "POST", CHAT, json_body=GOOD)
        self.assertOpenAIError(r, 504)
        self.assert_still_serving()

    def test_idle_timeout_mid_stream_error_event(self):
        self.gateway_with_mock_chat(timeouts={"first_byte": "10s", "idle": "1s", "total": "60s"})
        head, events, complete, rest = stream_request(
            self.port, CHAT, dict(GOOD, stream=True, mock={"tokens": 5, "ttft_ms": 0,
                                                           "itl_ms": 6000}))
        self.assert_error_stream(head, events, 1)
        self.assertEqual(rest.strip(), b"")
        # the upstream transfer was dropped, not left running
        self.chat_mock.wait_stats(lambda s: s["cancelled"] == 1 and s["active"] == 0,
                                  "the mock to see the timed-out transfer dropped", timeout=30)
        self.assert_still_serving()

    def test_upstream_disconnect_mid_stream_error_event(self):
        self.gateway_with_mock_chat()
        head, events, complete, rest = stream_request(
            self.port, CHAT, dict(GOOD, stream=True, mock={"tokens": 10, "itl_ms": 10,
                                                           "disconnect_after": 3}))
        self.assert_error_stream(head, events, 3)
        self.assertEqual(len([e for e in events if e.content()]), 3, events)
        self.assert_still_serving()

    def gateway_with_mock_chat(self, timeouts=None):
        self.chat_mock = self.start_mock(name="chatmock")
        self.gateway(self.chat_mock.url(CHAT), timeouts=timeouts)


if __name__ == "__main__":
    harness.main()
