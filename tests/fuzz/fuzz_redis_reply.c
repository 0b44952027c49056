/* fuzz_redis_reply.c — libFuzzer target: any Redis reply through the store's reply handling. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <hiredis/hiredis.h>

#include "../../src/store.h"

/*
 * What a Redis server sends is bytes from outside. The store reads them with a hiredis
 * reader built like its connections' (redis_reply_reader_new: arrays capped), and
 * interprets each reply with the functions below — the admission script's answer, an
 * MGET's values, a counter, an error's text for the log, NOSCRIPT. Each must keep its
 * contract for any reply: checked here, and a violation traps.
 *
 * Input: byte 0 is how many counters the caller expects (0..16: an admission of n
 * counters, an MGET of 2n keys); byte 1 where the rest is cut in two, to feed the reader
 * in two pieces as a socket would; the rest is the server's bytes, a pipeline of replies.
 */

#define MAX_COUNTERS 16
#define MAX_REPLIES  16
#define MAX_DEPTH    16

#define CHECK(cond)                                                                                \
	do {                                                                                       \
		if (!(cond))                                                                       \
			__builtin_trap();                                                          \
	} while (0)

static bool is_digits(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (s[i] < '0' || s[i] > '9')
			return false;
	return true;
}

static void check_describe(const redisReply *r)
{
	static const size_t caps[] = {1, 2, 9, 128};
	char buf[128];

	CHECK(redis_reply_describe(r, buf, 0) == 0);
	for (size_t c = 0; c < sizeof(caps) / sizeof(caps[0]); c++) {
		size_t n = redis_reply_describe(r, buf, caps[c]);
		CHECK(n < caps[c]);
		CHECK(buf[n] == '\0');
		/* log lines stay one printable line */
		for (size_t i = 0; i < n; i++)
			CHECK(buf[i] >= 0x20 && buf[i] < 0x7f);
	}
}

static void check_u64(const redisReply *r)
{
	uint64_t v = 1;

	if (!redis_reply_u64(r, &v))
		return;
	CHECK(r != NULL);
	switch (r->type) {
	case REDIS_REPLY_NIL:
		CHECK(v == 0);
		break;
	case REDIS_REPLY_INTEGER:
		CHECK(r->integer > 0 ? v == (uint64_t)r->integer : v == 0);
		break;
	case REDIS_REPLY_STRING:
		CHECK(r->len >= 1 && r->len <= 20 && is_digits(r->str, r->len));
		break;
	default:
		CHECK(false);
	}
}

/* Every element, at every depth, as a counter and as a log text. */
static void walk(const redisReply *r, int depth)
{
	CHECK(depth <= MAX_DEPTH);
	check_describe(r);
	check_u64(r);
	if (redis_reply_is_noscript(r))
		CHECK(redis_reply_is_error(r));
	if (r != NULL && r->type == REDIS_REPLY_ARRAY)
		for (size_t i = 0; i < r->elements; i++)
			walk(r->element[i], depth + 1);
}

static void check_admit(const redisReply *r, size_t n)
{
	uint64_t cur[MAX_COUNTERS], prev[MAX_COUNTERS];
	enum redis_verdict v = redis_reply_admit(r, n, cur, prev);

	if (v == REDIS_VERDICT_BAD)
		return;
	CHECK(r->type == REDIS_REPLY_ARRAY && r->elements == 1 + 2 * n);
	CHECK(r->element[0]->integer == (v == REDIS_VERDICT_ADMITTED ? 1 : 0));
	for (size_t i = 0; i < n; i++) {
		long long c = r->element[1 + 2 * i]->integer, p = r->element[2 + 2 * i]->integer;
		CHECK(cur[i] == (c > 0 ? (uint64_t)c : 0));
		CHECK(prev[i] == (p > 0 ? (uint64_t)p : 0));
	}
}

static void check_values(const redisReply *r, size_t n)
{
	uint64_t vals[2 * MAX_COUNTERS];

	if (!redis_reply_values(r, n, vals))
		return;
	CHECK(r->type == REDIS_REPLY_ARRAY && r->elements == n);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct redisReader *rd;
	size_t n, cut;
	const char *body = (const char *)data + 2;
	size_t len;

	if (size < 2)
		return 0;
	n = data[0] % (MAX_COUNTERS + 1);
	len = size - 2;
	cut = len > 0 ? data[1] % (len + 1) : 0;
	rd = redis_reply_reader_new();
	if (rd == NULL)
		return 0;
	redisReaderFeed(rd, body, cut);
	for (int i = 0, piece = 0; i < MAX_REPLIES;) {
		void *reply = NULL;

		if (redisReaderGetReply(rd, &reply) != REDIS_OK)
			break; /* a protocol error: the store fails the connection */
		if (reply == NULL) {
			if (piece++ > 0)
				break; /* incomplete: waits for more bytes */
			redisReaderFeed(rd, body + cut, len - cut);
			continue;
		}
		walk(reply, 0);
		check_admit(reply, n);
		check_admit(reply, MAX_COUNTERS);
		check_values(reply, 2 * n);
		check_values(reply, ((const redisReply *)reply)->elements <= 2 * MAX_COUNTERS
		                            ? ((const redisReply *)reply)->elements
		                            : 0);
		freeReplyObject(reply);
		i++;
	}
	redisReaderFree(rd);
	return 0;
}
