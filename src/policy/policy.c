/* policy.c — the table of built-in policies and the runner of a route's chain (policy_chain.h).
 *
 * The runner is what keeps src/request.c a plain sequence of calls: it walks the route's
 * plugins in order for each phase, carries a pending policy's decision back into the chain,
 * passes each policy's output text to the next, keeps one state per (choice, policy), and
 * collects every decision for the metrics, the access log and the alerts. It never
 * allocates for a route without plugins (the pipeline creates no run then), and per request
 * only what the route's policies need: the run, one state set per choice, two scratch
 * buffers for chained text.
 */
#include "sluice/policy_chain.h"

#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "sluice/alerts.h"
#include "sluice/log.h"
#include "sluice/policy_bytes.h"

extern const struct policy_def policy_prompt_guard;
extern const struct policy_def policy_prompt_decorator;
extern const struct policy_def policy_request_override;
extern const struct policy_def policy_request_limits;
extern const struct policy_def policy_response_guard;
extern const struct policy_def policy_loop_guard;
extern const struct policy_def policy_moderation;
extern const struct policy_def policy_external;

/* Adding a policy = one file in src/policy/ and one line here. */
static const struct policy_def *const builtins[] = {
        &policy_prompt_guard,   &policy_prompt_decorator, &policy_request_override,
        &policy_request_limits, &policy_response_guard,   &policy_loop_guard,
        &policy_moderation,     &policy_external,
};

#define N_BUILTINS (sizeof(builtins) / sizeof(builtins[0]))

const struct policy_def *policy_find(const char *name)
{
	for (size_t i = 0; name != NULL && i < N_BUILTINS; i++) {
		if (strcmp(builtins[i]->name, name) == 0)
			return builtins[i];
	}
	return NULL;
}

const struct policy_def *policy_at(size_t i)
{
	return i < N_BUILTINS ? builtins[i] : NULL;
}

/* ============================================================================================
 * Helpers for the modules.
 * ========================================================================================== */

/* Per thread: the match data and a match context with a JIT stack larger than PCRE2's 32 KiB
 * default, so that a pattern with nested groups over a long prompt does not fail with
 * PCRE2_ERROR_JIT_STACKLIMIT. Created on first use, freed when the thread exits. */
struct match_tls {
	pcre2_match_data *md;
	pcre2_match_context *mc;
	pcre2_jit_stack *stack;
};

#define JIT_STACK_START (32 * 1024)
#define JIT_STACK_MAX   (1024 * 1024)

static pthread_key_t tls_key;
static pthread_once_t tls_once = PTHREAD_ONCE_INIT;

static void tls_free(void *p)
{
	struct match_tls *t = p;
	pcre2_match_data_free(t->md);
	pcre2_match_context_free(t->mc);
	pcre2_jit_stack_free(t->stack);
	free(t);
}

static void tls_init(void)
{
	(void)pthread_key_create(&tls_key, tls_free);
}

static struct match_tls *match_tls(void)
{
	pthread_once(&tls_once, tls_init);
	struct match_tls *t = pthread_getspecific(tls_key);
	if (t != NULL)
		return t;
	t = calloc(1, sizeof *t);
	if (t == NULL)
		return NULL;
	t->md = pcre2_match_data_create(1, NULL);
	t->mc = pcre2_match_context_create(NULL);
	t->stack = pcre2_jit_stack_create(JIT_STACK_START, JIT_STACK_MAX, NULL);
	if (t->md == NULL || t->mc == NULL || t->stack == NULL ||
	    pthread_setspecific(tls_key, t) != 0) {
		tls_free(t);
		return NULL;
	}
	pcre2_jit_stack_assign(t->mc, NULL, t->stack);
	return t;
}

/* One per thread rather than per match: pcre2_match never allocates with it, and the guards
 * run on every request and stream event of their routes. */
pcre2_match_data *policy_match_data(void)
{
	struct match_tls *t = match_tls();
	return t ? t->md : NULL;
}

pcre2_match_context *policy_match_context(void)
{
	struct match_tls *t = match_tls();
	return t ? t->mc : NULL;
}

static bool utf8_cont(unsigned char c)
{
	return (c & 0xC0) == 0x80;
}

size_t policy_utf8_count(const char *s, size_t len)
{
	size_t n = 0;
	for (size_t i = 0; i < len; i++)
		n += !utf8_cont((unsigned char)s[i]);
	return n;
}

size_t policy_utf8_complete(const char *s, size_t len)
{
	/* Back over at most three continuation bytes to the lead byte of the last sequence. */
	size_t j = len;
	for (int k = 0; k < 4 && j > 0; k++) {
		unsigned char c = (unsigned char)s[--j];
		if (utf8_cont(c))
			continue;
		size_t need = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
		return j + need > len ? j : len;
	}
	return len; /* only continuation bytes: invalid, nothing to wait for */
}

size_t policy_utf8_advance(const char *s, size_t len, size_t n)
{
	size_t i = 0;
	while (n > 0 && i < len) {
		i++;
		while (i < len && utf8_cont((unsigned char)s[i]))
			i++;
		n--;
	}
	return i;
}

/* ============================================================================================
 * The run.
 * ========================================================================================== */

/* One choice of the answer: the policy_stream its policies see, and their states. */
struct choice {
	struct policy_stream s;
	struct policy_run *run;
	bool final;         /* its final text went through the chain */
	bool withheld;      /* a done-phase decision withholds its text */
	const char *finish; /* the finish_reason imposed on it (non-stream) */
	void *states[];     /* per route plugin; NULL for those without a response phase */
};

struct policy_run {
	const struct config_route *route; /* borrowed: the request holds the snapshot */
	struct policy_env env;
	bool streaming;

	/* request phase */
	struct policy_request req;
	size_t req_next; /* the plugin running (or to run) */
	bool req_pending;
	bool req_was_changed;          /* by the policies before the running one */
	unsigned req_changes;          /* policies that changed the body */
	bool req_spliceable;           /* ... and the last one described its change as bytes */
	const char *splice_before, *splice_after;
	policy_request_done_fn req_done;
	void *req_done_arg;
	/* a bytes chain (policy_run_request_bytes) */
	char *spliced;          /* req.bytes when a policy spliced them (owned) */
	bool bytes_changed;     /* a policy spliced them ... */
	bool tree_changed;      /* ... a policy changed the tree */
	json_t *tree;           /* parsed from req.bytes (owned until taken) */
	bool est_valid;         /* est is json_scan_estimate_prompt of the current scan */
	uint64_t est;

	/* response phases */
	struct choice **choices;
	size_t n_choices, cap_choices;
	struct evbuffer *scratch[2]; /* text between two policies of the chain */
	struct evbuffer *text;       /* the chat helpers' and flush's output */
	struct evbuffer *bytes;      /* chat_bytes.c's texts */
	void *bytes_slot;            /* chat_bytes.c's kept scan */
	bool stopped;                /* streams: the answer is over */
	const char *stop_reason;
	bool done_called;
	size_t done_pending;
	policy_done_fn done;
	void *done_arg;
	policy_stop_fn on_stop;
	void *on_stop_arg;

	/* decisions */
	size_t n_actions, dropped;

	/* Not cleared by policy_run_new: written before they are read. */
	struct json_scan scan; /* of req.bytes (policy_run_request_bytes) */
	struct policy_action actions[POLICY_MAX_ACTIONS]; /* the first n_actions */
};

static void record(struct policy_run *run, const char *policy, const char *action, const char *rule,
                   const char *alert)
{
	if (action == NULL)
		return;
	for (size_t i = 0; i < run->n_actions; i++) {
		struct policy_action *a = &run->actions[i];
		if (strcmp(a->policy, policy) == 0 && strcmp(a->action, action) == 0) {
			a->count++;
			return;
		}
	}
	log_debug("[%s] policy %s: %s (%s)", run->env.request_id ? run->env.request_id : "-",
	          policy, action, rule && rule[0] ? rule : "-");
	if (run->n_actions == POLICY_MAX_ACTIONS) {
		run->dropped++;
		return;
	}
	struct policy_action *a = &run->actions[run->n_actions++];
	a->policy = policy;
	a->action = action;
	snprintf(a->rule, sizeof a->rule, "%s", rule ? rule : "");
	a->alert = alert;
	a->count = 1;
	a->alerted = false;
}

struct policy_run *policy_run_new(const struct config_route *route, const struct policy_env *env,
                                  bool streaming)
{
	struct policy_run *run = malloc(sizeof *run);
	if (run == NULL)
		return NULL;
	memset(run, 0, offsetof(struct policy_run, scan));
	run->route = route;
	run->env = *env;
	run->streaming = streaming;
	return run;
}

static void choice_free(const struct config_route *rt, struct choice *c)
{
	for (size_t i = 0; i < rt->n_plugins; i++) {
		if (c->states[i] != NULL)
			rt->plugins[i].def->response_end(c->states[i]);
	}
	free(c);
}

void policy_run_free(struct policy_run *run)
{
	if (run == NULL)
		return;
	const struct config_route *rt = run->route;
	if (run->req_pending) {
		const struct config_plugin *pl = &rt->plugins[run->req_next];
		if (pl->def->request_cancel != NULL)
			pl->def->request_cancel(pl->conf, &run->req);
	}
	/* Ending a state cancels its pending work: no callback comes after this. */
	run->done = NULL;
	run->on_stop = NULL;
	for (size_t i = 0; i < run->n_choices; i++)
		choice_free(rt, run->choices[i]);
	free(run->choices);
	for (size_t i = 0; i < 2; i++)
		if (run->scratch[i] != NULL)
			evbuffer_free(run->scratch[i]);
	if (run->text != NULL)
		evbuffer_free(run->text);
	if (run->bytes != NULL)
		evbuffer_free(run->bytes);
	free(run->bytes_slot);
	json_decref(run->tree);
	free(run->spliced);
	free(run);
}

/* ---------------------------------------------------------------- request phase */

static void request_resumed(void *arg, enum policy_verdict v);

/* Before a policy's on_request: what it changes is told apart from what came before. */
static void request_before(struct policy_run *run)
{
	run->req_was_changed = run->req.changed;
	run->req.changed = false;
	run->req.splice_before = run->req.splice_after = NULL;
}

/* After it: one more change, described as bytes or not. */
static void request_after(struct policy_run *run)
{
	struct policy_request *req = &run->req;

	if (req->changed && req->body == NULL) {
		run->bytes_changed = true; /* policy_request_splice did it */
	} else if (req->changed) {
		run->tree_changed = true;
		run->req_changes++;
		run->req_spliceable = req->proto == PROTO_CHAT &&
		                      (req->splice_before != NULL || req->splice_after != NULL);
		run->splice_before = req->splice_before;
		run->splice_after = req->splice_after;
	}
	req->changed = req->changed || run->req_was_changed;
}

bool policy_run_request_splice(const struct policy_run *run, const char **before,
                               const char **after)
{
	if (run->req_changes != 1 || !run->req_spliceable || run->bytes_changed)
		return false;
	*before = run->splice_before;
	*after = run->splice_after;
	return true;
}

/* From req_next on; a pending policy stops the walk until it resumes. */
static enum policy_verdict request_chain(struct policy_run *run)
{
	const struct config_route *rt = run->route;
	struct policy_request *req = &run->req;

	for (; run->req_next < rt->n_plugins; run->req_next++) {
		const struct config_plugin *pl = &rt->plugins[run->req_next];
		if (!(pl->phases & POLICY_PHASE_REQUEST) || pl->def->on_request == NULL)
			continue;
		req->action = NULL;
		req->rule[0] = '\0';
		req->resume = request_resumed;
		req->resume_arg = run;
		req->pending = NULL;
		if (req->body == NULL && !pl->def->reads_bytes && policy_request_tree(req) == NULL) {
			req->status = 503;
			req->type = "server_error";
			req->code = "out_of_memory";
			snprintf(req->message, sizeof req->message, "out of memory");
			return POLICY_REFUSE;
		}
		request_before(run);
		enum policy_verdict v = pl->def->on_request(pl->conf, req);
		if (v == POLICY_PENDING) {
			run->req_pending = true;
			return POLICY_PENDING;
		}
		request_after(run);
		record(run, pl->name, req->action, req->rule, NULL);
		if (v == POLICY_REFUSE)
			return POLICY_REFUSE;
	}
	return POLICY_CONTINUE;
}

static void request_resumed(void *arg, enum policy_verdict v)
{
	struct policy_run *run = arg;
	const struct config_plugin *pl = &run->route->plugins[run->req_next];

	if (!run->req_pending)
		return; /* a second call: the contract says once */
	run->req_pending = false;
	run->req.pending = NULL;
	request_after(run);
	record(run, pl->name, run->req.action, run->req.rule, NULL);
	if (v != POLICY_REFUSE) {
		run->req_next++;
		v = request_chain(run);
		if (v == POLICY_PENDING)
			return;
	}
	if (run->req_done != NULL)
		run->req_done(run->req_done_arg, v); /* may free run */
}

enum policy_verdict policy_run_request(struct policy_run *run, enum proto proto, json_t *body,
                                       policy_request_done_fn done, void *arg)
{
	memset(&run->req, 0, sizeof run->req);
	run->req.env = &run->env;
	run->req.proto = proto;
	run->req.body = body;
	run->req_next = 0;
	run->req_changes = 0;
	run->req_spliceable = false;
	run->req_done = done;
	run->req_done_arg = arg;
	return request_chain(run);
}

enum policy_verdict policy_run_request_bytes(struct policy_run *run, enum proto proto,
                                             const char *bytes, size_t len,
                                             const struct json_scan *scan,
                                             policy_request_done_fn done, void *arg)
{
	run->scan = *scan;
	memset(&run->req, 0, sizeof run->req);
	run->req.env = &run->env;
	run->req.proto = proto;
	run->req.bytes = bytes;
	run->req.bytes_len = len;
	run->req.scan = &run->scan;
	run->req_next = 0;
	run->req_changes = 0;
	run->req_spliceable = false;
	run->req_done = done;
	run->req_done_arg = arg;
	return request_chain(run);
}

json_t *policy_request_tree(struct policy_request *req)
{
	struct policy_run *run = (struct policy_run *)((char *)req - offsetof(struct policy_run, req));

	if (req->body == NULL && req->bytes != NULL) {
		run->tree = json_loadb(req->bytes, req->bytes_len,
		                       JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);
		if (!json_is_object(run->tree)) {
			json_decref(run->tree);
			run->tree = NULL;
		}
		req->body = run->tree;
	}
	return req->body;
}

static bool json_ws(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

char *policy_splice_messages(const char *body, size_t len, const struct json_scan_value *messages,
                             const char *before, const char *after, size_t *out_len)
{
	const char *end = body + len;
	const char *open = messages->p, *close = open + messages->len - 1; /* its ']' */
	const char *q = open + 1;
	while (q < close && json_ws(*q))
		q++;
	bool empty = q == close;
	size_t bl = before ? strlen(before) : 0, al = after ? strlen(after) : 0;
	char *buf = malloc(len + bl + al + 3);
	if (buf == NULL)
		return NULL;
	char *o = buf;
	size_t head = (size_t)(open + 1 - body), mid = (size_t)(close - (open + 1));
	memcpy(o, body, head);
	o += head;
	memcpy(o, before ? before : "", bl);
	o += bl;
	if (bl > 0 && (!empty || al > 0))
		*o++ = ',';
	memcpy(o, open + 1, mid);
	o += mid;
	if (al > 0 && !empty)
		*o++ = ',';
	memcpy(o, after ? after : "", al);
	o += al;
	memcpy(o, close, (size_t)(end - close));
	o += end - close;
	*o = '\0';
	*out_len = (size_t)(o - buf);
	return buf;
}

bool policy_request_splice(struct policy_request *req, const char *before, const char *after)
{
	struct policy_run *run = (struct policy_run *)((char *)req - offsetof(struct policy_run, req));
	const struct json_scan_value *m;
	size_t out_len;

	if (req->body != NULL || req->scan == NULL ||
	    (m = &req->scan->member[JSON_SCAN_MESSAGES])->type != JSON_SCAN_ARRAY)
		return false;
	const char *body = req->bytes, *open = m->p;
	char *buf = policy_splice_messages(body, req->bytes_len, m, before, after, &out_len);
	if (buf == NULL)
		return false;
	/* The scan of the new bytes without a second pass: what came before the array is
	 * where it was, the array grew, and what came after it moved by as much. */
	size_t grew = out_len - req->bytes_len;
	for (size_t i = 0; i < JSON_SCAN_N_MEMBERS; i++) {
		struct json_scan_value *v = &run->scan.member[i];
		if (v->type == JSON_SCAN_ABSENT)
			continue;
		if (v->p == open)
			v->len += grew;
		v->p = buf + (v->p - body) + (v->p > open ? grew : 0);
	}
	run->est_valid = false;
	free(run->spliced);
	run->spliced = buf;
	req->bytes = buf;
	req->bytes_len = out_len;
	return true;
}

uint64_t policy_request_estimate(struct policy_request *req)
{
	struct policy_run *run = (struct policy_run *)((char *)req - offsetof(struct policy_run, req));

	if (!run->est_valid) {
		run->est = json_scan_estimate_prompt(req->scan);
		run->est_valid = true;
	}
	return run->est;
}

bool policy_run_request_estimate(const struct policy_run *run, uint64_t *est)
{
	if (!run->est_valid || run->tree_changed || run->req.scan == NULL)
		return false;
	*est = run->est;
	return true;
}

json_t *policy_run_request_take_tree(struct policy_run *run)
{
	json_t *t = run->tree;
	run->tree = NULL;
	return t;
}

bool policy_run_request_bytes_result(struct policy_run *run, char **bytes, size_t *len,
                                     const struct json_scan **scan)
{
	if (!run->bytes_changed || run->tree_changed || run->spliced == NULL)
		return false;
	*bytes = run->spliced;
	*len = run->req.bytes_len;
	*scan = run->req.scan;
	run->spliced = NULL;
	return true;
}

const struct policy_request *policy_run_request_outcome(const struct policy_run *run)
{
	return &run->req;
}

/* ---------------------------------------------------------------- response phases */

static void stream_stop(struct policy_stream *s, const char *policy, const char *action,
                        const char *finish_reason);
static void stream_resume(struct policy_stream *s);
static void stream_note(struct policy_stream *s, const char *policy, const char *action,
                        const char *rule);

static struct choice *find_choice(struct policy_run *run, unsigned index)
{
	for (size_t i = 0; i < run->n_choices; i++) {
		if (run->choices[i]->s.choice == index)
			return run->choices[i];
	}
	return NULL;
}

/* The choice's states, created on its first text. NULL when out of memory. */
static struct choice *get_choice(struct policy_run *run, unsigned index)
{
	const struct config_route *rt = run->route;
	struct choice *c = find_choice(run, index);

	if (c != NULL)
		return c;
	if (run->scratch[0] == NULL && (run->scratch[0] = evbuffer_new()) == NULL)
		return NULL;
	if (run->scratch[1] == NULL && (run->scratch[1] = evbuffer_new()) == NULL)
		return NULL;
	if (run->n_choices == run->cap_choices) {
		size_t cap = run->cap_choices ? 2 * run->cap_choices : 1;
		struct choice **v = realloc(run->choices, cap * sizeof *v);
		if (v == NULL)
			return NULL;
		run->choices = v;
		run->cap_choices = cap;
	}
	c = calloc(1, sizeof *c + rt->n_plugins * sizeof c->states[0]);
	if (c == NULL)
		return NULL;
	c->run = run;
	c->s.env = &run->env;
	c->s.streaming = run->streaming;
	c->s.choice = index;
	c->s.stop = stream_stop;
	c->s.resume = stream_resume;
	c->s.note = stream_note;
	c->s.pipeline = c;
	for (size_t i = 0; i < rt->n_plugins; i++) {
		const struct config_plugin *pl = &rt->plugins[i];
		if (!(pl->phases & POLICY_PHASE_RESPONSE) || pl->def->response_begin == NULL)
			continue;
		c->states[i] = pl->def->response_begin(pl->conf, &c->s, index);
		if (c->states[i] == NULL) {
			choice_free(rt, c);
			return NULL;
		}
	}
	run->choices[run->n_choices++] = c;
	return c;
}

/* Field by field: zeroing the whole struct (its rule buffer) costs more than the call on
 * short stream events. */
static void text_init(struct policy_text *t, unsigned choice, const char *text, size_t len,
                      bool final, struct evbuffer *out)
{
	t->choice = choice;
	t->text = text;
	t->len = len;
	t->final = final;
	t->out = out;
	t->finish_reason = NULL;
	t->action = NULL;
	t->rule[0] = '\0';
	t->alert = NULL;
	t->passed = false;
}

static size_t last_response_plugin(const struct choice *c, size_t n)
{
	size_t last = SIZE_MAX;
	for (size_t i = 0; i < n; i++)
		if (c->states[i] != NULL)
			last = i;
	return last;
}

/* text through every response policy of the route, in order, into out — or, when every
 * policy passed it unchanged and ref is not NULL, nowhere: *ref_passed is set and out stays
 * as it was. */
static enum policy_verdict chain_text(struct policy_run *run, struct choice *c, const char *text,
                                      size_t len, bool final, struct evbuffer *out,
                                      bool *ref_passed)
{
	const struct config_route *rt = run->route;
	size_t last = last_response_plugin(c, rt->n_plugins);
	struct evbuffer *prev = NULL;
	const char *finish = NULL;
	int flip = 0;
	bool passed = true; /* text is still the caller's: no policy wrote anything */

	if (ref_passed != NULL)
		*ref_passed = false;
	for (size_t i = 0; last != SIZE_MAX && i <= last; i++) {
		const struct config_plugin *pl = &rt->plugins[i];
		if (c->states[i] == NULL)
			continue;
		bool fin = final || finish != NULL;
		struct evbuffer *dst = i == last ? out : run->scratch[flip];
		if (len > 0 || fin) {
			struct policy_text t;
			text_init(&t, c->s.choice, text, len, fin, dst);
			enum policy_verdict v = pl->def->on_response_text(c->states[i], &t);
			record(run, pl->name, t.action, t.rule, t.alert);
			if (v == POLICY_STOP && finish == NULL)
				finish = t.finish_reason ? t.finish_reason : "content_filter";
			if (t.passed) {
				/* text goes on as it is: into out only at the end, when asked */
				if (i == last && ref_passed != NULL && passed)
					*ref_passed = true;
				else if (i == last && evbuffer_add(out, text, len) != 0)
					return POLICY_REFUSE;
				continue;
			}
		} else {
			continue; /* nothing in, nothing out: the next gets the same (empty) text */
		}
		if (prev != NULL)
			evbuffer_drain(prev, evbuffer_get_length(prev));
		prev = NULL;
		passed = false;
		if (i != last) {
			len = evbuffer_get_length(dst);
			text = len ? (const char *)evbuffer_pullup(dst, -1) : "";
			if (text == NULL)
				return POLICY_REFUSE;
			prev = dst;
			flip ^= 1;
		}
	}
	if (prev != NULL) /* a policy after it passed its text on: out has its copy */
		evbuffer_drain(prev, evbuffer_get_length(prev));
	if (final || finish != NULL)
		c->final = true;
	if (finish == NULL)
		return POLICY_CONTINUE;
	c->finish = finish;
	if (run->streaming && !run->stopped) {
		run->stopped = true;
		run->stop_reason = finish;
	}
	return POLICY_STOP;
}

enum policy_verdict policy_run_text(struct policy_run *run, unsigned choice, const char *text,
                                    size_t len, bool final, struct evbuffer *out)
{
	if (run->stopped)
		return POLICY_STOP;
	if (choice >= POLICY_MAX_CHOICES)
		return POLICY_REFUSE;
	if (len == 0 && !final)
		return POLICY_CONTINUE;
	struct choice *c = get_choice(run, choice);
	if (c == NULL)
		return POLICY_REFUSE;
	if (c->final)
		return c->finish ? POLICY_STOP : POLICY_CONTINUE; /* nothing after the end */
	return chain_text(run, c, text ? text : "", len, final, out, NULL);
}

enum policy_verdict policy_run_text_ref(struct policy_run *run, unsigned choice,
                                        const char *text, size_t len, bool final,
                                        struct evbuffer *out, bool *passed)
{
	*passed = false;
	if (run->stopped)
		return POLICY_STOP;
	if (choice >= POLICY_MAX_CHOICES)
		return POLICY_REFUSE;
	if (len == 0 && !final) {
		*passed = true;
		return POLICY_CONTINUE;
	}
	struct choice *c = get_choice(run, choice);
	if (c == NULL)
		return POLICY_REFUSE;
	if (c->final)
		return c->finish ? POLICY_STOP : POLICY_CONTINUE; /* nothing after the end */
	return chain_text(run, c, text ? text : "", len, final, out, passed);
}

static struct evbuffer *text_buffer(struct policy_run *run)
{
	if (run->text == NULL)
		run->text = evbuffer_new();
	else if (evbuffer_get_length(run->text) > 0)
		evbuffer_drain(run->text, evbuffer_get_length(run->text));
	return run->text;
}

struct evbuffer *policy_run_text_out(struct policy_run *run)
{
	return text_buffer(run);
}

struct evbuffer *policy_run_bytes_buffer(struct policy_run *run)
{
	if (run->bytes == NULL)
		run->bytes = evbuffer_new();
	else if (evbuffer_get_length(run->bytes) > 0)
		evbuffer_drain(run->bytes, evbuffer_get_length(run->bytes));
	return run->bytes;
}

void **policy_run_bytes_slot(struct policy_run *run)
{
	return &run->bytes_slot;
}

bool policy_run_withheld(const struct policy_run *run)
{
	for (size_t i = 0; i < run->n_choices; i++)
		if (run->choices[i]->withheld)
			return true;
	return false;
}

enum policy_verdict policy_run_flush(struct policy_run *run, policy_flush_fn emit, void *arg)
{
	for (size_t i = 0; i < run->n_choices && !run->stopped; i++) {
		struct choice *c = run->choices[i];
		if (c->final)
			continue;
		struct evbuffer *out = text_buffer(run);
		if (out == NULL)
			return POLICY_REFUSE;
		enum policy_verdict v = chain_text(run, c, "", 0, true, out, NULL);
		size_t n = evbuffer_get_length(out);
		if (n > 0 && emit != NULL)
			emit(arg, c->s.choice, (const char *)evbuffer_pullup(out, -1), n);
		if (v != POLICY_CONTINUE)
			return v;
	}
	return run->stopped ? POLICY_STOP : POLICY_CONTINUE;
}

enum policy_verdict policy_run_done(struct policy_run *run, policy_done_fn done, void *arg)
{
	const struct config_route *rt = run->route;
	bool stopped = run->stopped;

	run->done_called = true;
	run->done = done;
	run->done_arg = arg;
	for (size_t k = 0; k < run->n_choices; k++) {
		struct choice *c = run->choices[k];
		for (size_t i = 0; i < rt->n_plugins; i++) {
			const struct config_plugin *pl = &rt->plugins[i];
			if (c->states[i] == NULL || pl->def->on_response_done == NULL)
				continue;
			struct policy_text t;
			text_init(&t, c->s.choice, "", 0, true, NULL);
			enum policy_verdict v = pl->def->on_response_done(c->states[i], &t);
			record(run, pl->name, t.action, t.rule, t.alert);
			if (v == POLICY_PENDING) {
				run->done_pending++;
			} else if (v == POLICY_STOP && !c->withheld) {
				c->withheld = true;
				c->finish = t.finish_reason ? t.finish_reason : "content_filter";
				if (run->streaming && run->stop_reason == NULL)
					run->stop_reason = c->finish;
				stopped = true;
			}
		}
	}
	if (run->done_pending > 0)
		return POLICY_PENDING;
	run->done = NULL;
	return stopped ? POLICY_STOP : POLICY_CONTINUE;
}

static void stream_stop(struct policy_stream *s, const char *policy, const char *action,
                        const char *finish_reason)
{
	struct choice *c = s->pipeline;
	struct policy_run *run = c->run;

	if (finish_reason == NULL)
		finish_reason = "content_filter";
	if (run->streaming && !run->done_called) {
		if (run->stopped)
			return;
		record(run, policy, action, "", NULL);
		run->stopped = true;
		run->stop_reason = finish_reason;
		if (run->on_stop != NULL)
			run->on_stop(run->on_stop_arg, finish_reason); /* may free run */
		return;
	}
	if (c->withheld)
		return;
	record(run, policy, action, "", NULL);
	c->withheld = true;
	c->finish = finish_reason;
	if (run->streaming && run->stop_reason == NULL)
		run->stop_reason = finish_reason;
}

static void stream_note(struct policy_stream *s, const char *policy, const char *action,
                        const char *rule)
{
	struct choice *c = s->pipeline;
	record(c->run, policy, action, rule, NULL);
}

static void stream_resume(struct policy_stream *s)
{
	struct choice *c = s->pipeline;
	struct policy_run *run = c->run;

	if (run->done_pending == 0)
		return;
	if (--run->done_pending > 0 || run->done == NULL)
		return;
	policy_done_fn done = run->done;
	run->done = NULL;
	done(run->done_arg); /* may free run */
}

void policy_run_on_stop(struct policy_run *run, policy_stop_fn fn, void *arg)
{
	run->on_stop = fn;
	run->on_stop_arg = arg;
}

const char *policy_run_finish_reason(const struct policy_run *run, unsigned choice)
{
	if (run->streaming)
		return run->stop_reason;
	for (size_t i = 0; i < run->n_choices; i++) {
		if (run->choices[i]->s.choice == choice)
			return run->choices[i]->finish;
	}
	return NULL;
}

const char *policy_run_stopped(const struct policy_run *run)
{
	return run->stop_reason;
}

/* ---------------------------------------------------------------- the pivot's shapes */

static unsigned choice_index(const json_t *choice, size_t pos)
{
	const json_t *v = json_object_get(choice, "index");
	if (json_is_integer(v) && json_integer_value(v) >= 0 &&
	    json_integer_value(v) < POLICY_MAX_CHOICES)
		return (unsigned)json_integer_value(v);
	return json_is_integer(v) ? POLICY_MAX_CHOICES : (unsigned)pos;
}

/* Puts out's text into obj[key] unless it is what was there. */
static bool set_text(json_t *obj, const char *key, const json_t *old, struct evbuffer *out)
{
	size_t n = evbuffer_get_length(out);
	const char *p = n ? (const char *)evbuffer_pullup(out, -1) : "";
	if (p == NULL)
		return false;
	if (json_is_string(old) && json_string_length(old) == n &&
	    memcmp(json_string_value(old), p, n) == 0)
		return true;
	return json_object_set_new(obj, key, json_stringn(p, n)) == 0;
}

enum policy_verdict policy_run_chat_completion(struct policy_run *run, json_t *completion)
{
	json_t *choices = json_object_get(completion, "choices"), *ch;
	size_t i;
	enum policy_verdict result = POLICY_CONTINUE;

	json_array_foreach(choices, i, ch)
	{
		json_t *msg = json_object_get(ch, "message");
		json_t *content = json_object_get(msg, "content");
		if (!json_is_string(content))
			continue; /* tool calls only, or a refusal: no text to look at */
		unsigned idx = choice_index(ch, i);
		struct evbuffer *out = text_buffer(run);
		if (out == NULL)
			return POLICY_REFUSE;
		enum policy_verdict v = policy_run_text(run, idx, json_string_value(content),
		                                        json_string_length(content), true, out);
		if (v == POLICY_REFUSE || !set_text(msg, "content", content, out))
			return POLICY_REFUSE;
		if (v == POLICY_STOP) {
			const char *fr = policy_run_finish_reason(run, idx);
			json_object_set_new(ch, "finish_reason", json_string(fr));
			result = POLICY_STOP;
		}
	}
	return result;
}

void policy_run_chat_completion_done(struct policy_run *run, json_t *completion)
{
	json_t *choices = json_object_get(completion, "choices"), *ch;
	size_t i;

	json_array_foreach(choices, i, ch)
	{
		struct choice *c = find_choice(run, choice_index(ch, i));
		if (c == NULL || !c->withheld)
			continue;
		json_t *msg = json_object_get(ch, "message");
		if (json_is_object(msg))
			json_object_set_new(msg, "content", json_string(""));
		json_object_set_new(ch, "finish_reason", json_string(c->finish));
	}
}

enum policy_verdict policy_run_chat_chunk(struct policy_run *run, json_t *chunk)
{
	json_t *choices = json_object_get(chunk, "choices"), *ch;
	size_t i;
	enum policy_verdict result = POLICY_CONTINUE;

	json_array_foreach(choices, i, ch)
	{
		json_t *delta = json_object_get(ch, "delta");
		json_t *content = json_object_get(delta, "content");
		json_t *fr = json_object_get(ch, "finish_reason");
		bool final = json_is_string(fr);
		if (!json_is_string(content) && !final)
			continue;
		struct evbuffer *out = text_buffer(run);
		if (out == NULL)
			return POLICY_REFUSE;
		unsigned idx = choice_index(ch, i);
		enum policy_verdict v =
		        json_is_string(content)
		                ? policy_run_text(run, idx, json_string_value(content),
		                                  json_string_length(content), final, out)
		                : policy_run_text(run, idx, "", 0, final, out);
		if (v == POLICY_REFUSE)
			return v;
		if ((json_is_string(content) || evbuffer_get_length(out) > 0) &&
		    (!json_is_object(delta) || !set_text(delta, "content", content, out)))
			return POLICY_REFUSE;
		if (v == POLICY_STOP) {
			/* The gateway's finish_reason ends the stream, not the upstream's. */
			if (final)
				json_object_set_new(ch, "finish_reason", json_null());
			result = POLICY_STOP;
		}
	}
	return result;
}

/* ---------------------------------------------------------------- decisions */

size_t policy_run_actions(const struct policy_run *run, const struct policy_action **out,
                          size_t *dropped)
{
	*out = run->actions;
	if (dropped != NULL)
		*dropped = run->dropped;
	return run->n_actions;
}

void policy_run_emit_alerts(struct policy_run *run, json_t *extra)
{
	for (size_t i = 0; i < run->n_actions; i++) {
		struct policy_action *a = &run->actions[i];
		if (a->alert == NULL || a->alerted)
			continue;
		a->alerted = true;
		log_warn("[%s] route %s: policy %s %s (%s)",
		         run->env.request_id ? run->env.request_id : "-",
		         run->env.route ? run->env.route : "-", a->policy, a->action, a->rule);
		json_t *f = json_pack("{s:s?, s:s?, s:s?, s:s, s:s, s:s, s:I}", "request_id",
		                      run->env.request_id, "route", run->env.route, "consumer",
		                      run->env.consumer, "policy", a->policy, "action", a->action,
		                      "rule", a->rule, "count", (json_int_t)a->count);
		if (f != NULL && json_is_object(extra))
			json_object_update(f, extra);
		alerts_emit(a->alert, f);
	}
	json_decref(extra);
}
