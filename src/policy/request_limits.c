/* request_limits.c — abnormal-request protection: refuses requests past the route's limits.
 *
 *   request_limits: { max_messages, max_prompt_tokens, max_tools, max_stop, max_n,
 *                     max_body_depth, allow_params: [...], deny_params: [...] }
 *
 * Checked before the upstream is called and before any quota is reserved; a refusal is 400
 * with a code naming the limit (max_messages_exceeded, param_denied, ...). The prompt size
 * is the estimate quotas reserve (usage_estimate_prompt), so both agree on what a request
 * costs. allow_params lists the top-level parameters a request may carry beyond those it
 * cannot do without (model, stream and the protocol's prompt: messages, system, input,
 * instructions or prompt); deny_params wins over it.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/config_section.h"
#include "sluice/policy.h"
#include "sluice/policy_bytes.h"
#include "sluice/prompt.h"
#include "sluice/usage.h"

/* Upper bounds of the keys (docs/configuration.md); 0 in the conf means "no limit". */
#define LIMITS_MAX_COUNT  1000000LL
#define LIMITS_MAX_TOKENS 1000000000LL
#define LIMITS_MAX_N      128LL
#define LIMITS_MAX_DEPTH  1000LL

struct limits_conf {
	long long max_messages, max_prompt_tokens, max_tools, max_stop, max_n, max_body_depth;
	char **allow; /* NULL: every parameter */
	size_t n_allow;
	char **deny;
	size_t n_deny;
};

static const char *const keys[] = {
        "max_messages",   "max_prompt_tokens", "max_tools",   "max_stop", "max_n",
        "max_body_depth", "allow_params",      "deny_params", NULL};

/* Parameters every request of a protocol may carry, whatever allow_params says. */
static const char *const always_allowed[] = {"model", "stream",       "messages", "system",
                                             "input", "instructions", "prompt",   NULL};

static void limits_free(void *conf)
{
	struct limits_conf *l = conf;
	if (l == NULL)
		return;
	csec_strv_free(l->allow, l->n_allow);
	csec_strv_free(l->deny, l->n_deny);
	free(l);
}

static void parse_count(struct config_section *sec, const struct cnode *m, const char *key,
                        const char *path, long long min, long long max, long long *out)
{
	char p[CSEC_PATH_LEN];
	const struct cnode *v = csec_get(m, key);
	if (v != NULL)
		csec_int(sec, v, csec_path_key(p, path, key), min, max, out);
}

static void *limits_parse(struct config_section *sec, const struct cnode *m, const char *path)
{
	char p[CSEC_PATH_LEN], ip[CSEC_PATH_LEN];
	size_t failed = csec_error_count(sec);
	struct limits_conf *l = calloc(1, sizeof *l);
	const struct cnode *v, *dv;

	if (l == NULL)
		return NULL;
	csec_keys(sec, m, path, keys, NULL);
	parse_count(sec, m, "max_messages", path, 1, LIMITS_MAX_COUNT, &l->max_messages);
	parse_count(sec, m, "max_prompt_tokens", path, 1, LIMITS_MAX_TOKENS, &l->max_prompt_tokens);
	parse_count(sec, m, "max_tools", path, 0, LIMITS_MAX_COUNT, &l->max_tools);
	parse_count(sec, m, "max_stop", path, 0, LIMITS_MAX_COUNT, &l->max_stop);
	parse_count(sec, m, "max_n", path, 1, LIMITS_MAX_N, &l->max_n);
	parse_count(sec, m, "max_body_depth", path, 1, LIMITS_MAX_DEPTH, &l->max_body_depth);
	/* 0 is a real limit for tools and stop ("none allowed"): keep "unset" apart. */
	if (csec_get(m, "max_tools") == NULL)
		l->max_tools = -1;
	if (csec_get(m, "max_stop") == NULL)
		l->max_stop = -1;
	if ((v = csec_get(m, "allow_params")) != NULL)
		csec_strlist(sec, v, csec_path_key(p, path, "allow_params"), CSEC_NONEMPTY,
		             &l->allow, &l->n_allow);
	if ((dv = csec_get(m, "deny_params")) != NULL &&
	    csec_strlist(sec, dv, csec_path_key(p, path, "deny_params"), CSEC_NONEMPTY, &l->deny,
	                 &l->n_deny)) {
		for (size_t i = 0; i < l->n_deny; i++) {
			for (size_t j = 0; j < l->n_allow; j++) {
				if (strcmp(l->deny[i], l->allow[j]) == 0)
					csec_error(sec, dv->kids[i], csec_path_index(ip, p, i),
					           "\"%s\" is also in allow_params", l->deny[i]);
			}
		}
	}
	if (v != NULL && l->allow == NULL && csec_error_count(sec) == failed)
		l->allow =
		        calloc(1, sizeof *l->allow); /* allow_params: [] allows only the basics */
	if (csec_error_count(sec) != failed) {
		limits_free(l);
		return NULL;
	}
	return l;
}

/* ---------------------------------------------------------------- the request */

static enum policy_verdict refuse(struct policy_request *req, const char *code, const char *fmt,
                                  ...) __attribute__((format(printf, 3, 4)));

static enum policy_verdict refuse(struct policy_request *req, const char *code, const char *fmt,
                                  ...)
{
	va_list ap;
	req->status = 400;
	req->code = code;
	req->action = "refused";
	va_start(ap, fmt);
	vsnprintf(req->message, sizeof req->message, fmt, ap);
	va_end(ap);
	snprintf(req->rule, sizeof req->rule, "%s", code);
	return POLICY_REFUSE;
}

static bool listed(char *const *list, size_t n, const char *s)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(list[i], s) == 0)
			return true;
	return false;
}

/* Whether v nests more than budget containers deep (the body itself is one). */
static bool too_deep(const json_t *v, long long budget)
{
	size_t i;
	const char *k;
	json_t *x;

	if (!json_is_object(v) && !json_is_array(v))
		return false;
	if (budget == 0)
		return true;
	if (json_is_object(v)) {
		json_object_foreach((json_t *)v, k, x)
		{
			if (too_deep(x, budget - 1))
				return true;
		}
		return false;
	}
	json_array_foreach(v, i, x)
	{
		if (too_deep(x, budget - 1))
			return true;
	}
	return false;
}

static bool basic(const char *s)
{
	for (size_t i = 0; always_allowed[i] != NULL; i++)
		if (strcmp(always_allowed[i], s) == 0)
			return true;
	return false;
}

static size_t list_size(const json_t *v)
{
	return json_is_array(v) ? json_array_size(v) : v != NULL && !json_is_null(v) ? 1 : 0;
}

static size_t span_list_size(const struct json_scan_value *v)
{
	size_t n = 0;
	struct json_scan_value x;
	struct pb_iter it;

	if (v->type != JSON_SCAN_ARRAY)
		return v->type != JSON_SCAN_ABSENT && v->type != JSON_SCAN_NULL ? 1 : 0;
	pb_begin(&it, v);
	while (pb_next(&it, NULL, &x))
		n++;
	return n;
}

/* The same checks, in the same order, over a chat body's bytes. */
static enum policy_verdict limits_bytes(const struct limits_conf *l, struct policy_request *req)
{
	struct json_scan_value k, v;
	struct json_scan_value tools = {0}, functions = {0}, stop = {0}, stop_seq = {0};
	struct pb_iter it;
	char key[256];

	pb_begin_body(&it, req->bytes, req->bytes_len, req->scan);
	while (pb_next(&it, &k, &v)) {
		pb_string_cstr(&k, key, sizeof key);
		if (k.str_len >= sizeof key) { /* longer than any listed name */
			if (l->n_deny == 0 && l->allow == NULL)
				continue;
			return POLICY_PENDING; /* the tree decides */
		}
		if (listed(l->deny, l->n_deny, key))
			return refuse(req, "param_denied",
			              "the parameter \"%s\" is not allowed on this "
			              "route",
			              key);
		if (l->allow != NULL && !listed(l->allow, l->n_allow, key) && !basic(key))
			return refuse(req, "param_not_allowed",
			              "the parameter \"%s\" is not allowed on this route", key);
		if (strcmp(key, "tools") == 0)
			tools = v;
		else if (strcmp(key, "functions") == 0)
			functions = v;
		else if (strcmp(key, "stop") == 0)
			stop = v;
		else if (strcmp(key, "stop_sequences") == 0)
			stop_seq = v;
	}
	if (l->max_body_depth > 0 &&
	    pb_depth(req->bytes, req->bytes_len) > (unsigned long long)l->max_body_depth)
		return refuse(req, "max_body_depth_exceeded",
		              "the request body is nested more than %lld levels deep",
		              l->max_body_depth);
	if (l->max_messages > 0) {
		const struct json_scan_value *m = &req->scan->member[JSON_SCAN_MESSAGES];
		size_t n = m->type == JSON_SCAN_ARRAY ? span_list_size(m) : 0;
		if (n > (unsigned long long)l->max_messages)
			return refuse(
			        req, "max_messages_exceeded",
			        "the request has %zu messages; this route allows at most %lld", n,
			        l->max_messages);
	}
	if (l->max_tools >= 0) {
		size_t n = span_list_size(&tools) + span_list_size(&functions);
		if (n > (unsigned long long)l->max_tools)
			return refuse(
			        req, "max_tools_exceeded",
			        "the request declares %zu tools; this route allows at most %lld", n,
			        l->max_tools);
	}
	if (l->max_stop >= 0) {
		size_t n = span_list_size(&stop) + span_list_size(&stop_seq);
		if (n > (unsigned long long)l->max_stop)
			return refuse(
			        req, "max_stop_exceeded",
			        "the request has %zu stop sequences; this route allows at most "
			        "%lld",
			        n, l->max_stop);
	}
	if (l->max_n > 0) {
		const struct json_scan_value *n = &req->scan->member[JSON_SCAN_N];
		if (n->type == JSON_SCAN_INTEGER && n->integer > l->max_n)
			return refuse(
			        req, "max_n_exceeded",
			        "the request asks for %lld choices; this route allows at most %lld",
			        (long long)n->integer, l->max_n);
	}
	if (l->max_prompt_tokens > 0) {
		uint64_t t = policy_request_estimate(req);
		if (t > (uint64_t)l->max_prompt_tokens)
			return refuse(
			        req, "max_prompt_tokens_exceeded",
			        "the prompt is about %llu tokens; this route allows at most %lld",
			        (unsigned long long)t, l->max_prompt_tokens);
	}
	return POLICY_CONTINUE;
}

static enum policy_verdict limits_request(const void *conf, struct policy_request *req)
{
	const struct limits_conf *l = conf;
	const char *k;
	json_t *v;

	if (req->body == NULL && req->proto == PROTO_CHAT && req->scan != NULL) {
		enum policy_verdict r = limits_bytes(l, req);
		if (r != POLICY_PENDING)
			return r;
	}
	json_t *body = policy_request_tree(req);
	if (body == NULL) {
		req->status = 503;
		req->type = "server_error";
		req->code = "out_of_memory";
		snprintf(req->message, sizeof req->message, "out of memory");
		return POLICY_REFUSE;
	}

	json_object_foreach(body, k, v)
	{
		if (listed(l->deny, l->n_deny, k))
			return refuse(req, "param_denied",
			              "the parameter \"%s\" is not allowed on this "
			              "route",
			              k);
		if (l->allow != NULL && !listed(l->allow, l->n_allow, k) && !basic(k))
			return refuse(req, "param_not_allowed",
			              "the parameter \"%s\" is not allowed on this route", k);
	}
	if (l->max_body_depth > 0 && too_deep(body, l->max_body_depth))
		return refuse(req, "max_body_depth_exceeded",
		              "the request body is nested more than %lld levels deep",
		              l->max_body_depth);
	if (l->max_messages > 0) {
		size_t n = prompt_message_count(body, req->proto);
		if (n > (unsigned long long)l->max_messages)
			return refuse(
			        req, "max_messages_exceeded",
			        "the request has %zu messages; this route allows at most %lld", n,
			        l->max_messages);
	}
	if (l->max_tools >= 0) {
		size_t n = list_size(json_object_get(body, "tools")) +
		           list_size(json_object_get(body, "functions"));
		if (n > (unsigned long long)l->max_tools)
			return refuse(
			        req, "max_tools_exceeded",
			        "the request declares %zu tools; this route allows at most %lld", n,
			        l->max_tools);
	}
	if (l->max_stop >= 0) {
		size_t n = list_size(json_object_get(body, "stop")) +
		           list_size(json_object_get(body, "stop_sequences"));
		if (n > (unsigned long long)l->max_stop)
			return refuse(
			        req, "max_stop_exceeded",
			        "the request has %zu stop sequences; this route allows at most "
			        "%lld",
			        n, l->max_stop);
	}
	if (l->max_n > 0) {
		json_t *n = json_object_get(body, "n");
		if (json_is_integer(n) && json_integer_value(n) > l->max_n)
			return refuse(
			        req, "max_n_exceeded",
			        "the request asks for %lld choices; this route allows at most %lld",
			        (long long)json_integer_value(n), l->max_n);
	}
	if (l->max_prompt_tokens > 0) {
		uint64_t t = usage_estimate_prompt(body);
		if (t > (uint64_t)l->max_prompt_tokens)
			return refuse(
			        req, "max_prompt_tokens_exceeded",
			        "the prompt is about %llu tokens; this route allows at most %lld",
			        (unsigned long long)t, l->max_prompt_tokens);
	}
	return POLICY_CONTINUE;
}

const struct policy_def policy_request_limits = {
        .name = "request_limits",
        .phases = POLICY_PHASE_REQUEST,
        .conf_parse = limits_parse,
        .conf_free = limits_free,
        .on_request = limits_request,
        .reads_bytes = true,
};
