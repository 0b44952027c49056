"""test_mcp_redis.py — the MCP gateway's tool-call rate limits on a real redis-server
(store.type: redis) shared by two gateways.

Two Sluice processes with the same configuration (test_mcp.mcp_config: one `type: mcp`
route over the two SDK servers of tests/mcp/servers.mjs) count tool calls in one Redis: a
consumer's `mcp_tools.limits` and a server's `limits` hold across both gateways, so a
client that spreads its calls over them gets no more than the limit. With each gateway's
own memory counters each would let the limit through — the assertions fail then.
"""

import os

import harness
import quota_helpers as qh
from test_mcp import NodeServer, mcp_config, open_session, prepare_node, rpc


class MCPRedisTest(qh.QuotaTestCase):

    def setUp(self):
        super().setUp()
        reason = prepare_node(self.workdir)
        if reason:
            self.skipTest(reason)
        self.redis = self.start_redis()
        self.search = NodeServer(self.workdir, "search")
        self.tickets = NodeServer(self.workdir, "tickets")
        self.ports = []
        for i in range(2):
            port, admin = harness.free_port(), harness.free_port()
            text = mcp_config(port, admin, self.search, self.tickets,
                              os.path.join(self.workdir, "access%d.log" % i),
                              tickets_limit=3, carol_limit=4,
                              store=qh.redis_store(self.redis.port))
            self.start_sluice(text, port=port, name="gw%d" % i)
            self.ports.append(port)

    def log_files(self):
        return super().log_files() + [self.search.log_path, self.tickets.log_path]

    def call(self, gw, sid, tool, key, i):
        return rpc(self.ports[gw], "tools/call", {"name": tool, "arguments": {
            "query": "q%d" % i, "title": "t%d" % i}}, session=sid, key=key, id_=i)

    def test_consumer_limit_across_two_gateways(self):
        # carol: 4 tool calls an hour, whichever gateway takes them
        sids = [open_session(self, p, "carol-key") for p in self.ports]
        for i in range(4):
            r, b = self.call(i % 2, sids[i % 2], "search__search", "carol-key", i)
            self.assertEqual((r.status, b["result"]["content"][0]["text"]),
                             (200, "results for q%d" % i), r)
        for gw in (0, 1):
            r, b = self.call(gw, sids[gw], "search__search", "carol-key", 10 + gw)
            self.assertEqual((r.status, b["error"]["code"]), (429, -32029), r)
            self.assertGreater(int(r.header("retry-after")), 0)
            self.assertIn("mcp_consumer:carol:*:requests:1h", b["error"]["message"])
        self.assertEqual(self.search.stats()["calls"], {"search": 4})
        self.assertEqual(self.redis.counter_sum("*mcp_consumer:carol:*"), 4)
        # another consumer is not limited by carol's counter
        alice = open_session(self, self.ports[1])
        r, b = self.call(1, alice, "search__search", "alice-key", 20)
        self.assertEqual(r.status, 200, r)

    def test_server_limit_across_two_gateways(self):
        # tickets: 3 tool calls an hour, all consumers and both gateways together
        alice = [open_session(self, p) for p in self.ports]
        carol = open_session(self, self.ports[1], "carol-key")
        for i, (gw, sid, key) in enumerate(((0, alice[0], "alice-key"),
                                            (1, carol, "carol-key"),
                                            (1, alice[1], "alice-key"))):
            r, b = self.call(gw, sid, "tickets__create_ticket", key, i)
            self.assertEqual((r.status, b["result"]["content"][0]["text"]),
                             (200, "create_ticket: t%d" % i), r)
        r, b = self.call(0, alice[0], "tickets__create_ticket", "alice-key", 3)
        self.assertEqual((r.status, b["error"]["code"]), (429, -32029), r)
        self.assertIn("mcp_server:tickets:requests:1h", b["error"]["message"])
        self.assertEqual(self.tickets.stats()["calls"], {"create_ticket": 3})
        self.assertEqual(self.redis.counter_sum("*mcp_server:tickets:*"), 3)
        # the other server has no such limit
        r, b = self.call(1, alice[1], "search__search", "alice-key", 4)
        self.assertEqual(r.status, 200, r)


if __name__ == "__main__":
    harness.main()
