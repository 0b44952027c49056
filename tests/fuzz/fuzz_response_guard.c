/* fuzz_response_guard.c — response_guard's hold-back: any split of any text gives exactly the
 * output (and the verdict) of the whole text matched at once.
 *
 * Input: byte 0 picks a configuration (patterns, mask or block), byte 1 seeds the cuts, every
 * further byte picks a token from an alphabet made of the patterns' own characters (digits,
 * separators, the letters of "secret", multi-byte characters), so that random input is dense
 * in matches and near-matches. The text then goes through the runner as one non-stream answer,
 * as a stream cut at random token boundaries, and as a stream of one token per event; the
 * three outputs must be identical. The patterns are bounded, so the default hold covers them
 * (the property holds exactly then; see response_guard.c). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "sluice/config.h"
#include "sluice/policy.h"
#include "sluice/policy_chain.h"

#include "fuzz_policy.h"

static const char *const configs[] = {
        "      - response_guard: { deny: [\"\\\\b\\\\d{16}\\\\b\"] }\n",
        "      - response_guard: { deny: [\"\\\\d{4}[ -]?\\\\d{4}[ -]?\\\\d{4}[ -]?\\\\d{4}\"] }\n",
        "      - response_guard: { deny: [\"(?<=card )\\\\d{4}\", \"(?i)secret|pass(word)?\"], "
        "mask: "
        "\"#\" }\n",
        "      - response_guard: { deny: [\"\\\\b\\\\d{16}\\\\b\"], action: block }\n",
        "      - response_guard: { deny: [\"密码\\\\d{3}\", \"(?m)^ab\"] }\n",
        "      - response_guard: { deny: [\"se(cr)?et\\\\d{0,3}\", \"\\\\d\\\\d-\\\\d\"], action: "
        "block "
        "}\n",
        "      - response_guard: { deny: [\"\\\\d{3}(?=\\\\.)\", \"x{2,4}y?\"] }\n",
};
#define N_CONFIGS (sizeof configs / sizeof configs[0])

static const char *const alphabet[] = {
        "0", "1", "2", "3", "4",  "5",  "6",     "7", "8", "9", "0", "1", "2",
        "3", " ", " ", "-", ".",  "\n", "a",     "b", "c", "d", "r", "s", "e",
        "t", "x", "y", "é", "密", "码", "card ", "S", "E", "p", "w", "o",
};
#define N_ALPHABET (sizeof alphabet / sizeof alphabet[0])

static struct config *loaded[N_CONFIGS];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	static const struct policy_env env = {.request_id = "fuzz", .route = "chat"};
	(void)env;
	for (size_t i = 0; i < N_CONFIGS; i++)
		loaded[i] = fuzz_chat_route(configs[i]);
	return 0;
}

struct result {
	char *text;
	size_t len;
	enum policy_verdict v;
};

/* tokens[0..n) through one run; cuts[i] true: an event ends after token i. */
static struct result run(const struct config *c, bool streaming, const char *const *tokens,
                         size_t n, const bool *cuts)
{
	static const struct policy_env env = {.request_id = "fuzz", .route = "chat"};
	struct policy_run *r = policy_run_new(&c->routes[0], &env, streaming);
	struct evbuffer *out = evbuffer_new(), *piece = evbuffer_new();
	struct result res = {0};
	enum policy_verdict v = POLICY_CONTINUE;

	if (r == NULL || out == NULL || piece == NULL)
		abort();
	for (size_t i = 0; i < n && v == POLICY_CONTINUE; i++) {
		evbuffer_add(piece, tokens[i], strlen(tokens[i]));
		bool last = i + 1 == n;
		if (!(streaming ? cuts[i] || last : last))
			continue;
		size_t len = evbuffer_get_length(piece);
		v = policy_run_text(r, 0, (const char *)evbuffer_pullup(piece, -1), len, !streaming,
		                    out);
		evbuffer_drain(piece, len);
	}
	if (streaming && v == POLICY_CONTINUE)
		v = policy_run_text(r, 0, "", 0, true, out);
	if (n == 0 && !streaming)
		v = policy_run_text(r, 0, "", 0, true, out);
	res.len = evbuffer_get_length(out);
	res.text = malloc(res.len + 1);
	if (res.text == NULL)
		abort();
	evbuffer_remove(out, res.text, res.len);
	res.text[res.len] = '\0';
	res.v = v;
	evbuffer_free(out);
	evbuffer_free(piece);
	policy_run_free(r);
	return res;
}

static void same(const struct result *a, const struct result *b, const char *what)
{
	if (a->len != b->len || memcmp(a->text, b->text, a->len) != 0 || a->v != b->v) {
		fprintf(stderr,
		        "%s differs from the whole text:\n  whole: [%s] (%d)\n  split: [%s] (%d)\n",
		        what, a->text, a->v, b->text, b->v);
		abort();
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	if (loaded[0] == NULL)
		LLVMFuzzerInitialize(NULL, NULL);
	const struct config *c = loaded[data[0] % N_CONFIGS];
	uint64_t rng = 0x9E3779B97F4A7C15ull ^ data[1];
	size_t n = size - 2;
	const char **tokens = malloc((n ? n : 1) * sizeof *tokens);
	bool *cuts = malloc(n ? n : 1), *every = malloc(n ? n : 1);
	if (tokens == NULL || cuts == NULL || every == NULL)
		abort();
	for (size_t i = 0; i < n; i++) {
		tokens[i] = alphabet[data[2 + i] % N_ALPHABET];
		rng ^= rng << 13;
		rng ^= rng >> 7;
		rng ^= rng << 17;
		cuts[i] = (rng & 3) == 0;
		every[i] = true;
	}
	struct result whole = run(c, false, tokens, n, NULL);
	struct result split = run(c, true, tokens, n, cuts);
	struct result single = run(c, true, tokens, n, every);
	same(&whole, &split, "random cuts");
	same(&whole, &single, "one token per event");
	free(whole.text);
	free(split.text);
	free(single.text);
	free(tokens);
	free(cuts);
	free(every);
	return 0;
}
