/* moderation.c — content security review through an OpenAI-compatible /v1/moderations service.
 *
 *   moderation: { endpoint, auth: { header: {...} }, model, on: [request, response],
 *                 block_categories: [...], threshold, timeout, on_error: allow | deny,
 *                 chunk_chars, roles: [user], history: last }
 *
 * Calls go out on the worker's libcurl multi (upstream.h) and never block the loop.
 *   request   the selected prompt text (roles, history: as prompt_guard) is reviewed before
 *             the upstream is called: on_request returns POLICY_PENDING and resumes; a
 *             flagged prompt is refused (400, content_flagged)
 *   response  a non-stream answer is reviewed whole before it is sent (on_response_done
 *             pending); a stream every chunk_chars characters of output, asynchronously,
 *             while the text flows on: a flagged window stops the stream (content_filter),
 *             and the last window is reviewed before the stream's end. Each window repeats
 *             the last MODERATION_OVERLAP characters of the one before it, so that a word
 *             cut at a boundary is still seen whole. One call per choice is in flight at a
 *             time; text arriving meanwhile waits for the next window.
 * Flagged: any listed block_categories true (with threshold: its score at least threshold),
 * or — with no list — the service's own "flagged" (with threshold: any score). A timeout, a
 * connection error, a non-2xx status or an answer that is not a moderation result follow
 * on_error: allow lets the text through (action error_allowed, recorded for every failed
 * call, the asynchronous ones of a stream included), deny refuses the request
 * (503, moderation_unavailable) or ends the answer (content_filter).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "sluice/config_section.h"
#include "sluice/log.h"
#include "sluice/policy.h"
#include "sluice/policy_chain.h"
#include "sluice/prompt.h"
#include "sluice/upstream.h"

/* Defaults and bounds (docs/configuration.md). */
#define MODERATION_TIMEOUT_MS  2000
#define MODERATION_CHUNK_CHARS 1000
#define MODERATION_CHUNK_MAX   1000000
#define MODERATION_OVERLAP     64
#define MODERATION_ANSWER_MAX  (1024 * 1024) /* a moderation result is small */
#define MODERATION_KEEPALIVE_S 60

struct mod_conf {
	char *endpoint;
	char **headers; /* "Name: value" lines (auth.header) */
	size_t n_headers;
	char *model; /* NULL: the service's default */
	bool on_request, on_response;
	char **categories;
	size_t n_categories;
	bool has_threshold;
	double threshold;
	uint64_t timeout_ms;
	bool deny_on_error;
	size_t chunk_chars;
	unsigned roles;
	bool last_only;
};

static const char *const keys[] = {"endpoint",         "auth",      "model",   "on",
                                   "block_categories", "threshold", "timeout", "on_error",
                                   "chunk_chars",      "roles",     "history", NULL};
static const char *const required[] = {"endpoint", NULL};
static const char *const auth_keys[] = {"header", NULL};
static const char *const on_names[] = {"request", "response", NULL};
static const char *const on_error_names[] = {"allow", "deny", NULL};
static const char *const history_names[] = {"last", "all", NULL};

static void mod_free(void *conf)
{
	struct mod_conf *c = conf;
	if (c == NULL)
		return;
	free(c->endpoint);
	csec_strv_free(c->headers, c->n_headers);
	free(c->model);
	csec_strv_free(c->categories, c->n_categories);
	free(c);
}

static void *mod_parse(struct config_section *sec, const struct cnode *m, const char *path)
{
	char p[CSEC_PATH_LEN], ap[CSEC_PATH_LEN];
	size_t failed = csec_error_count(sec);
	struct mod_conf *c = calloc(1, sizeof *c);
	const struct cnode *v;

	if (c == NULL)
		return NULL;
	c->on_request = c->on_response = true;
	c->timeout_ms = MODERATION_TIMEOUT_MS;
	c->deny_on_error = true;
	c->chunk_chars = MODERATION_CHUNK_CHARS;
	c->roles = PROMPT_ROLE_BIT(PROMPT_USER);
	c->last_only = true;
	if (m == NULL) {
		csec_error(sec, NULL, path, "needs an endpoint: moderation: { endpoint: URL }");
		goto fail;
	}
	csec_keys(sec, m, path, keys, required);
	if ((v = csec_get(m, "endpoint")) != NULL) {
		const char *url = csec_url(sec, v, csec_path_key(p, path, "endpoint"));
		if (url != NULL && (c->endpoint = strdup(url)) == NULL)
			goto fail;
	}
	const struct cnode *am =
	        csec_map(sec, csec_get(m, "auth"), csec_path_key(ap, path, "auth"));
	if (am != NULL) {
		csec_keys(sec, am, ap, auth_keys, NULL);
		struct config_kv *kv = NULL;
		size_t n = 0;
		if ((v = csec_get(am, "header")) != NULL &&
		    csec_headers(sec, v, csec_path_key(p, ap, "header"), &kv, &n) && n > 0) {
			c->headers = calloc(n, sizeof *c->headers);
			for (size_t i = 0; c->headers != NULL && i < n; i++) {
				if (asprintf(&c->headers[c->n_headers], "%s: %s", kv[i].name,
				             kv[i].value) >= 0)
					c->n_headers++;
			}
		}
		csec_kv_free(kv, n);
	}
	if ((v = csec_get(m, "model")) != NULL) {
		const char *s = csec_string(sec, v, csec_path_key(p, path, "model"), CSEC_NONEMPTY);
		if (s != NULL && (c->model = strdup(s)) == NULL)
			goto fail;
	}
	if ((v = csec_get(m, "on")) != NULL) {
		unsigned bits;
		csec_path_key(p, path, "on");
		if (csec_enum_bits(sec, v, p, on_names, NULL, &bits) && bits == 0)
			csec_error(sec, v, p, "must list request, response or both");
		else if (bits != 0) {
			c->on_request = bits & 1u;
			c->on_response = bits & 2u;
		}
	}
	if ((v = csec_get(m, "block_categories")) != NULL)
		csec_strlist(sec, v, csec_path_key(p, path, "block_categories"), CSEC_NONEMPTY,
		             &c->categories, &c->n_categories);
	if ((v = csec_get(m, "threshold")) != NULL &&
	    csec_number(sec, v, csec_path_key(p, path, "threshold"), 0, 1, &c->threshold))
		c->has_threshold = true;
	if ((v = csec_get(m, "timeout")) != NULL)
		csec_duration(sec, v, csec_path_key(p, path, "timeout"), true, &c->timeout_ms);
	if ((v = csec_get(m, "on_error")) != NULL) {
		int e;
		if (csec_enum(sec, v, csec_path_key(p, path, "on_error"), on_error_names, &e))
			c->deny_on_error = e == 1;
	}
	if ((v = csec_get(m, "chunk_chars")) != NULL) {
		long long x;
		if (csec_int(sec, v, csec_path_key(p, path, "chunk_chars"), MODERATION_OVERLAP + 1,
		             MODERATION_CHUNK_MAX, &x))
			c->chunk_chars = (size_t)x;
	}
	if ((v = csec_get(m, "roles")) != NULL) {
		unsigned bits;
		csec_path_key(p, path, "roles");
		if (csec_enum_bits(sec, v, p, prompt_role_names, "role", &bits)) {
			if (bits == 0)
				csec_error(sec, v, p, "must list at least one role");
			c->roles = bits;
		}
	}
	if ((v = csec_get(m, "history")) != NULL) {
		int h;
		if (csec_enum(sec, v, csec_path_key(p, path, "history"), history_names, &h))
			c->last_only = h == 0;
	}
	/* Keys that only mean something on one side. */
	if (!c->on_request && (v = csec_get(m, "roles")) != NULL)
		csec_error(sec, v, csec_path_key(p, path, "roles"),
		           "has no effect without request in on");
	if (!c->on_request && (v = csec_get(m, "history")) != NULL)
		csec_error(sec, v, csec_path_key(p, path, "history"),
		           "has no effect without request in on");
	if (!c->on_response && (v = csec_get(m, "chunk_chars")) != NULL)
		csec_error(sec, v, csec_path_key(p, path, "chunk_chars"),
		           "has no effect without response in on");
	if (csec_error_count(sec) == failed)
		return c;
fail:
	mod_free(c);
	return NULL;
}

static unsigned mod_phases(const void *conf)
{
	const struct mod_conf *c = conf;
	return (c->on_request ? POLICY_PHASE_REQUEST : 0) |
	       (c->on_response ? POLICY_PHASE_RESPONSE : 0);
}

/* ============================================================================================
 * One call to the service.
 * ========================================================================================== */

enum mod_result { MOD_PASSED, MOD_FLAGGED, MOD_ERROR };

struct mod_call;
typedef void (*mod_done_fn)(void *owner, enum mod_result r, const char *why);

struct mod_call {
	const struct mod_conf *c;
	struct upstream_xfer x;
	char *body; /* what was sent: must outlive the transfer (owned) */
	struct evbuffer *answer;
	mod_done_fn done;
	void *owner;
};

static void call_free(struct mod_call *call)
{
	if (call == NULL)
		return;
	upstream_xfer_cleanup(&call->x);
	free(call->body);
	if (call->answer != NULL)
		evbuffer_free(call->answer);
	free(call);
}

static bool call_head(void *arg, long status)
{
	return true;
}

static size_t call_body(void *arg, const char *data, size_t len)
{
	struct mod_call *call = arg;
	if (evbuffer_get_length(call->answer) + len > MODERATION_ANSWER_MAX)
		return 0;
	return evbuffer_add(call->answer, data, len) == 0 ? len : 0;
}

/* flagged, passed, or not a moderation result. */
static enum mod_result decide(const struct mod_conf *c, json_t *answer)
{
	json_t *results = json_object_get(answer, "results"), *r;
	size_t i;

	if (!json_is_array(results) || json_array_size(results) == 0)
		return MOD_ERROR;
	json_array_foreach(results, i, r)
	{
		json_t *cats = json_object_get(r, "categories");
		json_t *scores = json_object_get(r, "category_scores");
		if (!json_is_object(r))
			return MOD_ERROR;
		if (c->n_categories == 0 && !c->has_threshold) {
			if (json_is_true(json_object_get(r, "flagged")))
				return MOD_FLAGGED;
			continue;
		}
		if (c->n_categories == 0) {
			const char *k;
			json_t *s;
			json_object_foreach(scores, k, s)
			{
				if (json_is_number(s) && json_number_value(s) >= c->threshold)
					return MOD_FLAGGED;
			}
			continue;
		}
		for (size_t k = 0; k < c->n_categories; k++) {
			if (c->has_threshold) {
				json_t *s = json_object_get(scores, c->categories[k]);
				if (json_is_number(s) && json_number_value(s) >= c->threshold)
					return MOD_FLAGGED;
			} else if (json_is_true(json_object_get(cats, c->categories[k]))) {
				return MOD_FLAGGED;
			}
		}
	}
	return MOD_PASSED;
}

static void call_done(void *arg, enum upstream_result res, const char *detail)
{
	struct mod_call *call = arg;
	enum mod_result r = MOD_ERROR;
	const char *why = detail;
	char buf[160];

	if (res == UPSTREAM_OK && call->x.status >= 200 && call->x.status < 300) {
		size_t n = evbuffer_get_length(call->answer);
		const char *p = n ? (const char *)evbuffer_pullup(call->answer, -1) : "";
		json_t *answer = p ? json_loadb(p, n, 0, NULL) : NULL;
		r = decide(call->c, answer);
		json_decref(answer);
		why = "the answer is not a moderation result";
	} else if (res == UPSTREAM_OK) {
		snprintf(buf, sizeof buf, "HTTP %ld", call->x.status);
		why = buf;
	}
	mod_done_fn done = call->done;
	void *owner = call->owner;
	if (r == MOD_ERROR)
		log_warn("moderation %s: %s", call->c->endpoint, why);
	/* The owner frees the call (it may end the request): nothing here after it. */
	done(owner, r, r == MOD_ERROR ? why : NULL);
}

static const struct upstream_ops call_ops = {
        .on_head = call_head,
        .on_body = call_body,
        .on_done = call_done,
};

/* Starts a review of text; NULL when it cannot start (the caller applies on_error). */
static struct mod_call *call_start(const struct mod_conf *c, const struct policy_env *env,
                                   const char *text, size_t len, mod_done_fn done, void *owner)
{
	struct mod_call *call = calloc(1, sizeof *call);
	json_t *req = NULL;
	char id[160];

	if (call == NULL || env->upstream == NULL)
		goto fail;
	call->c = c;
	call->done = done;
	call->owner = owner;
	call->answer = evbuffer_new();
	req = json_pack("{s:s%}", "input", text, len);
	if (call->answer == NULL || req == NULL ||
	    (c->model != NULL && json_object_set_new(req, "model", json_string(c->model)) != 0))
		goto fail;
	call->body = json_dumps(req, JSON_COMPACT);
	json_decref(req);
	req = NULL;
	if (call->body == NULL)
		goto fail;
	upstream_xfer_init(&call->x, env->upstream, &call_ops, call);
	for (size_t i = 0; i < c->n_headers; i++)
		upstream_xfer_header(&call->x, c->headers[i]);
	if (env->request_id != NULL) {
		snprintf(id, sizeof id, "x-request-id: %s", env->request_id);
		upstream_xfer_header(&call->x, id);
	}
	struct upstream_timeouts to = {c->timeout_ms, c->timeout_ms, c->timeout_ms, c->timeout_ms};
	if (!upstream_xfer_start(&call->x, NULL, c->endpoint, call->body, strlen(call->body), &to,
	                         true, MODERATION_KEEPALIVE_S))
		goto fail;
	return call;
fail:
	json_decref(req);
	call_free(call);
	return NULL;
}

/* ============================================================================================
 * Request side.
 * ========================================================================================== */

struct joined {
	char *s;
	size_t len, cap;
	bool oom;
};

static bool join(struct joined *j, const char *s, size_t n)
{
	size_t need = j->len + n + 1;
	if (need < n || j->oom)
		return false;
	if (need > j->cap) {
		size_t cap = j->cap ? j->cap : 256;
		while (cap < need)
			cap *= 2;
		char *p = realloc(j->s, cap);
		if (p == NULL) {
			j->oom = true;
			return false;
		}
		j->s = p;
		j->cap = cap;
	}
	memcpy(j->s + j->len, s, n);
	j->len += n;
	return true;
}

static bool collect(void *arg, const struct prompt_text *t)
{
	struct joined *j = arg;
	if (j->len > 0 && !join(j, "\n", 1))
		return false;
	return join(j, json_string_value(t->str), json_string_length(t->str));
}

static enum policy_verdict request_decided(const struct mod_conf *c, struct policy_request *req,
                                           enum mod_result r)
{
	if (r == MOD_PASSED)
		return POLICY_CONTINUE;
	if (r == MOD_FLAGGED) {
		req->status = 400;
		req->code = "content_flagged";
		req->action = "blocked";
		snprintf(req->message, sizeof req->message,
		         "the prompt was flagged by the gateway's content moderation");
		snprintf(req->rule, sizeof req->rule, "flagged by %s", c->endpoint);
		return POLICY_REFUSE;
	}
	if (!c->deny_on_error) {
		req->action = "error_allowed";
		snprintf(req->rule, sizeof req->rule, "moderation unavailable, on_error: allow");
		return POLICY_CONTINUE;
	}
	req->status = 503;
	req->type = "service_unavailable";
	req->code = "moderation_unavailable";
	req->action = "error_denied";
	snprintf(req->message, sizeof req->message,
	         "the content moderation service is unavailable and this route requires it");
	snprintf(req->rule, sizeof req->rule, "moderation unavailable, on_error: deny");
	return POLICY_REFUSE;
}

static void request_call_done(void *owner, enum mod_result r, const char *why)
{
	struct policy_request *req = owner;
	struct mod_call *call = req->pending;
	const struct mod_conf *c = call->c;

	call_free(call);
	req->pending = NULL;
	enum policy_verdict v = request_decided(c, req, r);
	req->resume(req->resume_arg, v); /* may free req: last */
}

static enum policy_verdict mod_request(const void *conf, struct policy_request *req)
{
	const struct mod_conf *c = conf;
	struct joined j = {0};

	if (!c->on_request)
		return POLICY_CONTINUE;
	prompt_foreach(req->body, req->proto, c->roles, c->last_only, collect, &j);
	if (j.oom) {
		free(j.s);
		return request_decided(c, req, MOD_ERROR);
	}
	if (j.len == 0) {
		free(j.s);
		return POLICY_CONTINUE;
	}
	struct mod_call *call = call_start(c, req->env, j.s, j.len, request_call_done, req);
	free(j.s);
	if (call == NULL)
		return request_decided(c, req, MOD_ERROR);
	req->pending = call;
	return POLICY_PENDING;
}

static void mod_request_cancel(const void *conf, struct policy_request *req)
{
	call_free(req->pending);
	req->pending = NULL;
}

/* ============================================================================================
 * Response side: per choice.
 * ========================================================================================== */

struct mod_state {
	const struct mod_conf *c;
	struct policy_stream *s;
	struct evbuffer *text; /* reviewed next: the overlap, then new text */
	size_t overlap;        /* bytes at its start that the last window already had */
	size_t fresh_chars;    /* characters after them */
	struct mod_call *call; /* in flight */
	bool waiting;          /* on_response_done returned POLICY_PENDING */
	bool verdict_stop;     /* flagged (or an error with on_error: deny) */
};

static void *mod_begin(const void *conf, struct policy_stream *s, unsigned choice)
{
	struct mod_state *st = calloc(1, sizeof *st);
	if (st == NULL)
		return NULL;
	st->c = conf;
	st->s = s;
	st->text = evbuffer_new();
	if (st->text == NULL) {
		free(st);
		return NULL;
	}
	return st;
}

static void mod_end(void *state)
{
	struct mod_state *st = state;
	if (st == NULL)
		return;
	call_free(st->call);
	evbuffer_free(st->text);
	free(st);
}

static void response_call_done(void *owner, enum mod_result r, const char *why);

/* Sends what is waiting, keeping its last MODERATION_OVERLAP characters for the next window.
 * false when the call could not start. */
static bool send_window(struct mod_state *st)
{
	size_t n = evbuffer_get_length(st->text);
	const char *p = (const char *)evbuffer_pullup(st->text, -1);

	if (p == NULL)
		return false;
	st->call = call_start(st->c, st->s->env, p, n, response_call_done, st);
	if (st->call == NULL)
		return false;
	size_t chars = policy_utf8_count(p, n);
	size_t drop = chars > MODERATION_OVERLAP
	                      ? policy_utf8_advance(p, n, chars - MODERATION_OVERLAP)
	                      : 0;
	evbuffer_drain(st->text, drop);
	st->overlap = n - drop;
	st->fresh_chars = 0;
	return true;
}

/* A decision arrived (or a call could not start): stop, send the next window, or resume. */
static void after_call(struct mod_state *st, enum mod_result r)
{
	struct policy_stream *s = st->s;

	if (r == MOD_FLAGGED || (r == MOD_ERROR && st->c->deny_on_error)) {
		st->verdict_stop = true;
		const char *action = r == MOD_FLAGGED ? "blocked" : "error_denied";
		if (st->waiting) {
			st->waiting = false;
			s->stop(s, "moderation", action, "content_filter");
			s->resume(s); /* may free st: last */
		} else {
			s->stop(s, "moderation", action, "content_filter"); /* may free st: last */
		}
		return;
	}
	if (r == MOD_ERROR) /* on_error: allow — the text goes on, and that is a decision */
		s->note(s, "moderation", "error_allowed", "moderation unavailable, on_error: allow");
	bool more = st->waiting ? st->fresh_chars > 0 : st->fresh_chars >= st->c->chunk_chars;
	if (more) {
		if (!send_window(st))
			after_call(st, MOD_ERROR);
		return;
	}
	if (st->waiting) {
		st->waiting = false;
		s->resume(s); /* may free st: last */
	}
}

static void response_call_done(void *owner, enum mod_result r, const char *why)
{
	struct mod_state *st = owner;
	call_free(st->call);
	st->call = NULL;
	after_call(st, r);
}

static enum policy_verdict mod_text(void *state, struct policy_text *t)
{
	struct mod_state *st = state;

	if (st->verdict_stop) {
		evbuffer_add(t->out, t->text, t->len);
		return POLICY_STOP;
	}
	if (t->len > 0 && evbuffer_add(st->text, t->text, t->len) != 0)
		goto error;
	st->fresh_chars += policy_utf8_count(t->text, t->len);
	/* A non-stream answer is reviewed whole, at on_response_done. */
	if (st->s->streaming && st->call == NULL && st->fresh_chars >= st->c->chunk_chars &&
	    !send_window(st))
		goto error;
	t->passed = true; /* the text goes on as it is while it is reviewed */
	return POLICY_CONTINUE;
error:
	if (!st->c->deny_on_error) {
		t->passed = true;
		t->action = "error_allowed";
		snprintf(t->rule, sizeof t->rule, "moderation unavailable, on_error: allow");
		return POLICY_CONTINUE;
	}
	evbuffer_add(t->out, t->text, t->len);
	st->verdict_stop = true;
	t->finish_reason = "content_filter";
	t->action = "error_denied";
	snprintf(t->rule, sizeof t->rule, "moderation unavailable, on_error: deny");
	return POLICY_STOP;
}

static enum policy_verdict mod_done(void *state, struct policy_text *t)
{
	struct mod_state *st = state;

	if (st->verdict_stop) {
		t->finish_reason = "content_filter";
		return POLICY_STOP;
	}
	if (st->call == NULL && st->fresh_chars > 0 && !send_window(st)) {
		if (!st->c->deny_on_error) {
			t->action = "error_allowed";
			snprintf(t->rule, sizeof t->rule, "moderation unavailable, on_error: allow");
			return POLICY_CONTINUE;
		}
		st->verdict_stop = true;
		t->finish_reason = "content_filter";
		t->action = "error_denied";
		snprintf(t->rule, sizeof t->rule, "moderation unavailable, on_error: deny");
		return POLICY_STOP;
	}
	if (st->call == NULL)
		return POLICY_CONTINUE;
	st->waiting = true;
	return POLICY_PENDING;
}

const struct policy_def policy_moderation = {
        .name = "moderation",
        .phases = POLICY_PHASE_REQUEST | POLICY_PHASE_RESPONSE,
        .conf_parse = mod_parse,
        .conf_free = mod_free,
        .conf_phases = mod_phases,
        .on_request = mod_request,
        .request_cancel = mod_request_cancel,
        .response_begin = mod_begin,
        .on_response_text = mod_text,
        .on_response_done = mod_done,
        .response_end = mod_end,
};
