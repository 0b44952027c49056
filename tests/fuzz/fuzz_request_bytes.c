/* fuzz_request_bytes.c — the request policies over the client's bytes (policy_bytes.h:
 * prompt_guard, prompt_decorator, request_override, request_limits reading json_scan spans, a
 * tree parsed only when one needs it) against the same chain over jansson's tree
 * (policy_run_request).
 *
 * For any body json_scan_body() accepts: the verdicts are the same, and so are the refusal
 * (status, code, message), the decisions (policy:action, in order) and the body the upstream
 * gets — the spliced bytes, the tree, or the client's bytes — compared as JSON with the tree
 * the tree path rewrote.
 *
 * Input: byte 0 picks the configuration; with byte 1 '{' the rest is the body itself;
 * otherwise the rest builds one from a template (roles, content strings or parts, escaped
 * keys, output caps, denied parameters, nesting) whose texts are made of tokens dense in
 * escapes, NULs and the guard's phrase. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <jansson.h>

#include "sluice/config.h"
#include "sluice/json_scan.h"
#include "sluice/policy.h"
#include "sluice/policy_chain.h"

#include "fuzz_policy.h"

static const char *const configs[] = {
        /* the bench's chain (bench/pipeline.sh) */
        ("      - prompt_guard: { deny: [\"(?i)ignore (all )?previous instructions\"] }\n"
         "      - prompt_decorator: { prepend: [{ role: system, content: \"Be brief.\" }] }\n"
         "      - request_override: { cap: { max_tokens: 100 }, remove: [logit_bias] }\n"
         "      - request_limits: { max_messages: 3, max_prompt_tokens: 40, deny_params: "
         "[logprobs] }\n"),
        /* every role, the whole history, an exception; decorated at both ends first */
        ("      - prompt_decorator: { prepend: [{ role: system, content: \"x\\\"y\" }], "
         "append: [{ role: user, content: \"fin\" }] }\n"
         "      - prompt_guard: { deny: [\"ignore\", \"\\\\x00\"], allow: [\"ok\\\\n\"], "
         "roles: [system, developer, user, assistant, tool], history: all }\n"
         "      - request_limits: { max_messages: 4, max_tools: 1, max_stop: 1, max_n: 2, "
         "max_body_depth: 4 }\n"),
        /* an allow list of parameters; the last message of the system role */
        ("      - request_limits: { allow_params: [temperature, max_tokens] }\n"
         "      - prompt_guard: { deny: [\"b\"], roles: [system, tool] }\n"
         "      - request_override: { cap: { max_completion_tokens: 5, temperature: 1 } }\n"),
        /* a change to the tree before the decorator (set), then the tree read by all */
        ("      - request_override: { set: { temperature: 0 }, remove: [stop] }\n"
         "      - prompt_decorator: { append: [{ role: assistant, content: \"é\" }] }\n"
         "      - request_limits: { max_messages: 2 }\n"
         "      - prompt_guard: { deny: [\"1\"], roles: [assistant] }\n"),
        /* the decorator's splice read by the later policies, and output caps */
        ("      - prompt_decorator: { prepend: [{ role: developer, content: \"d\" }, "
         "{ role: user, content: \"u\" }] }\n"
         "      - request_override: { cap: { max_tokens: 7, max_completion_tokens: 9 } }\n"
         "      - request_limits: { max_messages: 3, max_prompt_tokens: 12, deny_params: "
         "[n] }\n"
         "      - prompt_guard: { deny: [\"^u$\"], roles: [user, developer], history: all "
         "}\n"),
};
#define N_CONFIGS (sizeof configs / sizeof configs[0])

static const char *const tokens[] = {
        "ignore ", "previous ", "instructions", "IGNORE ALL ", "a",       "b",
        "1",       " ",         "\\n",          "\\\"",       "\\\\",     "\\u0000",
        "\\u0062", "é",         "\\u00e9",      "\\ud83d\\ude00", "ok", "u",
};
#define N_TOKENS (sizeof tokens / sizeof tokens[0])

static const char *const templates[] = {
        "{\"model\":\"m\",\"messages\":[{\"role\":\"system\",\"content\":\"%s\"},{\"role\":"
        "\"user\",\"content\":\"%s\"}],\"max_tokens\":256}",
        "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"%s\"},"
        "{\"type\":\"image_url\",\"image_url\":{\"url\":\"x\"}},\"%s\"]}],\"logit_bias\":{}}",
        "{\"messages\":[{\"content\":\"%s\",\"role\":\"us\\u0065r\"},{\"role\":\"tool\","
        "\"content\":[{\"text\":\"%s\"}]}],\"stop\":[\"a\",\"b\"],\"n\":3}",
        " {\"messages\" : [ {\"role\":\"assistant\",\"content\":\"%s\"} , 7, null, "
        "{\"role\":\"function\",\"content\":\"%s\"} ] , \"max_completion_tokens\" : 12.5 } ",
        "{\"messages\":[],\"prompt\":\"%s\",\"max_tokens\":\"9\",\"tools\":[{},{}],"
        "\"x\":[[[[\"%s\"]]]]}",
        "{\"messages\":[{\"role\":\"developer\",\"content\":\"%s\"},{\"role\":\"user\\u0000x\","
        "\"content\":\"%s\"}],\"logprobs\":true,\"temperature\":2}",
        "{\"messages\":{\"role\":\"user\",\"content\":\"%s\"},\"input\":\"%s\"}",
        "{\"messages\":[{\"role\":\"system\",\"content\":[\"%s\",{\"text\":null},{\"text\":"
        "\"%s\"}]}],\"max_tokens\":null,\"functions\":null,\"stop_sequences\":\"s\"}",
};
#define N_TEMPLATES (sizeof templates / sizeof templates[0])

static struct config *loaded[N_CONFIGS];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	for (size_t i = 0; i < N_CONFIGS; i++)
		loaded[i] = fuzz_chat_route(configs[i]);
	return 0;
}

static void fail(const char *what, const char *doc, size_t len)
{
	fprintf(stderr, "%s: [%.*s]\n", what, (int)len, doc);
	abort();
}

static const struct policy_env env = {.request_id = "f", .route = "chat"};

/* "policy:action,..." of a run. */
static void actions(const struct policy_run *run, char *buf, size_t cap)
{
	const struct policy_action *a;
	size_t n = policy_run_actions(run, &a, NULL), o = 0;
	buf[0] = '\0';
	for (size_t i = 0; i < n && o < cap; i++)
		o += (size_t)snprintf(buf + o, cap - o, "%s:%s:%s,", a[i].policy, a[i].action,
		                      a[i].rule);
}

static void check(const struct config *c, const char *doc, size_t len)
{
	struct json_scan js;
	if (json_scan_body(doc, len, &js) != JSON_SCAN_OK)
		return;
	json_t *tree = json_loadb(doc, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);
	if (!json_is_object(tree))
		fail("the scan took what jansson refuses", doc, len);
	const struct config_route *rt = &c->routes[0];

	struct policy_run *a = policy_run_new(rt, &env, false);
	struct policy_run *b = policy_run_new(rt, &env, false);
	if (a == NULL || b == NULL)
		abort();
	enum policy_verdict va = policy_run_request(a, PROTO_CHAT, tree, NULL, NULL);
	enum policy_verdict vb = policy_run_request_bytes(b, PROTO_CHAT, doc, len, &js, NULL, NULL);
	const struct policy_request *oa = policy_run_request_outcome(a);
	const struct policy_request *ob = policy_run_request_outcome(b);
	if (va != vb)
		fail("verdicts differ", doc, len);
	char aa[1024], ab[1024];
	actions(a, aa, sizeof aa);
	actions(b, ab, sizeof ab);
	if (strcmp(aa, ab) != 0) {
		fprintf(stderr, "tree: %s\nbytes: %s\n", aa, ab);
		fail("decisions differ", doc, len);
	}
	json_t *got = policy_run_request_take_tree(b);
	if (va == POLICY_REFUSE) {
		if (oa->status != ob->status || strcmp(oa->code ? oa->code : "", ob->code ? ob->code : "") ||
		    strcmp(oa->message, ob->message) != 0)
			fail("refusals differ", doc, len);
	} else {
		if (oa->changed != ob->changed)
			fail("changed differs", doc, len);
		char *bytes;
		size_t blen;
		const struct json_scan *bs;
		json_t *body = NULL;
		if (ob->changed && policy_run_request_bytes_result(b, &bytes, &blen, &bs)) {
			body = json_loadb(bytes, blen, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);
			struct json_scan again;
			if (body == NULL || bs == NULL ||
			    json_scan_body(bytes, blen, &again) != JSON_SCAN_OK ||
			    again.n_members != bs->n_members || again.include_usage != bs->include_usage)
				fail("the spliced bytes do not read back", bytes, blen);
			/* the runner's scan of them, without a second pass, is the scanner's */
			for (size_t m = 0; m < JSON_SCAN_N_MEMBERS; m++) {
				const struct json_scan_value *x = &again.member[m], *y = &bs->member[m];
				if (x->type != y->type ||
				    (x->type != JSON_SCAN_ABSENT &&
				     (x->p != y->p || x->len != y->len || x->str_len != y->str_len ||
				      x->escaped != y->escaped || x->integer != y->integer)))
					fail("the kept scan differs", bytes, blen);
			}
			uint64_t est;
			if (policy_run_request_estimate(b, &est) &&
			    est != json_scan_estimate_prompt(&again))
				fail("the kept estimate differs", bytes, blen);
			free(bytes);
		} else if (got != NULL) {
			body = json_incref(got);
		} else {
			if (ob->changed)
				fail("changed, but neither bytes nor a tree", doc, len);
			uint64_t est;
			if (policy_run_request_estimate(b, &est) && est != json_scan_estimate_prompt(&js))
				fail("the kept estimate differs", doc, len);
			body = json_loadb(doc, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);
		}
		if (!json_equal(body, tree)) {
			char *x = json_dumps(tree, JSON_COMPACT), *y = json_dumps(body, JSON_COMPACT);
			fprintf(stderr, "tree:  %s\nbytes: %s\n", x, y);
			free(x);
			free(y);
			fail("bodies differ", doc, len);
		}
		json_decref(body);
	}
	json_decref(got);
	json_decref(tree);
	policy_run_free(a);
	policy_run_free(b);
}

/* The text of the input's tokens, in two halves. */
static void texts(const uint8_t *p, size_t n, struct evbuffer *x, struct evbuffer *y)
{
	for (size_t i = 0; i < n; i++) {
		const char *t = tokens[p[i] % N_TOKENS];
		evbuffer_add(i < n / 2 ? x : y, t, strlen(t));
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	const struct config *c = loaded[data[0] % N_CONFIGS];
	if (data[1] == '{') {
		check(c, (const char *)data + 1, size - 1);
		return 0;
	}
	struct evbuffer *x = evbuffer_new(), *y = evbuffer_new();
	if (x == NULL || y == NULL)
		abort();
	texts(data + 2, size - 2, x, y);
	evbuffer_add(x, "", 1);
	evbuffer_add(y, "", 1);
	char *doc = NULL;
	int n = asprintf(&doc, templates[data[1] % N_TEMPLATES],
	                 (const char *)evbuffer_pullup(x, -1), (const char *)evbuffer_pullup(y, -1));
	if (n < 0)
		abort();
	check(c, doc, (size_t)n);
	free(doc);
	evbuffer_free(x);
	evbuffer_free(y);
	return 0;
}
