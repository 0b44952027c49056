/* params.c — per-request overrides of sluice-mockllm: x-mock-* headers, the body's "mock" object.
 *
 * The body wins over a header, a header over the flag. Invalid values are ignored. Of the
 * output controls (content, chunks, repeat) the last layer that sets one wins: setting one
 * clears the others. */
#include "mockllm.h"

#include <limits.h>
#include <string.h>
#include <strings.h>

static const struct {
	const char *name;
	enum mock_fault fault;
} FAULTS[] = {
        {"none", FAULT_NONE},
        {"reset", FAULT_RESET},
        {"stall", FAULT_STALL},
        {"garbage", FAULT_GARBAGE},
        {"junk_sse", FAULT_JUNK_SSE},
        {"big_event", FAULT_BIG_EVENT},
        {"endless_headers", FAULT_ENDLESS_HEADERS},
};

int params_fault(const char *name, size_t len, int *out)
{
	for (size_t i = 0; i < sizeof(FAULTS) / sizeof(FAULTS[0]); i++) {
		if (strlen(FAULTS[i].name) == len && !strncasecmp(name, FAULTS[i].name, len)) {
			*out = (int)FAULTS[i].fault;
			return 0;
		}
	}
	return -1;
}

static void set_content(struct mock_params *p, const char *s, size_t n)
{
	p->content = s;
	p->content_len = n;
	p->chunks = NULL;
	p->repeat = NULL;
}

static void set_chunks(struct mock_params *p, json_t *a)
{
	p->chunks = a;
	p->content = NULL;
	p->repeat = NULL;
}

static void set_repeat(struct mock_params *p, const char *s, size_t n)
{
	p->repeat = s;
	p->repeat_len = n;
	p->content = NULL;
	p->chunks = NULL;
}

static int is_string_array(json_t *v)
{
	size_t i;
	json_t *x;

	if (!json_is_array(v))
		return 0;
	json_array_foreach(v, i, x) if (!json_is_string(x)) return 0;
	return 1;
}

/* A tool-call control: {"name": "..."} with optional "arguments", or a non-empty array of those. */
static int is_tool_call(json_t *v)
{
	size_t i;
	json_t *x;

	if (json_is_object(v))
		return json_is_string(json_object_get(v, "name"));
	if (!json_is_array(v) || json_array_size(v) == 0)
		return 0;
	json_array_foreach(v, i, x) if (!json_is_object(x) ||
	                                !json_is_string(json_object_get(x, "name"))) return 0;
	return 1;
}

/* JSON from a header value; kept alive in *hold until the request is handled. */
static json_t *header_json(const char *v, json_t **hold)
{
	json_t *j = json_loadb(v, strlen(v), 0, NULL);

	if (j == NULL)
		return NULL;
	if (*hold == NULL)
		*hold = json_array();
	if (*hold == NULL || json_array_append_new(*hold, j) != 0) {
		if (*hold == NULL)
			json_decref(j);
		return NULL;
	}
	return j;
}

void params_headers(struct evhttp_request *req, struct mock_params *p, json_t **hold)
{
	const struct evkeyvalq *h = evhttp_request_get_input_headers(req);

	for (const struct evkeyval *kv = h->tqh_first; kv != NULL; kv = kv->next.tqe_next) {
		const char *k, *v = kv->value;
		long l;
		double d;
		int b;

		if (strncasecmp(kv->key, "x-mock-", 7) != 0)
			continue;
		k = kv->key + 7;
		if (!strcasecmp(k, "tokens")) {
			if (!parse_long(v, 0, MAX_TOKENS, &l))
				p->tokens = l;
		} else if (!strcasecmp(k, "ttft-ms")) {
			if (!parse_long(v, 0, MAX_DELAY_MS, &l))
				p->ttft_ms = l;
		} else if (!strcasecmp(k, "itl-ms")) {
			if (!parse_long(v, 0, MAX_DELAY_MS, &l))
				p->itl_ms = l;
		} else if (!strcasecmp(k, "status")) {
			if (!parse_long(v, 0, 599, &l))
				p->status = (int)l;
		} else if (!strcasecmp(k, "error-rate")) {
			if (!parse_double(v, 0, 1, &d))
				p->error_rate = d;
		} else if (!strcasecmp(k, "hang")) {
			if (!parse_bool(v, &b))
				p->hang = b;
		} else if (!strcasecmp(k, "disconnect-after")) {
			if (!parse_long(v, -1, MAX_TOKENS, &l))
				p->disconnect_after = l;
		} else if (!strcasecmp(k, "no-usage")) {
			if (!parse_bool(v, &b))
				p->no_usage = b;
		} else if (!strcasecmp(k, "retry-after")) {
			if (!parse_long(v, -1, INT_MAX, &l))
				p->retry_after = l;
		} else if (!strcasecmp(k, "content")) {
			set_content(p, v, strlen(v));
		} else if (!strcasecmp(k, "chunks")) {
			json_t *j = header_json(v, hold);

			if (is_string_array(j))
				set_chunks(p, j);
		} else if (!strcasecmp(k, "repeat")) {
			set_repeat(p, v, strlen(v));
		} else if (!strcasecmp(k, "times")) {
			if (!parse_long(v, 0, MAX_TOKENS, &l))
				p->times = l;
		} else if (!strcasecmp(k, "tool-call")) {
			json_t *j = header_json(v, hold);

			if (is_tool_call(j))
				p->tool_call = j;
		} else if (!strcasecmp(k, "cache-read")) {
			if (!parse_long(v, 0, MAX_TOKENS, &l))
				p->cache_read = l;
		} else if (!strcasecmp(k, "cache-creation")) {
			if (!parse_long(v, 0, MAX_TOKENS, &l))
				p->cache_creation = l;
		} else if (!strcasecmp(k, "stream-error-after")) {
			if (!parse_long(v, -1, MAX_TOKENS, &l))
				p->stream_error_after = l;
		} else if (!strcasecmp(k, "fault")) {
			params_fault(v, strlen(v), &p->fault);
		} else if (!strcasecmp(k, "fault-after")) {
			if (!parse_long(v, 0, MAX_TOKENS, &l))
				p->fault_after = l;
		} else if (!strcasecmp(k, "fault-bytes")) {
			if (!parse_long(v, -1, MAX_FAULT_BYTES, &l))
				p->fault_bytes = l;
		} else if (!strcasecmp(k, "moderation-score")) {
			if (!parse_double(v, 0, 1, &d))
				p->moderation_score = d;
		}
	}
}

static int jnum(json_t *o, const char *key, double min, double max, double *out)
{
	json_t *v = json_object_get(o, key);
	double d;

	if (!json_is_number(v))
		return -1;
	d = json_number_value(v);
	if (d < min || d > max)
		return -1;
	*out = d;
	return 0;
}

static int jbool(json_t *o, const char *key, int *out)
{
	json_t *v = json_object_get(o, key);

	if (json_is_boolean(v))
		*out = json_is_true(v);
	else if (json_is_number(v))
		*out = json_number_value(v) != 0;
	else
		return -1;
	return 0;
}

/* A count that null turns off (-1). */
static void jcount(json_t *m, const char *key, long max, long *out)
{
	double d;

	if (json_is_null(json_object_get(m, key)))
		*out = -1;
	else if (!jnum(m, key, -1, (double)max, &d))
		*out = (long)d;
}

void params_body(json_t *root, struct mock_params *p)
{
	json_t *m = json_object_get(root, "mock");
	json_t *v;
	double d;
	int b;

	if (!json_is_object(m))
		return;
	if (!jnum(m, "tokens", 0, MAX_TOKENS, &d))
		p->tokens = (long)d;
	if (!jnum(m, "ttft_ms", 0, MAX_DELAY_MS, &d))
		p->ttft_ms = (long)d;
	if (!jnum(m, "itl_ms", 0, MAX_DELAY_MS, &d))
		p->itl_ms = (long)d;
	if (!jnum(m, "status", 0, 599, &d))
		p->status = (int)d;
	if (!jnum(m, "error_rate", 0, 1, &d))
		p->error_rate = d;
	if (!jbool(m, "hang", &b))
		p->hang = b;
	jcount(m, "disconnect_after", MAX_TOKENS, &p->disconnect_after);
	if (!jbool(m, "no_usage", &b))
		p->no_usage = b;
	if (!jnum(m, "retry_after", -1, INT_MAX, &d))
		p->retry_after = (long)d;

	v = json_object_get(m, "content");
	if (json_is_string(v))
		set_content(p, json_string_value(v), json_string_length(v));
	else if (json_is_null(v))
		p->content = NULL;
	v = json_object_get(m, "chunks");
	if (is_string_array(v))
		set_chunks(p, v);
	else if (json_is_null(v))
		p->chunks = NULL;
	v = json_object_get(m, "repeat");
	if (json_is_string(v))
		set_repeat(p, json_string_value(v), json_string_length(v));
	else if (json_is_null(v))
		p->repeat = NULL;
	if (!jnum(m, "times", 0, MAX_TOKENS, &d))
		p->times = (long)d;
	v = json_object_get(m, "tool_call");
	if (is_tool_call(v))
		p->tool_call = v;
	else if (json_is_null(v))
		p->tool_call = NULL;
	if (!jnum(m, "cache_read", 0, MAX_TOKENS, &d))
		p->cache_read = (long)d;
	if (!jnum(m, "cache_creation", 0, MAX_TOKENS, &d))
		p->cache_creation = (long)d;
	jcount(m, "stream_error_after", MAX_TOKENS, &p->stream_error_after);
	v = json_object_get(m, "fault");
	if (json_is_string(v))
		params_fault(json_string_value(v), json_string_length(v), &p->fault);
	else if (json_is_null(v))
		p->fault = FAULT_NONE;
	if (!jnum(m, "fault_after", 0, MAX_TOKENS, &d))
		p->fault_after = (long)d;
	jcount(m, "fault_bytes", MAX_FAULT_BYTES, &p->fault_bytes);
	if (!jnum(m, "moderation_score", 0, 1, &d))
		p->moderation_score = d;
}
