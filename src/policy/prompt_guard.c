/* prompt_guard.c — refuses a request whose prompt matches a deny pattern (unless an allow one
 * matches).
 *
 *   prompt_guard: { deny: [regex...], allow: [regex...], roles: [user], history: last }
 *
 * The patterns run (PCRE2, JIT) over the text of each selected message: the messages of the
 * listed roles, all of them (history: all) or the last one that has text of those roles
 * (history: last). A message's text parts are joined by "\n", as chat templates join them,
 * so that a phrase cannot slip through by being split into two parts. A message that matches
 * a deny pattern is refused — 400, code prompt_blocked — unless it also matches an allow
 * pattern: allow lists exceptions to deny. The answer never quotes a pattern or the text.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/config_section.h"
#include "sluice/policy.h"
#include "sluice/policy_bytes.h"
#include "sluice/policy_chain.h"
#include "sluice/prompt.h"

/* Defaults (docs/configuration.md). */
#define DEFAULT_ROLES     PROMPT_ROLE_BIT(PROMPT_USER)
#define DEFAULT_LAST_ONLY true

struct guard_conf {
	pcre2_code **deny;
	size_t n_deny;
	pcre2_code **allow;
	size_t n_allow;
	unsigned roles; /* PROMPT_ROLE_BIT */
	bool last_only;
};

static const char *const keys[] = {"deny", "allow", "roles", "history", NULL};
static const char *const history_names[] = {"last", "all", NULL};

static void guard_free(void *conf)
{
	struct guard_conf *g = conf;
	if (g == NULL)
		return;
	csec_regex_free(g->deny, g->n_deny);
	csec_regex_free(g->allow, g->n_allow);
	free(g);
}

static void *guard_parse(struct config_section *sec, const struct cnode *m, const char *path)
{
	char p[CSEC_PATH_LEN];
	size_t failed = csec_error_count(sec);
	struct guard_conf *g = calloc(1, sizeof *g);
	const struct cnode *v;

	if (g == NULL)
		return NULL;
	g->roles = DEFAULT_ROLES;
	g->last_only = DEFAULT_LAST_ONLY;
	csec_keys(sec, m, path, keys, NULL);
	if ((v = csec_get(m, "deny")) != NULL)
		csec_regex_list(sec, v, csec_path_key(p, path, "deny"), 0, 0, &g->deny, &g->n_deny);
	if ((v = csec_get(m, "allow")) != NULL) {
		const struct cnode *deny = csec_get(m, "deny");
		csec_regex_list(sec, v, csec_path_key(p, path, "allow"), 0, 0, &g->allow,
		                &g->n_allow);
		bool no_deny = deny == NULL || deny->kind != CNODE_SEQ || deny->n == 0;
		if (v->kind == CNODE_SEQ && v->n > 0 && no_deny)
			csec_error(sec, v, p,
			           "allow lists exceptions to deny, which has no pattern: add deny "
			           "patterns, or remove allow");
	}
	if ((v = csec_get(m, "roles")) != NULL) {
		unsigned bits;
		csec_path_key(p, path, "roles");
		if (csec_enum_bits(sec, v, p, prompt_role_names, "role", &bits)) {
			if (bits == 0)
				csec_error(sec, v, p, "must list at least one role");
			g->roles = bits;
		}
	}
	if ((v = csec_get(m, "history")) != NULL) {
		int h;
		if (csec_enum(sec, v, csec_path_key(p, path, "history"), history_names, &h))
			g->last_only = h == 0;
	}
	if (csec_error_count(sec) != failed) {
		guard_free(g);
		return NULL;
	}
	return g;
}

/* ---------------------------------------------------------------- the request */

enum scan_result { SCAN_OK, SCAN_BLOCKED, SCAN_ERROR };

struct scan {
	const struct guard_conf *g;
	pcre2_match_data *md;
	pcre2_match_context *mc;
	size_t message;       /* the message being collected */
	bool have;            /* it has text */
	const char *single;   /* its only piece, matched in place (NULL: in buf) */
	size_t single_len;
	char *buf;            /* its pieces joined, when more than one (owned) */
	size_t len, cap;
	enum scan_result result;
	size_t rule; /* deny pattern that fired */
	enum prompt_role role;
};

/* 1 match, 0 none, -1 error (match limit, JIT stack: treated as a match, the guard fails
 * closed). */
static int matches(const struct scan *sc, const pcre2_code *re, const char *s, size_t len)
{
	int rc = pcre2_match(re, (PCRE2_SPTR)s, len, 0, 0, sc->md, sc->mc);
	if (rc >= 0)
		return 1;
	return rc == PCRE2_ERROR_NOMATCH ? 0 : -1;
}

static void check_message(struct scan *sc)
{
	const char *s = sc->single ? sc->single : sc->buf;
	size_t len = sc->single ? sc->single_len : sc->len;

	if (!sc->have || sc->result != SCAN_OK)
		return;
	for (size_t i = 0; i < sc->g->n_deny; i++) {
		int m = matches(sc, sc->g->deny[i], s, len);
		if (m == 0)
			continue;
		for (size_t j = 0; m > 0 && j < sc->g->n_allow; j++) {
			if (matches(sc, sc->g->allow[j], s, len) > 0)
				return;
		}
		sc->result = m > 0 ? SCAN_BLOCKED : SCAN_ERROR;
		sc->rule = i;
		return;
	}
}

static bool append(struct scan *sc, const char *s, size_t n)
{
	if (sc->len + n + 1 > sc->cap) {
		size_t cap = sc->cap ? sc->cap : 256;
		while (cap < sc->len + n + 1)
			cap *= 2;
		char *p = realloc(sc->buf, cap);
		if (p == NULL)
			return false;
		sc->buf = p;
		sc->cap = cap;
	}
	memcpy(sc->buf + sc->len, s, n);
	sc->len += n;
	return true;
}

/* One piece of text: s[0, len) of message (of role); transient: s does not outlive the call. */
static bool piece(struct scan *sc, enum prompt_role role, size_t message, const char *s,
                  size_t len, bool transient)
{
	if (sc->have && message != sc->message) {
		check_message(sc);
		if (sc->result != SCAN_OK)
			return false;
		sc->have = false;
	}
	bool ok = true;
	if (!sc->have) {
		sc->have = true;
		sc->message = message;
		sc->role = role;
		sc->len = 0;
		sc->single = transient ? NULL : s;
		sc->single_len = len;
		if (transient && !append(sc, s, len))
			ok = false;
	} else {
		/* A second piece of the same message: join them. */
		if (sc->single != NULL) {
			ok = append(sc, sc->single, sc->single_len);
			sc->single = NULL;
		}
		ok = ok && append(sc, "\n", 1) && append(sc, s, len);
	}
	if (!ok) {
		sc->result = SCAN_ERROR;
		return false;
	}
	return true;
}

static bool on_text(void *arg, const struct prompt_text *t)
{
	return piece(arg, t->role, t->message, json_string_value(t->str),
	             json_string_length(t->str), false);
}

/* ---------------------------------------------------------------- chat bytes
 *
 * prompt.c's walk of a chat body (messages[]: role, content a string or parts) over the
 * spans: the same pieces in the same order. */

static enum prompt_role span_role(const struct json_scan_value *v)
{
	char r[16];

	if (v->type != JSON_SCAN_STRING)
		return PROMPT_USER;
	pb_string_cstr(v, r, sizeof r);
	if (v->str_len >= sizeof r && strlen(r) == sizeof r - 1)
		return PROMPT_USER; /* longer than any role name */
	for (int i = 0; i < PROMPT__ROLES; i++) {
		if (strcmp(prompt_role_names[i], r) == 0)
			return (enum prompt_role)i;
	}
	if (strcmp(r, "function") == 0)
		return PROMPT_TOOL;
	return PROMPT_USER;
}

struct span_walk {
	struct scan *sc;
	unsigned roles;
	size_t only; /* SIZE_MAX: every message */
	size_t last;
	bool found, stopped;
	bool first_pass;
	struct json_scan_value last_msg; /* first pass: message last's object */
	char *tmp; /* an escaped string decoded (owned) */
	size_t tmp_cap;
};

static void span_visit(struct span_walk *w, enum prompt_role role, size_t message,
                       const struct json_scan_value *v)
{
	if (w->stopped || v->type != JSON_SCAN_STRING || !(w->roles & PROMPT_ROLE_BIT(role)))
		return;
	if (w->first_pass) {
		w->last = message;
		w->found = true;
		return;
	}
	if (w->only != SIZE_MAX && message != w->only)
		return;
	if (!v->escaped) {
		if (!piece(w->sc, role, message, v->p + 1, v->str_len, false))
			w->stopped = true;
		return;
	}
	if (v->str_len + 1 > w->tmp_cap) {
		char *p = realloc(w->tmp, v->str_len + 1);
		if (p == NULL) {
			w->sc->result = SCAN_ERROR;
			w->stopped = true;
			return;
		}
		w->tmp = p;
		w->tmp_cap = v->str_len + 1;
	}
	json_scan_string(v, w->tmp, w->tmp_cap);
	if (!piece(w->sc, role, message, w->tmp, v->str_len, true))
		w->stopped = true;
}

/* Message i (an object): its role and content, then the content's pieces. */
static void span_message(struct span_walk *w, const struct json_scan_value *m, size_t i)
{
	struct pb_iter mi, ci;
	struct json_scan_value k, x, part, text;
	struct json_scan_value role = {.type = JSON_SCAN_ABSENT}, content = {.type = JSON_SCAN_ABSENT};

	pb_begin(&mi, m);
	while (pb_next(&mi, &k, &x)) {
		if (pb_string_is(&k, "role"))
			role = x;
		else if (pb_string_is(&k, "content"))
			content = x;
	}
	enum prompt_role r = span_role(&role);
	if (content.type == JSON_SCAN_STRING) {
		span_visit(w, r, i, &content);
		return;
	}
	if (content.type != JSON_SCAN_ARRAY)
		return;
	pb_begin(&ci, &content);
	while (pb_next(&ci, NULL, &part)) {
		if (part.type == JSON_SCAN_STRING) { /* legacy: a list of strings */
			span_visit(w, r, i, &part);
			continue;
		}
		if (part.type != JSON_SCAN_OBJECT)
			continue;
		struct pb_iter pi;
		pb_begin(&pi, &part);
		while (pb_next(&pi, &k, &text)) {
			if (pb_string_is(&k, "text")) {
				span_visit(w, r, i, &text);
				break;
			}
		}
	}
}

static void span_walk(struct span_walk *w, const struct json_scan_value *messages)
{
	struct pb_iter it;
	struct json_scan_value m;

	if (messages->type != JSON_SCAN_ARRAY)
		return;
	pb_begin(&it, messages);
	for (size_t i = 0; pb_next(&it, NULL, &m); i++) {
		if (m.type != JSON_SCAN_OBJECT)
			continue;
		bool found = w->found;
		size_t last = w->last;
		span_message(w, &m, i);
		if (w->first_pass && w->found && (!found || w->last != last))
			w->last_msg = m; /* the last message with a selected piece so far */
	}
}

static void span_foreach(struct scan *sc, const struct json_scan_value *messages)
{
	struct span_walk w = {.sc = sc, .roles = sc->g->roles, .only = SIZE_MAX};

	if (sc->g->last_only) {
		w.first_pass = true;
		span_walk(&w, messages);
		if (!w.found)
			return;
		w.only = w.last;
		w.first_pass = false;
		span_message(&w, &w.last_msg, w.last); /* only that one */
	} else {
		span_walk(&w, messages);
	}
	free(w.tmp);
}

static enum policy_verdict guard_request(const void *conf, struct policy_request *req)
{
	const struct guard_conf *g = conf;
	struct scan sc = {.g = g, .md = policy_match_data(), .mc = policy_match_context()};

	if (g->n_deny == 0)
		return POLICY_CONTINUE;
	if (sc.md == NULL || sc.mc == NULL) {
		sc.result = SCAN_ERROR;
	} else {
		if (req->body == NULL && req->proto == PROTO_CHAT && req->scan != NULL) {
			span_foreach(&sc, &req->scan->member[JSON_SCAN_MESSAGES]);
		} else {
			json_t *body = policy_request_tree(req);
			if (body == NULL)
				sc.result = SCAN_ERROR;
			else
				prompt_foreach(body, req->proto, g->roles, g->last_only, on_text,
				               &sc);
		}
		check_message(&sc);
	}
	free(sc.buf);
	if (sc.result == SCAN_OK)
		return POLICY_CONTINUE;
	req->status = 400;
	req->code = "prompt_blocked";
	req->action = "blocked";
	if (sc.result == SCAN_BLOCKED) {
		snprintf(req->message, sizeof req->message,
		         "the prompt was refused by the gateway's prompt guard");
		snprintf(req->rule, sizeof req->rule, "deny[%zu] in message %zu (%s)", sc.rule,
		         sc.message, prompt_role_names[sc.role]);
	} else {
		/* The guard could not decide (out of memory, a pattern over its match limit):
		 * it fails closed. */
		snprintf(req->message, sizeof req->message,
		         "the prompt could not be checked by the gateway's prompt guard");
		snprintf(req->rule, sizeof req->rule, "deny[%zu]: match error", sc.rule);
	}
	return POLICY_REFUSE;
}

const struct policy_def policy_prompt_guard = {
        .name = "prompt_guard",
        .phases = POLICY_PHASE_REQUEST,
        .conf_parse = guard_parse,
        .conf_free = guard_free,
        .on_request = guard_request,
        .reads_bytes = true,
};
