/* proto_openai.c — sluice-mockllm's OpenAI formats: chat, completions, embeddings, Responses.
 *
 * Chat and completions stream `data: <json>` chunks ending in `data: [DONE]`. Every chunk
 * starts with the same id/object/created/model prefix, built once per reply (oa_prefix).
 * The Responses API streams typed events (`event: response.…`) with a sequence_number; its
 * final event carries the whole Response object, as the non-stream reply does. */
#include "mockllm.h"

#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------------ shared */

void sse_send(struct sse *s)
{
	evhttp_send_reply_chunk(s->req, s->b);
}

/* {"error":{"message","type","param":null,"code"}}; code NULL gives "code": null. */
static void oa_error(struct evbuffer *b, int status, const char *type, const char *msg,
                     const char *code)
{
	(void)status;
	ADD_LIT(b, "{\"error\":{\"message\":\"");
	json_escape(b, msg, strlen(msg));
	ADD_LIT(b, "\",\"type\":\"");
	evbuffer_add(b, type, strlen(type));
	ADD_LIT(b, "\",\"param\":null,\"code\":");
	if (code) {
		ADD_LIT(b, "\"");
		json_escape(b, code, strlen(code));
		ADD_LIT(b, "\"}}");
	} else {
		ADD_LIT(b, "null}}");
	}
}

static const char *oa_status_type(int status)
{
	return status == 429 ? "rate_limit_error" : "mock_error";
}

static const char *finish_reason(const struct gen *g)
{
	switch (g->finish) {
	case FIN_LENGTH:
		return "length";
	case FIN_TOOL:
		return "tool_calls";
	default:
		return "stop";
	}
}

static void oa_usage(struct evbuffer *b, const struct gen *g)
{
	evbuffer_add_printf(b,
	                    "\"usage\":{\"prompt_tokens\":%ld,\"completion_tokens\":%ld,"
	                    "\"total_tokens\":%ld",
	                    g->prompt_tokens, g->ndeltas, g->prompt_tokens + g->ndeltas);
	if (g->p.cache_read > 0)
		evbuffer_add_printf(b, ",\"prompt_tokens_details\":{\"cached_tokens\":%ld}",
		                    g->p.cache_read);
	ADD_LIT(b, "}");
}

static void stream_error_text(char *msg, size_t size, const struct gen *g)
{
	snprintf(msg, size, "mock: stream error after %ld deltas", g->p.stream_error_after);
}

/* ------------------------------------------------------------------ chat and completions */

static void oa_tool_calls(struct evbuffer *b, const struct gen *g)
{
	ADD_LIT(b, ",\"tool_calls\":[");
	for (int t = 0; t < g->ntools; t++) {
		const struct tool_call *tc = &g->tools[t];

		evbuffer_add_printf(b,
		                    "%s{\"id\":\"call_%llu_%d\",\"type\":\"function\","
		                    "\"function\":{\"name\":\"",
		                    t ? "," : "", (unsigned long long)g->id, t);
		json_escape(b, tc->name, tc->name_len);
		ADD_LIT(b, "\",\"arguments\":\"");
		json_escape(b, tc->args, tc->args_len);
		ADD_LIT(b, "\"}}");
	}
	ADD_LIT(b, "]");
}

static void oa_completion_body(struct evbuffer *b, struct gen *g, json_t *root)
{
	int chat = g->kind == K_CHAT;

	(void)root;
	evbuffer_add_printf(b,
	                    "{\"id\":\"%s-%llu\",\"object\":\"%s\",\"created\":%lld,\"model\":\"",
	                    chat ? "chatcmpl" : "cmpl", (unsigned long long)g->id,
	                    chat ? "chat.completion" : "text_completion", g->created);
	json_escape(b, g->model, g->model_len);
	if (chat) {
		ADD_LIT(b, "\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
		           "\"content\":");
		if (plan_has_text(g)) {
			ADD_LIT(b, "\"");
			plan_text(b, g);
			ADD_LIT(b, "\"");
		} else {
			ADD_LIT(b, "null");
		}
		if (g->ntools > 0)
			oa_tool_calls(b, g);
		ADD_LIT(b, "}");
	} else {
		ADD_LIT(b, "\",\"choices\":[{\"index\":0,\"text\":\"");
		plan_text(b, g);
		ADD_LIT(b, "\"");
	}
	evbuffer_add_printf(b, ",\"logprobs\":null,\"finish_reason\":\"%s\"}]", finish_reason(g));
	if (!g->p.no_usage) {
		ADD_LIT(b, ",");
		oa_usage(b, g);
	}
	ADD_LIT(b, "}");
}

static void oa_prefix(struct evbuffer *pb, const struct gen *g)
{
	int chat = g->kind == K_CHAT;

	evbuffer_add_printf(pb,
	                    "{\"id\":\"%s-%llu\",\"object\":\"%s\",\"created\":%lld,\"model\":\"",
	                    chat ? "chatcmpl" : "cmpl", (unsigned long long)g->id,
	                    chat ? "chat.completion.chunk" : "text_completion", g->created);
	json_escape(pb, g->model, g->model_len);
	ADD_LIT(pb, "\",\"choices\":[");
}

static void ev_begin(struct evbuffer *b, const struct gen *g)
{
	ADD_LIT(b, "data: ");
	evbuffer_add(b, g->prefix, g->prefix_len);
}

static void ev_end(struct sse *s, const struct gen *g)
{
	if (g->usage_chunk)
		ADD_LIT(s->b, "],\"usage\":null}\n\n");
	else
		ADD_LIT(s->b, "]}\n\n");
	sse_send(s);
}

static void chat_start(struct sse *s, struct gen *g)
{
	ev_begin(s->b, g);
	ADD_LIT(s->b, "{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
	              "\"logprobs\":null,\"finish_reason\":null}");
	ev_end(s, g);
}

static void oa_delta(struct sse *s, struct gen *g, long i)
{
	struct evbuffer *b = s->b;
	int t, k;

	if (i < g->ntok) {
		ev_begin(b, g);
		if (g->kind == K_CHAT)
			ADD_LIT(b, "{\"index\":0,\"delta\":{\"content\":\"");
		else
			ADD_LIT(b, "{\"index\":0,\"text\":\"");
		plan_piece(b, g, i);
		if (g->kind == K_CHAT)
			ADD_LIT(b, "\"},\"logprobs\":null,\"finish_reason\":null}");
		else
			ADD_LIT(b, "\",\"logprobs\":null,\"finish_reason\":null}");
		ev_end(s, g);
		return;
	}
	plan_tool_of(g, i, &t, &k);
	if (k == 0) {
		/* The call's first chunk names it, with empty arguments (as OpenAI streams it). */
		ev_begin(b, g);
		evbuffer_add_printf(b,
		                    "{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":%d,"
		                    "\"id\":\"call_%llu_%d\",\"type\":\"function\","
		                    "\"function\":{\"name\":\"",
		                    t, (unsigned long long)g->id, t);
		json_escape(b, g->tools[t].name, g->tools[t].name_len);
		ADD_LIT(b, "\",\"arguments\":\"\"}}]},\"logprobs\":null,\"finish_reason\":null}");
		ev_end(s, g);
	}
	ev_begin(b, g);
	evbuffer_add_printf(b,
	                    "{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":%d,"
	                    "\"function\":{\"arguments\":\"",
	                    t);
	plan_args(b, &g->tools[t], k);
	ADD_LIT(b, "\"}}]},\"logprobs\":null,\"finish_reason\":null}");
	ev_end(s, g);
}

static void oa_finish(struct sse *s, struct gen *g)
{
	struct evbuffer *b = s->b;

	ev_begin(b, g);
	if (g->kind == K_CHAT)
		evbuffer_add_printf(b,
		                    "{\"index\":0,\"delta\":{},\"logprobs\":null,"
		                    "\"finish_reason\":\"%s\"}",
		                    finish_reason(g));
	else
		evbuffer_add_printf(b,
		                    "{\"index\":0,\"text\":\"\",\"logprobs\":null,"
		                    "\"finish_reason\":\"%s\"}",
		                    finish_reason(g));
	ev_end(s, g);
	if (g->usage_chunk) {
		ev_begin(b, g);
		ADD_LIT(b, "],");
		oa_usage(b, g);
		ADD_LIT(b, "}\n\n");
		sse_send(s);
	}
	ADD_LIT(b, "data: [DONE]\n\n");
	sse_send(s);
}

/* A mid-stream error as OpenAI sends one: a data line with an error object, no [DONE]. */
static void oa_fail(struct sse *s, struct gen *g)
{
	char msg[96];

	stream_error_text(msg, sizeof(msg), g);
	ADD_LIT(s->b, "data: ");
	oa_error(s->b, 500, "server_error", msg, "stream_error");
	ADD_LIT(s->b, "\n\n");
	sse_send(s);
}

/* ------------------------------------------------------------------ embeddings */

static uint64_t fnv1a(uint64_t h, const void *data, size_t n)
{
	const unsigned char *p = data;

	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

static void add_embedding(struct evbuffer *b, size_t index, uint64_t h)
{
	uint64_t st = h ? h : 0x9E3779B97F4A7C15ULL;

	evbuffer_add_printf(b, "%s{\"object\":\"embedding\",\"index\":%zu,\"embedding\":[",
	                    index ? "," : "", index);
	for (int k = 0; k < 8; k++)
		evbuffer_add_printf(b, "%s%.6f", k ? "," : "", rng_double(&st) * 2.0 - 1.0);
	ADD_LIT(b, "]}");
}

/* Hash of one embedding input: a string or an array of token ids. */
static uint64_t input_hash(json_t *v)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	if (json_is_string(v))
		return fnv1a(h, json_string_value(v), json_string_length(v));
	if (json_is_array(v)) {
		size_t i;
		json_t *x;

		json_array_foreach(v, i, x)
		{
			json_int_t t = json_integer_value(x);

			h = fnv1a(h, &t, sizeof(t));
		}
	}
	return h;
}

static int is_token_array(json_t *v)
{
	return json_is_array(v) &&
	       (json_array_size(v) == 0 || json_is_integer(json_array_get(v, 0)));
}

static void emb_body(struct evbuffer *b, struct gen *g, json_t *root)
{
	json_t *input = json_object_get(root, "input");
	size_t n = 0;

	ADD_LIT(b, "{\"object\":\"list\",\"data\":[");
	if (json_is_array(input) && !is_token_array(input)) {
		size_t i;
		json_t *x;

		json_array_foreach(input, i, x) add_embedding(b, n++, input_hash(x));
	} else if (input != NULL) {
		add_embedding(b, n++, input_hash(input));
	}
	ADD_LIT(b, "],\"model\":\"");
	json_escape(b, g->model, g->model_len);
	ADD_LIT(b, "\"");
	if (!g->p.no_usage)
		evbuffer_add_printf(b, ",\"usage\":{\"prompt_tokens\":%ld,\"total_tokens\":%ld}",
		                    g->prompt_tokens, g->prompt_tokens);
	ADD_LIT(b, "}");
}

/* ------------------------------------------------------------------ Responses */

static const char *resp_final_status(const struct gen *g)
{
	return g->finish == FIN_LENGTH ? "incomplete" : "completed";
}

static void resp_part(struct evbuffer *b, const struct gen *g, int full)
{
	ADD_LIT(b, "{\"type\":\"output_text\",\"annotations\":[],\"logprobs\":[],\"text\":\"");
	if (full)
		plan_text(b, g);
	ADD_LIT(b, "\"}");
}

/* The message item; full: with its text (done), else empty (added). */
static void resp_message(struct evbuffer *b, const struct gen *g, int full)
{
	evbuffer_add_printf(b,
	                    "{\"id\":\"msg_%llu\",\"type\":\"message\",\"status\":\"%s\","
	                    "\"content\":[",
	                    (unsigned long long)g->id, full ? resp_final_status(g) : "in_progress");
	if (full)
		resp_part(b, g, 1);
	ADD_LIT(b, "],\"role\":\"assistant\"}");
}

static void resp_call(struct evbuffer *b, const struct gen *g, int t, int full)
{
	const struct tool_call *tc = &g->tools[t];

	evbuffer_add_printf(b,
	                    "{\"id\":\"fc_%llu_%d\",\"type\":\"function_call\",\"status\":\"%s\","
	                    "\"arguments\":\"",
	                    (unsigned long long)g->id, t, full ? "completed" : "in_progress");
	if (full)
		json_escape(b, tc->args, tc->args_len);
	evbuffer_add_printf(b, "\",\"call_id\":\"call_%llu_%d\",\"name\":\"",
	                    (unsigned long long)g->id, t);
	json_escape(b, tc->name, tc->name_len);
	ADD_LIT(b, "\"}");
}

static void resp_item(struct evbuffer *b, const struct gen *g, int block, int full)
{
	if (plan_has_text(g) && block == 0)
		resp_message(b, g, full);
	else
		resp_call(b, g, block - plan_has_text(g), full);
}

static void resp_usage(struct evbuffer *b, const struct gen *g)
{
	evbuffer_add_printf(
	        b,
	        "{\"input_tokens\":%ld,\"input_tokens_details\":{\"cached_tokens\":%ld},"
	        "\"output_tokens\":%ld,\"output_tokens_details\":{\"reasoning_tokens\":0},"
	        "\"total_tokens\":%ld}",
	        g->prompt_tokens, g->p.cache_read, g->ndeltas, g->prompt_tokens + g->ndeltas);
}

/* The Response object. status "in_progress" has no output and no usage yet; "failed" carries
 * error_msg. */
static void resp_object(struct evbuffer *b, const struct gen *g, const char *status,
                        const char *error_msg)
{
	int final = strcmp(status, "in_progress") != 0;
	int nblocks = plan_has_text(g) + g->ntools;

	evbuffer_add_printf(b,
	                    "{\"id\":\"resp_%llu\",\"object\":\"response\",\"created_at\":%lld,"
	                    "\"status\":\"%s\",\"background\":false,\"error\":",
	                    (unsigned long long)g->id, g->created, status);
	if (error_msg) {
		ADD_LIT(b, "{\"code\":\"server_error\",\"message\":\"");
		json_escape(b, error_msg, strlen(error_msg));
		ADD_LIT(b, "\"}");
	} else {
		ADD_LIT(b, "null");
	}
	if (!strcmp(status, "incomplete"))
		ADD_LIT(b, ",\"incomplete_details\":{\"reason\":\"max_output_tokens\"}");
	else
		ADD_LIT(b, ",\"incomplete_details\":null");
	ADD_LIT(b, ",\"instructions\":null,\"max_output_tokens\":");
	if (g->max_output >= 0)
		evbuffer_add_printf(b, "%ld", g->max_output);
	else
		ADD_LIT(b, "null");
	ADD_LIT(b, ",\"model\":\"");
	json_escape(b, g->model, g->model_len);
	ADD_LIT(b, "\",\"output\":[");
	if (final && !error_msg) {
		for (int k = 0; k < nblocks; k++) {
			if (k)
				ADD_LIT(b, ",");
			resp_item(b, g, k, 1);
		}
	}
	ADD_LIT(b, "],\"parallel_tool_calls\":true,\"previous_response_id\":");
	if (g->prev_id) {
		ADD_LIT(b, "\"");
		json_escape(b, g->prev_id, g->prev_id_len);
		ADD_LIT(b, "\"");
	} else {
		ADD_LIT(b, "null");
	}
	ADD_LIT(b,
	        ",\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},"
	        "\"tool_choice\":\"auto\",\"tools\":[],\"top_p\":1.0,\"truncation\":\"disabled\","
	        "\"usage\":");
	if (final && !error_msg && !g->p.no_usage)
		resp_usage(b, g);
	else
		ADD_LIT(b, "null");
	ADD_LIT(b, ",\"metadata\":{}}");
}

static void resp_body(struct evbuffer *b, struct gen *g, json_t *root)
{
	(void)root;
	resp_object(b, g, resp_final_status(g), NULL);
}

/* `event: TYPE` and the start of its data object, up to the sequence number. */
static void resp_event(struct evbuffer *b, struct gen *g, const char *type)
{
	evbuffer_add_printf(b, "event: %s\ndata: {\"type\":\"%s\",\"sequence_number\":%ld", type,
	                    type, g->seq++);
}

static void resp_event_end(struct sse *s)
{
	ADD_LIT(s->b, "}\n\n");
	sse_send(s);
}

static void resp_item_ref(struct evbuffer *b, const struct gen *g, int block)
{
	if (plan_has_text(g) && block == 0)
		evbuffer_add_printf(b, ",\"item_id\":\"msg_%llu\",\"output_index\":0",
		                    (unsigned long long)g->id);
	else
		evbuffer_add_printf(b, ",\"item_id\":\"fc_%llu_%d\",\"output_index\":%d",
		                    (unsigned long long)g->id, block - plan_has_text(g), block);
}

static void resp_open(struct sse *s, struct gen *g, int block)
{
	resp_event(s->b, g, "response.output_item.added");
	evbuffer_add_printf(s->b, ",\"output_index\":%d,\"item\":", block);
	resp_item(s->b, g, block, 0);
	resp_event_end(s);
	if (plan_has_text(g) && block == 0) {
		resp_event(s->b, g, "response.content_part.added");
		resp_item_ref(s->b, g, 0);
		ADD_LIT(s->b, ",\"content_index\":0,\"part\":");
		resp_part(s->b, g, 0);
		resp_event_end(s);
	}
	g->open_block = block;
}

static void resp_close(struct sse *s, struct gen *g)
{
	int block = g->open_block;

	if (block < 0)
		return;
	if (plan_has_text(g) && block == 0) {
		resp_event(s->b, g, "response.output_text.done");
		resp_item_ref(s->b, g, 0);
		ADD_LIT(s->b, ",\"content_index\":0,\"text\":\"");
		plan_text(s->b, g);
		ADD_LIT(s->b, "\",\"logprobs\":[]");
		resp_event_end(s);
		resp_event(s->b, g, "response.content_part.done");
		resp_item_ref(s->b, g, 0);
		ADD_LIT(s->b, ",\"content_index\":0,\"part\":");
		resp_part(s->b, g, 1);
		resp_event_end(s);
	} else {
		const struct tool_call *tc = &g->tools[block - plan_has_text(g)];

		resp_event(s->b, g, "response.function_call_arguments.done");
		resp_item_ref(s->b, g, block);
		ADD_LIT(s->b, ",\"arguments\":\"");
		json_escape(s->b, tc->args, tc->args_len);
		ADD_LIT(s->b, "\"");
		resp_event_end(s);
	}
	resp_event(s->b, g, "response.output_item.done");
	evbuffer_add_printf(s->b, ",\"output_index\":%d,\"item\":", block);
	resp_item(s->b, g, block, 1);
	resp_event_end(s);
	g->open_block = -1;
}

static void resp_start(struct sse *s, struct gen *g)
{
	resp_event(s->b, g, "response.created");
	ADD_LIT(s->b, ",\"response\":");
	resp_object(s->b, g, "in_progress", NULL);
	resp_event_end(s);
	resp_event(s->b, g, "response.in_progress");
	ADD_LIT(s->b, ",\"response\":");
	resp_object(s->b, g, "in_progress", NULL);
	resp_event_end(s);
	resp_open(s, g, 0);
}

static void resp_delta(struct sse *s, struct gen *g, long i)
{
	int block = plan_block_of(g, i);

	if (block != g->open_block) {
		resp_close(s, g);
		resp_open(s, g, block);
	}
	if (i < g->ntok) {
		resp_event(s->b, g, "response.output_text.delta");
		resp_item_ref(s->b, g, 0);
		ADD_LIT(s->b, ",\"content_index\":0,\"delta\":\"");
		plan_piece(s->b, g, i);
		ADD_LIT(s->b, "\",\"logprobs\":[]");
	} else {
		int t, k;

		plan_tool_of(g, i, &t, &k);
		resp_event(s->b, g, "response.function_call_arguments.delta");
		resp_item_ref(s->b, g, block);
		ADD_LIT(s->b, ",\"delta\":\"");
		plan_args(s->b, &g->tools[t], k);
		ADD_LIT(s->b, "\"");
	}
	resp_event_end(s);
}

static void resp_finish(struct sse *s, struct gen *g)
{
	const char *status = resp_final_status(g);

	resp_close(s, g);
	resp_event(s->b, g,
	           !strcmp(status, "incomplete") ? "response.incomplete" : "response.completed");
	ADD_LIT(s->b, ",\"response\":");
	resp_object(s->b, g, status, NULL);
	resp_event_end(s);
}

static void resp_fail(struct sse *s, struct gen *g)
{
	char msg[96];

	stream_error_text(msg, sizeof(msg), g);
	resp_event(s->b, g, "error");
	ADD_LIT(s->b, ",\"code\":\"server_error\",\"message\":\"");
	json_escape(s->b, msg, strlen(msg));
	ADD_LIT(s->b, "\",\"param\":null");
	resp_event_end(s);
	resp_event(s->b, g, "response.failed");
	ADD_LIT(s->b, ",\"response\":");
	resp_object(s->b, g, "failed", msg);
	resp_event_end(s);
}

/* ------------------------------------------------------------------ tables */

const struct proto proto_chat = {
        .stream_ctype = "text/event-stream",
        .error = oa_error,
        .status_type = oa_status_type,
        .body = oa_completion_body,
        .prefix = oa_prefix,
        .start = chat_start,
        .delta = oa_delta,
        .finish = oa_finish,
        .fail = oa_fail,
};

const struct proto proto_completions = {
        .stream_ctype = "text/event-stream",
        .error = oa_error,
        .status_type = oa_status_type,
        .body = oa_completion_body,
        .prefix = oa_prefix,
        .start = NULL, /* no role chunk */
        .delta = oa_delta,
        .finish = oa_finish,
        .fail = oa_fail,
};

const struct proto proto_embeddings = {
        .error = oa_error,
        .status_type = oa_status_type,
        .body = emb_body,
};

const struct proto proto_responses = {
        .stream_ctype = "text/event-stream; charset=utf-8",
        .error = oa_error,
        .status_type = oa_status_type,
        .body = resp_body,
        .start = resp_start,
        .delta = resp_delta,
        .finish = resp_finish,
        .fail = resp_fail,
};

/* For the moderation endpoint (moderation.c). */
void proto_openai_error(struct evbuffer *b, int status, const char *type, const char *msg,
                        const char *code)
{
	oa_error(b, status, type, msg, code);
}

const char *proto_openai_status_type(int status)
{
	return oa_status_type(status);
}
