/* test_metrics.c — metrics shards and exposition (checked by promtool when present), and the admin
 * API. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>

#include "sluice/admin.h"
#include "sluice/config.h"
#include "sluice/metrics.h"
#include "sluice/record.h"

#ifndef TEST_DATA_DIR
#define TEST_DATA_DIR "tests/unit/data"
#endif

/* ---------------------------------------------------------------- helpers */

static char *render(void)
{
	struct evbuffer *b = evbuffer_new();
	metrics_render(b);
	size_t n = evbuffer_get_length(b);
	char *s = malloc(n + 2);
	s[0] = '\n'; /* so that every line, the first included, is preceded by \n */
	evbuffer_remove(b, s + 1, n);
	s[n + 1] = '\0';
	evbuffer_free(b);
	return s;
}

/* The exposition contains exactly this line. */
static void expect_line(const char *text, const char *line)
{
	char pat[1024];
	snprintf(pat, sizeof(pat), "\n%s\n", line);
	if (strstr(text, pat) == NULL)
		fail_msg("missing line: %s", line);
}

static void expect_no_prefix(const char *text, const char *prefix)
{
	char pat[1024];
	snprintf(pat, sizeof(pat), "\n%s", prefix);
	if (strstr(text, pat) != NULL)
		fail_msg("unexpected line starting with: %s", prefix);
}

/* The sample lines of the family `name` (name{...} / name_bucket... excluded
 * unless they start with name followed by '{' or ' '). */
static int count_samples(const char *text, const char *name)
{
	int n = 0;
	size_t nl = strlen(name);
	for (const char *p = text; (p = strchr(p, '\n')) != NULL; p++)
		if (strncmp(p + 1, name, nl) == 0 && (p[1 + nl] == '{' || p[1 + nl] == ' '))
			n++;
	return n;
}

static bool have_promtool(void)
{
	return system("command -v promtool >/dev/null 2>&1") == 0;
}

/* ---------------------------------------------------------------- records */

static struct request_record base_record(void)
{
	struct request_record r = {0};
	r.request_id = "req-1";
	r.method = "POST";
	r.path = "/v1/chat/completions";
	r.route = "chat";
	r.consumer = "team-a";
	r.instance = "b";
	r.status = 200;
	r.upstream_status = 200;
	return r;
}

static void add_attempt(struct request_record *r, const char *inst, const char *outcome, int status,
                        uint64_t latency_us)
{
	r->attempts[r->n_attempts++] = (struct record_attempt){inst, outcome, status, latency_us};
}

/* The known mix: six requests over two workers. */
static void record_mix(void)
{
	struct metrics_shard *s0 = metrics_shard(0), *s1 = metrics_shard(1);
	assert_non_null(s0);
	assert_non_null(s1);

	/* 1 (worker 0) and 5 (worker 1): a plain success. */
	struct request_record r1 = base_record();
	add_attempt(&r1, "b", "ok", 200, 1500000);
	r1.total_us = 1600000;
	r1.upstream_us = 1500000;
	r1.overhead_us = 2000;
	r1.usage = (struct record_usage){
	        .present = true, .prompt = 100, .completion = 50, .total = 150, .cached = 10};
	metrics_record_request(s0, &r1);
	metrics_record_request(s1, &r1);

	/* 2: a fallback from c (503) to b, usage estimated. */
	struct request_record r2 = base_record();
	add_attempt(&r2, "c", "http_503", 503, 200000);
	add_attempt(&r2, "b", "ok", 200, 800000);
	r2.total_us = 1000000;
	r2.overhead_us = 300;
	r2.usage = (struct record_usage){
	        .present = true, .estimated = true, .prompt = 20, .completion = 30, .total = 50};
	metrics_record_request(s0, &r2);

	/* 3: a quota rejection. */
	struct request_record r3 = base_record();
	r3.consumer = "team-b";
	r3.instance = NULL;
	r3.status = 429;
	r3.upstream_status = 0;
	r3.error_code = "quota_exceeded";
	r3.limit_id = "consumer:team-b:*:total_tokens:1h";
	r3.total_us = 1000;
	r3.overhead_us = 1000;
	metrics_record_request(s0, &r3);

	/* 4 (worker 1): a stream, TTFT 0.4 s, 100 tokens in 2 s after it. */
	struct request_record r4 = base_record();
	r4.consumer = "team-b";
	r4.stream = true;
	add_attempt(&r4, "b", "ok", 200, 2300000);
	r4.ttft_us = 400000;
	r4.total_us = 2400000;
	r4.overhead_us = 60;
	r4.usage = (struct record_usage){
	        .present = true, .prompt = 10, .completion = 100, .total = 110, .reasoning = 5};
	metrics_record_request(s1, &r4);

	/* 6 (worker 1): every candidate failed: d skipped (unhealthy), c timed
	 * out, b refused the connection. */
	struct request_record r6 = base_record();
	add_attempt(&r6, "d", "unhealthy", 0, 0);
	add_attempt(&r6, "c", "timeout", 0, 30000000);
	add_attempt(&r6, "b", "connect_error", 0, 5000);
	r6.status = 502;
	r6.upstream_status = 0;
	r6.error_code = "upstream_failed";
	r6.total_us = 30010000;
	r6.overhead_us = 150000;
	metrics_record_request(s1, &r6);
}

/* ---------------------------------------------------------------- metrics tests */

static int setup_metrics(void **state)
{
	metrics_init(2);
	return 0;
}

static int teardown_metrics(void **state)
{
	metrics_free();
	return 0;
}

static void test_counters_summed(void **state)
{
	record_mix();
	char *t = render();

	expect_line(t, "sluice_requests_total{route=\"chat\",consumer=\"team-a\",code=\"200\"} 3");
	expect_line(t, "sluice_requests_total{route=\"chat\",consumer=\"team-a\",code=\"502\"} 1");
	expect_line(t, "sluice_requests_total{route=\"chat\",consumer=\"team-b\",code=\"200\"} 1");
	expect_line(t, "sluice_requests_total{route=\"chat\",consumer=\"team-b\",code=\"429\"} 1");
	assert_int_equal(count_samples(t, "sluice_requests_total"), 4);

	expect_line(t, "sluice_upstream_responses_total{upstream=\"b\",code=\"200\"} 4");
	expect_line(t, "sluice_upstream_responses_total{upstream=\"c\",code=\"503\"} 1");
	assert_int_equal(count_samples(t, "sluice_upstream_responses_total"), 2);

	expect_line(t, "sluice_attempts_total{upstream=\"b\",outcome=\"connect_error\"} 1");
	expect_line(t, "sluice_attempts_total{upstream=\"b\",outcome=\"ok\"} 4");
	expect_line(t, "sluice_attempts_total{upstream=\"c\",outcome=\"http_503\"} 1");
	expect_line(t, "sluice_attempts_total{upstream=\"c\",outcome=\"timeout\"} 1");
	expect_line(t, "sluice_attempts_total{upstream=\"d\",outcome=\"unhealthy\"} 1");
	assert_int_equal(count_samples(t, "sluice_attempts_total"), 5);

	/* Every attempt but the last of a request is a fallback. */
	expect_line(t,
	            "sluice_fallbacks_total{route=\"chat\",upstream=\"c\",reason=\"http_503\"} 1");
	expect_line(t,
	            "sluice_fallbacks_total{route=\"chat\",upstream=\"c\",reason=\"timeout\"} 1");
	expect_line(t,
	            "sluice_fallbacks_total{route=\"chat\",upstream=\"d\",reason=\"unhealthy\"} 1");
	assert_int_equal(count_samples(t, "sluice_fallbacks_total"), 3);

	expect_line(t,
	            "sluice_quota_rejections_total{consumer=\"team-b\",limit=\"consumer:team-b:*:"
	            "total_tokens:1h\"} 1");
	assert_int_equal(count_samples(t, "sluice_quota_rejections_total"), 1);

	expect_line(t, "sluice_tokens_total{consumer=\"team-a\",upstream=\"b\",kind=\"prompt\","
	               "estimated=\"false\"} 200");
	expect_line(t, "sluice_tokens_total{consumer=\"team-a\",upstream=\"b\",kind=\"prompt\","
	               "estimated=\"true\"} 20");
	expect_line(t, "sluice_tokens_total{consumer=\"team-a\",upstream=\"b\",kind=\"completion\","
	               "estimated=\"false\"} 100");
	expect_line(t, "sluice_tokens_total{consumer=\"team-a\",upstream=\"b\",kind=\"completion\","
	               "estimated=\"true\"} 30");
	expect_line(t, "sluice_tokens_total{consumer=\"team-a\",upstream=\"b\",kind=\"cached\","
	               "estimated=\"false\"} 20");
	expect_line(t, "sluice_tokens_total{consumer=\"team-b\",upstream=\"b\",kind=\"prompt\","
	               "estimated=\"false\"} 10");
	expect_line(t, "sluice_tokens_total{consumer=\"team-b\",upstream=\"b\",kind=\"completion\","
	               "estimated=\"false\"} 100");
	expect_line(t, "sluice_tokens_total{consumer=\"team-b\",upstream=\"b\",kind=\"reasoning\","
	               "estimated=\"false\"} 5");
	assert_int_equal(count_samples(t, "sluice_tokens_total"), 8);
	free(t);
}

/* The series memo is keyed by the label pointers: the same pointer holding other bytes (a
 * reload frees a route's name and another takes its place) must land in another series. */
static void test_label_pointer_reused(void **state)
{
	char route[8] = "one", consumer[8] = "ca";
	struct request_record r = base_record();
	r.route = route;
	r.consumer = consumer;
	metrics_record_request(metrics_shard(0), &r);
	metrics_record_request(metrics_shard(0), &r);
	memcpy(route, "two", 4);
	metrics_record_request(metrics_shard(0), &r);
	memcpy(consumer, "cb", 3);
	metrics_record_request(metrics_shard(0), &r);
	char *t = render();
	expect_line(t, "sluice_requests_total{route=\"one\",consumer=\"ca\",code=\"200\"} 2");
	expect_line(t, "sluice_requests_total{route=\"two\",consumer=\"ca\",code=\"200\"} 1");
	expect_line(t, "sluice_requests_total{route=\"two\",consumer=\"cb\",code=\"200\"} 1");
	assert_int_equal(count_samples(t, "sluice_requests_total"), 3);
	free(t);
}

static void test_histograms(void **state)
{
	record_mix();
	char *t = render();

	/* Totals 0.001, 1, 1.6, 1.6, 2.4, 30.01 s; buckets are cumulative and
	 * inclusive ("le"). */
	static const char *const req[] = {
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"0.005\"} 1",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"0.01\"} 1",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"0.025\"} 1",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"0.05\"} 1",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"0.1\"} 1",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"0.25\"} 1",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"0.5\"} 1",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"1\"} 2",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"2.5\"} 5",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"5\"} 5",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"10\"} 5",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"20\"} 5",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"30\"} 5",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"60\"} 6",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"120\"} 6",
	        "sluice_request_duration_seconds_bucket{route=\"chat\",le=\"+Inf\"} 6",
	        "sluice_request_duration_seconds_sum{route=\"chat\"} 36.611",
	        "sluice_request_duration_seconds_count{route=\"chat\"} 6",
	};
	for (size_t i = 0; i < sizeof(req) / sizeof(req[0]); i++)
		expect_line(t, req[i]);
	assert_int_equal(count_samples(t, "sluice_request_duration_seconds_bucket"), 16);

	/* Upstream time per attempt that reached an instance (d was skipped). */
	expect_line(t, "sluice_upstream_duration_seconds_bucket{upstream=\"c\",le=\"0.25\"} 1");
	expect_line(t, "sluice_upstream_duration_seconds_bucket{upstream=\"c\",le=\"30\"} 2");
	expect_line(t, "sluice_upstream_duration_seconds_sum{upstream=\"c\"} 30.2");
	expect_line(t, "sluice_upstream_duration_seconds_count{upstream=\"c\"} 2");
	expect_line(t, "sluice_upstream_duration_seconds_count{upstream=\"b\"} 5");
	expect_line(t, "sluice_upstream_duration_seconds_sum{upstream=\"b\"} 6.105");
	expect_no_prefix(t, "sluice_upstream_duration_seconds_count{upstream=\"d\"}");

	/* Only the stream has a TTFT and a time per output token. */
	expect_line(t, "sluice_time_to_first_token_seconds_bucket{upstream=\"b\",le=\"0.25\"} 0");
	expect_line(t, "sluice_time_to_first_token_seconds_bucket{upstream=\"b\",le=\"0.5\"} 1");
	expect_line(t, "sluice_time_to_first_token_seconds_sum{upstream=\"b\"} 0.4");
	expect_line(t, "sluice_time_to_first_token_seconds_count{upstream=\"b\"} 1");
	expect_line(t, "sluice_time_per_output_token_seconds_bucket{upstream=\"b\",le=\"0.01\"} 0");
	expect_line(t, "sluice_time_per_output_token_seconds_bucket{upstream=\"b\",le=\"0.02\"} 1");
	expect_line(t, "sluice_time_per_output_token_seconds_sum{upstream=\"b\"} 0.02");
	expect_line(t, "sluice_time_per_output_token_seconds_count{upstream=\"b\"} 1");

	/* Overheads 60, 300, 1000, 2000, 2000, 150000 µs. */
	expect_line(t, "sluice_gateway_overhead_seconds_bucket{le=\"0.00005\"} 0");
	expect_line(t, "sluice_gateway_overhead_seconds_bucket{le=\"0.0001\"} 1");
	expect_line(t, "sluice_gateway_overhead_seconds_bucket{le=\"0.0005\"} 2");
	expect_line(t, "sluice_gateway_overhead_seconds_bucket{le=\"0.001\"} 3");
	expect_line(t, "sluice_gateway_overhead_seconds_bucket{le=\"0.0025\"} 5");
	expect_line(t, "sluice_gateway_overhead_seconds_bucket{le=\"0.1\"} 5");
	expect_line(t, "sluice_gateway_overhead_seconds_bucket{le=\"+Inf\"} 6");
	expect_line(t, "sluice_gateway_overhead_seconds_sum 0.15536");
	expect_line(t, "sluice_gateway_overhead_seconds_count 6");
	free(t);
}

static void test_help_type_once(void **state)
{
	record_mix();
	metrics_health_transition("b", false);
	metrics_reload(true);
	char *t = render();

	/* Every family has one HELP and one TYPE, and every sample follows the
	 * TYPE line of its family. */
	char *copy = strdup(t);
	char *save = NULL;
	char families[64][96];
	int n_families = 0;
	const char *current = "";
	for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char name[96];
		if (sscanf(line, "# TYPE %95s", name) == 1) {
			for (int i = 0; i < n_families; i++)
				if (strcmp(families[i], name) == 0)
					fail_msg("TYPE twice for %s", name);
			assert_true(n_families < 64);
			snprintf(families[n_families++], sizeof(families[0]), "%s", name);
			current = families[n_families - 1];
			continue;
		}
		if (line[0] == '#')
			continue;
		size_t cl = strlen(current);
		assert_true(cl > 0);
		if (strncmp(line, current, cl) != 0)
			fail_msg("sample outside its family %s: %s", current, line);
	}
	free(copy);
	for (int i = 0; i < n_families; i++) {
		char pat[160];
		snprintf(pat, sizeof(pat), "\n# HELP %.95s ", families[i]);
		const char *first = strstr(t, pat);
		assert_non_null(first);
		assert_null(strstr(first + 1, pat));
	}
	assert_true(n_families >= 18);
	free(t);
}

static void gauge_source(void *arg, struct evbuffer *out)
{
	const struct metrics_upstream_state up[] = {{"odd\"na\\me\nx", false, 0}, {"b", true, 3}};
	const char *const l[] = {"kind", "a \"b\"", "worker", "0", NULL};
	metrics_write_upstreams(out, up, 2);
	metrics_write_connections(out, (unsigned long long)*(int *)arg, 7);
	metrics_write_family(out, "sluice_test_value", "gauge", "A \\ and\nnewline.");
	metrics_write_sample(out, "sluice_test_value", l, 0.5);
}

static void test_escaping_events_and_gauges(void **state)
{
	static int conns = 42;
	struct request_record r = base_record();
	r.route = "we\"ird\\route\nx";
	r.status = 404;
	metrics_record_request(metrics_shard(0), &r);
	metrics_health_event("b", false, "3 timeouts");
	metrics_health_event("b", true, "active check ok");
	metrics_health_transition("b", false);
	metrics_reload(false);
	metrics_reload(true);
	metrics_reload(false);
	metrics_store_error("redis");
	metrics_add_gauge_source(gauge_source, &conns);
	char *t = render();

	expect_line(t, "sluice_requests_total{route=\"we\\\"ird\\\\route\\nx\",consumer=\"team-a\","
	               "code=\"404\"} 1");
	expect_line(t, "sluice_request_duration_seconds_count{route=\"we\\\"ird\\\\route\\nx\"} 1");
	expect_line(t, "sluice_health_transitions_total{upstream=\"b\",to=\"healthy\"} 1");
	expect_line(t, "sluice_health_transitions_total{upstream=\"b\",to=\"unhealthy\"} 2");
	expect_line(t, "sluice_config_reloads_total{result=\"error\"} 2");
	expect_line(t, "sluice_config_reloads_total{result=\"ok\"} 1");
	expect_line(t, "sluice_config_last_reload_successful 0");
	expect_line(t, "sluice_store_errors_total{store=\"redis\"} 1");
	expect_line(t, "# TYPE sluice_upstream_healthy gauge");
	expect_line(t, "sluice_upstream_healthy{upstream=\"odd\\\"na\\\\me\\nx\"} 0");
	expect_line(t, "sluice_upstream_healthy{upstream=\"b\"} 1");
	expect_line(t, "sluice_upstream_inflight{upstream=\"b\"} 3");
	expect_line(t, "# TYPE sluice_open_connections gauge");
	expect_line(t, "sluice_open_connections 42");
	expect_line(t, "# TYPE sluice_accept_errors_total counter");
	expect_line(t, "sluice_accept_errors_total 7");
	expect_line(t, "# HELP sluice_test_value A \\\\ and\\nnewline.");
	expect_line(t, "sluice_test_value{kind=\"a \\\"b\\\"\",worker=\"0\"} 0.5");
	expect_line(t, "sluice_build_info{version=\"" SLUICE_VERSION "\"} 1");

	json_t *tr = metrics_recent_transitions();
	assert_int_equal(json_array_size(tr), 3);
	json_t *newest = json_array_get(tr, 0), *oldest = json_array_get(tr, 2);
	assert_string_equal(json_string_value(json_object_get(newest, "instance")), "b");
	assert_true(json_is_false(json_object_get(newest, "healthy")));
	assert_string_equal(json_string_value(json_object_get(oldest, "reason")), "3 timeouts");
	assert_non_null(strchr(json_string_value(json_object_get(oldest, "time")), 'T'));
	json_decref(tr);

	metrics_remove_gauge_source(gauge_source, &conns);
	free(t);
	t = render();
	expect_no_prefix(t, "sluice_open_connections");
	free(t);
}

static void test_null_shard_and_empty_record(void **state)
{
	struct request_record r = {0};
	metrics_record_request(NULL, &r); /* ignored */
	assert_null(metrics_shard(2));    /* out of range */
	assert_null(metrics_shard(-1));
	metrics_record_request(metrics_shard(1), &r); /* no route, consumer: "" labels */
	char *t = render();
	expect_line(t, "sluice_requests_total{route=\"\",consumer=\"\",code=\"0\"} 1");
	free(t);
}

#define THREADS    4
#define PER_THREAD 20000

struct recorder {
	int id;
	_Atomic bool *go;
};

static void *recorder_main(void *arg)
{
	struct recorder *rec = arg;
	struct metrics_shard *s = metrics_shard(rec->id);
	struct request_record r = base_record();
	add_attempt(&r, "b", "ok", 200, 1000);
	r.total_us = 2000;
	r.usage = (struct record_usage){.present = true, .prompt = 1, .completion = 2};
	while (!atomic_load(rec->go))
		;
	for (int i = 0; i < PER_THREAD; i++) {
		/* A new series now and then while the scrape walks the chains. */
		char consumer[16];
		snprintf(consumer, sizeof(consumer), "c%d", i % 50);
		r.consumer = consumer;
		metrics_record_request(s, &r);
	}
	return NULL;
}

static uint64_t sum_family(const char *text, const char *prefix)
{
	uint64_t sum = 0;
	size_t pl = strlen(prefix);
	for (const char *p = text; (p = strchr(p, '\n')) != NULL; p++) {
		if (strncmp(p + 1, prefix, pl) != 0)
			continue;
		const char *sp = strchr(p + 1, ' ');
		sum += strtoull(sp + 1, NULL, 10);
	}
	return sum;
}

/* Workers record while the main thread scrapes: totals only grow, and the
 * final sums are exact. Run under TSan to check the sharing scheme. */
static void test_concurrent_shards(void **state)
{
	metrics_free();
	metrics_init(THREADS);
	pthread_t t[THREADS];
	struct recorder rec[THREADS];
	_Atomic bool go = false;
	for (int i = 0; i < THREADS; i++) {
		rec[i] = (struct recorder){i, &go};
		assert_int_equal(pthread_create(&t[i], NULL, recorder_main, &rec[i]), 0);
	}
	atomic_store(&go, true);
	uint64_t last = 0;
	for (int k = 0; k < 20; k++) {
		char *text = render();
		uint64_t n = sum_family(text, "sluice_requests_total{");
		assert_true(n >= last);
		last = n;
		free(text);
	}
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	char *text = render();
	assert_int_equal(sum_family(text, "sluice_requests_total{"), THREADS * PER_THREAD);
	assert_int_equal(count_samples(text, "sluice_requests_total"), 50);
	expect_line(text, "sluice_request_duration_seconds_count{route=\"chat\"} 80000");
	expect_line(text, "sluice_upstream_responses_total{upstream=\"b\",code=\"200\"} 80000");
	assert_int_equal(sum_family(text, "sluice_tokens_total{"), 3 * THREADS * PER_THREAD);
	free(text);
}

/* sluice_cost_total: summed over workers in micro-units, shown in price units exactly; only
 * records with a price. */
static void test_cost_total(void **state)
{
	struct request_record r = base_record();
	r.priced = true;
	r.cost_micros = 1500000;
	metrics_record_request(metrics_shard(0), &r);
	r.cost_micros = 7;
	metrics_record_request(metrics_shard(1), &r);
	r.instance = "free";
	r.cost_micros = 0;
	metrics_record_request(metrics_shard(0), &r); /* priced at zero: a series at 0 */
	r.instance = "unpriced";
	r.priced = false;
	metrics_record_request(metrics_shard(0), &r);
	r.instance = "whole";
	r.priced = true;
	r.cost_micros = 3000000;
	metrics_record_request(metrics_shard(1), &r);
	char *t = render();
	expect_line(t, "# TYPE sluice_cost_total counter");
	expect_line(t, "sluice_cost_total{route=\"chat\",instance=\"b\",consumer=\"team-a\"} "
	               "1.500007");
	expect_line(t, "sluice_cost_total{route=\"chat\",instance=\"free\",consumer=\"team-a\"} "
	               "0");
	expect_line(t, "sluice_cost_total{route=\"chat\",instance=\"whole\",consumer=\"team-a\"} "
	               "3");
	assert_int_equal(count_samples(t, "sluice_cost_total"), 3);
	free(t);
}

static void run_promtool(const char *text)
{
	FILE *p = popen("promtool check metrics >/tmp/sluice-promtool.out 2>&1", "w");
	assert_non_null(p);
	fputs(text + 1, p); /* skip render()'s leading newline */
	int st = pclose(p);
	if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0)) {
		system("cat /tmp/sluice-promtool.out >&2");
		fail_msg("promtool check metrics failed");
	}
}

static void test_promtool_metrics(void **state)
{
	if (!have_promtool()) {
		print_message("promtool not found (Debian package 'prometheus'): exposition not "
		              "checked by promtool\n");
		skip();
	}
	static int conns = 7;
	record_mix();
	struct request_record r = base_record();
	r.route = "we\"ird\\route\nx";
	r.priced = true; /* sluice_cost_total with a fraction */
	r.cost_micros = 1234;
	metrics_record_request(metrics_shard(0), &r);
	metrics_health_event("b", false, "x");
	metrics_reload(false);
	metrics_store_error("redis");
	metrics_add_gauge_source(gauge_source, &conns);
	char *t = render();
	run_promtool(t);
	free(t);
	metrics_remove_gauge_source(gauge_source, &conns);
}

static void test_promtool_empty(void **state)
{
	if (!have_promtool())
		skip();
	char *t = render();
	run_promtool(t);
	free(t);
}

/* conf/prometheus-alerts.yml, found from TEST_DATA_DIR (<repo>/tests/unit/data). */
static void alert_rules_path(char *buf, size_t len)
{
	snprintf(buf, len, "%s", TEST_DATA_DIR);
	char *t = strstr(buf, "tests/unit/data");
	if (t)
		*t = '\0';
	else
		buf[0] = '\0';
	strncat(buf, "conf/prometheus-alerts.yml", len - strlen(buf) - 1);
}

static void test_promtool_alert_rules(void **state)
{
	char path[1024], cmd[1200];
	if (!have_promtool())
		skip();
	alert_rules_path(path, sizeof(path));
	if (access(path, R_OK) != 0) {
		print_message("%s not found: rules not checked\n", path);
		skip();
	}
	snprintf(cmd, sizeof(cmd), "promtool check rules '%s' >/tmp/sluice-promtool.out 2>&1",
	         path);
	int st = system(cmd);
	if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0)) {
		system("cat /tmp/sluice-promtool.out >&2");
		fail_msg("promtool check rules failed");
	}
}

/* ---------------------------------------------------------------- admin API */

struct stub {
	bool ready;
	bool reload_ok;
	int reloads;
};

static json_t *stub_status(void *arg)
{
	return json_pack("{s:s, s:i, s:i, s:s, s:i, s:i, s:b}", "version", "test", "uptime_s", 12,
	                 "generation", 3, "config_sha256", "ab12", "workers", 2, "connections", 5,
	                 "ready", 1);
}

static json_t *stub_instances(void *arg)
{
	return json_pack("[{s:s, s:s, s:b, s:n, s:i, s:f, s:f, s:[{s:s, s:i, s:i, s:i, s:i}]}]",
	                 "name", "b", "provider", "openai-compatible", "healthy", 1,
	                 "last_transition", "inflight", 2, "ewma_latency_ms", 812.5, "ewma_ttft_ms",
	                 140.0, "limits", "id", "instance:b:total_tokens:1h", "limit", 50000,
	                 "used", 1200, "remaining", 48800, "reset_s", 1800);
}

static json_t *stub_consumers(void *arg)
{
	return json_pack("[{s:s, s:[{s:s, s:i, s:i, s:i, s:i}]}, {s:s, s:[]}]", "name", "team-a",
	                 "limits", "id", "consumer:team-a:*:total_tokens:1mo", "limit", 1000000,
	                 "used", 10, "remaining", 999990, "reset_s", 86400, "name", "team b",
	                 "limits");
}

static json_t *stub_routes(void *arg)
{
	return json_pack("[{s:s, s:[s], s:[{s:s, s:i, s:i}]}]", "name", "chat", "paths",
	                 "/v1/chat/completions", "targets", "instance", "b", "priority", 10,
	                 "weight", 100);
}

static json_t *stub_reload(void *arg, bool *ok)
{
	struct stub *st = arg;
	st->reloads++;
	*ok = st->reload_ok;
	if (st->reload_ok)
		return json_pack("{s:b, s:i}", "ok", 1, "generation", 4);
	return json_pack("{s:b, s:[s]}", "ok", 0, "errors",
	                 "sluice.yaml:3:5: routes[0].targets[0].instance: unknown instance 'x'");
}

static bool stub_ready(void *arg)
{
	return ((struct stub *)arg)->ready;
}

struct call {
	struct event_base *base;
	struct evbuffer *in;
	bool done;
};

static void client_read(evutil_socket_t fd, short what, void *arg)
{
	struct call *c = arg;
	if (what & EV_TIMEOUT) { /* a guard against a hang, not a timing assertion */
		event_base_loopbreak(c->base);
		return;
	}
	int n = evbuffer_read(c->in, fd, 65536);
	if (n <= 0) {
		c->done = true;
		event_base_loopbreak(c->base);
	}
}

struct response {
	int status;
	char content_type[128];
	char *body;
};

/* Send raw (an HTTP request with Connection: close) to the admin port and run
 * the loop until the server closed the connection. */
static struct response call(struct event_base *base, int port, const char *raw)
{
	struct response r = {0};
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	assert_true(fd >= 0);
	assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(write(fd, raw, strlen(raw)), (ssize_t)strlen(raw));
	fcntl(fd, F_SETFL, O_NONBLOCK);

	struct call c = {.base = base, .in = evbuffer_new()};
	struct event *ev = event_new(base, fd, EV_READ | EV_PERSIST, client_read, &c);
	struct timeval guard = {30, 0};
	event_add(ev, &guard);
	event_base_dispatch(base);
	event_free(ev);
	close(fd);
	assert_true(c.done);

	size_t n = evbuffer_get_length(c.in);
	char *all = calloc(1, n + 1);
	evbuffer_remove(c.in, all, n);
	evbuffer_free(c.in);
	assert_int_equal(sscanf(all, "HTTP/1.1 %d", &r.status), 1);
	char *ct = strcasestr(all, "\r\nContent-Type: ");
	if (ct)
		sscanf(ct + 16, "%127[^\r]", r.content_type);
	char *body = strstr(all, "\r\n\r\n");
	assert_non_null(body);
	r.body = strdup(body + 4);
	free(all);
	return r;
}

static struct response get(struct event_base *base, int port, const char *path, const char *key)
{
	char req[1024];
	char auth[256] = "";
	if (key)
		snprintf(auth, sizeof(auth), "Authorization: Bearer %s\r\n", key);
	snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: x\r\n%sConnection: close\r\n\r\n",
	         path, auth);
	return call(base, port, req);
}

static const char *error_code(const char *body)
{
	static char code[64];
	json_t *j = json_loads(body, 0, NULL);
	assert_non_null(j);
	const char *c = json_string_value(json_object_get(json_object_get(j, "error"), "code"));
	snprintf(code, sizeof(code), "%s", c ? c : "");
	json_decref(j);
	return code;
}

struct admin_fixture {
	struct event_base *base;
	struct admin *admin;
	struct config cfg;
	struct stub stub;
	int port;
};

static int setup_admin(void **state)
{
	struct admin_fixture *f = calloc(1, sizeof(*f));
	metrics_init(1);
	f->base = event_base_new();
	f->cfg.admin.address = "127.0.0.1:0";
	f->cfg.admin.host = "127.0.0.1";
	f->cfg.admin.port = 0;
	f->cfg.admin.key = "s3cret-key";
	struct admin_hooks hooks = {stub_status, stub_instances, stub_consumers, stub_routes,
	                            stub_reload, stub_ready,     &f->stub};
	f->admin = admin_new(f->base, &f->cfg, &hooks);
	assert_non_null(f->admin);
	f->port = admin_port(f->admin);
	assert_true(f->port > 0);
	*state = f;
	return 0;
}

static int teardown_admin(void **state)
{
	struct admin_fixture *f = *state;
	admin_free(f->admin);
	event_base_free(f->base);
	metrics_free();
	free(f);
	return 0;
}

static void free_response(struct response *r)
{
	free(r->body);
}

static void test_admin_auth(void **state)
{
	struct admin_fixture *f = *state;

	struct response r = get(f->base, f->port, "/healthz", NULL);
	assert_int_equal(r.status, 200);
	assert_string_equal(r.body, "ok\n");
	free_response(&r);

	const char *paths[] = {"/status",      "/instances", "/consumers", "/consumers/team-a",
	                       "/routes",      "/metrics",   "/readyz",    "/",
	                       "/transitions", "/nope"};
	for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
		r = get(f->base, f->port, paths[i], NULL);
		assert_int_equal(r.status, 401);
		assert_string_equal(r.content_type, "application/json");
		assert_string_equal(error_code(r.body), "invalid_api_key");
		free_response(&r);
		r = get(f->base, f->port, paths[i], "wrong");
		assert_int_equal(r.status, 401);
		free_response(&r);
		r = get(f->base, f->port, paths[i], "s3cret-key-but-longer");
		assert_int_equal(r.status, 401);
		free_response(&r);
	}
	r = call(f->base, f->port,
	         "POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: "
	         "close\r\n\r\n");
	assert_int_equal(r.status, 401);
	assert_int_equal(f->stub.reloads, 0);
	free_response(&r);
	/* A scheme other than Bearer is no key. */
	r = call(f->base, f->port,
	         "GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Basic s3cret-key\r\n"
	         "Connection: close\r\n\r\n");
	assert_int_equal(r.status, 401);
	free_response(&r);

	r = get(f->base, f->port, "/status", "s3cret-key");
	assert_int_equal(r.status, 200);
	assert_string_equal(r.content_type, "application/json");
	json_t *j = json_loads(r.body, 0, NULL);
	assert_non_null(j);
	assert_int_equal(json_integer_value(json_object_get(j, "generation")), 3);
	json_decref(j);
	free_response(&r);

	/* A browser without a key is asked for one. */
	r = call(f->base, f->port,
	         "GET / HTTP/1.1\r\nHost: x\r\nAccept: text/html,*/*\r\nConnection: close\r\n\r\n");
	assert_int_equal(r.status, 401);
	assert_string_equal(r.content_type, "text/html; charset=utf-8");
	assert_non_null(strstr(r.body, "name=key"));
	free_response(&r);
}

static void test_admin_endpoints(void **state)
{
	struct admin_fixture *f = *state;
	const char *k = "s3cret-key";

	struct response r = get(f->base, f->port, "/metrics", k);
	assert_int_equal(r.status, 200);
	assert_string_equal(r.content_type, "text/plain; version=0.0.4; charset=utf-8");
	assert_non_null(strstr(r.body, "# TYPE sluice_requests_total counter\n"));
	free_response(&r);

	r = get(f->base, f->port, "/consumers/team-a", k);
	assert_int_equal(r.status, 200);
	json_t *j = json_loads(r.body, 0, NULL);
	assert_string_equal(json_string_value(json_object_get(j, "name")), "team-a");
	json_decref(j);
	free_response(&r);

	r = get(f->base, f->port, "/consumers/team%20b", k);
	assert_int_equal(r.status, 200);
	free_response(&r);

	r = get(f->base, f->port, "/consumers/nobody", k);
	assert_int_equal(r.status, 404);
	assert_string_equal(error_code(r.body), "consumer_not_found");
	free_response(&r);

	r = get(f->base, f->port, "/consumers", k);
	assert_int_equal(r.status, 200);
	j = json_loads(r.body, 0, NULL);
	assert_int_equal(json_array_size(j), 2);
	json_decref(j);
	free_response(&r);

	const char *json_paths[] = {"/instances", "/routes", "/transitions"};
	for (size_t i = 0; i < 3; i++) {
		r = get(f->base, f->port, json_paths[i], k);
		assert_int_equal(r.status, 200);
		j = json_loads(r.body, 0, NULL);
		assert_true(json_is_array(j));
		json_decref(j);
		free_response(&r);
	}

	r = get(f->base, f->port, "/readyz", k);
	assert_int_equal(r.status, 503);
	free_response(&r);
	f->stub.ready = true;
	r = get(f->base, f->port, "/readyz", k);
	assert_int_equal(r.status, 200);
	free_response(&r);

	r = get(f->base, f->port, "/?key=s3cret-key", NULL);
	assert_int_equal(r.status, 200);
	assert_string_equal(r.content_type, "text/html; charset=utf-8");
	assert_non_null(strstr(r.body, "<title>Sluice status</title>"));
	assert_int_equal(strlen(r.body), admin_status_page_len);
	free_response(&r);

	r = get(f->base, f->port, "/nope", k);
	assert_int_equal(r.status, 404);
	free_response(&r);
	r = get(f->base, f->port, "/reload", k);
	assert_int_equal(r.status, 405);
	free_response(&r);
}

static void test_admin_reload(void **state)
{
	struct admin_fixture *f = *state;
	const char *post =
	        "POST /reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-key\r\n"
	        "Content-Length: 0\r\nConnection: close\r\n\r\n";

	struct response r = call(f->base, f->port, post);
	assert_int_equal(r.status, 400);
	json_t *j = json_loads(r.body, 0, NULL);
	assert_true(json_is_false(json_object_get(j, "ok")));
	json_t *errs = json_object_get(j, "errors");
	assert_int_equal(json_array_size(errs), 1);
	assert_non_null(strstr(json_string_value(json_array_get(errs, 0)), "unknown instance"));
	json_decref(j);
	free_response(&r);

	f->stub.reload_ok = true;
	r = call(f->base, f->port, post);
	assert_int_equal(r.status, 200);
	j = json_loads(r.body, 0, NULL);
	assert_int_equal(json_integer_value(json_object_get(j, "generation")), 4);
	json_decref(j);
	free_response(&r);
	assert_int_equal(f->stub.reloads, 2);
}

static void test_admin_key_change_and_off(void **state)
{
	struct admin_fixture *f = *state;

	f->cfg.admin.key = "new-key";
	admin_configure(f->admin, &f->cfg);
	struct response r = get(f->base, f->port, "/status", "s3cret-key");
	assert_int_equal(r.status, 401);
	free_response(&r);
	r = get(f->base, f->port, "/status", "new-key");
	assert_int_equal(r.status, 200);
	free_response(&r);

	f->cfg.admin.key = NULL; /* admin.key: none */
	admin_configure(f->admin, &f->cfg);
	r = get(f->base, f->port, "/status", NULL);
	assert_int_equal(r.status, 200);
	free_response(&r);
}

static void test_admin_disabled(void **state)
{
	struct config c = {0};
	struct event_base *base = event_base_new();
	struct admin *a = admin_new(base, &c, NULL);
	assert_non_null(a);
	assert_int_equal(admin_port(a), 0);
	admin_configure(a, &c);
	admin_free(a);
	event_base_free(base);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test_setup_teardown(test_counters_summed, setup_metrics,
	                                        teardown_metrics),
	        cmocka_unit_test_setup_teardown(test_label_pointer_reused, setup_metrics,
	                                        teardown_metrics),
	        cmocka_unit_test_setup_teardown(test_histograms, setup_metrics, teardown_metrics),
	        cmocka_unit_test_setup_teardown(test_help_type_once, setup_metrics,
	                                        teardown_metrics),
	        cmocka_unit_test_setup_teardown(test_escaping_events_and_gauges, setup_metrics,
	                                        teardown_metrics),
	        cmocka_unit_test_setup_teardown(test_null_shard_and_empty_record, setup_metrics,
	                                        teardown_metrics),
	        cmocka_unit_test_setup_teardown(test_concurrent_shards, setup_metrics,
	                                        teardown_metrics),
	        cmocka_unit_test_setup_teardown(test_cost_total, setup_metrics, teardown_metrics),
	        cmocka_unit_test_setup_teardown(test_promtool_metrics, setup_metrics,
	                                        teardown_metrics),
	        cmocka_unit_test_setup_teardown(test_promtool_empty, setup_metrics,
	                                        teardown_metrics),
	        cmocka_unit_test(test_promtool_alert_rules),
	        cmocka_unit_test_setup_teardown(test_admin_auth, setup_admin, teardown_admin),
	        cmocka_unit_test_setup_teardown(test_admin_endpoints, setup_admin, teardown_admin),
	        cmocka_unit_test_setup_teardown(test_admin_reload, setup_admin, teardown_admin),
	        cmocka_unit_test_setup_teardown(test_admin_key_change_and_off, setup_admin,
	                                        teardown_admin),
	        cmocka_unit_test(test_admin_disabled),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
