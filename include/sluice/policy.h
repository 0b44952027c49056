/* policy.h — types only: the policy phase table that built-in policies and plugins fill.
 *
 * The second of the pipeline's two extension axes (design.md §12). Each built-in policy
 * is one file under src/policy/ (prompt_guard.c, response_guard.c, …) exporting one
 * `const struct policy_def`; src/policy/policy.c lists them in a static array, runs a
 * route's chain, and is the only policy file src/request.c calls (policy_chain.h).
 * Operators' own policies are shared objects loaded at config load (plugin.h) that provide
 * the same functions.
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
 *   on_response_done  the choice's text is complete (non-stream: before the answer is
 *                     sent; stream: before its last event): the policy may still withhold
 *                     it (POLICY_STOP), also asynchronously (POLICY_PENDING).
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
struct json_scan;
struct upstream;

enum policy_verdict {
	POLICY_CONTINUE, /* go on (the text/body may have been rewritten) */
	POLICY_REFUSE,   /* on_request: answer with the error filled in */
	POLICY_PENDING,  /* decided later: the policy calls resume() exactly once */
	POLICY_STOP,     /* response phases: end the answer now with finish_reason */
};

/* What a policy may use beyond its own state: the worker's loop and upstream engine
 * (for calls to external services), and the request's identity for logs. Strings belong
 * to the request and live as long as it does. */
struct policy_env {
	struct event_base *base;
	struct upstream *upstream; /* the worker's libcurl multi (upstream.h) */
	const char *request_id;
	const char *route;
	const char *consumer; /* NULL on auth: none routes */
};

/*
 * Asynchronous decisions (POLICY_PENDING). The policy starts its work on the worker's loop
 * (never blocking it) and later calls the resume function it was given exactly once, from
 * a loop callback — never from inside the phase function that returned POLICY_PENDING.
 * resume may end the request and free everything it owns, the policy's pending state
 * included: it is the last thing the policy does, touching nothing afterwards. The same
 * holds for policy_stream.stop().
 */

/* ------------------------------------------------------------------ on_request */

struct policy_request {
	const struct policy_env *env;
	enum proto proto; /* the client's protocol: which shape body has */
	json_t *body;     /* the client's body (an object), mutable in place */
	bool changed;     /* set by a policy that changed body (the body is re-serialised) */
	/* POLICY_REFUSE: what the client is told */
	int status;        /* 0 = 400 */
	const char *type;  /* OpenAI error type; NULL = "invalid_request_error" */
	const char *code;  /* e.g. "prompt_blocked", "max_messages_exceeded" */
	char message[256]; /* never quotes the blocked content */
	/* the decision, for metrics and logs (fixed strings) */
	const char *action;
	char rule[128];
	/* POLICY_PENDING: call resume(resume_arg, POLICY_CONTINUE or POLICY_REFUSE) once (see
	 * above). pending is the policy's own: what request_cancel needs to stop the work. */
	void (*resume)(void *resume_arg, enum policy_verdict v);
	void *resume_arg;
	void *pending;
	/* Optional, with changed: the same change as bytes, when all it did was add chat
	 * messages before and/or after the client's (proto PROTO_CHAT) — the members to put at
	 * the start and at the end of the "messages" array, as JSON ("{...},{...}", no
	 * brackets; NULL: none), living as long as the configuration. The client's bytes are
	 * then spliced instead of the body re-serialised. Reset before each policy runs. */
	const char *splice_before;
	const char *splice_after;
	/* Policies with reads_bytes (policy_bytes.h): while body is NULL, the body is these
	 * bytes, accepted by json_scan_body() into scan. */
	const char *bytes;
	size_t bytes_len;
	const struct json_scan *scan;
};

/* ------------------------------------------------------------------ response phases */

/* One choice of one answer (stream or non-stream) as the policies see it: the pipeline
 * keeps one per choice index, for as long as the answer runs. */
struct policy_stream {
	const struct policy_env *env;
	bool streaming;  /* false: a non-stream answer (one text call with final = true) */
	unsigned choice; /* the choice index */
	/* Stop the answer from the loop, for a decision taken asynchronously (moderation of a
	 * stream window): the pipeline ends the stream with finish_reason and cancels the
	 * upstream; after on_response_done it withholds the choice's text instead. The first
	 * call counts; later ones are ignored. May free the caller's state (see above). */
	void (*stop)(struct policy_stream *s, const char *policy, const char *action,
	             const char *finish_reason);
	/* A policy whose on_response_done returned POLICY_PENDING calls this exactly once when
	 * it has decided (after stop() when it withholds the text). May free the caller's
	 * state (see above). */
	void (*resume)(struct policy_stream *s);
	void *pipeline; /* private to the pipeline */
	/* Record a decision taken asynchronously that does not stop the answer (moderation's
	 * on_error: allow after a failed call): counted and logged like every other. rule:
	 * what happened, never the content. */
	void (*note)(struct policy_stream *s, const char *policy, const char *action,
	             const char *rule);
};

struct policy_text {
	unsigned choice;  /* the choice index the text belongs to */
	const char *text; /* new output text, UTF-8, in order; may be empty */
	size_t len;
	bool final;           /* the choice's text is complete: release everything held */
	struct evbuffer *out; /* append what may go to the client now (may be less than
	                         text: held back; or different: rewritten); never split
	                         a UTF-8 sequence */
	/* POLICY_STOP */
	const char *finish_reason; /* "content_filter" or "length" */
	/* the decision, for metrics and logs (fixed strings) */
	const char *action;
	char rule[128];
	const char *alert; /* an alert event type to raise for this decision, e.g.
	                      "loop_detected" (alerts.h); NULL: none */
	/* A policy that lets all of text out unchanged, holding nothing, may set passed
	 * instead of appending text to out (which it leaves alone): the pipeline hands the
	 * same bytes on without a copy. Optional: appending is always right (plugins built
	 * before this field existed do that). */
	bool passed;
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
	 * defaults) into compiled, immutable state shared by every worker (regexes
	 * JIT-compiled here, never per request). Errors are reported through sec with
	 * file:line (config_section.h). Returns NULL on error. conf_free releases it with the
	 * snapshot. */
	void *(*conf_parse)(struct config_section *sec, const struct cnode *node, const char *path);
	void (*conf_free)(void *conf);
	/* Policies whose configured entries differ in name and phases (external: each
	 * plugin its own); NULL: name and phases above. */
	const char *(*conf_label)(const void *conf);
	unsigned (*conf_phases)(const void *conf);

	/* on_request; NULL when the policy has no request phase. */
	enum policy_verdict (*on_request)(const void *conf, struct policy_request *req);
	/* on_request reads req->bytes when req->body is NULL (policy_bytes.h); without it the
	 * runner parses the tree before calling on_request. */
	bool reads_bytes;
	/* The request went away while on_request was pending: stop the work, never call
	 * resume. NULL when on_request never returns POLICY_PENDING. */
	void (*request_cancel)(const void *conf, struct policy_request *req);

	/* Response phases; NULL when the policy has none. State is per choice: the pipeline
	 * calls response_begin for each choice index it sees (NULL: out of memory). */
	void *(*response_begin)(const void *conf, struct policy_stream *s, unsigned choice);
	enum policy_verdict (*on_response_text)(void *state, struct policy_text *t);
	/* After the choice's final text (t->text empty): POLICY_CONTINUE, POLICY_STOP (the
	 * choice's text is withheld, t->finish_reason) or POLICY_PENDING (then s->resume). NULL:
	 * nothing to do. */
	enum policy_verdict (*on_response_done)(void *state, struct policy_text *t);
	void (*response_end)(void *state); /* frees the state; cancels pending work */
};

#endif
