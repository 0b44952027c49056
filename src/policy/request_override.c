/* request_override.c — rewrites the client's parameters: remove, set, defaults, cap (in that
 * order).
 *
 *   request_override: { remove: [key...], set: {...}, defaults: {...}, cap: {key: number} }
 *
 * remove   top-level keys dropped
 * set      deep merge: mappings merge key by key, anything else is overwritten
 * defaults the same, but only where the client sent nothing (absent or null)
 * cap      numbers lowered to at most the cap. The output caps (max_tokens,
 *          max_completion_tokens, max_output_tokens) are one family: the smallest of them
 *          named here caps every one of them the client sends, and when the client sends
 *          none, the protocol's own is set to it — a model known to loop always has a
 *          bound. A capped parameter that is not a number is refused (400,
 *          invalid_parameter): some servers would read "100000" as a number.
 * model and stream cannot be touched: the route and the kind of answer were chosen from
 * them before the policies run.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/config_section.h"
#include "sluice/policy.h"
#include "sluice/policy_bytes.h"

struct cap {
	char *key;
	double value;
};

struct override_conf {
	char **remove;
	size_t n_remove;
	json_t *set;      /* object or NULL; copied into bodies, never shared with them */
	json_t *defaults; /* object or NULL */
	struct cap *caps;
	size_t n_caps;
	bool has_output_cap;
	double output_cap;       /* the smallest cap of the output family */
	const char *output_name; /* the first output-cap key named, for chat requests */
};

static const char *const keys[] = {"set", "defaults", "cap", "remove", NULL};
static const char *const output_keys[] = {"max_tokens", "max_completion_tokens",
                                          "max_output_tokens", NULL};
/* Decided before the policies run: refused in set, defaults and remove. */
static const char *const fixed_keys[] = {"model", "stream", NULL};

static bool in_list(const char *const *list, const char *s)
{
	for (size_t i = 0; list[i] != NULL; i++)
		if (strcmp(list[i], s) == 0)
			return true;
	return false;
}

static void override_free(void *conf)
{
	struct override_conf *o = conf;
	if (o == NULL)
		return;
	csec_strv_free(o->remove, o->n_remove);
	json_decref(o->set);
	json_decref(o->defaults);
	for (size_t i = 0; i < o->n_caps; i++)
		free(o->caps[i].key);
	free(o->caps);
	free(o);
}

/* set / defaults: a mapping without the fixed keys. */
static json_t *parse_object(struct config_section *sec, const struct cnode *m, const char *key,
                            const char *path)
{
	char p[CSEC_PATH_LEN], kp[CSEC_PATH_LEN];
	const struct cnode *v = csec_map(sec, csec_get(m, key), csec_path_key(p, path, key));

	if (v == NULL)
		return NULL;
	for (size_t i = 0; i < v->n; i++) {
		const struct cnode *k = CNODE_KEY(v, i);
		if (k->kind == CNODE_SCALAR && !k->null && in_list(fixed_keys, k->str))
			csec_error(sec, k, csec_path_key(kp, p, k->str),
			           "%s cannot be overridden: the route and the kind of answer are "
			           "chosen from it before the policies run",
			           k->str);
	}
	return csec_json(sec, v, p);
}

static void parse_caps(struct config_section *sec, const struct cnode *m, const char *path,
                       struct override_conf *o)
{
	char p[CSEC_PATH_LEN], kp[CSEC_PATH_LEN];
	const struct cnode *cm = csec_map(sec, csec_get(m, "cap"), csec_path_key(p, path, "cap"));

	if (cm == NULL || cm->n == 0)
		return;
	o->caps = calloc(cm->n, sizeof *o->caps);
	if (o->caps == NULL)
		return;
	for (size_t i = 0; i < cm->n; i++) {
		const struct cnode *k = CNODE_KEY(cm, i);
		double d;
		if (k->kind != CNODE_SCALAR || k->null)
			continue; /* reported by the tree */
		if (!csec_number(sec, CNODE_VAL(cm, i), csec_path_key(kp, p, k->str), 0, HUGE_VAL,
		                 &d))
			continue;
		if ((o->caps[o->n_caps].key = strdup(k->str)) == NULL)
			continue;
		o->caps[o->n_caps++].value = d;
		if (in_list(output_keys, k->str)) {
			if (!o->has_output_cap)
				o->output_name = o->caps[o->n_caps - 1].key;
			if (!o->has_output_cap || d < o->output_cap)
				o->output_cap = d;
			o->has_output_cap = true;
		}
	}
}

static void *override_parse(struct config_section *sec, const struct cnode *m, const char *path)
{
	char p[CSEC_PATH_LEN], ip[CSEC_PATH_LEN];
	size_t failed = csec_error_count(sec);
	struct override_conf *o = calloc(1, sizeof *o);
	const struct cnode *v;

	if (o == NULL)
		return NULL;
	csec_keys(sec, m, path, keys, NULL);
	o->set = parse_object(sec, m, "set", path);
	o->defaults = parse_object(sec, m, "defaults", path);
	parse_caps(sec, m, path, o);
	if ((v = csec_get(m, "remove")) != NULL &&
	    csec_strlist(sec, v, csec_path_key(p, path, "remove"), CSEC_NONEMPTY, &o->remove,
	                 &o->n_remove)) {
		for (size_t i = 0; i < o->n_remove; i++) {
			if (in_list(fixed_keys, o->remove[i]))
				csec_error(sec, v->kids[i], csec_path_index(ip, p, i),
				           "%s cannot be removed: the route and the kind of answer "
				           "are chosen from it before the policies run",
				           o->remove[i]);
		}
	}
	if (csec_error_count(sec) != failed) {
		override_free(o);
		return NULL;
	}
	return o;
}

/* ---------------------------------------------------------------- the request */

/* Merge src into dst; only_absent: defaults. Returns false when out of memory. */
static bool merge(json_t *dst, const json_t *src, bool only_absent, bool *changed)
{
	const char *k;
	json_t *v;

	json_object_foreach((json_t *)src, k, v)
	{
		json_t *cur = json_object_get(dst, k);
		if (json_is_object(v) && json_is_object(cur)) {
			if (!merge(cur, v, only_absent, changed))
				return false;
			continue;
		}
		if (only_absent && cur != NULL && !json_is_null(cur))
			continue;
		if (json_object_set_new(dst, k, json_deep_copy(v)) != 0)
			return false;
		*changed = true;
	}
	return true;
}

static json_t *number(double cap, bool integer)
{
	if (integer && cap == floor(cap) && cap <= 9007199254740992.0)
		return json_integer((json_int_t)cap);
	return json_real(cap);
}

/* The output-cap key this protocol uses when the client sent none. */
static const char *own_output_key(const struct override_conf *o, enum proto proto)
{
	switch (proto) {
	case PROTO_CHAT:
		/* Both are chat's; newer OpenAI models take only max_completion_tokens, so the
		 * one the operator wrote first is used. */
		return strcmp(o->output_name, "max_completion_tokens") == 0 ? o->output_name
		                                                            : "max_tokens";
	case PROTO_MESSAGES:
	case PROTO_COMPLETIONS:
		return "max_tokens";
	case PROTO_RESPONSES:
		return "max_output_tokens";
	default:
		return NULL;
	}
}

/* One capped value; -1: not a number (refused), 0: unchanged, 1: lowered. */
static int clamp(json_t *body, const char *key, double cap)
{
	json_t *v = json_object_get(body, key);
	if (v == NULL || json_is_null(v))
		return 0;
	if (!json_is_number(v))
		return -1;
	if (json_number_value(v) <= cap)
		return 0;
	return json_object_set_new(body, key, number(cap, json_is_integer(v))) == 0 ? 1 : -2;
}

static enum policy_verdict refuse_param(struct policy_request *req, const char *key)
{
	req->status = 400;
	req->code = "invalid_parameter";
	req->action = "refused";
	snprintf(req->message, sizeof req->message, "\"%s\" must be a number", key);
	snprintf(req->rule, sizeof req->rule, "cap %s: not a number", key);
	return POLICY_REFUSE;
}

static bool absent(const struct json_scan_value *v)
{
	return v->type == JSON_SCAN_ABSENT || v->type == JSON_SCAN_NULL;
}

static bool within(const struct json_scan_value *v, double cap)
{
	return (v->type == JSON_SCAN_INTEGER || v->type == JSON_SCAN_REAL) && pb_number(v) <= cap;
}

/* Whether the rewrite leaves these bytes as they are: nothing to remove, set or default, every
 * capped number within its cap, and a client output cap present when the cap would add one.
 * One pass over the top-level members. */
static bool nothing_to_do(const struct override_conf *o, const struct policy_request *req)
{
	struct json_scan_value k, v;
	struct pb_iter it;
	bool any_output = false;

	if (o->set != NULL || o->defaults != NULL)
		return false;
	pb_begin_body(&it, req->bytes, req->bytes_len, req->scan);
	while (pb_next(&it, &k, &v)) {
		for (size_t i = 0; i < o->n_remove; i++)
			if (pb_string_is(&k, o->remove[i]))
				return false;
		if (absent(&v))
			continue;
		for (size_t i = 0; i < o->n_caps; i++) {
			const struct cap *c = &o->caps[i];
			if (!pb_string_is(&k, c->key))
				continue;
			double cap = in_list(output_keys, c->key) ? fmin(c->value, o->output_cap)
			                                          : c->value;
			if (!within(&v, cap))
				return false;
		}
		for (size_t i = 0; o->has_output_cap && output_keys[i] != NULL; i++) {
			if (!pb_string_is(&k, output_keys[i]))
				continue;
			any_output = true;
			if (!within(&v, o->output_cap))
				return false;
		}
	}
	return !o->has_output_cap || any_output || own_output_key(o, req->proto) == NULL;
}

static enum policy_verdict override_request(const void *conf, struct policy_request *req)
{
	const struct override_conf *o = conf;

	if (req->body == NULL && nothing_to_do(o, req))
		return POLICY_CONTINUE;
	json_t *body = policy_request_tree(req);
	if (body == NULL)
		goto oom;
	bool changed = false, capped = false, any_output = false;
	const char *first_capped = NULL;

	for (size_t i = 0; i < o->n_remove; i++) {
		if (json_object_del(body, o->remove[i]) == 0)
			changed = true;
	}
	if ((o->set && !merge(body, o->set, false, &changed)) ||
	    (o->defaults && !merge(body, o->defaults, true, &changed)))
		goto oom;
	for (size_t i = 0; i < o->n_caps; i++) {
		const struct cap *c = &o->caps[i];
		double cap =
		        in_list(output_keys, c->key) ? fmin(c->value, o->output_cap) : c->value;
		int r = clamp(body, c->key, cap);
		if (r == -1)
			return refuse_param(req, c->key);
		if (r == -2)
			goto oom;
		if (r == 1 && first_capped == NULL)
			first_capped = c->key;
		capped |= r == 1;
	}
	if (o->has_output_cap) {
		/* The family: output caps the client sent that the cap does not name. */
		for (size_t i = 0; output_keys[i] != NULL; i++) {
			json_t *v = json_object_get(body, output_keys[i]);
			if (v == NULL || json_is_null(v))
				continue;
			any_output = true;
			int r = clamp(body, output_keys[i], o->output_cap);
			if (r == -1)
				return refuse_param(req, output_keys[i]);
			if (r == -2)
				goto oom;
			if (r == 1 && first_capped == NULL)
				first_capped = output_keys[i];
			capped |= r == 1;
		}
		const char *own = own_output_key(o, req->proto);
		if (!any_output && own != NULL) {
			if (json_object_set_new(body, own, number(o->output_cap, true)) != 0)
				goto oom;
			if (first_capped == NULL)
				first_capped = own;
			capped = true;
		}
	}
	if (capped) {
		req->action = "capped";
		snprintf(req->rule, sizeof req->rule, "cap %s", first_capped);
	} else if (changed) {
		req->action = "rewritten";
		snprintf(req->rule, sizeof req->rule, "remove %zu, set %zu, defaults %zu",
		         o->n_remove, o->set ? json_object_size(o->set) : 0,
		         o->defaults ? json_object_size(o->defaults) : 0);
	}
	req->changed |= changed || capped;
	return POLICY_CONTINUE;
oom:
	req->status = 503;
	req->type = "server_error";
	req->code = "out_of_memory";
	snprintf(req->message, sizeof req->message, "out of memory");
	req->changed = true; /* half rewritten: never sent */
	return POLICY_REFUSE;
}

const struct policy_def policy_request_override = {
        .name = "request_override",
        .phases = POLICY_PHASE_REQUEST,
        .conf_parse = override_parse,
        .conf_free = override_free,
        .on_request = override_request,
        .reads_bytes = true,
};
