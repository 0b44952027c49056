/* openai.c — the chat codec (the pivot's own protocol) and the OpenAI-compatible providers. */
#include "sluice/provider.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>

#include "sluice/sse.h"
#include "sluice/usage.h"

/* An id kept from the upstream's chunks for the chunk the gateway adds at a cut. */
#define CHAT_ID_MAX 128

/* ------------------------------------------------------------------ requests */

static json_t *chat_request_to_chat(const json_t *body, struct proto_error *err)
{
	if (!json_is_object(body)) {
		proto_error_set(err, 400, "invalid_request_error", "invalid_request",
		                "the request body must be a JSON object");
		return NULL;
	}
	if (!json_is_array(json_object_get(body, "messages"))) {
		proto_error_set(err, 400, "invalid_request_error", "invalid_request",
		                "messages: must be an array");
		return NULL;
	}
	/* Shallow: the pivot is read-only below its top level (provider.h). */
	json_t *c = json_copy((json_t *)body);
	if (c == NULL)
		proto_error_set(err, 500, "server_error", "internal_error", "out of memory");
	return c;
}

static json_t *chat_request_from_chat(const json_t *chat, const struct config_instance *in,
                                      const char *model, struct proto_error *err)
{
	json_t *b;

	if (!json_is_object(chat)) {
		proto_error_set(err, 400, "invalid_request_error", "invalid_request",
		                "the request body must be a JSON object");
		return NULL;
	}
	b = json_copy((json_t *)chat);
	if (b == NULL)
		goto nomem;
	if (model == NULL)
		json_object_del(b, "model");
	else if (json_object_set_new(b, "model", json_string(model)) != 0)
		goto nomem;
	if (in != NULL && json_is_object(in->options) && json_object_update(b, in->options) != 0)
		goto nomem;
	return b;
nomem:
	json_decref(b);
	proto_error_set(err, 500, "server_error", "internal_error", "out of memory");
	return NULL;
}

/* ------------------------------------------------------------------ non-stream answers */

static json_t *chat_response_to_chat(const json_t *body, const struct proto_reply_ctx *ctx)
{
	if (!json_is_object(body) || !json_is_array(json_object_get(body, "choices")))
		return NULL;
	return json_copy((json_t *)body);
}

static json_t *chat_response_from_chat(const json_t *chat, const struct proto_reply_ctx *ctx)
{
	json_t *b;

	if (!json_is_object(chat))
		return NULL;
	b = json_copy((json_t *)chat);
	if (b != NULL && ctx != NULL && ctx->model != NULL &&
	    json_object_set_new(b, "model", json_string(ctx->model)) != 0) {
		json_decref(b);
		return NULL;
	}
	return b;
}

/* ------------------------------------------------------------------ streams */

struct proto_decoder {
	unsigned events; /* data events seen (nothing else is needed: chunks pass as parsed) */
};

static struct proto_decoder *chat_decoder_new(const struct proto_reply_ctx *ctx)
{
	return calloc(1, sizeof(struct proto_decoder));
}

static void chat_decoder_free(struct proto_decoder *d)
{
	free(d);
}

/* The status an error event in a 200 stream stands for: its numeric code (vLLM), else
 * its type. */
static int stream_error_status(const json_t *e)
{
	const json_t *code = json_object_get(e, "code");
	const char *type = json_string_value(json_object_get(e, "type"));

	if (json_is_integer(code) && json_integer_value(code) >= 400 &&
	    json_integer_value(code) <= 599)
		return (int)json_integer_value(code);
	if (type != NULL && strcmp(type, "rate_limit_error") == 0)
		return 429;
	if (type != NULL && strcmp(type, "invalid_request_error") == 0)
		return 400;
	return 502;
}

static bool chat_decode(struct proto_decoder *d, const struct sse_event *ev, proto_chunk_fn emit,
                        void *arg, struct proto_error *err)
{
	json_t *chunk;
	const json_t *e;
	bool ok;

	if (!ev->has_data)
		return true; /* a comment: keep-alive */
	if (ev->data_len == 6 && memcmp(ev->data, "[DONE]", 6) == 0)
		return true;
	chunk = json_loadb(ev->data, ev->data_len, 0, NULL);
	if (!json_is_object(chunk)) {
		json_decref(chunk);
		proto_error_set(err, 0, "upstream_error", "upstream_error",
		                "the upstream sent an event that is not a JSON object");
		return false;
	}
	d->events++;
	e = json_object_get(chunk, "error");
	const char *object = json_string_value(json_object_get(chunk, "object"));
	if (!json_is_object(e) && object != NULL && strcmp(object, "error") == 0)
		e = chunk; /* vLLM's older shape */
	if (json_is_object(e) || strcmp(ev->event, "error") == 0) {
		const char *msg = json_string_value(json_object_get(e, "message"));
		int status = stream_error_status(e);
		proto_error_set(err, status, proto_type_for_status(status),
		                status == 429 ? "rate_limit_exceeded" : "upstream_error", "%s",
		                msg ? msg : "the upstream reported an error");
		json_decref(chunk);
		return false;
	}
	ok = emit(arg, chunk);
	json_decref(chunk);
	return ok;
}

struct proto_encoder {
	const struct proto_reply_ctx *ctx; /* borrowed: outlives the encoder */
	char id[CHAT_ID_MAX];              /* of the last chunk; "" before the first */
	char model[CHAT_ID_MAX];
	long long created;
};

static struct proto_encoder *chat_encoder_new(const struct proto_reply_ctx *ctx)
{
	struct proto_encoder *e = calloc(1, sizeof(*e));

	if (e == NULL)
		return NULL;
	e->ctx = ctx;
	e->created = ctx && ctx->created ? ctx->created : (long long)time(NULL);
	return e;
}

static void chat_encoder_free(struct proto_encoder *e)
{
	free(e);
}

static void keep_string(char *dst, size_t cap, const json_t *v)
{
	const char *s = json_string_value(v);
	size_t n = s ? json_string_length(v) : 0;

	if (s == NULL || n >= cap || memchr(s, '\0', n) != NULL)
		return;
	memcpy(dst, s, n);
	dst[n] = '\0';
}

static bool chat_encode(struct proto_encoder *e, const json_t *chunk, struct evbuffer *out)
{
	const struct proto_reply_ctx *ctx = e->ctx;
	const json_t *choices = json_object_get(chunk, "choices");
	const json_t *usage = json_object_get(chunk, "usage");
	bool want_usage = ctx != NULL && ctx->include_usage;
	bool set_model = ctx != NULL && ctx->model != NULL;
	json_t *c;
	bool ok;

	if (!json_is_object(chunk))
		return true;
	keep_string(e->id, sizeof(e->id), json_object_get(chunk, "id"));
	keep_string(e->model, sizeof(e->model), json_object_get(chunk, "model"));
	if (json_is_integer(json_object_get(chunk, "created")))
		e->created = json_integer_value(json_object_get(chunk, "created"));
	/* The usage-only chunk the gateway asked for: the client did not. */
	if (!want_usage && json_is_array(choices) && json_array_size(choices) == 0 && usage != NULL)
		return true;
	if (!set_model && (want_usage || usage == NULL))
		return proto_sse_append(out, NULL, chunk);
	c = json_copy((json_t *)chunk);
	if (c == NULL)
		return false;
	if (!want_usage)
		json_object_del(c, "usage");
	ok = (!set_model || json_object_set_new(c, "model", json_string(ctx->model)) == 0) &&
	     proto_sse_append(out, NULL, c);
	json_decref(c);
	return ok;
}

static void chat_stream_end(struct proto_encoder *e, const char *finish_reason,
                            struct evbuffer *out)
{
	if (finish_reason != NULL) {
		const struct proto_reply_ctx *ctx = e->ctx;
		const char *model = ctx && ctx->model ? ctx->model : e->model;
		char id[CHAT_ID_MAX + 16];
		json_t *c;

		if (e->id[0] != '\0')
			snprintf(id, sizeof(id), "%s", e->id);
		else
			snprintf(id, sizeof(id), "chatcmpl-%s",
			         ctx && ctx->request_id ? ctx->request_id : "0");
		c = json_pack("{s:s,s:s,s:I,s:s,s:[{s:i,s:{},s:s}]}", "id", id, "object",
		              "chat.completion.chunk", "created", (json_int_t)e->created, "model",
		              model, "choices", "index", 0, "delta", "finish_reason",
		              finish_reason);
		if (c != NULL)
			proto_sse_append(out, NULL, c);
		json_decref(c);
	}
	evbuffer_add(out, "data: [DONE]\n\n", 14);
}

/* ------------------------------------------------------------------ errors and usage */

static void chat_error_body(const struct proto_error_out *e, struct evbuffer *out)
{
	json_t *o = proto_openai_error(e);

	if (o != NULL)
		proto_json_append(out, o);
	json_decref(o);
}

/* The same event the pipeline writes on the identity path: "event: error" and the
 * OpenAI error shape, which both OpenAI SDKs raise as an APIError. */
static void chat_stream_error(struct proto_encoder *enc, const struct proto_error_out *e,
                              struct evbuffer *out)
{
	json_t *o = proto_openai_error(e);

	if (o != NULL)
		proto_sse_append(out, "error", o);
	json_decref(o);
}

static bool chat_error_to_openai(const char *body, size_t len, int status, struct proto_error *err)
{
	return proto_openai_error_to_err(body, len, status, err);
}

static void chat_stream_usage(const struct sse_event *ev, struct record_usage *u)
{
	struct record_usage got;

	if (ev->has_data && usage_from_sse_data(ev->data, ev->data_len, &got, NULL))
		*u = got;
}

const struct proto_codec proto_codec_chat = {
        .proto = PROTO_CHAT,
        .name = "chat",
        .request_to_chat = chat_request_to_chat,
        .request_from_chat = chat_request_from_chat,
        .response_to_chat = chat_response_to_chat,
        .response_from_chat = chat_response_from_chat,
        .decoder_new = chat_decoder_new,
        .decode = chat_decode,
        .decoder_free = chat_decoder_free,
        .encoder_new = chat_encoder_new,
        .encode = chat_encode,
        .stream_end = chat_stream_end,
        .encoder_free = chat_encoder_free,
        .error_to_openai = chat_error_to_openai,
        .error_body = chat_error_body,
        .stream_error = chat_stream_error,
        .stream_usage = chat_stream_usage,
};

/* ------------------------------------------------------------------ providers */

/*
 * Gemini's OpenAI-compatible endpoint answers errors in Google's shape, sometimes
 * wrapped in an array: [{"error":{"code":400,"message":"…","status":"INVALID_ARGUMENT"}}].
 */
static bool gemini_error_to_openai(const char *body, size_t len, int status,
                                   struct proto_error *err)
{
	static const struct {
		const char *status, *type, *code;
	} map[] = {
	        {"INVALID_ARGUMENT", "invalid_request_error", "invalid_request"},
	        {"FAILED_PRECONDITION", "invalid_request_error", "invalid_request"},
	        {"OUT_OF_RANGE", "invalid_request_error", "invalid_request"},
	        {"UNAUTHENTICATED", "authentication_error", "invalid_api_key"},
	        {"PERMISSION_DENIED", "permission_error", "permission_denied"},
	        {"NOT_FOUND", "invalid_request_error", "not_found"},
	        {"RESOURCE_EXHAUSTED", "rate_limit_error", "rate_limit_exceeded"},
	        {"UNAVAILABLE", "server_error", "upstream_overloaded"},
	        {"DEADLINE_EXCEEDED", "server_error", "upstream_timeout"},
	        {"INTERNAL", "server_error", "upstream_error"},
	};
	json_t *root = body ? json_loadb(body, len, 0, NULL) : NULL;
	const json_t *top = json_is_array(root) ? json_array_get(root, 0) : root;
	const json_t *e = json_object_get(top, "error");
	const char *gstatus, *msg;
	bool ok = false;

	if (!json_is_object(e) || !json_is_string(json_object_get(e, "status")))
		goto done;
	gstatus = json_string_value(json_object_get(e, "status"));
	msg = json_string_value(json_object_get(e, "message"));
	for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
		if (strcmp(gstatus, map[i].status) == 0) {
			proto_error_set(err, status, map[i].type, map[i].code, "%s",
			                msg ? msg : gstatus);
			ok = true;
			goto done;
		}
	}
	proto_error_set(err, status, proto_type_for_status(status),
	                status >= 500 ? "upstream_error" : "invalid_request", "%s",
	                msg ? msg : gstatus);
	ok = true;
done:
	json_decref(root);
	return ok;
}

const struct provider_ops provider_openai = {
        .id = PROVIDER_OPENAI,
        .name = "openai",
        .upstream = PROTO_CHAT,
        .default_endpoint = "https://api.openai.com/v1/chat/completions",
        .default_responses_endpoint = "https://api.openai.com/v1/responses",
};

const struct provider_ops provider_openai_compatible = {
        .id = PROVIDER_OPENAI_COMPATIBLE,
        .name = "openai-compatible",
        .upstream = PROTO_CHAT,
};

const struct provider_ops provider_deepseek = {
        .id = PROVIDER_DEEPSEEK,
        .name = "deepseek",
        .upstream = PROTO_CHAT,
        .default_endpoint = "https://api.deepseek.com/chat/completions",
};

const struct provider_ops provider_openrouter = {
        .id = PROVIDER_OPENROUTER,
        .name = "openrouter",
        .upstream = PROTO_CHAT,
        .default_endpoint = "https://openrouter.ai/api/v1/chat/completions",
};

const struct provider_ops provider_gemini = {
        .id = PROVIDER_GEMINI,
        .name = "gemini",
        .upstream = PROTO_CHAT,
        .default_endpoint =
                "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions",
        .error_to_openai = gemini_error_to_openai,
};
