/* provider.h — types only: client protocols, protocol codecs and provider adapters.
 *
 * The first of the pipeline's two extension axes (design.md §12). Entries live in
 * src/provider/<name>.c and include this header plus the leaves they need (sse, usage,
 * config); src/provider/provider.c lists them in static arrays and is the only file the
 * rest of the program calls (its functions are declared at the end of this header,
 * followed by the few helpers the entries share).
 *
 * The model
 * ---------
 * A request arrives in a client protocol, chosen by its path (proto_of_path). The
 * instance that serves an attempt speaks an upstream protocol, chosen by its provider
 * (and, for the Responses API, by whether the instance has a responses endpoint:
 * provider_upstream_proto). When the two are the same, the attempt is the identity: the
 * client's bytes go out spliced (model, stream_options) and the upstream's bytes come
 * back as they are — the fast path, nothing parsed beyond what usage needs.
 *
 * When they differ, the gateway translates through one common form, the OpenAI chat
 * format (the pivot): client request → chat request → upstream request, and upstream
 * answer → chat completion (or chat.completion.chunk events) → client answer. Each codec
 * converts between its protocol and the pivot, in both directions, so N protocols need N
 * codecs, not N² translators. Streams are translated event by event as they arrive,
 * never buffered. Response policies (policy.h) read and rewrite the output text of the
 * pivot, so a guard written once works for every protocol; a route with response
 * policies therefore always goes through the pivot for the answer, even when the
 * protocols match (the request may still go out as the identity).
 *
 * Call order for one translated attempt (client protocol C, upstream protocol U):
 *   pivot = codec(C)->request_to_chat(body)          once per request
 *   up    = codec(U)->request_from_chat(pivot, …)    once per attempt (per instance)
 *   non-stream: chat = codec(U)->response_to_chat(answer, ctx);
 *               out  = codec(C)->response_from_chat(chat, ctx)
 *   stream:     d = codec(U)->decoder_new(ctx); e = codec(C)->encoder_new(ctx);
 *               for each upstream event: codec(U)->decode(d, ev, emit → encode(e, chunk))
 *               codec(C)->stream_end(e, NULL or the gateway's finish reason)
 *   errors:     codec(U)->error_to_openai (after provider_ops.error_to_openai), then
 *               codec(C)->error_body / stream_error
 * Usage of a translated attempt is read from the pivot (proto_usage_from_chat on the
 * chat.completion, or on each chunk: the last one has "choices":[] and "usage"); on the
 * identity path from the bytes (usage_from_body, usage_from_sse_data for chat, and
 * codec(C)->stream_usage per event for Messages and Responses).
 *
 * Pivot conventions (what every codec produces and accepts)
 * - request: an OpenAI chat/completions body (json object): model, messages (roles
 *   system/developer/user/assistant/tool; content a string or an array of parts
 *   {type:text,text} / {type:image_url,image_url:{url}}; assistant tool_calls
 *   [{id,type:function,function:{name,arguments(string)}}]; tool messages with
 *   tool_call_id), max_tokens / max_completion_tokens, stop (string or array), stream,
 *   stream_options.include_usage (codecs of other protocols always set it on streams:
 *   usage is what quotas charge), temperature, top_p, tools
 *   [{type:function,function:{name,description,parameters}}], tool_choice
 *   ("auto"|"none"|"required"|{type:function,function:{name}}), parallel_tool_calls,
 *   response_format, reasoning_effort, user.
 * - non-stream answer: a chat.completion object with choices[].message {role, content,
 *   tool_calls, reasoning_content (thinking text, optional)}, finish_reason (stop |
 *   length | tool_calls | content_filter) and usage {prompt_tokens, completion_tokens,
 *   total_tokens, prompt_tokens_details.cached_tokens,
 *   completion_tokens_details.reasoning_tokens}. prompt_tokens counts every input token,
 *   cached ones included (Anthropic's cache reads and writes are added in).
 * - stream: chat.completion.chunk objects: choices[].delta {role, content,
 *   reasoning_content, tool_calls [{index, id, type, function {name, arguments}}]},
 *   choices[].finish_reason, and a last chunk with "choices":[] and "usage". The end of
 *   the stream is proto_codec.stream_end (the pivot has no [DONE] object). Protocols
 *   with one answer per request (Messages, Responses) read choice 0 only.
 * Pivot objects built by a codec from another one may share nested values with it
 * (shallow copies): treat a pivot as read-only below its top level.
 */
#ifndef SLUICE_PROVIDER_H
#define SLUICE_PROVIDER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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
	PROTO_COUNT_TOKENS, /* Anthropic POST …/messages/count_tokens: identity only */
	PROTO_OTHER,        /* any other path: bytes passed through, identity only */
	PROTO__COUNT,
};

/* A translation failed or the request cannot be served by this protocol: what the
 * client is told (400 unless status says otherwise). type and code are static strings;
 * the message is copied. From request_from_chat it means "this instance cannot serve
 * this request" (e.g. n > 1 on Anthropic): the pipeline may try another candidate and
 * answers with it when none can. */
struct proto_error {
	int status;       /* 0 = 400 */
	const char *type; /* OpenAI error type, e.g. "invalid_request_error" */
	const char *code; /* e.g. "unsupported_parameter", "invalid_request" */
	char message[256];
};

/* What a codec needs to know about the request it answers. All members may be NULL/0. */
struct proto_reply_ctx {
	const char *model;      /* the model name the client asked for: synthesised objects
	                           carry it (the public alias, not the upstream's name);
	                           NULL: the upstream's */
	const char *request_id; /* the gateway's request id (ids of synthesised objects:
	                           msg_<id>, resp_<id>, …); NULL: "0" */
	long long created;      /* unix seconds synthesised objects carry (the request's
	                           arrival); 0: the time of the call */
	bool include_usage;     /* chat: the client asked for stream_options.include_usage
	                           (the pivot's usage chunk is dropped otherwise) */
	const json_t *request;  /* the client's request body (borrowed, outlives the codec
	                           objects; e.g. Responses echoes instructions, tools,
	                           max_output_tokens; Messages answers thinking only when
	                           asked) */
};

/* A client-protocol error body, built by the codec of the client's protocol. */
struct proto_error_out {
	int status;
	const char *type;    /* OpenAI type; NULL: from status */
	const char *code;    /* NULL: none */
	const char *message; /* NUL-terminated */
};

typedef bool (*proto_chunk_fn)(void *arg, json_t *chunk); /* chunk borrowed for the call */

struct proto_decoder; /* per stream, owned by the caller between decoder_new and _free */
struct proto_encoder; /* per stream, owned by the caller between encoder_new and _free */

/*
 * One codec per protocol that the gateway translates (chat, messages, responses).
 * Every function treats its input as hostile: a missing or wrongly typed field is a
 * proto_error (requests) or a broken answer (NULL / false; answers), never a crash.
 * Returned json_t are new references the caller owns. Every member is non-NULL.
 */
struct proto_codec {
	enum proto proto;
	const char *name; /* "chat", "messages", "responses" */

	/* --- requests ---------------------------------------------------------------- */
	/* A client body in this protocol → a pivot chat request. NULL with *err filled
	 * when the request cannot be expressed (e.g. Responses previous_response_id or
	 * built-in tools: the client gets a clear 400, never a wrong answer). */
	json_t *(*request_to_chat)(const json_t *body, struct proto_error *err);
	/* A pivot chat request → this protocol's body for an upstream of instance in (may
	 * be NULL: no options, defaults). model is the upstream model name; NULL sends none
	 * (azure deployments: provider_ops.drop_model). The codec merges in->options into
	 * the body it builds (instance wins, like the identity path), except keys its
	 * protocol documents as defaults: Messages max_tokens comes from the request, else
	 * options.max_tokens, else PROTO_MESSAGES_DEFAULT_MAX_TOKENS. The caller does not
	 * merge options again. */
	json_t *(*request_from_chat)(const json_t *chat, const struct config_instance *in,
	                             const char *model, struct proto_error *err);

	/* --- non-stream answers -------------------------------------------------------- */
	/* An upstream 2xx body in this protocol → a pivot chat.completion. NULL when the
	 * body is not a valid answer (the attempt then fails as upstream_error). */
	json_t *(*response_to_chat)(const json_t *body, const struct proto_reply_ctx *ctx);
	/* A pivot chat.completion → this protocol's answer for the client. NULL when the
	 * answer cannot be expressed (e.g. tool arguments that are not a JSON object, for
	 * Messages): the attempt fails as upstream_error. */
	json_t *(*response_from_chat)(const json_t *chat, const struct proto_reply_ctx *ctx);

	/* --- streams -------------------------------------------------------------------- */
	/* Upstream events in this protocol → pivot chunks, each passed to emit as soon as
	 * it is complete (one upstream event may give zero, one or several chunks; a false
	 * from emit stops and is returned). Returns false when the stream is broken
	 * (invalid JSON, an event out of order, an upstream `error` event: *err then says
	 * what the client is told; err->status 0 means the stream itself is broken — the
	 * pipeline reports upstream_error). decoder_new returns NULL only when out of
	 * memory; ctx (may be NULL) gives created for chunks whose upstream names none. */
	struct proto_decoder *(*decoder_new)(const struct proto_reply_ctx *ctx);
	bool (*decode)(struct proto_decoder *d, const struct sse_event *ev, proto_chunk_fn emit,
	               void *arg, struct proto_error *err);
	void (*decoder_free)(struct proto_decoder *d); /* NULL is a no-op */

	/* Pivot chunks → this protocol's SSE bytes for the client, appended to out. Called
	 * in order for every chunk; stream_end once at the end (writes the closing events,
	 * e.g. message_stop, response.completed, or "data: [DONE]"), with the finish reason
	 * the gateway imposes when it cut the stream (NULL: the upstream's own). encode
	 * returns false when out of memory or when the chunks cannot be expressed (the
	 * pipeline then ends the stream with stream_error). ctx is copied by pointer: it
	 * must outlive the encoder. */
	struct proto_encoder *(*encoder_new)(const struct proto_reply_ctx *ctx);
	bool (*encode)(struct proto_encoder *e, const json_t *chunk, struct evbuffer *out);
	void (*stream_end)(struct proto_encoder *e, const char *finish_reason,
	                   struct evbuffer *out);
	void (*encoder_free)(struct proto_encoder *e); /* NULL is a no-op */

	/* --- errors -------------------------------------------------------------------- */
	/* An upstream error body (non-2xx) in this protocol → OpenAI terms (type, code,
	 * message copied into err; err->status is the status the client should see). False
	 * when the body is not this protocol's error shape (the caller then passes it
	 * through as it came). */
	bool (*error_to_openai)(const char *body, size_t len, int status, struct proto_error *err);
	/* The client-facing error body in this protocol (gateway-made errors and translated
	 * upstream errors): a JSON object appended to out. */
	void (*error_body)(const struct proto_error_out *e, struct evbuffer *out);
	/* A mid-stream error event in this protocol, appended to out. enc is the stream's
	 * encoder when there is one (NULL on the identity path): Responses numbers its
	 * events. Nothing should follow it on the stream. */
	void (*stream_error)(struct proto_encoder *enc, const struct proto_error_out *e,
	                     struct evbuffer *out);

	/* --- usage on the identity path -------------------------------------------------- */
	/* Merge what one upstream event of this protocol says about usage into *u (the
	 * identity path does not decode events; Messages reports input tokens in
	 * message_start and output tokens in message_delta, Responses everything in
	 * response.completed / .incomplete / .failed). Events of other types cost a
	 * compare of the event name, no parse. For chat it does what usage_from_sse_data
	 * does (which the pipeline already calls). */
	void (*stream_usage)(const struct sse_event *ev, struct record_usage *u);
};

/* Token counts read from upstream answers are clamped to this: no real usage comes
 * near it, and sums of a few counts can then neither wrap nor leave json_int_t. */
#define PROTO_USAGE_MAX ((uint64_t)1 << 40)

/* Messages requires max_tokens; the pivot may have none (docs/providers.md). */
#define PROTO_MESSAGES_DEFAULT_MAX_TOKENS 4096

/* ------------------------------------------------------------------ providers */

/*
 * One adapter per provider: what differs between vendors that speak the same protocol
 * (default endpoints, headers, body rules, error quirks). Several providers share a
 * file when they differ only in defaults (openai.c: openai, openai-compatible,
 * deepseek, openrouter, gemini).
 */
struct provider_ops {
	enum provider id;
	const char *name;             /* the config's `provider:` value */
	enum proto upstream;          /* what `endpoint` speaks: PROTO_CHAT or PROTO_MESSAGES */
	const char *default_endpoint; /* NULL: `endpoint` is required */
	/* Where an instance on the provider's default endpoint (and without auth.query)
	 * serves the Responses API / count_tokens; NULL: nowhere (Responses requests are
	 * translated to `upstream`; count_tokens has no upstream). */
	const char *default_responses_endpoint;
	const char *default_count_tokens_endpoint;
	/* The URL names the model, so the body must not (azure deployments). NULL: never. */
	bool (*drop_model)(const struct config_instance *in);
	/* Extra request header lines ("Name: value") beyond the instance's auth, added to
	 * every upstream request of this provider (e.g. anthropic-version), NULL-terminated;
	 * an instance auth header of the same name wins. May be NULL. */
	const char *const *extra_headers;
	/* Provider-specific reading of an error answer (e.g. Azure's content-filter 400,
	 * Gemini's array): may set err and return true; NULL or false → the codec's
	 * error_to_openai. */
	bool (*error_to_openai)(const char *body, size_t len, int status, struct proto_error *err);
	/* true when status on this provider is an overload to fail over on like a 503
	 * (Anthropic's 529 overloaded_error). NULL: only the route's fallback rules. */
	bool (*is_overload)(int status);
	/* The loader's check of an instance of this provider once its endpoint and auth are
	 * known (e.g. an azure deployment URL without api-version): false with a message
	 * for the `file:line:col: instances[i]: message` error. NULL: nothing to check. */
	bool (*check_instance)(const struct config_instance *in, char *msg, size_t len);
};

/* ------------------------------------------------------------------ the table (provider.c) */

/* The client protocol of a request path (suffix match: "…/chat/completions",
 * "…/messages/count_tokens", "…/messages", "…/responses", "…/completions",
 * "…/embeddings"; a query is ignored; anything else PROTO_OTHER). path is not
 * NUL-terminated. */
enum proto proto_of_path(const char *path, size_t len);
const char *proto_name(enum proto p); /* "chat", …; "?" out of range */
/* The codec of p, or NULL for identity-only protocols. */
const struct proto_codec *proto_codec(enum proto p);

const struct provider_ops *provider_ops(enum provider id); /* NULL out of range */
/* Lookup by the config's name; NULL when unknown (the loader's error lists the names). */
const struct provider_ops *provider_by_name(const char *name);

/* The protocol instance `in` is spoken to in for a client request in `client`, and the
 * URL to use (in->url, or a provider default for Responses / count_tokens). The
 * identity when the result equals client; a translation through the pivot otherwise.
 * PROTO__COUNT (and *url NULL) when the instance cannot serve it at all (embeddings or
 * completions on an anthropic instance, count_tokens anywhere but Anthropic's own
 * endpoint — the loader refuses such routes; count_tokens may be answered by the
 * gateway's estimate). */
enum proto provider_upstream_proto(const struct config_instance *in, enum proto client,
                                   const char **url);

/* ------------------------------------------------------------------ shared helpers (provider.c) */

/* Fill *err (status 0 = 400). type and code must be static strings. */
void proto_error_set(struct proto_error *err, int status, const char *type, const char *code,
                     const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* The pivot usage of a chat.completion or chunk (its "usage" member) → *u: prompt,
 * completion, total (prompt + completion when absent), cached, reasoning. False, *u
 * untouched, when obj has no usage object with a count in it. */
bool proto_usage_from_chat(const json_t *obj, struct record_usage *u);
/* Append one SSE event: "event: NAME\n" (when name is not NULL), "data: " + compact
 * JSON + "\n\n". False when out of memory (out may then hold part of the event). */
bool proto_sse_append(struct evbuffer *out, const char *name, const json_t *data);
/* Append v as compact JSON. False when out of memory. */
bool proto_json_append(struct evbuffer *out, const json_t *v);
/* The OpenAI error shape {"error":{message,type,param:null,code}} as a new object. */
json_t *proto_openai_error(const struct proto_error_out *e);
/* The OpenAI error type for an HTTP status (400 invalid_request_error, 401
 * authentication_error, 403 permission_error, 404 invalid_request_error, 429
 * rate_limit_error, 5xx server_error, …). */
const char *proto_type_for_status(int status);
/* Read an OpenAI-shaped error body {"error":{message,type,code}} (code may be a string
 * or a number; vLLM's older {"object":"error",…} too) into *err: its type and code when
 * the gateway knows them (static strings), else ones from the status. False when body
 * is not that shape. */
bool proto_openai_error_to_err(const char *body, size_t len, int status, struct proto_error *err);

#endif
