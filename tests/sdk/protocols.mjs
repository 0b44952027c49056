// protocols.mjs: the official Anthropic SDK (@anthropic-ai/sdk) and OpenAI SDK (openai v4), used
// exactly as applications use them, against a Sluice that translates between protocols.
// tests/integration/test_protocols_sdk.py starts sluice-mockllm and sluice and runs this script.
//
// Environment:
//   GATEWAY   http://127.0.0.1:PORT (the gateway; the Anthropic SDK adds /v1/..., the OpenAI
//             SDK gets GATEWAY/v1)
//   API_KEY   a consumer key of the gateway
//   RUN_ID    put into every prompt so the test can find the upstream requests
//
// The gateway's routes (the Python test writes the same names):
//   /v1/messages          model "qwen"   → an OpenAI-compatible instance (translated)
//                         model "claude" → an Anthropic instance (passed through)
//   /v1/chat/completions  model "claude-chat" → an Anthropic instance (translated)
//   /v1/responses         model "qwen-resp"   → an OpenAI-compatible instance (translated)
//   /v1/messages/count_tokens → the gateway's estimate
//
// Output: one JSON line on stdout, {"ok", "sdks": {...versions}, "node", "run_id", "checks":
// {NAME: {"status": "pass" | "fail", ...what was seen, "error"}}, "failed": [NAME...]}.

import Anthropic from '@anthropic-ai/sdk';
import { VERSION as ANTHROPIC_VERSION } from '@anthropic-ai/sdk/version';
import OpenAI from 'openai';
import { VERSION as OPENAI_VERSION } from 'openai/version';

const gateway = process.env.GATEWAY;
const apiKey = process.env.API_KEY;
const runId = process.env.RUN_ID || String(process.pid);
if (!gateway || !apiKey) {
  process.stderr.write('GATEWAY and API_KEY are required\n');
  process.exit(2);
}

const LOREM = ('lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor '
  + 'incididunt ut labore et dolore magna aliqua').split(' ');
const TOKENS = 5;
const TEXT = LOREM.slice(0, TOKENS).join(' ');
const CALL = { name: 'get_weather', arguments: { city: 'Paris' } };
const MSG_TOOL = {
  name: 'get_weather', description: 'The weather in a city',
  input_schema: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
};
const CHAT_TOOL = {
  type: 'function',
  function: { name: 'get_weather', description: 'The weather in a city',
    parameters: MSG_TOOL.input_schema },
};

const anthropic = new Anthropic({ baseURL: gateway, apiKey, maxRetries: 0, timeout: 20_000 });
const openai = new OpenAI({ baseURL: `${gateway}/v1`, apiKey, maxRetries: 0, timeout: 20_000 });

const checks = {};

class CheckFailed extends Error {}

function expect(cond, what) {
  if (!cond) throw new CheckFailed(what);
}

async function check(name, fn) {
  const seen = {};
  let status = 'pass';
  try {
    await fn(seen);
  } catch (e) {
    seen.error = `${e?.constructor?.name ?? typeof e}: ${e?.message ?? String(e)}`;
    seen.error_status = e?.status ?? null;
    status = 'fail';
  }
  checks[name] = { ...seen, status };
}

const prompt = (tag) => `sdk-${runId}-${tag}: say something`;
const mock = (extra) => ({ tokens: TOKENS, ...extra });

// ------------------------------------------------------------------------- Anthropic SDK

for (const [backend, model] of [['chat', 'qwen'], ['anthropic', 'claude']]) {
  await check(`messages_create_on_${backend}`, async (seen) => {
    const m = await anthropic.messages.create({
      model, max_tokens: 100, system: 'be brief',
      messages: [{ role: 'user', content: prompt(`create-${backend}`) }], mock: mock(),
    });
    seen.type = m.type;
    seen.text = m.content.filter((b) => b.type === 'text').map((b) => b.text).join('');
    seen.stop_reason = m.stop_reason;
    seen.usage = m.usage;
    expect(m.type === 'message' && m.role === 'assistant', 'a message from the assistant');
    expect(seen.text === TEXT, `the text is "${TEXT}"`);
    expect(m.stop_reason === 'end_turn', 'stop_reason end_turn');
    expect(m.usage.output_tokens === TOKENS, `output_tokens ${TOKENS}`);
    expect(m.usage.input_tokens > 0, 'input_tokens > 0');
  });

  await check(`messages_stream_on_${backend}`, async (seen) => {
    const stream = anthropic.messages.stream({
      model, max_tokens: 100, messages: [{ role: 'user', content: prompt(`stream-${backend}`) }],
      mock: mock(),
    });
    let text = '';
    let events = 0;
    stream.on('text', (t) => { text += t; events++; });
    const final = await stream.finalMessage();
    seen.text = text;
    seen.text_events = events;
    seen.stop_reason = final.stop_reason;
    seen.usage = final.usage;
    expect(text === TEXT, `the text events add up to "${TEXT}"`);
    expect(events === TOKENS, `${TOKENS} text events`);
    expect(final.content[0].type === 'text' && final.content[0].text === TEXT,
      'finalMessage() has the text');
    expect(final.stop_reason === 'end_turn', 'stop_reason end_turn');
    expect(final.usage.output_tokens === TOKENS, `output_tokens ${TOKENS}`);
  });

  for (const streamed of [false, true]) {
    await check(`messages_tool_use_on_${backend}${streamed ? '_stream' : ''}`, async (seen) => {
      const params = {
        model, max_tokens: 100, tools: [MSG_TOOL],
        messages: [{ role: 'user', content: prompt(`tool-${backend}-${streamed}`) }],
        mock: mock({ tokens: 0, tool_call: CALL }),
      };
      const m = streamed ? await anthropic.messages.stream(params).finalMessage()
        : await anthropic.messages.create(params);
      const use = m.content.find((b) => b.type === 'tool_use');
      seen.stop_reason = m.stop_reason;
      seen.tool_use = use ?? null;
      expect(m.stop_reason === 'tool_use', 'stop_reason tool_use');
      expect(use && use.name === 'get_weather', 'a tool_use block for get_weather');
      expect(JSON.stringify(use.input) === JSON.stringify(CALL.arguments),
        'its input is the call\'s arguments');
      expect(typeof use.id === 'string' && use.id.length > 0, 'the block has an id');
      // The result goes back; the conversation continues.
      const next = await anthropic.messages.create({
        model, max_tokens: 100, tools: [MSG_TOOL], mock: mock(),
        messages: [
          params.messages[0],
          { role: 'assistant', content: m.content },
          { role: 'user', content: [{ type: 'tool_result', tool_use_id: use.id, content: 'sunny' }] },
        ],
      });
      seen.next_text = next.content.filter((b) => b.type === 'text').map((b) => b.text).join('');
      expect(seen.next_text === TEXT, 'the answer after the tool result');
    });
  }
}

await check('messages_count_tokens', async (seen) => {
  const r = await anthropic.messages.countTokens({
    model: 'qwen', messages: [{ role: 'user', content: prompt('count') }],
  });
  seen.input_tokens = r.input_tokens;
  expect(Number.isInteger(r.input_tokens) && r.input_tokens > 0, 'input_tokens > 0');
});

await check('messages_models_list', async (seen) => {
  const ids = [];
  for await (const m of anthropic.models.list()) ids.push(m.id);
  seen.ids = ids;
  expect(ids.includes('qwen') && ids.includes('claude'), 'the public names qwen and claude');
});

await check('messages_unknown_model_404', async (seen) => {
  let got = null;
  try {
    await anthropic.messages.create({
      model: 'no-such-model', max_tokens: 10, messages: [{ role: 'user', content: 'x' }],
    });
  } catch (e) {
    got = e;
  }
  expect(got !== null, 'the call failed');
  seen.error_class = got.constructor.name;
  seen.error_status = got.status;
  seen.error_type = got.error?.error?.type ?? null;
  expect(got instanceof Anthropic.NotFoundError, 'a NotFoundError');
  expect(seen.error_type === 'not_found_error', 'Anthropic\'s error type');
});

// ------------------------------------------------------------------------- OpenAI SDK

await check('chat_on_anthropic', async (seen) => {
  const c = await openai.chat.completions.create({
    model: 'claude-chat', messages: [{ role: 'user', content: prompt('chat') }], mock: mock(),
  });
  seen.content = c.choices[0].message.content;
  seen.finish_reason = c.choices[0].finish_reason;
  seen.usage = c.usage;
  expect(c.object === 'chat.completion', 'a chat.completion');
  expect(seen.content === TEXT, `the content is "${TEXT}"`);
  expect(seen.finish_reason === 'stop', 'finish_reason stop');
  expect(c.usage.completion_tokens === TOKENS, `completion_tokens ${TOKENS}`);
  expect(c.usage.total_tokens === c.usage.prompt_tokens + TOKENS, 'total = prompt + completion');
});

await check('chat_stream_on_anthropic', async (seen) => {
  const stream = await openai.chat.completions.create({
    model: 'claude-chat', messages: [{ role: 'user', content: prompt('chat-stream') }],
    stream: true, stream_options: { include_usage: true }, mock: mock(),
  });
  let text = '';
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    for (const ch of chunk.choices) {
      text += ch.delta?.content ?? '';
      if (ch.finish_reason) finish = ch.finish_reason;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  seen.text = text;
  seen.finish_reason = finish;
  seen.usage = usage;
  expect(text === TEXT, `the deltas add up to "${TEXT}"`);
  expect(finish === 'stop', 'finish_reason stop');
  expect(usage && usage.completion_tokens === TOKENS, 'the usage chunk');
});

for (const streamed of [false, true]) {
  await check(`chat_tools_on_anthropic${streamed ? '_stream' : ''}`, async (seen) => {
    const params = {
      model: 'claude-chat', tools: [CHAT_TOOL],
      messages: [{ role: 'user', content: prompt(`chat-tool-${streamed}`) }],
      mock: mock({ tokens: 0, tool_call: CALL }),
    };
    let msg;
    let finish;
    if (streamed) {
      const runner = openai.beta.chat.completions.stream(params);
      const final = await runner.finalChatCompletion();
      msg = final.choices[0].message;
      finish = final.choices[0].finish_reason;
    } else {
      const c = await openai.chat.completions.create(params);
      msg = c.choices[0].message;
      finish = c.choices[0].finish_reason;
    }
    seen.tool_calls = msg.tool_calls ?? null;
    seen.finish_reason = finish;
    expect(finish === 'tool_calls', 'finish_reason tool_calls');
    expect(msg.tool_calls?.length === 1, 'one tool call');
    expect(msg.tool_calls[0].function.name === 'get_weather', 'get_weather');
    expect(JSON.stringify(JSON.parse(msg.tool_calls[0].function.arguments))
      === JSON.stringify(CALL.arguments), 'its arguments');
  });
}

await check('responses_create_on_chat', async (seen) => {
  const r = await openai.responses.create({
    model: 'qwen-resp', input: prompt('responses'), instructions: 'be brief', mock: mock(),
  });
  seen.output_text = r.output_text;
  seen.response_status = r.status;
  seen.usage = r.usage;
  expect(r.object === 'response', 'a response');
  expect(r.status === 'completed', 'status completed');
  expect(r.output_text === TEXT, `output_text is "${TEXT}"`);
  expect(r.usage.output_tokens === TOKENS, `output_tokens ${TOKENS}`);
});

await check('responses_stream_on_chat', async (seen) => {
  const stream = await openai.responses.create({
    model: 'qwen-resp', input: prompt('responses-stream'), stream: true, mock: mock(),
  });
  let text = '';
  const types = [];
  let completed = null;
  for await (const ev of stream) {
    types.push(ev.type);
    if (ev.type === 'response.output_text.delta') text += ev.delta;
    if (ev.type === 'response.completed') completed = ev.response;
  }
  seen.text = text;
  seen.first = types[0];
  seen.last = types[types.length - 1];
  expect(types[0] === 'response.created', 'response.created first');
  expect(text === TEXT, `the deltas add up to "${TEXT}"`);
  expect(completed && completed.usage.output_tokens === TOKENS, 'response.completed with usage');
});

await check('responses_previous_id_refused', async (seen) => {
  let got = null;
  try {
    await openai.responses.create({ model: 'qwen-resp', input: 'x', previous_response_id: 'resp_1' });
  } catch (e) {
    got = e;
  }
  expect(got !== null, 'the call failed');
  seen.error_status = got.status;
  seen.error_code = got.code;
  expect(got instanceof OpenAI.BadRequestError, 'a BadRequestError');
  expect(got.code === 'unsupported_on_instance', 'code unsupported_on_instance');
});

const failed = Object.entries(checks).filter(([, c]) => c.status !== 'pass').map(([n]) => n);
process.stdout.write(JSON.stringify({
  ok: failed.length === 0,
  sdks: { '@anthropic-ai/sdk': ANTHROPIC_VERSION, openai: OPENAI_VERSION },
  node: process.version,
  run_id: runId,
  checks,
  failed,
}) + '\n');
process.exitCode = failed.length === 0 ? 0 : 1;
