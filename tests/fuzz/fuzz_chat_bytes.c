/* fuzz_chat_bytes.c — the response policies over a chat answer's bytes (chat_bytes.c) against the
 * same policies over jansson's tree (policy_run_chat_chunk / policy_run_chat_completion).
 *
 * For any input the byte reader takes (res.read): jansson parses it too (the reader accepts
 * nothing jansson refuses, but for the two documented differences: a number beyond jansson's
 * range), the verdicts are the same, and the document the client gets — the input when
 * nothing changed, else the spliced output, which must itself be valid JSON — is equal, as
 * JSON, to the tree the tree path rewrote. So a mask can never break the JSON or its
 * escaping, and the policies see decoded text (a digit written \u0031 is masked as a digit).
 *
 * Input: byte 0 picks the configuration and the shape (chunk or answer); with byte 1 '{' the
 * rest is taken as the document itself; otherwise the rest builds one from a template (one
 * or two choices, finish_reason before or after the text, null or absent content, repeated
 * or escaped keys) whose texts are made of tokens dense in digits, escapes and multi-byte
 * characters. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <jansson.h>

#include "sluice/config.h"
#include "sluice/policy.h"
#include "sluice/policy_chain.h"

#include "fuzz_policy.h"

static const char *const configs[] = {
        "      - response_guard: { deny: [\"\\\\b\\\\d{16}\\\\b\", \"\\\\d{3}\"] }\n",
        "      - response_guard: { deny: [\"\\\\d{2}\"], action: block }\n",
        "      - response_guard: { deny: [\"[\\\"\\\\\\\\\\\\n]\"], mask: \"\\\"\\\\\\\\\\u0001\" }\n",
        ("      - response_guard: { deny: [\"a\\\\d\"], hold: 4 }\n"
         "      - loop_guard: { max_repeats: 3, window: 12, min_period: 1 }\n"),
};
#define N_CONFIGS (sizeof configs / sizeof configs[0])

static const char *const tokens[] = {
        "1",  "2",      "3",      "a",      " ",       "\\u0031", "\\u0032", "\\n",
        "\\\"", "\\\\", "\\/",    "\\t",    "\\u00e9", "é",       "密",      "\\ud83d\\ude00",
        "😀", "\\u0000", "\\u001f", "\\b",  "x",       "9",       "0",       "\\r",
};
#define N_TOKENS (sizeof tokens / sizeof tokens[0])

static const char *const templates[] = {
        /* %s: texts; chunks */
        "{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,"
        "\"delta\":{\"content\":\"%s\"},\"finish_reason\":null}]}",
        "{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"%s\"},\"finish_reason\":\"stop\"}]}",
        "{\"choices\":[{\"finish_reason\":\"stop\",\"delta\":{},\"index\":0}]}",
        "{\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":null},"
        "\"finish_reason\":\"length\"}]}",
        "{\"choices\":[{\"index\":1,\"delta\":{\"content\":\"%s\"}},{\"index\":0,\"delta\":"
        "{\"content\":\"%s\"},\"finish_reason\":\"stop\"}], \"usage\" : null }",
        "{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"%s\",\"content\":\"1234\"}}]}",
        "{\"choices\":[{\"index\":0,\"delta\":{\"cont\\u0065nt\":\"%s\"}}]}",
        "{\"choices\":[{\"index\":-0,\"delta\":{\"content\":\"%s\"}},7,null]}",
        /* answers */
        "{\"id\":\"x\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\"message\":"
        "{\"role\":\"assistant\",\"content\":\"%s\"},\"finish_reason\":\"stop\"}],"
        "\"usage\":{\"prompt_tokens\":1}}",
        "{\"choices\":[{\"message\":{\"content\":\"%s\"}},{\"message\":{\"content\":\"%s\"},"
        "\"finish_reason\":null,\"index\":1}]}",
        "{\"choices\":[{\"message\":{\"content\":\"%s\",\"tool_calls\":[]},\"index\":2e0}]}",
};
#define N_TEMPLATES (sizeof templates / sizeof templates[0])
#define N_CHUNK_TEMPLATES 8

static struct config *loaded[N_CONFIGS];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	for (size_t i = 0; i < N_CONFIGS; i++)
		loaded[i] = fuzz_chat_route(configs[i]);
	return 0;
}

static void fail(const char *what, const char *doc, size_t len)
{
	fprintf(stderr, "%s: [%.*s]\n", what, (int)len, doc);
	abort();
}

/* The text of the input's tokens, two halves (for two-choice templates). */
static void texts(const uint8_t *p, size_t n, struct evbuffer *a, struct evbuffer *b)
{
	for (size_t i = 0; i < n; i++) {
		const char *t = tokens[p[i] % N_TOKENS];
		evbuffer_add(i < n / 2 ? a : b, t, strlen(t));
	}
}

static void check_exact(const struct config *c, bool chunk, const char *doc, size_t len);

/* The document in a buffer of exactly its size, so that a read past its end is caught (by
 * ASan under libFuzzer, by valgrind on the replay). */
static void check(const struct config *c, bool chunk, const char *doc, size_t len)
{
	char *copy = malloc(len ? len : 1);
	if (copy == NULL)
		abort();
	memcpy(copy, doc, len);
	check_exact(c, chunk, copy, len);
	free(copy);
}

static void check_exact(const struct config *c, bool chunk, const char *doc, size_t len)
{
	static const struct policy_env env = {.request_id = "fuzz", .route = "chat"};
	struct policy_run *rb = policy_run_new(&c->routes[0], &env, chunk);
	struct policy_run *rt = policy_run_new(&c->routes[0], &env, chunk);
	struct evbuffer *out = evbuffer_new();
	struct policy_chat_bytes res;
	json_error_t err;

	if (rb == NULL || rt == NULL || out == NULL)
		abort();
	/* half the time through the run's kept scan, as request.c does for an answer */
	bool kept = (len & 1) != 0, readable = false;
	if (kept)
		readable = policy_run_chat_bytes_readable(rb, doc, len, chunk);
	enum policy_verdict vb = policy_run_chat_bytes(rb, doc, len, chunk, out, &res);
	if (res.read != policy_chat_bytes_readable(doc, len, chunk) || (kept && readable != res.read))
		fail("policy_chat_bytes_readable disagrees", doc, len);
	json_t *tree = json_loadb(doc, len, JSON_ALLOW_NUL, &err);
	if (res.read && tree == NULL && strstr(err.text, "too big") == NULL &&
	    strstr(err.text, "overflow") == NULL)
		fail("read by the bytes, refused by jansson", doc, len);
	if (res.read && !chunk && !json_is_array(json_object_get(tree, "choices")))
		fail("an answer without choices was read", doc, len);
	if (res.read && json_is_object(tree)) {
		enum policy_verdict vt = chunk ? policy_run_chat_chunk(rt, tree)
		                               : policy_run_chat_completion(rt, tree);
		if (vt != vb) {
			fprintf(stderr, "verdicts: bytes %d, tree %d\n", vb, vt);
			fail("the verdicts differ", doc, len);
		}
		if (vb != POLICY_REFUSE) {
			size_t n = res.changed ? evbuffer_get_length(out) : len;
			const char *got = res.changed ? (const char *)evbuffer_pullup(out, -1) : doc;
			if (got == NULL)
				got = "";
			json_t *sent = json_loadb(got, n, JSON_ALLOW_NUL, &err);
			if (sent == NULL) {
				fprintf(stderr, "%s\n", err.text);
				fail("the spliced document is not JSON", got, n);
			}
			if (!json_equal(sent, tree)) {
				char *t = json_dumps(tree, JSON_COMPACT | JSON_ENCODE_ANY);
				fprintf(stderr, "tree path: %s\n", t ? t : "?");
				free(t);
				fprintf(stderr, "input: [%.*s]\n", (int)len, doc);
				fail("the bytes path sent another document", got, n);
			}
			json_decref(sent);
		}
	}
	json_decref(tree);
	evbuffer_free(out);
	policy_run_free(rb);
	policy_run_free(rt);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	const struct config *c = loaded[data[0] % N_CONFIGS];
	if (data[1] == '{') {
		check(c, (data[0] & 0x80) != 0, (const char *)data + 1, size - 1);
		return 0;
	}
	size_t t = data[1] % N_TEMPLATES;
	struct evbuffer *a = evbuffer_new(), *b = evbuffer_new();
	if (a == NULL || b == NULL)
		abort();
	texts(data + 2, size - 2, a, b);
	evbuffer_add(a, "", 1);
	evbuffer_add(b, "", 1);
	const char *ta = (const char *)evbuffer_pullup(a, -1);
	const char *tb = (const char *)evbuffer_pullup(b, -1);
	size_t cap = strlen(templates[t]) + strlen(ta) + strlen(tb) + 1;
	char *doc = malloc(cap);
	if (doc == NULL)
		abort();
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
	int n = snprintf(doc, cap, templates[t], ta, tb);
#pragma GCC diagnostic pop
	if (n > 0)
		check(c, t < N_CHUNK_TEMPLATES, doc, (size_t)n);
	free(doc);
	evbuffer_free(a);
	evbuffer_free(b);
	return 0;
}
