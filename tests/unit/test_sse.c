/* test_sse.c — SSE parser unit tests: events must not depend on how the stream is split. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/sse.h"

/* ---------------------------------------------------------------------------
 * Recorder: a callback that copies every event it sees
 * ------------------------------------------------------------------------- */

struct rec_event {
	char *raw;
	size_t raw_len;
	char event[64];
	char *data;
	size_t data_len;
	bool has_data;
};

struct rec {
	struct rec_event *ev;
	size_t n, cap;
	size_t stop_after; /* return false after this many events; 0: never */
};

static bool rec_cb(void *arg, const struct sse_event *ev)
{
	struct rec *r = arg;

	/* What the header promises about every event, whatever the input. */
	assert_non_null(ev->raw);
	assert_true(ev->raw_len > 0);
	assert_non_null(ev->event);
	assert_true(strlen(ev->event) < sizeof(r->ev[0].event));
	assert_non_null(ev->data);
	assert_int_equal(ev->data[ev->data_len], '\0');
	if (!ev->has_data)
		assert_int_equal(ev->data_len, 0);
	/* The raw event ends with its blank line. */
	char last = ev->raw[ev->raw_len - 1];
	assert_true(last == '\n' || last == '\r');

	if (r->n == r->cap) {
		r->cap = r->cap ? r->cap * 2 : 8;
		r->ev = realloc(r->ev, r->cap * sizeof(*r->ev));
		assert_non_null(r->ev);
	}
	struct rec_event *e = &r->ev[r->n++];
	e->raw = malloc(ev->raw_len);
	assert_non_null(e->raw);
	memcpy(e->raw, ev->raw, ev->raw_len);
	e->raw_len = ev->raw_len;
	snprintf(e->event, sizeof(e->event), "%s", ev->event);
	e->data = malloc(ev->data_len + 1);
	assert_non_null(e->data);
	memcpy(e->data, ev->data, ev->data_len + 1);
	e->data_len = ev->data_len;
	e->has_data = ev->has_data;
	return !(r->stop_after && r->n >= r->stop_after);
}

static void rec_clear(struct rec *r)
{
	for (size_t i = 0; i < r->n; i++) {
		free(r->ev[i].raw);
		free(r->ev[i].data);
	}
	free(r->ev);
	memset(r, 0, sizeof(*r));
}

static void assert_same_events(const struct rec *a, const struct rec *b)
{
	assert_int_equal(a->n, b->n);
	for (size_t i = 0; i < a->n; i++) {
		assert_int_equal(a->ev[i].raw_len, b->ev[i].raw_len);
		assert_memory_equal(a->ev[i].raw, b->ev[i].raw, a->ev[i].raw_len);
		assert_string_equal(a->ev[i].event, b->ev[i].event);
		assert_int_equal(a->ev[i].data_len, b->ev[i].data_len);
		assert_memory_equal(a->ev[i].data, b->ev[i].data, a->ev[i].data_len + 1);
		assert_int_equal(a->ev[i].has_data, b->ev[i].has_data);
	}
}

/* The raw bytes of all events, back to back, are the input. */
static void assert_concat_is(const struct rec *r, const char *s, size_t len)
{
	size_t off = 0;
	for (size_t i = 0; i < r->n; i++) {
		assert_true(off + r->ev[i].raw_len <= len);
		assert_memory_equal(r->ev[i].raw, s + off, r->ev[i].raw_len);
		off += r->ev[i].raw_len;
	}
	assert_int_equal(off, len);
}

/* Feed s cut at the given (sorted) offsets; every feed must succeed and the
 * stream must end on an event boundary. */
static void feed_cuts(const char *s, size_t len, const size_t *cuts, size_t n_cuts, struct rec *r)
{
	struct sse_parser p;
	size_t from = 0;

	sse_parser_init(&p, 0);
	for (size_t i = 0; i <= n_cuts; i++) {
		size_t to = i < n_cuts ? cuts[i] : len;
		assert_true(sse_feed(&p, s + from, to - from, rec_cb, r));
		from = to;
	}
	assert_int_equal(sse_pending(&p), 0);
	sse_parser_free(&p);
}

static void feed_whole(const char *s, size_t len, struct rec *r)
{
	feed_cuts(s, len, NULL, 0, r);
}

/* ---------------------------------------------------------------------------
 * A realistic OpenAI chat completion stream
 * ------------------------------------------------------------------------- */

#define CHUNK_HEAD                                                                                 \
	"{\"id\":\"chatcmpl-9zXk2\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,"  \
	"\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\","

static const char *const openai_data[] = {
        CHUNK_HEAD "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\","
                   "\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}",
        CHUNK_HEAD "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"logprobs\":null,"
                   "\"finish_reason\":null}],\"usage\":null}",
        CHUNK_HEAD "\"choices\":[{\"index\":0,\"delta\":{\"content\":\", wor\"},\"logprobs\":null,"
                   "\"finish_reason\":null}],\"usage\":null}",
        CHUNK_HEAD "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ld! \\u00e9\\n:)\"},"
                   "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}",
        CHUNK_HEAD "\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,"
                   "\"finish_reason\":\"stop\"}],\"usage\":null}",
        CHUNK_HEAD "\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,"
                   "\"total_tokens\":17,\"prompt_tokens_details\":{\"cached_tokens\":0},"
                   "\"completion_tokens_details\":{\"reasoning_tokens\":0}}}",
        "[DONE]",
};
#define N_OPENAI (sizeof(openai_data) / sizeof(openai_data[0]))

static char *openai_stream(size_t *len)
{
	size_t total = 0;
	for (size_t i = 0; i < N_OPENAI; i++)
		total += strlen("data: ") + strlen(openai_data[i]) + strlen("\n\n");
	char *s = malloc(total + 1);
	assert_non_null(s);
	size_t off = 0;
	for (size_t i = 0; i < N_OPENAI; i++)
		off += (size_t)sprintf(s + off, "data: %s\n\n", openai_data[i]);
	assert_int_equal(off, total);
	*len = total;
	return s;
}

/* Check the events of the OpenAI stream against what it was built from. */
static void assert_openai_events(const struct rec *r, const char *s, size_t len)
{
	assert_int_equal(r->n, N_OPENAI);
	for (size_t i = 0; i < N_OPENAI; i++) {
		const struct rec_event *e = &r->ev[i];
		assert_true(e->has_data);
		assert_string_equal(e->event, "");
		assert_int_equal(e->data_len, strlen(openai_data[i]));
		assert_string_equal(e->data, openai_data[i]);
		assert_int_equal(e->raw_len, strlen(openai_data[i]) + 8);
		assert_memory_equal(e->raw, "data: ", 6);
		assert_memory_equal(e->raw + e->raw_len - 2, "\n\n", 2);
	}
	assert_string_equal(r->ev[N_OPENAI - 1].data, "[DONE]");
	assert_concat_is(r, s, len);
}

static void test_openai_whole(void **state)
{
	size_t len;
	char *s = openai_stream(&len);
	struct rec r = {0};

	feed_whole(s, len, &r);
	assert_openai_events(&r, s, len);
	rec_clear(&r);
	free(s);
}

static void test_openai_byte_by_byte(void **state)
{
	size_t len;
	char *s = openai_stream(&len);
	struct rec r = {0};
	struct sse_parser p;

	sse_parser_init(&p, 0);
	for (size_t i = 0; i < len; i++) {
		assert_true(sse_feed(&p, s + i, 1, rec_cb, &r));
		/* Held bytes are exactly the input past the last event. */
		size_t done = 0;
		for (size_t k = 0; k < r.n; k++)
			done += r.ev[k].raw_len;
		assert_int_equal(sse_pending(&p), i + 1 - done);
	}
	assert_int_equal(sse_pending(&p), 0);
	assert_openai_events(&r, s, len);
	sse_parser_free(&p);
	rec_clear(&r);
	free(s);
}

static void test_openai_every_split(void **state)
{
	size_t len;
	char *s = openai_stream(&len);
	struct rec ref = {0};

	feed_whole(s, len, &ref);
	for (size_t cut = 0; cut <= len; cut++) {
		struct rec r = {0};
		feed_cuts(s, len, &cut, 1, &r);
		assert_same_events(&ref, &r);
		assert_concat_is(&r, s, len);
		rec_clear(&r);
	}
	rec_clear(&ref);
	free(s);
}

/* Whole events in one feed are handed over from the caller's buffer, not copied. */
static bool raw_in_buffer_cb(void *arg, const struct sse_event *ev)
{
	const char *const *range = arg;
	assert_true(ev->raw >= range[0] && ev->raw + ev->raw_len <= range[1]);
	return true;
}

static void test_whole_events_not_copied(void **state)
{
	size_t len;
	char *s = openai_stream(&len);
	const char *range[2] = {s, s + len};
	struct sse_parser p;

	sse_parser_init(&p, 0);
	assert_true(sse_feed(&p, s, len, raw_in_buffer_cb, (void *)range));
	assert_null(p.raw); /* nothing was ever held */
	sse_parser_free(&p);
	free(s);
}

/* Buffers grow on the first events and are then reused, not reallocated. */
static void test_buffers_reused(void **state)
{
	size_t len;
	char *s = openai_stream(&len);
	struct rec r = {0};
	struct sse_parser p;

	sse_parser_init(&p, 0);
	for (size_t i = 0; i < len; i++)
		assert_true(sse_feed(&p, s + i, 1, rec_cb, &r));
	char *raw = p.raw, *data = p.data;
	size_t raw_cap = p.raw_cap, data_cap = p.data_cap;
	assert_true(raw_cap >= strlen(openai_data[0]) + 8);
	for (int round = 0; round < 3; round++)
		for (size_t i = 0; i < len; i++)
			assert_true(sse_feed(&p, s + i, 1, rec_cb, &r));
	assert_ptr_equal(p.raw, raw);
	assert_ptr_equal(p.data, data);
	assert_int_equal(p.raw_cap, raw_cap);
	assert_int_equal(p.data_cap, data_cap);
	assert_int_equal(r.n, 4 * N_OPENAI);
	sse_parser_free(&p);
	rec_clear(&r);
	free(s);
}

/* ---------------------------------------------------------------------------
 * A short stream mixing every line ending, split at every pair of points
 * ------------------------------------------------------------------------- */

static const char mixed[] = ": hi\r\n"
                            "event: delta\r\n"
                            "data: {\"a\":1}\r\n"
                            "\r\n"
                            "data: x\r"
                            "data: y\r"
                            "\r"
                            "id: 7\n"
                            "data\n"
                            "\n"
                            "data:z\r\n"
                            "\r\n";

static void assert_mixed_events(const struct rec *r)
{
	assert_int_equal(r->n, 4);
	assert_int_equal(r->ev[0].raw_len,
	                 strlen(": hi\r\nevent: delta\r\ndata: {\"a\":1}\r\n\r\n"));
	assert_string_equal(r->ev[0].event, "delta");
	assert_string_equal(r->ev[0].data, "{\"a\":1}");
	assert_int_equal(r->ev[1].raw_len, strlen("data: x\rdata: y\r\r"));
	assert_string_equal(r->ev[1].event, "");
	assert_string_equal(r->ev[1].data, "x\ny");
	assert_int_equal(r->ev[1].data_len, 3);
	assert_int_equal(r->ev[2].raw_len, strlen("id: 7\ndata\n\n"));
	assert_true(r->ev[2].has_data);
	assert_string_equal(r->ev[2].data, "");
	assert_int_equal(r->ev[3].raw_len, strlen("data:z\r\n\r\n"));
	assert_string_equal(r->ev[3].data, "z");
	for (size_t i = 0; i < r->n; i++)
		assert_true(r->ev[i].has_data);
	assert_concat_is(r, mixed, sizeof(mixed) - 1);
}

static void test_mixed_every_pair_of_splits(void **state)
{
	const size_t len = sizeof(mixed) - 1;
	struct rec ref = {0};
	size_t runs = 0;

	feed_whole(mixed, len, &ref);
	assert_mixed_events(&ref);
	/* i == j and the ends give empty feeds, which must be harmless. */
	for (size_t i = 0; i <= len; i++) {
		for (size_t j = i; j <= len; j++) {
			size_t cuts[2] = {i, j};
			struct rec r = {0};
			feed_cuts(mixed, len, cuts, 2, &r);
			assert_same_events(&ref, &r);
			assert_concat_is(&r, mixed, len);
			rec_clear(&r);
			runs++;
		}
	}
	assert_int_equal(runs, (len + 1) * (len + 2) / 2);
	rec_clear(&ref);
}

/* ---------------------------------------------------------------------------
 * Random streams: a naive whole-input reference parser, random splits
 * ------------------------------------------------------------------------- */

/* Deliberately simple: one byte at a time over the complete input. */
static void ref_parse(const char *s, size_t len, struct rec *r)
{
	char event[64] = "";
	char *data = calloc(len + 1, 1);
	size_t data_len = 0, ev_start = 0, i = 0;
	bool has_data = false;

	assert_non_null(data);
	while (i < len) {
		size_t ls = i;
		while (i < len && s[i] != '\r' && s[i] != '\n')
			i++;
		if (i == len)
			break;
		size_t le = i;
		i += (s[i] == '\r' && i + 1 < len && s[i + 1] == '\n') ? 2 : 1;
		if (le == ls) {
			struct sse_event ev = {s + ev_start, i - ev_start, event,
			                       data,         data_len,     has_data};
			data[data_len] = '\0';
			rec_cb(r, &ev);
			event[0] = '\0';
			data_len = 0;
			has_data = false;
			ev_start = i;
			continue;
		}
		if (s[ls] == ':')
			continue;
		size_t colon = ls;
		while (colon < le && s[colon] != ':')
			colon++;
		size_t v = colon < le ? colon + 1 : le;
		if (v < le && s[v] == ' ')
			v++;
		if (colon - ls == 4 && memcmp(s + ls, "data", 4) == 0) {
			if (has_data)
				data[data_len++] = '\n';
			memcpy(data + data_len, s + v, le - v);
			data_len += le - v;
			has_data = true;
		} else if (colon - ls == 5 && memcmp(s + ls, "event", 5) == 0) {
			size_t n = le - v < 63 ? le - v : 63;
			memcpy(event, s + v, n);
			event[n] = '\0';
		}
	}
	free(data);
}

static uint32_t lcg(uint32_t *seed)
{
	*seed = *seed * 1103515245u + 12345u;
	return *seed >> 8;
}

static void test_random_streams(void **state)
{
	static const char *const tokens[] = {"data", "event", "id", ":",  " ",   "\r",
	                                     "\n",   "\r\n",  "x",  "yz", "\n\n"};
	const size_t n_tokens = sizeof(tokens) / sizeof(tokens[0]);
	uint32_t seed = 20240611;
	char s[256];

	for (int round = 0; round < 3000; round++) {
		size_t len = 0;
		size_t n = lcg(&seed) % 40;
		for (size_t k = 0; k < n; k++) {
			const char *t = tokens[lcg(&seed) % n_tokens];
			memcpy(s + len, t, strlen(t));
			len += strlen(t);
		}
		/* Whatever came before, this ends on a blank line. */
		memcpy(s + len, "\n\n", 2);
		len += 2;

		struct rec ref = {0}, whole = {0};
		ref_parse(s, len, &ref);
		assert_concat_is(&ref, s, len);
		feed_whole(s, len, &whole);
		assert_same_events(&ref, &whole);

		for (int k = 0; k < 8; k++) {
			size_t cuts[4];
			struct rec r = {0};
			for (size_t c = 0; c < 4; c++)
				cuts[c] = lcg(&seed) % (len + 1);
			/* sort the four cuts */
			for (size_t a = 1; a < 4; a++)
				for (size_t b = a; b > 0 && cuts[b - 1] > cuts[b]; b--) {
					size_t t = cuts[b];
					cuts[b] = cuts[b - 1];
					cuts[b - 1] = t;
				}
			feed_cuts(s, len, cuts, 4, &r);
			assert_same_events(&ref, &r);
			rec_clear(&r);
		}
		rec_clear(&ref);
		rec_clear(&whole);
	}
}

/* ---------------------------------------------------------------------------
 * Line endings
 * ------------------------------------------------------------------------- */

static void test_crlf(void **state)
{
	static const char s[] = "event: a\r\ndata: 1\r\ndata: 2\r\n\r\ndata: 3\r\n\r\n";
	struct rec r = {0};

	feed_whole(s, sizeof(s) - 1, &r);
	assert_int_equal(r.n, 2);
	assert_string_equal(r.ev[0].event, "a");
	assert_string_equal(r.ev[0].data, "1\n2"); /* no \r leaks into data */
	assert_string_equal(r.ev[1].event, "");
	assert_string_equal(r.ev[1].data, "3");
	assert_concat_is(&r, s, sizeof(s) - 1);
	rec_clear(&r);
}

static void test_lone_cr(void **state)
{
	static const char s[] = "data: 1\rdata: 2\r\revent: e\rdata: 3\r\rdata: 4\n\n";
	struct rec r = {0};

	feed_whole(s, sizeof(s) - 1, &r);
	assert_int_equal(r.n, 3);
	assert_string_equal(r.ev[0].data, "1\n2");
	assert_int_equal(r.ev[0].raw_len, strlen("data: 1\rdata: 2\r\r"));
	assert_string_equal(r.ev[1].event, "e");
	assert_string_equal(r.ev[1].data, "3");
	assert_string_equal(r.ev[2].data, "4");
	assert_concat_is(&r, s, sizeof(s) - 1);
	rec_clear(&r);
}

/* \r at the end of one feed and \n at the start of the next are one line end,
 * both inside a field line and as the event's blank line. */
static void test_crlf_split_across_feeds(void **state)
{
	struct rec r = {0};
	struct sse_parser p;

	sse_parser_init(&p, 0);
	assert_true(sse_feed(&p, "data: x\r", 8, rec_cb, &r));
	assert_int_equal(r.n, 0);
	assert_true(sse_feed(&p, "\n\r", 2, rec_cb, &r));
	assert_int_equal(r.n, 0); /* the blank line's \r may still be followed by \n */
	assert_int_equal(sse_pending(&p), 10);
	assert_true(sse_feed(&p, "\ndata: y\n\n", 10, rec_cb, &r));
	assert_int_equal(r.n, 2);
	assert_int_equal(r.ev[0].raw_len, 11);
	assert_memory_equal(r.ev[0].raw, "data: x\r\n\r\n", 11);
	assert_string_equal(r.ev[0].data, "x"); /* not "x" plus an empty line */
	assert_int_equal(r.ev[1].raw_len, 9);
	assert_string_equal(r.ev[1].data, "y");
	assert_int_equal(sse_pending(&p), 0);
	sse_parser_free(&p);
	rec_clear(&r);
}

/* A lone \r at the end of a feed, followed by something other than \n. */
static void test_lone_cr_at_feed_end(void **state)
{
	struct rec r = {0};
	struct sse_parser p;

	sse_parser_init(&p, 0);
	assert_true(sse_feed(&p, "data: x\r\r", 9, rec_cb, &r));
	assert_int_equal(r.n, 0);
	assert_int_equal(sse_pending(&p), 9);
	assert_true(sse_feed(&p, "data: y\r", 8, rec_cb, &r));
	assert_int_equal(r.n, 1);
	assert_int_equal(r.ev[0].raw_len, 9);
	assert_memory_equal(r.ev[0].raw, "data: x\r\r", 9);
	assert_string_equal(r.ev[0].data, "x");
	assert_int_equal(sse_pending(&p), 8);
	assert_true(sse_feed(&p, "\r\n", 2, rec_cb, &r));
	assert_int_equal(r.n, 2);
	assert_memory_equal(r.ev[1].raw, "data: y\r\r\n", 10);
	assert_string_equal(r.ev[1].data, "y");
	assert_int_equal(sse_pending(&p), 0);
	sse_parser_free(&p);
	rec_clear(&r);
}

/* ---------------------------------------------------------------------------
 * Fields
 * ------------------------------------------------------------------------- */

static void test_multiline_data(void **state)
{
	static const char s[] = "data: a\ndata: b\ndata:\ndata: c\n\n";
	struct rec r = {0};

	feed_whole(s, sizeof(s) - 1, &r);
	assert_int_equal(r.n, 1);
	assert_int_equal(r.ev[0].data_len, 6);
	assert_string_equal(r.ev[0].data, "a\nb\n\nc");
	rec_clear(&r);
}

static void test_event_names(void **state)
{
	static const char s[] = "event: delta\ndata: 1\n\n"
	                        "data: 2\n\n"                     /* the name does not carry over */
	                        "event: a\nevent: b\ndata: 3\n\n" /* the last one wins */
	                        "event:ping\n\n"                  /* no data */
	                        "event\ndata: 4\n\n";             /* no colon: empty name */
	struct rec r = {0};

	feed_whole(s, sizeof(s) - 1, &r);
	assert_int_equal(r.n, 5);
	assert_string_equal(r.ev[0].event, "delta");
	assert_string_equal(r.ev[0].data, "1");
	assert_string_equal(r.ev[1].event, "");
	assert_string_equal(r.ev[2].event, "b");
	assert_string_equal(r.ev[3].event, "ping");
	assert_false(r.ev[3].has_data);
	assert_string_equal(r.ev[3].data, "");
	assert_string_equal(r.ev[4].event, "");
	assert_string_equal(r.ev[4].data, "4");
	assert_concat_is(&r, s, sizeof(s) - 1);
	rec_clear(&r);
}

static void test_long_event_name_truncated(void **state)
{
	char s[200];
	char name[101];
	struct rec r = {0};

	memset(name, 'n', 100);
	name[100] = '\0';
	int n = snprintf(s, sizeof(s), "event: %s\ndata: x\n\n", name);
	feed_whole(s, (size_t)n, &r);
	assert_int_equal(r.n, 1);
	assert_int_equal(strlen(r.ev[0].event), 63);
	assert_memory_equal(r.ev[0].event, name, 63);
	assert_string_equal(r.ev[0].data, "x");
	assert_int_equal(r.ev[0].raw_len, (size_t)n);
	rec_clear(&r);
}

static void test_comments(void **state)
{
	static const char s[] = ": keep-alive\n\n"
	                        ":\n\n"
	                        ": OPENROUTER PROCESSING\ndata: x\n: trailing\n\n";
	struct rec r = {0};

	feed_whole(s, sizeof(s) - 1, &r);
	assert_int_equal(r.n, 3);
	assert_false(r.ev[0].has_data);
	assert_int_equal(r.ev[0].raw_len, strlen(": keep-alive\n\n"));
	assert_false(r.ev[1].has_data);
	assert_true(r.ev[2].has_data);
	assert_string_equal(r.ev[2].data, "x");
	assert_concat_is(&r, s, sizeof(s) - 1);
	rec_clear(&r);
}

static void test_field_without_colon(void **state)
{
	static const char s[] = "data\n\n"         /* data with an empty value */
	                        "foo\ndata: x\n\n" /* unknown, ignored */
	                        "datax\n\n";       /* not "data" */
	struct rec r = {0};

	feed_whole(s, sizeof(s) - 1, &r);
	assert_int_equal(r.n, 3);
	assert_true(r.ev[0].has_data);
	assert_int_equal(r.ev[0].data_len, 0);
	assert_string_equal(r.ev[0].data, "");
	assert_string_equal(r.ev[1].data, "x");
	assert_false(r.ev[2].has_data);
	rec_clear(&r);
}

static void test_unknown_fields(void **state)
{
	static const char s[] = "id: 42\nretry: 1000\nx-foo: bar\ndata: v\n\n";
	struct rec r = {0};

	feed_whole(s, sizeof(s) - 1, &r);
	assert_int_equal(r.n, 1);
	assert_string_equal(r.ev[0].data, "v");
	assert_string_equal(r.ev[0].event, "");
	assert_int_equal(r.ev[0].raw_len, sizeof(s) - 1); /* kept in the raw bytes */
	rec_clear(&r);
}

static void test_data_space_handling(void **state)
{
	static const char s[] = "data:x\n\n"
	                        "data:  two\n\n"    /* only one space is stripped */
	                        "data:\tt\n\n"      /* a tab is not a space */
	                        "data: a:b: c\n\n"; /* later colons are value */
	struct rec r = {0};

	feed_whole(s, sizeof(s) - 1, &r);
	assert_int_equal(r.n, 4);
	assert_string_equal(r.ev[0].data, "x");
	assert_string_equal(r.ev[1].data, " two");
	assert_string_equal(r.ev[2].data, "\tt");
	assert_string_equal(r.ev[3].data, "a:b: c");
	rec_clear(&r);
}

/* ---------------------------------------------------------------------------
 * Limits, stopping, pending
 * ------------------------------------------------------------------------- */

/* "data: " + 24 bytes + "\n\n" = 32 bytes. */
#define EV32 "data: 0123456789abcdefghijklmn\n\n"
#define EV33 "data: 0123456789abcdefghijklmno\n\n"

static void test_overflow(void **state)
{
	struct rec r = {0};
	struct sse_parser p;

	assert_int_equal(strlen(EV32), 32);

	/* An event of exactly max_event bytes is fine. */
	sse_parser_init(&p, 32);
	assert_true(sse_feed(&p, EV32 EV32, 64, rec_cb, &r));
	assert_int_equal(r.n, 2);
	/* One byte more is not; events before it in the same feed still arrive. */
	assert_false(sse_feed(&p, EV32 EV33 EV32, 97, rec_cb, &r));
	assert_int_equal(r.n, 3);
	/* The parser stays failed. */
	assert_false(sse_feed(&p, EV32, 32, rec_cb, &r));
	assert_int_equal(r.n, 3);
	sse_parser_free(&p);
	rec_clear(&r);
}

static void test_overflow_byte_by_byte(void **state)
{
	static const char s[] = EV32 EV33;
	struct rec r = {0};
	struct sse_parser p;
	size_t i;

	sse_parser_init(&p, 32);
	for (i = 0; i < sizeof(s) - 1; i++)
		if (!sse_feed(&p, s + i, 1, rec_cb, &r))
			break;
	/* Noticed as soon as the held event passes the cap, before its end. */
	assert_int_equal(i, 32 + 32);
	assert_int_equal(r.n, 1);
	assert_true(sse_pending(&p) <= 32);
	sse_parser_free(&p);
	rec_clear(&r);
}

/* A single line longer than the cap, with no line end in sight. */
static void test_overflow_unterminated_line(void **state)
{
	char chunk[1000];
	struct rec r = {0};
	struct sse_parser p;
	int fed = 0;

	memset(chunk, 'x', sizeof(chunk));
	sse_parser_init(&p, 0); /* default: 1 MiB */
	assert_int_equal(p.max_event, (size_t)1 << 20);
	assert_true(sse_feed(&p, "data: ", 6, rec_cb, &r));
	while (sse_feed(&p, chunk, sizeof(chunk), rec_cb, &r))
		fed++;
	assert_int_equal(fed, ((1 << 20) - 6) / (int)sizeof(chunk));
	assert_true(p.raw_cap <= (size_t)1 << 20); /* never held more than the cap */
	assert_int_equal(r.n, 0);
	sse_parser_free(&p);
	rec_clear(&r);
}

static void test_callback_stops(void **state)
{
	static const char s[] = "data: 1\n\ndata: 2\n\ndata: 3\n\n";
	struct rec r = {.stop_after = 2};
	struct sse_parser p;

	sse_parser_init(&p, 0);
	assert_false(sse_feed(&p, s, sizeof(s) - 1, rec_cb, &r));
	assert_int_equal(r.n, 2);
	assert_string_equal(r.ev[1].data, "2");
	sse_parser_free(&p);
	rec_clear(&r);

	/* Same when the event was held across feeds. */
	r.stop_after = 1;
	sse_parser_init(&p, 0);
	assert_true(sse_feed(&p, "data: 1\n", 8, rec_cb, &r));
	assert_false(sse_feed(&p, "\ndata: 2\n\n", 10, rec_cb, &r));
	assert_int_equal(r.n, 1);
	sse_parser_free(&p);
	rec_clear(&r);

	/* And when the event ended on a \r held from the previous feed. */
	r.stop_after = 1;
	sse_parser_init(&p, 0);
	assert_true(sse_feed(&p, "data: 1\r\r", 9, rec_cb, &r));
	assert_false(sse_feed(&p, "\ndata: 2\n\n", 10, rec_cb, &r));
	assert_int_equal(r.n, 1);
	assert_int_equal(r.ev[0].raw_len, 10);
	sse_parser_free(&p);
	rec_clear(&r);
}

static void test_pending(void **state)
{
	struct rec r = {0};
	struct sse_parser p;

	sse_parser_init(&p, 0);
	assert_int_equal(sse_pending(&p), 0);
	assert_true(sse_feed(&p, "", 0, rec_cb, &r));
	assert_int_equal(sse_pending(&p), 0);
	assert_true(sse_feed(&p, "data: a\n\ndata: b\n", 17, rec_cb, &r));
	assert_int_equal(r.n, 1);
	assert_int_equal(sse_pending(&p), 8); /* "data: b\n" */
	assert_true(sse_feed(&p, "data: c", 7, rec_cb, &r));
	assert_int_equal(sse_pending(&p), 15); /* plus an unfinished line */
	assert_true(sse_feed(&p, "\n\n", 2, rec_cb, &r));
	assert_int_equal(r.n, 2);
	assert_string_equal(r.ev[1].data, "b\nc");
	assert_int_equal(sse_pending(&p), 0);
	sse_parser_free(&p);
	rec_clear(&r);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_openai_whole),
	        cmocka_unit_test(test_openai_byte_by_byte),
	        cmocka_unit_test(test_openai_every_split),
	        cmocka_unit_test(test_whole_events_not_copied),
	        cmocka_unit_test(test_buffers_reused),
	        cmocka_unit_test(test_mixed_every_pair_of_splits),
	        cmocka_unit_test(test_random_streams),
	        cmocka_unit_test(test_crlf),
	        cmocka_unit_test(test_lone_cr),
	        cmocka_unit_test(test_crlf_split_across_feeds),
	        cmocka_unit_test(test_lone_cr_at_feed_end),
	        cmocka_unit_test(test_multiline_data),
	        cmocka_unit_test(test_event_names),
	        cmocka_unit_test(test_long_event_name_truncated),
	        cmocka_unit_test(test_comments),
	        cmocka_unit_test(test_field_without_colon),
	        cmocka_unit_test(test_unknown_fields),
	        cmocka_unit_test(test_data_space_handling),
	        cmocka_unit_test(test_overflow),
	        cmocka_unit_test(test_overflow_byte_by_byte),
	        cmocka_unit_test(test_overflow_unterminated_line),
	        cmocka_unit_test(test_callback_stops),
	        cmocka_unit_test(test_pending),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
