"""faulty_upstream.py — a raw-socket upstream that misbehaves at the byte level, for the
fault-injection tests (test_faults_*.py): what sluice-mockllm, a well-behaved HTTP server,
cannot produce. Python 3 standard library only.

One FaultyUpstream listens on 127.0.0.1 (a free port unless given), answers every
connection on its own thread according to its current `mode`, and keeps count of what
happened, so a test can tell what sluice did to the upstream side (read the request? closed
the connection? how many bytes did it take before giving up?). Modes:

  ok                  a valid answer: JSON for a non-stream request, an SSE stream ending in
                      data: [DONE] for a stream (a baseline, and the "good" events of others)
  refuse              nothing listens: the port is bound, then closed (connect gets RST)
  reset               answer a valid head and `events` SSE events (non-stream: part of the
                      body), then close with SO_LINGER 0: the peer gets a TCP RST
  hang_after_headers  a 200 head, then nothing until the peer leaves
  garbage             bytes that are not HTTP at all, then close
  garbage_on_reuse    the first request on a connection gets a valid non-stream answer and
                      the connection is kept open; the next one on it gets `garbage`
  not_sse             200 text/event-stream whose body is an HTML error page with blank
                      lines in it (no `data:` field anywhere), then the stream ends cleanly
  huge_event          200 text/event-stream, `events` valid events, then one `data:` event of
                      `huge_bytes` (10 MiB by default), then data: [DONE]
  endless_headers     a status line, then header lines forever until the peer leaves
  slow                nothing for `delay` seconds (or until the peer leaves), then `ok`
  close_on_accept     close right after accept(), before reading anything
  multiline           a valid stream whose events' JSON is pretty-printed over several
                      `data:` lines (SSE joins them with newlines), the text of the two
                      content events "card 41111111" and "11111111 ok"

The request is read (head and Content-Length body) before any mode but close_on_accept acts,
so `requests` counts what sluice sent. Every wait on the peer is bounded by a deadline
(`hold_max` seconds), so a test whose sluice never gives up still ends.

Run by hand: python3 faulty_upstream.py MODE [PORT]  (prints `listening on 127.0.0.1:PORT`).
"""

import json
import select
import socket
import struct
import sys
import threading
import time

MODES = ("ok", "refuse", "reset", "hang_after_headers", "garbage", "garbage_on_reuse",
         "not_sse", "huge_event", "endless_headers", "slow", "close_on_accept")

GARBAGE = (b"\x00\xff\xfeSSH-2.0-OpenSSH_9.2p1 not-http\r\n\x1b[31m\x00\x01\x02"
           b"\r\n\r\n{\"choices\": nope}\r\n")
NOT_SSE_BODY = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n\r\n"
                b"<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n\r\n"
                b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n\r\n")


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_event(i, model="faulty"):
    obj = {"id": "chatcmpl-faulty", "object": "chat.completion.chunk", "created": 0,
           "model": model, "choices": [{"index": 0, "delta": {"content": " tok%d" % i},
                                        "finish_reason": None}]}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def completion_body(model="faulty"):
    return json.dumps({
        "id": "chatcmpl-faulty", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "faulty ok"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
        separators=(",", ":")).encode()


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")


class FaultyUpstream:
    def __init__(self, mode="ok", port=0, events=2, huge_bytes=10 * 1024 * 1024, delay=10.0,
                 hold_max=120.0):
        if mode not in MODES:
            raise ValueError("unknown mode %r" % mode)
        self.mode = mode
        self.events = events          # valid SSE events before the fault (reset, huge_event)
        self.huge_bytes = huge_bytes  # huge_event: size of the one big data line
        self.delay = delay            # slow: seconds before the answer
        self.hold_max = hold_max      # upper bound on any wait for the peer
        self.lock = threading.Lock()
        self.accepted = 0             # connections accepted
        self.requests = 0             # request heads read
        self.open = 0                 # connections not yet closed by us
        self.peer_closed = 0          # connections the peer (sluice) closed while we waited
        self.bytes_sent = 0
        self.stopped = False
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", port))
        self.lsock.listen(128)
        self.port = self.lsock.getsockname()[1]
        if mode == "refuse":
            self.close()
            return
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def url(self, path="/v1/chat/completions"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def counts(self):
        with self.lock:
            return {"accepted": self.accepted, "requests": self.requests, "open": self.open,
                    "peer_closed": self.peer_closed, "bytes_sent": self.bytes_sent}

    def close(self):
        self.stopped = True
        try:
            self.lsock.close()
        except OSError:
            pass

    # -- plumbing ----------------------------------------------------------------------
    def _accept_loop(self):
        while not self.stopped:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.open += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _add_sent(self, n):
        with self.lock:
            self.bytes_sent += n

    def _send(self, c, data):
        c.sendall(data)
        self._add_sent(len(data))

    def _read_request(self, c):
        """(head bytes, body bytes) or None when the peer closed first."""
        c.settimeout(self.hold_max)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = c.recv(65536)
            if not data:
                return None
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            data = c.recv(65536)
            if not data:
                return None
            rest += data
        with self.lock:
            self.requests += 1
        return head, rest[:length]

    def _wait_peer_gone(self, c, seconds):
        """Wait until the peer closes (True) or `seconds` pass (False), discarding input."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([c], [], [], min(left, 1.0))
            if r:
                try:
                    data = c.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    with self.lock:
                        self.peer_closed += 1
                    return True

    def _serve(self, c):
        mode = self.mode
        try:
            if mode == "close_on_accept":
                return
            req = self._read_request(c)
            if req is None:
                return
            head, body = req
            try:
                stream = bool(json.loads(body.decode("utf-8")).get("stream"))
            except (ValueError, AttributeError, UnicodeDecodeError):
                stream = False
            getattr(self, "_mode_" + mode)(c, stream)
        except OSError:
            pass  # the peer left while we were writing: that is what most modes provoke
        finally:
            try:
                c.close()
            except OSError:
                pass
            with self.lock:
                self.open -= 1

    # -- modes -------------------------------------------------------------------------
    def _mode_ok(self, c, stream):
        if stream:
            self._send(c, SSE_HEAD)
            for i in range(3):
                self._send(c, chunk(sse_event(i)))
            self._send(c, chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        else:
            body = completion_body()
            self._send(c, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    def _mode_multiline(self, c, stream):
        self._send(c, SSE_HEAD)
        for text in ("card 41111111", "11111111 ok"):
            obj = {"id": "chatcmpl-faulty", "object": "chat.completion.chunk", "created": 0,
                   "model": "faulty", "choices": [{"index": 0, "delta": {"content": text},
                                                   "finish_reason": None}]}
            lines = json.dumps(obj, indent=1).encode().split(b"\n")
            self._send(c, chunk(b"".join(b"data: " + l + b"\n" for l in lines) + b"\n"))
        self._send(c, chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    def _mode_reset(self, c, stream):
        if stream:
            self._send(c, SSE_HEAD)
            for i in range(self.events):
                self._send(c, chunk(sse_event(i)))
        else:
            body = completion_body()
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
            self._send(c, head + body[:len(body) // 2])
        # Let sluice read what was sent before the RST discards it.
        time.sleep(0.2)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _mode_hang_after_headers(self, c, stream):
        if stream:
            self._send(c, SSE_HEAD)
        else:
            self._send(c, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\nConnection: close\r\n\r\n")
        self._wait_peer_gone(c, self.hold_max)

    def _mode_garbage(self, c, stream):
        self._send(c, GARBAGE)

    def _mode_garbage_on_reuse(self, c, stream):
        body = completion_body()
        self._send(c, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
        if self._read_request(c) is not None:
            self._send(c, GARBAGE)

    def _mode_not_sse(self, c, stream):
        self._send(c, SSE_HEAD + chunk(NOT_SSE_BODY) + b"0\r\n\r\n")
        self._wait_peer_gone(c, 5)

    def _mode_huge_event(self, c, stream):
        self._send(c, SSE_HEAD)
        for i in range(self.events):
            self._send(c, chunk(sse_event(i)))
        piece = b"x" * 65536
        self._send(c, b"%x\r\ndata: " % (self.huge_bytes + 8))
        left = self.huge_bytes
        while left > 0:
            n = min(left, len(piece))
            self._send(c, piece[:n])
            left -= n
        self._send(c, b"\n\n\r\n" + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self._wait_peer_gone(c, 5)

    def _mode_endless_headers(self, c, stream):
        self._send(c, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        line = b"X-Filler-%08d: " + b"a" * 1000 + b"\r\n"
        deadline = time.monotonic() + self.hold_max
        i = 0
        c.settimeout(self.hold_max)
        while time.monotonic() < deadline:
            batch = b"".join(line % (i + k) for k in range(64))
            i += 64
            self._send(c, batch)

    def _mode_slow(self, c, stream):
        if self._wait_peer_gone(c, self.delay):
            return
        self._mode_ok(c, stream)


MODES += ("multiline",)  # the response policies' test (test_policies.py)


def main(argv):
    mode = argv[1] if len(argv) > 1 else "ok"
    port = int(argv[2]) if len(argv) > 2 else 0
    up = FaultyUpstream(mode, port=port)
    print("listening on 127.0.0.1:%d" % up.port, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        up.close()


if __name__ == "__main__":
    main(sys.argv)
