/* provider.h — types only: client protocols, protocol codecs and provider adapters.
 *
 * The first of the pipeline's two extension axes (design.md §12). Entries live in
 * src/provider/<name>.c and include this header plus the leaves they need (sse, usage,
 * config); src/provider/provider.c lists them in static arrays and is the only file the
 * rest of the program calls (its functions are declared at the end of this header).
 *
 * The model
 * ---------
 * A request arrives in a client protocol, chosen by its path (proto_of_path). The
 * instance that serves an attempt speaks an upstream protocol, chosen by its provider
 * (and, for the Responses API, by whether the instance has a responses endpoint). When
 * the two are the same, the attempt is the identity: the client's bytes go out spliced
 * (model, stream_options) and the upstream's bytes come back as they are — the fast path,
 * nothing parsed beyond what usage needs.
 *
 * When they differ, the gateway translates through one common form, the OpenAI chat
 * format (the pivot): client request → chat request → upstream request, and upstream
 * answer → chat completion (or chat.completion.chunk events) → client answer. Each codec
 * converts between its protocol and the pivot, in both directions, so N protocols need N
 * codecs, not N² translators. Streams are translated event by event as they arrive,
 * never buffered. Response policies (policy.h) read and rewrite the output text of the
 * pivot, so a guard written once works for every protocol; a route with response
 * policies therefore always goes through the pivot, even when the protocols match.
 *
 * Pivot conventions (what every codec produces and accepts)
 * - request: an OpenAI chat/completions body (json object): model, messages (roles
 *   system/developer/user/assistant/tool; content a string or an array of parts
 *   {type:text,text} / {type:image_url,image_url:{url}}; assistant tool_calls
 *   [{id,type:function,function:{name,arguments(string)}}]; tool messages with
 *   tool_call_id), max_tokens / max_completion_tokens, stop (string or array), stream,
 *   temperature, top_p, tools [{type:function,function:{name,description,parameters}}],
 *   tool_choice ("auto"|"none"|"required"|{type:function,function:{name}}), user.
 * - non-stream answer: a chat.completion object with choices[].message {role, content,
 *   tool_calls, reasoning_content (thinking text, optional)}, finish_reason (stop |
 *   length | tool_calls | content_filter) and usage {prompt_tokens, completion_tokens,
 *   total_tokens, prompt_tokens_details.cached_tokens}.
 * - stream: chat.completion.chunk objects: choices[].delta {role, content,
 *   reasoning_content, tool_calls [{index, id, type, function {name, arguments}}]},
 *   choices[].finish_reason, and a last chunk with "choices":[] and "usage". The end of
 *   the stream is proto_codec.stream_end (the pivot has no [DONE] object).
 */
#ifndef SLUICE_PROVIDER_H
#define SLUICE_PROVIDER_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "sluice/config.h"
#include "sluice/record.h"

struct evbuffer;
struct sse_event;

/* ------------------------------------------------------------------ protocols */

enum proto {
	PROTO_CHAT,         /* OpenAI POST …/chat/completions */
	PROTO_COMPLETIONS,  /* OpenAI legacy POST …/completions: identity only */
	PROTO_EMBEDDINGS,   /* OpenAI POST …/embeddings: identity only */
	PROTO_RESPONSES,    /* OpenAI POST …/responses */
	PROTO_MESSAGES,     /* Anthropic POST …/messages */
	PROTO_COUNT_TOKENS, /* Anthropic POST …/messages/count_tokens */
	PROTO_OTHER,        /* any other path: bytes passed through, identity only */
	PROTO__COUNT,
};

/* A translation failed or the request cannot be served by this protocol: what the
 * client is told (400 unless status says otherwise). Strings are static or copied into
 * message. */
struct proto_error {
	int status;           /* 0 = 400 */
	const char *type;     /* OpenAI error type, e.g. "invalid_request_error" */
	const char *code;     /* e.g. "unsupported_parameter", "invalid_request" */
	char message[256];
};

/* What an encoder needs to know about the request it answers. */
struct proto_reply_ctx {
	const char *model;      /* the model name the client asked for (echoed back) */
	const char *request_id; /* the gateway's request id (ids of synthesised objects) */
	bool include_usage;     /* chat: the client asked for stream_options.include_usage */
	const json_t *request;  /* the client's request body (borrowed; e.g. Responses echoes
	                           instructions, tools, max_output_tokens) */
};

/* A client-protocol error body, built by the codec of the client's protocol. */
struct proto_error_out {
	int status;
	const char *type;
	const char *code;
	const char *message;
};

typedef bool (*proto_chunk_fn)(void *arg, json_t *chunk); /* chunk borrowed for the call */

struct proto_decoder; /* per stream, owned by the codec */
struct proto_encoder; /* per stream, owned by the codec */

/*
 * One codec per protocol that the gateway translates (chat, messages, responses).
 * Every function treats its input as hostile: a missing or wrongly typed field is a
 * proto_error (requests) or a broken answer (false; answers), never a crash. Returned
 * json_t are new references the caller owns.
 */
struct proto_codec {
	enum proto proto;
	const char *name; /* "chat", "messages", "responses" */

	/* --- requests ---------------------------------------------------------------- */
	/* A client body in this protocol → a pivot chat request. NULL with *err filled
	 * when the request cannot be expressed (e.g. Responses previous_response_id or
	 * built-in tools: the client gets a clear 400, never a wrong answer). */
	json_t *(*request_to_chat)(const json_t *body, struct proto_error *err);
	/* A pivot chat request → this protocol's body for an upstream of instance in.
	 * model is the upstream model name (never NULL). The instance's options are merged
	 * by the caller afterwards (instance wins). Anthropic fills max_tokens from the
	 * request, else options.max_tokens, else its documented default. */
	json_t *(*request_from_chat)(const json_t *chat, const struct config_instance *in,
	                             const char *model, struct proto_error *err);

	/* --- non-stream answers -------------------------------------------------------- */
	/* An upstream 2xx body in this protocol → a pivot chat.completion. NULL when the
	 * body is not a valid answer (the attempt then fails as upstream_error). */
	json_t *(*response_to_chat)(const json_t *body);
	/* A pivot chat.completion → this protocol's answer for the client. */
	json_t *(*response_from_chat)(const json_t *chat, const struct proto_reply_ctx *ctx);

	/* --- streams -------------------------------------------------------------------- */
	/* Upstream events in this protocol → pivot chunks, each passed to emit as soon as
	 * it is complete (one upstream event may give zero, one or several chunks).
	 * Returns false when the stream is broken (invalid JSON, an event out of order, an
	 * upstream `error` event: *err then says what the client is told). */
	struct proto_decoder *(*decoder_new)(void);
	bool (*decode)(struct proto_decoder *d, const struct sse_event *ev, proto_chunk_fn emit,
	               void *arg, struct proto_error *err);
	void (*decoder_free)(struct proto_decoder *d);

	/* Pivot chunks → this protocol's SSE bytes for the client, appended to out. Called
	 * in order for every chunk; stream_end once at the end (writes the closing events,
	 * e.g. message_stop, response.completed, or "data: [DONE]"), with the finish reason
	 * the gateway imposes when it cut the stream (NULL: the upstream's own). */
	struct proto_encoder *(*encoder_new)(const struct proto_reply_ctx *ctx);
	bool (*encode)(struct proto_encoder *e, const json_t *chunk, struct evbuffer *out);
	void (*stream_end)(struct proto_encoder *e, const char *finish_reason,
	                   struct evbuffer *out);
	void (*encoder_free)(struct proto_encoder *e);

	/* --- errors -------------------------------------------------------------------- */
	/* An upstream error body (non-2xx) in this protocol → OpenAI terms (type, code,
	 * message copied into err). False when the body is not this protocol's error shape
	 * (the caller then passes it through as it came). */
	bool (*error_to_openai)(const char *body, size_t len, int status, struct proto_error *err);
	/* The client-facing error body in this protocol (gateway-made errors and translated
	 * upstream errors): a JSON object appended to out. */
	void (*error_body)(const struct proto_error_out *e, struct evbuffer *out);
	/* A mid-stream error event in this protocol, appended to out. */
	void (*stream_error)(const struct proto_error_out *e, struct evbuffer *out);

	/* --- usage on the identity path -------------------------------------------------- */
	/* Merge what one upstream event of this protocol says about usage into *u (the
	 * identity path does not decode events; e.g. Messages reports input tokens in
	 * message_start and output tokens in message_delta, Responses in
	 * response.completed). Cheap when the event carries no usage. NULL for chat (the
	 * existing usage_from_sse_data covers it). */
	void (*stream_usage)(const struct sse_event *ev, struct record_usage *u);
};

/* ------------------------------------------------------------------ providers */

/*
 * One adapter per provider: what differs between vendors that speak the same protocol
 * (default endpoints, headers, body rules, error quirks). Several providers share a
 * file when they differ only in defaults (openai.c: openai, openai-compatible,
 * deepseek, openrouter, gemini).
 */
struct provider_ops {
	enum provider id;
	const char *name;              /* the config's `provider:` value */
	enum proto upstream;           /* what `endpoint` speaks: PROTO_CHAT or PROTO_MESSAGES */
	const char *default_endpoint;  /* NULL: `endpoint` is required */
	const char *default_responses_endpoint; /* NULL: Responses requests are translated to
	                                           chat unless the instance sets
	                                           responses_endpoint */
	bool drop_model;               /* the URL names the model (azure deployments) */
	/* Extra request header lines ("Name: value") beyond the instance's auth, added to
	 * every upstream request of this provider (e.g. anthropic-version), NULL-terminated;
	 * an instance auth header of the same name wins. May be NULL. */
	const char *const *extra_headers;
	/* Provider-specific reading of an error answer (e.g. Azure's content-filter 400):
	 * may set err and return true; NULL or false → the codec's error_to_openai. */
	bool (*error_to_openai)(const char *body, size_t len, int status, struct proto_error *err);
	/* true when status on this provider is an overload to fail over on like a 503
	 * (Anthropic's 529 overloaded_error). NULL: only the route's fallback rules. */
	bool (*is_overload)(int status);
};

/* ------------------------------------------------------------------ the table (provider.c) */

/* The client protocol of a request path (suffix match: "…/chat/completions",
 * "…/messages/count_tokens", "…/messages", "…/responses", "…/completions",
 * "…/embeddings"; anything else PROTO_OTHER). path is not NUL-terminated. */
enum proto proto_of_path(const char *path, size_t len);
const char *proto_name(enum proto p);
/* The codec of p, or NULL for identity-only protocols. */
const struct proto_codec *proto_codec(enum proto p);

const struct provider_ops *provider_ops(enum provider id);
/* Lookup by the config's name; NULL when unknown (the loader's error lists the names). */
const struct provider_ops *provider_by_name(const char *name);

/* The protocol instance `in` is spoken to in for a client request in `client`, and the
 * URL to use (in->url or its responses URL). PROTO__COUNT when the instance cannot serve
 * it at all (e.g. embeddings on an anthropic instance — the loader refuses such routes). */
enum proto provider_upstream_proto(const struct config_instance *in, enum proto client,
                                   const char **url);

#endif
