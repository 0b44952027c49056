/* prompt_decorator.c — adds the route's messages before and after the client's.
 *
 *   prompt_decorator: { prepend: [{role, content}...], append: [{role, content}...] }
 *
 * The upstream sees them like the client's own (prompt.h says where each protocol keeps
 * them); usage and quotas count them, since the estimate is taken from the decorated body.
 * A request whose protocol has no message list (legacy completions, embeddings) cannot be
 * decorated and is refused rather than sent without the route's messages.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/config_section.h"
#include "sluice/policy.h"
#include "sluice/policy_bytes.h"
#include "sluice/prompt.h"

struct decorator_conf {
	struct prompt_message *prepend; /* texts owned */
	size_t n_prepend;
	struct prompt_message *append;
	size_t n_append;
	/* the same messages as chat JSON array members (policy_request.splice_*) */
	char *chat_before, *chat_after;
};

static const char *const keys[] = {"prepend", "append", NULL};
static const char *const message_keys[] = {"role", "content", NULL};
/* Roles a decoration may have: a tool message answers a call the client made. */
static const char *const roles[] = {"system", "developer", "user", "assistant", NULL};
_Static_assert(PROMPT_SYSTEM == 0 && PROMPT_DEVELOPER == 1 && PROMPT_USER == 2 &&
                       PROMPT_ASSISTANT == 3,
               "roles[] is indexed like enum prompt_role");

static void free_messages(struct prompt_message *v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free((char *)v[i].text);
	free(v);
}

static void decorator_free(void *conf)
{
	struct decorator_conf *d = conf;
	if (d == NULL)
		return;
	free_messages(d->prepend, d->n_prepend);
	free_messages(d->append, d->n_append);
	free(d->chat_before);
	free(d->chat_after);
	free(d);
}

static void parse_messages(struct config_section *sec, const struct cnode *v, const char *path,
                           struct prompt_message **out, size_t *n_out)
{
	static const char *const required[] = {"role", "content", NULL};
	char p[CSEC_PATH_LEN], kp[CSEC_PATH_LEN];
	const struct cnode *seq = csec_seq(sec, v, path);

	if (seq == NULL || seq->n == 0)
		return;
	*out = calloc(seq->n, sizeof **out);
	if (*out == NULL)
		return;
	for (size_t i = 0; i < seq->n; i++) {
		const char *ip = csec_path_index(p, path, i);
		const struct cnode *m = csec_map(sec, seq->kids[i], ip);
		if (m == NULL)
			continue;
		csec_keys(sec, m, ip, message_keys, required);
		const struct cnode *rv = csec_get(m, "role"), *cv = csec_get(m, "content");
		int role = -1;
		if (rv != NULL)
			csec_name(sec, rv, csec_path_key(kp, ip, "role"), roles, "role", &role);
		const char *content =
		        cv ? csec_string(sec, cv, csec_path_key(kp, ip, "content"), 0) : NULL;
		if (content != NULL) {
			json_t *check = json_string(content);
			if (check == NULL) {
				csec_error(sec, cv, kp, "must be valid UTF-8");
				content = NULL;
			}
			json_decref(check);
		}
		if (role < 0 || content == NULL)
			continue;
		char *text = strdup(content);
		if (text == NULL)
			continue;
		(*out)[*n_out].role = (enum prompt_role)role;
		(*out)[*n_out].text = text;
		(*n_out)++;
	}
}

/* "{"role":...,"content":...},..." — what insert_chat (prompt.c) adds, serialised once. NULL
 * for none (or out of memory: the body is then re-serialised). */
static char *chat_members(const struct prompt_message *v, size_t n)
{
	json_t *a = n ? json_array() : NULL;
	char *s = NULL;

	for (size_t i = 0; a != NULL && i < n; i++)
		json_array_append_new(a, json_pack("{s:s, s:s}", "role", prompt_role_names[v[i].role],
		                                   "content", v[i].text));
	if (a != NULL && json_array_size(a) == n)
		s = json_dumps(a, JSON_COMPACT);
	json_decref(a);
	if (s != NULL) { /* without the brackets */
		size_t len = strlen(s);
		memmove(s, s + 1, len - 2);
		s[len - 2] = '\0';
	}
	return s;
}

static void *decorator_parse(struct config_section *sec, const struct cnode *m, const char *path)
{
	char p[CSEC_PATH_LEN];
	size_t failed = csec_error_count(sec);
	struct decorator_conf *d = calloc(1, sizeof *d);
	const struct cnode *v;

	if (d == NULL)
		return NULL;
	csec_keys(sec, m, path, keys, NULL);
	if ((v = csec_get(m, "prepend")) != NULL)
		parse_messages(sec, v, csec_path_key(p, path, "prepend"), &d->prepend,
		               &d->n_prepend);
	if ((v = csec_get(m, "append")) != NULL)
		parse_messages(sec, v, csec_path_key(p, path, "append"), &d->append, &d->n_append);
	if (csec_error_count(sec) != failed) {
		decorator_free(d);
		return NULL;
	}
	d->chat_before = chat_members(d->prepend, d->n_prepend);
	d->chat_after = chat_members(d->append, d->n_append);
	return d;
}

static enum policy_verdict decorator_request(const void *conf, struct policy_request *req)
{
	const struct decorator_conf *d = conf;
	const char *why = NULL;

	if (d->n_prepend + d->n_append == 0)
		return POLICY_CONTINUE;
	/* The client's bytes, spliced: the chat messages were serialised once, at load. */
	if (req->body == NULL && req->proto == PROTO_CHAT &&
	    (d->n_prepend == 0 || d->chat_before != NULL) &&
	    (d->n_append == 0 || d->chat_after != NULL) &&
	    policy_request_splice(req, d->chat_before, d->chat_after)) {
		req->changed = true;
		req->action = "decorated";
		snprintf(req->rule, sizeof req->rule, "prepend %zu, append %zu", d->n_prepend,
		         d->n_append);
		return POLICY_CONTINUE;
	}
	if (policy_request_tree(req) == NULL) {
		req->status = 503;
		req->type = "server_error";
		req->code = "out_of_memory";
		snprintf(req->message, sizeof req->message, "out of memory");
		return POLICY_REFUSE;
	}
	if (!prompt_insert(req->body, req->proto, d->prepend, d->n_prepend, true, &why) ||
	    !prompt_insert(req->body, req->proto, d->append, d->n_append, false, &why)) {
		req->status = 400;
		req->code = "prompt_decoration_failed";
		req->action = "refused";
		snprintf(req->message, sizeof req->message,
		         "this route adds messages to every request, and this one cannot take "
		         "them: %s",
		         why);
		snprintf(req->rule, sizeof req->rule, "%s", why);
		return POLICY_REFUSE;
	}
	req->changed = true;
	if (req->proto == PROTO_CHAT && (d->n_prepend == 0 || d->chat_before != NULL) &&
	    (d->n_append == 0 || d->chat_after != NULL)) {
		req->splice_before = d->chat_before;
		req->splice_after = d->chat_after;
	}
	req->action = "decorated";
	snprintf(req->rule, sizeof req->rule, "prepend %zu, append %zu", d->n_prepend, d->n_append);
	return POLICY_CONTINUE;
}

const struct policy_def policy_prompt_decorator = {
        .name = "prompt_decorator",
        .phases = POLICY_PHASE_REQUEST,
        .conf_parse = decorator_parse,
        .conf_free = decorator_free,
        .on_request = decorator_request,
        .reads_bytes = true,
};
