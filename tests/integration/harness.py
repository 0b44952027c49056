"""harness.py — shared machinery for Sluice's integration tests.

Every test_*.py in this directory is one ctest test. It starts the real `sluice` daemon and
the real `sluice-mockllm` over loopback, talks raw HTTP/1.1 to them, and checks what came
back and what the mock received. Python 3 standard library only.

What lives here:
  * paths and environment (SLUICE_BIN, MOCKLLM_BIN, SLUICE_SOURCE_DIR);
  * wait_until(): every wait in the suite is a poll with a deadline and a clear message;
  * HTTPConn: a small raw-socket HTTP/1.1 client that can read a response incrementally
    (chunked or Content-Length or until EOF) and split an SSE body into events as they
    arrive, keeping each event's exact bytes;
  * Mock: one sluice-mockllm process and its introspection endpoints (/_mock/requests,
    /_mock/stats);
  * Sluice: one sluice daemon with a generated YAML config; reload (SIGHUP), stop (SIGTERM),
    and the teardown checks (exit code 0, no sanitizer report in stderr);
  * Tap: a recording TCP relay to put between sluice and the mock when a test must see the
    exact bytes the upstream sent (byte-identical streams, pass-through bodies) or count
    how much of a stream sluice has pulled from the upstream (back-pressure);
  * to_yaml()/gateway_config(): config generation;
  * SluiceTestCase: per-test temp directory, process cleanup, log tails on failure;
  * main(): run the module's tests and exit non-zero on failure.
"""

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

# ---------------------------------------------------------------------------------------
# Paths and environment
# ---------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.environ.get("SLUICE_SOURCE_DIR") or os.path.dirname(os.path.dirname(HERE))

# Generous by design: the suite runs on a shared 2-core machine and under ASan.
# Under sanitizers (scripts/test.sh sets SLUICE_SANITIZED=1) everything is slower still.
_SLOW = os.environ.get("SLUICE_SANITIZED") == "1"
DEADLINE = float(os.environ.get("SLUICE_TEST_DEADLINE", "30" if _SLOW else "20"))
START_DEADLINE = float(os.environ.get("SLUICE_TEST_START_DEADLINE", "30"))

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer",
                     "ERROR: ThreadSanitizer", "WARNING: ThreadSanitizer")


def _find_binary(env_name, name):
    path = os.environ.get(env_name)
    if path:
        return path
    for build in ("build", "build-integ", "build-asan", "build-debug"):
        cand = os.path.join(SOURCE_DIR, build, name)
        if os.access(cand, os.X_OK):
            return cand
    return os.path.join(SOURCE_DIR, "build", name)


def sluice_bin():
    return _find_binary("SLUICE_BIN", "sluice")


def mockllm_bin():
    return _find_binary("MOCKLLM_BIN", "sluice-mockllm")


def sanitizer_env():
    """Environment for child processes. Under ASan the quarantine would otherwise hold up to
    256 MiB of freed memory and make RSS-based checks meaningless; leaks must still be
    reported at exit. Harmless for binaries built without sanitizers."""
    env = dict(os.environ)
    asan = env.get("ASAN_OPTIONS", "")
    extra = "quarantine_size_mb=8:detect_leaks=1:abort_on_error=0"
    env["ASAN_OPTIONS"] = (asan + ":" + extra) if asan else extra
    ubsan = env.get("UBSAN_OPTIONS", "")
    env["UBSAN_OPTIONS"] = (ubsan + ":print_stacktrace=1") if ubsan else "print_stacktrace=1"
    return env


# ---------------------------------------------------------------------------------------
# Waiting
# ---------------------------------------------------------------------------------------

class WaitTimeout(AssertionError):
    pass


def wait_until(predicate, timeout=DEADLINE, message="condition", interval=0.02):
    """Poll predicate() until it returns a truthy value; return that value. Fail the test
    with `message` (a string or a callable giving one) when the deadline passes. Exceptions
    other than AssertionError raised by predicate count as "not yet"."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - "not ready yet"
            last_exc = exc
        if time.monotonic() >= deadline:
            msg = message() if callable(message) else message
            if last_exc is not None:
                msg += " (last error: %r)" % (last_exc,)
            raise WaitTimeout("timed out after %.0fs waiting for %s" % (timeout, msg))
        time.sleep(interval)


def note(msg):
    """Diagnostic figures (what a test measured), printed with the test's output."""
    sys.stdout.write("\n    # %s " % msg)
    sys.stdout.flush()


def free_port():
    """A port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port():
    """A port with nothing listening on it: connecting is refused."""
    return free_port()


def file_tail(path, lines=80):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return "<cannot read %s: %s>" % (path, exc)
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:])


def read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def vm_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


# ---------------------------------------------------------------------------------------
# HTTP/1.1 client on raw sockets
# ---------------------------------------------------------------------------------------

class ConnectionClosed(Exception):
    """The peer closed the connection before a complete response arrived."""


class Response:
    def __init__(self, status, reason, headers, body=b"", complete=True):
        self.status = status
        self.reason = reason
        self.header_list = headers          # [(name, value)] as received
        self.headers = {}                   # lower-case name -> value (last wins)
        for k, v in headers:
            self.headers[k.lower()] = v
        self.body = body
        self.complete = complete            # False: body ended by EOF before its framing said

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        body = self.body[:400]
        return "<Response %d %r headers=%r body=%r%s>" % (
            self.status, self.reason, self.headers, body, "..." if len(self.body) > 400 else "")


class SSEEvent:
    """One server-sent event with its exact bytes (terminating blank line included)."""

    def __init__(self, raw):
        self.raw = raw
        self.event = None
        data = []
        text = raw.decode("utf-8", "replace")
        for line in re.split(r"\r\n|\r|\n", text):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "event":
                self.event = value
            elif name == "data":
                data.append(value)
        self.data = "\n".join(data) if data else None

    def json(self):
        return json.loads(self.data)

    @property
    def is_done(self):
        return self.event is None and self.data == "[DONE]"

    @property
    def is_error(self):
        return self.event == "error"

    def content(self):
        """The text delta of a chat/completions chunk, or None."""
        if self.data is None or self.data == "[DONE]" or self.event is not None:
            return None
        try:
            obj = json.loads(self.data)
        except ValueError:
            return None
        choices = obj.get("choices") or []
        if not choices:
            return None
        c = choices[0]
        if "delta" in c:
            return (c.get("delta") or {}).get("content")
        return c.get("text")

    def is_usage_only(self):
        """OpenAI's extra chunk for stream_options.include_usage: usage set, no choices."""
        if self.data is None or self.data == "[DONE]" or self.event is not None:
            return False
        try:
            obj = json.loads(self.data)
        except ValueError:
            return False
        return isinstance(obj, dict) and obj.get("usage") is not None and not obj.get("choices")

    def __repr__(self):
        return "<SSEEvent %r>" % (self.raw[:200],)


_SSE_SEP = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def split_sse(buf):
    """Split complete events off the front of buf. Returns ([raw event bytes], rest)."""
    events = []
    pos = 0
    while True:
        m = _SSE_SEP.search(buf, pos)
        if not m:
            break
        events.append(buf[pos:m.end()])
        pos = m.end()
    return events, buf[pos:]


def parse_sse(body):
    events, rest = split_sse(body)
    out = [SSEEvent(e) for e in events]
    if rest.strip():
        out.append(SSEEvent(rest))  # an unterminated trailing event, kept for diagnosis
    return out


class _Reader:
    """Buffered reads over a recv(n) function; recv returning b"" means EOF."""

    def __init__(self, recv):
        self._recv = recv
        self.buf = b""
        self.eof = False

    def fill(self):
        if self.eof:
            return False
        data = self._recv(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def readline(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
                return line
            if not self.fill():
                raise ConnectionClosed("EOF while reading a line (have %r)" % (self.buf[:200],))

    def read_exact(self, n):
        while len(self.buf) < n:
            if not self.fill():
                raise ConnectionClosed("EOF after %d of %d bytes" % (len(self.buf), n))
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_some(self):
        """Whatever is buffered, else one recv; b"" at EOF."""
        if not self.buf:
            self.fill()
        data, self.buf = self.buf, b""
        return data


def _read_head(reader, is_request=False):
    line = reader.readline()
    while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between messages
        line = reader.readline()
    start = line.decode("latin-1").rstrip("\r\n")
    headers = []
    while True:
        h = reader.readline().decode("latin-1").rstrip("\r\n")
        if not h:
            break
        name, _, value = h.partition(":")
        headers.append((name.strip(), value.strip()))
    return start, headers


def _body_chunks(reader, headers, no_body=False, state=None):
    """Yield the decoded body of one message as it arrives. state['complete'] tells whether
    the framing's end was reached (False when EOF cut it short)."""
    state = state if state is not None else {}
    state["complete"] = False
    hmap = {k.lower(): v for k, v in headers}
    if no_body:
        state["complete"] = True
        return
    te = hmap.get("transfer-encoding", "").lower()
    if "chunked" in te:
        while True:
            try:
                size_line = reader.readline()
            except ConnectionClosed:
                return
            size_text = size_line.split(b";")[0].strip()
            if not size_text:
                continue
            size = int(size_text, 16)
            if size == 0:
                # trailers until the blank line
                while True:
                    try:
                        t = reader.readline()
                    except ConnectionClosed:
                        state["complete"] = True
                        return
                    if t in (b"\r\n", b"\n"):
                        break
                state["complete"] = True
                return
            remaining = size
            while remaining:
                if not reader.buf and not reader.fill():
                    return
                piece = reader.buf[:remaining]
                reader.buf = reader.buf[len(piece):]
                remaining -= len(piece)
                yield piece
            try:
                reader.read_exact(2)  # CRLF after the chunk
            except ConnectionClosed:
                return
    elif "content-length" in hmap:
        remaining = int(hmap["content-length"])
        while remaining:
            if not reader.buf and not reader.fill():
                return
            piece = reader.buf[:remaining]
            reader.buf = reader.buf[len(piece):]
            remaining -= len(piece)
            yield piece
        state["complete"] = True
    else:
        while True:
            data = reader.read_some()
            if not data:
                state["complete"] = True  # read-until-close framing
                return
            yield data


class HTTPConn:
    """One client connection. Usage:
        c = HTTPConn(port); r = c.request("POST", "/v1/chat/completions", json_body={...})
        c.send_request(...); head = c.read_head(); for ev in c.iter_events(): ...
    """

    def __init__(self, port, host="127.0.0.1", timeout=DEADLINE, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = port
        self.reader = _Reader(self.sock.recv)
        self.head = None
        self.body_state = {}
        self._method = None
        self.closed = False

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_request(self, method, path, headers=None, body=None, json_body=None,
                     content_type="application/json", host=None):
        if json_body is not None:
            body = json.dumps(json_body).encode()
        if isinstance(body, str):
            body = body.encode()
        hdrs = [("Host", host or "127.0.0.1:%d" % self.port)]
        names = set()
        for k, v in (headers.items() if isinstance(headers, dict) else (headers or [])):
            hdrs.append((k, v))
            names.add(k.lower())
        if body is not None:
            if "content-type" not in names and content_type is not None:
                hdrs.append(("Content-Type", content_type))
            if "content-length" not in names and "transfer-encoding" not in names:
                hdrs.append(("Content-Length", str(len(body))))
        raw = "%s %s HTTP/1.1\r\n" % (method, path)
        raw += "".join("%s: %s\r\n" % (k, v) for k, v in hdrs) + "\r\n"
        self._method = method
        self.sock.sendall(raw.encode("latin-1") + (body or b""))

    def read_head(self):
        start, headers = _read_head(self.reader)
        parts = start.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise AssertionError("not an HTTP status line: %r" % start)
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        if 100 <= status < 200 and status != 101:
            return self.read_head()
        self.head = Response(status, reason, headers)
        self.head.version = parts[0]
        return self.head

    def iter_body(self):
        """Yield body bytes as they arrive for the response whose head was just read."""
        no_body = self._method == "HEAD" or self.head.status in (204, 304)
        self.body_state = {}
        return _body_chunks(self.reader, self.head.header_list, no_body, self.body_state)

    def read_body(self):
        body = b"".join(self.iter_body())
        self.head.body = body
        self.head.complete = self.body_state.get("complete", False)
        return self.head

    def read_response(self):
        self.read_head()
        return self.read_body()

    def request(self, method, path, headers=None, body=None, json_body=None,
                content_type="application/json"):
        self.send_request(method, path, headers, body, json_body, content_type)
        return self.read_response()

    def iter_events(self):
        """Yield SSEEvent objects as complete events arrive. After the loop,
        self.body_state['complete'] tells whether the body ended cleanly and
        self.sse_rest holds any unterminated trailing bytes."""
        buf = b""
        self.sse_rest = b""
        for piece in self.iter_body():
            buf += piece
            events, buf = split_sse(buf)
            for raw in events:
                yield SSEEvent(raw)
        self.sse_rest = buf

    @property
    def keeps_alive(self):
        """Whether the last response allows another request on this connection."""
        conn = (self.head.header("connection") or "").lower()
        if "close" in conn:
            return False
        return getattr(self.head, "version", "HTTP/1.1") == "HTTP/1.1"


def http_request(port, method, path, headers=None, body=None, json_body=None,
                 content_type="application/json", timeout=DEADLINE):
    """One request on a fresh connection."""
    with HTTPConn(port, timeout=timeout) as c:
        return c.request(method, path, headers, body, json_body, content_type)


def stream_request(port, path, json_body, headers=None, timeout=DEADLINE):
    """Send a streaming request on a fresh connection and read it to the end.
    Returns (response head, [SSEEvent], complete, rest)."""
    with HTTPConn(port, timeout=timeout) as c:
        c.send_request("POST", path, headers, json_body=json_body)
        head = c.read_head()
        if head.status != 200:
            c.read_body()
            return head, [], c.body_state.get("complete", False), head.body
        events = list(c.iter_events())
        return head, events, c.body_state.get("complete", False), c.sse_rest


def is_openai_error(resp):
    """The gateway's error shape: {"error": {"message": str, "type": str, "code": ...}}."""
    try:
        obj = resp.json() if isinstance(resp, Response) else json.loads(resp)
    except (ValueError, UnicodeDecodeError):
        return False
    err = obj.get("error") if isinstance(obj, dict) else None
    return (isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"] != ""
            and isinstance(err.get("type"), str) and "code" in err)


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------

_LIVE = []  # every started Popen, killed at exit whatever happens


def _kill_all():
    for p in _LIVE:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(5)
            except Exception:  # noqa: BLE001
                pass


atexit.register(_kill_all)


def _spawn(argv, stdout_path, stderr_path, env=None):
    out = open(stdout_path, "wb")
    err = out if stderr_path == stdout_path else open(stderr_path, "wb")
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             env=env or sanitizer_env(), close_fds=True)
    finally:
        out.close()
        if err is not out:
            err.close()
    _LIVE.append(p)
    return p


def sanitizer_report(text):
    for marker in SANITIZER_MARKERS:
        i = text.find(marker)
        if i >= 0:
            start = text.rfind("\n", 0, max(0, i - 200)) + 1
            return text[start:start + 3000]
    return None


class Mock:
    """One sluice-mockllm process."""

    def __init__(self, workdir, args=(), name="mock"):
        self.name = name
        self.stdout_path = os.path.join(workdir, name + ".stdout.log")
        self.stderr_path = os.path.join(workdir, name + ".stderr.log")
        self.argv = [mockllm_bin(), "--listen", "127.0.0.1:0"] + [str(a) for a in args]
        if not os.access(self.argv[0], os.X_OK):
            raise AssertionError("mock binary not found or not executable: %s "
                                 "(set MOCKLLM_BIN)" % self.argv[0])
        self.proc = _spawn(self.argv, self.stdout_path, self.stderr_path)
        self.port = None

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError("sluice-mockllm exited with %s before listening:\n%s\n%s" % (
                    self.proc.returncode, file_tail(self.stdout_path), file_tail(self.stderr_path)))
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", read_text(self.stdout_path))
            return m and int(m.group(1))

        self.port = wait_until(listening, START_DEADLINE,
                               "sluice-mockllm to print 'listening on 127.0.0.1:PORT' on stdout")

    def url(self, path="/v1/chat/completions"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    # -- introspection -------------------------------------------------------------------
    def requests(self, path=None):
        r = http_request(self.port, "GET", "/_mock/requests")
        if r.status != 200:
            raise AssertionError("GET /_mock/requests -> %r" % r)
        reqs = r.json()
        if path is not None:
            reqs = [q for q in reqs if q.get("path") == path]
        return reqs

    def clear(self):
        r = http_request(self.port, "DELETE", "/_mock/requests")
        if r.status not in (200, 204):
            raise AssertionError("DELETE /_mock/requests -> %r" % r)

    def stats(self):
        r = http_request(self.port, "GET", "/_mock/stats")
        if r.status != 200:
            raise AssertionError("GET /_mock/stats -> %r" % r)
        return r.json()

    def wait_stats(self, predicate, message, timeout=DEADLINE):
        last = {}

        def check():
            last["s"] = self.stats()
            return predicate(last["s"])

        wait_until(check, timeout, lambda: "%s (mock stats: %s)" % (message, last.get("s")))
        return last["s"]

    def find_request(self, marker, path=None):
        """The recorded request whose body contains marker (a unique string)."""
        for q in self.requests(path):
            if marker in (q.get("body") or ""):
                return q
        return None

    def wait_request(self, marker, path=None, timeout=DEADLINE):
        return wait_until(lambda: self.find_request(marker, path), timeout,
                          "the mock to record a request containing %r" % marker)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def check_sanitizers(self):
        rep = sanitizer_report(read_text(self.stderr_path) + read_text(self.stdout_path))
        if rep:
            raise AssertionError("sanitizer report in %s output:\n%s" % (self.name, rep))


class Sluice:
    """One sluice daemon. The config is written to workdir/sluice.yaml."""

    def __init__(self, workdir, config_text, name="sluice", port=None, wait=True):
        self.name = name
        self.workdir = workdir
        self.config_path = os.path.join(workdir, name + ".yaml")
        self.stderr_path = os.path.join(workdir, name + ".stderr.log")
        self.stdout_path = os.path.join(workdir, name + ".stdout.log")
        self.port = port
        self.write_config(config_text)
        self.bin = sluice_bin()
        if not os.access(self.bin, os.X_OK):
            raise AssertionError("sluice binary not found or not executable: %s (set SLUICE_BIN)"
                                 % self.bin)
        self.proc = _spawn([self.bin, "-c", self.config_path], self.stdout_path, self.stderr_path)
        self.pid = self.proc.pid
        self.term_sent = False
        self.checked = False
        if wait:
            self.wait_ready()

    def write_config(self, text):
        """Replace the config file atomically (a reload never sees a half-written file)."""
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.config_path)

    def log(self):
        return read_text(self.stderr_path)

    def log_size(self):
        try:
            return os.path.getsize(self.stderr_path)
        except OSError:
            return 0

    def log_since(self, offset):
        return self.log().encode("utf-8", "replace")[offset:].decode("utf-8", "replace")

    def alive(self):
        return self.proc.poll() is None

    def _assert_alive(self):
        if not self.alive():
            raise AssertionError("sluice exited with %s; stderr tail:\n%s" % (
                self.proc.returncode, file_tail(self.stderr_path)))

    def wait_ready(self, timeout=START_DEADLINE):
        """Until the listener answers HTTP (any status)."""
        def ready():
            self._assert_alive()
            try:
                r = http_request(self.port, "GET", "/v1/models", timeout=5)
            except OSError:
                return False
            return r.status > 0

        wait_until(ready, timeout, "sluice to answer HTTP on 127.0.0.1:%d" % self.port,
                   interval=0.05)

    def wait_log(self, pattern, since=0, timeout=DEADLINE, message=None):
        rx = re.compile(pattern)

        def found():
            return rx.search(self.log_since(since))

        return wait_until(found, timeout, message or ("sluice log to match %r" % pattern))

    def reload(self, config_text=None):
        """Write the new config (if given) and send SIGHUP. Returns the log offset before
        the signal, for wait_log(since=...)."""
        if config_text is not None:
            self.write_config(config_text)
        off = self.log_size()
        self._assert_alive()
        os.kill(self.pid, signal.SIGHUP)
        return off

    def terminate(self):
        if self.alive():
            self.term_sent = True
            os.kill(self.pid, signal.SIGTERM)

    def wait_exit(self, timeout=DEADLINE + 20):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def rss_kib(self):
        return vm_rss_kib(self.pid)

    def stop_and_check(self):
        """SIGTERM, wait, and check: exit status 0, no sanitizer report. Always leaves the
        process dead. Raises AssertionError describing every problem found."""
        if self.checked:
            return
        self.checked = True
        problems = []
        if self.alive():
            self.terminate()
            rc = self.wait_exit()
            if rc is None:
                problems.append("sluice did not exit within %ds of SIGTERM" % (DEADLINE + 20))
                self.proc.kill()
                self.proc.wait(10)
        rc = self.proc.returncode
        if rc != 0:
            how = ("killed by signal %d" % -rc) if rc is not None and rc < 0 else "exit status %s" % rc
            if not self.term_sent:
                problems.append("sluice died before teardown (%s)" % how)
            else:
                problems.append("sluice did not exit 0 on SIGTERM (%s)" % how)
        rep = sanitizer_report(self.log() + read_text(self.stdout_path))
        if rep:
            problems.append("sanitizer report in sluice stderr:\n" + rep)
        if problems:
            raise AssertionError("; ".join(problems))


# ---------------------------------------------------------------------------------------
# Tap: a recording TCP relay
# ---------------------------------------------------------------------------------------

class _TapConn:
    def __init__(self):
        self.up = bytearray()     # client -> upstream (requests)
        self.down = bytearray()   # upstream -> client (responses)
        self.lock = threading.Lock()
        self.closed = False


class Tap:
    """Listens on 127.0.0.1:<port>, relays every connection to 127.0.0.1:<target_port> and
    records the bytes both ways. Relaying is blocking recv/sendall with a bounded buffer, so
    back-pressure passes through unchanged."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.conns = []
        self.lock = threading.Lock()
        self.stopped = False
        self.socks = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def url(self, path="/v1/chat/completions"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def _accept_loop(self):
        while not self.stopped:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rec = _TapConn()
            with self.lock:
                self.conns.append(rec)
                self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u, rec, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, rec, "down"), daemon=True).start()

    def _pump(self, src, dst, rec, direction):
        buf = rec.up if direction == "up" else rec.down
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with rec.lock:
                    buf.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            rec.closed = True
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    def bytes_down(self):
        with self.lock:
            conns = list(self.conns)
        return sum(len(c.down) for c in conns)

    def exchanges(self):
        """[(request Response-like, response Response)] for every complete exchange seen,
        in order per connection. Requests are returned as Response objects whose `reason`
        holds the request line."""
        out = []
        with self.lock:
            conns = list(self.conns)
        for rec in conns:
            with rec.lock:
                up, down, closed = bytes(rec.up), bytes(rec.down), rec.closed
            reqs = _parse_messages(up, is_request=True)
            resps = _parse_messages(down, is_request=False, closed=closed)
            out.extend(zip(reqs, resps))
        return out

    def find_exchange(self, marker):
        for req, resp in self.exchanges():
            if marker.encode() in req.body:
                return req, resp
        return None

    def wait_exchange(self, marker, timeout=DEADLINE):
        return wait_until(lambda: self.find_exchange(marker), timeout,
                          "the tap to see a complete exchange whose request contains %r" % marker)

    def close(self):
        self.stopped = True
        try:
            self.lsock.close()
        except OSError:
            pass
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass


def _parse_messages(data, is_request, closed=False):
    """Complete HTTP/1.1 messages in data (requests or responses); an incomplete trailing
    message is ignored. closed: the connection has ended, so a response framed by the
    connection's close is complete."""
    pos = {"i": 0}

    def recv(n):
        i = pos["i"]
        chunk = data[i:i + n]
        pos["i"] = i + len(chunk)
        return chunk

    reader = _Reader(recv)
    out = []
    while True:
        try:
            if not reader.buf and not reader.fill():
                break
            start, headers = _read_head(reader, is_request)
        except ConnectionClosed:
            break
        hmap = {k.lower(): v for k, v in headers}
        if is_request:
            if "content-length" not in hmap and "chunked" not in hmap.get("transfer-encoding", ""):
                headers = headers + [("Content-Length", "0")]
            msg = Response(0, start, headers)
        else:
            parts = start.split(" ", 2)
            try:
                status = int(parts[1])
            except (IndexError, ValueError):
                break
            msg = Response(status, parts[2] if len(parts) > 2 else "", headers)
            if 100 <= status < 200:
                continue
        state = {}
        body = b"".join(_body_chunks(reader, headers, False, state))
        if not state.get("complete"):
            break
        if not is_request and not closed and "content-length" not in hmap and \
                "chunked" not in hmap.get("transfer-encoding", ""):
            break  # read-until-close: complete only once the relay saw the connection end
        msg.body = body
        out.append(msg)
    return out


# ---------------------------------------------------------------------------------------
# Config generation
# ---------------------------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_./:@+-]*$")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _scalar(v):
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    if isinstance(v, Raw):
        return s
    if _PLAIN.match(s) and s.lower() not in _YAML_WORDS and not re.match(r"^[0-9.]+$", s):
        return s
    return json.dumps(s)


class Raw(str):
    """A scalar written verbatim (e.g. `off` for access_log, `1MiB`)."""


def to_yaml(obj, indent=0):
    """Block-style YAML for dicts/lists/scalars (insertion order kept)."""
    pad = " " * indent
    lines = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                lines.append("%s%s:" % (pad, k))
                lines.append(to_yaml(v, indent + 2))
            elif isinstance(v, dict):
                lines.append("%s%s: {}" % (pad, k))
            elif isinstance(v, list):
                lines.append("%s%s: []" % (pad, k))
            else:
                lines.append("%s%s: %s" % (pad, k, _scalar(v)))
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict) and item:
                sub = to_yaml(item, indent + 2).split("\n")
                sub[0] = pad + "- " + sub[0][indent + 2:]
                lines.extend(sub)
            elif isinstance(item, list) and item:
                lines.append(pad + "-")
                lines.append(to_yaml(item, indent + 2))
            else:
                lines.append("%s- %s" % (pad, _scalar(item)))
    else:
        lines.append(pad + _scalar(obj))
    return "\n".join(lines)


def instance(name, endpoint, model=None, options=None, auth_header=None, timeouts=None,
             **extra):
    inst = {"name": name, "provider": "openai-compatible", "endpoint": endpoint}
    if model is not None:
        inst["model"] = model
    if options:
        inst["options"] = options
    if auth_header:
        inst["auth"] = {"header": dict(auth_header)}
    t = {"connect": Raw("2s"), "first_byte": Raw("10s"), "idle": Raw("10s"), "total": Raw("60s")}
    for k, v in (timeouts or {}).items():
        t[k] = Raw(v)
    inst["timeouts"] = t
    inst.update(extra)
    return inst


def route(name, paths, instance_name, models=None, **extra):
    r = {"name": name, "paths": list(paths)}
    if models is not None:
        r["models"] = list(models)
    r["auth"] = Raw("none")
    r["targets"] = [{"instance": instance_name}]
    r.update(extra)
    return r


def gateway_config(port, instances, routes, server=None, log_level="debug"):
    """A complete sluice config (YAML text)."""
    srv = {
        "listen": [{"address": "127.0.0.1:%d" % port}],
        "workers": 2,
        "max_body_size": Raw("1MiB"),
        "drain_timeout": Raw("10s"),
    }
    for k, v in (server or {}).items():
        srv[k] = Raw(v) if isinstance(v, str) else v
    cfg = {
        "server": srv,
        "log": {"level": Raw(log_level), "access_log": Raw("off")},
        "instances": instances,
        "routes": routes,
    }
    return to_yaml(cfg) + "\n"


# ---------------------------------------------------------------------------------------
# Test case base and runner
# ---------------------------------------------------------------------------------------

def output_dir(test_id):
    module = os.path.splitext(os.path.basename(sys.argv[0] or "integration"))[0]
    parts = test_id.split(".")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", ".".join(parts[-2:]))
    d = os.path.join(SOURCE_DIR, "tests", "output", module, safe)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d, exist_ok=True)
    return d


class SluiceTestCase(unittest.TestCase):
    """Gives each test a work directory and tracks the processes it starts. At cleanup,
    every process is stopped; the sluice processes are checked (exit 0 on SIGTERM, no
    sanitizer report), and a problem there fails the test."""

    maxDiff = 4000

    def setUp(self):
        self.workdir = output_dir(self.id())
        self._mocks = []
        self._sluices = []
        self._taps = []
        self.addCleanup(self._cleanup)

    # -- process helpers -------------------------------------------------------------
    def start_mock(self, *args, name=None):
        name = name or ("mock" if not self._mocks else "mock%d" % (len(self._mocks) + 1))
        m = Mock(self.workdir, args, name=name)
        self._mocks.append(m)
        return m

    def start_sluice(self, config_text=None, port=None, name=None, wait=True, **cfg):
        """start_sluice(instances=..., routes=..., server=...) or start_sluice(text, port)."""
        port = port or free_port()
        if config_text is None:
            config_text = gateway_config(port, **cfg)
        name = name or ("sluice" if not self._sluices else "sluice%d" % (len(self._sluices) + 1))
        s = Sluice(self.workdir, config_text, name=name, port=port, wait=False)
        self._sluices.append(s)
        if wait:
            s.wait_ready()
        return s

    def start_tap(self, target_port):
        t = Tap(target_port)
        self._taps.append(t)
        return t

    def _cleanup(self):
        errors = []
        for s in self._sluices:
            try:
                s.stop_and_check()
            except AssertionError as exc:
                errors.append("%s: %s" % (s.name, exc))
        for m in self._mocks:
            m.stop()
            try:
                m.check_sanitizers()
            except AssertionError as exc:
                errors.append(str(exc))
        for t in self._taps:
            t.close()
        if errors:
            self.fail("teardown checks failed:\n" + "\n".join(errors))

    def log_files(self):
        files = []
        for s in getattr(self, "_sluices", []):
            files += [s.stderr_path, s.stdout_path, s.config_path]
        for m in getattr(self, "_mocks", []):
            files += [m.stdout_path, m.stderr_path]
        return files

    # -- assertions ------------------------------------------------------------------
    def assertOpenAIError(self, resp, status):
        self.assertEqual(resp.status, status, "expected a %d, got %r" % (status, resp))
        ctype = (resp.header("content-type") or "").lower()
        self.assertTrue(ctype.startswith("application/json"),
                        "error content-type should be application/json: %r" % resp)
        self.assertTrue(is_openai_error(resp),
                        "body is not {\"error\":{\"message\",\"type\",\"code\"}}: %r" % resp)

    def assertStreamComplete(self, head, events, complete, rest=b""):
        self.assertEqual(head.status, 200, "stream status: %r" % head)
        self.assertTrue(events, "no SSE events received")
        self.assertTrue(complete, "stream body did not end cleanly (truncated); last events: %r"
                        % events[-3:])
        self.assertEqual(rest.strip(), b"", "unterminated bytes after the last event")
        self.assertTrue(events[-1].is_done, "last event is not 'data: [DONE]': %r" % events[-3:])
        self.assertFalse(any(e.is_error for e in events), "error event in stream: %r" % events)


class _Result(unittest.TextTestResult):
    def _dump_logs(self, test):
        files = test.log_files() if hasattr(test, "log_files") else []
        for path in files:
            if os.path.exists(path):
                self.stream.write("\n----- tail of %s -----\n%s\n" % (path, file_tail(path, 60)))
        self.stream.flush()

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._dump_logs(test)

    def addError(self, test, err):
        super().addError(test, err)
        self._dump_logs(test)


def main():
    """Run the calling module's tests; exit 0 only if all pass."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.stdout.reconfigure(line_buffering=True)
    print("sluice: %s\nmockllm: %s\nsource: %s" % (sluice_bin(), mockllm_bin(), SOURCE_DIR))
    prog = unittest.main(module="__main__", testRunner=unittest.TextTestRunner(
        resultclass=_Result, verbosity=2, stream=sys.stdout), exit=False)
    _kill_all()
    sys.exit(0 if prog.result.wasSuccessful() else 1)
