/* fuzz_sse.c — libFuzzer target: the SSE parser gives the same events however the stream is split.
 *
 * Input: byte 0 = k (mod 16) chunk sizes follow, then the stream. The stream is
 * fed three times — in chunks cycling through those sizes (0 means 1), in one
 * feed, and byte by byte — and each run must deliver the same events as an
 * independent, naive reading of the text/event-stream rules (sse.h): same raw
 * bytes, event name, data and has_data, in order; the raw bytes of the events
 * followed by what is pending are exactly the stream. A fourth run with a small
 * max_event must overflow in one feed exactly when it overflows in chunks, after
 * the same events.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/sse.h"

#include "fuzz.h"

struct ev {
	const uint8_t *raw; /* into the stream: raw bytes are compared as they were received */
	size_t raw_len;
	char event[64];
	uint8_t *data;
	size_t data_len;
	bool has_data;
};

struct evs {
	struct ev *v;
	size_t n, cap;
	size_t raw_total; /* bytes of raw seen so far: where the next event starts */
	const uint8_t *stream;
};

static void evs_free(struct evs *e)
{
	for (size_t i = 0; i < e->n; i++)
		free(e->v[i].data);
	free(e->v);
	memset(e, 0, sizeof(*e));
}

static struct ev *evs_push(struct evs *e)
{
	if (e->n == e->cap) {
		e->cap = e->cap ? 2 * e->cap : 16;
		e->v = realloc(e->v, e->cap * sizeof(*e->v));
		FUZZ_CHECK(e->v != NULL);
	}
	struct ev *x = &e->v[e->n++];
	memset(x, 0, sizeof(*x));
	return x;
}

static bool record(void *arg, const struct sse_event *ev)
{
	struct evs *e = arg;

	/* What sse.h promises about every event. */
	FUZZ_CHECK(ev->raw != NULL && ev->raw_len > 0);
	FUZZ_CHECK(ev->raw[ev->raw_len - 1] == '\n' || ev->raw[ev->raw_len - 1] == '\r');
	FUZZ_CHECK(ev->event != NULL && strlen(ev->event) < 64);
	FUZZ_CHECK(ev->data != NULL && ev->data[ev->data_len] == '\0');
	FUZZ_CHECK(ev->has_data || ev->data_len == 0);
	/* The raw bytes are the next bytes of the stream. */
	FUZZ_CHECK(memcmp(ev->raw, e->stream + e->raw_total, ev->raw_len) == 0);

	struct ev *x = evs_push(e);
	x->raw = e->stream + e->raw_total;
	x->raw_len = ev->raw_len;
	e->raw_total += ev->raw_len;
	snprintf(x->event, sizeof(x->event), "%s", ev->event);
	x->data = malloc(ev->data_len + 1);
	FUZZ_CHECK(x->data != NULL);
	memcpy(x->data, ev->data, ev->data_len);
	x->data_len = ev->data_len;
	x->has_data = ev->has_data;
	return true;
}

/* The rules, read naively from the whole stream at once. Returns the pending count. */
static size_t reference(const uint8_t *b, size_t n, struct evs *out)
{
	size_t pos = 0, ev_start = 0;
	struct ev cur = {0};
	uint8_t *data = malloc(n + 1);
	FUZZ_CHECK(data != NULL);

	while (pos < n) {
		size_t e = pos, eol;
		while (e < n && b[e] != '\r' && b[e] != '\n')
			e++;
		if (e == n)
			break; /* unfinished line */
		if (b[e] == '\r') {
			if (e + 1 == n)
				break; /* a CR that may be half of a CRLF */
			eol = b[e + 1] == '\n' ? 2 : 1;
		} else {
			eol = 1;
		}
		const uint8_t *line = b + pos;
		size_t len = e - pos;
		if (len == 0) {
			struct ev *x = evs_push(out);
			*x = cur;
			x->raw = b + ev_start;
			x->raw_len = e + eol - ev_start;
			x->data = malloc(cur.data_len + 1);
			FUZZ_CHECK(x->data != NULL);
			memcpy(x->data, data, cur.data_len);
			memset(&cur, 0, sizeof(cur));
			ev_start = e + eol;
		} else if (line[0] != ':') {
			size_t name_len = 0;
			while (name_len < len && line[name_len] != ':')
				name_len++;
			const uint8_t *val = line + name_len + (name_len < len);
			size_t val_len = len - (size_t)(val - line);
			if (val_len > 0 && val[0] == ' ') {
				val++;
				val_len--;
			}
			if (name_len == 4 && memcmp(line, "data", 4) == 0) {
				if (cur.has_data)
					data[cur.data_len++] = '\n';
				memcpy(data + cur.data_len, val, val_len);
				cur.data_len += val_len;
				cur.has_data = true;
			} else if (name_len == 5 && memcmp(line, "event", 5) == 0) {
				size_t k = val_len < 63 ? val_len : 63;
				memcpy(cur.event, val, k);
				cur.event[k] = '\0';
			}
		}
		pos = e + eol;
	}
	free(data);
	return n - ev_start;
}

static void same_events(const struct evs *a, const struct evs *b)
{
	FUZZ_CHECK(a->n == b->n);
	for (size_t i = 0; i < a->n; i++) {
		const struct ev *x = &a->v[i], *y = &b->v[i];
		FUZZ_CHECK(x->raw_len == y->raw_len && memcmp(x->raw, y->raw, x->raw_len) == 0);
		/* event names are C strings: an embedded NUL ends both the same way */
		FUZZ_CHECK(strcmp(x->event, y->event) == 0);
		FUZZ_CHECK(x->has_data == y->has_data);
		FUZZ_CHECK(x->data_len == y->data_len &&
		           memcmp(x->data, y->data, x->data_len) == 0);
	}
}

/* Feed stream in chunks of sizes[i % n_sizes] (n_sizes 0: one feed). */
static bool run(const uint8_t *stream, size_t len, const uint8_t *sizes, size_t n_sizes,
                size_t max_event, struct evs *out, size_t *pending)
{
	struct sse_parser p;
	bool ok = true;
	size_t pos = 0, i = 0;

	out->stream = stream;
	sse_parser_init(&p, max_event);
	while (ok && pos < len) {
		size_t n = len;
		if (n_sizes > 0) {
			n = sizes[i++ % n_sizes];
			if (n == 0)
				n = 1;
		}
		if (n > len - pos)
			n = len - pos;
		/* An exact-size copy per chunk: a read past the chunk is an ASan report. */
		char *chunk = fuzz_exact_copy(stream + pos, n);
		FUZZ_CHECK(chunk != NULL);
		ok = sse_feed(&p, chunk, n, record, out);
		free(chunk);
		pos += n;
		if (ok)
			FUZZ_CHECK(out->raw_total + sse_pending(&p) == pos);
	}
	*pending = sse_pending(&p);
	sse_parser_free(&p);
	return ok;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size == 0)
		return 0;
	size_t n_sizes = data[0] % 16;
	if (size < 1 + n_sizes)
		return 0;
	const uint8_t *sizes = data + 1, *stream = data + 1 + n_sizes;
	size_t len = size - 1 - n_sizes;
	static const uint8_t one = 1;

	struct evs ref = {0}, chunked = {0}, whole = {0}, bytes = {0};
	size_t ref_pending = reference(stream, len, &ref), pend;

	/* max_event larger than the stream: nothing overflows. */
	FUZZ_CHECK(run(stream, len, sizes, n_sizes, len + 1, &chunked, &pend));
	FUZZ_CHECK(pend == ref_pending);
	FUZZ_CHECK(run(stream, len, NULL, 0, len + 1, &whole, &pend));
	FUZZ_CHECK(pend == ref_pending);
	FUZZ_CHECK(run(stream, len, &one, 1, len + 1, &bytes, &pend));
	FUZZ_CHECK(pend == ref_pending);
	same_events(&ref, &chunked);
	same_events(&ref, &whole);
	same_events(&ref, &bytes);
	evs_free(&chunked);
	evs_free(&whole);
	evs_free(&bytes);

	/* A small cap: overflowing does not depend on the split either. */
	size_t cap = 1 + (size_t)data[0] / 4;
	bool ok_chunked = run(stream, len, sizes, n_sizes, cap, &chunked, &pend);
	bool ok_whole = run(stream, len, NULL, 0, cap, &whole, &pend);
	FUZZ_CHECK(ok_chunked == ok_whole);
	same_events(&chunked, &whole);
	/* Without overflow, the events are the reference's. */
	if (ok_whole)
		same_events(&ref, &whole);
	evs_free(&chunked);
	evs_free(&whole);
	evs_free(&ref);
	return 0;
}
