/* fuzz_provider_request.c — arbitrary JSON as a client request, through every codec both ways.
 *
 * The bytes are parsed as JSON (NULs in strings allowed); each codec's request_to_chat
 * reads them as a client body, and every pivot it gives is turned into every codec's
 * upstream body, with and without a model and with instance options. The bytes are also
 * read directly as a pivot. Nothing may crash, leak or read out of bounds, and every
 * refusal must say what it refuses.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "sluice/provider.h"

static const enum proto protos[] = {PROTO_CHAT, PROTO_MESSAGES, PROTO_RESPONSES};

static void fz_upstream(const json_t *pivot, const struct config_instance *in, const char *model)
{
	for (size_t j = 0; j < 3; j++) {
		struct proto_error err = {0};
		json_t *up = proto_codec(protos[j])->request_from_chat(pivot, in, model, &err);
		char *s;

		if (up == NULL) {
			if (err.message[0] == '\0' || err.code == NULL || err.type == NULL)
				abort(); /* a refusal that says nothing */
			continue;
		}
		s = json_dumps(up, JSON_COMPACT);
		free(s);
		json_decref(up);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct config_instance in;
	json_t *body = json_loadb((const char *)data, size, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);

	if (in.options == NULL)
		in.options = json_pack("{s:i,s:i}", "max_tokens", 100, "top_k", 3);
	if (body == NULL)
		return 0;
	fz_upstream(body, NULL, "m");
	for (size_t i = 0; i < 3; i++) {
		struct proto_error err = {0};
		json_t *pivot = proto_codec(protos[i])->request_to_chat(body, &err);

		if (pivot == NULL) {
			if (err.message[0] == '\0' || err.code == NULL || err.type == NULL)
				abort();
			continue;
		}
		fz_upstream(pivot, &in, size % 2 ? "m" : NULL);
		json_decref(pivot);
	}
	json_decref(body);
	return 0;
}
