/* fuzz_provider_response.c — arbitrary bytes as an upstream answer and as an upstream error.
 *
 * As JSON, the bytes are read by each codec's response_to_chat, and every pivot it gives
 * (and the bytes themselves, as a pivot) is turned into every codec's client answer, the
 * bytes also standing for the client's request that answers echo. As raw bytes with a
 * length, they are read by every codec's and provider's error_to_openai, and what comes
 * out is written as every codec's client error. Nothing may crash, leak or read out of
 * bounds (the bytes are not NUL-terminated).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <jansson.h>

#include "sluice/provider.h"

static const enum proto protos[] = {PROTO_CHAT, PROTO_MESSAGES, PROTO_RESPONSES};

static void fz_answers(const json_t *pivot, const struct proto_reply_ctx *ctx)
{
	for (size_t j = 0; j < 3; j++) {
		json_t *out = proto_codec(protos[j])->response_from_chat(pivot, ctx);
		char *s = out ? json_dumps(out, JSON_COMPACT) : NULL;

		free(s);
		json_decref(out);
	}
}

static void fz_errors(const uint8_t *data, size_t size, int status)
{
	struct evbuffer *out = evbuffer_new();
	char *copy = malloc(size ? size : 1);

	if (out == NULL || copy == NULL)
		abort();
	/* exactly size bytes on the heap: a read past them is caught */
	memcpy(copy, data, size);
	for (size_t i = 0; i < 3 + 2; i++) {
		struct proto_error err = {0};
		bool ok;

		if (i < 3)
			ok = proto_codec(protos[i])->error_to_openai(copy, size, status, &err);
		else
			ok = provider_ops(i == 3 ? PROVIDER_AZURE_OPENAI : PROVIDER_GEMINI)
			             ->error_to_openai(copy, size, status, &err);
		if (!ok)
			continue;
		if (err.type == NULL || err.code == NULL)
			abort();
		struct proto_error_out e = {.status = err.status,
		                            .type = err.type,
		                            .code = err.code,
		                            .message = err.message};
		for (size_t j = 0; j < 3; j++) {
			proto_codec(protos[j])->error_body(&e, out);
			proto_codec(protos[j])->stream_error(NULL, &e, out);
		}
	}
	free(copy);
	evbuffer_free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	json_t *body = json_loadb((const char *)data, size, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
	struct proto_reply_ctx ctx = {.request_id = "fz", .created = 1700000000, .request = body};

	fz_errors(data, size, size % 2 ? 529 : 400);
	if (body == NULL)
		return 0;
	ctx.model = size % 3 ? "public" : NULL;
	fz_answers(body, &ctx);
	for (size_t i = 0; i < 3; i++) {
		json_t *pivot = proto_codec(protos[i])->response_to_chat(body, &ctx);

		if (pivot == NULL)
			continue;
		fz_answers(pivot, &ctx);
		json_decref(pivot);
	}
	json_decref(body);
	return 0;
}
