/* json_scan_bench.c — instructions per request body: jansson's parse (what request.c does today) vs
 * json_scan.
 *
 * Each side does what the request path needs from a body: validate it, read model and stream,
 * the prompt estimate and the completion budget. Run under callgrind (bench/profile.sh step 4):
 *   valgrind --tool=callgrind --toggle-collect=with_jansson --toggle-collect=with_scan \
 *            ./json_scan_bench [BODY_FILE] [N]
 * and read the two functions' inclusive counts ÷ N. Without a file, the bench's chat body.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "sluice/json_scan.h"
#include "sluice/usage.h"

static const char chat[] =
        "{\"model\":\"mock-model\",\"stream\":false,\"mock\":{\"tokens\":64},\"temperature\":0.2,"
        "\"max_tokens\":256,\"messages\":[{\"role\":\"system\",\"content\":\"You are a concise "
        "assistant. Answer in one short paragraph.\"},{\"role\":\"user\",\"content\":\"Summarise "
        "why a gateway in front of several model providers helps with quotas, fallback and "
        "observability.\"}]}";

static volatile uint64_t sink;

__attribute__((noinline)) static void with_jansson(const char *b, size_t n)
{
	json_t *j = json_loadb(b, n, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);
	if (j == NULL || !json_is_object(j))
		abort();
	const char *model = json_string_value(json_object_get(j, "model"));
	sink += model ? strlen(model) : 0;
	sink += json_is_true(json_object_get(j, "stream"));
	sink += usage_estimate_prompt(j);
	sink += usage_completion_budget(j, USAGE_DEFAULT_COMPLETION_BUDGET);
	json_decref(j);
}

__attribute__((noinline)) static void with_scan(const char *b, size_t n)
{
	struct json_scan s;
	char model[256];
	if (json_scan_body(b, n, &s) != JSON_SCAN_OK)
		abort();
	sink += json_scan_string(&s.member[JSON_SCAN_MODEL], model, sizeof(model));
	sink += s.member[JSON_SCAN_STREAM].type == JSON_SCAN_TRUE;
	sink += json_scan_estimate_prompt(&s);
	sink += json_scan_completion_budget(&s, USAGE_DEFAULT_COMPLETION_BUDGET);
}

int main(int argc, char **argv)
{
	const char *body = chat;
	size_t len = sizeof(chat) - 1;
	long n = argc > 2 ? atol(argv[2]) : 1000;

	if (argc > 1 && strcmp(argv[1], "-") != 0) {
		FILE *f = fopen(argv[1], "rb");
		static char buf[1 << 24];
		if (f == NULL)
			return 1;
		len = fread(buf, 1, sizeof(buf), f);
		fclose(f);
		body = buf;
	}
	for (long i = 0; i < n; i++) {
		with_jansson(body, len);
		with_scan(body, len);
	}
	printf("body %zu bytes, %ld rounds\n", len, n);
	return 0;
}
