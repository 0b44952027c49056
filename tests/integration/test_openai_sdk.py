"""test_openai_sdk.py — the official OpenAI Node SDK (npm `openai`, v4, pinned in
tests/sdk/package.json and package-lock.json), used unchanged against Sluice.

The test installs tests/sdk's locked dependencies with `npm ci` when node_modules is missing or
stale, starts sluice-mockllm and sluice, and runs `node tests/sdk/check.mjs` with
BASE_URL=http://127.0.0.1:PORT/v1 and a consumer's API_KEY. check.mjs makes the SDK calls an
application makes (chat, streams with and without usage, legacy completions, embeddings, the
model list, a wrong key, an unknown model, a fallback, a quota, a stream cut mid-way) and prints
one JSON line of results. This file asserts on that line and on what the upstreams received.

It is skipped, with a message saying why, when `node` (18 or later) or `npm` is not installed
(scripts/deps.sh installs Debian's nodejs and npm) or when `npm ci` cannot reach the registry.

Gateway: consumers `sdk` (no limits) and `limited` (one request per hour, chat route only),
`auth: key-auth` everywhere. Routes: `chat` (/v1/chat/completions, model gpt-4o-mini),
`fallback` (same path, model gpt-4o-fallback: `primary`, a mock answering 503, at priority 10,
then `secondary` at priority 5, fallback on http_5xx), `completions` and `embeddings`.
"""

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import uuid

import harness
from harness import Raw

SDK_DIR = os.path.join(harness.SOURCE_DIR, "tests", "sdk")
CHECK_SCRIPT = os.path.join(SDK_DIR, "check.mjs")
STAMP_NAME = ".sluice-install-stamp"
INSTALL_TIMEOUT = 40     # s; npm ci from the registry takes a few seconds
NODE_TIMEOUT = 40        # s; check.mjs takes 1-3 s
MIN_NODE_MAJOR = 18

MODELS = {"chat": "gpt-4o-mini", "fallback": "gpt-4o-fallback",
          "completions": "gpt-3.5-turbo-instruct", "embeddings": "text-embedding-3-small"}
UPSTREAM_CHAT_MODEL = "mock-chat-upstream"
MOCK_TOKENS = 16
LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua enim ad minim veniam quis nostrud "
         "exercitation ullamco laboris nisi aliquip ex ea").split()
EXPECTED_CONTENT = " ".join(LOREM[:MOCK_TOKENS])

CHECKS = ("chat_nonstream", "chat_stream", "chat_stream_include_usage", "chat_stream_helper",
          "stream_break_aborts", "completions",
          "completions_stream", "embeddings", "models_list", "wrong_key_401",
          "wrong_key_401_stream", "unknown_model_404", "fallback_nonstream", "fallback_stream",
          "midstream_failure_throws", "quota_429", "consumer_not_allowed_403")

# Network failures of npm (no DNS, no route, refused, timed out): the install is skipped.
NETWORK_ERRORS = re.compile(
    r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH|"
    r"ERR_SOCKET_TIMEOUT|socket hang up|network|request to \S+ failed", re.I)


def _pinned_openai():
    with open(os.path.join(SDK_DIR, "package.json")) as f:
        return json.load(f)["dependencies"]["openai"]


def _lock_digest():
    h = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        with open(os.path.join(SDK_DIR, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


def _installed_ok():
    """node_modules matches package.json + package-lock.json (the stamp written after the
    last successful `npm ci`) and holds the pinned openai."""
    nm = os.path.join(SDK_DIR, "node_modules")
    try:
        with open(os.path.join(nm, STAMP_NAME)) as f:
            stamp = f.read().strip()
        with open(os.path.join(nm, "openai", "package.json")) as f:
            version = json.load(f)["version"]
    except (OSError, ValueError, KeyError):
        return False
    return stamp == _lock_digest() and version == _pinned_openai()


def _run_bounded(argv, timeout, log_path, cwd=None, env=None):
    """Run argv in its own process group, output to log_path. Returns (returncode or None on
    timeout, output text). On timeout the whole group is killed."""
    with open(log_path, "wb") as log:
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
            rc = None
    return rc, harness.read_text(log_path)


def prepare_sdk(workdir):
    """Check node and npm, install tests/sdk when needed. Returns None when ready, else the
    reason to skip. Raises AssertionError when the install fails for another reason than the
    network (a broken lock file must fail the test, not skip it)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return ("node and npm are needed for the OpenAI SDK test (scripts/deps.sh installs "
                "Debian's nodejs and npm); missing: %s" % ", ".join(
                    n for n, p in (("node", node), ("npm", npm)) if p is None))
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=20)
    m = re.match(r"v(\d+)\.", out.stdout.strip())
    if out.returncode != 0 or not m or int(m.group(1)) < MIN_NODE_MAJOR:
        return "node %s is too old for openai v4 (Node %d or later)" % (
            out.stdout.strip() or "?", MIN_NODE_MAJOR)

    # Two test runs at once (a normal and an ASan build) must not install over each other.
    lock_dir = os.path.join(harness.SOURCE_DIR, "tests", "output")
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, ".sdk-npm-ci.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_ok():
            return None
        env = dict(os.environ)
        # Fail fast without network instead of retrying for minutes.
        env.update({"npm_config_fetch_retries": "1", "npm_config_fetch_timeout": "20000",
                    "npm_config_fetch_retry_mintimeout": "2000",
                    "npm_config_fetch_retry_maxtimeout": "5000",
                    "npm_config_update_notifier": "false"})
        log_path = os.path.join(workdir, "npm-ci.log")
        t0 = time.monotonic()
        rc, text = _run_bounded([npm, "ci", "--no-audit", "--no-fund"], INSTALL_TIMEOUT,
                                log_path, cwd=SDK_DIR, env=env)
        harness.note("npm ci: %s in %.1fs" % ("timed out" if rc is None else "exit %d" % rc,
                                             time.monotonic() - t0))
        if rc is None:
            return ("`npm ci` in tests/sdk did not finish within %ds (no network to the npm "
                    "registry?); see %s" % (INSTALL_TIMEOUT, log_path))
        if rc != 0:
            if NETWORK_ERRORS.search(text):
                why = [l.strip() for l in text.splitlines()
                       if re.search(r"npm error (code|network|request to|errno)", l)]
                return ("`npm ci` in tests/sdk could not reach the npm registry (%s); see %s"
                        % ("; ".join(why[:3]) or "network error", log_path))
            tail = "\n".join(text.splitlines()[-15:])
            raise AssertionError("`npm ci` in tests/sdk failed (exit %d):\n%s" % (rc, tail))
        with open(os.path.join(SDK_DIR, "node_modules", STAMP_NAME), "w") as f:
            f.write(_lock_digest() + "\n")
        if not _installed_ok():
            raise AssertionError("`npm ci` succeeded but node_modules/openai is not %s"
                                 % _pinned_openai())
    return None


def sdk_config(port, mock, mock503, api_key, quota_key):
    def inst(name, target, path, model=None, passive=True):
        i = harness.instance(name, target.url(path), model=model)
        if not passive:
            i["checks"] = {"passive": {"enabled": False}}
        return i

    def rte(name, path, model, targets, fallback=None):
        r = {"name": name, "paths": [path], "models": [model], "auth": Raw("key-auth")}
        if fallback:
            r["fallback"] = {"on": [Raw(t) for t in fallback]}
        r["targets"] = [{"instance": i, "priority": p} for i, p in targets]
        return r

    cfg = {
        "server": {"listen": [{"address": "127.0.0.1:%d" % port}], "workers": 2,
                   "max_body_size": Raw("1MiB"), "drain_timeout": Raw("10s")},
        "log": {"level": Raw("debug"), "access_log": Raw("off")},
        "instances": [
            inst("chat", mock, "/v1/chat/completions", model=UPSTREAM_CHAT_MODEL),
            inst("completions", mock, "/v1/completions"),
            inst("embeddings", mock, "/v1/embeddings"),
            # Every answer 503; passive checks off so every fallback request tries it first.
            inst("primary", mock503, "/v1/chat/completions", passive=False),
            inst("secondary", mock, "/v1/chat/completions"),
        ],
        "consumers": [
            {"name": "sdk", "keys": [api_key]},
            {"name": "limited", "keys": [quota_key], "routes": ["chat"],
             "limits": [{"requests": 1, "window": Raw("1h")}]},
        ],
        "routes": [
            rte("chat", "/v1/chat/completions", MODELS["chat"], [("chat", 0)]),
            rte("fallback", "/v1/chat/completions", MODELS["fallback"],
                [("primary", 10), ("secondary", 5)], fallback=["http_5xx"]),
            rte("completions", "/v1/completions", MODELS["completions"], [("completions", 0)]),
            rte("embeddings", "/v1/embeddings", MODELS["embeddings"], [("embeddings", 0)]),
        ],
    }
    return harness.to_yaml(cfg) + "\n"


def prompt_tokens(text):
    """What the mock bills for a prompt: ceil(bytes / 4), at least 1."""
    return max(1, math.ceil(len(text.encode()) / 4))


class OpenAISDKTest(harness.SluiceTestCase):

    def setUp(self):
        super().setUp()
        self.sdk_stdout = os.path.join(self.workdir, "sdk.stdout.log")
        self.sdk_stderr = os.path.join(self.workdir, "sdk.stderr.log")
        reason = prepare_sdk(self.workdir)
        if reason:
            self.skipTest(reason)

    def log_files(self):
        return super().log_files() + [self.sdk_stdout, self.sdk_stderr,
                                      os.path.join(self.workdir, "npm-ci.log")]

    def run_check(self, port, api_key, quota_key, run_id):
        env = dict(os.environ)
        env.update({"BASE_URL": "http://127.0.0.1:%d/v1" % port, "API_KEY": api_key,
                    "QUOTA_API_KEY": quota_key, "RUN_ID": run_id})
        # The SDK reads these; none may point it elsewhere.
        for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID",
                     "OPENAI_LOG", "NODE_OPTIONS"):
            env.pop(name, None)
        with open(self.sdk_stdout, "wb") as out, open(self.sdk_stderr, "wb") as err:
            p = subprocess.Popen([shutil.which("node"), CHECK_SCRIPT], cwd=SDK_DIR, env=env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                 start_new_session=True)
            try:
                rc = p.wait(NODE_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
                self.fail("node check.mjs did not finish within %ds; stderr:\n%s" % (
                    NODE_TIMEOUT, harness.file_tail(self.sdk_stderr, 40)))
        lines = harness.read_text(self.sdk_stdout).strip().splitlines()
        self.assertTrue(lines, "check.mjs printed nothing (exit %s); stderr:\n%s" % (
            rc, harness.file_tail(self.sdk_stderr, 40)))
        try:
            result = json.loads(lines[-1])
        except ValueError:
            self.fail("check.mjs's last line is not JSON (exit %s): %r\nstderr:\n%s" % (
                rc, lines[-1][:500], harness.file_tail(self.sdk_stderr, 40)))
        return rc, result

    def test_official_node_sdk(self):
        t0 = time.monotonic()
        run_id = uuid.uuid4().hex[:12]
        api_key = "sk-sdk-" + uuid.uuid4().hex
        quota_key = "sk-limited-" + uuid.uuid4().hex
        mock = self.start_mock()
        mock503 = self.start_mock("--status", "503", name="mock503")
        port = harness.free_port()
        gw = self.start_sluice(sdk_config(port, mock, mock503, api_key, quota_key), port=port)

        rc, result = self.run_check(gw.port, api_key, quota_key, run_id)
        checks = result.get("checks", {})
        harness.note("openai %s on node %s: %s" % (
            result.get("sdk_version"), result.get("node"),
            ", ".join("%s=%s" % (k, v["status"]) for k, v in checks.items())))

        # -- the SDK's own verdicts -----------------------------------------------------
        self.assertEqual(result.get("sdk_version"), _pinned_openai())
        self.assertEqual(sorted(checks), sorted(CHECKS), "the set of checks check.mjs ran")
        for name in CHECKS:
            with self.subTest(check=name):
                c = checks[name]
                if c["status"] == "known_failing":
                    harness.note("%s: known failing (%s): %s" % (name, c.get("known_bug"),
                                                                c.get("error")))
                    continue
                self.assertEqual(c["status"], "pass", "%s: %s" % (name, json.dumps(c)))
        self.assertEqual(result.get("failed"), [], "failed checks")
        self.assertEqual(rc, 0, "check.mjs exit status")
        self.assertTrue(result.get("ok"))

        # -- what the SDK saw, exactly ------------------------------------------------------
        def passed(name):
            return checks[name]["status"] == "pass"

        if passed("chat_nonstream"):
            c = checks["chat_nonstream"]
            self.assertEqual(c["content"], EXPECTED_CONTENT)
            self.assertEqual(c["instance"], "chat")
            p = prompt_tokens("sdk-%s-chat: say something" % run_id)
            self.assertEqual(c["usage"], {"prompt_tokens": p, "completion_tokens": MOCK_TOKENS,
                                          "total_tokens": p + MOCK_TOKENS})
        if passed("chat_stream"):
            self.assertEqual(checks["chat_stream"]["text"], EXPECTED_CONTENT)
            self.assertEqual(checks["chat_stream"]["usage_chunks"], 0)
        if passed("chat_stream_include_usage"):
            c = checks["chat_stream_include_usage"]
            p = prompt_tokens("sdk-%s-usage: say something" % run_id)
            self.assertEqual(c["usage"], {"prompt_tokens": p, "completion_tokens": MOCK_TOKENS,
                                          "total_tokens": p + MOCK_TOKENS})
        if passed("completions"):
            self.assertEqual(checks["completions"]["text"], EXPECTED_CONTENT)
        if passed("embeddings"):
            self.assertEqual(checks["embeddings"]["dims"], [8, 8])
        if passed("models_list"):
            self.assertEqual(sorted(checks["models_list"]["ids"]), sorted(MODELS.values()))
        for name, status in (("wrong_key_401", 401), ("wrong_key_401_stream", 401),
                             ("unknown_model_404", 404), ("consumer_not_allowed_403", 403)):
            if passed(name):
                self.assertEqual(checks[name]["error_status"], status, name)
                self.assertTrue(checks[name]["request_id"], "%s: x-request-id seen" % name)
        if passed("fallback_nonstream"):
            self.assertEqual(checks["fallback_nonstream"]["content"], EXPECTED_CONTENT)
        if passed("fallback_stream"):
            self.assertEqual(checks["fallback_stream"]["text"], EXPECTED_CONTENT)
        if passed("midstream_failure_throws"):
            c = checks["midstream_failure_throws"]
            self.assertEqual(c["text"], " ".join(LOREM[:3]))
            self.assertEqual(c["error_type"], "upstream_error")

        # -- what the upstreams received ----------------------------------------------------
        def upstream(marker, m=mock):
            return m.find_request("sdk-%s-%s:" % (run_id, marker))

        def body(marker, m=mock):
            q = upstream(marker, m)
            self.assertIsNotNone(q, "the upstream request for %r" % marker)
            return json.loads(q["body"])

        chat = body("chat")
        self.assertEqual(chat["model"], UPSTREAM_CHAT_MODEL, "the instance's model upstream")
        stream = body("stream")
        self.assertIs(stream["stream"], True)
        self.assertIs(stream["stream_options"]["include_usage"], True,
                      "sluice asks the upstream for usage")
        self.assertIs(body("usage")["stream_options"]["include_usage"], True)
        self.assertEqual(body("completions")["model"], MODELS["completions"])
        self.assertEqual(body("completions-stream")["stream"], True)
        emb = body("embeddings")
        self.assertEqual(emb["encoding_format"], "float")
        self.assertEqual(len(emb["input"]), 2)
        self.assertEqual(body("cut")["mock"], {"disconnect_after": 3},
                         "an unknown body parameter reaches the upstream")
        # The fallback: each request went to primary (503) first, then to secondary.
        for marker in ("fb", "fb-stream"):
            self.assertIsNotNone(upstream(marker, mock503), "%s tried on primary first" % marker)
            self.assertIsNotNone(upstream(marker, mock), "%s served by secondary" % marker)
        self.assertEqual(mock503.stats()["errors"], 2, "primary answered 503 twice")
        # Refused requests never reach an upstream.
        for marker in ("wrongkey", "wrongkey-s", "unknown"):
            self.assertIsNone(upstream(marker), "%s must not reach the upstream" % marker)
            self.assertIsNone(upstream(marker, mock503))
        self.assertIsNotNone(upstream("q1"), "the limited consumer's first request")
        if passed("quota_429") and not checks["quota_429"].get("served_after_first"):
            self.assertIsNone(upstream("q2"), "the refused request must not reach the upstream")
        # The client's keys are never forwarded.
        for m in (mock, mock503):
            recorded = json.dumps(m.requests())
            self.assertNotIn(api_key, recorded, "the API key reached an upstream")
            self.assertNotIn(quota_key, recorded, "the API key reached an upstream")
        s = mock.stats()
        self.assertEqual(s["disconnected"], 1, "the mock cut one stream: %r" % s)
        # The stream the SDK left early was cancelled upstream (200 tokens 100 ms apart
        # would take 20 s to finish).
        self.assertIsNotNone(upstream("abort"), "the aborted stream reached the upstream")
        mock.wait_stats(lambda st: st["cancelled"] == 1,
                        "the mock to count the stream the SDK aborted as cancelled")

        elapsed = time.monotonic() - t0
        harness.note("SDK checks and assertions in %.1fs" % elapsed)


if __name__ == "__main__":
    harness.main()
