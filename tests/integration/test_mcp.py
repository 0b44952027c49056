"""test_mcp.py — the MCP gateway (issue 11) with the official MCP TypeScript SDK.

Two real MCP servers built with @modelcontextprotocol/sdk's Streamable HTTP server transport
(tests/mcp/servers.mjs: `search`, the high-level McpServer with a tool that sends progress
notifications, a prompt and a resource; `tickets`, the low-level Server with a paginated
tools/list) sit behind one `type: mcp` route. The SDK's own client (tests/mcp/client.mjs)
talks to Sluice; raw HTTP from here checks what the SDK hides (headers, statuses, bodies).

tests/mcp's locked dependencies are installed with `npm ci` when node_modules is missing or
stale (stamped like tests/sdk); without node 18+ or npm, or without the registry, the test is
skipped with the reason.
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import harness
from harness import Raw

MCP_DIR = os.path.join(harness.SOURCE_DIR, "tests", "mcp")
STAMP = ".sluice-install-stamp"
NODE_TIMEOUT = 60
SEARCH_TOOLS = ["search__search", "search__slow_search", "search__whoami"]
TICKET_TOOLS = ["tickets__create_ticket", "tickets__list_tickets", "tickets__close_ticket",
                "tickets__delete_ticket", "tickets__delete_all"]
NETWORK_ERRORS = re.compile(r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|"
                            r"ENETUNREACH|EHOSTUNREACH|network|request to \S+ failed", re.I)
ACCEPT = "application/json, text/event-stream"


def _digest():
    h = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        with open(os.path.join(MCP_DIR, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


def prepare_node(workdir):
    """None when tests/mcp is installed and node works, else why the test is skipped."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "node and npm are needed for the MCP SDK test (scripts/deps.sh installs them)"
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=20)
    m = re.match(r"v(\d+)\.", out.stdout.strip())
    if not m or int(m.group(1)) < 18:
        return "node %s is too old for @modelcontextprotocol/sdk (18 or later)" % out.stdout
    lock_dir = os.path.join(harness.SOURCE_DIR, "tests", "output")
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, ".mcp-npm-ci.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = os.path.join(MCP_DIR, "node_modules", STAMP)
        if os.path.exists(stamp) and harness.read_text(stamp).strip() == _digest():
            return None
        log = os.path.join(workdir, "npm-ci.log")
        env = dict(os.environ, npm_config_fetch_retries="1", npm_config_fetch_timeout="20000",
                   npm_config_update_notifier="false")
        with open(log, "wb") as f:
            p = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=MCP_DIR, env=env,
                               stdout=f, stderr=subprocess.STDOUT, timeout=120)
        text = harness.read_text(log)
        if p.returncode != 0:
            if NETWORK_ERRORS.search(text):
                return "`npm ci` in tests/mcp could not reach the registry; see %s" % log
            raise AssertionError("`npm ci` in tests/mcp failed:\n%s" % text[-2000:])
        with open(stamp, "w") as f:
            f.write(_digest() + "\n")
    return None


class NodeServer:
    """One tests/mcp/servers.mjs process."""

    def __init__(self, workdir, kind, port=0, args=()):
        self.kind = kind
        self.log_path = os.path.join(workdir, "%s.log" % kind)
        self.proc = harness._spawn([shutil.which("node"), os.path.join(MCP_DIR, "servers.mjs"),
                                    "--kind", kind, "--port", str(port)] + list(args),
                                   self.log_path, self.log_path, env=dict(os.environ))
        m = harness.wait_until(lambda: re.search(r"listening (\d+)",
                                                 harness.read_text(self.log_path)),
                               message="the %s MCP server to listen" % kind)
        self.port = int(m.group(1))

    def url(self):
        return "http://127.0.0.1:%d/mcp" % self.port

    def stats(self):
        return harness.http_request(self.port, "GET", "/_stats").json()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def mcp_config(port, admin_port, search, tickets, access_log, deny=("tickets__delete_*",),
               servers=("search", "tickets"), tickets_limit=None, checks=False, plugins=None,
               store=None, carol_limit=2, tickets_idle=None):
    srv = []
    if "search" in servers:
        srv.append({"name": "search", "endpoint": search.url(),
                    "auth": {"header": {"Authorization": "Bearer upstream-search-key"}},
                    "timeouts": {"connect": Raw("2s"), "first_byte": Raw("10s")}})
    if "tickets" in servers:
        t = {"name": "tickets", "endpoint": tickets.url(), "timeouts": {"connect": Raw("2s")}}
        if tickets_idle:
            t["timeouts"]["idle"] = Raw(tickets_idle)
        if tickets_limit:
            t["limits"] = [{"requests": tickets_limit, "window": Raw("1h")}]
        if checks:
            t["checks"] = {"active": {"interval": Raw("200ms"), "timeout": Raw("1s"),
                                      "failures": 1, "successes": 1}}
        srv.append(t)
    cfg = {
        "server": {"listen": [{"address": "127.0.0.1:%d" % port}], "workers": 2},
        "admin": {"listen": "127.0.0.1:%d" % admin_port, "key": Raw("testkey")},
        "log": {"level": Raw("debug"), "access_log": access_log},
        "mcp_servers": srv,
        "consumers": [
            {"name": "alice", "keys": ["alice-key"]},
            {"name": "bob", "keys": ["bob-key"],
             "mcp_tools": {"allow": ["search__*"], "deny": ["search__whoami"],
                           "prompts": {"allow": ["search__summarize"]},
                           "resources": {"deny": ["*"]}}},
            {"name": "carol", "keys": ["carol-key"],
             "mcp_tools": {"limits": [{"requests": carol_limit, "window": Raw("1h")}]}},
        ],
        "routes": [{"name": "tools", "type": Raw("mcp"), "paths": ["/mcp"],
                    "auth": Raw("key-auth"),
                    "mcp": {"servers": list(servers),
                            "tools": {"allow": [], "deny": list(deny)},
                            "prompts": {"deny": ["*__secret_*"]},
                            "resources": {"deny": ["search__search://secret"]}}}],
    }
    if plugins:
        cfg["routes"][0]["plugins"] = plugins
    if store:
        cfg["store"] = store
    return harness.to_yaml(cfg) + "\n"


def rpc(port, method, params=None, session=None, key="alice-key", id_=1, extra=None,
        version="2025-06-18"):
    """One JSON-RPC message POSTed to the gateway on port: (response, the JSON-RPC answer:
    the JSON body, or the last message of an SSE answer)."""
    headers = {"Authorization": "Bearer " + key, "Accept": ACCEPT}
    if session:
        headers["Mcp-Session-Id"] = session
        headers["MCP-Protocol-Version"] = version
    headers.update(extra or {})
    msg = {"jsonrpc": "2.0", "method": method}
    if id_ is not None:
        msg["id"] = id_
    if params is not None:
        msg["params"] = params
    r = harness.http_request(port, "POST", "/mcp", headers=headers, json_body=msg)
    return r, rpc_body(r)


def rpc_body(r):
    ctype = r.header("content-type") or ""
    if ctype.startswith("text/event-stream"):
        msgs = [json.loads(e.data) for e in harness.parse_sse(r.body) if e.data]
        return msgs[-1] if msgs else None
    return json.loads(r.body) if r.body.strip() else None


def open_session(test, port, key="alice-key", version="2025-06-18"):
    """initialize + notifications/initialized on the gateway on port; the session id."""
    r, b = rpc(port, "initialize", {"protocolVersion": version, "capabilities": {},
                                    "clientInfo": {"name": "raw", "version": "1"}}, key=key)
    test.assertEqual(r.status, 200, r)
    test.assertEqual(b["result"]["protocolVersion"], version)
    sid = r.header("mcp-session-id")
    test.assertTrue(sid)
    r, _ = rpc(port, "notifications/initialized", session=sid, key=key, id_=None,
               version=version)
    test.assertEqual(r.status, 202, r)
    return sid


class MCPTest(harness.SluiceTestCase):

    def setUp(self):
        super().setUp()
        reason = prepare_node(self.workdir)
        if reason:
            self.skipTest(reason)
        self.search = NodeServer(self.workdir, "search")
        self.tickets = NodeServer(self.workdir, "tickets")
        self.port, self.admin_port = harness.free_port(), harness.free_port()
        self.access_log = os.path.join(self.workdir, "access.log")
        self.gw = self.start_sluice(self.config(), port=self.port)

    def config(self, **kw):
        return mcp_config(self.port, self.admin_port, self.search, self.tickets,
                          self.access_log, **kw)

    def log_files(self):
        return super().log_files() + [self.search.log_path, self.tickets.log_path,
                                      os.path.join(self.workdir, "client.log")]

    # -- helpers ---------------------------------------------------------------------
    def client(self, scenario, key="alice-key", wait=True, **env):
        e = dict(os.environ, URL="http://127.0.0.1:%d/mcp" % self.port, API_KEY=key,
                 SCENARIO=scenario, **{k.upper(): str(v) for k, v in env.items()})
        out = os.path.join(self.workdir, "client-%s.out" % scenario)
        p = subprocess.Popen([shutil.which("node"), os.path.join(MCP_DIR, "client.mjs")],
                             cwd=MCP_DIR, env=e, stdout=open(out, "wb"),
                             stderr=open(os.path.join(self.workdir, "client.log"), "ab"),
                             start_new_session=True)
        if not wait:
            return p, out
        try:
            p.wait(NODE_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            self.fail("client.mjs %s did not finish" % scenario)
        lines = harness.read_text(out).strip().splitlines()
        self.assertTrue(lines, "client.mjs printed nothing")
        return json.loads(lines[-1])

    def rpc(self, method, params=None, **kw):
        return rpc(self.port, method, params, **kw)

    def session(self, key="alice-key", version="2025-06-18"):
        return open_session(self, self.port, key, version)

    def batch(self, msgs, session, key="alice-key", version="2025-03-26"):
        """POST a JSON-RPC batch; (response, {id: message} of every message in the answer,
        the list of those messages in the order they came)."""
        headers = {"Authorization": "Bearer " + key, "Accept": ACCEPT,
                   "Mcp-Session-Id": session, "MCP-Protocol-Version": version}
        r = harness.http_request(self.port, "POST", "/mcp", headers=headers,
                                 body=json.dumps(msgs).encode())
        ctype = r.header("content-type") or ""
        if ctype.startswith("text/event-stream"):
            got = [json.loads(e.data) for e in harness.parse_sse(r.body) if e.data]
        elif r.body.strip():
            got = json.loads(r.body)
        else:
            got = []
        if isinstance(got, dict):
            return r, {}, [got]
        return r, {m.get("id"): m for m in got if "id" in m}, got

    def access_lines(self):
        return [json.loads(l) for l in harness.read_text(self.access_log).splitlines()
                if '"type":"mcp"' in l]

    def admin(self, path):
        return harness.http_request(self.admin_port, "GET", path,
                                    headers={"Authorization": "Bearer testkey"})

    # -- tests -----------------------------------------------------------------------
    def test_sdk_full_session(self):
        out = self.client("full")
        s = out["steps"]
        for name in ("initialize", "list_tools", "call", "progress", "whoami", "paginated_call",
                     "prompts", "resources", "ping", "terminate"):
            self.assertTrue(s[name]["ok"], "%s: %r" % (name, s[name]))
        self.assertEqual(s["initialize"]["server"]["name"], "sluice/tools")
        self.assertTrue(s["initialize"]["session"].startswith("s1."))
        # merged, prefixed, the route's deny list applied, tickets' 3 pages followed
        self.assertEqual(s["list_tools"]["names"],
                         SEARCH_TOOLS + ["tickets__create_ticket", "tickets__list_tickets",
                                         "tickets__close_ticket"])
        self.assertEqual(s["list_tools"]["pages"], 3)
        self.assertEqual(s["call"]["text"], "results for sluice")
        self.assertEqual(s["progress"]["progress"], [1, 2, 3, 4])
        self.assertEqual(s["progress"]["text"], "done in 4 steps")
        self.assertEqual(s["paginated_call"]["text"], "close_ticket: x")
        # the server's credentials from the configuration, never the client's key
        self.assertEqual(json.loads(s["whoami"]["text"]),
                         {"authorization": "Bearer upstream-search-key"})
        # a denied tool: a JSON-RPC error, and it never reached the server
        self.assertFalse(s["denied_call"]["ok"])
        self.assertEqual(s["denied_call"]["code"], -32602)
        self.assertEqual(s["unknown_call"]["code"], -32602)
        ts = self.tickets.stats()
        self.assertNotIn("delete_ticket", ts["calls"])
        self.assertEqual(ts["calls"].get("close_ticket"), 1)
        self.assertEqual(s["prompts"]["names"], ["search__summarize"])
        self.assertEqual(s["prompts"]["text"], "Summarize: abc")
        self.assertEqual(s["resources"]["uris"], ["search__search://index"])
        self.assertEqual(s["resources"]["text"], "the whole index")
        # DELETE ended the session on both servers
        harness.wait_until(lambda: self.search.stats()["sessions_closed"] == 1 and
                           self.tickets.stats()["sessions_closed"] == 1,
                           message="both servers to see the session end")
        for st in (self.search.stats(), self.tickets.stats()):
            self.assertEqual(st["initialize"], 1)
            self.assertNotIn("alice-key", json.dumps(st))
        # one access-log line per message, hashed session
        lines = harness.wait_until(
            lambda: [l for l in self.access_lines() if l["http_method"] == "DELETE"] and
            self.access_lines(), message="the DELETE's access-log line")
        calls = [l for l in lines if l["rpc_method"] == "tools/call"]
        self.assertEqual(sorted(l["tool"] for l in calls),
                         sorted(["search", "slow_search", "whoami", "close_ticket",
                                 "delete_ticket", "nosuch__tool"]))
        denied = [l for l in calls if l["tool"] == "delete_ticket"][0]
        self.assertEqual((denied["outcome"], denied["upstream"], denied["rpc_error"]),
                         ("denied", "tickets", -32602))
        sess = {l["session"] for l in lines}
        self.assertEqual(len(sess), 1)
        self.assertRegex(sess.pop(), r"^[0-9a-f]{12}$")
        self.assertNotIn(s["initialize"]["session"], harness.read_text(self.access_log))
        for l in lines:
            self.assertEqual(l["consumer"], "alice")
        # metrics: bounded labels
        text = self.admin("/metrics").body.decode()
        self.assertRegex(text, r'sluice_mcp_requests_total\{route="tools",server="search",'
                               r'method="tools/call",tool="search",outcome="ok"\} 1')
        self.assertRegex(text, r'sluice_mcp_requests_total\{route="tools",server="tickets",'
                               r'method="tools/call",tool="other",outcome="denied"\} 1')
        self.assertIn("sluice_mcp_request_duration_seconds_bucket", text)

    def test_consumer_filter_and_rate_limits(self):
        out = self.client("list", key="bob-key")
        self.assertEqual(out["steps"]["list_tools"]["names"],
                         ["search__search", "search__slow_search"])
        out = self.client("calls", key="bob-key", tool="search__whoami", calls=1)
        self.assertEqual(out["calls"][0]["code"], -32602)
        self.assertNotIn("whoami", self.search.stats()["calls"])
        # carol: 2 calls an hour; the third answers 429 with Retry-After, never forwarded
        sid = self.session("carol-key")
        for i in range(2):
            r, b = self.rpc("tools/call", {"name": "search__search",
                                           "arguments": {"query": "c%d" % i}},
                            session=sid, key="carol-key", id_=10 + i)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(b["result"]["content"][0]["text"], "results for c%d" % i)
        r, b = self.rpc("tools/call", {"name": "search__search", "arguments": {"query": "c2"}},
                        session=sid, key="carol-key", id_=12)
        self.assertEqual(r.status, 429, r)
        self.assertGreater(int(r.header("retry-after")), 0)
        self.assertEqual((b["id"], b["error"]["code"]), (12, -32029))
        self.assertEqual(self.search.stats()["calls"]["search"], 2)
        # the SDK sees the 429 too
        out = self.client("calls", key="carol-key", calls=1)
        self.assertEqual(out["calls"][0]["code"], 429)

    def test_server_limit(self):
        self.gw.reload(self.config(tickets_limit=1))
        self.gw.wait_log(r"reloaded")
        sid = self.session()
        r, b = self.rpc("tools/call", {"name": "tickets__create_ticket", "arguments": {}},
                        session=sid, id_=1)
        self.assertEqual((r.status, "result" in b), (200, True), r)
        # another consumer's call: the server's own limit counts every consumer
        carol = self.session("carol-key")
        r, b = self.rpc("tools/call", {"name": "tickets__create_ticket", "arguments": {}},
                        session=carol, key="carol-key", id_=2)
        self.assertEqual(r.status, 429, r)
        self.assertIn("mcp_server:tickets:requests:1h", b["error"]["message"])
        # the other server is not limited
        r, b = self.rpc("tools/call", {"name": "search__search", "arguments": {"query": "x"}},
                        session=sid, id_=3)
        self.assertEqual(r.status, 200, r)

    def test_wrong_key_401(self):
        out = self.client("list", key="wrong-key")
        self.assertFalse(out["steps"]["initialize"]["ok"])
        self.assertEqual(out["steps"]["initialize"]["code"], 401)
        r, b = self.rpc("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                       "clientInfo": {"name": "x", "version": "1"}},
                        key="wrong-key")
        self.assertEqual(r.status, 401)
        self.assertEqual(b["error"]["code"], -32001)
        r = harness.http_request(self.port, "POST", "/mcp", headers={"Accept": ACCEPT},
                                 json_body={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        self.assertEqual(r.status, 401)
        self.assertEqual(self.search.stats()["initialize"], 0)
        self.assertEqual(self.tickets.stats()["initialize"], 0)

    def test_sessions_are_pinned_across_workers_and_unforgeable(self):
        sid = self.session()
        # fresh connections spread over both workers; every one finds the session
        for i in range(12):
            r, b = self.rpc("tools/call", {"name": "search__search",
                                           "arguments": {"query": "p%d" % i}},
                            session=sid, id_=100 + i)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(b["result"]["content"][0]["text"], "results for p%d" % i)
        self.assertEqual(self.search.stats()["initialize"], 1)
        # a tampered, a foreign-consumer and a garbage id: 404, nothing forwarded
        before = self.search.stats()["calls"]["search"]
        bad = sid[:-3] + ("AAA" if not sid.endswith("AAA") else "BBB")
        for s, key in ((bad, "alice-key"), (sid, "bob-key"), ("nonsense", "alice-key")):
            r, b = self.rpc("tools/call", {"name": "search__search", "arguments": {"query": "z"}},
                            session=s, key=key)
            self.assertEqual(r.status, 404, r)
            self.assertEqual(b["error"]["code"], -32004)
        self.assertEqual(self.search.stats()["calls"]["search"], before)
        # the admin API lists the session and the servers' health
        a = self.admin("/mcp").json()
        self.assertEqual(a["open_sessions"], 1)
        self.assertEqual(sorted(x["name"] for x in a["servers"]), ["search", "tickets"])
        self.assertTrue(all(x["healthy"] for x in a["servers"]))
        self.assertEqual(a["sessions"][0]["consumer"], "alice")
        self.assertEqual(a["sessions"][0]["servers"], "search,tickets")
        routes = self.admin("/routes").json()
        self.assertEqual([(x["name"], x["type"], x.get("servers")) for x in routes],
                         [("tools", "mcp", ["search", "tickets"])])
        # the server-to-client stream (GET) is merged and ends when asked to
        with harness.HTTPConn(self.port) as c:
            c.send_request("GET", "/mcp", headers={"Authorization": "Bearer alice-key",
                                                   "Accept": "text/event-stream",
                                                   "Mcp-Session-Id": sid})
            head = c.read_head()
            self.assertEqual(head.status, 200)
            self.assertTrue(head.header("content-type").startswith("text/event-stream"))
        harness.wait_until(lambda: self.search.stats()["get_streams"] >= 1 and
                           self.tickets.stats()["get_streams"] >= 1,
                           message="both servers to get the GET stream")
        r = harness.http_request(self.port, "DELETE", "/mcp", headers={
            "Authorization": "Bearer alice-key", "Mcp-Session-Id": sid})
        self.assertEqual(r.status, 200)
        harness.wait_until(lambda: self.admin("/mcp").json()["open_sessions"] == 0,
                           message="the session to be closed in the admin view")

    def test_server_killed_mid_session(self):
        flag = os.path.join(self.workdir, "killed.flag")
        p, out = self.client("killed", wait=False, wait_file=flag, tool_dead="tickets__list_tickets",
                             tool_alive="search__search")
        harness.wait_until(lambda: '"ready"' in harness.read_text(out),
                           timeout=NODE_TIMEOUT, message="the client to initialise")
        self.tickets.kill()
        open(flag, "w").close()
        p.wait(NODE_TIMEOUT)
        res = json.loads(harness.read_text(out).strip().splitlines()[-1])
        s = res["steps"]
        self.assertTrue(s["list_tools"]["ok"])
        self.assertFalse(s["dead_call"]["ok"])
        self.assertEqual(s["dead_call"]["code"], -32050)
        self.assertIn("tickets", s["dead_call"]["error"])
        self.assertTrue(s["alive_call"]["ok"], s["alive_call"])
        self.assertEqual(s["alive_call"]["text"], "results for still")
        self.assertTrue(s["list_after"]["ok"], s["list_after"])
        self.assertEqual(s["list_after"]["names"], SEARCH_TOOLS)

    def test_reload_keeps_sessions_and_removing_a_server_ends_them(self):
        old = self.session()
        # a reload that denies search__search: the open session keeps its snapshot
        off = self.gw.reload(self.config(deny=("tickets__delete_*", "search__search")))
        self.gw.wait_log(r"reloaded", since=off)
        r, b = self.rpc("tools/call", {"name": "search__search", "arguments": {"query": "o"}},
                        session=old, id_=5)
        self.assertEqual((r.status, b["result"]["content"][0]["text"]), (200, "results for o"))
        new = self.session()
        r, b = self.rpc("tools/call", {"name": "search__search", "arguments": {"query": "n"}},
                        session=new, id_=6)
        self.assertEqual(b["error"]["code"], -32602)
        # removing tickets ends every session that has it: 404, the client re-initialises
        off = self.gw.reload(self.config(servers=("search",)))
        self.gw.wait_log(r"reloaded", since=off)
        for sid in (old, new):
            r, b = self.rpc("tools/call", {"name": "search__search", "arguments": {"q": 1}},
                            session=sid, id_=7)
            self.assertEqual(r.status, 404, r)
            self.assertEqual(b["error"]["code"], -32004)
        # their server sessions were ended too (DELETE with each one's own session id): on
        # search, which stays, and on tickets, which is gone from the file but still runs
        harness.wait_until(lambda: self.search.stats()["sessions_closed"] == 2 and
                           self.tickets.stats()["sessions_closed"] == 2,
                           message="both servers to see both sessions end")
        self.assertEqual((self.search.stats()["deletes"], self.tickets.stats()["deletes"]),
                         (2, 2))
        self.gw.wait_log(r"2 open sessions used a removed server", since=off)
        out = self.client("list")
        self.assertEqual(out["steps"]["list_tools"]["names"], SEARCH_TOOLS)

    def test_active_checks_by_ping(self):
        off = self.gw.reload(self.config(checks=True))
        self.gw.wait_log(r"mcp server tickets: active checks \(MCP ping\) started", since=off)

        def tickets_state():
            return [x for x in self.admin("/mcp").json()["servers"] if x["name"] == "tickets"][0]

        harness.wait_until(lambda: tickets_state()["probes_ok"] >= 2,
                           message="two successful pings of tickets")
        st = self.tickets.stats()
        self.assertEqual(st["initialize"], 1, "the probe keeps one session: %r" % st)
        self.assertGreaterEqual(st["methods"].get("ping", 0), 2)
        sid = self.session()
        self.tickets.kill()
        harness.wait_until(lambda: not tickets_state()["healthy"],
                           message="tickets to turn unhealthy after a failed ping")
        self.gw.wait_log(r"mcp:tickets.*unhealthy")
        # its tools are gone from the list at once; a call says why; search still answers
        r, b = self.rpc("tools/list", {}, session=sid, id_=2)
        self.assertEqual([t["name"] for t in b["result"]["tools"]], SEARCH_TOOLS)
        r, b = self.rpc("tools/call", {"name": "tickets__list_tickets", "arguments": {}},
                        session=sid, id_=3)
        self.assertEqual(b["error"]["code"], -32050)
        self.assertIn("unhealthy", b["error"]["message"])
        r, b = self.rpc("tools/call", {"name": "search__search", "arguments": {"query": "h"}},
                        session=sid, id_=4)
        self.assertEqual(b["result"]["content"][0]["text"], "results for h")

    def test_prompts_and_resources_filters(self):
        sid = self.session()
        before = dict(self.search.stats()["methods"])
        r, b = self.rpc("prompts/list", {}, session=sid, id_=1)
        self.assertEqual([p["name"] for p in b["result"]["prompts"]], ["search__summarize"])
        r, b = self.rpc("resources/list", {}, session=sid, id_=2)
        self.assertEqual([x["uri"] for x in b["result"]["resources"]],
                         ["search__search://index"])
        # hidden ones answer as ones that do not exist, and are never forwarded
        r, b = self.rpc("prompts/get", {"name": "search__secret_prompt"}, session=sid, id_=3)
        self.assertEqual((r.status, b["id"], b["error"]["code"]), (200, 3, -32602))
        self.assertIn("Unknown prompt", b["error"]["message"])
        r, b = self.rpc("resources/read", {"uri": "search__search://secret"}, session=sid, id_=4)
        self.assertEqual((r.status, b["error"]["code"]), (200, -32002))
        r, b = self.rpc("resources/subscribe", {"uri": "search__search://secret"}, session=sid,
                        id_=5)
        self.assertEqual(b["error"]["code"], -32002)
        r, b = self.rpc("completion/complete",
                        {"ref": {"type": "ref/prompt", "name": "search__secret_prompt"},
                         "argument": {"name": "x", "value": ""}}, session=sid, id_=6)
        self.assertEqual(b["error"]["code"], -32602)
        after = self.search.stats()["methods"]
        for m in ("prompts/get", "resources/read", "resources/subscribe", "completion/complete"):
            self.assertEqual(after.get(m, 0), before.get(m, 0), m)
        # the visible ones work
        r, b = self.rpc("resources/read", {"uri": "search__search://index"}, session=sid, id_=7)
        self.assertEqual(b["result"]["contents"][0]["text"], "the whole index")
        # bob's own lists narrow the route's: no resource at all, only summarize
        bob = self.session("bob-key")
        r, b = self.rpc("resources/list", {}, session=bob, key="bob-key", id_=8)
        self.assertEqual(b["result"]["resources"], [])
        r, b = self.rpc("resources/read", {"uri": "search__search://index"}, session=bob,
                        key="bob-key", id_=9)
        self.assertEqual(b["error"]["code"], -32002)
        r, b = self.rpc("prompts/get", {"name": "search__summarize", "arguments": {"text": "t"}},
                        session=bob, key="bob-key", id_=10)
        self.assertEqual(b["result"]["messages"][0]["content"]["text"], "Summarize: t")
        denied = harness.wait_until(
            lambda: [l for l in self.access_lines() if l["outcome"] == "denied"]
            if len([l for l in self.access_lines() if l["outcome"] == "denied"]) == 5 else None,
            message="five denied lines in the access log")
        self.assertEqual({(l["upstream"], l["rpc_error"]) for l in denied},
                         {("search", -32602), ("search", -32002)})

    def test_policies_over_tool_arguments(self):
        mock = self.start_mock()
        plugins = [{"prompt_guard": {"deny": [Raw('"(?i)drop\\\\s+table"')]}},
                   {"request_limits": {"max_prompt_tokens": 1000}},
                   {"moderation": {"endpoint": mock.url("/v1/moderations"),
                                   "on": [Raw("request")]}}]
        off = self.gw.reload(self.config(plugins=plugins))
        self.gw.wait_log(r"reloaded", since=off)
        sid = self.session()

        def call(args, i):
            return self.rpc("tools/call", {"name": "search__search", "arguments": args},
                            session=sid, id_=i)

        r, b = call({"query": "sluice"}, 1)
        self.assertEqual(b["result"]["content"][0]["text"], "results for sluice")
        # a deny pattern in any string argument, nested too: refused, never forwarded
        for i, args in enumerate(({"query": "please DROP  TABLE users"},
                                  {"query": "x", "opts": {"deep": [1, "then drop table t"]}}), 2):
            r, b = call(args, i)
            self.assertEqual((r.status, b["id"], b["error"]["code"]), (200, i, -32040), b)
            self.assertIn("prompt_blocked", b["error"]["message"])
            self.assertEqual(b["error"]["data"]["reason"], "policy_refused")
        # moderation decides asynchronously: a flagged argument is refused too
        r, b = call({"query": "how to shoplift"}, 4)
        self.assertEqual(b["error"]["code"], -32040)
        self.assertIn("content_flagged", b["error"]["message"])
        # request_limits counts the arguments' text
        r, b = call({"query": "word " * 3000}, 5)
        self.assertEqual(b["error"]["code"], -32040)
        self.assertIn("max_prompt_tokens", b["error"]["message"])
        self.assertEqual(self.search.stats()["calls"], {"search": 1})
        seen = json.dumps([q.get("body") for q in mock.requests("/v1/moderations")])
        self.assertIn("shoplift", seen)
        self.assertIn("sluice", seen)
        # the SDK's client gets the same JSON-RPC error
        out = self.client("calls", calls=1, tool="search__search", query="drop table sdk")
        self.assertEqual(out["calls"][0]["code"], -32040)
        self.assertEqual(self.search.stats()["calls"], {"search": 1})
        lines = harness.wait_until(
            lambda: [l for l in self.access_lines() if l["outcome"] == "policy_refused"]
            if len([l for l in self.access_lines() if l["outcome"] == "policy_refused"]) == 5
            else None, message="five policy_refused lines")
        # each line's "policy" has the model access log's shape: every decision, counted
        act = lambda p, a: [{"count": 1, "policy": p, "action": a}]
        self.assertEqual([l["policy"] for l in lines],
                         [act("prompt_guard", "blocked")] * 2 + [act("moderation", "blocked"),
                          act("request_limits", "refused"), act("prompt_guard", "blocked")])
        passed = [l for l in self.access_lines()
                  if l["rpc_method"] == "tools/call" and l["outcome"] == "ok"]
        self.assertEqual([l["policy"] for l in passed], [None])
        # and sluice_policy_actions_total counts them like a model request's (the metric is
        # recorded just after the line is written: wait for it)
        want = {("prompt_guard", "blocked"): 3, ("moderation", "blocked"): 1,
                ("request_limits", "refused"): 1}

        def counted():
            text = self.admin("/metrics").body.decode()
            got = {(m[0], m[1]): int(m[2]) for m in re.findall(
                r'^sluice_policy_actions_total\{route="tools",policy="([^"]+)",'
                r'action="([^"]+)"\} (\d+)$', text, re.M)}
            return got if got == want else None
        harness.wait_until(counted, message="sluice_policy_actions_total for route tools: %r"
                           % want)

    def test_server_idle_timeout(self):
        """mcp_servers[].timeouts.idle: a server whose answer stream goes silent for longer is
        cut, and the client gets a JSON-RPC error instead of waiting."""
        off = self.gw.reload(self.config(tickets_idle="300ms"))
        self.gw.wait_log(r"reloaded", since=off)
        sid = self.session()
        call = lambda delay, i: self.rpc(
            "tools/call", {"name": "tickets__create_ticket",
                           "arguments": {"title": "t%d" % i, "delay_ms": delay}},
            session=sid, id_=i)
        r, b = call(0, 1)
        self.assertEqual(b["result"]["content"][0]["text"], "create_ticket: t1")
        r, b = call(3000, 2)  # silent ten times longer than the idle timeout
        self.assertEqual(b["id"], 2, b)
        self.assertEqual(b["error"]["code"], -32050, b)
        self.assertIn("no data within idle timeout", b["error"]["message"])
        line = harness.wait_until(
            lambda: [l for l in self.access_lines()
                     if l["rpc_method"] == "tools/call" and l["outcome"] == "timeout"],
            message="the timed-out call's access-log line")[0]
        self.assertEqual((line["upstream"], line["tool"]), ("tickets", "create_ticket"), line)

    def test_batches_2025_03_26(self):
        off = self.gw.reload(self.config(plugins=[
            {"prompt_guard": {"deny": [Raw('"(?i)drop\\\\s+table"')]}}]))
        self.gw.wait_log(r"reloaded", since=off)
        sid = self.session(version="2025-03-26")
        call = lambda i, name, args: {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                                      "params": {"name": name, "arguments": args}}
        msgs = [call(1, "search__search", {"query": "b1"}),
                call(2, "tickets__delete_ticket", {}),            # denied by the route
                {"jsonrpc": "2.0", "id": 3, "method": "ping"},    # answered by Sluice
                {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"},
                {"jsonrpc": "2.0", "id": "four", "method": "tools/list"},
                call(5, "search__search", {"query": "drop table x"}),  # refused by the guard
                call(6, "tickets__create_ticket", {"title": "t6"}),
                {"nope": 1}]                                      # not a message
        r, by_id, got = self.batch(msgs, sid)
        self.assertEqual(r.status, 200, r)
        # the servers answer calls with streams: the batch is one SSE stream
        self.assertTrue(r.header("content-type").startswith("text/event-stream"), r)
        self.assertEqual(len(got), 7, got)
        self.assertEqual(by_id[1]["result"]["content"][0]["text"], "results for b1")
        self.assertEqual(by_id[2]["error"]["code"], -32602)
        self.assertEqual(by_id[3], {"jsonrpc": "2.0", "id": 3, "result": {}})
        names = [t["name"] for t in by_id["four"]["result"]["tools"]]
        self.assertIn("search__search", names)
        self.assertNotIn("tickets__delete_ticket", names)
        self.assertEqual(by_id[5]["error"]["code"], -32040)
        self.assertEqual(by_id[6]["result"]["content"][0]["text"], "create_ticket: t6")
        self.assertEqual([m["error"]["code"] for m in got if m.get("id") is None], [-32600])
        st, tt = self.search.stats(), self.tickets.stats()
        self.assertEqual((st["calls"], tt["calls"]), ({"search": 1}, {"create_ticket": 1}))
        self.assertEqual(st["methods"].get("notifications/roots/list_changed"), 1)
        self.assertEqual(tt["methods"].get("notifications/roots/list_changed"), 1)
        self.assertEqual(set(st["protocol_versions"]), {"2025-03-26"})
        # only answers made here or merged: one JSON array, in the batch's order
        r, by_id, got = self.batch([{"jsonrpc": "2.0", "id": 10, "method": "prompts/list"},
                                    {"jsonrpc": "2.0", "id": 11, "method": "ping"}], sid)
        self.assertEqual((r.status, r.header("content-type")), (200, "application/json"))
        self.assertEqual([m["id"] for m in got], [10, 11])
        self.assertEqual([p["name"] for p in by_id[10]["result"]["prompts"]],
                         ["search__summarize"])
        # notifications only: 202, no body
        r, _, got = self.batch([{"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}],
                               sid)
        self.assertEqual((r.status, got), (202, []))
        # an initialize inside a batch gets its own error
        r, by_id, _ = self.batch([{"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                   "params": {"protocolVersion": "2025-03-26"}}], sid)
        self.assertEqual((r.status, by_id[1]["error"]["code"]), (200, -32600))
        # refused as a whole: empty, responses mixed with requests, no session
        for bad, sess in (([], sid), ([{"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                       {"jsonrpc": "2.0", "id": "s0:1", "result": {}}], sid)):
            r, _, got = self.batch(bad, sess)
            self.assertEqual((r.status, got[0]["error"]["code"]), (400, -32600), got)
        # 2025-06-18 and later have no batches
        new = self.session()
        r, _, got = self.batch([{"jsonrpc": "2.0", "id": 1, "method": "ping"}], new,
                               version="2025-06-18")
        self.assertEqual((r.status, got[0]["error"]["code"]), (400, -32600))
        self.assertIn("2025-06-18", got[0]["error"]["message"])
        # the access log: one line per member (request id <batch>.<n>), one for the batch
        lines = harness.wait_until(
            lambda: [l for l in self.access_lines() if l["rpc_method"] == "batch"]
            and self.access_lines(), message="the batches' lines")
        first = [l for l in lines if l["rpc_method"] == "batch"][0]
        members = [l for l in lines if l["request_id"].startswith(first["request_id"] + ".")]
        self.assertEqual(len(members), 8)
        self.assertEqual(sorted(l["outcome"] for l in members),
                         sorted(["ok", "denied", "ok", "ok", "ok", "policy_refused", "ok",
                                 "invalid"]))

    def test_batch_rate_limits_per_member(self):
        sid = self.session("carol-key", version="2025-03-26")
        msgs = [{"jsonrpc": "2.0", "id": i, "method": "tools/call",
                 "params": {"name": "search__search", "arguments": {"query": "r%d" % i}}}
                for i in range(3)]
        r, by_id, got = self.batch(msgs, sid, key="carol-key")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(sorted(by_id), [0, 1, 2])
        ok = [i for i in by_id if "result" in by_id[i]]
        limited = [i for i in by_id if "error" in by_id[i]]
        self.assertEqual((len(ok), len(limited)), (2, 1), got)
        self.assertEqual(by_id[limited[0]]["error"]["code"], -32029)
        self.assertGreater(int(r.header("retry-after")), 0)
        self.assertEqual(self.search.stats()["calls"]["search"], 2)

    def test_batch_client_gone_mid_stream(self):
        sid = self.session(version="2025-03-26")
        msgs = [{"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                 "params": {"name": "search__slow_search", "arguments": {"steps": 50},
                            "_meta": {"progressToken": "p"}}},
                {"jsonrpc": "2.0", "id": 2, "method": "ping"}]
        with harness.HTTPConn(self.port) as c:
            c.send_request("POST", "/mcp", headers={
                "Authorization": "Bearer alice-key", "Accept": ACCEPT, "Mcp-Session-Id": sid,
                "MCP-Protocol-Version": "2025-03-26", "Content-Type": "application/json"},
                body=json.dumps(msgs).encode())
            head = c.read_head()
            self.assertEqual(head.status, 200)
            self.assertTrue(head.header("content-type").startswith("text/event-stream"))
        # the client left: the batch and its unfinished member end, the call upstream too
        lines = harness.wait_until(
            lambda: [l for l in self.access_lines() if l["rpc_method"] == "batch"],
            message="the batch's line")
        # (the head was sent: its status stays, as for one streamed call)
        self.assertEqual((lines[0]["status"], lines[0]["outcome"]), (200, "client_gone"))
        members = [l for l in self.access_lines()
                   if l["request_id"].startswith(lines[0]["request_id"] + ".")]
        self.assertEqual(sorted(l["outcome"] for l in members), ["client_gone", "ok"])
        r, b = self.rpc("ping", session=sid, id_=3, version="2025-03-26")
        self.assertEqual(b["result"], {})

    def test_protocol_errors(self):
        h = {"Authorization": "Bearer alice-key", "Accept": ACCEPT}
        r = harness.http_request(self.port, "POST", "/mcp", headers=h, body=b"{not json")
        self.assertEqual((r.status, r.json()["error"]["code"]), (400, -32700))
        r = harness.http_request(self.port, "POST", "/mcp", headers=h,
                                 json_body={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        self.assertEqual((r.status, r.json()["error"]["code"]), (400, -32600))
        r = harness.http_request(self.port, "POST", "/mcp", headers=h,
                                 json_body=[{"jsonrpc": "2.0", "id": 1, "method": "ping"}])
        self.assertEqual(r.status, 400)
        r = harness.http_request(self.port, "PUT", "/mcp", headers=h, body=b"{}")
        self.assertEqual(r.status, 405)
        r = harness.http_request(self.port, "POST", "/mcp", headers=h, body=b"{}",
                                 content_type="text/plain")
        self.assertEqual(r.status, 415)
        sid = self.session()
        r, b = self.rpc("tools/list", {"cursor": "forged"}, session=sid)
        self.assertEqual(b["error"]["code"], -32602)
        r, b = self.rpc("ping", session=sid, id_="p")
        self.assertEqual(b, {"jsonrpc": "2.0", "id": "p", "result": {}})
        r, _ = self.rpc("ping", session=sid, extra={"MCP-Protocol-Version": "1999-01-01"})
        self.assertEqual(r.status, 400)


def sse_id(ev):
    """The id field of an SSEEvent, or None."""
    for line in ev.raw.decode().splitlines():
        if line.startswith("id:"):
            return line[3:].strip()
    return None


class MCPResumeTest(harness.SluiceTestCase):
    """Resumability (Last-Event-ID) through the gateway: the servers keep their events
    (servers.mjs --resumable), the client drops a POST's stream part-way and resumes it with
    a GET carrying the last event id it saw, as the spec has it."""

    def setUp(self):
        super().setUp()
        reason = prepare_node(self.workdir)
        if reason:
            self.skipTest(reason)
        self.search = NodeServer(self.workdir, "search", args=("--resumable", "1"))
        self.tickets = NodeServer(self.workdir, "tickets", args=("--resumable", "1"))
        self.port, self.admin_port = harness.free_port(), harness.free_port()
        self.access_log = os.path.join(self.workdir, "access.log")
        self.gw = self.start_sluice(mcp_config(self.port, self.admin_port, self.search,
                                               self.tickets, self.access_log), port=self.port)

    def log_files(self):
        return super().log_files() + [self.search.log_path, self.tickets.log_path]

    def headers(self, sid, version):
        return {"Authorization": "Bearer alice-key", "Accept": ACCEPT, "Mcp-Session-Id": sid,
                "MCP-Protocol-Version": version}

    def read_until(self, sid, version, body, stop):
        """POST body, read its SSE stream until stop(message) is true, then drop the
        connection. The messages and event ids seen, in order."""
        seen = []
        with harness.HTTPConn(self.port) as c:
            c.send_request("POST", "/mcp", self.headers(sid, version),
                           body=json.dumps(body).encode())
            head = c.read_head()
            self.assertEqual(head.status, 200, head)
            self.assertTrue(head.header("content-type").startswith("text/event-stream"), head)
            deadline = time.monotonic() + harness.DEADLINE
            for ev in c.iter_events():
                if ev.data:
                    seen.append((json.loads(ev.data), sse_id(ev)))
                    if stop(seen[-1][0]):
                        break
                if time.monotonic() > deadline:
                    self.fail("the POST's stream: no stop within %ds; got %r"
                              % (harness.DEADLINE, seen))
        return seen

    def resume(self, sid, version, last_id, until):
        """GET with Last-Event-ID: the messages of the resumed stream until until(msgs).
        Sent once search has seen the dropped stream go (a resume that arrives first finds
        the stream still attached and is refused 409, as the SDK does)."""
        harness.wait_until(lambda: self.search.stats()["aborted_posts"] >= 1,
                           message="search to see the dropped POST stream close")
        got = []
        h = dict(self.headers(sid, version), Accept="text/event-stream")
        h["Last-Event-ID"] = last_id
        with harness.HTTPConn(self.port) as c:
            c.send_request("GET", "/mcp", h)
            head = c.read_head()
            self.assertEqual(head.status, 200, head)
            deadline = time.monotonic() + harness.DEADLINE
            for ev in c.iter_events():
                if ev.data:
                    got.append(json.loads(ev.data))
                if until(got):
                    break
                if time.monotonic() > deadline:  # keep-alive comments never time out
                    self.fail("the resumed stream did not finish within %ds; got %r"
                              % (harness.DEADLINE, got))
        return got

    def slow_call(self, id_, steps):
        return {"jsonrpc": "2.0", "id": id_, "method": "tools/call",
                "params": {"name": "search__slow_search", "arguments": {"steps": steps},
                           "_meta": {"progressToken": "t%s" % id_}}}

    @staticmethod
    def progress(msgs, token):
        return [m["params"]["progress"] for m in msgs
                if m.get("method") == "notifications/progress"
                and m["params"]["progressToken"] == token]

    def test_post_stream_resumed_by_get(self):
        sid = self.session_of("2025-06-18")
        steps = 40
        seen = self.read_until(sid, "2025-06-18", self.slow_call(1, steps),
                               lambda m: m.get("method") == "notifications/progress"
                               and m["params"]["progress"] == 2)
        last = seen[-1][1]
        self.assertTrue(last, "the server's event ids reach the client: %r" % seen)
        got = self.resume(sid, "2025-06-18", last, lambda ms: any(m.get("id") == 1 for m in ms))
        # nothing lost, nothing repeated: progress 3..steps, then the result
        self.assertEqual(self.progress(got, "t1"), list(range(3, steps + 1)))
        self.assertEqual(got[-1]["result"]["content"][0]["text"], "done in %d steps" % steps)
        self.assertEqual(self.search.stats()["calls"], {"slow_search": 1})

    def test_batch_stream_resumed_by_get(self):
        """A batch's stream merges two servers' streams; its event ids must carry both
        servers' positions, so that resuming from the last one resumes the server whose
        events came earlier too."""
        sid = self.session_of("2025-03-26")
        steps = 100
        batch = [self.slow_call(1, steps),
                 {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                  "params": {"name": "tickets__create_ticket",
                             "arguments": {"title": "r", "delay_ms": 500}}}]
        # read until tickets' (late) answer: the last event seen is tickets' own, after some
        # of search's, and search is still working (100 steps of 20 ms)
        seen = self.read_until(sid, "2025-03-26", batch, lambda m: m.get("id") == 2)
        self.assertEqual(seen[-1][0]["result"]["content"][0]["text"], "create_ticket: r")
        done = self.progress([m for m, _ in seen], "t1")
        self.assertTrue(done and len(done) < steps,
                        "precondition: search had sent events, and had more to send: %r"
                        % done)
        got = self.resume(sid, "2025-03-26", seen[-1][1],
                          lambda ms: any(m.get("id") == 1 for m in ms))
        self.assertEqual(self.progress(got, "t1"), list(range(len(done) + 1, steps + 1)))
        self.assertEqual(got[-1]["result"]["content"][0]["text"], "done in %d steps" % steps)
        self.assertFalse([m for m in got if m.get("id") == 2], "tickets' answer came twice")

    def session_of(self, version):
        return open_session(self, self.port, "alice-key", version)


if __name__ == "__main__":
    harness.main()
