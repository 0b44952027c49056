/* proto_anthropic.c — the Anthropic Messages API of sluice-mockllm: messages, count_tokens, errors.
 *
 * A stream is the real event sequence, each event with its `event:` line: message_start
 * (input usage, output_tokens 1), content_block_start, ping, content_block_delta per
 * delta (text_delta, or input_json_delta for a tool_use block), content_block_stop,
 * message_delta (stop_reason, output usage), message_stop. */
#include "mockllm.h"

#include <string.h>

static const char *an_status_type(int status)
{
	switch (status) {
	case 400:
		return "invalid_request_error";
	case 401:
		return "authentication_error";
	case 403:
		return "permission_error";
	case 404:
		return "not_found_error";
	case 413:
		return "request_too_large";
	case 429:
		return "rate_limit_error";
	case 529:
		return "overloaded_error";
	default:
		return status >= 500 ? "api_error" : "invalid_request_error";
	}
}

/* {"type":"error","error":{"type","message"}} (Anthropic has no code). */
static void an_error(struct evbuffer *b, int status, const char *type, const char *msg,
                     const char *code)
{
	(void)status;
	(void)code;
	ADD_LIT(b, "{\"type\":\"error\",\"error\":{\"type\":\"");
	evbuffer_add(b, type, strlen(type));
	ADD_LIT(b, "\",\"message\":\"");
	json_escape(b, msg, strlen(msg));
	ADD_LIT(b, "\"}}");
}

static const char *need_version(struct evhttp_request *req)
{
	if (evhttp_find_header(evhttp_request_get_input_headers(req), "anthropic-version") == NULL)
		return "anthropic-version: header is required";
	return NULL;
}

static const char *validate_messages(struct evhttp_request *req, json_t *root)
{
	json_t *mt = json_object_get(root, "max_tokens");
	const char *why = need_version(req);

	if (why)
		return why;
	if (mt == NULL)
		return "max_tokens: Field required";
	if (!json_is_integer(mt) || json_integer_value(mt) < 1)
		return "max_tokens: Input should be an integer greater than or equal to 1";
	if (!json_is_array(json_object_get(root, "messages")))
		return "messages: Field required";
	return NULL;
}

static const char *validate_count(struct evhttp_request *req, json_t *root)
{
	const char *why = need_version(req);

	if (why)
		return why;
	if (!json_is_array(json_object_get(root, "messages")))
		return "messages: Field required";
	return NULL;
}

static const char *stop_reason(const struct gen *g)
{
	switch (g->finish) {
	case FIN_LENGTH:
		return "max_tokens";
	case FIN_STOP_SEQ:
		return "stop_sequence";
	case FIN_TOOL:
		return "tool_use";
	default:
		return "end_turn";
	}
}

static void add_stop_sequence(struct evbuffer *b, const struct gen *g)
{
	ADD_LIT(b, ",\"stop_sequence\":");
	if (g->stop_seq) {
		ADD_LIT(b, "\"");
		json_escape(b, g->stop_seq, g->stop_seq_len);
		ADD_LIT(b, "\"");
	} else {
		ADD_LIT(b, "null");
	}
}

static void tool_block(struct evbuffer *b, const struct gen *g, int t, int with_input)
{
	const struct tool_call *tc = &g->tools[t];

	evbuffer_add_printf(b, "{\"type\":\"tool_use\",\"id\":\"toolu_%llu_%d\",\"name\":\"",
	                    (unsigned long long)g->id, t);
	json_escape(b, tc->name, tc->name_len);
	ADD_LIT(b, "\",\"input\":");
	if (with_input && tc->args_json)
		evbuffer_add(b, tc->args, tc->args_len);
	else
		ADD_LIT(b, "{}");
	ADD_LIT(b, "}");
}

static void msg_body(struct evbuffer *b, struct gen *g, json_t *root)
{
	int comma = 0;

	(void)root;
	evbuffer_add_printf(b,
	                    "{\"id\":\"msg_%llu\",\"type\":\"message\",\"role\":\"assistant\","
	                    "\"model\":\"",
	                    (unsigned long long)g->id);
	json_escape(b, g->model, g->model_len);
	ADD_LIT(b, "\",\"content\":[");
	if (plan_has_text(g)) {
		ADD_LIT(b, "{\"type\":\"text\",\"text\":\"");
		plan_text(b, g);
		ADD_LIT(b, "\"}");
		comma = 1;
	}
	for (int t = 0; t < g->ntools; t++) {
		if (comma)
			ADD_LIT(b, ",");
		tool_block(b, g, t, 1);
		comma = 1;
	}
	evbuffer_add_printf(b, "],\"stop_reason\":\"%s\"", stop_reason(g));
	add_stop_sequence(b, g);
	if (!g->p.no_usage)
		evbuffer_add_printf(b,
		                    ",\"usage\":{\"input_tokens\":%ld,\"output_tokens\":%ld,"
		                    "\"cache_read_input_tokens\":%ld,"
		                    "\"cache_creation_input_tokens\":%ld}",
		                    g->text_tokens, g->ndeltas, g->p.cache_read,
		                    g->p.cache_creation);
	ADD_LIT(b, "}");
}

static void count_body(struct evbuffer *b, struct gen *g, json_t *root)
{
	(void)root;
	evbuffer_add_printf(b, "{\"input_tokens\":%ld}", g->text_tokens);
}

/* ------------------------------------------------------------------ streams */

static void ev(struct evbuffer *b, const char *name)
{
	evbuffer_add_printf(b, "event: %s\ndata: {\"type\":\"%s\"", name, name);
}

static void ev_end(struct sse *s)
{
	ADD_LIT(s->b, "}\n\n");
	sse_send(s);
}

static void block_open(struct sse *s, struct gen *g, int block)
{
	int has_text = plan_has_text(g);

	ev(s->b, "content_block_start");
	evbuffer_add_printf(s->b, ",\"index\":%d,\"content_block\":", block);
	if (has_text && block == 0)
		ADD_LIT(s->b, "{\"type\":\"text\",\"text\":\"\"}");
	else
		tool_block(s->b, g, block - has_text, 0);
	ev_end(s);
	if (!(has_text && block == 0)) {
		/* The real API opens a tool's input with an empty piece. */
		ev(s->b, "content_block_delta");
		evbuffer_add_printf(s->b,
		                    ",\"index\":%d,\"delta\":{\"type\":\"input_json_delta\","
		                    "\"partial_json\":\"\"}",
		                    block);
		ev_end(s);
	}
	g->open_block = block;
}

static void block_close(struct sse *s, struct gen *g)
{
	if (g->open_block < 0)
		return;
	ev(s->b, "content_block_stop");
	evbuffer_add_printf(s->b, ",\"index\":%d", g->open_block);
	ev_end(s);
	g->open_block = -1;
}

static void msg_start(struct sse *s, struct gen *g)
{
	struct evbuffer *b = s->b;

	ev(b, "message_start");
	evbuffer_add_printf(b,
	                    ",\"message\":{\"id\":\"msg_%llu\",\"type\":\"message\","
	                    "\"role\":\"assistant\",\"model\":\"",
	                    (unsigned long long)g->id);
	json_escape(b, g->model, g->model_len);
	ADD_LIT(b, "\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null");
	if (!g->p.no_usage)
		evbuffer_add_printf(
		        b,
		        ",\"usage\":{\"input_tokens\":%ld,\"cache_creation_input_tokens\":%ld,"
		        "\"cache_read_input_tokens\":%ld,\"output_tokens\":1}",
		        g->text_tokens, g->p.cache_creation, g->p.cache_read);
	ADD_LIT(b, "}");
	ev_end(s);
	block_open(s, g, 0);
	ADD_LIT(b, "event: ping\ndata: {\"type\": \"ping\"}\n\n");
	sse_send(s);
}

static void msg_delta(struct sse *s, struct gen *g, long i)
{
	int block = plan_block_of(g, i);

	if (block != g->open_block) {
		block_close(s, g);
		block_open(s, g, block);
	}
	ev(s->b, "content_block_delta");
	evbuffer_add_printf(s->b, ",\"index\":%d,\"delta\":", block);
	if (i < g->ntok) {
		ADD_LIT(s->b, "{\"type\":\"text_delta\",\"text\":\"");
		plan_piece(s->b, g, i);
	} else {
		int t, k;

		plan_tool_of(g, i, &t, &k);
		ADD_LIT(s->b, "{\"type\":\"input_json_delta\",\"partial_json\":\"");
		plan_args(s->b, &g->tools[t], k);
	}
	ADD_LIT(s->b, "\"}");
	ev_end(s);
}

static void msg_finish(struct sse *s, struct gen *g)
{
	block_close(s, g);
	ev(s->b, "message_delta");
	evbuffer_add_printf(s->b, ",\"delta\":{\"stop_reason\":\"%s\"", stop_reason(g));
	add_stop_sequence(s->b, g);
	ADD_LIT(s->b, "}");
	if (!g->p.no_usage)
		evbuffer_add_printf(s->b, ",\"usage\":{\"output_tokens\":%ld}", g->ndeltas);
	ev_end(s);
	ev(s->b, "message_stop");
	ev_end(s);
}

static void msg_fail(struct sse *s, struct gen *g)
{
	(void)g;
	ADD_LIT(s->b,
	        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\","
	        "\"message\":\"Overloaded\"}}\n\n");
	sse_send(s);
}

const struct proto proto_messages = {
        .stream_ctype = "text/event-stream; charset=utf-8",
        .validate = validate_messages,
        .error = an_error,
        .status_type = an_status_type,
        .body = msg_body,
        .start = msg_start,
        .delta = msg_delta,
        .finish = msg_finish,
        .fail = msg_fail,
};

const struct proto proto_count_tokens = {
        .validate = validate_count,
        .error = an_error,
        .status_type = an_status_type,
        .body = count_body,
};
