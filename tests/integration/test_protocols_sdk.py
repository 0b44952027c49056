"""test_protocols_sdk.py — the official SDKs across protocols: @anthropic-ai/sdk and openai
(pinned in tests/sdk/package.json and package-lock.json) against a Sluice that translates.

tests/sdk/protocols.mjs makes the calls an application makes — the Anthropic SDK's
messages.create, messages.stream and tool use on /v1/messages backed by an OpenAI-compatible
instance and by an Anthropic instance (both sluice-mockllm), countTokens and models.list; the
OpenAI SDK's chat completions (stream, tools) backed by an Anthropic instance and
responses.create (stream and not) backed by a chat-only instance — and prints one JSON line of
results. This file asserts on that line and on what the upstreams received.

Skipped, saying why, when node/npm are missing or the npm registry cannot be reached
(test_openai_sdk.prepare_sdk installs tests/sdk).
"""

import json
import os
import shutil
import signal
import subprocess
import uuid

import harness
import test_openai_sdk
from harness import Raw

SDK_DIR = test_openai_sdk.SDK_DIR
SCRIPT = os.path.join(SDK_DIR, "protocols.mjs")
NODE_TIMEOUT = 60
CHECKS = ("messages_create_on_chat", "messages_stream_on_chat", "messages_tool_use_on_chat",
          "messages_tool_use_on_chat_stream", "messages_create_on_anthropic",
          "messages_stream_on_anthropic", "messages_tool_use_on_anthropic",
          "messages_tool_use_on_anthropic_stream", "messages_count_tokens",
          "messages_models_list", "messages_unknown_model_404", "chat_on_anthropic",
          "chat_stream_on_anthropic", "chat_tools_on_anthropic", "chat_tools_on_anthropic_stream",
          "responses_create_on_chat", "responses_stream_on_chat", "responses_previous_id_refused")


def _pinned(name):
    with open(os.path.join(SDK_DIR, "package.json")) as f:
        return json.load(f)["dependencies"][name]


def _installed(name):
    try:
        with open(os.path.join(SDK_DIR, "node_modules", name, "package.json")) as f:
            return json.load(f)["version"]
    except (OSError, ValueError, KeyError):
        return None


def config(port, mock, key):
    def inst(name, provider, path, model):
        i = harness.instance(name, mock.url(path), model=model)
        i["provider"] = Raw(provider)
        i["auth"] = {"header": {"x-api-key" if provider == "anthropic" else "Authorization":
                                "up-secret" if provider == "anthropic" else "Bearer up-secret"}}
        return i

    def rte(name, path, model, instance):
        return {"name": name, "paths": [path], "models": [model], "auth": Raw("key-auth"),
                "targets": [{"instance": instance}]}

    cfg = {
        "server": {"listen": [{"address": "127.0.0.1:%d" % port}], "workers": 2,
                   "max_body_size": Raw("1MiB"), "drain_timeout": Raw("10s")},
        "log": {"level": Raw("debug"), "access_log": Raw("off")},
        "instances": [inst("qwen", "openai-compatible", "/v1/chat/completions", "qwen-up"),
                      inst("claude", "anthropic", "/v1/messages", "claude-up")],
        "consumers": [{"name": "sdk", "keys": [key]}],
        "routes": [rte("msg-qwen", "/v1/messages", "qwen", "qwen"),
                   rte("msg-claude", "/v1/messages", "claude", "claude"),
                   rte("chat-claude", "/v1/chat/completions", "claude-chat", "claude"),
                   rte("responses", "/v1/responses", "qwen-resp", "qwen"),
                   rte("count", "/v1/messages/count_tokens", "qwen", "qwen")],
    }
    return harness.to_yaml(cfg) + "\n"


class ProtocolSDKTest(harness.SluiceTestCase):

    def setUp(self):
        super().setUp()
        self.out = os.path.join(self.workdir, "sdk.stdout.log")
        self.err = os.path.join(self.workdir, "sdk.stderr.log")
        reason = test_openai_sdk.prepare_sdk(self.workdir)
        if reason:
            self.skipTest(reason)
        self.assertEqual(_installed("@anthropic-ai/sdk"), _pinned("@anthropic-ai/sdk"),
                         "tests/sdk/node_modules holds another @anthropic-ai/sdk")

    def log_files(self):
        return super().log_files() + [self.out, self.err]

    def test_official_sdks_across_protocols(self):
        run_id = uuid.uuid4().hex[:12]
        key = "sk-sdk-" + uuid.uuid4().hex
        mock = self.start_mock()
        port = harness.free_port()
        gw = self.start_sluice(config(port, mock, key), port=port)
        env = dict(os.environ, GATEWAY="http://127.0.0.1:%d" % gw.port, API_KEY=key,
                   RUN_ID=run_id)
        for name in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN",
                     "OPENAI_BASE_URL", "OPENAI_API_KEY", "NODE_OPTIONS"):
            env.pop(name, None)
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            p = subprocess.Popen([shutil.which("node"), SCRIPT], cwd=SDK_DIR, env=env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                 start_new_session=True)
            try:
                rc = p.wait(NODE_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
                self.fail("protocols.mjs did not finish within %ds" % NODE_TIMEOUT)
        lines = harness.read_text(self.out).strip().splitlines()
        self.assertTrue(lines, "protocols.mjs printed nothing (exit %s):\n%s"
                        % (rc, harness.file_tail(self.err, 40)))
        result = json.loads(lines[-1])
        checks = result["checks"]
        harness.note("%s on node %s: %s" % (result["sdks"], result["node"], ", ".join(
            "%s=%s" % (k, v["status"]) for k, v in checks.items())))
        self.assertEqual(result["sdks"], {"@anthropic-ai/sdk": _pinned("@anthropic-ai/sdk"),
                                          "openai": _pinned("openai")})
        self.assertEqual(sorted(checks), sorted(CHECKS))
        for name in CHECKS:
            with self.subTest(check=name):
                self.assertEqual(checks[name]["status"], "pass", json.dumps(checks[name]))
        self.assertEqual(rc, 0)

        # What the upstreams received: each protocol where it belongs.
        def upstream(tag):
            q = mock.find_request("sdk-%s-%s:" % (run_id, tag))
            self.assertIsNotNone(q, "the upstream request for %r" % tag)
            return q
        self.assertEqual(upstream("create-chat")["path"], "/v1/chat/completions")
        self.assertEqual(upstream("create-anthropic")["path"], "/v1/messages")
        self.assertEqual(upstream("chat")["path"], "/v1/messages")
        self.assertEqual(upstream("responses")["path"], "/v1/chat/completions")
        q = upstream("create-anthropic")
        self.assertEqual(q["headers"]["x-api-key"], "up-secret", "the instance's key")
        self.assertRegex(q["headers"]["anthropic-version"], r"^\d{4}-\d{2}-\d{2}$",
                         "the SDK's own version, forwarded on the Messages identity path")
        self.assertEqual(upstream("chat")["headers"]["anthropic-version"], "2023-06-01",
                         "a translated request gets the provider's default")
        self.assertEqual(json.loads(q["body"])["model"], "claude-up")
        self.assertNotIn(key, json.dumps(mock.requests()), "the client's key never goes up")
        self.assertIsNone(mock.find_request("sdk-%s-count:" % run_id),
                          "count_tokens is answered by the gateway")


if __name__ == "__main__":
    harness.main()
