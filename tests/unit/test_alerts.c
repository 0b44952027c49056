/* test_alerts.c — webhook alerts: delivery, headers, retries, queue bound, health transitions. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/thread.h>
#include <jansson.h>

#include "sluice/alerts.h"
#include "sluice/health.h"
#include "sluice/http.h"
#include "sluice/log.h"

/*
 * The webhook receiver is an evhttp server on the same event loop as the
 * alerts module, on a free loopback port; it records every request and
 * answers with a scripted list of statuses (then 200). Conditions are waited
 * for by running the loop against a deadline.
 */

#define MS       1000ull
#define MAX_SEEN 1100

struct seen {
	char *body;
	char *authorization;
	char *content_type;
	char *x_env;
	char *uri;
	int method;
	uint64_t at_us;
};

static struct {
	struct evhttp *http;
	int port;
	int script[8]; /* statuses to answer, in order; 0 ends; -1: never answer */
	int next;
	struct seen seen[MAX_SEEN];
	int n;
} rx;

static struct event_base *base;
static struct event *tick;

static char *dup_or_null(const char *s)
{
	return s ? strdup(s) : NULL;
}

static void rx_cb(struct evhttp_request *req, void *arg)
{
	struct evbuffer *in = evhttp_request_get_input_buffer(req);
	struct evkeyvalq *h = evhttp_request_get_input_headers(req);
	if (rx.n < MAX_SEEN) {
		struct seen *s = &rx.seen[rx.n++];
		size_t len = evbuffer_get_length(in);
		s->body = calloc(1, len + 1);
		evbuffer_copyout(in, s->body, len);
		s->authorization = dup_or_null(evhttp_find_header(h, "Authorization"));
		s->x_env = dup_or_null(evhttp_find_header(h, "X-Env"));
		/* evhttp keeps repeated headers apart: count them. */
		int n_ct = 0;
		struct evkeyval *kv;
		TAILQ_FOREACH(kv, h, next)
		{
			if (strcasecmp(kv->key, "Content-Type") == 0) {
				n_ct++;
				free(s->content_type);
				s->content_type = strdup(kv->value);
			}
		}
		if (n_ct != 1) {
			free(s->content_type);
			s->content_type = strdup("(repeated or missing)");
		}
		s->uri = strdup(evhttp_request_get_uri(req));
		s->method = evhttp_request_get_command(req);
		s->at_us = http_now_us();
	}
	int status = 200;
	if (rx.next < 8 && rx.script[rx.next] != 0)
		status = rx.script[rx.next++];
	if (status < 0)
		return; /* hang: evhttp frees it when the client gives up */
	struct evbuffer *b = evbuffer_new();
	evbuffer_add_printf(b, "{\"ok\":%s}", status < 300 ? "true" : "false");
	evhttp_send_reply(req, status, "X", b);
	evbuffer_free(b);
}

static int free_port(void)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(sin);
	bind(fd, (struct sockaddr *)&sin, sizeof(sin));
	getsockname(fd, (struct sockaddr *)&sin, &len);
	close(fd);
	return ntohs(sin.sin_port);
}

static bool rx_listen(int port)
{
	rx.http = evhttp_new(base);
	evhttp_set_gencb(rx.http, rx_cb, NULL);
	struct evhttp_bound_socket *bs =
	        evhttp_bind_socket_with_handle(rx.http, "127.0.0.1", (ev_uint16_t)port);
	if (bs == NULL)
		return false;
	struct sockaddr_in sin;
	socklen_t len = sizeof(sin);
	getsockname(evhttp_bound_socket_get_fd(bs), (struct sockaddr *)&sin, &len);
	rx.port = ntohs(sin.sin_port);
	return true;
}

static void rx_reset(void)
{
	for (int i = 0; i < rx.n; i++) {
		free(rx.seen[i].body);
		free(rx.seen[i].authorization);
		free(rx.seen[i].content_type);
		free(rx.seen[i].x_env);
		free(rx.seen[i].uri);
	}
	if (rx.http)
		evhttp_free(rx.http);
	memset(&rx, 0, sizeof(rx));
}

/* ---------------------------------------------------------------- loop */

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
}

static bool received(void *arg)
{
	return rx.n >= *(int *)arg;
}

/* The bound of every wait for something that must happen: generous, so that a loaded
 * machine is not a failure; a passing run never waits for it. */
#define WAIT_MS 30000

static bool run_until(bool (*pred)(void *), void *arg, uint64_t timeout_ms)
{
	uint64_t deadline = http_now_us() + timeout_ms * MS;
	while (!pred(arg) && http_now_us() < deadline)
		event_base_loop(base, EVLOOP_ONCE);
	return pred(arg);
}

static bool wait_received(int n, uint64_t timeout_ms)
{
	return run_until(received, &n, timeout_ms);
}

static bool never(void *arg)
{
	return false;
}

static void run_for(uint64_t ms)
{
	run_until(never, NULL, ms);
}

static bool settled(void *arg)
{
	struct alerts_stats s;
	alerts_stats(&s);
	return s.queued == 0;
}

/* Everything queued was delivered or given up on. */
static bool wait_settled(uint64_t timeout_ms)
{
	return run_until(settled, NULL, timeout_ms);
}

static struct config_kv hook_headers[] = {
        {"Authorization", "Bearer al3rt"},
        {"X-Env", "test"},
        {"Content-Type", "application/json"}, /* the body is JSON anyway: not sent twice */
};

static void configure(int port, uint64_t timeout_ms)
{
	static char url[128];
	struct config c;
	memset(&c, 0, sizeof(c));
	if (port > 0) {
		snprintf(url, sizeof(url), "http://127.0.0.1:%d/hooks/sluice", port);
		c.alerts.webhook_url = url;
	}
	c.alerts.webhook_timeout = timeout_ms;
	c.alerts.webhook_headers = hook_headers;
	c.alerts.n_webhook_headers = 3;
	alerts_configure(&c);
}

static int setup(void **state)
{
	memset(&rx, 0, sizeof(rx));
	base = event_base_new();
	tick = event_new(base, -1, EV_PERSIST, tick_cb, NULL);
	struct timeval tv = {0, 10000};
	event_add(tick, &tv);
	health_registry_init();
	if (!alerts_init(base))
		return -1;
	return 0;
}

static int teardown(void **state)
{
	alerts_shutdown();
	health_registry_free();
	rx_reset();
	event_free(tick);
	event_base_free(base);
	return 0;
}

static void check_time_format(const char *t)
{
	/* 2026-11-24T02:10:00.123Z */
	assert_non_null(t);
	assert_int_equal(strlen(t), 24);
	assert_int_equal(t[4], '-');
	assert_int_equal(t[10], 'T');
	assert_int_equal(t[19], '.');
	assert_int_equal(t[23], 'Z');
}

/* ---------------------------------------------------------------- tests */

static void passive_instance(struct config_instance *in, const char *name)
{
	static int statuses[] = {500, 502, 503, 504};
	memset(in, 0, sizeof(*in));
	in->name = (char *)name;
	in->timeouts.connect = 1000;
	in->timeouts.first_byte = 1000;
	in->passive.enabled = true;
	in->passive.http_statuses = statuses;
	in->passive.n_http_statuses = 4;
	in->passive.http_failures = 3;
	in->passive.tcp_failures = 2;
	in->passive.timeouts = 2;
	in->passive.cooldown = 100;
}

struct worker_arg {
	struct instance_state *st;
	const struct config_instance *in;
};

static void *worker_fails(void *arg)
{
	struct worker_arg *w = arg;
	for (int i = 0; i < 3; i++)
		health_report(w->st, w->in, HEALTH_HTTP_STATUS, 503, http_now_us());
	return NULL;
}

static void test_one_post_per_transition(void **state)
{
	assert_true(rx_listen(0));
	configure(rx.port, 2000);
	struct config_instance in;
	passive_instance(&in, "qwen-b");
	struct instance_state *st = health_state("qwen-b");

	/* Down from a worker thread (the loop is not running meanwhile). */
	pthread_t t;
	struct worker_arg w = {st, &in};
	pthread_create(&t, NULL, worker_fails, &w);
	pthread_join(t, NULL);
	assert_false(health_is_healthy(st));
	assert_true(wait_received(1, WAIT_MS));

	/* Up again through a trial after the cooldown. */
	uint64_t later = http_now_us() + 200 * MS;
	assert_int_equal(health_admit(st, &in, later), HEALTH_TRIAL);
	health_report(st, &in, HEALTH_OK, 200, later);
	assert_true(wait_received(2, WAIT_MS));
	assert_true(wait_settled(WAIT_MS)); /* nothing else will be sent */
	assert_int_equal(rx.n, 2); /* exactly one per transition */

	for (int i = 0; i < 2; i++) {
		struct seen *s = &rx.seen[i];
		assert_int_equal(s->method, EVHTTP_REQ_POST);
		assert_string_equal(s->uri, "/hooks/sluice");
		assert_string_equal(s->authorization, "Bearer al3rt");
		assert_string_equal(s->x_env, "test");
		assert_string_equal(s->content_type, "application/json");
	}
	json_t *a = json_loads(rx.seen[0].body, 0, NULL), *b = json_loads(rx.seen[1].body, 0, NULL);
	assert_non_null(a);
	assert_non_null(b);
	assert_string_equal(json_string_value(json_object_get(a, "event")), "instance_health");
	check_time_format(json_string_value(json_object_get(a, "time")));
	assert_string_equal(json_string_value(json_object_get(a, "instance")), "qwen-b");
	assert_string_equal(json_string_value(json_object_get(a, "from")), "healthy");
	assert_string_equal(json_string_value(json_object_get(a, "to")), "unhealthy");
	assert_string_equal(json_string_value(json_object_get(a, "source")), "passive");
	assert_string_equal(json_string_value(json_object_get(a, "reason")),
	                    "3 consecutive http 503");
	json_t *counts = json_object_get(a, "counts");
	assert_int_equal(json_integer_value(json_object_get(counts, "http_failures")), 3);
	assert_int_equal(json_integer_value(json_object_get(counts, "tcp_failures")), 0);
	assert_int_equal(json_integer_value(json_object_get(a, "transitions")), 1);

	assert_string_equal(json_string_value(json_object_get(b, "from")), "unhealthy");
	assert_string_equal(json_string_value(json_object_get(b, "to")), "healthy");
	assert_string_equal(json_string_value(json_object_get(b, "source")), "trial");
	assert_int_equal(json_integer_value(json_object_get(b, "transitions")), 2);
	json_decref(a);
	json_decref(b);

	assert_true(wait_settled(WAIT_MS));
	struct alerts_stats st_;
	alerts_stats(&st_);
	assert_int_equal(st_.sent, 2);
	assert_int_equal(st_.failed, 0);
	assert_int_equal(st_.queued, 0);
}

static void test_retries_on_5xx(void **state)
{
	assert_true(rx_listen(0));
	rx.script[0] = 500;
	rx.script[1] = 500;
	configure(rx.port, 2000);
	alerts_emit("config_reload_failed",
	            json_pack("{s:[s,s], s:s}", "errors", "sluice.yaml:3:5: routes[0]: bad",
	                      "sluice.yaml:9:1: x: unknown key", "path", "sluice.yaml"));
	assert_true(wait_received(3, WAIT_MS));
	assert_true(wait_settled(WAIT_MS)); /* delivered: no attempt after the third */
	assert_int_equal(rx.n, 3);
	assert_string_equal(rx.seen[0].body, rx.seen[1].body);
	assert_string_equal(rx.seen[1].body, rx.seen[2].body);
	/* Backoff 0.5 s then 1 s. */
	assert_true(rx.seen[1].at_us - rx.seen[0].at_us >= 450 * MS);
	assert_true(rx.seen[2].at_us - rx.seen[1].at_us >= 950 * MS);
	json_t *j = json_loads(rx.seen[2].body, 0, NULL);
	assert_string_equal(json_string_value(json_object_get(j, "event")), "config_reload_failed");
	assert_int_equal(json_array_size(json_object_get(j, "errors")), 2);
	assert_string_equal(json_string_value(json_object_get(j, "path")), "sluice.yaml");
	json_decref(j);
	assert_true(wait_settled(WAIT_MS));
	struct alerts_stats s;
	alerts_stats(&s);
	assert_int_equal(s.sent, 1);
	assert_int_equal(s.failed, 0);
}

static void test_gives_up_after_retries(void **state)
{
	assert_true(rx_listen(0));
	for (int i = 0; i < 6; i++)
		rx.script[i] = 503;
	configure(rx.port, 2000);
	alerts_emit("test", NULL);
	assert_true(wait_received(4, WAIT_MS));
	/* Given up: no fifth attempt (it would come 4 s after the fourth) once it settled. */
	assert_true(wait_settled(WAIT_MS));
	assert_int_equal(rx.n, 1 + ALERTS_RETRIES);
	struct alerts_stats s;
	alerts_stats(&s);
	assert_int_equal(s.sent, 0);
	assert_int_equal(s.failed, 1);
	assert_int_equal(s.queued, 0);
}

static void test_no_retry_on_4xx(void **state)
{
	assert_true(rx_listen(0));
	rx.script[0] = 400;
	configure(rx.port, 2000);
	alerts_emit("test", json_pack("{s:i}", "n", 1));
	alerts_emit("test", json_pack("{s:i}", "n", 2));
	assert_true(wait_received(2, WAIT_MS));
	assert_true(wait_settled(WAIT_MS));
	assert_int_equal(rx.n, 2); /* the 400 was not retried; the next event went on */
	struct alerts_stats s;
	alerts_stats(&s);
	assert_int_equal(s.sent, 1);
	assert_int_equal(s.failed, 1);
}

struct late {
	int port;
	bool started;
};

static void late_listen_cb(evutil_socket_t fd, short what, void *arg)
{
	struct late *l = arg;
	l->started = rx_listen(l->port);
}

static void test_retry_after_connect_error(void **state)
{
	/* Nothing listens at first: the receiver comes up 200 ms later, before
	 * the first retry (0.5 s). */
	struct late l = {free_port(), false};
	configure(l.port, 2000);
	alerts_emit("test", NULL);
	struct event *ev = evtimer_new(base, late_listen_cb, &l);
	struct timeval tv = {0, 200000};
	evtimer_add(ev, &tv);
	assert_true(wait_received(1, WAIT_MS));
	assert_true(l.started);
	event_free(ev);
	assert_true(wait_settled(WAIT_MS));
	struct alerts_stats s;
	alerts_stats(&s);
	assert_int_equal(s.sent, 1);
}

static void test_retry_after_timeout(void **state)
{
	assert_true(rx_listen(0));
	rx.script[0] = -1; /* the first attempt hangs */
	configure(rx.port, 200);
	alerts_emit("test", NULL);
	assert_true(wait_received(2, WAIT_MS));
	assert_true(rx.seen[1].at_us - rx.seen[0].at_us >= 650 * MS); /* 200 ms + 0.5 s */
	assert_true(wait_settled(WAIT_MS));
	struct alerts_stats s;
	alerts_stats(&s);
	assert_int_equal(s.sent, 1);
}

static void test_queue_bound_drops_oldest(void **state)
{
	assert_true(rx_listen(0));
	configure(rx.port, 2000);
	/* The loop is not running: nothing leaves the queue meanwhile. */
	for (int i = 0; i < ALERTS_QUEUE_MAX + 5; i++)
		alerts_emit("seq", json_pack("{s:i}", "seq", i));
	struct alerts_stats s;
	alerts_stats(&s);
	assert_int_equal(s.queued, ALERTS_QUEUE_MAX);
	assert_int_equal(s.dropped, 5);
	assert_true(wait_received(ALERTS_QUEUE_MAX, 60000));
	/* In order, starting after the five dropped. */
	for (int i = 0; i < ALERTS_QUEUE_MAX; i += 97) {
		json_t *j = json_loads(rx.seen[i].body, 0, NULL);
		assert_int_equal(json_integer_value(json_object_get(j, "seq")), i + 5);
		json_decref(j);
	}
	assert_true(wait_settled(WAIT_MS));
}

static void test_no_webhook_drops(void **state)
{
	configure(0, 0);
	alerts_emit("test", json_pack("{s:i}", "n", 1));
	struct alerts_stats s;
	alerts_stats(&s);
	assert_int_equal(s.queued, 0);

	/* Removing the webhook by reload drops what waits. */
	assert_true(rx_listen(0));
	configure(rx.port, 2000);
	alerts_emit("test", NULL);
	alerts_emit("test", NULL);
	configure(0, 0);
	alerts_stats(&s);
	assert_int_equal(s.queued, 0);
	assert_int_equal(s.dropped, 2);
	run_for(200);
	assert_int_equal(rx.n, 0);
}

static void *emitter(void *arg)
{
	for (int i = 0; i < 50; i++)
		alerts_emit("burst", json_pack("{s:i}", "i", i));
	return NULL;
}

static void test_emit_from_threads(void **state)
{
	assert_true(rx_listen(0));
	configure(rx.port, 2000);
	pthread_t t[4];
	for (int i = 0; i < 4; i++)
		pthread_create(&t[i], NULL, emitter, NULL);
	/* The loop runs while they emit: wake-ups arrive from other threads. */
	assert_true(wait_received(200, WAIT_MS));
	for (int i = 0; i < 4; i++)
		pthread_join(t[i], NULL);
	assert_true(wait_settled(WAIT_MS));
	assert_int_equal(rx.n, 200);
}

static void test_shutdown_with_work_in_flight(void **state)
{
	assert_true(rx_listen(0));
	rx.script[0] = -1;
	configure(rx.port, 5000);
	for (int i = 0; i < 10; i++)
		alerts_emit("test", NULL);
	assert_true(wait_received(1, WAIT_MS));
	/* teardown shuts down with one POST hanging and nine queued: ASan
	 * checks that nothing leaks. */
}

int main(void)
{
	enum log_level lvl = LOG_LEVEL_ERROR;
	if (getenv("SLUICE_TEST_LOG"))
		log_parse_level(getenv("SLUICE_TEST_LOG"), &lvl);
	log_set_level(lvl);
	evthread_use_pthreads();
	curl_global_init(CURL_GLOBAL_DEFAULT);
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test_setup_teardown(test_one_post_per_transition, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_retries_on_5xx, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_gives_up_after_retries, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_no_retry_on_4xx, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_retry_after_connect_error, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_retry_after_timeout, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_queue_bound_drops_oldest, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_no_webhook_drops, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_emit_from_threads, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_shutdown_with_work_in_flight, setup, teardown),
	};
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	curl_global_cleanup();
	return rc;
}
