/* fuzz_provider_stream.c — arbitrary SSE bytes through every decoder into every encoder.
 *
 * Input: byte 0 picks the upstream codec (decoder) and the client codec (encoder), byte 1
 * the size of the pieces the stream is fed in, the rest is the stream. The stream is run
 * twice, whole and in pieces: the pivot chunks and the client bytes must be identical
 * (a translation must not depend on how the network split the stream), and nothing may
 * crash, leak or read out of bounds.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <jansson.h>

#include "sluice/provider.h"
#include "sluice/sse.h"

static const enum proto protos[] = {PROTO_CHAT, PROTO_MESSAGES, PROTO_RESPONSES};

struct fz_run {
	const struct proto_codec *dec, *enc;
	struct proto_decoder *d;
	struct proto_encoder *e;
	struct evbuffer *chunks, *out;
	struct proto_error err;
	struct record_usage usage;
	bool failed;
};

static int fz_append(const char *buf, size_t size, void *data)
{
	return evbuffer_add(data, buf, size);
}

static bool fz_chunk(void *arg, json_t *chunk)
{
	struct fz_run *r = arg;
	struct record_usage u;

	json_dump_callback(chunk, fz_append, r->chunks, JSON_COMPACT);
	evbuffer_add(r->chunks, "\n", 1);
	proto_usage_from_chat(chunk, &u);
	if (!r->enc->encode(r->e, chunk, r->out))
		evbuffer_add(r->out, "!encode\n", 8);
	return true;
}

static bool fz_event(void *arg, const struct sse_event *ev)
{
	struct fz_run *r = arg;

	r->dec->stream_usage(ev, &r->usage);
	if (!r->dec->decode(r->d, ev, fz_chunk, r, &r->err)) {
		r->failed = true;
		return false;
	}
	return true;
}

/* The stream fed in pieces of step bytes. The parser's cap (1 MiB) is above any input,
 * so both runs see the same events. */
static void fz_feed(struct fz_run *r, const struct proto_codec *dec, const struct proto_codec *enc,
                    const struct proto_reply_ctx *ctx, const uint8_t *s, size_t len, size_t step)
{
	struct sse_parser p;
	bool ok = true;

	memset(r, 0, sizeof(*r));
	r->dec = dec;
	r->enc = enc;
	r->chunks = evbuffer_new();
	r->out = evbuffer_new();
	r->d = dec->decoder_new(ctx);
	r->e = enc->encoder_new(ctx);
	if (r->d == NULL || r->e == NULL || r->chunks == NULL || r->out == NULL)
		abort();
	sse_parser_init(&p, 0);
	for (size_t off = 0; off < len && ok; off += step)
		ok = sse_feed(&p, (const char *)s + off, len - off < step ? len - off : step,
		              fz_event, r);
	if (r->failed) {
		struct proto_error_out e = {.status = r->err.status ? r->err.status : 502,
		                            .type = r->err.type,
		                            .code = r->err.code,
		                            .message = r->err.message};
		enc->stream_error(r->e, &e, r->out);
		enc->error_body(&e, r->out);
	} else {
		enc->stream_end(r->e, sse_pending(&p) ? "length" : NULL, r->out);
	}
	sse_parser_free(&p);
}

static void fz_free(struct fz_run *r)
{
	r->dec->decoder_free(r->d);
	r->enc->encoder_free(r->e);
	evbuffer_free(r->chunks);
	evbuffer_free(r->out);
}

static bool fz_same(struct evbuffer *a, struct evbuffer *b)
{
	size_t n = evbuffer_get_length(a);

	return n == evbuffer_get_length(b) &&
	       (n == 0 || memcmp(evbuffer_pullup(a, -1), evbuffer_pullup(b, -1), n) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static json_t *thinking; /* a request asking for thinking, for the Messages encoder */
	struct proto_reply_ctx ctx = {.request_id = "fz", .created = 1700000000};
	const struct proto_codec *dec, *enc;
	struct fz_run whole, pieces;

	if (size < 2)
		return 0;
	if (thinking == NULL)
		thinking = json_pack("{s:{s:s}}", "thinking", "type", "enabled");
	ctx.request = (data[0] & 0x80) ? thinking : NULL;
	ctx.include_usage = (data[0] & 0x40) != 0;
	ctx.model = (data[0] & 0x20) ? "public" : NULL;
	dec = proto_codec(protos[(data[0] & 0x1f) % 3]);
	enc = proto_codec(protos[(data[0] & 0x1f) / 3 % 3]);
	fz_feed(&whole, dec, enc, &ctx, data + 2, size - 2, size);
	fz_feed(&pieces, dec, enc, &ctx, data + 2, size - 2, 1 + data[1] % 64);
	if (!fz_same(whole.chunks, pieces.chunks) || !fz_same(whole.out, pieces.out))
		abort(); /* the result depends on where the stream was split */
	fz_free(&whole);
	fz_free(&pieces);
	return 0;
}
