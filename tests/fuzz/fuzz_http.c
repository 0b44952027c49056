/* fuzz_http.c — libFuzzer target: the HTTP/1.1 head scanner and parser, and the chunked body
 * decoder, over arbitrary bytes fed in arbitrary pieces.
 *
 * Input: byte 0 picks the parser (even: head, odd: chunked) and, for chunked, the limits;
 * byte 1 seeds the piece sizes; the rest is what a client would send. Besides the
 * sanitizers, each run checks that the result does not depend on how the bytes were split
 * and that what the parser hands on holds the promises of http.h.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/http.h"

/* Piece sizes from a seed: 1 to 16 bytes, or sometimes a long run. */
struct splitter {
	uint32_t x;
};

static size_t next_piece(struct splitter *s, size_t left)
{
	s->x ^= s->x << 13;
	s->x ^= s->x >> 17;
	s->x ^= s->x << 5;
	size_t n = (s->x & 7) == 0 ? 1 + (s->x >> 8) % 4096 : 1 + (s->x >> 8) % 16;
	return n < left ? n : left;
}

static void check(int ok)
{
	if (!ok)
		abort();
}

/* ---------------------------------------------------------------- heads */

static enum http_head_result scan(const uint8_t *p, size_t len, uint8_t seed, size_t *head_len)
{
	struct http_head_scan sc;
	struct splitter sp = {.x = 0x9e3779b9u ^ seed};
	enum http_head_result res = HTTP_HEAD_INCOMPLETE;

	memset(&sc, 0, sizeof(sc));
	for (size_t off = 0; off < len && res == HTTP_HEAD_INCOMPLETE;) {
		size_t n = seed ? next_piece(&sp, len - off) : len - off;
		res = http_head_scan(&sc, (const char *)p + off, n, head_len);
		off += n;
	}
	return res;
}

static int is_string_in(const char *s, const char *buf, size_t len)
{
	if (s < buf || s >= buf + len)
		return 0;
	size_t n = strnlen(s, (size_t)(buf + len - s));
	return s + n < buf + len; /* terminated inside the buffer */
}

static void check_request(const struct http_request *r, const char *buf, size_t len)
{
	check(is_string_in(r->method, buf, len) && r->method[0] != '\0');
	check(is_string_in(r->path, buf, len) && r->path[0] == '/');
	check(r->query == NULL || is_string_in(r->query, buf, len));
	check(r->minor >= 0 && r->minor <= 9);
	check(r->n_headers <= HTTP_MAX_HEADERS);
	for (const char *c = r->path; *c; c++)
		check((unsigned char)*c > 0x20 && (unsigned char)*c < 0x7f);
	for (size_t i = 0; i < r->n_headers; i++) {
		const char *n = r->headers[i].name, *v = r->headers[i].value;
		check(is_string_in(n, buf, len) && n[0] != '\0');
		check(is_string_in(v, buf, len));
		for (; *n; n++)
			check(!(*n >= 'A' && *n <= 'Z') && (unsigned char)*n > 0x20 && *n != ':');
		for (; *v; v++)
			check(*v == '\t' || ((unsigned char)*v >= 0x20 && *v != 0x7f));
	}
	if (r->chunked)
		check(r->minor >= 1 && r->content_length == 0);
}

static enum http_head_result parse_copy(const uint8_t *p, size_t len, struct http_request *r,
                                        char **buf)
{
	const char *why = NULL;

	*buf = malloc(len ? len : 1);
	if (*buf == NULL)
		abort();
	memcpy(*buf, p, len);
	memset(r, 0, sizeof(*r));
	enum http_head_result res = http_parse_head(*buf, len, r, &why);
	check(res == HTTP_HEAD_OK || why != NULL);
	if (res == HTTP_HEAD_OK)
		check_request(r, *buf, len);
	return res;
}

static void fuzz_head(const uint8_t *p, size_t len, uint8_t seed)
{
	size_t whole_len = 0, split_len = 0;
	enum http_head_result whole = scan(p, len, 0, &whole_len);
	enum http_head_result split = scan(p, len, seed, &split_len);
	check(whole == split);
	check(whole != HTTP_HEAD_OK || whole_len == split_len);
	check(whole != HTTP_HEAD_TOO_LARGE);

	struct http_request all, head;
	char *all_buf, *head_buf = NULL;
	enum http_head_result parsed_all = parse_copy(p, len, &all, &all_buf);
	if (whole == HTTP_HEAD_OK) {
		check(whole_len <= len);
		/* The parser stops at the empty line: bytes after it change nothing. */
		enum http_head_result parsed_head = parse_copy(p, whole_len, &head, &head_buf);
		check(parsed_head == parsed_all);
		if (parsed_head == HTTP_HEAD_OK) {
			check(all.n_headers == head.n_headers && all.minor == head.minor &&
			      all.chunked == head.chunked &&
			      all.content_length == head.content_length);
			check(strcmp(all.path, head.path) == 0 &&
			      strcmp(all.method, head.method) == 0);
		}
	} else {
		/* No end found, or a bare LF / an over-long line before it: never a request. */
		check(parsed_all != HTTP_HEAD_OK);
	}
	free(all_buf);
	free(head_buf);
}

/* ---------------------------------------------------------------- chunked bodies */

struct decoded {
	enum http_chunked_result res;
	uint8_t *body;
	size_t body_len;
	size_t consumed;
};

static void decode(const uint8_t *p, size_t len, uint8_t seed, uint64_t max_body,
                   uint64_t max_trailer, struct decoded *d)
{
	struct http_chunked ch;
	struct splitter sp = {.x = 0x85ebca6bu ^ seed};

	memset(&ch, 0, sizeof(ch));
	ch.max_body = max_body;
	ch.max_trailer = max_trailer;
	d->res = HTTP_CHUNKED_MORE;
	d->body = malloc(len ? len : 1);
	if (d->body == NULL)
		abort();
	d->body_len = 0;
	size_t off = 0;
	while (off < len && d->res == HTTP_CHUNKED_MORE) {
		size_t n = seed ? next_piece(&sp, len - off) : len - off, done = 0;
		while (done < n && d->res == HTTP_CHUNKED_MORE) {
			size_t used = 0, data = 0;
			const char *why = NULL;
			d->res = http_chunked_feed(&ch, (const char *)p + off + done, n - done,
			                           &used, &data, &why);
			check(used + data <= n - done);
			check(d->res == HTTP_CHUNKED_MORE || d->res == HTTP_CHUNKED_DONE ||
			      why != NULL);
			memcpy(d->body + d->body_len, p + off + done + used, data);
			d->body_len += data;
			done += used + data;
			check(d->res != HTTP_CHUNKED_MORE || used + data > 0);
		}
		off += done;
	}
	d->consumed = off;
	check(ch.total == d->body_len && d->body_len <= max_body);
}

static void fuzz_chunked(const uint8_t *p, size_t len, uint8_t mode, uint8_t seed)
{
	/* Small limits, so that the fuzzer reaches them; sometimes none at all. */
	uint64_t max_body = (mode & 2) ? UINT64_MAX : (uint64_t)(mode >> 2) * 16;
	uint64_t max_trailer = 1 + (mode >> 4) * 8;
	struct decoded whole, split;

	decode(p, len, 0, max_body, max_trailer, &whole);
	decode(p, len, seed | 1, max_body, max_trailer, &split);
	check(whole.res == split.res && whole.body_len == split.body_len);
	check(memcmp(whole.body, split.body, whole.body_len) == 0);
	/* Where it stopped is the same too, except when both simply ran out of input. */
	check(whole.res == HTTP_CHUNKED_MORE || whole.consumed == split.consumed);
	free(whole.body);
	free(split.body);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	if (data[0] & 1)
		fuzz_chunked(data + 2, size - 2, data[0], data[1]);
	else
		fuzz_head(data + 2, size - 2, data[1]);
	return 0;
}
