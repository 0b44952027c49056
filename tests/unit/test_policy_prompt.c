/* test_policy_prompt.c — prompt.c: the prompt text by role in each protocol, and messages added
 * around the client's (chat, Anthropic Messages with its system field and role merging,
 * Responses with instructions and input). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "policy_helpers.h"
#include "sluice/prompt.h"

/* "message:role:text|..." of every piece the walk visits. */
struct seen {
	char buf[1024];
	size_t len;
};

static bool record_piece(void *arg, const struct prompt_text *t)
{
	struct seen *s = arg;
	int r = snprintf(s->buf + s->len, sizeof s->buf - s->len, "%s%zu:%s:%.*s",
	                 s->len ? "|" : "", t->message, prompt_role_names[t->role],
	                 (int)json_string_length(t->str), json_string_value(t->str));
	s->len += (size_t)r;
	return true;
}

static void expect_walk(const char *body, enum proto proto, unsigned roles, bool last,
                        const char *want)
{
	struct seen s = {.len = 0};
	json_t *b = pt_json(body);
	s.buf[0] = '\0';
	assert_true(prompt_foreach(b, proto, roles, last, record_piece, &s));
	assert_string_equal(s.buf, want);
	json_decref(b);
}

static void test_walk_chat(void **state)
{
	const char *body = "{\"messages\":[{\"role\":\"system\",\"content\":\"S\"},{\"role\":"
	                   "\"user\",\"content\":[{\"type\":\"text\",\"text\":\"U1\"},{\"type\":"
	                   "\"image_url\",\"image_url\":{\"url\":\"u\"}},{\"type\":\"text\","
	                   "\"text\":\"U2\"}]},{\"role\":\"assistant\",\"content\":null,"
	                   "\"tool_calls\":[]},{\"role\":\"tool\",\"content\":\"T\"},{\"role\":"
	                   "\"function\",\"content\":\"F\"},{\"role\":\"user\",\"content\":\"U3\"},"
	                   "\"junk\",{\"role\":7,\"content\":\"odd\"}]}";

	expect_walk(body, PROTO_CHAT, PROMPT_ALL_ROLES, false,
	            "0:system:S|1:user:U1|1:user:U2|3:tool:T|4:tool:F|5:user:U3|7:user:odd");
	expect_walk(body, PROTO_CHAT, PROMPT_ROLE_BIT(PROMPT_USER), true, "7:user:odd");
	expect_walk(body, PROTO_CHAT, PROMPT_ROLE_BIT(PROMPT_TOOL), true, "4:tool:F");
	expect_walk(body, PROTO_CHAT, PROMPT_ROLE_BIT(PROMPT_DEVELOPER), false, "");
	expect_walk("{\"messages\":\"no\"}", PROTO_CHAT, PROMPT_ALL_ROLES, false, "");
}

static void test_walk_messages(void **state)
{
	const char *body = "{\"system\":[{\"type\":\"text\",\"text\":\"S\"}],\"messages\":[{"
	                   "\"role\":\"user\",\"content\":\"U1\"},{\"role\":\"assistant\","
	                   "\"content\":[{\"type\":\"thinking\",\"thinking\":\"hm\"},{\"type\":"
	                   "\"text\",\"text\":\"A\"},{\"type\":\"tool_use\",\"id\":\"t\",\"name\":"
	                   "\"f\",\"input\":{}}]},{\"role\":\"user\",\"content\":[{\"type\":"
	                   "\"tool_result\",\"tool_use_id\":\"t\",\"content\":\"R\"},{\"type\":"
	                   "\"text\",\"text\":\"U2\"}]}]}";

	expect_walk(body, PROTO_MESSAGES, PROMPT_ALL_ROLES, false,
	            "0:system:S|1:user:U1|2:assistant:A|3:tool:R|3:user:U2");
	expect_walk(body, PROTO_COUNT_TOKENS, PROMPT_ROLE_BIT(PROMPT_USER), true, "3:user:U2");
	expect_walk("{\"system\":\"S\",\"messages\":[]}", PROTO_MESSAGES, PROMPT_ALL_ROLES, false,
	            "0:system:S");
}

static void test_walk_responses(void **state)
{
	expect_walk("{\"instructions\":\"I\",\"input\":\"U\"}", PROTO_RESPONSES, PROMPT_ALL_ROLES,
	            false, "0:system:I|1:user:U");
	expect_walk("{\"input\":[{\"role\":\"developer\",\"content\":\"D\"},{\"type\":\"message\","
	            "\"role\":\"user\",\"content\":[{\"type\":\"input_text\",\"text\":\"U\"}]},{"
	            "\"type\":\"function_call\",\"name\":\"f\",\"arguments\":\"{}\"},{\"type\":"
	            "\"function_call_output\",\"call_id\":\"c\",\"output\":\"O\"},{\"type\":"
	            "\"reasoning\",\"summary\":[]}]}",
	            PROTO_RESPONSES, PROMPT_ALL_ROLES, false, "0:developer:D|1:user:U|3:tool:O");
}

static void test_walk_legacy(void **state)
{
	expect_walk("{\"prompt\":[\"a\",\"b\",[1,2]]}", PROTO_COMPLETIONS, PROMPT_ALL_ROLES, true,
	            "0:user:a|0:user:b");
	expect_walk("{\"input\":\"e\"}", PROTO_EMBEDDINGS, PROMPT_ALL_ROLES, false, "1:user:e");
	expect_walk("{\"messages\":[{\"role\":\"user\",\"content\":\"m\"}]}", PROTO_OTHER,
	            PROMPT_ALL_ROLES, false, "0:user:m");
}

static void test_message_count(void **state)
{
	json_t *b = pt_json("{\"system\":\"s\",\"messages\":[{},{},{}]}");
	assert_int_equal(prompt_message_count(b, PROTO_MESSAGES), 3);
	json_decref(b);
	b = pt_json("{\"input\":\"x\"}");
	assert_int_equal(prompt_message_count(b, PROTO_RESPONSES), 1);
	json_decref(b);
	b = pt_json("{\"input\":[{},{}]}");
	assert_int_equal(prompt_message_count(b, PROTO_RESPONSES), 2);
	json_decref(b);
}

static const struct prompt_message sys = {PROMPT_SYSTEM, "SYS"};
static const struct prompt_message dev = {PROMPT_DEVELOPER, "DEV"};
static const struct prompt_message user = {PROMPT_USER, "USER"};
static const struct prompt_message asst = {PROMPT_ASSISTANT, "ASST"};

static void expect_insert(const char *body, enum proto proto, const struct prompt_message *m,
                          size_t n, bool before, const char *want)
{
	json_t *b = pt_json(body);
	const char *why = NULL;
	assert_true(prompt_insert(b, proto, m, n, before, &why));
	pt_assert_json(b, want);
	json_decref(b);
}

static void test_insert_chat(void **state)
{
	const struct prompt_message two[] = {sys, user};
	expect_insert("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", PROTO_CHAT, two, 2,
	              true,
	              "{\"messages\":[{\"role\":\"system\",\"content\":\"SYS\"},{\"role\":\"user\","
	              "\"content\":\"USER\"},{\"role\":\"user\",\"content\":\"hi\"}]}");
	expect_insert("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", PROTO_CHAT, &asst,
	              1, false,
	              "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":"
	              "\"assistant\",\"content\":\"ASST\"}]}");
	json_t *b = pt_json("{\"prompt\":\"x\"}");
	const char *why = NULL;
	assert_false(prompt_insert(b, PROTO_CHAT, &sys, 1, true, &why));
	assert_string_equal(why, "the request has no \"messages\" list");
	assert_false(prompt_insert(b, PROTO_COMPLETIONS, &sys, 1, true, &why));
	pt_assert_json(b, "{\"prompt\":\"x\"}");
	json_decref(b);
}

static void test_insert_messages(void **state)
{
	/* system (and developer) go to the system field, as blocks around the client's */
	const struct prompt_message s2[] = {sys, dev};
	expect_insert(
	        "{\"system\":\"client\",\"messages\":[]}", PROTO_MESSAGES, s2, 2, true,
	        "{\"system\":[{\"type\":\"text\",\"text\":\"SYS\"},{\"type\":\"text\","
	        "\"text\":\"DEV\"},{\"type\":\"text\",\"text\":\"client\"}],\"messages\":[]}");
	expect_insert("{\"system\":[{\"type\":\"text\",\"text\":\"c\",\"cache_control\":{}}],"
	              "\"messages\":[]}",
	              PROTO_MESSAGES, &sys, 1, false,
	              "{\"system\":[{\"type\":\"text\",\"text\":\"c\",\"cache_control\":{}},{"
	              "\"type\":\"text\",\"text\":\"SYS\"}],\"messages\":[]}");
	expect_insert("{\"messages\":[]}", PROTO_MESSAGES, &sys, 1, true,
	              "{\"system\":[{\"type\":\"text\",\"text\":\"SYS\"}],\"messages\":[]}");
	/* a user message before the client's first user message merges into it */
	expect_insert("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", PROTO_MESSAGES,
	              &user, 1, true,
	              "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":"
	              "\"USER\"},{\"type\":\"text\",\"text\":\"hi\"}]}]}");
	/* an assistant one after the last user message does not */
	const struct prompt_message ua[] = {user, asst};
	expect_insert("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":"
	              "\"hi\"}]}]}",
	              PROTO_MESSAGES, ua, 2, false,
	              "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":"
	              "\"hi\"},{\"type\":\"text\",\"text\":\"USER\"}]},{\"role\":\"assistant\","
	              "\"content\":\"ASST\"}]}");
	json_t *b = pt_json("{\"system\":7,\"messages\":[]}");
	const char *why = NULL;
	assert_false(prompt_insert(b, PROTO_MESSAGES, &sys, 1, true, &why));
	json_decref(b);
}

static void test_insert_responses(void **state)
{
	const struct prompt_message m[] = {sys, user};
	expect_insert("{\"instructions\":\"client\",\"input\":\"hi\"}", PROTO_RESPONSES, m, 2, true,
	              "{\"instructions\":\"SYS\\n\\nclient\",\"input\":[{\"role\":\"user\","
	              "\"content\":\"USER\"},{\"role\":\"user\",\"content\":\"hi\"}]}");
	expect_insert(
	        "{\"input\":[{\"role\":\"user\",\"content\":\"hi\"}]}", PROTO_RESPONSES, &dev, 1,
	        false,
	        "{\"instructions\":\"DEV\",\"input\":[{\"role\":\"user\",\"content\":\"hi\"}]}");
	expect_insert("{\"instructions\":\"c\",\"input\":\"hi\"}", PROTO_RESPONSES, &sys, 1, false,
	              "{\"instructions\":\"c\\n\\nSYS\",\"input\":\"hi\"}");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_walk_chat),       cmocka_unit_test(test_walk_messages),
	        cmocka_unit_test(test_walk_responses),  cmocka_unit_test(test_walk_legacy),
	        cmocka_unit_test(test_message_count),   cmocka_unit_test(test_insert_chat),
	        cmocka_unit_test(test_insert_messages), cmocka_unit_test(test_insert_responses),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
