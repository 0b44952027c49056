"""test_http_framing.py — the client-facing HTTP/1.1 server against hostile and unusual input,
over raw sockets: a NUL or control byte anywhere in the head, RFC 9112 framing (Content-Length
and Transfer-Encoding, obs-fold, bare LF, whitespace before the colon, header-name bytes, Host),
414 / 431 limits, chunked bodies (sizes that would wrap, signs, blanks, endless trailers),
Expect: 100-continue refused before the upload, 204/304 without a body, replies to slow
readers at SIGTERM and at keep-alive expiry, and a client half-close.

Every refusal is checked for its status, the OpenAI error shape, one log line with the client
address and a short reason (never the client's bytes), the connection being closed when the
framing can no longer be trusted, and the daemon serving the next request."""

import json
import os
import re
import signal
import socket
import uuid

import harness
from harness import HTTPConn, http_request, instance, route

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GOOD = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "mock": {"tokens": 2}}
KEY = "k-alice-" + uuid.uuid4().hex
MAX_BODY = 64 * 1024
REQUEST_LINE_MAX = 8 * 1024   # HTTP_MAX_REQUEST_LINE
MAX_HEADERS = 100             # HTTP_MAX_HEADERS


def marker():
    return "m-" + uuid.uuid4().hex


def chunked(*pieces, trailer=b""):
    """A chunked body from byte pieces, sizes in lower-case hex."""
    out = b""
    for p in pieces:
        out += b"%x\r\n" % len(p) + p + b"\r\n"
    return out + b"0\r\n" + trailer + b"\r\n"


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


class FramingTest(harness.SluiceTestCase):
    """One gateway: chat (no auth) and completions (key-auth), max_body_size 64 KiB."""

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        self.port = harness.free_port()
        text = harness.gateway_config(
            self.port,
            instances=[instance("mock", self.mock.url(CHAT)),
                       instance("mock-completions", self.mock.url(COMPLETIONS))],
            routes=[route("chat", [CHAT], "mock"),
                    route("completions", [COMPLETIONS], "mock-completions",
                          auth=harness.Raw("key-auth"))],
            server={"max_body_size": "64KiB"})
        text += "consumers:\n  - name: alice\n    keys:\n      - %s\n" % KEY
        self.sluice = self.start_sluice(text, port=self.port)
        self.good = 0

    # -- helpers -------------------------------------------------------------------------
    def raw(self, data, timeout=harness.DEADLINE):
        """Send raw bytes on a new connection; returns (response, conn) with the conn open."""
        c = HTTPConn(self.port, timeout=timeout)
        self.addCleanup(c.close)
        c.sock.sendall(data)
        return c.read_response(), c

    def assert_closed(self, c):
        """The server closed the connection after its answer (EOF, nothing more)."""
        try:
            rest = c.reader.read_some()
        except socket.timeout:
            self.fail("the connection was kept open after a framing error")
        except ConnectionResetError:
            self.fail("the connection was reset, not closed: the answer could have been lost")
        self.assertEqual(rest, b"", "bytes after the answer: %r" % rest[:200])
        self.assertTrue(c.reader.eof, "the connection was kept open after a framing error")

    def assert_serving(self):
        r = http_request(self.port, "POST", CHAT, json_body=GOOD)
        self.assertEqual(r.status, 200, "the server stopped serving after a bad request: %r" % r)
        self.good += 1

    def assert_refused(self, data, status, reason, forbidden_in_log=None):
        """data is answered `status` in the OpenAI shape, with Connection: close, then EOF; the
        log has exactly one line '<status> from 127.0.0.1: <reason>'; the server still serves
        and nothing reached the upstream."""
        off = self.sluice.log_size()
        r, c = self.raw(data)
        self.assertOpenAIError(r, status)
        self.assertEqual((r.header("connection") or "").lower(), "close", r)
        self.assert_closed(c)
        line = "%d from 127.0.0.1: %s" % (status, reason)
        self.sluice.wait_log(re.escape(line), since=off,
                             message="the log line %r for %r" % (line, data[:120]))
        log = self.sluice.log_since(off)
        self.assertEqual(log.count(line), 1, "logged more than once:\n" + log)
        if forbidden_in_log is not None:
            self.assertNotIn(forbidden_in_log, log, "the client's bytes reached the log")
        self.assert_serving()
        self.assertEqual(self.mock.stats()["requests"], self.good,
                         "a refused request reached the upstream")
        return r

    def post_head(self, path=CHAT, headers=(), host=True, version="HTTP/1.1"):
        h = "POST %s %s\r\n" % (path, version)
        if host:
            h += "Host: 127.0.0.1\r\n"
        h += "Content-Type: application/json\r\n"
        h += "".join("%s: %s\r\n" % kv for kv in headers)
        return h.encode("latin-1") + b"\r\n"

    # -- NUL and control bytes -----------------------------------------------------------
    def test_nul_anywhere_in_the_head_400(self):
        m = marker().encode()
        heads = [
            b"GET /v1/models\x00x HTTP/1.1\r\nHost: a\r\n\r\n",              # the packet
            b"GET\x00 /v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /v1/models HTTP/1.1\x00\r\nHost: a\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-" + m + b": a\x00b\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-\x00" + m + b": ab\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\x00\r\n\r\n",
            b"\x00GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
        ]
        reasons = ["invalid byte in the request target", "malformed method",
                   "unsupported HTTP version", "invalid byte in a header value",
                   "malformed header name", "malformed header name", "malformed method"]
        for data, reason in zip(heads, reasons):
            self.assert_refused(data, 400, reason, forbidden_in_log=m.decode())

    def test_control_bytes_in_the_target_do_not_forge_log_lines(self):
        forged = "FORGED-" + uuid.uuid4().hex
        for data, reason in (
                (("POST /v1/x\n%s HTTP/1.1\r\nHost: a\r\n\r\n" % forged).encode(),
                 "bare LF in the request head"),
                (("POST /v1/x\r%s HTTP/1.1\r\nHost: a\r\n\r\n" % forged).encode(),
                 "invalid byte in the request target"),
                (("POST /v1/\x1b[31m%s HTTP/1.1\r\nHost: a\r\n\r\n" % forged).encode(),
                 "invalid byte in the request target"),
                (("POST /v1/\x7f%s HTTP/1.1\r\nHost: a\r\n\r\n" % forged).encode(),
                 "invalid byte in the request target"),
                (("POST /v1/\xe9%s HTTP/1.1\r\nHost: a\r\n\r\n" % forged).encode("latin-1"),
                 "invalid byte in the request target")):
            self.assert_refused(data, 400, reason, forbidden_in_log=forged)
        # and a target with only visible ASCII still routes (query string included)
        r = http_request(self.port, "POST", CHAT + "?a=b&c=%20d", json_body=GOOD)
        self.assertEqual(r.status, 200, r)
        self.good += 1

    # -- Content-Length and Transfer-Encoding (RFC 9112 §6) ------------------------------
    def test_conflicting_content_length_400(self):
        body = json.dumps(GOOD).encode()
        head = self.post_head(headers=[("Content-Length", "2"), ("Content-Length", str(len(body)))])
        self.assert_refused(head + body, 400, "conflicting content-length values")

    def test_conflicting_content_length_does_not_smuggle(self):
        """The issue's smuggling case: Content-Length 2 then 60, a request hidden in the body.
        One answer (400) and a close, never a second response."""
        hidden = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"
        body = b"{}" + hidden
        head = self.post_head(headers=[("Content-Length", "2"), ("Content-Length", str(len(body)))])
        r = self.assert_refused(head + body, 400, "conflicting content-length values")
        self.assertNotIn(b"HTTP/1.1 200", r.body)

    def test_identical_repeated_content_length_is_folded(self):
        body = json.dumps(GOOD).encode()
        head = self.post_head(headers=[("Content-Length", str(len(body))),
                                       ("Content-Length", str(len(body)))])
        r, c = self.raw(head + body)
        self.assertEqual(r.status, 200, r)
        self.good += 1
        self.assertTrue(c.keeps_alive)

    def test_malformed_content_length_400(self):
        for value in ("+5", "-5", "0x5", "5 5", "5,5", "five", "", "5."):
            head = self.post_head(headers=[("Content-Length", value)])
            self.assert_refused(head + b"{}{}{", 400, "malformed content-length")

    def test_huge_content_length_413_without_overflow(self):
        for value in ("18446744073709551616", "99999999999999999999999999", str(MAX_BODY + 1)):
            head = self.post_head(headers=[("Content-Length", value)])
            r, c = self.raw(head)
            self.assertOpenAIError(r, 413)
            self.assert_closed(c)
        self.assert_serving()

    def test_content_length_with_transfer_encoding_400(self):
        body = chunked(json.dumps(GOOD).encode())
        for hdrs in ([("Content-Length", str(len(body))), ("Transfer-Encoding", "chunked")],
                     [("Transfer-Encoding", "chunked"), ("Content-Length", "5")]):
            self.assert_refused(self.post_head(headers=hdrs) + body, 400,
                                "content-length with transfer-encoding")

    def test_transfer_encoding_other_than_chunked_400(self):
        body = chunked(json.dumps(GOOD).encode())
        for value in ("gzip, chunked", "chunked, chunked", "identity", "gzip", "chunked;q=1",
                      "xchunked", "chunked,"):
            self.assert_refused(self.post_head(headers=[("Transfer-Encoding", value)]) + body,
                                400, "unsupported transfer-encoding")

    def test_repeated_transfer_encoding_400(self):
        body = chunked(json.dumps(GOOD).encode())
        head = self.post_head(headers=[("Transfer-Encoding", "chunked"),
                                       ("Transfer-Encoding", "chunked")])
        self.assert_refused(head + body, 400, "repeated transfer-encoding")

    def test_transfer_encoding_on_http10_400(self):
        body = chunked(json.dumps(GOOD).encode())
        head = self.post_head(headers=[("Transfer-Encoding", "chunked")], version="HTTP/1.0")
        self.assert_refused(head + body, 400, "transfer-encoding in an HTTP/1.0 request")

    # -- field syntax --------------------------------------------------------------------
    def test_obs_fold_400(self):
        for fold in (b" folded", b"\tfolded"):
            data = (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-A: b\r\n" + fold + b"\r\n\r\n")
            self.assert_refused(data, 400, "obsolete line folding in the request head")

    def test_bare_lf_400(self):
        for data in (b"GET /v1/models HTTP/1.1\nHost: a\r\n\r\n",
                     b"GET /v1/models HTTP/1.1\r\nHost: a\n\r\n",
                     b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\n",
                     b"GET /v1/models HTTP/1.1\nHost: a\n\n",
                     b"\nGET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"):
            self.assert_refused(data, 400, "bare LF in the request head")

    def test_bare_cr_400(self):
        self.assert_refused(b"GET /v1/models HTTP/1.1\r\nHost: a\rX-B: c\r\n\r\n", 400,
                            "invalid byte in a header value")

    def test_whitespace_before_colon_400(self):
        for line in (b"Host : a", b"X-A\t: b", b"X-A  : b"):
            data = b"GET /v1/models HTTP/1.1\r\n" + line + b"\r\nHost: a\r\n\r\n"
            self.assert_refused(data, 400, "whitespace before a header colon")

    def test_invalid_header_name_bytes_400(self):
        for line in (b"X(y): 1", b"X\x7fY: 1", b"\xe9t\xe9: 1", b"X/Y: 1", b"X\x01: 1",
                     b"no-colon-at-all", b"X\"Y: 1"):
            data = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n"
            self.assert_refused(data, 400, "malformed header name")
        self.assert_refused(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n: v\r\n\r\n", 400,
                            "empty header name")

    def test_control_byte_in_a_header_value_400(self):
        m = marker()
        for value in (b"a\x1bb", b"a\x7fb", b"a\x01"):
            data = (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-" + m.encode() + b": " + value +
                    b"\r\n\r\n")
            self.assert_refused(data, 400, "invalid byte in a header value", forbidden_in_log=m)
        # tab and obs-text (UTF-8) are valid in a value
        r, c = self.raw("GET /v1/models HTTP/1.1\r\nHost: a\r\nX-A: b\tc \xe9\r\n\r\n"
                        .encode("latin-1"))
        self.assertEqual(r.status, 200, r)

    def test_host(self):
        self.assert_refused(b"GET /v1/models HTTP/1.1\r\nX-A: b\r\n\r\n", 400, "missing host")
        self.assert_refused(b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400,
                            "repeated host")
        r, c = self.raw(b"GET /v1/models HTTP/1.0\r\n\r\n")   # HTTP/1.0 needs none
        self.assertEqual(r.status, 200, r)

    def test_malformed_request_line_400(self):
        for data, reason in ((b"GET  /v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
                              "malformed request target"),
                             (b"GET /v1/models  HTTP/1.1\r\nHost: a\r\n\r\n",
                              "unsupported HTTP version"),
                             (b"GET /v1/models HTTP/2.0\r\nHost: a\r\n\r\n",
                              "unsupported HTTP version"),
                             (b"GET /v1/models HTTP/1.10\r\nHost: a\r\n\r\n",
                              "unsupported HTTP version"),
                             (b"GET http://a/v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
                              "malformed request target"),
                             (b"G(T /v1/models HTTP/1.1\r\nHost: a\r\n\r\n", "malformed method")):
            self.assert_refused(data, 400, reason)

    # -- limits --------------------------------------------------------------------------
    def test_request_line_over_limit_414(self):
        # the request line without its CRLF may be REQUEST_LINE_MAX bytes, not one more
        fixed = len("GET  HTTP/1.1")
        at_limit = "/v1/" + "a" * (REQUEST_LINE_MAX - fixed - 4)
        r, c = self.raw(("GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % at_limit).encode())
        self.assertOpenAIError(r, 404)      # parsed: no route for it
        self.assert_refused(("GET %sa HTTP/1.1\r\nHost: a\r\n\r\n" % at_limit).encode(), 414,
                            "request line too long")

    def test_unended_long_request_line_414_before_it_ends(self):
        """A request line still growing past the limit is refused without waiting for its end
        (nor for max_header_size, nor client_timeout)."""
        off = self.sluice.log_size()
        c = HTTPConn(self.port)
        self.addCleanup(c.close)
        c.sock.sendall(b"GET /" + b"a" * (REQUEST_LINE_MAX + 16))
        r = c.read_response()
        self.assertOpenAIError(r, 414)
        self.assert_closed(c)
        self.sluice.wait_log(re.escape("414 from 127.0.0.1: request line too long"), since=off)
        self.assert_serving()

    def test_more_than_max_headers_431(self):
        def head(n_extra):
            h = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n"
            return h + b"".join(b"X-H%d: v\r\n" % i for i in range(n_extra)) + b"\r\n"
        r, c = self.raw(head(MAX_HEADERS - 1))        # Host + 99 = 100 fields: fine
        self.assertEqual(r.status, 200, r)
        self.assert_refused(head(MAX_HEADERS), 431, "too many header fields")

    def test_head_over_max_header_size_431(self):
        data = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n" + b"X-A: " + b"b" * (70 * 1024) + b"\r\n\r\n"
        self.assert_refused(data, 431, "request head over max_header_size")

    # -- chunked bodies ------------------------------------------------------------------
    def test_chunked_body_accepted(self):
        body = json.dumps(GOOD).encode()
        head = self.post_head(headers=[("Transfer-Encoding", "chunked")])
        for framing in (chunked(body),
                        chunked(body[:5], body[5:]),
                        b"%X;name=value;flag\r\n" % len(body) + body + b"\r\n0\r\n\r\n",
                        b"000%x\r\n" % len(body) + body + b"\r\n000\r\n\r\n",
                        chunked(body, trailer=b"X-Trailer: t\r\nX-Other: u\r\n")):
            r, c = self.raw(head + framing)
            self.assertEqual(r.status, 200, (framing[:60], r))
            self.good += 1
            self.assertTrue(c.keeps_alive)

    def test_chunk_size_that_would_wrap_413(self):
        """The issue's bypass: after a 16-byte chunk, fffffffffffffff0 wrapped the size check
        and max_body_size (64 KiB here) no longer held."""
        head = self.post_head(headers=[("Transfer-Encoding", "chunked")])
        for size in (b"fffffffffffffff0", b"ffffffffffffffff", b"10001"):
            data = head + b"10\r\n" + b"x" * 16 + b"\r\n" + size + b"\r\n" + b"y" * 64
            self.assert_refused(data, 413, "chunked body over max_body_size")

    def test_chunked_total_over_max_413(self):
        head = self.post_head(headers=[("Transfer-Encoding", "chunked")])
        data = head + chunked(*([b"z" * 16384] * 4))[:-5] + b"1\r\n"   # 64 KiB, then one more
        r, c = self.raw(data)
        self.assertOpenAIError(r, 413)
        self.assert_closed(c)
        self.assert_serving()

    def test_chunk_size_syntax_400(self):
        head = self.post_head(headers=[("Transfer-Encoding", "chunked")])
        body = json.dumps(GOOD).encode()
        n = b"%x" % len(body)
        for size, reason in ((b"+" + n, "malformed chunk size"),
                             (b"-" + n, "malformed chunk size"),
                             (b"0x" + n, "malformed chunk size"),
                             (b" " + n, "malformed chunk size"),
                             (n + b" ", "malformed chunk size"),
                             (n + b" ;ext", "malformed chunk size"),
                             (b"", "malformed chunk size"),
                             (b"g", "malformed chunk size"),
                             (b"0" * 16 + n, "chunk size has too many digits"),
                             (n + b";" + b"e" * 2000, "chunk size line too long"),
                             (n + b";a\x01", "invalid byte in a chunk extension")):
            self.assert_refused(head + size + b"\r\n" + body + b"\r\n0\r\n\r\n", 400, reason)
        self.assert_refused(head + n + b"\n" + body + b"\r\n0\r\n\r\n", 400,
                            "chunk size line not ended by CRLF")
        self.assert_refused(head + n + b"\r\n" + body + b"XY0\r\n\r\n", 400,
                            "chunk data not followed by CRLF")

    def test_chunked_trailer_bounded_431(self):
        """0 then an endless trailer line: refused once it passes max_header_size, not read
        until client_timeout."""
        head = self.post_head(headers=[("Transfer-Encoding", "chunked")])
        data = head + chunked(json.dumps(GOOD).encode())[:-2] + b"X-T: " + b"a" * (70 * 1024)
        self.assert_refused(data, 431, "chunked trailer section over max_header_size")

    def test_chunked_trailer_syntax_400(self):
        head = self.post_head(headers=[("Transfer-Encoding", "chunked")])
        body = chunked(json.dumps(GOOD).encode())[:-2]
        for trailer in (b"X-T: a\rb\r\n\r\n", b"X-T: a\n\r\n", b"X-T: a\x00\r\n\r\n",
                        b" folded\r\n\r\n", b"\n"):
            off = self.sluice.log_size()
            r, c = self.raw(head + body + trailer)
            self.assertOpenAIError(r, 400)
            self.assert_closed(c)
            self.sluice.wait_log(r"400 from 127\.0\.0\.1: (bare CR in the|malformed) chunked "
                                 r"trailer section", since=off)
        self.assert_serving()

    # -- Expect: 100-continue ------------------------------------------------------------
    def expect_head(self, path, length, headers=(), method="POST"):
        h = "%s %s HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n" % (method, path)
        h += "Content-Length: %d\r\nExpect: 100-continue\r\n" % length
        h += "".join("%s: %s\r\n" % kv for kv in headers)
        return (h + "\r\n").encode()

    def first_status_line(self, c):
        return c.reader.readline().decode("latin-1").rstrip("\r\n")

    def test_expect_refused_before_the_upload(self):
        """404, 405 and 401 come before 100 Continue: the client never sends its body."""
        size = 10 * 1024   # under max_body_size: only the hook can refuse it
        for path, hdrs, method, status, code in (
                ("/v1/nowhere", (), "POST", 404, "not_found"),
                (CHAT, (), "PUT", 405, "method_not_allowed"),
                (COMPLETIONS, (), "POST", 401, "missing_api_key"),
                (COMPLETIONS, [("Authorization", "Bearer wrong")], "POST", 401,
                 "invalid_api_key")):
            c = HTTPConn(self.port)
            self.addCleanup(c.close)
            c.sock.sendall(self.expect_head(path, size, hdrs, method))
            line = self.first_status_line(c)
            self.assertTrue(line.startswith("HTTP/1.1 %d " % status),
                            "%s %s: the first answer should be %d, got %r"
                            % (method, path, status, line))
            c.reader.buf = (line + "\r\n").encode() + c.reader.buf
            r = c.read_response()
            self.assertOpenAIError(r, status)
            self.assertEqual(r.json()["error"]["code"], code, r)
            self.assertTrue(r.header("x-request-id"), "not answered by the request pipeline")
            self.assertEqual((r.header("connection") or "").lower(), "close", r)
            self.assert_closed(c)
        self.assert_serving()
        self.assertEqual(self.mock.stats()["requests"], self.good)

    def test_expect_accepted_gets_100_then_the_answer(self):
        for path, hdrs in ((CHAT, ()), (COMPLETIONS, [("Authorization", "Bearer " + KEY)])):
            body = json.dumps(dict(GOOD, prompt="p")).encode()
            c = HTTPConn(self.port)
            self.addCleanup(c.close)
            c.sock.sendall(self.expect_head(path, len(body), hdrs))
            self.assertEqual(self.first_status_line(c), "HTTP/1.1 100 Continue")
            self.assertEqual(c.reader.readline(), b"\r\n")
            c.sock.sendall(body)
            r = c.read_response()
            self.assertEqual(r.status, 200, r)
            self.good += 1
            self.assertTrue(c.keeps_alive)
            r = c.request("POST", CHAT, json_body=GOOD)   # the connection is still usable
            self.assertEqual(r.status, 200, r)
            self.good += 1

    def test_without_expect_the_pipeline_still_checks_everything(self):
        body = json.dumps(dict(GOOD, prompt="p")).encode()
        with HTTPConn(self.port) as c:
            r = c.request("POST", COMPLETIONS, body=body)
        self.assertOpenAIError(r, 401)
        with HTTPConn(self.port) as c:
            r = c.request("POST", COMPLETIONS, body=body,
                          headers={"Authorization": "Bearer wrong"})
        self.assertOpenAIError(r, 401)
        with HTTPConn(self.port) as c:
            r = c.request("PUT", CHAT, body=body)
        self.assertOpenAIError(r, 405)
        self.assertEqual(self.mock.stats()["requests"], 0)

    # -- keep-alive and pipelining still work --------------------------------------------
    def test_pipelined_requests_one_write(self):
        body = json.dumps(GOOD).encode()
        one = self.post_head(headers=[("Content-Length", str(len(body)))]) + body
        tri = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"
        c = HTTPConn(self.port)
        self.addCleanup(c.close)
        c.sock.sendall(one + b"\r\n" + tri + one)
        for want in (200, 200, 200):
            r = c.read_response()
            self.assertEqual(r.status, want, r)
        self.good += 2
        self.assertTrue(c.keeps_alive)

    def test_head_trickled_byte_by_byte(self):
        body = json.dumps(GOOD).encode()
        data = self.post_head(headers=[("Content-Length", str(len(body)))]) + body
        c = HTTPConn(self.port)
        self.addCleanup(c.close)
        for i in range(len(data)):
            c.sock.send(data[i:i + 1])
        r = c.read_response()
        self.assertEqual(r.status, 200, r)
        self.good += 1

    # -- half-close ----------------------------------------------------------------------
    def test_half_close_after_a_request_answered_at_once(self):
        """shutdown(SHUT_WR) after GET /v1/models (printf ... | nc -N): the answer, which
        the gateway gives without an upstream, is delivered before the close."""
        for _ in range(5):
            c = HTTPConn(self.port)
            self.addCleanup(c.close)
            c.sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
            c.sock.shutdown(socket.SHUT_WR)
            r = c.read_response()
            self.assertEqual(r.status, 200, r)
            self.assertTrue(r.complete)
            self.assert_closed(c)

    def test_half_close_during_an_upstream_request_is_an_abort(self):
        """The documented choice (docs/architecture.md §3a): a client that half-closes while
        its request waits on the upstream is indistinguishable from one that is gone, so the
        upstream transfer is cancelled at once."""
        c = HTTPConn(self.port)
        self.addCleanup(c.close)
        c.send_request("POST", CHAT, json_body=dict(GOOD, mock={"tokens": 2, "ttft_ms": 60000}))
        self.mock.wait_stats(lambda s: s["requests"] == 1 and s["active"] == 1,
                             "the request to reach the mock")
        c.sock.shutdown(socket.SHUT_WR)
        self.mock.wait_stats(lambda s: s["cancelled"] == 1 and s["active"] == 0,
                             "the upstream transfer to be cancelled", timeout=15)
        self.good += 1
        self.assert_closed(c)
        self.assert_serving()


class ReplyTest(harness.SluiceTestCase):
    """Replies passed through from an upstream that the mock cannot produce."""

    def test_204_and_304_have_no_content_length_nor_body(self):
        import sched_support
        for status in (204, 304):
            up = sched_support.FixedUpstream(status, headers=[("X-Up", "1")], body=b"")
            self.addCleanup(up.close)
            port = harness.free_port()
            s = self.start_sluice(harness.gateway_config(
                port, instances=[instance("fixed", up.url(CHAT))],
                routes=[route("chat", [CHAT], "fixed")]), port=port,
                name="sluice%d" % status)
            with HTTPConn(port) as c:
                c.send_request("POST", CHAT, json_body=GOOD)
                head = c.read_head()
                self.assertEqual(head.status, status, head)
                self.assertIsNone(head.header("content-length"), head)
                self.assertIsNone(head.header("transfer-encoding"), head)
                self.assertEqual(head.header("x-up"), "1", head)
                c.read_body()
                # nothing stray follows: the next answer on the connection is whole
                r = c.request("GET", "/v1/models")
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.json()["object"], "list")
            s.stop_and_check()


    def test_keepalive_timeout_zero_says_close(self):
        """keepalive_timeout: 0 closes after each response, and the response says so."""
        mock = self.start_mock()
        port = harness.free_port()
        self.start_sluice(harness.gateway_config(
            port, instances=[instance("mock", mock.url(CHAT))],
            routes=[route("chat", [CHAT], "mock")], server={"keepalive_timeout": "0"}),
            port=port)
        with HTTPConn(port) as c:
            r = c.request("POST", CHAT, json_body=GOOD)
            self.assertEqual(r.status, 200, r)
            self.assertEqual((r.header("connection") or "").lower(), "close", r)
            self.assertEqual(c.reader.read_some(), b"")
            self.assertTrue(c.reader.eof)


class SlowReaderTest(harness.SluiceTestCase):
    """A finished reply still queued for a slow reader is delivered whole when the
    connection is closed under it: at SIGTERM (drain) and at keep-alive expiry."""

    TOKENS = 2500000   # about 16 MB of JSON: more than the kernel buffers on both sides

    def start(self, **server):
        self.mock = self.start_mock()
        self.port = harness.free_port()
        self.access_log = os.path.join(self.workdir, "access.log")
        text = harness.gateway_config(
            self.port, instances=[instance("mock", self.mock.url(CHAT))],
            routes=[route("chat", [CHAT], "mock")],
            server=dict({"max_body_size": "1MiB", "drain_timeout": "120s"}, **server))
        text = text.replace("access_log: off", "access_log: %s" % self.access_log)
        self.sluice = self.start_sluice(text, port=self.port)

    def queue_big_reply(self):
        """Ask for a big reply on a connection with a tiny receive buffer and read nothing
        until sluice has finished the request (its access-log line): the reply then sits
        queued in sluice. Returns the connection."""
        c = HTTPConn(self.port, rcvbuf=4096, timeout=120)
        self.addCleanup(c.close)
        m = marker()
        c.send_request("POST", CHAT, json_body={
            "model": "m", "messages": [{"role": "user", "content": m}],
            "mock": {"tokens": self.TOKENS}})
        self.mock.wait_request(m)

        def logged():
            try:
                with open(self.access_log) as f:
                    return any(json.loads(l).get("path") == CHAT for l in f if l.strip())
            except (OSError, ValueError):
                return False
        harness.wait_until(logged, 90, "sluice to finish the request (its access-log line)")
        return c

    def read_whole(self, c):
        r = c.read_response()
        self.assertEqual(r.status, 200, r.status)
        self.assertTrue(r.complete, "the reply was cut: %d of %s bytes"
                        % (len(r.body), r.header("content-length")))
        self.assertEqual(len(r.body), int(r.header("content-length")))
        self.assertEqual(len(r.json()["choices"][0]["message"]["content"].split()), self.TOKENS)
        harness.note("reply of %.1f MB delivered whole" % (len(r.body) / 1e6))
        return r

    def test_sigterm_delivers_a_queued_reply_to_a_slow_reader(self):
        self.start()
        c = self.queue_big_reply()
        self.sluice.terminate()
        harness.wait_until(lambda: connect_refused(self.port), harness.DEADLINE,
                           "new connections to be refused after SIGTERM (the drain ran)")
        self.sluice.wait_log(r"drain: closing 127\.0\.0\.1 once \d+ queued bytes are sent")
        self.assertTrue(self.sluice.alive(), "sluice exited with a reply still queued")
        self.read_whole(c)
        self.assert_closed_after(c)
        rc = self.sluice.wait_exit()
        self.assertEqual(rc, 0, "sluice exit status after draining: %r" % rc)

    def test_keepalive_expiry_delivers_a_queued_reply(self):
        self.start(keepalive_timeout="1s")
        c = self.queue_big_reply()
        self.sluice.wait_log(r"keep-alive timeout for 127\.0\.0\.1: closing once \d+ queued "
                             r"bytes are sent")
        self.read_whole(c)
        self.assert_closed_after(c)
        r = http_request(self.port, "GET", "/v1/models")
        self.assertEqual(r.status, 200, r)

    def test_half_close_after_the_reply_finished_delivers_it(self):
        """A client that shuts its side once its last request is answered (but not yet read)
        still gets the whole reply."""
        self.start()
        c = self.queue_big_reply()
        c.sock.shutdown(socket.SHUT_WR)
        r = http_request(self.port, "GET", "/v1/models")   # sluice has seen the EOF by now,
        self.assertEqual(r.status, 200, r)                 # or soon: read slowly either way
        self.read_whole(c)
        self.assert_closed_after(c)

    def assert_closed_after(self, c):
        rest = c.reader.read_some()
        self.assertEqual(rest, b"", "bytes after the reply: %r" % rest[:100])


if __name__ == "__main__":
    harness.main()
