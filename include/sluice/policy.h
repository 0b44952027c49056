/* policy.h — types only: the policy phase table that built-in policies and plugins fill.
 *
 * The second of the pipeline's two extension axes (design.md §12). Each built-in policy
 * is one file under src/policy/ (prompt_guard.c, response_guard.c, …) exporting one
 * `const struct policy_def`; src/policy/policy.c lists them in a static array, runs a
 * route's chain, and is the only policy file src/request.c calls. Operators' own
 * policies are shared objects loaded at config load (plugin.h) that provide the same
 * table.
 *
 * Phases (a route runs its `plugins:` list in order in every phase):
 *   on_request        the parsed client body, in the client's protocol: rewrite it in
 *                     place, refuse it (400 and a code), or answer later (moderation
 *                     calls an external service without blocking the loop). Runs after
 *                     authentication and before any quota is reserved, once per request
 *                     (not per attempt).
 *   on_response_text  the output text of one choice, in order, as it is produced (each
 *                     stream event's text; a non-stream answer's whole text at once):
 *                     pass it on, hold part of it back, rewrite it, or stop the answer.
 *   on_response_done  the answer is complete (non-stream: before it is sent, and may
 *                     still refuse it asynchronously; stream: after the last event).
 * A route without policies pays nothing: no parse beyond today's, no allocation.
 *
 * Every decision is visible: a policy that acts sets `action` (a fixed string, e.g.
 * "blocked", "masked", "capped", "rewritten", "cut") and `rule` (what fired, for the debug
 * log; never the matched content). The pipeline counts
 * sluice_policy_actions_total{route,policy,action}, puts {policy, action} in the access
 * log line, and logs the rule at debug level. Blocked content is logged only with
 * log.payloads on.
 */
#ifndef SLUICE_POLICY_H
#define SLUICE_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "sluice/provider.h"

struct cnode;
struct config_section;
struct evbuffer;
struct event_base;
struct upstream;

enum policy_verdict {
	POLICY_CONTINUE, /* go on (the text/body may have been rewritten) */
	POLICY_REFUSE,   /* on_request / on_response_done: answer with the error filled in */
	POLICY_PENDING,  /* decided later: the policy calls resume() exactly once */
	POLICY_STOP,     /* on_response_text: end the answer now with finish_reason */
};

/* What a policy may use beyond its own state: the worker's loop and upstream engine
 * (for calls to external services), and the request's identity for logs. */
struct policy_env {
	struct event_base *base;
	struct upstream *upstream; /* the worker's libcurl multi (upstream.h) */
	const char *request_id;
	const char *route;
	const char *consumer;      /* NULL on auth: none routes */
};

/* ------------------------------------------------------------------ on_request */

struct policy_request {
	const struct policy_env *env;
	enum proto proto;   /* the client's protocol: which shape body has */
	json_t *body;       /* the client's body (an object), mutable in place */
	bool changed;       /* set by a policy that changed body (the body is re-serialised) */
	/* POLICY_REFUSE: what the client is told */
	int status;         /* 0 = 400 */
	const char *code;   /* e.g. "prompt_blocked", "too_many_messages" */
	char message[256];
	/* the decision, for metrics and logs (fixed strings) */
	const char *action;
	char rule[128];
	/* POLICY_PENDING: call resume(resume_arg, verdict) once, from the loop, never from
	 * inside on_request. cancel() may be called instead when the client leaves. */
	void (*resume)(void *resume_arg, enum policy_verdict v);
	void *resume_arg;
};

/* ------------------------------------------------------------------ on_response_text */

/* One stream (or non-stream answer) as the policies see it. */
struct policy_stream {
	const struct policy_env *env;
	bool streaming;     /* false: a non-stream answer (one call with final = true) */
	/* A policy that decides asynchronously (moderation) stops the answer through this,
	 * from the loop; the pipeline ends the stream with finish_reason and cancels the
	 * upstream. Safe to call once; later calls are ignored. */
	void (*stop)(struct policy_stream *s, const char *policy, const char *action,
	             const char *finish_reason);
	void *pipeline; /* private to the pipeline */
};

struct policy_text {
	unsigned choice;        /* the choice index the text belongs to */
	const char *text;       /* new output text, UTF-8, in order; may be empty */
	size_t len;
	bool final;             /* the choice's text is complete: release everything held */
	struct evbuffer *out;   /* append what may go to the client now (may be less than
	                           text: held back; or different: rewritten) */
	/* POLICY_STOP */
	const char *finish_reason; /* "content_filter" or "length" */
	/* the decision, for metrics and logs (fixed strings) */
	const char *action;
	char rule[128];
};

/* ------------------------------------------------------------------ the table */

enum policy_phase_bits {
	POLICY_PHASE_REQUEST = 1u << 0,
	POLICY_PHASE_RESPONSE = 1u << 1,
};

struct policy_def {
	const char *name; /* the key under `plugins:` */
	unsigned phases;  /* policy_phase_bits this policy runs in */

	/* Configuration: parse this policy's mapping (node may be NULL for "- name:" with
	 * defaults) into compiled, immutable state (regexes JIT-compiled here, never per
	 * request). Errors are reported through sec with file:line (config_section.h).
	 * Returns NULL on error. conf_free releases it with the snapshot. */
	void *(*conf_parse)(struct config_section *sec, const struct cnode *node,
	                    const char *path);
	void (*conf_free)(void *conf);

	/* on_request; NULL when the policy has no request phase. */
	enum policy_verdict (*on_request)(const void *conf, struct policy_request *req);
	/* The request went away while on_request was pending: stop the work, never call
	 * resume. NULL when on_request never returns POLICY_PENDING. */
	void (*request_cancel)(const void *conf, struct policy_request *req);

	/* Response phases; NULL when the policy has none. State is per choice: the pipeline
	 * calls response_begin for each choice index it sees. */
	void *(*response_begin)(const void *conf, struct policy_stream *s, unsigned choice);
	enum policy_verdict (*on_response_text)(void *state, struct policy_text *t);
	/* After the choice's final text. May return POLICY_PENDING (non-stream only: the
	 * answer waits) and later resume through s; or POLICY_REFUSE. */
	enum policy_verdict (*on_response_done)(void *state, struct policy_text *t);
	void (*response_end)(void *state); /* frees the state; cancels pending work */
};

#endif
