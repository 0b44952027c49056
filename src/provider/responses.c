/* responses.c — the OpenAI Responses codec (the Responses API ⇄ the pivot).
 *
 * Clients of POST /v1/responses (the Agents SDK, Codex, newer OpenAI SDK code) on an
 * instance that speaks chat only get the stateless subset translated: input items,
 * instructions, function tools, streaming with the typed Responses events. Whatever
 * needs state the gateway does not keep (previous_response_id, conversations, stored
 * prompts, files, built-in tools, background runs) is refused with a clear 400, never
 * answered wrongly. The other direction (a Responses upstream read into the pivot) lets
 * response policies run on a Responses pass-through. Field tables: docs/providers.md.
 */
#include "sluice/provider.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>

#include "sluice/sse.h"

/* Output items one streamed response may announce (by output_index). */
#define RESPONSES_MAX_ITEMS 4096
#define RESPONSES_NAME_MAX  128
/* The Responses API's own defaults, echoed in synthesised Response objects. */
#define RESPONSES_DEFAULT_TEMPERATURE 1.0
#define RESPONSES_DEFAULT_TOP_P       1.0

/* ------------------------------------------------------------------ small helpers */

static const char *str(const json_t *o, const char *k)
{
	return json_string_value(json_object_get(o, k));
}

static bool set(json_t *o, const char *k, json_t *v)
{
	return json_object_set_new(o, k, v) == 0;
}

static bool push(json_t *a, json_t *v)
{
	return json_array_append_new(a, v) == 0;
}

static bool is(const char *s, const char *lit)
{
	return s != NULL && strcmp(s, lit) == 0;
}

static bool present(const json_t *v)
{
	return v != NULL && !json_is_null(v);
}

#define BAD(err, ...)                                                                              \
	proto_error_set(err, 400, "invalid_request_error", "invalid_request", __VA_ARGS__)
#define UNSUPPORTED(err, ...)                                                                      \
	proto_error_set(err, 400, "invalid_request_error", "unsupported_on_instance", __VA_ARGS__)
#define NOMEM(err) proto_error_set(err, 500, "server_error", "internal_error", "out of memory")

static json_t *take_string(struct evbuffer *b)
{
	size_t n = evbuffer_get_length(b);
	json_t *s = n ? json_stringn((const char *)evbuffer_pullup(b, -1), n) : json_string("");

	evbuffer_drain(b, n);
	return s;
}

static bool add_text(struct evbuffer *b, const json_t *s, const char *sep)
{
	if (sep != NULL && evbuffer_get_length(b) > 0 && evbuffer_add(b, sep, strlen(sep)) != 0)
		return false;
	return evbuffer_add(b, json_string_value(s), json_string_length(s)) == 0;
}

static long long now_or(const struct proto_reply_ctx *ctx)
{
	return ctx && ctx->created ? ctx->created : (long long)time(NULL);
}

static void keep_name(char *dst, const json_t *v)
{
	const char *s = json_string_value(v);
	size_t n = s ? json_string_length(v) : 0;

	if (s == NULL || n >= RESPONSES_NAME_MAX || memchr(s, '\0', n) != NULL)
		return;
	memcpy(dst, s, n);
	dst[n] = '\0';
}

static uint64_t count(const json_t *o, const char *k)
{
	const json_t *v = json_object_get(o, k);
	json_int_t i = json_is_integer(v) ? json_integer_value(v) : 0;

	return i <= 0 ? 0 : (uint64_t)i > PROTO_USAGE_MAX ? PROTO_USAGE_MAX : (uint64_t)i;
}

/* ================================================================== Responses request → pivot */

/* Keys whose meaning lives in server state the gateway does not keep. */
static const char *const stateful_keys[] = {"previous_response_id", "conversation", "prompt"};

/* Message content (string or parts) → a chat content value: a string when it is text
 * only (parts joined by a newline), an array of text / image_url parts otherwise. */
static json_t *content_to_chat(const json_t *content, size_t ii, struct proto_error *err)
{
	struct evbuffer *t;
	json_t *parts, *res = NULL;
	bool images = false;
	size_t i;
	const json_t *p;

	if (json_is_string(content))
		return json_copy((json_t *)content);
	if (!json_is_array(content)) {
		BAD(err, "input[%zu].content: must be a string or an array of parts", ii);
		return NULL;
	}
	t = evbuffer_new();
	parts = json_array();
	if (t == NULL || parts == NULL)
		goto nomem;
	json_array_foreach(content, i, p)
	{
		const char *type = str(p, "type");
		const json_t *text = json_object_get(p, is(type, "refusal") ? "refusal" : "text");

		if (is(type, "input_text") || is(type, "output_text") || is(type, "refusal") ||
		    is(type, "text")) {
			if (!json_is_string(text)) {
				BAD(err, "input[%zu].content[%zu].text: must be a string", ii, i);
				goto fail;
			}
			if (!push(parts, json_pack("{s:s,s:O}", "type", "text", "text", text)))
				goto nomem;
		} else if (is(type, "input_image") &&
		           json_is_string(json_object_get(p, "image_url"))) {
			json_t *iu = json_pack("{s:O}", "url", json_object_get(p, "image_url"));
			if (iu == NULL)
				goto nomem;
			if (json_is_string(json_object_get(p, "detail")) &&
			    !set(iu, "detail", json_copy(json_object_get(p, "detail")))) {
				json_decref(iu);
				goto nomem;
			}
			if (!push(parts,
			          json_pack("{s:s,s:o}", "type", "image_url", "image_url", iu)))
				goto nomem;
			images = true;
		} else {
			UNSUPPORTED(err,
			            "input[%zu].content[%zu]: parts of type \"%s\"%s are not "
			            "supported on "
			            "this instance (OpenAI chat)",
			            ii, i, type ? type : "(none)",
			            is(type, "input_image") ? " without image_url (file_id)" : "");
			goto fail;
		}
	}
	if (images) {
		res = json_incref(parts);
	} else {
		json_array_foreach(parts, i, p)
		{
			if (!add_text(t, json_object_get(p, "text"), "\n"))
				goto nomem;
		}
		res = take_string(t);
	}
	goto done;
nomem:
	NOMEM(err);
fail:
	res = NULL;
done:
	if (t)
		evbuffer_free(t);
	json_decref(parts);
	return res;
}

/* function_call_output.output: a string, or parts of which only text is kept. */
static json_t *output_text(const json_t *output, size_t ii, struct proto_error *err)
{
	struct evbuffer *t;
	json_t *s;
	size_t i;
	const json_t *p;

	if (json_is_string(output))
		return json_copy((json_t *)output);
	if (!json_is_array(output)) {
		BAD(err, "input[%zu].output: must be a string or an array of parts", ii);
		return NULL;
	}
	t = evbuffer_new();
	if (t == NULL) {
		NOMEM(err);
		return NULL;
	}
	json_array_foreach(output, i, p)
	{
		if (!is(str(p, "type"), "input_text") ||
		    !json_is_string(json_object_get(p, "text"))) {
			evbuffer_free(t);
			UNSUPPORTED(
			        err,
			        "input[%zu].output[%zu]: only input_text parts are supported in "
			        "function outputs on this instance",
			        ii, i);
			return NULL;
		}
		add_text(t, json_object_get(p, "text"), "\n");
	}
	s = take_string(t);
	evbuffer_free(t);
	return s;
}

static bool input_to_chat(const json_t *input, json_t *msgs, struct proto_error *err)
{
	json_t *calls_of = NULL; /* tool_calls of the assistant message function_calls join */
	size_t i;
	const json_t *it;

	if (json_is_string(input)) {
		if (!push(msgs, json_pack("{s:s,s:O}", "role", "user", "content", input)))
			goto nomem;
		return true;
	}
	if (!json_is_array(input)) {
		BAD(err, "input: must be a string or an array of items");
		return false;
	}
	json_array_foreach(input, i, it)
	{
		const char *type = str(it, "type");
		const char *role = str(it, "role");

		if (!json_is_object(it)) {
			BAD(err, "input[%zu]: must be an object", i);
			return false;
		}
		if (type == NULL && role != NULL)
			type = "message";
		if (is(type, "message")) {
			json_t *c;
			if (!is(role, "user") && !is(role, "assistant") && !is(role, "system") &&
			    !is(role, "developer")) {
				BAD(err,
				    "input[%zu].role: must be user, assistant, system or developer",
				    i);
				return false;
			}
			c = content_to_chat(json_object_get(it, "content"), i, err);
			if (c == NULL)
				return false;
			json_t *m = json_pack("{s:s,s:o}", "role", role, "content", c);
			if (m == NULL || !push(msgs, m))
				goto nomem;
			calls_of = is(role, "assistant") ? m : NULL;
		} else if (is(type, "function_call")) {
			const json_t *id = json_object_get(it, "call_id");
			const json_t *name = json_object_get(it, "name");
			const json_t *args = json_object_get(it, "arguments");
			json_t *tc, *list;

			if (!json_is_string(id) || !json_is_string(name) || !json_is_string(args)) {
				BAD(err,
				    "input[%zu]: a function_call needs call_id, name and arguments "
				    "strings",
				    i);
				return false;
			}
			tc = json_pack("{s:O,s:s,s:{s:O,s:O}}", "id", id, "type", "function",
			               "function", "name", name, "arguments", args);
			if (tc == NULL)
				goto nomem;
			if (calls_of == NULL) {
				calls_of = json_pack("{s:s,s:n}", "role", "assistant", "content");
				if (calls_of == NULL || !push(msgs, calls_of)) {
					json_decref(tc);
					goto nomem;
				}
			}
			list = json_object_get(calls_of, "tool_calls");
			if (list == NULL) {
				list = json_array();
				if (list == NULL || !set(calls_of, "tool_calls", list)) {
					json_decref(tc);
					goto nomem;
				}
			}
			if (!push(list, tc))
				goto nomem;
		} else if (is(type, "function_call_output")) {
			const json_t *id = json_object_get(it, "call_id");
			json_t *out;
			if (!json_is_string(id)) {
				BAD(err, "input[%zu].call_id: must be a string", i);
				return false;
			}
			out = output_text(json_object_get(it, "output"), i, err);
			if (out == NULL)
				return false;
			if (!push(msgs, json_pack("{s:s,s:O,s:o}", "role", "tool", "tool_call_id",
			                          id, "content", out)))
				goto nomem;
			calls_of = NULL;
		} else if (is(type, "reasoning")) {
			continue; /* encrypted or summarised reasoning: no chat equivalent */
		} else {
			UNSUPPORTED(err,
			            "input[%zu]: items of type \"%s\" need state or tools this "
			            "instance "
			            "does not have (OpenAI chat; stateless subset only)",
			            i, type ? type : "(none)");
			return false;
		}
	}
	return true;
nomem:
	NOMEM(err);
	return false;
}

static bool tools_to_chat(const json_t *body, json_t *out, struct proto_error *err)
{
	const json_t *tools = json_object_get(body, "tools");
	const json_t *choice = json_object_get(body, "tool_choice");
	json_t *list;
	size_t i;
	const json_t *t;

	if (present(tools)) {
		if (!json_is_array(tools)) {
			BAD(err, "tools: must be an array");
			return false;
		}
		list = json_array();
		if (list == NULL || !set(out, "tools", list))
			goto nomem;
		json_array_foreach(tools, i, t)
		{
			const char *type = str(t, "type");
			json_t *fn;

			if (!is(type, "function")) {
				UNSUPPORTED(err,
				            "tools[%zu]: the built-in tool \"%s\" is not available "
				            "on this "
				            "instance (OpenAI chat; function tools only)",
				            i, type ? type : "(none)");
				return false;
			}
			if (!json_is_string(json_object_get(t, "name"))) {
				BAD(err, "tools[%zu].name: must be a string", i);
				return false;
			}
			fn = json_pack("{s:O}", "name", json_object_get(t, "name"));
			if (fn == NULL ||
			    !push(list, json_pack("{s:s,s:o}", "type", "function", "function", fn)))
				goto nomem;
			if (json_is_string(json_object_get(t, "description")) &&
			    !set(fn, "description", json_copy(json_object_get(t, "description"))))
				goto nomem;
			if (json_is_object(json_object_get(t, "parameters")) &&
			    !set(fn, "parameters", json_copy(json_object_get(t, "parameters"))))
				goto nomem;
			if (json_is_boolean(json_object_get(t, "strict")) &&
			    !set(fn, "strict", json_copy(json_object_get(t, "strict"))))
				goto nomem;
		}
	}
	if (json_is_string(choice)) {
		const char *c = json_string_value(choice);
		if (!is(c, "auto") && !is(c, "none") && !is(c, "required")) {
			BAD(err, "tool_choice: \"%s\" is not auto, none or required", c);
			return false;
		}
		if (!set(out, "tool_choice", json_copy((json_t *)choice)))
			goto nomem;
	} else if (json_is_object(choice)) {
		if (!is(str(choice, "type"), "function") ||
		    !json_is_string(json_object_get(choice, "name"))) {
			UNSUPPORTED(err,
			            "tool_choice: only {type: function, name} is supported on this "
			            "instance");
			return false;
		}
		if (!set(out, "tool_choice",
		         json_pack("{s:s,s:{s:O}}", "type", "function", "function", "name",
		                   json_object_get(choice, "name"))))
			goto nomem;
	} else if (present(choice)) {
		BAD(err, "tool_choice: must be a string or an object");
		return false;
	}
	return true;
nomem:
	NOMEM(err);
	return false;
}

/* text.format → response_format. */
static bool format_to_chat(const json_t *body, json_t *out, struct proto_error *err)
{
	const json_t *f = json_object_get(json_object_get(body, "text"), "format");
	const char *type = str(f, "type");
	json_t *js;

	if (f == NULL || is(type, "text"))
		return true;
	if (is(type, "json_object"))
		return set(out, "response_format", json_pack("{s:s}", "type", "json_object"));
	if (!is(type, "json_schema") || !json_is_string(json_object_get(f, "name"))) {
		BAD(err, "text.format: must be text, json_object or json_schema with a name");
		return false;
	}
	js = json_pack("{s:O}", "name", json_object_get(f, "name"));
	if (js == NULL)
		return false;
	if (present(json_object_get(f, "schema")))
		set(js, "schema", json_copy(json_object_get(f, "schema")));
	if (present(json_object_get(f, "strict")))
		set(js, "strict", json_copy(json_object_get(f, "strict")));
	if (present(json_object_get(f, "description")))
		set(js, "description", json_copy(json_object_get(f, "description")));
	return set(out, "response_format",
	           json_pack("{s:s,s:o}", "type", "json_schema", "json_schema", js));
}

static json_t *resp_request_to_chat(const json_t *body, struct proto_error *err)
{
	static const char *const copied[] = {"model", "temperature", "top_p", "parallel_tool_calls",
	                                     "user"};
	const json_t *max_out = json_object_get(body, "max_output_tokens");
	const json_t *instr = json_object_get(body, "instructions");
	const char *effort = str(json_object_get(body, "reasoning"), "effort");
	json_t *out = NULL, *msgs = NULL;
	size_t i;

	if (!json_is_object(body)) {
		BAD(err, "the request body must be a JSON object");
		return NULL;
	}
	for (i = 0; i < sizeof(stateful_keys) / sizeof(stateful_keys[0]); i++) {
		if (present(json_object_get(body, stateful_keys[i]))) {
			UNSUPPORTED(
			        err,
			        "%s: this instance keeps no conversation state (OpenAI chat); send "
			        "the whole conversation in input instead",
			        stateful_keys[i]);
			return NULL;
		}
	}
	/* The API's default is to store; a client that asks for it explicitly means to
	 * come back to the response, which this instance cannot give it. */
	if (json_is_true(json_object_get(body, "store"))) {
		UNSUPPORTED(err, "store: this instance keeps no responses (OpenAI chat); send "
		                 "store: false or leave it out");
		return NULL;
	}
	if (json_is_true(json_object_get(body, "background"))) {
		UNSUPPORTED(err, "background: background responses are not supported on this "
		                 "instance (OpenAI chat)");
		return NULL;
	}
	if (!present(json_object_get(body, "input"))) {
		BAD(err, "input: required");
		return NULL;
	}
	if (present(max_out) && (!json_is_integer(max_out) || json_integer_value(max_out) < 1)) {
		BAD(err, "max_output_tokens: must be a positive integer");
		return NULL;
	}
	if (present(instr) && !json_is_string(instr)) {
		BAD(err, "instructions: must be a string");
		return NULL;
	}
	out = json_object();
	msgs = json_array();
	if (out == NULL || msgs == NULL || !set(out, "messages", json_incref(msgs)))
		goto nomem;
	if (json_is_string(instr) && json_string_length(instr) > 0 &&
	    !push(msgs, json_pack("{s:s,s:O}", "role", "system", "content", instr)))
		goto nomem;
	if (!input_to_chat(json_object_get(body, "input"), msgs, err))
		goto fail;
	for (i = 0; i < sizeof(copied) / sizeof(copied[0]); i++) {
		const json_t *v = json_object_get(body, copied[i]);
		if (present(v) && !set(out, copied[i], json_copy((json_t *)v)))
			goto nomem;
	}
	if (present(max_out) && !set(out, "max_tokens", json_copy((json_t *)max_out)))
		goto nomem;
	if (effort != NULL && !set(out, "reasoning_effort", json_string(effort)))
		goto nomem;
	if (!tools_to_chat(body, out, err) || !format_to_chat(body, out, err))
		goto fail;
	if (json_is_true(json_object_get(body, "stream")) &&
	    (!set(out, "stream", json_true()) ||
	     !set(out, "stream_options", json_pack("{s:b}", "include_usage", 1))))
		goto nomem;
	json_decref(msgs);
	return out;
nomem:
	NOMEM(err);
fail:
	json_decref(msgs);
	json_decref(out);
	return NULL;
}

/* ================================================================== pivot → Responses request */

static json_t *parts_to_input(const json_t *content, size_t mi, struct proto_error *err)
{
	json_t *parts;
	size_t i;
	const json_t *p;

	if (json_is_string(content) || content == NULL || json_is_null(content))
		return json_is_string(content) ? json_copy((json_t *)content) : json_string("");
	if (!json_is_array(content)) {
		BAD(err, "messages[%zu].content: must be a string or an array of parts", mi);
		return NULL;
	}
	parts = json_array();
	if (parts == NULL)
		return NULL;
	json_array_foreach(content, i, p)
	{
		const char *type = str(p, "type");
		json_t *np = NULL;

		if (is(type, "text") && json_is_string(json_object_get(p, "text"))) {
			np = json_pack("{s:s,s:O}", "type", "input_text", "text",
			               json_object_get(p, "text"));
		} else if (is(type, "image_url")) {
			const json_t *iu = json_object_get(p, "image_url");
			const json_t *u = json_is_object(iu) ? json_object_get(iu, "url") : iu;
			if (json_is_string(u))
				np = json_pack("{s:s,s:O}", "type", "input_image", "image_url", u);
		}
		if (np == NULL || !push(parts, np)) {
			json_decref(parts);
			UNSUPPORTED(
			        err,
			        "messages[%zu].content[%zu]: parts of type \"%s\" cannot be sent "
			        "to this instance (Responses)",
			        mi, i, type ? type : "(none)");
			return NULL;
		}
	}
	return parts;
}

static json_t *text_of(const json_t *content)
{
	struct evbuffer *t;
	json_t *s;
	size_t i;
	const json_t *p;

	if (json_is_string(content))
		return json_copy((json_t *)content);
	t = evbuffer_new();
	if (t == NULL)
		return NULL;
	json_array_foreach(content, i, p)
	{
		if (json_is_string(json_object_get(p, "text")))
			add_text(t, json_object_get(p, "text"), "\n");
	}
	s = take_string(t);
	evbuffer_free(t);
	return s;
}

static bool messages_to_input(const json_t *msgs, json_t *input, struct proto_error *err)
{
	size_t i, j;
	const json_t *m, *tc;

	json_array_foreach(msgs, i, m)
	{
		const char *role = str(m, "role");
		const json_t *content = json_object_get(m, "content");

		if (is(role, "system") || is(role, "developer") || is(role, "user")) {
			json_t *c = parts_to_input(content, i, err);
			if (c == NULL || !push(input, json_pack("{s:s,s:s,s:o}", "type", "message",
			                                        "role", role, "content", c)))
				return false;
		} else if (is(role, "assistant")) {
			const json_t *calls = json_object_get(m, "tool_calls");
			if (json_is_string(content) && json_string_length(content) > 0 &&
			    !push(input, json_pack("{s:s,s:s,s:O}", "type", "message", "role",
			                           "assistant", "content", content)))
				goto nomem;
			if (json_is_array(content) &&
			    !push(input, json_pack("{s:s,s:s,s:o}", "type", "message", "role",
			                           "assistant", "content", text_of(content))))
				goto nomem;
			json_array_foreach(calls, j, tc)
			{
				const json_t *fn = json_object_get(tc, "function");
				if (!json_is_string(json_object_get(tc, "id")) ||
				    !json_is_string(json_object_get(fn, "name"))) {
					BAD(err,
					    "messages[%zu].tool_calls[%zu]: id and function.name "
					    "must "
					    "be strings",
					    i, j);
					return false;
				}
				if (!push(input,
				          json_pack("{s:s,s:O,s:O,s:O?}", "type", "function_call",
				                    "call_id", json_object_get(tc, "id"), "name",
				                    json_object_get(fn, "name"), "arguments",
				                    json_object_get(fn, "arguments"))))
					goto nomem;
			}
		} else if (is(role, "tool")) {
			if (!json_is_string(json_object_get(m, "tool_call_id"))) {
				BAD(err, "messages[%zu].tool_call_id: must be a string", i);
				return false;
			}
			if (!push(input, json_pack("{s:s,s:O,s:o}", "type", "function_call_output",
			                           "call_id", json_object_get(m, "tool_call_id"),
			                           "output", text_of(content))))
				goto nomem;
		} else {
			BAD(err,
			    "messages[%zu].role: must be system, developer, user, assistant or "
			    "tool",
			    i);
			return false;
		}
	}
	return true;
nomem:
	NOMEM(err);
	return false;
}

static json_t *resp_request_from_chat(const json_t *chat, const struct config_instance *in,
                                      const char *model, struct proto_error *err)
{
	static const char *const copied[] = {"temperature", "top_p", "parallel_tool_calls", "user",
	                                     "stream"};
	const json_t *msgs = json_object_get(chat, "messages");
	const json_t *n = json_object_get(chat, "n");
	const json_t *tools = json_object_get(chat, "tools");
	const json_t *choice = json_object_get(chat, "tool_choice");
	const json_t *rf = json_object_get(chat, "response_format");
	const json_t *cap = json_object_get(chat, "max_completion_tokens");
	json_t *out = json_object(), *input = json_array();
	size_t i;
	const json_t *t;

	if (out == NULL || input == NULL || !set(out, "input", json_incref(input)))
		goto nomem;
	if (!json_is_array(msgs)) {
		BAD(err, "messages: must be an array");
		goto fail;
	}
	if (present(json_object_get(chat, "stop"))) {
		UNSUPPORTED(err, "stop: not supported by this instance (Responses)");
		goto fail;
	}
	if (json_is_integer(n) && json_integer_value(n) > 1) {
		UNSUPPORTED(err, "n: one choice only on this instance (Responses)");
		goto fail;
	}
	if (!messages_to_input(msgs, input, err))
		goto fail;
	if (model != NULL && !set(out, "model", json_string(model)))
		goto nomem;
	if (!present(cap))
		cap = json_object_get(chat, "max_tokens");
	if (json_is_integer(cap) && !set(out, "max_output_tokens", json_copy((json_t *)cap)))
		goto nomem;
	for (i = 0; i < sizeof(copied) / sizeof(copied[0]); i++) {
		const json_t *v = json_object_get(chat, copied[i]);
		if (present(v) && !set(out, copied[i], json_copy((json_t *)v)))
			goto nomem;
	}
	if (json_is_array(tools)) {
		json_t *list = json_array();
		if (list == NULL || !set(out, "tools", list))
			goto nomem;
		json_array_foreach(tools, i, t)
		{
			const json_t *fn = json_object_get(t, "function");
			json_t *ft;
			if (!is(str(t, "type"), "function") ||
			    !json_is_string(json_object_get(fn, "name"))) {
				UNSUPPORTED(err,
				            "tools[%zu]: only function tools can be sent to this "
				            "instance (Responses)",
				            i);
				goto fail;
			}
			ft = json_pack("{s:s,s:O}", "type", "function", "name",
			               json_object_get(fn, "name"));
			if (ft == NULL || !push(list, ft))
				goto nomem;
			if (present(json_object_get(fn, "description")))
				set(ft, "description",
				    json_copy(json_object_get(fn, "description")));
			if (present(json_object_get(fn, "parameters")))
				set(ft, "parameters", json_copy(json_object_get(fn, "parameters")));
			if (present(json_object_get(fn, "strict")))
				set(ft, "strict", json_copy(json_object_get(fn, "strict")));
		}
	}
	if (json_is_string(choice) && !set(out, "tool_choice", json_copy((json_t *)choice)))
		goto nomem;
	if (json_is_object(choice) &&
	    !set(out, "tool_choice",
	         json_pack("{s:s,s:O?}", "type", "function", "name",
	                   json_object_get(json_object_get(choice, "function"), "name"))))
		goto nomem;
	if (is(str(rf, "type"), "json_object") &&
	    !set(out, "text", json_pack("{s:{s:s}}", "format", "type", "json_object")))
		goto nomem;
	if (is(str(rf, "type"), "json_schema")) {
		const json_t *js = json_object_get(rf, "json_schema");
		if (!set(out, "text",
		         json_pack("{s:{s:s,s:O?,s:O?,s:O?}}", "format", "type", "json_schema",
		                   "name", json_object_get(js, "name"), "schema",
		                   json_object_get(js, "schema"), "strict",
		                   json_object_get(js, "strict"))))
			goto nomem;
	}
	if (json_is_string(json_object_get(chat, "reasoning_effort")) &&
	    !set(out, "reasoning",
	         json_pack("{s:O}", "effort", json_object_get(chat, "reasoning_effort"))))
		goto nomem;
	/* The gateway is stateless: nothing is stored upstream on its behalf. */
	if (!set(out, "store", json_false()))
		goto nomem;
	if (in != NULL && json_is_object(in->options) && json_object_update(out, in->options) != 0)
		goto nomem;
	json_decref(input);
	return out;
nomem:
	NOMEM(err);
fail:
	json_decref(input);
	json_decref(out);
	return NULL;
}

/* ================================================================== Response objects */

/* The pivot's usage → the Responses usage object. */
static json_t *responses_usage(const struct record_usage *u)
{
	return json_pack("{s:I,s:{s:I},s:I,s:{s:I},s:I}", "input_tokens", (json_int_t)u->prompt,
	                 "input_tokens_details", "cached_tokens", (json_int_t)u->cached,
	                 "output_tokens", (json_int_t)u->completion, "output_tokens_details",
	                 "reasoning_tokens", (json_int_t)u->reasoning, "total_tokens",
	                 (json_int_t)u->total);
}

static json_t *echo(const struct proto_reply_ctx *ctx, const char *key)
{
	const json_t *v = ctx ? json_object_get(ctx->request, key) : NULL;

	return v ? json_incref((json_t *)v) : NULL;
}

/* The number-valued member key of the request, or def. */
static json_t *echo_number(const struct proto_reply_ctx *ctx, const char *key, double def)
{
	const json_t *v = ctx ? json_object_get(ctx->request, key) : NULL;

	return json_is_number(v) ? json_incref((json_t *)v) : json_real(def);
}

/* A Response object as the API returns it: the request's settings echoed, the
 * gateway's own facts (stateless: store false, no previous response). model is the
 * upstream's, used when the client's is unknown. output and usage are stolen (usage may
 * be NULL: null). */
static json_t *response_object(const struct proto_reply_ctx *ctx, long long created,
                               const char *model, const char *status, const char *incomplete,
                               json_t *output, json_t *usage)
{
	char id[160];
	const json_t *tools = ctx ? json_object_get(ctx->request, "tools") : NULL;
	const json_t *choice = ctx ? json_object_get(ctx->request, "tool_choice") : NULL;
	const json_t *meta = ctx ? json_object_get(ctx->request, "metadata") : NULL;
	const json_t *text = ctx ? json_object_get(ctx->request, "text") : NULL;
	json_t *r;

	snprintf(id, sizeof(id), "resp_%s", ctx && ctx->request_id ? ctx->request_id : "0");
	r = json_pack(
	        "{s:s,s:s,s:I,s:s,s:n,s:o,s:o?,s:o?,s:s?,s:o,s:o,s:n,s:{s:n,s:n},s:b,s:o,s:o,"
	        "s:o,s:o,s:o,s:s,s:o?,s:o?,s:o}",
	        "id", id, "object", "response", "created_at", (json_int_t)created, "status", status,
	        "error", "incomplete_details",
	        incomplete ? json_pack("{s:s}", "reason", incomplete) : json_null(), "instructions",
	        echo(ctx, "instructions"), "max_output_tokens", echo(ctx, "max_output_tokens"),
	        "model", ctx && ctx->model ? ctx->model : model, "output", output,
	        "parallel_tool_calls",
	        json_boolean(!json_is_false(
	                ctx ? json_object_get(ctx->request, "parallel_tool_calls") : NULL)),
	        "previous_response_id", "reasoning", "effort", "summary", "store", 0, "temperature",
	        echo_number(ctx, "temperature", RESPONSES_DEFAULT_TEMPERATURE), "text",
	        json_is_object(text) ? json_incref((json_t *)text)
	                             : json_pack("{s:{s:s}}", "format", "type", "text"),
	        "tool_choice", choice ? json_incref((json_t *)choice) : json_string("auto"),
	        "tools", json_is_array(tools) ? json_incref((json_t *)tools) : json_array(),
	        "top_p", echo_number(ctx, "top_p", RESPONSES_DEFAULT_TOP_P), "truncation",
	        "disabled", "usage", usage, "user", echo(ctx, "user"), "metadata",
	        json_is_object(meta) ? json_incref((json_t *)meta) : json_object());
	return r;
}

static const char *incomplete_reason(const char *finish)
{
	if (is(finish, "length"))
		return "max_output_tokens";
	if (is(finish, "content_filter"))
		return "content_filter";
	return NULL;
}

static json_t *text_part(json_t *text)
{
	return json_pack("{s:s,s:[],s:[],s:o}", "type", "output_text", "annotations", "logprobs",
	                 "text", text);
}

static json_t *message_item(const char *id, const char *status, json_t *content)
{
	return json_pack("{s:s,s:s,s:s,s:o,s:s}", "id", id, "type", "message", "status", status,
	                 "content", content, "role", "assistant");
}

static json_t *call_item(const char *id, const char *status, const json_t *call_id,
                         const json_t *name, json_t *args)
{
	return json_pack("{s:s,s:s,s:s,s:o,s:O,s:O}", "id", id, "type", "function_call", "status",
	                 status, "arguments", args, "call_id", call_id, "name", name);
}

/* ================================================================== pivot answer → Response */

/* The message item of a pivot message: its text, or its refusal; NULL when it has
 * neither and makes tool calls only (the API answers those with function_call items
 * alone). */
static json_t *message_output(const json_t *msg, const char *id, const char *status, bool *ok)
{
	const json_t *content = json_object_get(msg, "content");
	const json_t *refusal = json_object_get(msg, "refusal");
	json_t *text = json_is_array(content)    ? text_of(content)
	               : json_is_string(content) ? json_copy((json_t *)content)
	                                         : NULL;
	json_t *parts;

	*ok = true;
	if (text == NULL && !json_is_string(refusal) &&
	    json_array_size(json_object_get(msg, "tool_calls")) > 0)
		return NULL;
	parts = json_array();
	if (parts == NULL ||
	    (text == NULL && json_is_string(refusal)
	             ? false
	             : !push(parts, text_part(text ? text : json_string("")))) ||
	    (json_is_string(refusal) &&
	     !push(parts, json_pack("{s:s,s:O}", "type", "refusal", "refusal", refusal)))) {
		json_decref(parts);
		*ok = false;
		return NULL;
	}
	return message_item(id, status, parts);
}

static json_t *resp_response_from_chat(const json_t *chat, const struct proto_reply_ctx *ctx)
{
	const json_t *choice = json_array_get(json_object_get(chat, "choices"), 0);
	const json_t *msg = json_object_get(choice, "message");
	const json_t *calls = json_object_get(msg, "tool_calls");
	const char *incomplete = incomplete_reason(str(choice, "finish_reason"));
	const char *status = incomplete ? "incomplete" : "completed";
	const char *rid = ctx && ctx->request_id ? ctx->request_id : "0";
	const json_t *created = json_object_get(chat, "created");
	struct record_usage u = {0};
	json_t *output = json_array(), *item;
	char id[200];
	bool ok;
	size_t i;
	const json_t *tc;

	if (output == NULL || !json_is_object(msg))
		goto fail;
	snprintf(id, sizeof(id), "msg_%s", rid);
	item = message_output(msg, id, status, &ok);
	if (!ok || (item != NULL && !push(output, item)))
		goto fail;
	json_array_foreach(calls, i, tc)
	{
		const json_t *fn = json_object_get(tc, "function");
		const json_t *args = json_object_get(fn, "arguments");
		if (!json_is_string(json_object_get(tc, "id")) ||
		    !json_is_string(json_object_get(fn, "name")))
			goto fail;
		snprintf(id, sizeof(id), "fc_%s_%zu", rid, i);
		if (!push(output, call_item(id, "completed", json_object_get(tc, "id"),
		                            json_object_get(fn, "name"),
		                            json_is_string(args) ? json_copy((json_t *)args)
		                                                 : json_string(""))))
			goto fail;
	}
	proto_usage_from_chat(chat, &u);
	return response_object(ctx,
	                       ctx && ctx->created        ? ctx->created
	                       : json_is_integer(created) ? json_integer_value(created)
	                                                  : (long long)time(NULL),
	                       str(chat, "model"), status, incomplete, output, responses_usage(&u));
fail:
	json_decref(output);
	return NULL;
}

/* ================================================================== Response → pivot answer */

static const char *finish_of_response(const json_t *r, bool calls)
{
	const char *reason = str(json_object_get(r, "incomplete_details"), "reason");

	if (is(str(r, "status"), "incomplete")) {
		if (is(reason, "content_filter"))
			return "content_filter";
		return "length";
	}
	return calls ? "tool_calls" : "stop";
}

static json_t *chat_usage_of(const json_t *u)
{
	uint64_t in = count(u, "input_tokens"), out = count(u, "output_tokens");

	return json_pack(
	        "{s:I,s:I,s:I,s:{s:I},s:{s:I}}", "prompt_tokens", (json_int_t)in,
	        "completion_tokens", (json_int_t)out, "total_tokens", (json_int_t)(in + out),
	        "prompt_tokens_details", "cached_tokens",
	        (json_int_t)count(json_object_get(u, "input_tokens_details"), "cached_tokens"),
	        "completion_tokens_details", "reasoning_tokens",
	        (json_int_t)count(json_object_get(u, "output_tokens_details"), "reasoning_tokens"));
}

static json_t *resp_response_to_chat(const json_t *body, const struct proto_reply_ctx *ctx)
{
	const json_t *output = json_object_get(body, "output");
	struct evbuffer *text = evbuffer_new(), *reasoning = evbuffer_new();
	json_t *calls = json_array(), *msg = NULL, *out = NULL, *refusal = NULL;
	size_t i, j;
	const json_t *it, *p;

	if (text == NULL || reasoning == NULL || calls == NULL)
		goto done;
	if (!is(str(body, "object"), "response") || !json_is_array(output) ||
	    is(str(body, "status"), "failed"))
		goto done;
	json_array_foreach(output, i, it)
	{
		const char *type = str(it, "type");

		if (is(type, "message")) {
			json_array_foreach(json_object_get(it, "content"), j, p)
			{
				if (is(str(p, "type"), "output_text") &&
				    json_is_string(json_object_get(p, "text")))
					add_text(text, json_object_get(p, "text"), NULL);
				else if (is(str(p, "type"), "refusal") &&
				         json_is_string(json_object_get(p, "refusal")) &&
				         refusal == NULL)
					refusal = json_incref(json_object_get(p, "refusal"));
			}
		} else if (is(type, "function_call")) {
			if (!json_is_string(json_object_get(it, "call_id")) ||
			    !json_is_string(json_object_get(it, "name")))
				goto done;
			if (!push(calls,
			          json_pack("{s:O,s:s,s:{s:O,s:O?}}", "id",
			                    json_object_get(it, "call_id"), "type", "function",
			                    "function", "name", json_object_get(it, "name"),
			                    "arguments", json_object_get(it, "arguments"))))
				goto done;
		} else if (is(type, "reasoning")) {
			const char *const keys[] = {"content", "summary"};
			for (size_t k = 0; k < 2; k++) {
				json_array_foreach(json_object_get(it, keys[k]), j, p)
				{
					if (json_is_string(json_object_get(p, "text")))
						add_text(reasoning, json_object_get(p, "text"),
						         NULL);
				}
			}
		}
	}
	msg = json_pack("{s:s,s:o}", "role", "assistant", "content",
	                json_array_size(calls) > 0 && evbuffer_get_length(text) == 0
	                        ? json_null()
	                        : take_string(text));
	if (msg == NULL)
		goto done;
	if ((json_array_size(calls) > 0 && !set(msg, "tool_calls", json_incref(calls))) ||
	    (refusal != NULL && !set(msg, "refusal", json_incref(refusal))) ||
	    (evbuffer_get_length(reasoning) > 0 &&
	     !set(msg, "reasoning_content", take_string(reasoning))))
		goto done;
	out = json_pack("{s:O?,s:s,s:I,s:O?,s:[{s:i,s:O,s:s}],s:o}", "id",
	                json_object_get(body, "id"), "object", "chat.completion", "created",
	                json_is_integer(json_object_get(body, "created_at"))
	                        ? json_integer_value(json_object_get(body, "created_at"))
	                        : (json_int_t)now_or(ctx),
	                "model", json_object_get(body, "model"), "choices", "index", 0, "message",
	                msg, "finish_reason", finish_of_response(body, json_array_size(calls) > 0),
	                "usage", chat_usage_of(json_object_get(body, "usage")));
done:
	json_decref(msg);
	json_decref(calls);
	json_decref(refusal);
	if (text)
		evbuffer_free(text);
	if (reasoning)
		evbuffer_free(reasoning);
	return out;
}

/* ================================================================== Responses stream → pivot */

struct proto_decoder {
	bool started, finished;
	char id[RESPONSES_NAME_MAX], model[RESPONSES_NAME_MAX];
	long long created;
	int n_tools;
	int *tool_of; /* by output_index: the pivot tool index, -1 when not a function call */
	size_t n_items;
};

static struct proto_decoder *resp_decoder_new(const struct proto_reply_ctx *ctx)
{
	struct proto_decoder *d = calloc(1, sizeof(*d));

	if (d != NULL)
		d->created = now_or(ctx);
	return d;
}

static void resp_decoder_free(struct proto_decoder *d)
{
	if (d == NULL)
		return;
	free(d->tool_of);
	free(d);
}

static bool emit_chunk(struct proto_decoder *d, json_t *delta, const char *finish,
                       proto_chunk_fn emit, void *arg)
{
	json_t *c =
	        json_pack("{s:s,s:s,s:I,s:s,s:[{s:i,s:o,s:s?}]}", "id", d->id, "object",
	                  "chat.completion.chunk", "created", (json_int_t)d->created, "model",
	                  d->model, "choices", "index", 0, "delta", delta, "finish_reason", finish);
	bool ok = c != NULL && emit(arg, c);

	json_decref(c);
	return ok;
}

static bool emit_text(struct proto_decoder *d, const char *key, const json_t *text,
                      proto_chunk_fn emit, void *arg)
{
	if (!json_is_string(text) || json_string_length(text) == 0)
		return true;
	return emit_chunk(d, json_pack("{s:O}", key, text), NULL, emit, arg);
}

static int *tool_slot(struct proto_decoder *d, const json_t *idx)
{
	json_int_t i = json_is_integer(idx) ? json_integer_value(idx) : -1;

	if (i < 0 || i >= RESPONSES_MAX_ITEMS)
		return NULL;
	if ((size_t)i >= d->n_items) {
		int *n = realloc(d->tool_of, ((size_t)i + 1) * sizeof(*n));
		if (n == NULL)
			return NULL;
		for (size_t k = d->n_items; k <= (size_t)i; k++)
			n[k] = -1;
		d->tool_of = n;
		d->n_items = (size_t)i + 1;
	}
	return &d->tool_of[i];
}

static bool broken(struct proto_error *err, const char *what)
{
	proto_error_set(err, 0, "upstream_error", "upstream_error", "%s", what);
	return false;
}

/* response.completed / .incomplete: the finish chunk, then the usage chunk. */
static bool finish_stream(struct proto_decoder *d, const json_t *r, proto_chunk_fn emit, void *arg)
{
	json_t *c;
	bool ok;

	d->finished = true;
	if (!emit_chunk(d, json_object(), finish_of_response(r, d->n_tools > 0), emit, arg))
		return false;
	c = json_pack("{s:s,s:s,s:I,s:s,s:[],s:o}", "id", d->id, "object", "chat.completion.chunk",
	              "created", (json_int_t)d->created, "model", d->model, "choices", "usage",
	              chat_usage_of(json_object_get(r, "usage")));
	ok = c != NULL && emit(arg, c);
	json_decref(c);
	return ok;
}

static bool stream_error_of(const json_t *e, struct proto_error *err)
{
	const char *code = str(e, "code");
	const char *msg = str(e, "message");
	bool rate = is(code, "rate_limit_exceeded");

	proto_error_set(err, rate ? 429 : 502, rate ? "rate_limit_error" : "server_error",
	                rate ? "rate_limit_exceeded" : "upstream_error", "%s",
	                msg ? msg : "the upstream reported an error");
	return false;
}

static bool resp_decode(struct proto_decoder *d, const struct sse_event *ev, proto_chunk_fn emit,
                        void *arg, struct proto_error *err)
{
	const char *name = ev->event;
	json_t *data;
	bool ok = true;

	if (!ev->has_data)
		return true;
	data = json_loadb(ev->data, ev->data_len, 0, NULL);
	if (!json_is_object(data)) {
		json_decref(data);
		return broken(err, "the upstream sent an event that is not a JSON object");
	}
	if (name[0] == '\0' && json_is_string(json_object_get(data, "type")))
		name = str(data, "type");
	if (strcmp(name, "error") == 0) {
		ok = stream_error_of(data, err);
	} else if (strcmp(name, "response.failed") == 0) {
		ok = stream_error_of(json_object_get(json_object_get(data, "response"), "error"),
		                     err);
	} else if (strcmp(name, "response.created") == 0) {
		const json_t *r = json_object_get(data, "response");
		if (d->started || !json_is_object(r)) {
			ok = broken(err, "response.created out of order");
			goto done;
		}
		d->started = true;
		keep_name(d->id, json_object_get(r, "id"));
		keep_name(d->model, json_object_get(r, "model"));
		if (json_is_integer(json_object_get(r, "created_at")))
			d->created = json_integer_value(json_object_get(r, "created_at"));
		ok = emit_chunk(d, json_pack("{s:s,s:s}", "role", "assistant", "content", ""), NULL,
		                emit, arg);
	} else if (strncmp(name, "response.", 9) == 0 && (!d->started || d->finished)) {
		ok = broken(err, "a response event outside the response");
	} else if (strcmp(name, "response.output_text.delta") == 0) {
		ok = emit_text(d, "content", json_object_get(data, "delta"), emit, arg);
	} else if (strcmp(name, "response.refusal.delta") == 0) {
		ok = emit_text(d, "refusal", json_object_get(data, "delta"), emit, arg);
	} else if (strcmp(name, "response.reasoning_text.delta") == 0 ||
	           strcmp(name, "response.reasoning_summary_text.delta") == 0) {
		ok = emit_text(d, "reasoning_content", json_object_get(data, "delta"), emit, arg);
	} else if (strcmp(name, "response.output_item.added") == 0) {
		const json_t *item = json_object_get(data, "item");
		int *slot;
		json_t *tc;
		if (!is(str(item, "type"), "function_call"))
			goto done;
		slot = tool_slot(d, json_object_get(data, "output_index"));
		if (slot == NULL || !json_is_string(json_object_get(item, "call_id")) ||
		    !json_is_string(json_object_get(item, "name"))) {
			ok = broken(err,
			            "a function_call item without output_index, call_id or name");
			goto done;
		}
		*slot = d->n_tools++;
		tc = json_pack("{s:i,s:O,s:s,s:{s:O,s:s}}", "index", *slot, "id",
		               json_object_get(item, "call_id"), "type", "function", "function",
		               "name", json_object_get(item, "name"), "arguments", "");
		ok = tc != NULL &&
		     emit_chunk(d, json_pack("{s:[o]}", "tool_calls", tc), NULL, emit, arg);
	} else if (strcmp(name, "response.function_call_arguments.delta") == 0) {
		int *slot = tool_slot(d, json_object_get(data, "output_index"));
		const json_t *piece = json_object_get(data, "delta");
		if (slot == NULL || *slot < 0) {
			ok = broken(err, "function_call_arguments.delta for an unknown item");
			goto done;
		}
		if (json_is_string(piece) && json_string_length(piece) > 0)
			ok = emit_chunk(d,
			                json_pack("{s:[{s:i,s:{s:O}}]}", "tool_calls", "index",
			                          *slot, "function", "arguments", piece),
			                NULL, emit, arg);
	} else if (strcmp(name, "response.completed") == 0 ||
	           strcmp(name, "response.incomplete") == 0) {
		ok = finish_stream(d, json_object_get(data, "response"), emit, arg);
	}
	/* Other events (in_progress, *.added/done of parts, annotations) carry nothing new. */
done:
	json_decref(data);
	return ok;
}

/* ================================================================== pivot stream → Responses */

enum item_kind { ITEM_NONE, ITEM_MESSAGE, ITEM_CALL };

struct proto_encoder {
	const struct proto_reply_ctx *ctx; /* borrowed */
	long long created;
	json_int_t seq; /* the next sequence_number */
	bool started;
	json_t *output;      /* finished items, in order */
	enum item_kind open; /* the item being streamed */
	int open_tool;       /* its pivot tool index (ITEM_CALL) */
	char item_id[200];
	char model[RESPONSES_NAME_MAX]; /* the upstream's, from the first chunk naming one */
	json_t *call_id, *call_name;    /* of the open function call */
	struct evbuffer *text;          /* text (message) or arguments (call) of the open item */
	const char *finish;             /* static; NULL until a finish_reason arrives */
	struct record_usage usage;
};

static struct proto_encoder *resp_encoder_new(const struct proto_reply_ctx *ctx)
{
	struct proto_encoder *e = calloc(1, sizeof(*e));

	if (e == NULL)
		return NULL;
	e->ctx = ctx;
	e->created = now_or(ctx);
	e->output = json_array();
	e->text = evbuffer_new();
	if (e->output == NULL || e->text == NULL) {
		json_decref(e->output);
		if (e->text)
			evbuffer_free(e->text);
		free(e);
		return NULL;
	}
	return e;
}

static void resp_encoder_free(struct proto_encoder *e)
{
	if (e == NULL)
		return;
	json_decref(e->output);
	json_decref(e->call_id);
	json_decref(e->call_name);
	evbuffer_free(e->text);
	free(e);
}

/* One typed event: "event: TYPE" and data {type, …fields, sequence_number}. fields is
 * stolen. */
static bool put(struct proto_encoder *e, struct evbuffer *out, const char *type, json_t *fields)
{
	json_t *ev = json_pack("{s:s}", "type", type);
	bool ok = ev != NULL && fields != NULL && json_object_update(ev, fields) == 0 &&
	          set(ev, "sequence_number", json_integer(e->seq)) &&
	          proto_sse_append(out, type, ev);

	e->seq++;
	json_decref(ev);
	json_decref(fields);
	return ok;
}

static bool enc_start(struct proto_encoder *e, struct evbuffer *out)
{
	if (e->started)
		return true;
	e->started = true;
	return put(e, out, "response.created",
	           json_pack("{s:o}", "response",
	                     response_object(e->ctx, e->created, e->model, "in_progress", NULL,
	                                     json_array(), NULL))) &&
	       put(e, out, "response.in_progress",
	           json_pack("{s:o}", "response",
	                     response_object(e->ctx, e->created, e->model, "in_progress", NULL,
	                                     json_array(), NULL)));
}

static int output_index(const struct proto_encoder *e)
{
	return (int)json_array_size(e->output);
}

static bool enc_close(struct proto_encoder *e, struct evbuffer *out)
{
	const char *status = incomplete_reason(e->finish) ? "incomplete" : "completed";
	int oi = output_index(e);
	json_t *item;
	bool ok;

	if (e->open == ITEM_MESSAGE) {
		json_t *text = take_string(e->text);
		ok = text != NULL &&
		     put(e, out, "response.output_text.done",
		         json_pack("{s:s,s:i,s:i,s:O,s:[]}", "item_id", e->item_id, "output_index",
		                   oi, "content_index", 0, "text", text, "logprobs")) &&
		     put(e, out, "response.content_part.done",
		         json_pack("{s:s,s:i,s:i,s:o}", "item_id", e->item_id, "output_index", oi,
		                   "content_index", 0, "part", text_part(json_incref(text))));
		item = message_item(e->item_id, status, json_pack("[o]", text_part(text)));
	} else if (e->open == ITEM_CALL) {
		json_t *args = take_string(e->text);
		ok = args != NULL &&
		     put(e, out, "response.function_call_arguments.done",
		         json_pack("{s:s,s:i,s:O,s:O}", "item_id", e->item_id, "output_index", oi,
		                   "name", e->call_name, "arguments", args));
		item = call_item(e->item_id, "completed", e->call_id, e->call_name, args);
		json_decref(e->call_id);
		json_decref(e->call_name);
		e->call_id = e->call_name = NULL;
	} else {
		return true;
	}
	e->open = ITEM_NONE;
	ok = ok && item != NULL &&
	     put(e, out, "response.output_item.done",
	         json_pack("{s:i,s:O}", "output_index", oi, "item", item)) &&
	     push(e->output, json_incref(item));
	json_decref(item);
	return ok;
}

static bool enc_text(struct proto_encoder *e, const json_t *piece, struct evbuffer *out)
{
	int oi;

	if (e->open != ITEM_MESSAGE) {
		if (!enc_close(e, out))
			return false;
		oi = output_index(e);
		snprintf(e->item_id, sizeof(e->item_id), "msg_%s_%d",
		         e->ctx && e->ctx->request_id ? e->ctx->request_id : "0", oi);
		e->open = ITEM_MESSAGE;
		if (!put(e, out, "response.output_item.added",
		         json_pack("{s:i,s:o}", "output_index", oi, "item",
		                   message_item(e->item_id, "in_progress", json_array()))) ||
		    !put(e, out, "response.content_part.added",
		         json_pack("{s:s,s:i,s:i,s:o}", "item_id", e->item_id, "output_index", oi,
		                   "content_index", 0, "part", text_part(json_string("")))))
			return false;
	}
	oi = output_index(e);
	return add_text(e->text, piece, NULL) &&
	       put(e, out, "response.output_text.delta",
	           json_pack("{s:s,s:i,s:i,s:O,s:[]}", "item_id", e->item_id, "output_index", oi,
	                     "content_index", 0, "delta", piece, "logprobs"));
}

static bool enc_calls(struct proto_encoder *e, const json_t *calls, struct evbuffer *out)
{
	size_t i;
	const json_t *tc;

	json_array_foreach(calls, i, tc)
	{
		const json_t *idx = json_object_get(tc, "index");
		const json_t *fn = json_object_get(tc, "function");
		const json_t *id = json_object_get(tc, "id");
		const json_t *name = json_object_get(fn, "name");
		const json_t *args = json_object_get(fn, "arguments");
		json_int_t t = json_is_integer(idx) ? json_integer_value(idx) : 0;
		int oi;

		if (t < 0 || t > RESPONSES_MAX_ITEMS)
			return false;
		/* A call starts with its id and name; a new id is a new call (some servers
		 * give every call index 0, some repeat the id on every piece). A piece of
		 * a call already closed (interleaved calls) cannot be expressed. */
		if (e->open != ITEM_CALL || e->open_tool != (int)t ||
		    (json_is_string(id) && !json_equal(id, e->call_id))) {
			if (!json_is_string(id) || !json_is_string(name) || !enc_close(e, out))
				return false;
			oi = output_index(e);
			snprintf(e->item_id, sizeof(e->item_id), "fc_%s_%d",
			         e->ctx && e->ctx->request_id ? e->ctx->request_id : "0", oi);
			e->open = ITEM_CALL;
			e->open_tool = (int)t;
			e->call_id = json_incref((json_t *)id);
			e->call_name = json_incref((json_t *)name);
			if (!put(e, out, "response.output_item.added",
			         json_pack("{s:i,s:o}", "output_index", oi, "item",
			                   call_item(e->item_id, "in_progress", id, name,
			                             json_string("")))))
				return false;
		}
		oi = output_index(e);
		if (json_is_string(args) && json_string_length(args) > 0 &&
		    (!add_text(e->text, args, NULL) ||
		     !put(e, out, "response.function_call_arguments.delta",
		          json_pack("{s:s,s:i,s:O}", "item_id", e->item_id, "output_index", oi,
		                    "delta", args))))
			return false;
	}
	return true;
}

static bool resp_encode(struct proto_encoder *e, const json_t *chunk, struct evbuffer *out)
{
	const json_t *choice = json_array_get(json_object_get(chunk, "choices"), 0);
	const json_t *delta = json_object_get(choice, "delta");
	const json_t *content = json_object_get(delta, "content");
	const json_t *calls = json_object_get(delta, "tool_calls");
	const char *finish = str(choice, "finish_reason");
	struct record_usage u;

	if (!json_is_object(chunk))
		return true;
	if (e->model[0] == '\0')
		keep_name(e->model, json_object_get(chunk, "model"));
	if (!enc_start(e, out))
		return false;
	if (proto_usage_from_chat(chunk, &u))
		e->usage = u;
	if (json_is_integer(json_object_get(choice, "index")) &&
	    json_integer_value(json_object_get(choice, "index")) != 0)
		return true; /* one answer per request in Responses */
	if (!json_is_string(content) || json_string_length(content) == 0)
		content = json_object_get(delta, "refusal");
	if (json_is_string(content) && json_string_length(content) > 0 &&
	    !enc_text(e, content, out))
		return false;
	if (json_is_array(calls) && !enc_calls(e, calls, out))
		return false;
	if (finish != NULL) {
		e->finish = is(finish, "length")           ? "length"
		            : is(finish, "content_filter") ? "content_filter"
		                                           : "stop";
		return enc_close(e, out);
	}
	return true;
}

static void resp_stream_end(struct proto_encoder *e, const char *finish_reason,
                            struct evbuffer *out)
{
	const char *incomplete;
	json_t *r;

	if (finish_reason != NULL)
		e->finish = is(finish_reason, "length") ? "length" : "content_filter";
	incomplete = incomplete_reason(e->finish);
	enc_start(e, out);
	enc_close(e, out);
	r = response_object(e->ctx, e->created, e->model, incomplete ? "incomplete" : "completed",
	                    incomplete, json_incref(e->output), responses_usage(&e->usage));
	put(e, out, incomplete ? "response.incomplete" : "response.completed",
	    json_pack("{s:o}", "response", r));
}

/* ================================================================== errors and usage */

static bool resp_error_to_openai(const char *body, size_t len, int status, struct proto_error *err)
{
	return proto_openai_error_to_err(body, len, status, err);
}

static void resp_error_body(const struct proto_error_out *e, struct evbuffer *out)
{
	json_t *o = proto_openai_error(e);

	if (o != NULL)
		proto_json_append(out, o);
	json_decref(o);
}

/* The Responses error event {type:error, code, message, param, sequence_number}, with
 * the OpenAI error object beside it: both OpenAI SDKs raise an APIError for an event
 * whose data has "error", and read the message from it. */
static void resp_stream_error(struct proto_encoder *enc, const struct proto_error_out *e,
                              struct evbuffer *out)
{
	json_t *o = proto_openai_error(e);
	json_t *ev =
	        json_pack("{s:s,s:s?,s:s,s:n,s:I,s:O?}", "type", "error", "code", e->code,
	                  "message", e->message ? e->message : "", "param", "sequence_number",
	                  enc ? enc->seq : (json_int_t)0, "error", json_object_get(o, "error"));

	if (ev != NULL)
		proto_sse_append(out, "error", ev);
	if (enc != NULL)
		enc->seq++;
	json_decref(ev);
	json_decref(o);
}

static void resp_stream_usage(const struct sse_event *ev, struct record_usage *u)
{
	static const char *const finals[] = {"response.completed", "response.incomplete",
	                                     "response.failed"};
	bool final = false;
	json_t *data;
	const json_t *us;

	if (!ev->has_data)
		return;
	for (size_t i = 0; i < 3 && !final; i++) {
		/* An upstream without event: lines names the type in the data only. */
		final = ev->event[0] != '\0' ? strcmp(ev->event, finals[i]) == 0
		                             : memmem(ev->data, ev->data_len, finals[i],
		                                      strlen(finals[i])) != NULL;
	}
	if (!final)
		return;
	data = json_loadb(ev->data, ev->data_len, 0, NULL);
	us = json_object_get(json_object_get(data, "response"), "usage");
	if (json_is_object(us)) {
		u->prompt = count(us, "input_tokens");
		u->completion = count(us, "output_tokens");
		u->total = json_object_get(us, "total_tokens") ? count(us, "total_tokens")
		                                               : u->prompt + u->completion;
		u->cached = count(json_object_get(us, "input_tokens_details"), "cached_tokens");
		u->reasoning =
		        count(json_object_get(us, "output_tokens_details"), "reasoning_tokens");
		u->present = true;
		u->estimated = false;
	}
	json_decref(data);
}

const struct proto_codec proto_codec_responses = {
        .proto = PROTO_RESPONSES,
        .name = "responses",
        .request_to_chat = resp_request_to_chat,
        .request_from_chat = resp_request_from_chat,
        .response_to_chat = resp_response_to_chat,
        .response_from_chat = resp_response_from_chat,
        .decoder_new = resp_decoder_new,
        .decode = resp_decode,
        .decoder_free = resp_decoder_free,
        .encoder_new = resp_encoder_new,
        .encode = resp_encode,
        .stream_end = resp_stream_end,
        .encoder_free = resp_encoder_free,
        .error_to_openai = resp_error_to_openai,
        .error_body = resp_error_body,
        .stream_error = resp_stream_error,
        .stream_usage = resp_stream_usage,
};
