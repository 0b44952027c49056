// check.mjs: the official OpenAI Node SDK (openai v4), used exactly as an application would,
// against a running Sluice. tests/integration/test_openai_sdk.py starts sluice-mockllm and
// sluice, installs this directory's locked dependencies and runs this script.
//
// Environment:
//   BASE_URL        http://127.0.0.1:PORT/v1 (the gateway)
//   API_KEY         a consumer key of the gateway
//   QUOTA_API_KEY   optional: a consumer allowed one request per window, on the chat route only
//   RUN_ID          optional: put into every prompt so the test can find the upstream requests
//
// Output: one JSON line on stdout,
//   {"ok": bool, "sdk": "openai", "sdk_version", "node", "run_id",
//    "checks": {NAME: {"status": "pass" | "fail" | "known_failing" | "unexpected_pass",
//                      ...what was seen, "error" when it failed}},
//    "failed": [NAME...]}
// Exit status 0 only when every check passed (a known-failing check that fails as expected
// counts as passed; one that passes must be taken off KNOWN_FAILING, so it fails the run).

import OpenAI from 'openai';
import { VERSION } from 'openai/version';

// The gateway's configuration (the Python test writes these same names).
const MODELS = {
  chat: 'gpt-4o-mini',               // route "chat"
  fallback: 'gpt-4o-fallback',       // route "fallback": first instance answers 503
  completions: 'gpt-3.5-turbo-instruct',
  embeddings: 'text-embedding-3-small',
  unknown: 'no-such-model',
};
const MOCK_TOKENS = 16;              // the mock's default reply length
const EMBEDDING_DIM = 8;             // the mock's vector length

// Checks that fail because of a known Sluice bug: NAME -> where the bug is.
const KNOWN_FAILING = {};

const baseURL = process.env.BASE_URL;
const apiKey = process.env.API_KEY;
const quotaKey = process.env.QUOTA_API_KEY || '';
const runId = process.env.RUN_ID || String(process.pid);
if (!baseURL || !apiKey) {
  console.error('check.mjs: BASE_URL and API_KEY must be set');
  process.exit(2);
}

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20_000 });

const checks = {};

class CheckFailed extends Error {}

function expect(cond, what) {
  if (!cond) throw new CheckFailed(what);
}

function errorInfo(e) {
  return {
    error: `${e?.constructor?.name ?? typeof e}: ${e?.message ?? String(e)}`,
    error_class: e?.constructor?.name ?? null,
    error_status: e?.status ?? null,
  };
}

async function check(name, fn) {
  const seen = {};
  let status;
  try {
    await fn(seen);
    status = KNOWN_FAILING[name] ? 'unexpected_pass' : 'pass';
  } catch (e) {
    Object.assign(seen, errorInfo(e));
    status = KNOWN_FAILING[name] ? 'known_failing' : 'fail';
  }
  if (KNOWN_FAILING[name]) seen.known_bug = KNOWN_FAILING[name];
  checks[name] = { status, ...seen };
}

// Expect `promise` to reject with an instance of cls; returns the error.
async function expectReject(promise, cls, seen) {
  let got;
  try {
    const value = await promise;
    seen.unexpected_result = JSON.stringify(value).slice(0, 300);
  } catch (e) {
    got = e;
  }
  expect(got !== undefined, `the call succeeded; ${cls.name} was expected`);
  Object.assign(seen, errorInfo(got));
  seen.error_type = got.type ?? null;
  seen.error_code = got.code ?? null;
  seen.request_id = got.request_id ?? null;
  expect(got instanceof cls, `expected ${cls.name}, got ${got?.constructor?.name}: ${got?.message}`);
  delete seen.error;
  return got;
}

function prompt(tag) {
  return [{ role: 'user', content: `sdk-${runId}-${tag}: say something` }];
}

// Iterate a stream, returning {chunks, text, finish, usageChunks, last}.
async function drain(stream, seen) {
  const chunks = [];
  let text = '';
  let finish = null;
  seen.deltas = 0;
  for await (const chunk of stream) {
    chunks.push(chunk);
    for (const choice of chunk.choices ?? []) {
      const piece = choice.delta?.content ?? choice.text ?? '';
      if (piece) {
        text += piece;
        seen.deltas++;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    seen.text = text;
  }
  return {
    chunks,
    text,
    finish,
    usageChunks: chunks.filter((c) => c.usage != null),
    last: chunks[chunks.length - 1],
  };
}

function checkUsage(usage, seen) {
  seen.usage = usage ?? null;
  expect(usage && Number.isInteger(usage.prompt_tokens) && usage.prompt_tokens > 0,
    'usage.prompt_tokens is a positive integer');
  expect(usage.completion_tokens === MOCK_TOKENS, `usage.completion_tokens === ${MOCK_TOKENS}`);
  expect(usage.total_tokens === usage.prompt_tokens + usage.completion_tokens,
    'usage.total_tokens === prompt + completion');
}

let chatContent = null;

await check('chat_nonstream', async (seen) => {
  const { data, response } = await client.chat.completions
    .create({ model: MODELS.chat, messages: prompt('chat') })
    .withResponse();
  seen.http_status = response.status;
  seen.request_id = data._request_id ?? null;
  seen.instance = response.headers.get('x-sluice-instance');
  seen.object = data.object;
  seen.content = data.choices?.[0]?.message?.content ?? null;
  seen.finish_reason = data.choices?.[0]?.finish_reason ?? null;
  expect(data.object === 'chat.completion', 'object === "chat.completion"');
  expect(typeof seen.content === 'string' && seen.content.length > 0, 'content is non-empty');
  expect(data.choices[0].message.role === 'assistant', 'role === "assistant"');
  expect(seen.finish_reason === 'stop', 'finish_reason === "stop"');
  expect(typeof seen.request_id === 'string' && seen.request_id.length > 0,
    'the SDK exposes the x-request-id (_request_id)');
  checkUsage(data.usage, seen);
  chatContent = seen.content;
});

await check('chat_stream', async (seen) => {
  const stream = await client.chat.completions.create({
    model: MODELS.chat, messages: prompt('stream'), stream: true,
  });
  const r = await drain(stream, seen);
  seen.chunks = r.chunks.length;
  seen.finish_reason = r.finish;
  seen.usage_chunks = r.usageChunks.length;
  expect(r.chunks.length >= 3, 'at least a role chunk, content and a finish chunk');
  expect(r.chunks.every((c) => c.object === 'chat.completion.chunk'),
    'every chunk is a chat.completion.chunk');
  expect(new Set(r.chunks.map((c) => c.id)).size === 1, 'one id for the whole stream');
  expect(seen.deltas === MOCK_TOKENS, `${MOCK_TOKENS} content deltas`);
  expect(chatContent !== null && r.text === chatContent,
    'the concatenated deltas equal the non-stream content');
  expect(r.finish === 'stop', 'finish_reason === "stop"');
  expect(r.usageChunks.length === 0, 'no usage chunk when include_usage was not asked for');
});

await check('chat_stream_include_usage', async (seen) => {
  const stream = await client.chat.completions.create({
    model: MODELS.chat, messages: prompt('usage'), stream: true,
    stream_options: { include_usage: true },
  });
  const r = await drain(stream, seen);
  seen.chunks = r.chunks.length;
  seen.finish_reason = r.finish;
  seen.usage_chunks = r.usageChunks.length;
  expect(r.text === chatContent, 'the concatenated deltas equal the non-stream content');
  expect(r.finish === 'stop', 'finish_reason === "stop"');
  expect(r.usageChunks.length === 1, 'exactly one chunk carries usage');
  expect(r.last && r.last.usage != null, 'the last chunk carries usage');
  expect(Array.isArray(r.last.choices) && r.last.choices.length === 0,
    'the usage chunk has choices: []');
  checkUsage(r.last.usage, seen);
});

await check('chat_stream_helper', async (seen) => {
  // The SDK's stream helper accumulates the chunks into a whole chat completion.
  const runner = client.beta.chat.completions.stream({
    model: MODELS.chat, messages: prompt('helper'), stream_options: { include_usage: true },
  });
  let text = '';
  runner.on('content', (delta) => { text += delta; });
  const final = await runner.finalChatCompletion();
  seen.text = text;
  seen.content = final.choices?.[0]?.message?.content ?? null;
  seen.finish_reason = final.choices?.[0]?.finish_reason ?? null;
  expect(text === chatContent, 'the content events add up to the non-stream content');
  expect(seen.content === chatContent, 'finalChatCompletion() has the non-stream content');
  expect(seen.finish_reason === 'stop', 'finish_reason === "stop"');
  checkUsage(final.usage, seen);
});

await check('stream_break_aborts', async (seen) => {
  // Leaving the loop early aborts the request; the test checks that the upstream
  // transfer was cancelled (the mock's `cancelled` counter).
  const stream = await client.chat.completions.create({
    model: MODELS.chat, messages: prompt('abort'), stream: true,
    mock: { tokens: 200, itl_ms: 100 },
  });
  seen.deltas = 0;
  for await (const chunk of stream) {
    if (chunk.choices?.[0]?.delta?.content) seen.deltas++;
    if (seen.deltas === 2) break;
  }
  expect(seen.deltas === 2, 'two deltas before leaving the loop');
  expect(stream.controller.signal.aborted, 'the SDK aborted the request');
});

await check('completions', async (seen) => {
  const c = await client.completions.create({
    model: MODELS.completions, prompt: `sdk-${runId}-completions: once upon a time`,
  });
  seen.object = c.object;
  seen.text = c.choices?.[0]?.text ?? null;
  expect(c.object === 'text_completion', 'object === "text_completion"');
  expect(seen.text === chatContent, 'the text equals the chat content (same mock settings)');
  expect(c.choices[0].finish_reason === 'stop', 'finish_reason === "stop"');
  checkUsage(c.usage, seen);
});

await check('completions_stream', async (seen) => {
  const stream = await client.completions.create({
    model: MODELS.completions, prompt: `sdk-${runId}-completions-stream: once upon a time`, stream: true,
  });
  const r = await drain(stream, seen);
  seen.finish_reason = r.finish;
  expect(r.text === chatContent, 'the concatenated texts equal the non-stream text');
  expect(r.finish === 'stop', 'finish_reason === "stop"');
});

await check('embeddings', async (seen) => {
  // encoding_format is given: without it the v4 SDK asks for "base64" and decodes the
  // vectors itself, which sluice-mockllm (floats only) does not implement.
  const e = await client.embeddings.create({
    model: MODELS.embeddings,
    input: [`sdk-${runId}-embeddings: one`, 'two'],
    encoding_format: 'float',
  });
  seen.object = e.object;
  seen.count = e.data?.length ?? null;
  seen.dims = (e.data ?? []).map((d) => d.embedding?.length ?? null);
  seen.usage = e.usage ?? null;
  expect(e.object === 'list', 'object === "list"');
  expect(seen.count === 2, 'two embeddings for two inputs');
  expect(seen.dims.every((n) => n === EMBEDDING_DIM), `vectors of length ${EMBEDDING_DIM}`);
  expect(e.data.every((d) => d.embedding.every((x) => typeof x === 'number' && x >= -1 && x < 1)),
    'every component is a number in [-1, 1)');
  expect(e.data[0].index === 0 && e.data[1].index === 1, 'indexes 0 and 1');
  expect(e.usage && e.usage.prompt_tokens > 0, 'usage.prompt_tokens > 0');
});

await check('models_list', async (seen) => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  seen.ids = ids;
  const want = [MODELS.chat, MODELS.fallback, MODELS.completions, MODELS.embeddings];
  expect(JSON.stringify([...ids].sort()) === JSON.stringify([...want].sort()),
    `the ids are exactly ${want.join(', ')}`);
});

await check('wrong_key_401', async (seen) => {
  const bad = new OpenAI({ baseURL, apiKey: `${apiKey}-wrong`, maxRetries: 0, timeout: 20_000 });
  const e = await expectReject(
    bad.chat.completions.create({ model: MODELS.chat, messages: prompt('wrongkey') }),
    OpenAI.AuthenticationError, seen);
  expect(e.status === 401, 'status 401');
  expect(typeof e.error?.message === 'string' && e.error.message.length > 0,
    'the error body has a message');
});

await check('wrong_key_401_stream', async (seen) => {
  const bad = new OpenAI({ baseURL, apiKey: `${apiKey}-wrong`, maxRetries: 0, timeout: 20_000 });
  const e = await expectReject(
    bad.chat.completions.create({ model: MODELS.chat, messages: prompt('wrongkey-s'), stream: true }),
    OpenAI.AuthenticationError, seen);
  expect(e.status === 401, 'status 401');
});

await check('unknown_model_404', async (seen) => {
  const e = await expectReject(
    client.chat.completions.create({ model: MODELS.unknown, messages: prompt('unknown') }),
    OpenAI.NotFoundError, seen);
  expect(e.status === 404, 'status 404');
  expect(e.code === 'model_not_found', 'code "model_not_found"');
});

for (const stream of [false, true]) {
  await check(stream ? 'fallback_stream' : 'fallback_nonstream', async (seen) => {
    const { data, response } = await client.chat.completions
      .create({ model: MODELS.fallback, messages: prompt(stream ? 'fb-stream' : 'fb'), stream })
      .withResponse();
    seen.http_status = response.status;
    seen.instance = response.headers.get('x-sluice-instance');
    let text;
    if (stream) {
      const r = await drain(data, seen);
      text = r.text;
      seen.finish_reason = r.finish;
      expect(r.finish === 'stop', 'finish_reason === "stop"');
    } else {
      text = data.choices?.[0]?.message?.content ?? null;
      seen.content = text;
      checkUsage(data.usage, seen);
    }
    expect(response.status === 200, 'status 200');
    expect(text === chatContent, 'the same content as the chat route');
    expect(seen.instance === 'secondary', 'served by the second instance ("secondary")');
  });
}

await check('midstream_failure_throws', async (seen) => {
  // An unknown body parameter goes to the upstream as is: the mock cuts the connection
  // after three tokens. Sluice then ends the stream with `event: error`.
  const stream = await client.chat.completions.create({
    model: MODELS.chat, messages: prompt('cut'), stream: true,
    mock: { disconnect_after: 3 },
  });
  let thrown = null;
  try {
    await drain(stream, seen);
  } catch (e) {
    thrown = e;
  }
  expect(thrown !== null, 'the stream iteration ended without throwing');
  Object.assign(seen, errorInfo(thrown));
  seen.error_type = thrown.type ?? null;
  seen.error_code = thrown.code ?? null;
  expect(thrown instanceof OpenAI.APIError && !(thrown instanceof OpenAI.APIConnectionError),
    'the SDK throws an APIError built from the error event (not a connection error)');
  expect(typeof thrown.error?.message === 'string' && thrown.error.message.length > 0,
    'the error object has a message');
  expect(thrown.code === 'upstream_stream_error', 'code "upstream_stream_error"');
  expect(seen.deltas === 3 && seen.text === chatContent.split(' ').slice(0, 3).join(' '),
    'the three tokens before the cut were delivered');
  delete seen.error;
});

if (quotaKey) {
  const limited = new OpenAI({ baseURL, apiKey: quotaKey, maxRetries: 0, timeout: 20_000 });

  await check('quota_429', async (seen) => {
    // One request per window: the first is served, the next gets 429. A window that turns
    // over between the two gives the next one a fresh request, so allow one more try.
    const first = await limited.chat.completions.create({ model: MODELS.chat, messages: prompt('q1') });
    expect(first.choices[0].message.content === chatContent, 'the first request is served');
    let e = null;
    for (let i = 0; i < 2 && e === null; i++) {
      try {
        await limited.chat.completions.create({ model: MODELS.chat, messages: prompt(`q${i + 2}`) });
        seen.served_after_first = (seen.served_after_first ?? 0) + 1;
      } catch (err) {
        e = err;
      }
    }
    expect(e !== null, 'a further request was refused');
    Object.assign(seen, errorInfo(e));
    seen.error_type = e.type ?? null;
    expect(e instanceof OpenAI.RateLimitError, `RateLimitError, got ${e.constructor.name}`);
    expect(e.status === 429, 'status 429');
    seen.retry_after = e.headers?.['retry-after'] ?? null;
    delete seen.error;
  });

  await check('consumer_not_allowed_403', async (seen) => {
    const e = await expectReject(
      limited.embeddings.create({ model: MODELS.embeddings, input: 'x', encoding_format: 'float' }),
      OpenAI.PermissionDeniedError, seen);
    expect(e.status === 403, 'status 403');
  });
}

const failed = Object.entries(checks)
  .filter(([, c]) => c.status === 'fail' || c.status === 'unexpected_pass')
  .map(([name]) => name);
const result = {
  ok: failed.length === 0,
  sdk: 'openai',
  sdk_version: VERSION,
  node: process.version,
  run_id: runId,
  checks,
  failed,
};
process.stdout.write(JSON.stringify(result) + '\n');
process.exitCode = failed.length === 0 ? 0 : 1;
