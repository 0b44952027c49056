/* anthropic.c — the Messages codec (Anthropic's protocol ⇄ the pivot) and the anthropic provider.
 *
 * Both directions of both halves live here: an OpenAI-speaking client served by an
 * Anthropic instance (pivot → Messages request, Messages answer and events → pivot), and
 * a Messages-speaking client (Claude Code, the Anthropic SDKs) served by an
 * OpenAI-compatible one (Messages request → pivot, pivot answer and chunks → Messages).
 * The field tables are in docs/providers.md; this file follows them section by section.
 */
#include "sluice/provider.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>

#include "sluice/sse.h"

/* Content blocks one streamed message may open: the real API opens a handful; a stream
 * announcing more is broken, and the bound keeps the index table small. */
#define MESSAGES_MAX_BLOCKS 4096
/* Ids and model names kept from upstream events (longer ones are not kept). */
#define MESSAGES_NAME_MAX 128
/* Anthropic's temperature range is 0..1 where OpenAI's is 0..2. */
#define MESSAGES_MAX_TEMPERATURE 1.0

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

#define BAD(err, ...)                                                                              \
	proto_error_set(err, 400, "invalid_request_error", "invalid_request", __VA_ARGS__)
#define UNSUPPORTED(err, ...)                                                                      \
	proto_error_set(err, 400, "invalid_request_error", "unsupported_on_instance", __VA_ARGS__)
#define NOMEM(err) proto_error_set(err, 500, "server_error", "internal_error", "out of memory")

/* The text gathered in b as a JSON string (b is drained). */
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

	if (s == NULL || n >= MESSAGES_NAME_MAX || memchr(s, '\0', n) != NULL)
		return;
	memcpy(dst, s, n);
	dst[n] = '\0';
}

/* ------------------------------------------------------------------ mappings */

static const char *finish_of_stop(const char *stop)
{
	if (is(stop, "max_tokens") || is(stop, "model_context_window_exceeded"))
		return "length";
	if (is(stop, "tool_use"))
		return "tool_calls";
	if (is(stop, "refusal"))
		return "content_filter";
	return "stop"; /* end_turn, stop_sequence, pause_turn, and what is not known yet */
}

static const char *stop_of_finish(const char *finish)
{
	if (is(finish, "length"))
		return "max_tokens";
	if (is(finish, "tool_calls") || is(finish, "function_call"))
		return "tool_use";
	if (is(finish, "content_filter"))
		return "refusal";
	return "end_turn";
}

/* Anthropic error type → the status it comes with and OpenAI's terms. */
static const struct anthropic_error {
	const char *type;
	int status;
	const char *openai_type, *code;
} anthropic_errors[] = {
        {"invalid_request_error", 400, "invalid_request_error", "invalid_request"},
        {"authentication_error", 401, "authentication_error", "invalid_api_key"},
        {"billing_error", 402, "invalid_request_error", "billing_error"},
        {"permission_error", 403, "permission_error", "permission_denied"},
        {"not_found_error", 404, "invalid_request_error", "not_found"},
        {"request_too_large", 413, "invalid_request_error", "request_too_large"},
        {"rate_limit_error", 429, "rate_limit_error", "rate_limit_exceeded"},
        {"api_error", 500, "server_error", "upstream_error"},
        {"timeout_error", 504, "server_error", "upstream_timeout"},
        {"overloaded_error", 529, "server_error", "upstream_overloaded"},
};

/* An Anthropic error object {type, message} → *err; status 0: the type's own. */
static bool error_from_object(const json_t *e, int status, struct proto_error *err)
{
	const char *type = str(e, "type");
	const char *msg = str(e, "message");

	if (type == NULL)
		return false;
	for (size_t i = 0; i < sizeof(anthropic_errors) / sizeof(anthropic_errors[0]); i++) {
		const struct anthropic_error *m = &anthropic_errors[i];
		if (strcmp(type, m->type) == 0) {
			proto_error_set(err, status ? status : m->status, m->openai_type, m->code,
			                "%s", msg ? msg : type);
			return true;
		}
	}
	status = status ? status : 502;
	proto_error_set(err, status, proto_type_for_status(status),
	                status >= 500 ? "upstream_error" : "invalid_request", "%s",
	                msg ? msg : type);
	return true;
}

/* The Anthropic error type a client should see for a status. */
static const char *anthropic_type_for_status(int status)
{
	switch (status) {
	case 401:
		return "authentication_error";
	case 402:
		return "billing_error";
	case 403:
		return "permission_error";
	case 404:
		return "not_found_error";
	case 413:
		return "request_too_large";
	case 429:
		return "rate_limit_error";
	case 503:
	case 529:
		return "overloaded_error";
	default:
		break;
	}
	return status >= 500 ? "api_error" : "invalid_request_error";
}

/* ================================================================== pivot → Messages */

/* An image_url part's URL → an image block: data: URLs become base64 sources, http(s)
 * URLs url sources. */
static json_t *image_block(const json_t *part, size_t mi, struct proto_error *err)
{
	const json_t *iu = json_object_get(part, "image_url");
	const json_t *u = json_is_object(iu) ? json_object_get(iu, "url") : iu;
	const char *s = json_string_value(u);
	size_t n = s ? json_string_length(u) : 0;
	json_t *b;

	if (s == NULL) {
		BAD(err, "messages[%zu]: image_url.url must be a string", mi);
		return NULL;
	}
	if (n > 5 && memcmp(s, "data:", 5) == 0) {
		static const char marker[] = ";base64,";
		const char *m = memmem(s + 5, n - 5, marker, sizeof(marker) - 1);
		if (m == NULL || m == s + 5) {
			BAD(err,
			    "messages[%zu]: an image data URL must be data:<type>;base64,<data>",
			    mi);
			return NULL;
		}
		const char *data = m + sizeof(marker) - 1;
		b = json_pack("{s:s,s:{s:s,s:s%,s:s%}}", "type", "image", "source", "type",
		              "base64", "media_type", s + 5, (size_t)(m - (s + 5)), "data", data,
		              (size_t)(s + n - data));
	} else if ((n > 7 && memcmp(s, "http://", 7) == 0) ||
	           (n > 8 && memcmp(s, "https://", 8) == 0)) {
		b = json_pack("{s:s,s:{s:s,s:O}}", "type", "image", "source", "type", "url", "url",
		              u);
	} else {
		BAD(err, "messages[%zu]: image_url.url must be a data: or http(s) URL", mi);
		return NULL;
	}
	if (b == NULL)
		NOMEM(err);
	return b;
}

static json_t *text_block(const json_t *text)
{
	return json_pack("{s:s,s:O}", "type", "text", "text", text);
}

/* Chat content (string, array of parts, or null) → blocks appended to blocks. Empty
 * texts are left out: Messages refuses empty text blocks. */
static bool content_blocks(const json_t *content, bool images, size_t mi, json_t *blocks,
                           struct proto_error *err)
{
	size_t i;
	const json_t *part;

	if (content == NULL || json_is_null(content))
		return true;
	if (json_is_string(content)) {
		if (json_string_length(content) > 0 && !push(blocks, text_block(content))) {
			NOMEM(err);
			return false;
		}
		return true;
	}
	if (!json_is_array(content)) {
		BAD(err, "messages[%zu].content: must be a string or an array of parts", mi);
		return false;
	}
	json_array_foreach(content, i, part)
	{
		const char *type = str(part, "type");
		const json_t *text = json_object_get(part, "text");
		json_t *b;

		if (is(type, "text") || is(type, "input_text") || is(type, "refusal")) {
			if (is(type, "refusal"))
				text = json_object_get(part, "refusal");
			if (!json_is_string(text)) {
				BAD(err, "messages[%zu].content[%zu].text: must be a string", mi,
				    i);
				return false;
			}
			if (json_string_length(text) == 0)
				continue;
			b = text_block(text);
		} else if (is(type, "image_url") && images) {
			b = image_block(part, mi, err);
			if (b == NULL)
				return false;
		} else {
			UNSUPPORTED(err,
			            "messages[%zu].content[%zu]: parts of type \"%s\" cannot be "
			            "sent to "
			            "this instance (Anthropic Messages)",
			            mi, i, type ? type : "(none)");
			return false;
		}
		if (!push(blocks, b)) {
			NOMEM(err);
			return false;
		}
	}
	return true;
}

/* Assistant tool_calls → tool_use blocks; arguments must be a JSON object. */
static bool tool_use_blocks(const json_t *calls, size_t mi, json_t *blocks, struct proto_error *err)
{
	size_t i;
	const json_t *tc;

	if (calls == NULL || json_is_null(calls))
		return true;
	if (!json_is_array(calls)) {
		BAD(err, "messages[%zu].tool_calls: must be an array", mi);
		return false;
	}
	json_array_foreach(calls, i, tc)
	{
		const json_t *fn = json_object_get(tc, "function");
		const json_t *id = json_object_get(tc, "id");
		const json_t *name = json_object_get(fn, "name");
		const json_t *args = json_object_get(fn, "arguments");
		json_t *input;

		if (!json_is_string(id) || !json_is_string(name)) {
			BAD(err,
			    "messages[%zu].tool_calls[%zu]: id and function.name must be strings",
			    mi, i);
			return false;
		}
		if (args == NULL || json_is_null(args) ||
		    (json_is_string(args) && json_string_length(args) == 0)) {
			input = json_object();
		} else if (json_is_string(args)) {
			input = json_loadb(json_string_value(args), json_string_length(args), 0,
			                   NULL);
			if (!json_is_object(input)) {
				json_decref(input);
				BAD(err,
				    "messages[%zu].tool_calls[%zu].function.arguments: not a JSON "
				    "object",
				    mi, i);
				return false;
			}
		} else {
			BAD(err,
			    "messages[%zu].tool_calls[%zu].function.arguments: must be a string",
			    mi, i);
			return false;
		}
		if (!push(blocks, json_pack("{s:s,s:O,s:O,s:o}", "type", "tool_use", "id", id,
		                            "name", name, "input", input))) {
			NOMEM(err);
			return false;
		}
	}
	return true;
}

/* A tool message → one tool_result block (text and images; Messages allows both). */
static json_t *tool_result_block(const json_t *m, size_t mi, struct proto_error *err)
{
	const json_t *id = json_object_get(m, "tool_call_id");
	const json_t *content = json_object_get(m, "content");
	json_t *b, *inner;

	if (!json_is_string(id)) {
		BAD(err, "messages[%zu].tool_call_id: must be a string", mi);
		return NULL;
	}
	b = json_pack("{s:s,s:O}", "type", "tool_result", "tool_use_id", id);
	if (b == NULL) {
		NOMEM(err);
		return NULL;
	}
	if (json_is_string(content)) {
		if (json_string_length(content) > 0 &&
		    !set(b, "content", json_copy((json_t *)content)))
			goto nomem;
		return b;
	}
	inner = json_array();
	if (inner == NULL || !set(b, "content", inner))
		goto nomem;
	if (!content_blocks(content, true, mi, inner, err)) {
		json_decref(b);
		return NULL;
	}
	return b;
nomem:
	json_decref(b);
	NOMEM(err);
	return NULL;
}

/* One user, assistant or tool message → its Messages role and blocks (NULL with *err). */
static json_t *message_blocks(const json_t *m, size_t i, const char **role, struct proto_error *err)
{
	const char *r = str(m, "role");
	const json_t *content = json_object_get(m, "content");
	json_t *blocks = json_array(), *tr;
	bool ok = false;

	if (blocks == NULL) {
		NOMEM(err);
		return NULL;
	}
	if (is(r, "user")) {
		*role = "user";
		ok = content_blocks(content, true, i, blocks, err);
	} else if (is(r, "assistant")) {
		*role = "assistant";
		ok = content_blocks(content, false, i, blocks, err) &&
		     tool_use_blocks(json_object_get(m, "tool_calls"), i, blocks, err);
	} else if (is(r, "tool")) {
		*role = "user"; /* tool results travel in the next user turn */
		tr = tool_result_block(m, i, err);
		ok = tr != NULL && push(blocks, tr);
		if (tr != NULL && !ok)
			NOMEM(err);
	} else {
		BAD(err, "messages[%zu].role: must be system, developer, user, assistant or tool",
		    i);
	}
	if (!ok) {
		json_decref(blocks);
		return NULL;
	}
	return blocks;
}

/* Append blocks as one message of role, merged into the previous message when it has
 * the same role (Messages alternates user and assistant). Steals blocks. */
static bool append_message(json_t *messages, const char *role, json_t *blocks)
{
	size_t n = json_array_size(messages);
	json_t *last = n ? json_array_get(messages, n - 1) : NULL;
	bool ok;

	if (blocks == NULL)
		return false;
	if (json_array_size(blocks) == 0) {
		json_decref(blocks);
		return true;
	}
	if (last != NULL && is(str(last, "role"), role)) {
		ok = json_array_extend(json_object_get(last, "content"), blocks) == 0;
		json_decref(blocks);
		return ok;
	}
	return push(messages, json_pack("{s:s,s:o}", "role", role, "content", blocks));
}

static bool tools_to_messages(const json_t *chat, json_t *out, struct proto_error *err)
{
	const json_t *tools = json_object_get(chat, "tools");
	const json_t *choice = json_object_get(chat, "tool_choice");
	const json_t *parallel = json_object_get(chat, "parallel_tool_calls");
	json_t *list, *tc = NULL;
	size_t i;
	const json_t *t;

	if (tools != NULL && !json_is_null(tools)) {
		if (!json_is_array(tools)) {
			BAD(err, "tools: must be an array");
			return false;
		}
		list = json_array();
		if (list == NULL || !set(out, "tools", list))
			goto nomem;
		json_array_foreach(tools, i, t)
		{
			const json_t *fn = json_object_get(t, "function");
			const json_t *name = json_object_get(fn, "name");
			const json_t *desc = json_object_get(fn, "description");
			const json_t *params = json_object_get(fn, "parameters");
			json_t *a;

			if (!is(str(t, "type"), "function") || !json_is_string(name)) {
				UNSUPPORTED(err,
				            "tools[%zu]: only function tools with a name can be "
				            "sent to "
				            "this instance (Anthropic Messages)",
				            i);
				return false;
			}
			a = json_pack("{s:O}", "name", name);
			if (a == NULL || !push(list, a))
				goto nomem;
			if (json_is_string(desc) &&
			    !set(a, "description", json_copy((json_t *)desc)))
				goto nomem;
			if (!set(a, "input_schema",
			         json_is_object(params) ? json_copy((json_t *)params)
			                                : json_pack("{s:s}", "type", "object")))
				goto nomem;
		}
	}
	if (json_is_string(choice)) {
		const char *c = json_string_value(choice);
		if (is(c, "auto"))
			tc = json_pack("{s:s}", "type", "auto");
		else if (is(c, "none"))
			tc = json_pack("{s:s}", "type", "none");
		else if (is(c, "required"))
			tc = json_pack("{s:s}", "type", "any");
		else {
			BAD(err, "tool_choice: \"%s\" is not auto, none or required", c);
			return false;
		}
	} else if (json_is_object(choice)) {
		const json_t *name = json_object_get(json_object_get(choice, "function"), "name");
		if (!json_is_string(name)) {
			BAD(err, "tool_choice: must name a function");
			return false;
		}
		tc = json_pack("{s:s,s:O}", "type", "tool", "name", name);
	} else if (choice != NULL && !json_is_null(choice)) {
		BAD(err, "tool_choice: must be a string or an object");
		return false;
	}
	if (json_is_false(parallel) && json_array_size(json_object_get(out, "tools")) > 0) {
		if (tc == NULL)
			tc = json_pack("{s:s}", "type", "auto");
		if (tc != NULL && !is(str(tc, "type"), "none") &&
		    !set(tc, "disable_parallel_tool_use", json_true()))
			goto nomem_tc;
	}
	if (tc != NULL && !set(out, "tool_choice", tc))
		goto nomem;
	return true;
nomem_tc:
	json_decref(tc);
nomem:
	NOMEM(err);
	return false;
}

/* max_tokens: the request's, else options.max_tokens, else the documented default. */
static bool max_tokens_of(const json_t *chat, const struct config_instance *in, json_int_t *out,
                          struct proto_error *err)
{
	static const char *const keys[] = {"max_completion_tokens", "max_tokens"};

	for (size_t i = 0; i < 2; i++) {
		const json_t *v = json_object_get(chat, keys[i]);
		if (v == NULL || json_is_null(v))
			continue;
		if (!json_is_integer(v) || json_integer_value(v) < 1) {
			BAD(err, "%s: must be a positive integer", keys[i]);
			return false;
		}
		*out = json_integer_value(v);
		return true;
	}
	const json_t *o = in ? json_object_get(in->options, "max_tokens") : NULL;
	*out = json_is_integer(o) && json_integer_value(o) > 0 ? json_integer_value(o)
	                                                       : PROTO_MESSAGES_DEFAULT_MAX_TOKENS;
	return true;
}

static bool sampling_to_messages(const json_t *chat, json_t *out, struct proto_error *err)
{
	const json_t *stop = json_object_get(chat, "stop");
	const json_t *temp = json_object_get(chat, "temperature");
	const json_t *top_p = json_object_get(chat, "top_p");
	const json_t *n = json_object_get(chat, "n");
	const char *rf = str(json_object_get(chat, "response_format"), "type");

	if (json_is_integer(n) && json_integer_value(n) > 1) {
		UNSUPPORTED(err, "n: one choice only on this instance (Anthropic Messages)");
		return false;
	}
	if (is(rf, "json_object") || is(rf, "json_schema")) {
		UNSUPPORTED(err,
		            "response_format: %s is not supported by this instance "
		            "(Anthropic Messages)",
		            rf);
		return false;
	}
	if (json_is_string(stop)) {
		if (!set(out, "stop_sequences", json_pack("[O]", stop)))
			goto nomem;
	} else if (json_is_array(stop)) {
		size_t i;
		const json_t *s;
		json_array_foreach(stop, i, s)
		{
			if (!json_is_string(s)) {
				BAD(err, "stop[%zu]: must be a string", i);
				return false;
			}
		}
		if (json_array_size(stop) > 0 &&
		    !set(out, "stop_sequences", json_copy((json_t *)stop)))
			goto nomem;
	} else if (stop != NULL && !json_is_null(stop)) {
		BAD(err, "stop: must be a string or an array of strings");
		return false;
	}
	if (json_is_number(temp)) {
		double t = json_number_value(temp);
		if (!set(out, "temperature",
		         json_real(t > MESSAGES_MAX_TEMPERATURE ? MESSAGES_MAX_TEMPERATURE : t)))
			goto nomem;
	}
	if (json_is_number(top_p) && !set(out, "top_p", json_copy((json_t *)top_p)))
		goto nomem;
	return true;
nomem:
	NOMEM(err);
	return false;
}

static json_t *msg_request_from_chat(const json_t *chat, const struct config_instance *in,
                                     const char *model, struct proto_error *err)
{
	const json_t *msgs = json_object_get(chat, "messages");
	const json_t *user = json_object_get(chat, "user");
	json_t *out = json_object(), *system = json_array(), *messages = json_array();
	json_int_t max_tokens;
	size_t i;
	const json_t *m;

	if (out == NULL || system == NULL || messages == NULL)
		goto nomem;
	if (!json_is_object(chat) || !json_is_array(msgs)) {
		BAD(err, "messages: must be an array");
		goto fail;
	}
	json_array_foreach(msgs, i, m)
	{
		const char *role = str(m, "role");
		json_t *blocks;

		if (is(role, "system") || is(role, "developer")) {
			/* Messages has one system prompt: every system or developer message
			 * joins it, in order, wherever it stood. */
			if (!content_blocks(json_object_get(m, "content"), false, i, system, err))
				goto fail;
			continue;
		}
		blocks = message_blocks(m, i, &role, err);
		if (blocks == NULL)
			goto fail;
		if (!append_message(messages, role, blocks))
			goto nomem;
	}
	if (model != NULL && !set(out, "model", json_string(model)))
		goto nomem;
	if (!max_tokens_of(chat, in, &max_tokens, err))
		goto fail;
	if (!set(out, "max_tokens", json_integer(max_tokens)))
		goto nomem;
	if (json_array_size(system) > 0 && !set(out, "system", json_incref(system)))
		goto nomem;
	if (!set(out, "messages", json_incref(messages)))
		goto nomem;
	if (!sampling_to_messages(chat, out, err) || !tools_to_messages(chat, out, err))
		goto fail;
	if (json_is_string(user) && !set(out, "metadata", json_pack("{s:O}", "user_id", user)))
		goto nomem;
	if (json_is_true(json_object_get(chat, "stream")) && !set(out, "stream", json_true()))
		goto nomem;
	if (in != NULL && json_is_object(in->options)) {
		const char *k;
		json_t *v;
		json_object_foreach(in->options, k, v)
		{
			/* max_tokens in options is a default (max_tokens_of), not an override */
			if (strcmp(k, "max_tokens") != 0 && !set(out, k, json_incref(v)))
				goto nomem;
		}
	}
	json_decref(system);
	json_decref(messages);
	return out;
nomem:
	NOMEM(err);
fail:
	json_decref(out);
	json_decref(system);
	json_decref(messages);
	return NULL;
}

/* ================================================================== Messages answer → pivot */

static json_t *chat_usage(uint64_t input, uint64_t cache_read, uint64_t cache_creation,
                          uint64_t output)
{
	uint64_t prompt = input + cache_read + cache_creation;

	return json_pack("{s:I,s:I,s:I,s:{s:I}}", "prompt_tokens", (json_int_t)prompt,
	                 "completion_tokens", (json_int_t)output, "total_tokens",
	                 (json_int_t)(prompt + output), "prompt_tokens_details", "cached_tokens",
	                 (json_int_t)cache_read);
}

static uint64_t count(const json_t *o, const char *k)
{
	const json_t *v = json_object_get(o, k);
	json_int_t i = json_is_integer(v) ? json_integer_value(v) : 0;

	return i <= 0 ? 0 : (uint64_t)i > PROTO_USAGE_MAX ? PROTO_USAGE_MAX : (uint64_t)i;
}

static json_t *usage_of_messages(const json_t *u)
{
	return chat_usage(count(u, "input_tokens"), count(u, "cache_read_input_tokens"),
	                  count(u, "cache_creation_input_tokens"), count(u, "output_tokens"));
}

static json_t *msg_response_to_chat(const json_t *body, const struct proto_reply_ctx *ctx)
{
	const json_t *content = json_object_get(body, "content");
	struct evbuffer *text = evbuffer_new(), *thinking = evbuffer_new();
	json_t *calls = json_array(), *message = NULL, *out = NULL;
	size_t i;
	const json_t *b;

	if (text == NULL || thinking == NULL || calls == NULL)
		goto fail;
	if (!is(str(body, "type"), "message") || !json_is_array(content))
		goto fail;
	json_array_foreach(content, i, b)
	{
		const char *type = str(b, "type");

		if (is(type, "text")) {
			if (!json_is_string(json_object_get(b, "text")) ||
			    !add_text(text, json_object_get(b, "text"), NULL))
				goto fail;
		} else if (is(type, "thinking")) {
			if (json_is_string(json_object_get(b, "thinking")) &&
			    !add_text(thinking, json_object_get(b, "thinking"), NULL))
				goto fail;
		} else if (is(type, "tool_use")) {
			const json_t *id = json_object_get(b, "id");
			const json_t *name = json_object_get(b, "name");
			const json_t *input = json_object_get(b, "input");
			char *args;

			if (!json_is_string(id) || !json_is_string(name) || !json_is_object(input))
				goto fail;
			args = json_dumps(input, JSON_COMPACT);
			if (args == NULL ||
			    !push(calls,
			          json_pack("{s:O,s:s,s:{s:O,s:s}}", "id", id, "type", "function",
			                    "function", "name", name, "arguments", args))) {
				free(args);
				goto fail;
			}
			free(args);
		}
		/* redacted_thinking, server tool blocks: nothing the pivot can carry */
	}
	message = json_pack("{s:s}", "role", "assistant");
	if (message == NULL)
		goto fail;
	if (!set(message, "content",
	         json_array_size(calls) > 0 && evbuffer_get_length(text) == 0 ? json_null()
	                                                                      : take_string(text)))
		goto fail;
	if (json_array_size(calls) > 0 && !set(message, "tool_calls", json_incref(calls)))
		goto fail;
	if (evbuffer_get_length(thinking) > 0 &&
	    !set(message, "reasoning_content", take_string(thinking)))
		goto fail;
	out = json_pack("{s:O?,s:s,s:I,s:O?,s:[{s:i,s:O,s:s}],s:o}", "id",
	                json_object_get(body, "id"), "object", "chat.completion", "created",
	                (json_int_t)now_or(ctx), "model", json_object_get(body, "model"), "choices",
	                "index", 0, "message", message, "finish_reason",
	                finish_of_stop(str(body, "stop_reason")), "usage",
	                usage_of_messages(json_object_get(body, "usage")));
fail:
	json_decref(message);
	json_decref(calls);
	if (text)
		evbuffer_free(text);
	if (thinking)
		evbuffer_free(thinking);
	return out;
}

/* ================================================================== Messages request → pivot */

/* An Anthropic image block → an image_url part (base64 sources as data: URLs). */
static json_t *image_part(const json_t *b, size_t mi, struct proto_error *err)
{
	const json_t *src = json_object_get(b, "source");
	const char *type = str(src, "type");
	json_t *url = NULL, *part;

	if (is(type, "url") && json_is_string(json_object_get(src, "url"))) {
		url = json_incref(json_object_get(src, "url"));
	} else if (is(type, "base64") && json_is_string(json_object_get(src, "media_type")) &&
	           json_is_string(json_object_get(src, "data"))) {
		struct evbuffer *u = evbuffer_new();
		if (u != NULL && evbuffer_add(u, "data:", 5) == 0 &&
		    add_text(u, json_object_get(src, "media_type"), NULL) &&
		    evbuffer_add(u, ";base64,", 8) == 0 &&
		    add_text(u, json_object_get(src, "data"), NULL))
			url = take_string(u);
		if (u != NULL)
			evbuffer_free(u);
	} else {
		BAD(err, "messages[%zu]: an image source must be base64 (media_type, data) or url",
		    mi);
		return NULL;
	}
	part = json_pack("{s:s,s:{s:o}}", "type", "image_url", "image_url", "url", url);
	if (part == NULL)
		NOMEM(err);
	return part;
}

/* A tool_result block → a tool message appended to msgs (its text joined by newlines);
 * its images go to parts, for the user message that follows (chat tool messages carry
 * text only). */
static bool tool_result_to_chat(const json_t *b, size_t mi, size_t bi, json_t *msgs, json_t *parts,
                                bool *images, struct proto_error *err)
{
	const json_t *id = json_object_get(b, "tool_use_id");
	const json_t *c = json_object_get(b, "content");
	struct evbuffer *t;
	json_t *tm;
	size_t j;
	const json_t *inner;
	bool ok = false;

	if (!json_is_string(id)) {
		BAD(err, "messages[%zu].content[%zu].tool_use_id: must be a string", mi, bi);
		return false;
	}
	if (c != NULL && !json_is_null(c) && !json_is_string(c) && !json_is_array(c)) {
		BAD(err, "messages[%zu].content[%zu].content: must be a string or blocks", mi, bi);
		return false;
	}
	t = evbuffer_new();
	if (t == NULL)
		goto nomem;
	if (json_is_string(c) && !add_text(t, c, NULL))
		goto nomem;
	json_array_foreach(c, j, inner)
	{
		const char *type = str(inner, "type");
		json_t *ip;

		if (is(type, "text") && json_is_string(json_object_get(inner, "text"))) {
			if (!add_text(t, json_object_get(inner, "text"), "\n"))
				goto nomem;
		} else if (is(type, "image")) {
			ip = image_part(inner, mi, err);
			if (ip == NULL)
				goto done;
			if (!push(parts, ip))
				goto nomem;
			*images = true;
		} else {
			UNSUPPORTED(
			        err,
			        "messages[%zu].content[%zu]: tool results may hold text and images "
			        "only on this instance (OpenAI chat)",
			        mi, bi);
			goto done;
		}
	}
	tm = json_pack("{s:s,s:O,s:o}", "role", "tool", "tool_call_id", id, "content",
	               take_string(t));
	ok = tm != NULL && push(msgs, tm);
	if (ok)
		goto done;
nomem:
	NOMEM(err);
done:
	if (t)
		evbuffer_free(t);
	return ok;
}

/* The user message of parts: one string when they are all texts (joined by a newline,
 * which every chat server takes), the array of parts otherwise. */
static bool user_message(json_t *parts, bool images, json_t *msgs)
{
	struct evbuffer *t;
	size_t i;
	const json_t *p;
	bool ok = true;

	if (json_array_size(parts) == 0)
		return true;
	if (images)
		return push(msgs, json_pack("{s:s,s:O}", "role", "user", "content", parts));
	t = evbuffer_new();
	if (t == NULL)
		return false;
	json_array_foreach(parts, i, p)
	{
		ok = ok && add_text(t, json_object_get(p, "text"), "\n");
	}
	ok = ok && push(msgs, json_pack("{s:s,s:o}", "role", "user", "content", take_string(t)));
	evbuffer_free(t);
	return ok;
}

/* User blocks → tool messages (one per tool_result, first: they answer the assistant's
 * calls), then one user message with the rest. */
static bool user_blocks_to_chat(const json_t *blocks, size_t mi, json_t *msgs,
                                struct proto_error *err)
{
	json_t *parts = json_array();
	bool images = false, ok = false;
	size_t i;
	const json_t *b;

	if (parts == NULL)
		goto nomem;
	json_array_foreach(blocks, i, b)
	{
		const char *type = str(b, "type");
		const json_t *src = json_object_get(b, "source");
		json_t *p;

		if (is(type, "tool_result")) {
			if (!tool_result_to_chat(b, mi, i, msgs, parts, &images, err))
				goto done;
			continue;
		}
		if (is(type, "text") && json_is_string(json_object_get(b, "text"))) {
			p = json_pack("{s:s,s:O}", "type", "text", "text",
			              json_object_get(b, "text"));
		} else if (is(type, "image")) {
			p = image_part(b, mi, err);
			if (p == NULL)
				goto done;
			images = true;
		} else if (is(type, "document") && is(str(src, "type"), "text") &&
		           json_is_string(json_object_get(src, "data"))) {
			p = json_pack("{s:s,s:O}", "type", "text", "text",
			              json_object_get(src, "data"));
		} else if (is(type, "text")) {
			BAD(err, "messages[%zu].content[%zu].text: must be a string", mi, i);
			goto done;
		} else {
			UNSUPPORTED(err,
			            "messages[%zu].content[%zu]: blocks of type \"%s\" cannot be "
			            "sent to "
			            "this instance (OpenAI chat)",
			            mi, i, type ? type : "(none)");
			goto done;
		}
		if (p == NULL || !push(parts, p))
			goto nomem;
	}
	ok = user_message(parts, images, msgs);
	if (ok)
		goto done;
nomem:
	NOMEM(err);
done:
	json_decref(parts);
	return ok;
}

static bool assistant_blocks_to_chat(const json_t *blocks, size_t mi, json_t *msgs,
                                     struct proto_error *err)
{
	struct evbuffer *t = evbuffer_new();
	json_t *calls = json_array(), *m = NULL;
	bool ok = false;
	size_t i;
	const json_t *b;

	if (t == NULL || calls == NULL)
		goto nomem;
	json_array_foreach(blocks, i, b)
	{
		const char *type = str(b, "type");

		if (is(type, "text") && json_is_string(json_object_get(b, "text"))) {
			add_text(t, json_object_get(b, "text"), NULL);
		} else if (is(type, "tool_use")) {
			const json_t *id = json_object_get(b, "id");
			const json_t *name = json_object_get(b, "name");
			const json_t *input = json_object_get(b, "input");
			char *args;

			if (!json_is_string(id) || !json_is_string(name) ||
			    !json_is_object(input)) {
				BAD(err,
				    "messages[%zu].content[%zu]: tool_use needs id, name and an "
				    "input object",
				    mi, i);
				goto done;
			}
			args = json_dumps(input, JSON_COMPACT);
			if (args == NULL ||
			    !push(calls,
			          json_pack("{s:O,s:s,s:{s:O,s:s}}", "id", id, "type", "function",
			                    "function", "name", name, "arguments", args))) {
				free(args);
				goto nomem;
			}
			free(args);
		} else if (is(type, "thinking") || is(type, "redacted_thinking")) {
			continue; /* chat servers take no signed thinking back */
		} else {
			UNSUPPORTED(err,
			            "messages[%zu].content[%zu]: blocks of type \"%s\" cannot be "
			            "sent to "
			            "this instance (OpenAI chat)",
			            mi, i, type ? type : "(none)");
			goto done;
		}
	}
	m = json_pack("{s:s}", "role", "assistant");
	if (m == NULL ||
	    !set(m, "content",
	         json_array_size(calls) > 0 && evbuffer_get_length(t) == 0 ? json_null()
	                                                                   : take_string(t)) ||
	    (json_array_size(calls) > 0 && !set(m, "tool_calls", json_incref(calls))))
		goto nomem;
	ok = push(msgs, json_incref(m));
	if (!ok)
		goto nomem;
	goto done;
nomem:
	NOMEM(err);
done:
	json_decref(m);
	json_decref(calls);
	if (t)
		evbuffer_free(t);
	return ok;
}

static bool system_to_chat(const json_t *system, json_t *msgs, struct proto_error *err)
{
	struct evbuffer *t;
	size_t i;
	const json_t *b;
	bool ok;

	if (system == NULL || json_is_null(system))
		return true;
	if (json_is_string(system)) {
		if (json_string_length(system) == 0)
			return true;
		ok = push(msgs, json_pack("{s:s,s:O}", "role", "system", "content", system));
		if (!ok)
			NOMEM(err);
		return ok;
	}
	if (!json_is_array(system)) {
		BAD(err, "system: must be a string or an array of text blocks");
		return false;
	}
	t = evbuffer_new();
	if (t == NULL) {
		NOMEM(err);
		return false;
	}
	json_array_foreach(system, i, b)
	{
		if (!is(str(b, "type"), "text") || !json_is_string(json_object_get(b, "text"))) {
			evbuffer_free(t);
			BAD(err, "system[%zu]: must be a text block", i);
			return false;
		}
		add_text(t, json_object_get(b, "text"), "\n\n");
	}
	ok = evbuffer_get_length(t) == 0 ||
	     push(msgs, json_pack("{s:s,s:o}", "role", "system", "content", take_string(t)));
	evbuffer_free(t);
	if (!ok)
		NOMEM(err);
	return ok;
}

static bool tools_to_chat(const json_t *body, json_t *out, struct proto_error *err)
{
	const json_t *tools = json_object_get(body, "tools");
	const json_t *choice = json_object_get(body, "tool_choice");
	json_t *list;
	size_t i;
	const json_t *t;

	if (tools != NULL && !json_is_null(tools)) {
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
			const json_t *name = json_object_get(t, "name");
			const json_t *desc = json_object_get(t, "description");
			const json_t *schema = json_object_get(t, "input_schema");
			json_t *fn;

			if (type != NULL && !is(type, "custom")) {
				UNSUPPORTED(err,
				            "tools[%zu]: the server tool \"%s\" cannot run on this "
				            "instance (OpenAI chat)",
				            i, type);
				return false;
			}
			if (!json_is_string(name)) {
				BAD(err, "tools[%zu].name: must be a string", i);
				return false;
			}
			fn = json_pack("{s:O}", "name", name);
			if (fn == NULL ||
			    !push(list, json_pack("{s:s,s:o}", "type", "function", "function", fn)))
				goto nomem;
			if (json_is_string(desc) &&
			    !set(fn, "description", json_copy((json_t *)desc)))
				goto nomem;
			if (json_is_object(schema) &&
			    !set(fn, "parameters", json_copy((json_t *)schema)))
				goto nomem;
		}
	}
	if (choice != NULL && !json_is_null(choice)) {
		const char *type = str(choice, "type");
		json_t *c;

		if (is(type, "auto"))
			c = json_string("auto");
		else if (is(type, "any"))
			c = json_string("required");
		else if (is(type, "none"))
			c = json_string("none");
		else if (is(type, "tool") && json_is_string(json_object_get(choice, "name")))
			c = json_pack("{s:s,s:{s:O}}", "type", "function", "function", "name",
			              json_object_get(choice, "name"));
		else {
			BAD(err, "tool_choice: must be auto, any, none or {type: tool, name}");
			return false;
		}
		if (!set(out, "tool_choice", c))
			goto nomem;
		if (json_is_true(json_object_get(choice, "disable_parallel_tool_use")) &&
		    !set(out, "parallel_tool_calls", json_false()))
			goto nomem;
	}
	return true;
nomem:
	NOMEM(err);
	return false;
}

/* Keys that need state or machinery an OpenAI-compatible server does not have. */
static const char *const refused_keys[] = {"mcp_servers", "container"};

static json_t *msg_request_to_chat(const json_t *body, struct proto_error *err)
{
	const json_t *msgs = json_object_get(body, "messages");
	const json_t *max_tokens = json_object_get(body, "max_tokens");
	const json_t *stop = json_object_get(body, "stop_sequences");
	const json_t *user = json_object_get(json_object_get(body, "metadata"), "user_id");
	json_t *out = NULL, *chat_msgs = NULL;
	size_t i;
	const json_t *m;

	if (!json_is_object(body)) {
		BAD(err, "the request body must be a JSON object");
		return NULL;
	}
	/* Anthropic's own answer to a missing max_tokens, so clients see the same 400. */
	if (max_tokens == NULL) {
		BAD(err, "max_tokens: Field required");
		return NULL;
	}
	if (!json_is_integer(max_tokens) || json_integer_value(max_tokens) < 1) {
		BAD(err, "max_tokens: must be a positive integer");
		return NULL;
	}
	if (!json_is_array(msgs)) {
		BAD(err, "messages: Field required (an array)");
		return NULL;
	}
	for (i = 0; i < sizeof(refused_keys) / sizeof(refused_keys[0]); i++) {
		const json_t *v = json_object_get(body, refused_keys[i]);
		if (v != NULL && !json_is_null(v)) {
			UNSUPPORTED(err, "%s: not supported on this instance (OpenAI chat)",
			            refused_keys[i]);
			return NULL;
		}
	}
	out = json_object();
	chat_msgs = json_array();
	if (out == NULL || chat_msgs == NULL || !set(out, "messages", json_incref(chat_msgs)))
		goto nomem;
	if (json_is_string(json_object_get(body, "model")) &&
	    !set(out, "model", json_copy(json_object_get(body, "model"))))
		goto nomem;
	if (!system_to_chat(json_object_get(body, "system"), chat_msgs, err))
		goto fail;
	json_array_foreach(msgs, i, m)
	{
		const char *role = str(m, "role");
		const json_t *content = json_object_get(m, "content");

		if (!is(role, "user") && !is(role, "assistant")) {
			BAD(err, "messages[%zu].role: must be user or assistant", i);
			goto fail;
		}
		if (json_is_string(content)) {
			if (!push(chat_msgs,
			          json_pack("{s:s,s:O}", "role", role, "content", content)))
				goto nomem;
		} else if (!json_is_array(content)) {
			BAD(err, "messages[%zu].content: must be a string or an array of blocks",
			    i);
			goto fail;
		} else if (is(role, "user")
		                   ? !user_blocks_to_chat(content, i, chat_msgs, err)
		                   : !assistant_blocks_to_chat(content, i, chat_msgs, err)) {
			goto fail;
		}
	}
	if (!set(out, "max_tokens", json_copy((json_t *)max_tokens)))
		goto nomem;
	if (json_is_array(stop) && json_array_size(stop) > 0 &&
	    !set(out, "stop", json_copy((json_t *)stop)))
		goto nomem;
	if (json_is_number(json_object_get(body, "temperature")) &&
	    !set(out, "temperature", json_copy(json_object_get(body, "temperature"))))
		goto nomem;
	if (json_is_number(json_object_get(body, "top_p")) &&
	    !set(out, "top_p", json_copy(json_object_get(body, "top_p"))))
		goto nomem;
	if (json_is_string(user) && !set(out, "user", json_copy((json_t *)user)))
		goto nomem;
	if (!tools_to_chat(body, out, err))
		goto fail;
	if (json_is_true(json_object_get(body, "stream")) &&
	    (!set(out, "stream", json_true()) ||
	     !set(out, "stream_options", json_pack("{s:b}", "include_usage", 1))))
		goto nomem;
	json_decref(chat_msgs);
	return out;
nomem:
	NOMEM(err);
fail:
	json_decref(chat_msgs);
	json_decref(out);
	return NULL;
}

/* ================================================================== pivot answer → Messages */

static bool thinking_asked(const struct proto_reply_ctx *ctx)
{
	return ctx != NULL && is(str(json_object_get(ctx->request, "thinking"), "type"), "enabled");
}

static json_t *messages_usage(const json_t *chat)
{
	struct record_usage u = {0};
	uint64_t cached;

	proto_usage_from_chat(chat, &u);
	cached = u.cached <= u.prompt ? u.cached : u.prompt;
	return json_pack("{s:I,s:I,s:I,s:I}", "input_tokens", (json_int_t)(u.prompt - cached),
	                 "cache_creation_input_tokens", (json_int_t)0, "cache_read_input_tokens",
	                 (json_int_t)cached, "output_tokens", (json_int_t)u.completion);
}

static void make_id(char *buf, size_t len, const char *prefix, const struct proto_reply_ctx *ctx)
{
	snprintf(buf, len, "%s%s", prefix, ctx && ctx->request_id ? ctx->request_id : "0");
}

static json_t *msg_response_from_chat(const json_t *chat, const struct proto_reply_ctx *ctx)
{
	const json_t *choice = json_array_get(json_object_get(chat, "choices"), 0);
	const json_t *msg = json_object_get(choice, "message");
	const json_t *content = json_object_get(msg, "content");
	const json_t *reasoning = json_object_get(msg, "reasoning_content");
	const json_t *refusal = json_object_get(msg, "refusal");
	const char *finish = str(choice, "finish_reason");
	json_t *blocks = json_array(), *out = NULL, *model;
	struct proto_error err;
	char id[160];

	if (blocks == NULL || !json_is_object(msg))
		goto done;
	if (thinking_asked(ctx) && json_is_string(reasoning) && json_string_length(reasoning) > 0 &&
	    !push(blocks, json_pack("{s:s,s:O,s:s}", "type", "thinking", "thinking", reasoning,
	                            "signature", "")))
		goto done;
	if (!content_blocks(content, false, 0, blocks, &err))
		goto done;
	if (json_is_string(refusal) && json_string_length(refusal) > 0) {
		if (!push(blocks, text_block(refusal)))
			goto done;
		finish = "content_filter";
	}
	if (!tool_use_blocks(json_object_get(msg, "tool_calls"), 0, blocks, &err))
		goto done; /* arguments that are not a JSON object cannot be a tool_use input */
	make_id(id, sizeof(id), "msg_", ctx);
	model = ctx && ctx->model ? json_string(ctx->model)
	                          : json_incref(json_object_get(chat, "model"));
	out = json_pack("{s:s,s:s,s:s,s:o?,s:O,s:s,s:n,s:o}", "id", id, "type", "message", "role",
	                "assistant", "model", model, "content", blocks, "stop_reason",
	                stop_of_finish(finish), "stop_sequence", "usage", messages_usage(chat));
done:
	json_decref(blocks);
	return out;
}

/* ================================================================== Messages stream → pivot */

enum block_kind { BLOCK_NONE, BLOCK_TEXT, BLOCK_TOOL, BLOCK_THINKING, BLOCK_OTHER };

struct block_slot {
	enum block_kind kind;
	int tool; /* the pivot's tool_calls index of a tool_use block */
};

struct proto_decoder {
	bool started, stopped;
	char id[MESSAGES_NAME_MAX], model[MESSAGES_NAME_MAX];
	long long created;
	uint64_t input, cache_read, cache_creation, output;
	int n_tools;
	struct block_slot *blocks; /* by content block index */
	size_t n_blocks;
};

static struct proto_decoder *msg_decoder_new(const struct proto_reply_ctx *ctx)
{
	struct proto_decoder *d = calloc(1, sizeof(*d));

	if (d != NULL)
		d->created = now_or(ctx);
	return d;
}

static void msg_decoder_free(struct proto_decoder *d)
{
	if (d == NULL)
		return;
	free(d->blocks);
	free(d);
}

/* A chunk with choice 0's delta (stolen) and finish reason, handed to emit. */
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

static bool emit_tool_piece(struct proto_decoder *d, int tool, const json_t *id, const json_t *name,
                            const json_t *args, proto_chunk_fn emit, void *arg)
{
	json_t *tc, *fn;

	if (id == NULL && (!json_is_string(args) || json_string_length(args) == 0))
		return true;
	tc = json_pack("{s:i}", "index", tool);
	fn = json_object();
	if (tc == NULL || fn == NULL || !set(tc, "function", fn)) {
		json_decref(tc);
		return false;
	}
	if (id != NULL &&
	    (!set(tc, "id", json_copy((json_t *)id)) || !set(tc, "type", json_string("function")) ||
	     !set(fn, "name", json_copy((json_t *)name))))
		goto fail;
	if (!set(fn, "arguments", args ? json_copy((json_t *)args) : json_string("")))
		goto fail;
	return emit_chunk(d, json_pack("{s:[o]}", "tool_calls", tc), NULL, emit, arg);
fail:
	json_decref(tc);
	return false;
}

static bool block_start(struct proto_decoder *d, const json_t *data, proto_chunk_fn emit, void *arg,
                        struct proto_error *err)
{
	const json_t *idx = json_object_get(data, "index");
	const json_t *cb = json_object_get(data, "content_block");
	const char *type = str(cb, "type");
	json_int_t i = json_is_integer(idx) ? json_integer_value(idx) : -1;
	struct block_slot *slot;

	if (i < 0 || i >= MESSAGES_MAX_BLOCKS || type == NULL) {
		proto_error_set(err, 0, "upstream_error", "upstream_error",
		                "content_block_start without a valid index and content_block");
		return false;
	}
	if ((size_t)i >= d->n_blocks) {
		struct block_slot *nb = realloc(d->blocks, ((size_t)i + 1) * sizeof(*nb));
		if (nb == NULL) {
			NOMEM(err);
			return false;
		}
		memset(nb + d->n_blocks, 0, ((size_t)i + 1 - d->n_blocks) * sizeof(*nb));
		d->blocks = nb;
		d->n_blocks = (size_t)i + 1;
	}
	slot = &d->blocks[i];
	if (strcmp(type, "text") == 0) {
		slot->kind = BLOCK_TEXT;
		return emit_text(d, "content", json_object_get(cb, "text"), emit, arg);
	}
	if (strcmp(type, "thinking") == 0) {
		slot->kind = BLOCK_THINKING;
		return emit_text(d, "reasoning_content", json_object_get(cb, "thinking"), emit,
		                 arg);
	}
	if (strcmp(type, "tool_use") == 0) {
		const json_t *id = json_object_get(cb, "id");
		const json_t *name = json_object_get(cb, "name");
		if (!json_is_string(id) || !json_is_string(name)) {
			proto_error_set(err, 0, "upstream_error", "upstream_error",
			                "a tool_use block without id or name");
			return false;
		}
		slot->kind = BLOCK_TOOL;
		slot->tool = d->n_tools++;
		return emit_tool_piece(d, slot->tool, id, name, NULL, emit, arg);
	}
	slot->kind = BLOCK_OTHER; /* redacted_thinking, server tools: nothing to carry */
	return true;
}

static bool block_delta(struct proto_decoder *d, const json_t *data, proto_chunk_fn emit, void *arg,
                        struct proto_error *err)
{
	const json_t *idx = json_object_get(data, "index");
	const json_t *delta = json_object_get(data, "delta");
	const char *type = str(delta, "type");
	json_int_t i = json_is_integer(idx) ? json_integer_value(idx) : -1;
	const struct block_slot *slot;

	if (i < 0 || (size_t)i >= d->n_blocks || d->blocks[i].kind == BLOCK_NONE || type == NULL) {
		proto_error_set(err, 0, "upstream_error", "upstream_error",
		                "content_block_delta for a block that was not started");
		return false;
	}
	slot = &d->blocks[i];
	if (strcmp(type, "text_delta") == 0)
		return emit_text(d, "content", json_object_get(delta, "text"), emit, arg);
	if (strcmp(type, "thinking_delta") == 0)
		return emit_text(d, "reasoning_content", json_object_get(delta, "thinking"), emit,
		                 arg);
	if (strcmp(type, "input_json_delta") == 0) {
		if (slot->kind != BLOCK_TOOL) {
			proto_error_set(err, 0, "upstream_error", "upstream_error",
			                "input_json_delta outside a tool_use block");
			return false;
		}
		return emit_tool_piece(d, slot->tool, NULL, NULL,
		                       json_object_get(delta, "partial_json"), emit, arg);
	}
	return true; /* signature_delta, citations_delta */
}

static void take_usage(struct proto_decoder *d, const json_t *u)
{
	if (!json_is_object(u))
		return;
	/* message_delta's counts are cumulative: a present count replaces the earlier one. */
	if (json_object_get(u, "input_tokens") != NULL)
		d->input = count(u, "input_tokens");
	if (json_object_get(u, "cache_read_input_tokens") != NULL)
		d->cache_read = count(u, "cache_read_input_tokens");
	if (json_object_get(u, "cache_creation_input_tokens") != NULL)
		d->cache_creation = count(u, "cache_creation_input_tokens");
	if (json_object_get(u, "output_tokens") != NULL)
		d->output = count(u, "output_tokens");
}

static bool msg_decode(struct proto_decoder *d, const struct sse_event *ev, proto_chunk_fn emit,
                       void *arg, struct proto_error *err)
{
	const char *name = ev->event;
	json_t *data;
	bool ok = true;

	if (!ev->has_data || strcmp(name, "ping") == 0)
		return true;
	data = json_loadb(ev->data, ev->data_len, 0, NULL);
	if (!json_is_object(data)) {
		json_decref(data);
		proto_error_set(err, 0, "upstream_error", "upstream_error",
		                "the upstream sent an event that is not a JSON object");
		return false;
	}
	if (name[0] == '\0' && json_is_string(json_object_get(data, "type")))
		name = str(data, "type");
	if (strcmp(name, "error") == 0) {
		if (!error_from_object(json_object_get(data, "error"), 0, err))
			proto_error_set(err, 502, "server_error", "upstream_error",
			                "the upstream reported an error");
		ok = false;
	} else if (strcmp(name, "message_start") == 0) {
		const json_t *msg = json_object_get(data, "message");
		if (d->started || !json_is_object(msg)) {
			proto_error_set(err, 0, "upstream_error", "upstream_error",
			                "message_start out of order");
			ok = false;
			goto done;
		}
		d->started = true;
		keep_name(d->id, json_object_get(msg, "id"));
		keep_name(d->model, json_object_get(msg, "model"));
		take_usage(d, json_object_get(msg, "usage"));
		ok = emit_chunk(d, json_pack("{s:s,s:s}", "role", "assistant", "content", ""), NULL,
		                emit, arg);
	} else if (strncmp(name, "content_block_", 14) == 0 || strcmp(name, "message_delta") == 0 ||
	           strcmp(name, "message_stop") == 0) {
		if (!d->started || d->stopped) {
			proto_error_set(err, 0, "upstream_error", "upstream_error",
			                "%s outside a message", name);
			ok = false;
		} else if (strcmp(name, "content_block_start") == 0) {
			ok = block_start(d, data, emit, arg, err);
		} else if (strcmp(name, "content_block_delta") == 0) {
			ok = block_delta(d, data, emit, arg, err);
		} else if (strcmp(name, "message_delta") == 0) {
			const char *stop = str(json_object_get(data, "delta"), "stop_reason");
			take_usage(d, json_object_get(data, "usage"));
			if (stop != NULL)
				ok = emit_chunk(d, json_object(), finish_of_stop(stop), emit, arg);
		} else if (strcmp(name, "message_stop") == 0) {
			json_t *c;
			d->stopped = true;
			c = json_pack(
			        "{s:s,s:s,s:I,s:s,s:[],s:o}", "id", d->id, "object",
			        "chat.completion.chunk", "created", (json_int_t)d->created, "model",
			        d->model, "choices", "usage",
			        chat_usage(d->input, d->cache_read, d->cache_creation, d->output));
			ok = c != NULL && emit(arg, c);
			json_decref(c);
		}
		/* content_block_stop: nothing to say in the pivot */
	}
	/* Unknown event types are skipped: the API may add new ones (its versioning policy). */
done:
	json_decref(data);
	return ok;
}

/* ================================================================== pivot stream → Messages */

struct proto_encoder {
	const struct proto_reply_ctx *ctx; /* borrowed */
	bool started, pinged, thinking;
	enum block_kind open; /* the open block, BLOCK_NONE when none */
	int open_index;       /* its index */
	int open_tool;        /* the pivot tool index of an open tool_use block */
	json_t *open_id;      /* and its id (a reference) */
	int next_index;
	const char *stop_reason; /* static; NULL until a finish_reason arrives */
	struct record_usage usage;
	bool has_usage;
};

static struct proto_encoder *msg_encoder_new(const struct proto_reply_ctx *ctx)
{
	struct proto_encoder *e = calloc(1, sizeof(*e));

	if (e == NULL)
		return NULL;
	e->ctx = ctx;
	e->thinking = thinking_asked(ctx);
	return e;
}

static void msg_encoder_free(struct proto_encoder *e)
{
	if (e == NULL)
		return;
	json_decref(e->open_id);
	free(e);
}

/* data is stolen. */
static bool put(struct evbuffer *out, const char *name, json_t *data)
{
	bool ok = data != NULL && proto_sse_append(out, name, data);

	json_decref(data);
	return ok;
}

static bool enc_start(struct proto_encoder *e, const json_t *chunk, struct evbuffer *out)
{
	char id[160];
	json_t *model;

	if (e->started)
		return true;
	e->started = true;
	make_id(id, sizeof(id), "msg_", e->ctx);
	model = e->ctx && e->ctx->model ? json_string(e->ctx->model)
	                                : json_incref(json_object_get(chunk, "model"));
	return put(out, "message_start",
	           json_pack("{s:s,s:{s:s,s:s,s:s,s:o?,s:[],s:n,s:n,s:{s:i,s:i}}}", "type",
	                     "message_start", "message", "id", id, "type", "message", "role",
	                     "assistant", "model", model, "content", "stop_reason", "stop_sequence",
	                     "usage", "input_tokens", 0, "output_tokens", 0));
}

static bool enc_close(struct proto_encoder *e, struct evbuffer *out)
{
	if (e->open == BLOCK_NONE)
		return true;
	e->open = BLOCK_NONE;
	return put(out, "content_block_stop",
	           json_pack("{s:s,s:i}", "type", "content_block_stop", "index", e->open_index));
}

/* block is stolen. The real API sends one ping after the first block starts. */
static bool enc_open(struct proto_encoder *e, enum block_kind kind, json_t *block,
                     struct evbuffer *out)
{
	if (!enc_close(e, out)) {
		json_decref(block);
		return false;
	}
	e->open = kind;
	e->open_index = e->next_index++;
	if (!put(out, "content_block_start",
	         json_pack("{s:s,s:i,s:o}", "type", "content_block_start", "index", e->open_index,
	                   "content_block", block)))
		return false;
	if (!e->pinged) {
		e->pinged = true;
		return put(out, "ping", json_pack("{s:s}", "type", "ping"));
	}
	return true;
}

static bool enc_delta(struct proto_encoder *e, json_t *delta, struct evbuffer *out)
{
	return put(out, "content_block_delta",
	           json_pack("{s:s,s:i,s:o}", "type", "content_block_delta", "index", e->open_index,
	                     "delta", delta));
}

static bool enc_tool_calls(struct proto_encoder *e, const json_t *calls, struct evbuffer *out)
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

		if (t < 0 || t > MESSAGES_MAX_BLOCKS)
			return false;
		/* A call starts with its id and name. Pieces carry its index, some servers
		 * repeat the id on every piece, and some (Gemini) give every call index 0:
		 * a new id is a new call. A piece of a call whose block is already closed
		 * (interleaved calls) cannot be expressed in Messages. */
		if (e->open != BLOCK_TOOL || e->open_tool != (int)t ||
		    (json_is_string(id) && !json_equal(id, e->open_id))) {
			if (!json_is_string(id) || !json_is_string(name))
				return false;
			if (!enc_open(e, BLOCK_TOOL,
			              json_pack("{s:s,s:O,s:O,s:{}}", "type", "tool_use", "id", id,
			                        "name", name, "input"),
			              out))
				return false;
			e->open_tool = (int)t;
			json_decref(e->open_id);
			e->open_id = json_incref((json_t *)id);
		}
		if (json_is_string(args) && json_string_length(args) > 0 &&
		    !enc_delta(e,
		               json_pack("{s:s,s:O}", "type", "input_json_delta", "partial_json",
		                         args),
		               out))
			return false;
	}
	return true;
}

static bool msg_encode(struct proto_encoder *e, const json_t *chunk, struct evbuffer *out)
{
	const json_t *choice = json_array_get(json_object_get(chunk, "choices"), 0);
	const json_t *delta = json_object_get(choice, "delta");
	const json_t *reasoning = json_object_get(delta, "reasoning_content");
	const json_t *content = json_object_get(delta, "content");
	const json_t *refusal = json_object_get(delta, "refusal");
	const json_t *calls = json_object_get(delta, "tool_calls");
	const char *finish = str(choice, "finish_reason");
	struct record_usage u;

	if (!json_is_object(chunk))
		return true;
	if (!enc_start(e, chunk, out))
		return false;
	if (proto_usage_from_chat(chunk, &u)) {
		e->usage = u;
		e->has_usage = true;
	}
	if (json_is_integer(json_object_get(choice, "index")) &&
	    json_integer_value(json_object_get(choice, "index")) != 0)
		return true; /* one answer per request in Messages */
	if (e->thinking && json_is_string(reasoning) && json_string_length(reasoning) > 0) {
		if (e->open != BLOCK_THINKING &&
		    !enc_open(e, BLOCK_THINKING,
		              json_pack("{s:s,s:s,s:s}", "type", "thinking", "thinking", "",
		                        "signature", ""),
		              out))
			return false;
		if (!enc_delta(
		            e,
		            json_pack("{s:s,s:O}", "type", "thinking_delta", "thinking", reasoning),
		            out))
			return false;
	}
	if (!json_is_string(content) || json_string_length(content) == 0)
		content = refusal;
	if (json_is_string(content) && json_string_length(content) > 0) {
		if (e->open != BLOCK_TEXT &&
		    !enc_open(e, BLOCK_TEXT, json_pack("{s:s,s:s}", "type", "text", "text", ""),
		              out))
			return false;
		if (!enc_delta(e, json_pack("{s:s,s:O}", "type", "text_delta", "text", content),
		               out))
			return false;
	}
	if (json_is_array(calls) && !enc_tool_calls(e, calls, out))
		return false;
	if (finish != NULL) {
		e->stop_reason = stop_of_finish(finish);
		if (json_is_string(refusal) && json_string_length(refusal) > 0)
			e->stop_reason = "refusal";
		return enc_close(e, out);
	}
	return true;
}

static void msg_stream_end(struct proto_encoder *e, const char *finish_reason, struct evbuffer *out)
{
	const char *stop = finish_reason    ? stop_of_finish(finish_reason)
	                   : e->stop_reason ? e->stop_reason
	                                    : "end_turn";
	uint64_t cached = e->usage.cached <= e->usage.prompt ? e->usage.cached : e->usage.prompt;
	json_t *usage;

	enc_start(e, NULL, out);
	enc_close(e, out);
	/* message_delta carries the whole usage: a chat stream knows its input tokens only
	 * at its end, after message_start went out with zeros. */
	usage = e->has_usage ? json_pack("{s:I,s:I,s:I}", "input_tokens",
	                                 (json_int_t)(e->usage.prompt - cached),
	                                 "cache_read_input_tokens", (json_int_t)cached,
	                                 "output_tokens", (json_int_t)e->usage.completion)
	                     : json_pack("{s:i}", "output_tokens", 0);
	put(out, "message_delta",
	    json_pack("{s:s,s:{s:s,s:n},s:o}", "type", "message_delta", "delta", "stop_reason",
	              stop, "stop_sequence", "usage", usage));
	put(out, "message_stop", json_pack("{s:s}", "type", "message_stop"));
}

/* ================================================================== errors and usage */

static bool msg_error_to_openai(const char *body, size_t len, int status, struct proto_error *err)
{
	json_t *root = body ? json_loadb(body, len, 0, NULL) : NULL;
	bool ok = is(str(root, "type"), "error") &&
	          error_from_object(json_object_get(root, "error"), status, err);

	json_decref(root);
	return ok;
}

/* {"type":"error","error":{"type","message","code"}}: Anthropic's shape, keeping
 * OpenAI's code inside error so that clients of either SDK find what they read. */
static json_t *messages_error(const struct proto_error_out *e)
{
	return json_pack("{s:s,s:{s:s,s:s,s:s?}}", "type", "error", "error", "type",
	                 anthropic_type_for_status(e->status), "message",
	                 e->message ? e->message : "", "code", e->code);
}

static void msg_error_body(const struct proto_error_out *e, struct evbuffer *out)
{
	json_t *o = messages_error(e);

	if (o != NULL)
		proto_json_append(out, o);
	json_decref(o);
}

static void msg_stream_error(struct proto_encoder *enc, const struct proto_error_out *e,
                             struct evbuffer *out)
{
	put(out, "error", messages_error(e));
}

static void msg_stream_usage(const struct sse_event *ev, struct record_usage *u)
{
	bool start = strcmp(ev->event, "message_start") == 0;
	json_t *data, *us;

	if (!ev->has_data || (!start && strcmp(ev->event, "message_delta") != 0))
		return;
	data = json_loadb(ev->data, ev->data_len, 0, NULL);
	us = json_object_get(start ? json_object_get(data, "message") : data, "usage");
	if (json_is_object(us)) {
		if (json_object_get(us, "input_tokens") != NULL) {
			u->prompt = count(us, "input_tokens") +
			            count(us, "cache_read_input_tokens") +
			            count(us, "cache_creation_input_tokens");
			u->cached = count(us, "cache_read_input_tokens");
		}
		if (json_object_get(us, "output_tokens") != NULL)
			u->completion = count(us, "output_tokens");
		u->total = u->prompt + u->completion;
		u->present = true;
		u->estimated = false;
	}
	json_decref(data);
}

const struct proto_codec proto_codec_messages = {
        .proto = PROTO_MESSAGES,
        .name = "messages",
        .request_to_chat = msg_request_to_chat,
        .request_from_chat = msg_request_from_chat,
        .response_to_chat = msg_response_to_chat,
        .response_from_chat = msg_response_from_chat,
        .decoder_new = msg_decoder_new,
        .decode = msg_decode,
        .decoder_free = msg_decoder_free,
        .encoder_new = msg_encoder_new,
        .encode = msg_encode,
        .stream_end = msg_stream_end,
        .encoder_free = msg_encoder_free,
        .error_to_openai = msg_error_to_openai,
        .error_body = msg_error_body,
        .stream_error = msg_stream_error,
        .stream_usage = msg_stream_usage,
};

/* ================================================================== the provider */

/* Anthropic's overload status: fail over like a 503. */
static bool anthropic_is_overload(int status)
{
	return status == 529;
}

static const char *const anthropic_headers[] = {"anthropic-version: 2023-06-01", NULL};

const struct provider_ops provider_anthropic = {
        .id = PROVIDER_ANTHROPIC,
        .name = "anthropic",
        .upstream = PROTO_MESSAGES,
        .default_endpoint = "https://api.anthropic.com/v1/messages",
        .default_count_tokens_endpoint = "https://api.anthropic.com/v1/messages/count_tokens",
        .extra_headers = anthropic_headers,
        .is_overload = anthropic_is_overload,
};
