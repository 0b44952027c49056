"""ops_helpers.py — helpers for the operations acceptance tests (test_operations.py,
test_status_page.py, test_tls_notify.py): metrics, access log, admin API, status page,
sd_notify and TLS listeners. Additive to harness.py; Python standard library only.

What lives here:
  * ops_config(): a complete sluice config with `admin`, `log`, consumers and TLS listeners
    (harness.gateway_config() knows none of these);
  * start_gateway(): start sluice (optionally with extra environment, e.g. NOTIFY_SOCKET) and
    wait for the admin listener's /readyz, so that no readiness probe lands in the traffic
    metrics;
  * Admin: the admin API client (Bearer key, JSON);
  * Exposition: a Prometheus text-format parser (samples, TYPE lines) with exact lookups;
  * run_promtool(): `promtool check metrics` on an exposition;
  * NotifySocket: a unix datagram socket standing in for systemd's $NOTIFY_SOCKET;
  * Chromium: headless Chromium driven by its command line (--dump-dom, --screenshot) and a
    small DOM built with html.parser to query the dumped page by attributes;
  * make_cert(), TLSConn, peer_cert_der(): self-signed certificates made with the openssl
    CLI, an HTTP/1.1 client over TLS that reuses harness.HTTPConn, certificate fingerprints.
"""

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
from decimal import ROUND_HALF_UP, Decimal
from html.parser import HTMLParser

import harness
from harness import DEADLINE, HTTPConn, Raw, wait_until

CHAT = "/v1/chat/completions"
ADMIN_KEY = "testkey"


def sha256_hex(data):
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()


def fingerprint(key):
    """The access log's key_fingerprint: the first 12 hex digits of the key's SHA-256."""
    return sha256_hex(key)[:12]


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------

def consumer(name, keys, limits=None, **extra):
    c = {"name": name, "keys": list(keys)}
    if limits:
        c["limits"] = limits
    c.update(extra)
    return c


def key_route(name, models, targets, **extra):
    """A key-auth route on the chat path serving `models`; targets: [(instance, priority)]."""
    r = {"name": name, "paths": [CHAT], "models": list(models)}
    r.update(extra)
    r["targets"] = [{"instance": i, "priority": p} for i, p in targets]
    return r


def ops_config(port, instances, routes, consumers=None, admin_port=None, admin_key=ADMIN_KEY,
               access_log="off", payloads=None, error_log=None, listen=None, workers=2):
    """A complete sluice config (YAML text). listen: the server.listen list (default: one
    plain listener on 127.0.0.1:port)."""
    srv = {
        "listen": listen if listen is not None else [{"address": "127.0.0.1:%d" % port}],
        "workers": workers,
        "max_body_size": Raw("1MiB"),
        "drain_timeout": Raw("10s"),
    }
    cfg = {"server": srv}
    if admin_port is not None:
        cfg["admin"] = {"listen": "127.0.0.1:%d" % admin_port, "key": admin_key}
    log = {"level": Raw("debug"), "access_log": Raw(access_log) if access_log == "off"
           else access_log}
    if error_log is not None:
        log["error_log"] = error_log
    if payloads is not None:
        log["payloads"] = payloads
    cfg["log"] = log
    cfg["instances"] = instances
    if consumers:
        cfg["consumers"] = consumers
    cfg["routes"] = routes
    return harness.to_yaml(cfg) + "\n"


# ---------------------------------------------------------------------------------------
# Starting sluice
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def extra_env(env):
    """Set environment variables for processes spawned inside the block (harness._spawn copies
    os.environ), and restore them afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_gateway(test, config_text, port, admin_port=None, env=None, admin_key=ADMIN_KEY):
    """Start sluice without the harness's readiness probe on the traffic port (it would be
    counted in the metrics); wait for the admin /readyz instead (or, without an admin
    listener, for the traffic port to accept a TCP connection)."""
    with extra_env(env or {}):
        gw = test.start_sluice(config_text, port=port, wait=False)

    def ready():
        if not gw.alive():
            raise AssertionError("sluice exited with %s before it was ready:\n%s" % (
                gw.proc.returncode, harness.file_tail(gw.stderr_path)))
        if admin_port is None:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return True
        r = harness.http_request(admin_port, "GET", "/readyz",
                                 headers={"Authorization": "Bearer " + admin_key}, timeout=5)
        return r.status == 200

    wait_until(ready, harness.START_DEADLINE,
               "sluice to answer 200 on the admin listener's /readyz (127.0.0.1:%s)" % admin_port,
               interval=0.05)
    return gw


# ---------------------------------------------------------------------------------------
# Admin API
# ---------------------------------------------------------------------------------------

_DEFAULT = object()


class Admin:
    def __init__(self, port, key=ADMIN_KEY):
        self.port = port
        self.key = key

    def request(self, method, path, key=_DEFAULT, headers=None, body=None):
        key = self.key if key is _DEFAULT else key
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = "Bearer " + key
        return harness.http_request(self.port, method, path, headers=h, body=body,
                                    content_type=None)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def json(self, path):
        r = self.get(path)
        if r.status != 200:
            raise AssertionError("GET %s on the admin listener -> %r" % (path, r))
        return r.json()

    def reload(self):
        return self.request("POST", "/reload")

    def metrics_text(self):
        r = self.get("/metrics")
        if r.status != 200:
            raise AssertionError("GET /metrics -> %r" % r)
        return r.body.decode("utf-8")

    def metrics(self):
        return Exposition(self.metrics_text())

    def wait_metrics(self, predicate, message, timeout=DEADLINE):
        """Scrape until predicate(Exposition) holds; return that exposition."""
        last = {}

        def check():
            last["m"] = self.metrics()
            return predicate(last["m"])

        wait_until(check, timeout, lambda: "%s (last scrape:\n%s)" % (
            message, last["m"].summary() if "m" in last else "none"))
        return last["m"]


# ---------------------------------------------------------------------------------------
# Prometheus text format
# ---------------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+(-?\d+))?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def _unescape(v):
    return re.sub(r'\\(.)', lambda m: "\n" if m.group(1) == "n" else m.group(1), v)


def _labels_key(labels):
    return tuple(sorted(labels.items()))


class Exposition:
    """A parsed exposition. samples: [(name, {labels}, value)]; types: {family: type}."""

    def __init__(self, text):
        self.text = text
        self.samples = []
        self.types = {}
        self.helps = {}
        for n, line in enumerate(text.split("\n"), 1):
            if not line:
                continue
            if line.startswith("# TYPE "):
                parts = line.split(" ")
                self.types[parts[2]] = parts[3]
                continue
            if line.startswith("# HELP "):
                parts = line.split(" ", 3)
                self.helps[parts[2]] = parts[3] if len(parts) > 3 else ""
                continue
            if line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if not m:
                raise AssertionError("line %d of the exposition is not a sample: %r" % (n, line))
            labels = {}
            rest = m.group(2) or ""
            pos = 0
            while pos < len(rest):
                lm = _LABEL.match(rest, pos)
                if not lm:
                    raise AssertionError("line %d: bad labels %r" % (n, rest))
                labels[lm.group(1)] = _unescape(lm.group(2))
                pos = lm.end()
            value = float(m.group(3).replace("+Inf", "inf").replace("-Inf", "-inf"))
            self.samples.append((m.group(1), labels, value))

    def series(self, name):
        """{sorted label tuple: value} for every sample called `name`."""
        out = {}
        for n, labels, value in self.samples:
            if n == name:
                key = _labels_key(labels)
                if key in out:
                    raise AssertionError("duplicate series %s%r" % (name, labels))
                out[key] = value
        return out

    def value(self, name, default=None, **labels):
        return self.series(name).get(_labels_key(labels), default)

    def sum(self, name, by=None, where=None):
        """Sum of a family, grouped by one label (None: one total)."""
        out = {}
        for n, labels, value in self.samples:
            if n != name or (where and not where(labels)):
                continue
            k = labels.get(by, "") if by else ""
            out[k] = out.get(k, 0) + value
        return out if by else out.get("", 0)

    def summary(self):
        return "\n".join(l for l in self.text.split("\n")
                         if l and not l.startswith("#") and "_bucket{" not in l)


def series_dict(entries):
    """[({labels}, value)] -> {sorted label tuple: float value}, for exact comparisons."""
    return {_labels_key(l): float(v) for l, v in entries}


def promtool_bin():
    return shutil.which("promtool")


def run_promtool(text):
    """(returncode, output) of `promtool check metrics` fed the exposition on stdin."""
    p = subprocess.run([promtool_bin(), "check", "metrics"], input=text.encode(),
                       capture_output=True, timeout=60)
    return p.returncode, (p.stdout + p.stderr).decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------
# sd_notify
# ---------------------------------------------------------------------------------------

class NotifySocket:
    """A unix datagram socket bound at a short temporary path (sun_path holds 108 bytes, the
    test output directories are deeper than that), collecting every datagram with the
    monotonic time it was read."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="sluice-notify-")
        self.path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []  # [str]
        self.lock = threading.Lock()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stopped:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.messages.append(data.decode("utf-8", "replace"))

    def snapshot(self):
        with self.lock:
            return list(self.messages)

    def wait_count(self, n, what):
        wait_until(lambda: len(self.snapshot()) >= n, DEADLINE,
                   lambda: "%s (datagrams so far: %r)" % (what, self.snapshot()))
        return self.snapshot()

    def close(self):
        self.stopped = True
        self.thread.join(5)
        try:
            self.sock.close()
        except OSError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def parse_notify(msg):
    """'A=1\\nB=2' -> {'A': '1', 'B': '2'} (the sd_notify datagram format)."""
    out = {}
    for line in msg.split("\n"):
        if line:
            k, _, v = line.partition("=")
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------
# Chromium
# ---------------------------------------------------------------------------------------

def chromium_bin():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def run_chromium(args, url, budget_ms=5000, timeout=90):
    """Run headless Chromium once with a fresh profile; returns (returncode, stdout bytes,
    stderr text). The process group is killed if it outlives `timeout`."""
    profile = tempfile.mkdtemp(prefix="sluice-chromium-")
    argv = [chromium_bin()] + CHROMIUM_FLAGS + [
        "--user-data-dir=" + profile, "--virtual-time-budget=%d" % budget_ms] + args + [url]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError("chromium did not finish within %ds: %s" % (
            timeout, err.decode("utf-8", "replace")[-2000:]))
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
        shutil.rmtree(profile, ignore_errors=True)
    return p.returncode, out, err.decode("utf-8", "replace")


class Element:
    def __init__(self, tag, attrs, parent):
        self.tag = tag
        self.attrs = dict(attrs)
        self.parent = parent
        self.children = []  # Element or str

    def text(self):
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Element):
                yield from c.iter()

    def find_all(self, tag=None, **attrs):
        """Descendants (self included) with that tag and those attribute values
        (attribute names with '_' for '-': data_field='used'; True: present)."""
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        out = []
        for e in self.iter():
            if tag and e.tag != tag:
                continue
            if all((k in e.attrs) if v is True else e.attrs.get(k) == v for k, v in want.items()):
                out.append(e)
        return out

    def find(self, tag=None, **attrs):
        found = self.find_all(tag, **attrs)
        return found[0] if found else None

    def field(self, name):
        """The text of the first descendant with data-field=name, stripped; None if absent."""
        e = self.find(data_field=name)
        return e.text().strip() if e is not None else None

    def __repr__(self):
        return "<%s %r>" % (self.tag, self.attrs)


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
         "source", "track", "wbr"}


class _DOMBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, None)
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        e = Element(tag, attrs, self.cur)
        self.cur.children.append(e)
        if tag not in _VOID:
            self.cur = e

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Element(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        e = self.cur
        while e is not None and e.tag != tag:
            e = e.parent
        if e is not None and e.parent is not None:
            self.cur = e.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse_dom(html):
    b = _DOMBuilder()
    b.feed(html)
    b.close()
    return b.root


def js_fixed(x, digits):
    """JavaScript's Number.prototype.toFixed: the exact binary value, halves rounded up."""
    return str(Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def js_ms(v):
    """The status page's ms(): "812 ms", "2.50 s", "–" when absent."""
    if v is None:
        return "–"
    return js_fixed(v / 1000, 2) + " s" if v >= 1000 else js_fixed(v, 0) + " ms"


def js_num(v):
    """The status page's num(): toLocaleString('en-US', {maximumFractionDigits: 0})."""
    if v is None:
        return "–"
    return "{:,}".format(int(round(v)))


# ---------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------

def make_cert(directory, name, cn):
    """A self-signed certificate for 127.0.0.1 / localhost made with the openssl CLI.
    Returns (cert path, key path)."""
    cert = os.path.join(directory, name + ".crt")
    key = os.path.join(directory, name + ".key")
    p = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=" + cn,
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-addext", "basicConstraints=critical,CA:FALSE",
         "-addext", "extendedKeyUsage=serverAuth"],
        capture_output=True, timeout=60)
    if p.returncode != 0:
        raise AssertionError("openssl req failed: %s" % (p.stdout + p.stderr).decode())
    return cert, key


def cert_der(cert_path):
    with open(cert_path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def trusting_context(cafile):
    return ssl.create_default_context(cafile=cafile)


class TLSConn(HTTPConn):
    """harness.HTTPConn over TLS: the same request/response/SSE machinery."""

    def __init__(self, port, context, server_hostname="127.0.0.1", timeout=DEADLINE):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = context.wrap_socket(raw, server_hostname=server_hostname)
        except BaseException:
            raw.close()
            raise
        self.port = port
        self.reader = harness._Reader(self.sock.recv)
        self.head = None
        self.body_state = {}
        self._method = None
        self.closed = False

    def peer_der(self):
        return self.sock.getpeercert(binary_form=True)


def peer_cert_der(port):
    """The certificate a new TLS connection to the port presents (no verification)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return s.getpeercert(binary_form=True)


# ---------------------------------------------------------------------------------------
# Bodies and small utilities
# ---------------------------------------------------------------------------------------

def chat_body(model, content, tokens, stream=False, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "mock": {"tokens": tokens}}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        body["mock"]["itl_ms"] = 2  # the last byte comes strictly after the first
    body.update(extra)
    return body


def stream_usage(events):
    """The usage of a stream as the client saw it (the include_usage chunk)."""
    for e in events:
        if e.is_usage_only():
            return e.json()["usage"]
    raise AssertionError("no usage chunk in the stream: %r" % events[-4:])


def read_lines(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return [l for l in data.decode("utf-8").split("\n") if l]


def wait_lines(path, n, what):
    wait_until(lambda: len(read_lines(path)) >= n, DEADLINE,
               lambda: "%s: %d lines in %s (have %d)" % (what, n, path, len(read_lines(path))))
    return read_lines(path)
