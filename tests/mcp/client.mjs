// client.mjs: the official MCP SDK client (Client + StreamableHTTPClientTransport) through
// Sluice, for tests/integration/test_mcp.py. Prints one JSON line with what it saw.
//
// Environment: URL (the gateway's MCP endpoint), API_KEY, SCENARIO:
//   full      initialize, list tools (every page), call, progress, denied tool, prompts,
//             resources, ping, DELETE (terminateSession)
//   list      initialize and list tools (every page) only; keeps nothing open
//   calls     initialize, then CALLS calls of TOOL (default 3) with arguments {query: QUERY
//             (default q<i>), title}; each outcome recorded
//   killed    initialize, list, then wait for the file WAIT_FILE to appear (the test kills
//             a server meanwhile) and call TOOL_DEAD then TOOL_ALIVE
//   badkey    initialize with a wrong key: the error

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { ListToolsResultSchema } from '@modelcontextprotocol/sdk/types.js';
import fs from 'node:fs';

const url = new URL(process.env.URL);
const key = process.env.API_KEY || '';
const scenario = process.env.SCENARIO || 'full';
const out = { scenario, steps: {} };

function err(e) {
  return { error: String(e?.message ?? e), code: e?.code ?? null, name: e?.constructor?.name ?? null };
}

async function step(name, fn) {
  try {
    out.steps[name] = { ok: true, ...(await fn()) };
  } catch (e) {
    out.steps[name] = { ok: false, ...err(e) };
  }
}

function connect() {
  const transport = new StreamableHTTPClientTransport(url, {
    requestInit: { headers: { Authorization: `Bearer ${key}` } },
    reconnectionOptions: { maxRetries: 0, initialReconnectionDelay: 1000,
      maxReconnectionDelay: 1000, reconnectionDelayGrowFactor: 1 },
  });
  const client = new Client({ name: 'sluice-test', version: '1.0.0' });
  return { client, transport };
}

async function allTools(client) {
  const names = [];
  let cursor, pages = 0;
  do {
    const r = await client.request({ method: 'tools/list', params: cursor ? { cursor } : {} },
      ListToolsResultSchema);
    names.push(...r.tools.map((t) => t.name));
    cursor = r.nextCursor;
    pages++;
  } while (cursor && pages < 20);
  return { names, pages };
}

const text = (r) => r.content?.map((c) => c.text).join('') ?? null;

async function main() {
  const { client, transport } = connect();
  await step('initialize', async () => {
    await client.connect(transport);
    return { session: transport.sessionId ?? null, server: client.getServerVersion(),
      capabilities: client.getServerCapabilities(), protocol: transport.protocolVersion ?? null };
  });
  if (!out.steps.initialize.ok) return;

  if (scenario === 'full' || scenario === 'list' || scenario === 'killed') {
    await step('list_tools', async () => allTools(client));
  }
  if (scenario === 'full') {
    await step('call', async () => {
      const r = await client.callTool({ name: 'search__search', arguments: { query: 'sluice' } });
      return { text: text(r), isError: r.isError ?? false };
    });
    await step('progress', async () => {
      const seen = [];
      const r = await client.callTool({ name: 'search__slow_search', arguments: { steps: 4 } },
        undefined, { onprogress: (p) => seen.push(p) });
      return { text: text(r), progress: seen.map((p) => p.progress), total: seen[0]?.total ?? null };
    });
    await step('whoami', async () => {
      const r = await client.callTool({ name: 'search__whoami', arguments: {} });
      return { text: text(r) };
    });
    await step('paginated_call', async () => {
      const r = await client.callTool({ name: 'tickets__close_ticket', arguments: { title: 'x' } });
      return { text: text(r) };
    });
    await step('denied_call', async () => {
      const r = await client.callTool({ name: 'tickets__delete_ticket', arguments: { title: 'x' } });
      return { text: text(r), unexpected: true };
    });
    await step('unknown_call', async () => {
      const r = await client.callTool({ name: 'nosuch__tool', arguments: {} });
      return { text: text(r), unexpected: true };
    });
    await step('prompts', async () => {
      const l = await client.listPrompts();
      const g = await client.getPrompt({ name: 'search__summarize', arguments: { text: 'abc' } });
      return { names: l.prompts.map((p) => p.name), text: g.messages[0]?.content?.text ?? null };
    });
    await step('resources', async () => {
      const l = await client.listResources();
      const uri = l.resources[0]?.uri;
      const r = await client.readResource({ uri });
      return { uris: l.resources.map((x) => x.uri), text: r.contents[0]?.text ?? null };
    });
    await step('ping', async () => { await client.ping(); return {}; });
    await step('terminate', async () => {
      const sid = transport.sessionId;
      await transport.terminateSession();
      return { session: sid, after: transport.sessionId ?? null };
    });
  }
  if (scenario === 'calls') {
    const n = Number(process.env.CALLS || 3);
    const tool = process.env.TOOL || 'search__search';
    out.calls = [];
    for (let i = 0; i < n; i++) {
      try {
        const query = process.env.QUERY ?? `q${i}`;
        const r = await client.callTool({ name: tool, arguments: { query, title: `t${i}` } });
        out.calls.push({ ok: true, text: text(r) });
      } catch (e) {
        out.calls.push({ ok: false, ...err(e) });
      }
    }
  }
  if (scenario === 'killed') {
    const f = process.env.WAIT_FILE;
    console.log(JSON.stringify({ ready: true, session: transport.sessionId }));
    for (let i = 0; i < 600 && !fs.existsSync(f); i++) await new Promise((r) => setTimeout(r, 50));
    await step('dead_call', async () => {
      const r = await client.callTool({ name: process.env.TOOL_DEAD, arguments: { title: 'x' } });
      return { text: text(r), unexpected: true };
    });
    await step('alive_call', async () => {
      const r = await client.callTool({ name: process.env.TOOL_ALIVE, arguments: { query: 'still' } });
      return { text: text(r) };
    });
    await step('list_after', async () => allTools(client));
  }
  await client.close().catch(() => {});
}

main().catch((e) => { out.fatal = err(e); }).finally(() => {
  console.log(JSON.stringify(out));
  process.exit(0);
});
