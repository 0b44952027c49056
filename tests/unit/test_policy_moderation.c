/* test_policy_moderation.c — moderation against a local /v1/moderations responder (evhttp on the
 * test's own loop, driven with the worker's upstream engine): configuration errors; requests
 * flagged, passed, timed out and failed under both on_error settings, and cancelled while
 * pending; categories and thresholds; non-stream answers withheld; streams stopped by a
 * flagged window, and clean streams reviewed window by window with their overlap. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <curl/curl.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/listener.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>

#include "policy_helpers.h"
#include "sluice/upstream.h"

/* ---------------------------------------------------------------- the responder */

static struct {
	struct event_base *base;
	struct upstream *up;
	struct evhttp *http;
	int port;
	int requests;
	char last_input[4096];
	char inputs[8][512]; /* the first few, in order */
	struct policy_env env;
	struct event *tick; /* wakes the loop now and then, so that loop_until's deadline works */
} T;

static bool contains(const char *s, const char *w)
{
	return strstr(s, w) != NULL;
}

/* Flags "kill" as violence (0.9) and "hurt" as self-harm (0.6); "slow" is never answered,
 * "status500" gets a 500, "garbage" something that is not JSON. */
static void on_moderation(struct evhttp_request *req, void *arg)
{
	struct evbuffer *in = evhttp_request_get_input_buffer(req);
	size_t n = evbuffer_get_length(in);
	json_t *body = json_loadb((const char *)evbuffer_pullup(in, -1), n, 0, NULL);
	const char *text = json_string_value(json_object_get(body, "input"));
	struct evbuffer *out = evbuffer_new();

	if (text == NULL)
		text = "";
	snprintf(T.last_input, sizeof T.last_input, "%s", text);
	if (T.requests < 8)
		snprintf(T.inputs[T.requests], sizeof T.inputs[0], "%s", text);
	T.requests++;
	if (contains(text, "slow")) {
		json_decref(body);
		evbuffer_free(out);
		return; /* the client gives up; evhttp frees the request with its connection */
	}
	if (contains(text, "status500")) {
		evhttp_send_reply(req, 500, "Internal Server Error", NULL);
	} else if (contains(text, "garbage")) {
		evbuffer_add_printf(out, "{not json");
		evhttp_send_reply(req, 200, "OK", out);
	} else {
		bool kill = contains(text, "kill"), hurt = contains(text, "hurt");
		evbuffer_add_printf(out,
		                    "{\"id\":\"m\",\"model\":\"%s\",\"results\":[{\"flagged\":%s,"
		                    "\"categories\":{\"violence\":%s,\"self-harm\":%s},"
		                    "\"category_scores\":{\"violence\":%g,\"self-harm\":%g}}]}",
		                    json_string_value(json_object_get(body, "model"))
		                            ? json_string_value(json_object_get(body, "model"))
		                            : "default",
		                    kill || hurt ? "true" : "false", kill ? "true" : "false",
		                    hurt ? "true" : "false", kill ? 0.9 : 0.01, hurt ? 0.6 : 0.01);
		evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
		                  "application/json");
		evhttp_send_reply(req, 200, "OK", out);
	}
	evbuffer_free(out);
	json_decref(body);
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
}

static int setup(void **state)
{
	curl_global_init(CURL_GLOBAL_DEFAULT);
	memset(&T, 0, sizeof T);
	T.base = event_base_new();
	T.up = upstream_new(T.base);
	T.http = evhttp_new(T.base);
	assert_non_null(T.http);
	evhttp_set_cb(T.http, "/v1/moderations", on_moderation, NULL);
	struct evhttp_bound_socket *bs = evhttp_bind_socket_with_handle(T.http, "127.0.0.1", 0);
	assert_non_null(bs);
	struct sockaddr_in sin;
	socklen_t len = sizeof sin;
	getsockname(evhttp_bound_socket_get_fd(bs), (struct sockaddr *)&sin, &len);
	T.port = ntohs(sin.sin_port);
	T.env = pt_env;
	T.env.base = T.base;
	T.env.upstream = T.up;
	struct timeval tv = {0, 100000};
	T.tick = event_new(T.base, -1, EV_PERSIST, on_tick, NULL);
	event_add(T.tick, &tv);
	return 0;
}

static int teardown(void **state)
{
	event_free(T.tick);
	evhttp_free(T.http);
	upstream_free(T.up);
	event_base_free(T.base);
	curl_global_cleanup();
	return 0;
}

/* Turns the loop until *flag is set (a deadline only so that a bug fails instead of hangs). */
static void loop_until(const bool *flag)
{
	time_t deadline = time(NULL) + 30;
	while (!*flag) {
		event_base_loop(T.base, EVLOOP_ONCE);
		if (time(NULL) > deadline)
			fail_msg("nothing happened within 30 s");
	}
}

/* A route whose only plugin is `moderation: { endpoint: <responder>, <extra> }`. */
static struct config *load(const char *extra)
{
	char plugins[1024];
	snprintf(plugins, sizeof plugins,
	         "      - moderation: { endpoint: \"http://127.0.0.1:%d/v1/moderations\"%s%s }\n",
	         T.port, extra[0] ? ", " : "", extra);
	return pt_load(plugins);
}

/* ---------------------------------------------------------------- configuration */

static void test_config_errors(void **state)
{
	PT_EXPECT_ERRORS("      - moderation:\n",
	                 "t.yaml:7:9: routes[0].plugins[0].moderation: needs an endpoint: "
	                 "moderation: { endpoint: URL }");
	PT_EXPECT_ERRORS(
	        "      - moderation: { endpoint: ftp://x, threshold: 2, on: [], timeout: 0, "
	        "chunk_chars: 10, on_error: ignore }\n",
	        "t.yaml:7:33: routes[0].plugins[0].moderation.endpoint: must be an http:// "
	        "or https:// URL",
	        "t.yaml:7:53: routes[0].plugins[0].moderation.threshold: must be a number "
	        "from 0 to 1",
	        "t.yaml:7:60: routes[0].plugins[0].moderation.on: must list request, "
	        "response or both",
	        "t.yaml:7:73: routes[0].plugins[0].moderation.timeout: must be greater than "
	        "zero",
	        "t.yaml:7:89: routes[0].plugins[0].moderation.chunk_chars: must be an "
	        "integer from 65 to 1000000",
	        "t.yaml:7:103: routes[0].plugins[0].moderation.on_error: \"ignore\" is not "
	        "one of allow, deny");
	PT_EXPECT_ERRORS(
	        "      - moderation: { endpoint: \"http://m/\", on: [response], roles: "
	        "[user], auth: { query: {} } }\n",
	        "t.yaml:7:69: routes[0].plugins[0].moderation.roles: has no effect without "
	        "request in on",
	        "t.yaml:7:85: routes[0].plugins[0].moderation.auth: unknown key \"query\"");
	struct config *c =
	        pt_load("      - moderation: { endpoint: \"http://m/\", on: [response] }\n");
	assert_int_equal(pt_route(c)->plugin_phases, POLICY_PHASE_RESPONSE);
	config_unref(c);
}

/* ---------------------------------------------------------------- requests */

struct req_result {
	bool done;
	enum policy_verdict v;
};

static void on_request_done(void *arg, enum policy_verdict v)
{
	struct req_result *r = arg;
	r->done = true;
	r->v = v;
}

/* The request phase over a chat body with this user text; waits for the decision. */
static enum policy_verdict moderate_request(struct config *c, const char *text,
                                            struct policy_request *out, char *action)
{
	json_t *b = json_pack("{s:[{s:s,s:s},{s:s,s:s}]}", "messages", "role", "user", "content",
	                      "an earlier turn", "role", "user", "content", text);
	struct policy_run *run = policy_run_new(pt_route(c), &T.env, false);
	struct req_result r = {0};
	enum policy_verdict v = policy_run_request(run, PROTO_CHAT, b, on_request_done, &r);
	if (v == POLICY_PENDING) {
		loop_until(&r.done);
		v = r.v;
	}
	*out = *policy_run_request_outcome(run);
	if (action != NULL)
		pt_action(run, action, 64);
	policy_run_free(run);
	json_decref(b);
	return v;
}

static void test_request_decisions(void **state)
{
	struct config *c = load("auth: { header: { Authorization: \"Bearer k\" } }, model: omni");
	struct policy_request out;
	char action[64];

	assert_int_equal(moderate_request(c, "I will kill the process", &out, action),
	                 POLICY_REFUSE);
	assert_int_equal(out.status, 400);
	assert_string_equal(out.code, "content_flagged");
	assert_string_equal(action, "moderation:blocked");
	/* history: last: only the last user message is reviewed */
	assert_string_equal(T.last_input, "I will kill the process");
	assert_int_equal(moderate_request(c, "a kind message", &out, action), POLICY_CONTINUE);
	assert_string_equal(action, "");
	assert_int_equal(T.requests, 2);
	config_unref(c);
}

static void test_request_errors(void **state)
{
	struct policy_request out;
	char action[64];
	struct config *allow = load("timeout: 200ms, on_error: allow");
	struct config *deny = load("timeout: 200ms");

	assert_int_equal(moderate_request(allow, "slow", &out, action), POLICY_CONTINUE);
	assert_string_equal(action, "moderation:error_allowed");
	assert_int_equal(moderate_request(deny, "slow", &out, action), POLICY_REFUSE);
	assert_int_equal(out.status, 503);
	assert_string_equal(out.code, "moderation_unavailable");
	assert_string_equal(out.type, "service_unavailable");
	assert_int_equal(moderate_request(deny, "status500", &out, NULL), POLICY_REFUSE);
	assert_string_equal(out.code, "moderation_unavailable");
	assert_int_equal(moderate_request(deny, "garbage", &out, NULL), POLICY_REFUSE);
	assert_int_equal(moderate_request(allow, "garbage", &out, NULL), POLICY_CONTINUE);
	config_unref(allow);
	config_unref(deny);

	/* nothing listens: a connection error */
	struct config *c =
	        pt_load("      - moderation: { endpoint: \"http://127.0.0.1:1/v1/mod\" }\n");
	assert_int_equal(moderate_request(c, "hello", &out, NULL), POLICY_REFUSE);
	assert_string_equal(out.code, "moderation_unavailable");
	config_unref(c);
}

static void test_request_cancel(void **state)
{
	struct config *c = load("timeout: 200ms");
	json_t *b = json_pack("{s:[{s:s,s:s}]}", "messages", "role", "user", "content", "slow");
	struct policy_run *run = policy_run_new(pt_route(c), &T.env, false);
	struct req_result r = {0};
	int before = T.requests;

	assert_int_equal(policy_run_request(run, PROTO_CHAT, b, on_request_done, &r),
	                 POLICY_PENDING);
	/* let the call reach the responder, then the client goes away */
	while (T.requests == before)
		event_base_loop(T.base, EVLOOP_ONCE);
	policy_run_free(run);
	/* past the timeout: no callback comes */
	struct timeval tv = {0, 400000};
	event_base_loopexit(T.base, &tv);
	event_base_dispatch(T.base);
	assert_false(r.done);
	json_decref(b);
	config_unref(c);
}

static void test_request_chain_resumes(void **state)
{
	/* after the pending review, the rest of the chain runs */
	char plugins[512];
	snprintf(plugins, sizeof plugins,
	         "      - moderation: { endpoint: \"http://127.0.0.1:%d/v1/moderations\" }\n"
	         "      - prompt_decorator: { prepend: [{ role: system, content: S }] }\n",
	         T.port);
	struct config *c = pt_load(plugins);
	json_t *b = pt_json("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}");
	struct policy_run *run = policy_run_new(pt_route(c), &T.env, false);
	struct req_result r = {0};
	assert_int_equal(policy_run_request(run, PROTO_CHAT, b, on_request_done, &r),
	                 POLICY_PENDING);
	/* nothing after the pending policy has run yet */
	assert_int_equal(json_array_size(json_object_get(b, "messages")), 1);
	loop_until(&r.done);
	assert_int_equal(r.v, POLICY_CONTINUE);
	pt_assert_json(b, "{\"messages\":[{\"role\":\"system\",\"content\":\"S\"},{\"role\":"
	                  "\"user\",\"content\":\"hi\"}]}");
	assert_true(policy_run_request_outcome(run)->changed);
	policy_run_free(run);
	json_decref(b);
	config_unref(c);
}

static void test_categories_and_threshold(void **state)
{
	struct policy_request out;
	struct config *c = load("block_categories: [self-harm]");
	assert_int_equal(moderate_request(c, "kill it", &out, NULL), POLICY_CONTINUE);
	assert_int_equal(moderate_request(c, "it would hurt", &out, NULL), POLICY_REFUSE);
	config_unref(c);
	c = load("block_categories: [self-harm, violence], threshold: 0.8");
	assert_int_equal(moderate_request(c, "it would hurt", &out, NULL), POLICY_CONTINUE);
	assert_int_equal(moderate_request(c, "kill it", &out, NULL), POLICY_REFUSE);
	config_unref(c);
	c = load("threshold: 0.5");
	assert_int_equal(moderate_request(c, "it would hurt", &out, NULL), POLICY_REFUSE);
	config_unref(c);
}

/* ---------------------------------------------------------------- responses */

struct resp_result {
	bool done, stopped;
	const char *finish;
};

static void on_done(void *arg)
{
	((struct resp_result *)arg)->done = true;
}

static void on_stop(void *arg, const char *finish_reason)
{
	struct resp_result *r = arg;
	r->stopped = true;
	r->finish = finish_reason;
}

static void test_non_stream(void **state)
{
	struct config *c = load("on: [response]");
	for (int flagged = 0; flagged < 2; flagged++) {
		json_t *completion = pt_json(
		        flagged ? "{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
		                  "\"content\":\"I will kill you\"},\"finish_reason\":\"stop\"}]}"
		                : "{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
		                  "\"content\":\"hello\"},\"finish_reason\":\"stop\"}]}");
		struct policy_run *run = policy_run_new(pt_route(c), &T.env, false);
		struct resp_result r = {0};
		assert_int_equal(policy_run_chat_completion(run, completion), POLICY_CONTINUE);
		assert_int_equal(policy_run_done(run, on_done, &r), POLICY_PENDING);
		loop_until(&r.done);
		policy_run_chat_completion_done(run, completion);
		if (flagged) {
			assert_string_equal(policy_run_finish_reason(run, 0), "content_filter");
			pt_assert_json(
			        completion,
			        "{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
			        "\"content\":\"\"},\"finish_reason\":\"content_filter\"}]}");
		} else {
			assert_null(policy_run_finish_reason(run, 0));
			pt_assert_json(
			        completion,
			        "{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
			        "\"content\":\"hello\"},\"finish_reason\":\"stop\"}]}");
		}
		policy_run_free(run);
		json_decref(completion);
	}
	config_unref(c);
}

static void test_stream_stopped_by_a_window(void **state)
{
	struct config *c = load("on: [response], chunk_chars: 100");
	struct policy_run *run = policy_run_new(pt_route(c), &T.env, true);
	struct resp_result r = {0};
	struct evbuffer *out = evbuffer_new();
	char piece[32];

	policy_run_on_stop(run, on_stop, &r);
	/* the text flows on while its windows are reviewed */
	for (int i = 0; i < 20; i++) {
		snprintf(piece, sizeof piece, "%s%02d calm words ", i == 7 ? "kill" : "word", i);
		assert_int_equal(policy_run_text(run, 0, piece, strlen(piece), false, out),
		                 POLICY_CONTINUE);
	}
	assert_int_equal(evbuffer_get_length(out), 20 * strlen("word00 calm words "));
	loop_until(&r.stopped);
	assert_string_equal(r.finish, "content_filter");
	assert_string_equal(policy_run_stopped(run), "content_filter");
	assert_int_equal(policy_run_text(run, 0, "x", 1, false, out), POLICY_STOP);
	char action[64];
	assert_string_equal(pt_action(run, action, sizeof action), "moderation:blocked");
	evbuffer_free(out);
	policy_run_free(run);
	config_unref(c);
}

static void test_stream_windows(void **state)
{
	struct config *c = load("on: [response], chunk_chars: 100");
	struct policy_run *run = policy_run_new(pt_route(c), &T.env, true);
	struct resp_result r = {0};
	struct evbuffer *out = evbuffer_new();
	char text[400];
	int before = T.requests;

	for (int i = 0; i < 390; i++)
		text[i] = (char)('a' + i % 26);
	text[390] = '\0';
	policy_run_on_stop(run, on_stop, &r);
	for (size_t off = 0; off < 390; off += 30) {
		assert_int_equal(policy_run_text(run, 0, text + off, 30, false, out),
		                 POLICY_CONTINUE);
		event_base_loop(T.base, EVLOOP_NONBLOCK);
	}
	assert_int_equal(policy_run_flush(run, NULL, NULL), POLICY_CONTINUE);
	/* the end waits for the last window's answer */
	enum policy_verdict v = policy_run_done(run, on_done, &r);
	if (v == POLICY_PENDING)
		loop_until(&r.done);
	assert_false(r.stopped);
	assert_null(policy_run_stopped(run));
	/* every character was reviewed; each window after the first starts with the last 64
	 * characters of the one before */
	int calls = T.requests - before;
	assert_true(calls >= 2);
	size_t covered = strlen(T.inputs[before]);
	for (int i = before + 1; i < T.requests && i < 8; i++) {
		const char *prev = T.inputs[i - 1], *cur = T.inputs[i];
		assert_memory_equal(cur, prev + strlen(prev) - 64, 64);
		covered += strlen(cur) - 64;
	}
	if (T.requests <= 8)
		assert_int_equal(covered, 390);
	evbuffer_free(out);
	policy_run_free(run);
	config_unref(c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_config_errors),
	        cmocka_unit_test_setup_teardown(test_request_decisions, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_request_errors, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_request_cancel, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_request_chain_resumes, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_categories_and_threshold, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_non_stream, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_stream_stopped_by_a_window, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_stream_windows, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
