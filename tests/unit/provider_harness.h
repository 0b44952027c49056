/* provider_harness.h — what the provider unit tests share: test data, streams fed through the
 * real SSE parser at every split, and small JSON assertions. Included by
 * tests/unit/test_provider_*.c after cmocka.h; everything is static. */
#ifndef SLUICE_PROVIDER_HARNESS_H
#define SLUICE_PROVIDER_HARNESS_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <jansson.h>

#include "sluice/provider.h"
#include "sluice/sse.h"

/* Every object the codecs synthesise in these tests carries this time. */
#define HARNESS_CREATED 1700000000LL

static inline char *read_data(const char *name, size_t *len)
{
	char path[512];
	FILE *f;
	char *buf;
	long n;

	snprintf(path, sizeof(path), "%s/providers/%s", TEST_DATA_DIR, name);
	f = fopen(path, "rb");
	assert_non_null(f);
	assert_int_equal(fseek(f, 0, SEEK_END), 0);
	n = ftell(f);
	assert_true(n >= 0);
	rewind(f);
	buf = malloc((size_t)n + 1);
	assert_non_null(buf);
	assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
	buf[n] = '\0';
	fclose(f);
	*len = (size_t)n;
	return buf;
}

static inline json_t *load_json(const char *text)
{
	json_error_t e;
	json_t *v = json_loads(text, JSON_DECODE_ANY, &e);

	if (v == NULL)
		fail_msg("bad test JSON at %d:%d: %s", e.line, e.column, e.text);
	return v;
}

static inline json_t *load_json_file(const char *name)
{
	size_t len;
	char *s = read_data(name, &len);
	json_t *v = load_json(s);

	free(s);
	return v;
}

/* The value at a path like "choices.0.message.content" (numbers index arrays). */
static inline json_t *at(const json_t *v, const char *path)
{
	char key[128];
	const char *p = path;

	while (v != NULL && *p != '\0') {
		size_t n = strcspn(p, ".");
		assert_true(n < sizeof(key));
		memcpy(key, p, n);
		key[n] = '\0';
		if (json_is_array(v))
			v = json_array_get(v, (size_t)strtoul(key, NULL, 10));
		else
			v = json_object_get(v, key);
		p += n;
		if (*p == '.')
			p++;
	}
	return (json_t *)v;
}

#define assert_str_at(v, path, s)                                                                  \
	do {                                                                                       \
		const json_t *_x = at((v), (path));                                                \
		if (!json_is_string(_x))                                                           \
			fail_msg("%s: not a string", (path));                                      \
		assert_string_equal(json_string_value(_x), (s));                                   \
	} while (0)
#define assert_int_at(v, path, n)                                                                  \
	do {                                                                                       \
		const json_t *_x = at((v), (path));                                                \
		if (!json_is_integer(_x))                                                          \
			fail_msg("%s: not an integer", (path));                                    \
		assert_int_equal(json_integer_value(_x), (n));                                     \
	} while (0)
#define assert_absent(v, path) assert_null(at((v), (path)))

/* The text of a JSON value, compact, for comparisons (caller frees). */
static inline char *dump(const json_t *v)
{
	char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);

	assert_non_null(s);
	return s;
}

#define assert_json_equal(v, text)                                                                 \
	do {                                                                                       \
		json_t *_want = load_json(text);                                                   \
		if (!json_equal((v), _want)) {                                                     \
			char *_got = dump(v);                                                      \
			fail_msg("got  %s\nwant %s", _got, (text));                                \
		}                                                                                  \
		json_decref(_want);                                                                \
	} while (0)

/* ------------------------------------------------------------------ streams */

/* One run: upstream bytes → the SSE parser → dec's decoder → pivot chunks (each dumped,
 * one per line, into chunks) → enc's encoder (when given) → client bytes in out. */
struct run {
	const struct proto_codec *dec, *enc;
	struct proto_decoder *d;
	struct proto_encoder *e;
	struct evbuffer *chunks, *out;
	bool ok;                /* every feed succeeded and no decode failed */
	struct proto_error err; /* of the failed decode */
	bool encode_failed;
};

static inline bool run_chunk(void *arg, json_t *chunk)
{
	struct run *r = arg;
	char *s = dump(chunk);

	evbuffer_add(r->chunks, s, strlen(s));
	evbuffer_add(r->chunks, "\n", 1);
	free(s);
	if (r->e != NULL && !r->enc->encode(r->e, chunk, r->out))
		r->encode_failed = true;
	return true;
}

static inline bool run_event(void *arg, const struct sse_event *ev)
{
	struct run *r = arg;

	return r->dec->decode(r->d, ev, run_chunk, r, &r->err);
}

/* Feed bytes cut at cuts[0..n) (sorted offsets), then end the encoder's stream when the
 * decode succeeded. */
static inline void run_feed(struct run *r, const struct proto_codec *dec,
                            const struct proto_codec *enc, const struct proto_reply_ctx *ctx,
                            const char *s, size_t len, const size_t *cuts, size_t n)
{
	struct sse_parser p;
	size_t from = 0;

	memset(r, 0, sizeof(*r));
	r->dec = dec;
	r->enc = enc;
	r->d = dec->decoder_new(ctx);
	assert_non_null(r->d);
	if (enc != NULL) {
		r->e = enc->encoder_new(ctx);
		assert_non_null(r->e);
	}
	r->chunks = evbuffer_new();
	r->out = evbuffer_new();
	r->ok = true;
	sse_parser_init(&p, 0);
	for (size_t i = 0; i <= n && r->ok; i++) {
		size_t to = i < n ? cuts[i] : len;
		r->ok = sse_feed(&p, s + from, to - from, run_event, r);
		from = to;
	}
	if (r->ok && r->e != NULL)
		r->enc->stream_end(r->e, NULL, r->out);
	sse_parser_free(&p);
}

static inline void run_free(struct run *r)
{
	r->dec->decoder_free(r->d);
	if (r->enc != NULL)
		r->enc->encoder_free(r->e);
	evbuffer_free(r->chunks);
	evbuffer_free(r->out);
}

static inline bool same_buffers(struct evbuffer *a, struct evbuffer *b)
{
	size_t n = evbuffer_get_length(a);

	return n == evbuffer_get_length(b) &&
	       (n == 0 || memcmp(evbuffer_pullup(a, -1), evbuffer_pullup(b, -1), n) == 0);
}

static inline void assert_same_run(struct run *want, struct run *got, const char *how, size_t at_)
{
	if (want->ok != got->ok || !same_buffers(want->chunks, got->chunks) ||
	    !same_buffers(want->out, got->out) || want->encode_failed != got->encode_failed)
		fail_msg("the stream split %s %zu gives a different result", how, at_);
	if (!want->ok)
		assert_string_equal(want->err.message, got->err.message);
}

/* Whole, then split in two at every offset, then one byte at a time: the same chunks
 * and the same client bytes every time. *whole is left for the caller's assertions
 * (run_free it). */
static inline void run_every_split(struct run *whole, const struct proto_codec *dec,
                                   const struct proto_codec *enc, const struct proto_reply_ctx *ctx,
                                   const char *s, size_t len)
{
	struct run r;
	size_t *bytes = malloc(len * sizeof(size_t));

	assert_non_null(bytes);
	run_feed(whole, dec, enc, ctx, s, len, NULL, 0);
	for (size_t k = 1; k < len; k++) {
		run_feed(&r, dec, enc, ctx, s, len, &k, 1);
		assert_same_run(whole, &r, "at", k);
		run_free(&r);
	}
	for (size_t k = 0; k + 1 < len; k++)
		bytes[k] = k + 1;
	run_feed(&r, dec, enc, ctx, s, len, bytes, len ? len - 1 : 0);
	assert_same_run(whole, &r, "into single bytes, length", len);
	run_free(&r);
	free(bytes);
}

/* The same stream with every \n written as \r\n. */
static inline char *crlf(const char *s, size_t len, size_t *out_len)
{
	char *o = malloc(2 * len + 1);
	size_t n = 0;

	assert_non_null(o);
	for (size_t i = 0; i < len; i++) {
		if (s[i] == '\n')
			o[n++] = '\r';
		o[n++] = s[i];
	}
	o[n] = '\0';
	*out_len = n;
	return o;
}

/* ------------------------------------------------------------------ reading pivot chunks */

/* What a run of pivot chunks says, summed up. */
struct pivot_summary {
	char text[4096];
	char reasoning[4096];
	char tool_ids[4][64], tool_names[4][64], tool_args[4][512];
	int n_tools;
	char finish[32];
	int n_chunks, n_finish, n_usage;
	json_int_t prompt, completion, cached;
	bool role;
};

static inline void cat(char *dst, size_t cap, const char *s)
{
	size_t n = strlen(dst);

	assert_true(n + strlen(s) < cap);
	memcpy(dst + n, s, strlen(s) + 1);
}

static inline void summarize(struct evbuffer *chunks, struct pivot_summary *s)
{
	size_t n = evbuffer_get_length(chunks);
	char *all = malloc(n + 1), *line, *save = NULL;

	memset(s, 0, sizeof(*s));
	assert_non_null(all);
	memcpy(all, n ? (char *)evbuffer_pullup(chunks, -1) : "", n);
	all[n] = '\0';
	for (line = strtok_r(all, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		json_t *c = load_json(line);
		json_t *ch = at(c, "choices.0"), *u = at(c, "usage");
		size_t i;
		json_t *tc;

		s->n_chunks++;
		assert_str_at(c, "object", "chat.completion.chunk");
		if (json_is_object(u)) {
			s->n_usage++;
			assert_int_equal(json_array_size(at(c, "choices")), 0);
			s->prompt = json_integer_value(at(u, "prompt_tokens"));
			s->completion = json_integer_value(at(u, "completion_tokens"));
			s->cached =
			        json_integer_value(at(u, "prompt_tokens_details.cached_tokens"));
			assert_int_equal(json_integer_value(at(u, "total_tokens")),
			                 s->prompt + s->completion);
		}
		if (json_is_string(at(ch, "delta.role")))
			s->role = true;
		if (json_is_string(at(ch, "delta.content")))
			cat(s->text, sizeof(s->text), json_string_value(at(ch, "delta.content")));
		if (json_is_string(at(ch, "delta.reasoning_content")))
			cat(s->reasoning, sizeof(s->reasoning),
			    json_string_value(at(ch, "delta.reasoning_content")));
		json_array_foreach(at(ch, "delta.tool_calls"), i, tc)
		{
			json_int_t k = json_integer_value(at(tc, "index"));
			assert_true(k >= 0 && k < 4);
			if (json_is_string(at(tc, "id"))) {
				assert_int_equal(k, s->n_tools);
				s->n_tools++;
				cat(s->tool_ids[k], 64, json_string_value(at(tc, "id")));
				cat(s->tool_names[k], 64,
				    json_string_value(at(tc, "function.name")));
			}
			if (json_is_string(at(tc, "function.arguments")))
				cat(s->tool_args[k], 512,
				    json_string_value(at(tc, "function.arguments")));
		}
		if (json_is_string(at(ch, "finish_reason"))) {
			s->n_finish++;
			cat(s->finish, sizeof(s->finish),
			    json_string_value(at(ch, "finish_reason")));
		}
		json_decref(c);
	}
	free(all);
}

/* ------------------------------------------------------------------ reading client SSE */

struct client_events {
	char names[256][48];
	json_t *data[256]; /* NULL for non-JSON data ([DONE]) */
	int n;
};

static inline bool client_event(void *arg, const struct sse_event *ev)
{
	struct client_events *c = arg;

	assert_true(c->n < 256);
	snprintf(c->names[c->n], sizeof(c->names[0]), "%s", ev->event);
	c->data[c->n] = json_loadb(ev->data, ev->data_len, 0, NULL);
	c->n++;
	return true;
}

static inline void parse_client(struct evbuffer *out, struct client_events *c)
{
	struct sse_parser p;
	size_t n = evbuffer_get_length(out);

	memset(c, 0, sizeof(*c));
	sse_parser_init(&p, 0);
	assert_true(
	        sse_feed(&p, n ? (const char *)evbuffer_pullup(out, -1) : "", n, client_event, c));
	assert_int_equal(sse_pending(&p), 0);
	sse_parser_free(&p);
}

static inline void client_free(struct client_events *c)
{
	for (int i = 0; i < c->n; i++)
		json_decref(c->data[i]);
}

/* The client bytes of a run fed back into dec (the client protocol's own decoder): a
 * translation and its reverse must give back the same content. */
static inline void reparse(struct evbuffer *out, const struct proto_codec *dec, struct run *r)
{
	size_t n = evbuffer_get_length(out);
	char *copy = malloc(n + 1);
	struct proto_reply_ctx ctx = {.created = HARNESS_CREATED};

	assert_non_null(copy);
	memcpy(copy, n ? (char *)evbuffer_pullup(out, -1) : "", n);
	run_feed(r, dec, NULL, &ctx, copy, n, NULL, 0);
	free(copy);
}

static inline char *buffer_string(struct evbuffer *b)
{
	size_t n = evbuffer_get_length(b);
	char *s = malloc(n + 1);

	assert_non_null(s);
	memcpy(s, n ? (char *)evbuffer_pullup(b, -1) : "", n);
	s[n] = '\0';
	return s;
}

#endif
