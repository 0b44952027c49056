/* provider.c — the provider and protocol tables, and the helpers their entries share. */
#include "sluice/provider.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <event2/buffer.h>

/* The entries (one file each under src/provider/). */
extern const struct proto_codec proto_codec_chat;            /* openai.c */
extern const struct proto_codec proto_codec_messages;        /* anthropic.c */
extern const struct proto_codec proto_codec_responses;       /* responses.c */
extern const struct provider_ops provider_openai;            /* openai.c */
extern const struct provider_ops provider_openai_compatible; /* openai.c */
extern const struct provider_ops provider_deepseek;          /* openai.c */
extern const struct provider_ops provider_openrouter;        /* openai.c */
extern const struct provider_ops provider_gemini;            /* openai.c */
extern const struct provider_ops provider_azure_openai;      /* azure.c */
extern const struct provider_ops provider_anthropic;         /* anthropic.c */

static const struct proto_codec *const codecs[PROTO__COUNT] = {
        [PROTO_CHAT] = &proto_codec_chat,
        [PROTO_RESPONSES] = &proto_codec_responses,
        [PROTO_MESSAGES] = &proto_codec_messages,
};

static const char *const proto_names[PROTO__COUNT] = {
        [PROTO_CHAT] = "chat",
        [PROTO_COMPLETIONS] = "completions",
        [PROTO_EMBEDDINGS] = "embeddings",
        [PROTO_RESPONSES] = "responses",
        [PROTO_MESSAGES] = "messages",
        [PROTO_COUNT_TOKENS] = "count_tokens",
        [PROTO_OTHER] = "other",
};

/* Indexed by enum provider (config.h). */
static const struct provider_ops *const providers[] = {
        [PROVIDER_OPENAI] = &provider_openai,
        [PROVIDER_OPENAI_COMPATIBLE] = &provider_openai_compatible,
        [PROVIDER_AZURE_OPENAI] = &provider_azure_openai,
        [PROVIDER_DEEPSEEK] = &provider_deepseek,
        [PROVIDER_OPENROUTER] = &provider_openrouter,
        [PROVIDER_GEMINI] = &provider_gemini,
        [PROVIDER_ANTHROPIC] = &provider_anthropic,
};
#define N_PROVIDERS (sizeof(providers) / sizeof(providers[0]))

/* Path suffixes, longest first where one ends another ("/chat/completions" before
 * "/completions", "/messages/count_tokens" before "/messages"). */
static const struct {
	const char *suffix;
	enum proto proto;
} path_suffixes[] = {
        {"/chat/completions", PROTO_CHAT},   {"/messages/count_tokens", PROTO_COUNT_TOKENS},
        {"/messages", PROTO_MESSAGES},       {"/responses", PROTO_RESPONSES},
        {"/completions", PROTO_COMPLETIONS}, {"/embeddings", PROTO_EMBEDDINGS},
};

/* ------------------------------------------------------------------ the table */

enum proto proto_of_path(const char *path, size_t len)
{
	const char *q = path ? memchr(path, '?', len) : NULL;

	if (path == NULL)
		return PROTO_OTHER;
	if (q != NULL)
		len = (size_t)(q - path);
	for (size_t i = 0; i < sizeof(path_suffixes) / sizeof(path_suffixes[0]); i++) {
		size_t n = strlen(path_suffixes[i].suffix);
		if (len >= n && memcmp(path + len - n, path_suffixes[i].suffix, n) == 0)
			return path_suffixes[i].proto;
	}
	return PROTO_OTHER;
}

const char *proto_name(enum proto p)
{
	return (unsigned)p < PROTO__COUNT ? proto_names[p] : "?";
}

const struct proto_codec *proto_codec(enum proto p)
{
	return (unsigned)p < PROTO__COUNT ? codecs[p] : NULL;
}

const struct provider_ops *provider_ops(enum provider id)
{
	return (unsigned)id < N_PROVIDERS ? providers[id] : NULL;
}

const struct provider_ops *provider_by_name(const char *name)
{
	if (name == NULL)
		return NULL;
	for (size_t i = 0; i < N_PROVIDERS; i++)
		if (providers[i] != NULL && strcmp(providers[i]->name, name) == 0)
			return providers[i];
	return NULL;
}

/* A provider default endpoint other than the instance's own applies only when the
 * instance uses the provider's default endpoint as it is: a custom endpoint (a proxy, a
 * self-hosted server) may serve nothing else, and auth.query belongs to its URL. */
static const char *derived_url(const struct provider_ops *ops, const struct config_instance *in,
                               const char *def)
{
	if (def == NULL || ops->default_endpoint == NULL || in->endpoint == NULL ||
	    in->n_auth_query > 0 || strcmp(in->endpoint, ops->default_endpoint) != 0)
		return NULL;
	return def;
}

enum proto provider_upstream_proto(const struct config_instance *in, enum proto client,
                                   const char **url)
{
	const struct provider_ops *ops = in ? provider_ops(in->provider) : NULL;
	const char *u;

	*url = NULL;
	if (ops == NULL)
		return PROTO__COUNT;
	switch (client) {
	case PROTO_CHAT:
	case PROTO_MESSAGES:
		*url = in->url;
		return ops->upstream;
	case PROTO_RESPONSES:
		/* An instance's own responses_endpoint first (vLLM serves /v1/responses). */
		u = in->responses_url ? in->responses_url
		                      : derived_url(ops, in, ops->default_responses_endpoint);
		if (u != NULL) {
			*url = u;
			return PROTO_RESPONSES;
		}
		*url = in->url;
		return ops->upstream;
	case PROTO_COUNT_TOKENS:
		u = derived_url(ops, in, ops->default_count_tokens_endpoint);
		if (u == NULL)
			return PROTO__COUNT;
		*url = u;
		return PROTO_COUNT_TOKENS;
	case PROTO_COMPLETIONS:
	case PROTO_EMBEDDINGS:
	case PROTO_OTHER:
		/* Bytes in a protocol only OpenAI-compatible servers speak. */
		if (ops->upstream != PROTO_CHAT)
			return PROTO__COUNT;
		*url = in->url;
		return client;
	case PROTO__COUNT:
		break;
	}
	return PROTO__COUNT;
}

/* ------------------------------------------------------------------ shared helpers */

void proto_error_set(struct proto_error *err, int status, const char *type, const char *code,
                     const char *fmt, ...)
{
	va_list ap;

	if (err == NULL)
		return;
	err->status = status;
	err->type = type;
	err->code = code;
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
}

static bool count_of(const json_t *obj, const char *key, uint64_t *out)
{
	const json_t *v = json_object_get(obj, key);

	if (json_is_integer(v)) {
		json_int_t i = json_integer_value(v);
		*out = i <= 0 ? 0 : (uint64_t)i > PROTO_USAGE_MAX ? PROTO_USAGE_MAX : (uint64_t)i;
		return true;
	}
	if (json_is_real(v)) {
		double d = json_real_value(v);
		*out = d > 0 && d < (double)PROTO_USAGE_MAX ? (uint64_t)d
		       : d > 0                              ? PROTO_USAGE_MAX
		                                            : 0;
		return true;
	}
	return false;
}

bool proto_usage_from_chat(const json_t *obj, struct record_usage *u)
{
	const json_t *us = json_object_get(obj, "usage");
	struct record_usage r = {0};
	bool p, c, t;
	uint64_t v;

	if (!json_is_object(us))
		return false;
	p = count_of(us, "prompt_tokens", &r.prompt);
	c = count_of(us, "completion_tokens", &r.completion);
	t = count_of(us, "total_tokens", &r.total);
	if (!p && !c && !t)
		return false;
	if (!t)
		r.total = r.prompt + r.completion;
	if (count_of(json_object_get(us, "prompt_tokens_details"), "cached_tokens", &v))
		r.cached = v;
	if (count_of(json_object_get(us, "completion_tokens_details"), "reasoning_tokens", &v))
		r.reasoning = v;
	r.present = true;
	*u = r;
	return true;
}

static int add_to_evbuffer(const char *buf, size_t size, void *data)
{
	return evbuffer_add(data, buf, size) == 0 ? 0 : -1;
}

bool proto_json_append(struct evbuffer *out, const json_t *v)
{
	return json_dump_callback(v, add_to_evbuffer, out, JSON_COMPACT) == 0;
}

/* One translated event fits here whole: it is built on the stack and handed to the output
 * buffer in one evbuffer_add (a callback per JSON token cost a fifth of a translated
 * stream's CPU). Larger events are serialised into the buffer piece by piece. */
#define PROTO_SSE_STACK 4096

bool proto_sse_append(struct evbuffer *out, const char *name, const json_t *data)
{
	char buf[PROTO_SSE_STACK];
	size_t pre = 0, nl = name ? strlen(name) : 0, n;

	if (name != NULL && nl + 8 < sizeof(buf)) {
		memcpy(buf, "event: ", 7);
		memcpy(buf + 7, name, nl);
		buf[7 + nl] = '\n';
		pre = nl + 8;
	} else if (name != NULL && evbuffer_add_printf(out, "event: %s\n", name) < 0) {
		return false;
	}
	memcpy(buf + pre, "data: ", 6);
	pre += 6;
	n = json_dumpb(data, buf + pre, sizeof(buf) - pre - 2, JSON_COMPACT);
	if (n > 0 && n <= sizeof(buf) - pre - 2) {
		memcpy(buf + pre + n, "\n\n", 2);
		return evbuffer_add(out, buf, pre + n + 2) == 0;
	}
	return evbuffer_add(out, buf, pre) == 0 &&
	       json_dump_callback(data, add_to_evbuffer, out, JSON_COMPACT) == 0 &&
	       evbuffer_add(out, "\n\n", 2) == 0;
}

const char *proto_type_for_status(int status)
{
	switch (status) {
	case 401:
		return "authentication_error";
	case 403:
		return "permission_error";
	case 429:
		return "rate_limit_error";
	default:
		break;
	}
	if (status >= 500)
		return "server_error";
	return "invalid_request_error";
}

json_t *proto_openai_error(const struct proto_error_out *e)
{
	const char *type = e->type ? e->type : proto_type_for_status(e->status);

	return json_pack("{s:{s:s?,s:s,s:n,s:s?}}", "error", "message",
	                 e->message ? e->message : "", "type", type, "param", "code", e->code);
}

/* OpenAI codes the gateway knows, so that a translated error keeps its code although
 * proto_error holds only static strings. */
static const char *const known_codes[] = {
        "context_length_exceeded",
        "model_not_found",
        "invalid_api_key",
        "rate_limit_exceeded",
        "insufficient_quota",
        "content_filter",
        "invalid_request_error",
        "unsupported_parameter",
        "unsupported_value",
        "invalid_value",
        "missing_required_parameter",
        "server_error",
        "invalid_prompt",
};

static const char *static_code(const json_t *code, int status)
{
	const char *s = json_string_value(code);

	if (s != NULL)
		for (size_t i = 0; i < sizeof(known_codes) / sizeof(known_codes[0]); i++)
			if (strcmp(s, known_codes[i]) == 0)
				return known_codes[i];
	switch (status) {
	case 401:
		return "invalid_api_key";
	case 404:
		return "not_found";
	case 429:
		return "rate_limit_exceeded";
	default:
		break;
	}
	return status >= 500 ? "upstream_error" : "invalid_request";
}

static const char *static_type(const json_t *type, int status)
{
	static const char *const known[] = {
	        "invalid_request_error", "authentication_error",
	        "permission_error",      "rate_limit_error",
	        "server_error",          "insufficient_quota",
	        "not_found_error",       "api_error",
	};
	const char *s = json_string_value(type);

	if (s != NULL)
		for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
			if (strcmp(s, known[i]) == 0)
				return known[i];
	return proto_type_for_status(status);
}

bool proto_openai_error_to_err(const char *body, size_t len, int status, struct proto_error *err)
{
	json_t *root = body ? json_loadb(body, len, 0, NULL) : NULL;
	const json_t *e = json_object_get(root, "error");
	const char *msg;
	bool ok = false;

	/* vLLM's older shape: the error members at the top, with "object":"error". */
	const char *object = json_string_value(json_object_get(root, "object"));
	if (e == NULL && object != NULL && strcmp(object, "error") == 0)
		e = root;
	if (!json_is_object(e))
		goto done;
	msg = json_string_value(json_object_get(e, "message"));
	proto_error_set(err, status, static_type(json_object_get(e, "type"), status),
	                static_code(json_object_get(e, "code"), status), "%s",
	                msg ? msg : "upstream error");
	ok = true;
done:
	json_decref(root);
	return ok;
}
