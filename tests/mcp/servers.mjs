// servers.mjs: one real MCP server built with the official SDK's Streamable HTTP server
// transport, for tests/integration/test_mcp.py. Two kinds:
//   --kind search   the high-level McpServer: tools search, slow_search (sends progress
//                   notifications while it works), whoami; prompts summarize and
//                   secret_prompt, resources search://index and search://secret
//   --kind tickets  the low-level Server with a paginated tools/list (2 tools a page)
// Stateful: each initialize gets its own session (Mcp-Session-Id) and transport.
// Also answers GET /_stats (JSON): what arrived, for the test's assertions.
//
// --resumable 1 gives each session's transport an event store: events carry ids and a GET
// with Last-Event-ID replays what followed on that event's stream (also a POST's stream).
//
// Usage: node servers.mjs --kind search --port 0   (prints "listening PORT" when ready)

import http from 'node:http';
import { randomUUID } from 'node:crypto';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { Server } from '@modelcontextprotocol/sdk/server/index.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import {
  ListToolsRequestSchema, CallToolRequestSchema, isInitializeRequest,
} from '@modelcontextprotocol/sdk/types.js';
import { z } from 'zod';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const kind = args.kind || 'search';
const port = Number(args.port || 0);

const stats = {
  kind, initialize: 0, sessions_closed: 0, calls: {}, auth: [], methods: {}, get_streams: 0,
  client_keys_seen: [], deletes: 0, protocol_versions: {},
  aborted_posts: 0, // POST answers whose connection closed before they ended
};
const transports = new Map();

// The SDK's EventStore interface, in memory: ids are "<stream>.<n>", replay sends the events
// of the id's stream that came after it, in order.
function eventStore() {
  const events = [];
  return {
    async storeEvent(streamId, message) {
      const id = `${streamId}.${events.length}`;
      events.push({ id, streamId, message });
      return id;
    },
    async getStreamIdForEventId(id) {
      return events.find((e) => e.id === id)?.streamId;
    },
    async replayEventsAfter(lastEventId, { send }) {
      const at = events.findIndex((e) => e.id === lastEventId);
      if (at < 0) return '';
      const { streamId } = events[at];
      for (const e of events.slice(at + 1)) {
        if (e.streamId === streamId) await send(e.id, e.message);
      }
      return streamId;
    },
  };
}

function countCall(name) { stats.calls[name] = (stats.calls[name] || 0) + 1; }
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function searchServer() {
  const s = new McpServer({ name: 'search', version: '1.0.0' },
    { instructions: 'Searches the index.' });
  s.registerTool('search', {
    description: 'Search the index', inputSchema: { query: z.string() },
  }, async ({ query }) => {
    countCall('search');
    return { content: [{ type: 'text', text: `results for ${query}` }] };
  });
  s.registerTool('slow_search', {
    description: 'Search slowly, reporting progress', inputSchema: { steps: z.number() },
  }, async ({ steps }, extra) => {
    countCall('slow_search');
    const token = extra._meta?.progressToken;
    for (let i = 1; i <= steps; i++) {
      await sleep(20);
      if (token !== undefined) {
        await extra.sendNotification({ method: 'notifications/progress',
          params: { progressToken: token, progress: i, total: steps, message: `step ${i}` } });
      }
    }
    return { content: [{ type: 'text', text: `done in ${steps} steps` }] };
  });
  s.registerTool('whoami', { description: 'Echo what the server was called with' },
    async (extra) => {
      countCall('whoami');
      const h = extra.requestInfo?.headers || {};
      return { content: [{ type: 'text', text: JSON.stringify({ authorization: h.authorization ?? null }) }] };
    });
  s.registerPrompt('summarize', { description: 'Summarize', argsSchema: { text: z.string() } },
    ({ text }) => ({ messages: [{ role: 'user', content: { type: 'text', text: `Summarize: ${text}` } }] }));
  s.registerResource('index', 'search://index', { description: 'The index' },
    async (uri) => ({ contents: [{ uri: uri.href, text: 'the whole index' }] }));
  s.registerPrompt('secret_prompt', { description: 'Hidden by the gateway in the tests' },
    () => ({ messages: [{ role: 'user', content: { type: 'text', text: 'the secret prompt' } }] }));
  s.registerResource('secret', 'search://secret', { description: 'Hidden by the gateway' },
    async (uri) => ({ contents: [{ uri: uri.href, text: 'the secret' }] }));
  return s.server;
}

const TICKET_TOOLS = ['create_ticket', 'list_tickets', 'close_ticket', 'delete_ticket', 'delete_all'];

function ticketsServer() {
  const s = new Server({ name: 'tickets', version: '1.0.0' }, { capabilities: { tools: {} } });
  s.setRequestHandler(ListToolsRequestSchema, async (req) => {
    const start = req.params?.cursor ? Number(req.params.cursor) : 0;
    const page = TICKET_TOOLS.slice(start, start + 2).map((name) => ({
      name, description: `${name} a ticket`,
      inputSchema: { type: 'object', properties: { title: { type: 'string' } } },
    }));
    const next = start + 2 < TICKET_TOOLS.length ? String(start + 2) : undefined;
    return next ? { tools: page, nextCursor: next } : { tools: page };
  });
  s.setRequestHandler(CallToolRequestSchema, async (req) => {
    const name = req.params.name;
    countCall(name);
    if (!TICKET_TOOLS.includes(name)) {
      return { isError: true, content: [{ type: 'text', text: `no tool ${name}` }] };
    }
    const delay = Number(req.params.arguments?.delay_ms || 0); // answer late (resume tests)
    if (delay > 0) await sleep(delay);
    return { content: [{ type: 'text', text: `${name}: ${req.params.arguments?.title ?? 'ok'}` }] };
  });
  return s;
}

async function readBody(req) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : undefined;
}

const httpServer = http.createServer(async (req, res) => {
  try {
    if (req.url === '/_stats') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(stats));
      return;
    }
    stats.auth.push(req.headers.authorization ?? null);
    if (stats.auth.length > 200) stats.auth.shift();
    if (req.headers['x-api-key'] || req.headers.apikey) stats.client_keys_seen.push(true);
    const sid = req.headers['mcp-session-id'];
    let body;
    if (req.method === 'POST') {
      body = await readBody(req);
      const m = body?.method ?? (body && 'result' in body ? 'response' : 'other');
      stats.methods[m] = (stats.methods[m] || 0) + 1;
    }
    if (req.method === 'GET') stats.get_streams++;
    // Counted after the transport's own close handling has run (setImmediate: after this
    // event's listeners and their promise jobs): a resume sent once this has moved cannot
    // find the dropped stream still attached.
    if (req.method === 'POST') {
      res.on('close', () => {
        const aborted = !res.writableFinished;
        setImmediate(() => { if (aborted) stats.aborted_posts++; });
      });
    }
    if (req.method === 'DELETE') stats.deletes++;
    const pv = req.headers['mcp-protocol-version'];
    if (pv) stats.protocol_versions[pv] = (stats.protocol_versions[pv] || 0) + 1;
    let t = sid ? transports.get(sid) : undefined;
    if (!t) {
      if (sid || req.method !== 'POST' || !isInitializeRequest(body)) {
        res.writeHead(sid ? 404 : 400, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ jsonrpc: '2.0', id: null,
          error: { code: -32000, message: sid ? 'Session not found' : 'Bad Request: no session' } }));
        return;
      }
      stats.initialize++;
      t = new StreamableHTTPServerTransport({
        sessionIdGenerator: () => randomUUID(),
        onsessioninitialized: (id) => transports.set(id, t),
        eventStore: args.resumable ? eventStore() : undefined,
      });
      t.onclose = () => {
        if (t.sessionId && transports.delete(t.sessionId)) stats.sessions_closed++;
      };
      const server = kind === 'tickets' ? ticketsServer() : searchServer();
      await server.connect(t);
    }
    await t.handleRequest(req, res, body);
  } catch (e) {
    if (!res.headersSent) {
      res.writeHead(500, { 'content-type': 'text/plain' });
    }
    res.end(String(e?.stack || e));
  }
});

httpServer.listen(port, '127.0.0.1', () => {
  console.log(`listening ${httpServer.address().port}`);
});
