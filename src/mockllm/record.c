/* record.c — ring of the last N requests, for GET /_mock/requests.
 *
 * Each slot owns one buffer that is reused (grown when needed), so recording costs no
 * allocation once the ring is warm. Callers hold the app lock. */
#include "mockllm.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

void rec_init(struct recorder *r, size_t cap, size_t body_max)
{
	memset(r, 0, sizeof(*r));
	r->cap = cap;
	r->body_max = body_max;
	if (cap > 0) {
		r->ring = calloc(cap, sizeof(*r->ring));
		if (r->ring == NULL)
			r->cap = 0;
	}
}

void rec_free(struct recorder *r)
{
	for (size_t i = 0; i < r->cap; i++)
		free(r->ring[i].buf);
	free(r->ring);
	memset(r, 0, sizeof(*r));
}

void rec_clear(struct recorder *r)
{
	/* Keep the buffers for reuse, but give back the large ones. */
	for (size_t i = 0; i < r->cap; i++) {
		if (r->ring[i].cap > 65536) {
			free(r->ring[i].buf);
			r->ring[i].buf = NULL;
			r->ring[i].cap = 0;
		}
	}
	r->start = 0;
	r->count = 0;
}

uint64_t rec_add(struct recorder *r, const char *method, const char *path, const char *query,
                 const struct evkeyvalq *headers, const char *body, size_t body_len, double time)
{
	struct rec_entry *e;
	const struct evkeyval *kv;
	size_t need, path_len, query_len, hdr_len = 0;
	unsigned nhdr = 0;
	int truncated = 0;
	char *p;

	if (r->cap == 0)
		return 0;
	if (r->count == r->cap) {
		e = &r->ring[r->start];
		r->start = (r->start + 1) % r->cap;
	} else {
		e = &r->ring[(r->start + r->count) % r->cap];
		r->count++;
	}

	path_len = strlen(path);
	query_len = query ? strlen(query) : 0;
	for (kv = headers->tqh_first; kv != NULL; kv = kv->next.tqe_next) {
		hdr_len += strlen(kv->key) + 1 + strlen(kv->value) + 1;
		nhdr++;
	}
	if (body_len > r->body_max) {
		body_len = r->body_max;
		truncated = 1;
	}
	need = path_len + 1 + query_len + 1 + hdr_len + body_len + 1;
	if (need > e->cap || (e->cap > 65536 && need < e->cap / 4)) {
		char *nb = malloc(need);

		if (nb == NULL) {
			/* Out of memory: keep the slot as an empty placeholder. */
			free(e->buf);
			e->buf = NULL;
			e->cap = 0;
			e->method = method;
			e->time = time;
			e->seq = ++r->next_seq;
			e->outcome = REC_NONE;
			e->deltas = 0;
			return e->seq;
		}
		free(e->buf);
		e->buf = nb;
		e->cap = need;
	}

	p = e->buf;
	memcpy(p, path, path_len + 1);
	p += path_len + 1;
	if (query_len)
		memcpy(p, query, query_len);
	p[query_len] = '\0';
	p += query_len + 1;
	for (kv = headers->tqh_first; kv != NULL; kv = kv->next.tqe_next) {
		for (const char *k = kv->key; *k; k++)
			*p++ = (char)tolower((unsigned char)*k);
		*p++ = '\0';
		size_t vl = strlen(kv->value) + 1;
		memcpy(p, kv->value, vl);
		p += vl;
	}
	if (body_len)
		memcpy(p, body, body_len);
	p[body_len] = '\0';

	e->method = method;
	e->time = time;
	e->path_len = path_len;
	e->query_len = query_len;
	e->has_query = query != NULL;
	e->hdr_len = hdr_len;
	e->nhdr = nhdr;
	e->body_len = body_len;
	e->truncated = truncated;
	e->seq = ++r->next_seq;
	e->outcome = REC_NONE;
	e->deltas = 0;
	return e->seq;
}

void rec_finish(struct recorder *r, uint64_t seq, enum rec_outcome o, long deltas)
{
	uint64_t back;
	struct rec_entry *e;

	/* The newest record is next_seq; older ones sit before it in the ring. */
	if (seq == 0 || seq > r->next_seq)
		return;
	back = r->next_seq - seq;
	if (back >= r->count)
		return;
	e = &r->ring[(r->start + r->count - 1 - (size_t)back) % r->cap];
	if (e->seq != seq)
		return;
	e->outcome = (int)o;
	e->deltas = deltas;
}

static const char *outcome_name(int o)
{
	switch (o) {
	case REC_COMPLETED:
		return "completed";
	case REC_CLIENT_DISCONNECT:
		return "client_disconnect";
	case REC_MOCK_DISCONNECT:
		return "mock_disconnect";
	case REC_FAULT:
		return "fault";
	case REC_STREAM_ERROR:
		return "stream_error";
	case REC_ERROR:
		return "error";
	case REC_REJECTED:
		return "rejected";
	case REC_INVALID:
		return "invalid";
	default:
		return NULL;
	}
}

static void add_outcome(json_t *o, const struct rec_entry *e)
{
	const char *name = outcome_name(e->outcome);

	json_object_set_new(o, "seq", json_integer((json_int_t)e->seq));
	json_object_set_new(o, "outcome", name ? json_string(name) : json_null());
	json_object_set_new(o, "client_disconnected",
	                    json_boolean(e->outcome == REC_CLIENT_DISCONNECT));
	json_object_set_new(o, "deltas_written", json_integer(e->deltas));
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 if invalid. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
	unsigned c = s[0];
	size_t len;
	unsigned cp;

	if (c < 0x80)
		return 1;
	if (c >= 0xC2 && c <= 0xDF) {
		len = 2;
		cp = c & 0x1F;
	} else if (c >= 0xE0 && c <= 0xEF) {
		len = 3;
		cp = c & 0x0F;
	} else if (c >= 0xF0 && c <= 0xF4) {
		len = 4;
		cp = c & 0x07;
	} else
		return 0;
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xC0) != 0x80)
			return 0;
		cp = (cp << 6) | (s[i] & 0x3F);
	}
	if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
	    (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
		return 0;
	return len;
}

/* A JSON string of s; invalid UTF-8 bytes become U+FFFD. */
static json_t *json_str(const char *s, size_t n)
{
	json_t *j = json_stringn(s, n);
	char *tmp, *q;

	if (j != NULL)
		return j;
	tmp = malloc(n * 3 + 1);
	if (tmp == NULL)
		return json_null();
	q = tmp;
	for (size_t i = 0; i < n;) {
		size_t l = utf8_seq((const unsigned char *)s + i, n - i);

		if (l == 0) {
			memcpy(q, "\xEF\xBF\xBD", 3);
			q += 3;
			i++;
		} else {
			memcpy(q, s + i, l);
			q += l;
			i += l;
		}
	}
	j = json_stringn(tmp, (size_t)(q - tmp));
	free(tmp);
	return j ? j : json_null();
}

char *rec_dump(const struct recorder *r)
{
	json_t *arr = json_array();
	char *out;

	for (size_t i = 0; i < r->count; i++) {
		const struct rec_entry *e = &r->ring[(r->start + i) % r->cap];
		json_t *o = json_object();
		json_t *h = json_object();
		const char *p;

		if (e->buf == NULL) {
			json_object_set_new(o, "method", json_string(e->method));
			json_object_set_new(o, "path", json_string(""));
			json_object_set_new(o, "query", json_null());
			json_object_set_new(o, "headers", h);
			json_object_set_new(o, "body", json_string(""));
			json_object_set_new(o, "time", json_real(e->time));
			json_object_set_new(o, "body_truncated", json_true());
			add_outcome(o, e);
			json_array_append_new(arr, o);
			continue;
		}
		p = e->buf;
		json_object_set_new(o, "method", json_string(e->method));
		json_object_set_new(o, "path", json_str(p, e->path_len));
		p += e->path_len + 1;
		json_object_set_new(o, "query",
		                    e->has_query ? json_str(p, e->query_len) : json_null());
		p += e->query_len + 1;
		for (unsigned k = 0; k < e->nhdr; k++) {
			const char *name = p;
			size_t nl = strlen(name);
			const char *val = name + nl + 1;
			size_t vl = strlen(val);
			json_t *prev, *nk;
			const char *key;

			p = val + vl + 1;
			nk = json_str(name, nl);
			key = json_string_value(nk);
			if (key == NULL) {
				json_decref(nk);
				continue;
			}
			prev = json_object_get(h, key);
			if (prev == NULL) {
				json_object_set_new(h, key, json_str(val, vl));
			} else {
				/* Repeated header: join the values like HTTP does. */
				const char *pv = json_string_value(prev);
				size_t pl = json_string_length(prev);
				char *joined = malloc(pl + 2 + vl + 1);

				if (joined != NULL) {
					memcpy(joined, pv, pl);
					memcpy(joined + pl, ", ", 2);
					memcpy(joined + pl + 2, val, vl);
					json_object_set_new(h, key, json_str(joined, pl + 2 + vl));
					free(joined);
				}
			}
			json_decref(nk);
		}
		json_object_set_new(o, "headers", h);
		json_object_set_new(o, "body", json_str(p, e->body_len));
		json_object_set_new(o, "time", json_real(e->time));
		if (e->truncated)
			json_object_set_new(o, "body_truncated", json_true());
		add_outcome(o, e);
		json_array_append_new(arr, o);
	}
	out = json_dumps(arr, JSON_COMPACT | JSON_REAL_PRECISION(17));
	json_decref(arr);
	return out;
}
