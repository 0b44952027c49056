/* test_health.c — health: passive hysteresis, trials, retry-after, probes against sluice-mockllm.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/wait.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/thread.h>
#include <jansson.h>

#include "sluice/health.h"
#include "sluice/http.h"
#include "sluice/log.h"

/*
 * Instances are built by hand (only the fields health reads), so these tests
 * exercise the health module alone. Time is passed in explicitly to the
 * worker-side calls, so cooldowns are tested without sleeping; the probe tests
 * run a real event loop against real sluice-mockllm processes and wait for
 * conditions with deadlines.
 */

#define N(a) (sizeof(a) / sizeof((a)[0]))
#define MS   1000ull /* microseconds */
/* The bound of every wait for something that must happen: generous, so that a loaded
 * machine is not a failure; a passing run never waits for it. */
#define WAIT_MS 30000

static int passive_statuses[] = {500, 502, 503, 504};
static int healthy_statuses[] = {200, 302};
static int unhealthy_statuses[] = {429, 404, 500, 501, 502, 503, 504, 505};

static void passive_instance(struct config_instance *in, const char *name)
{
	memset(in, 0, sizeof(*in));
	in->name = (char *)name;
	in->endpoint = "http://127.0.0.1:1/v1/chat/completions";
	in->timeouts.connect = 1000;
	in->timeouts.first_byte = 2000;
	in->passive.enabled = true;
	in->passive.http_statuses = passive_statuses;
	in->passive.n_http_statuses = N(passive_statuses);
	in->passive.http_failures = 3;
	in->passive.tcp_failures = 2;
	in->passive.timeouts = 2;
	in->passive.cooldown = 10000;
}

/* ---------------------------------------------------------------- transition hook */

static pthread_mutex_t hook_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
	int calls;
	char instance[64];
	bool healthy;
	char reason[160];
} hook_seen;

static void hook(const char *instance, bool healthy, const char *reason, void *arg)
{
	pthread_mutex_lock(&hook_mu);
	hook_seen.calls++;
	snprintf(hook_seen.instance, sizeof(hook_seen.instance), "%s", instance);
	hook_seen.healthy = healthy;
	snprintf(hook_seen.reason, sizeof(hook_seen.reason), "%s", reason);
	pthread_mutex_unlock(&hook_mu);
}

static int hook_calls(void)
{
	pthread_mutex_lock(&hook_mu);
	int n = hook_seen.calls;
	pthread_mutex_unlock(&hook_mu);
	return n;
}

static int setup(void **state)
{
	health_registry_init();
	health_set_transition_hook(hook, NULL);
	memset(&hook_seen, 0, sizeof(hook_seen));
	return 0;
}

static int teardown(void **state)
{
	health_registry_free();
	return 0;
}

static bool healthy(struct instance_state *st)
{
	struct health_snapshot s;
	health_snapshot(st, &s);
	return s.healthy;
}

static uint64_t transitions(struct instance_state *st)
{
	struct health_snapshot s;
	health_snapshot(st, &s);
	return s.transitions;
}

/* ---------------------------------------------------------------- passive */

static void test_passive_http_threshold(void **state)
{
	struct config_instance in;
	passive_instance(&in, "qwen-b");
	struct instance_state *st = health_state("qwen-b");
	uint64_t t = 1000000;

	assert_true(healthy(st));
	health_report(st, &in, HEALTH_HTTP_STATUS, 503, t);
	health_report(st, &in, HEALTH_HTTP_STATUS, 503, t);
	assert_true(healthy(st)); /* N-1 */
	health_report(st, &in, HEALTH_OK, 200, t);
	health_report(st, &in, HEALTH_HTTP_STATUS, 503, t);
	health_report(st, &in, HEALTH_HTTP_STATUS, 503, t);
	assert_true(healthy(st)); /* the OK reset the streak */
	assert_int_equal(hook_calls(), 0);
	health_report(st, &in, HEALTH_HTTP_STATUS, 503, t);
	assert_false(healthy(st)); /* N */
	assert_int_equal(hook_calls(), 1);
	assert_false(hook_seen.healthy);
	assert_string_equal(hook_seen.instance, "qwen-b");
	assert_string_equal(hook_seen.reason, "3 consecutive http 503");

	struct health_snapshot s;
	health_snapshot(st, &s);
	assert_int_equal(s.transitions, 1);
	assert_string_equal(s.source, "passive");
	assert_string_equal(s.last_reason, "3 consecutive http 503");
	assert_true(s.last_transition_unix_ms > 0);

	/* More failures on an unhealthy instance are no new transitions. */
	health_report(st, &in, HEALTH_HTTP_STATUS, 503, t);
	health_report(st, &in, HEALTH_CONNECT_ERROR, 0, t);
	assert_int_equal(transitions(st), 1);
	assert_int_equal(hook_calls(), 1);
}

static void test_passive_http_mixed_and_neutral(void **state)
{
	struct config_instance in;
	passive_instance(&in, "mixed");
	struct instance_state *st = health_state("mixed");

	/* Unlisted statuses count neither way: they neither fail nor reset. */
	health_report(st, &in, HEALTH_HTTP_STATUS, 500, 1);
	for (int i = 0; i < 10; i++)
		health_report(st, &in, HEALTH_HTTP_STATUS, 400, 1);
	health_report(st, &in, HEALTH_HTTP_STATUS, 429, 1);
	health_report(st, &in, HEALTH_HTTP_STATUS, 502, 1);
	assert_true(healthy(st));
	health_report(st, &in, HEALTH_HTTP_STATUS, 503, 1);
	assert_false(healthy(st));
	assert_string_equal(hook_seen.reason, "3 consecutive http failures (last 503)");
}

static void test_passive_tcp_threshold(void **state)
{
	struct config_instance in;
	passive_instance(&in, "tcp");
	struct instance_state *st = health_state("tcp");

	health_report(st, &in, HEALTH_CONNECT_ERROR, 0, 1);
	assert_true(healthy(st));
	health_report(st, &in, HEALTH_OK, 200, 1);
	health_report(st, &in, HEALTH_CONNECT_ERROR, 0, 1);
	assert_true(healthy(st));
	/* Other kinds do not break a streak: only an OK does. */
	health_report(st, &in, HEALTH_HTTP_STATUS, 503, 1);
	health_report(st, &in, HEALTH_TIMEOUT, 0, 1);
	assert_true(healthy(st));
	health_report(st, &in, HEALTH_CONNECT_ERROR, 0, 1);
	assert_false(healthy(st));
	assert_string_equal(hook_seen.reason, "2 consecutive connect errors");
	assert_int_equal(transitions(st), 1);
}

static void test_passive_timeout_threshold(void **state)
{
	struct config_instance in;
	passive_instance(&in, "slow");
	in.passive.timeouts = 3;
	struct instance_state *st = health_state("slow");

	health_report(st, &in, HEALTH_TIMEOUT, 0, 1);
	health_report(st, &in, HEALTH_TIMEOUT, 0, 1);
	assert_true(healthy(st));
	health_report(st, &in, HEALTH_OK, 200, 1);
	health_report(st, &in, HEALTH_TIMEOUT, 0, 1);
	health_report(st, &in, HEALTH_TIMEOUT, 0, 1);
	assert_true(healthy(st));
	health_report(st, &in, HEALTH_TIMEOUT, 0, 1);
	assert_false(healthy(st));
	assert_string_equal(hook_seen.reason, "3 consecutive timeouts");
}

static void test_passive_zero_threshold_and_disabled(void **state)
{
	struct config_instance in;
	passive_instance(&in, "never");
	in.passive.tcp_failures = 0; /* connect errors never mark it down */
	struct instance_state *st = health_state("never");
	for (int i = 0; i < 50; i++)
		health_report(st, &in, HEALTH_CONNECT_ERROR, 0, 1);
	assert_true(healthy(st));

	passive_instance(&in, "off");
	in.passive.enabled = false;
	st = health_state("off");
	for (int i = 0; i < 50; i++) {
		health_report(st, &in, HEALTH_HTTP_STATUS, 503, 1);
		health_report(st, &in, HEALTH_TIMEOUT, 0, 1);
		health_report(st, &in, HEALTH_CONNECT_ERROR, 0, 1);
	}
	assert_true(healthy(st));
	assert_int_equal(hook_calls(), 0);
}

static void make_unhealthy(struct instance_state *st, const struct config_instance *in, uint64_t t)
{
	for (int i = 0; i < in->passive.tcp_failures; i++)
		health_report(st, in, HEALTH_CONNECT_ERROR, 0, t);
	assert_false(healthy(st));
}

static void test_trial(void **state)
{
	struct config_instance in;
	passive_instance(&in, "trial");
	in.passive.cooldown = 10000; /* ms */
	struct instance_state *st = health_state("trial");
	uint64_t t0 = 5000000;

	assert_int_equal(health_admit(st, &in, t0), HEALTH_PASS);
	make_unhealthy(st, &in, t0);
	assert_int_equal(health_admit(st, &in, t0 + 1), HEALTH_DOWN);
	assert_int_equal(health_admit(st, &in, t0 + 9999 * MS), HEALTH_DOWN);

	/* Cooldown over: one caller gets the trial, the next does not. */
	uint64_t t1 = t0 + 10000 * MS;
	assert_int_equal(health_admit(st, &in, t1), HEALTH_TRIAL);
	assert_int_equal(health_admit(st, &in, t1), HEALTH_DOWN);
	assert_int_equal(health_admit(st, &in, t1 + 500 * MS), HEALTH_DOWN);

	/* It fails: still unhealthy, and the cooldown starts again from now. */
	uint64_t t2 = t1 + 600 * MS;
	health_report(st, &in, HEALTH_HTTP_STATUS, 503, t2);
	assert_false(healthy(st));
	assert_int_equal(transitions(st), 1);
	assert_int_equal(health_admit(st, &in, t2 + 5000 * MS), HEALTH_DOWN);
	assert_int_equal(health_admit(st, &in, t2 + 9999 * MS), HEALTH_DOWN);

	/* A straggler's report (no trial in flight) changes nothing. */
	health_report(st, &in, HEALTH_OK, 200, t2 + 1);
	assert_false(healthy(st));

	/* The next trial succeeds: healthy, through the trial. */
	uint64_t t3 = t2 + 10000 * MS;
	assert_int_equal(health_admit(st, &in, t3), HEALTH_TRIAL);
	health_report(st, &in, HEALTH_OK, 200, t3 + 100 * MS);
	assert_true(healthy(st));
	assert_int_equal(health_admit(st, &in, t3 + 101 * MS), HEALTH_PASS);

	struct health_snapshot s;
	health_snapshot(st, &s);
	assert_int_equal(s.transitions, 2);
	assert_string_equal(s.source, "trial");
	assert_string_equal(s.last_reason, "trial request succeeded");
	assert_int_equal(hook_calls(), 2);
	assert_true(hook_seen.healthy);

	/* The streaks restarted at the transition: one failure is not enough. */
	health_report(st, &in, HEALTH_CONNECT_ERROR, 0, t3 + 200 * MS);
	assert_true(healthy(st));
}

static void test_trial_abandon_and_lease(void **state)
{
	struct config_instance in;
	passive_instance(&in, "lease");
	in.passive.cooldown = 1000;
	in.timeouts.connect = 1000;
	in.timeouts.first_byte = 4000;
	struct instance_state *st = health_state("lease");
	uint64_t t0 = 1000000;

	make_unhealthy(st, &in, t0);
	uint64_t t1 = t0 + 1000 * MS;
	assert_int_equal(health_admit(st, &in, t1), HEALTH_TRIAL);
	health_trial_abandon(st);
	/* Abandoned: the next caller gets the slot at once. */
	assert_int_equal(health_admit(st, &in, t1 + 1), HEALTH_TRIAL);
	/* Never reported: the slot lapses after connect + first_byte. */
	assert_int_equal(health_admit(st, &in, t1 + 4999 * MS), HEALTH_DOWN);
	assert_int_equal(health_admit(st, &in, t1 + 5001 * MS), HEALTH_TRIAL);
	/* A neutral answer (unlisted status) shows the instance serves. */
	health_report(st, &in, HEALTH_HTTP_STATUS, 400, t1 + 5002 * MS);
	assert_true(healthy(st));
	assert_string_equal(hook_seen.reason, "trial request answered http 400");
}

struct race {
	struct instance_state *st;
	const struct config_instance *in;
	uint64_t now;
	pthread_barrier_t *barrier;
	int trials;
};

static void *race_thread(void *arg)
{
	struct race *r = arg;
	pthread_barrier_wait(r->barrier);
	for (int i = 0; i < 1000; i++)
		if (health_admit(r->st, r->in, r->now) == HEALTH_TRIAL)
			r->trials++;
	return NULL;
}

static void test_trial_single_slot_across_threads(void **state)
{
	struct config_instance in;
	passive_instance(&in, "race");
	struct instance_state *st = health_state("race");
	make_unhealthy(st, &in, 1);

	for (int round = 0; round < 20; round++) {
		pthread_barrier_t barrier;
		pthread_barrier_init(&barrier, NULL, 2);
		/* Each round is a new cooldown period later. */
		uint64_t now = 1 + (uint64_t)(round + 1) * 20000 * MS;
		struct race a = {st, &in, now, &barrier, 0}, b = a;
		pthread_t ta, tb;
		pthread_create(&ta, NULL, race_thread, &a);
		pthread_create(&tb, NULL, race_thread, &b);
		pthread_join(ta, NULL);
		pthread_join(tb, NULL);
		pthread_barrier_destroy(&barrier);
		assert_int_equal(a.trials + b.trials, 1);
		health_report(st, &in, HEALTH_TIMEOUT, 0, now); /* the trial fails */
		assert_false(healthy(st));
	}
	assert_int_equal(transitions(st), 1);
}

static void test_active_instance_recovers_by_probes_only(void **state)
{
	struct config_instance in;
	passive_instance(&in, "probed");
	in.active.enabled = true;
	struct instance_state *st = health_state("probed");
	make_unhealthy(st, &in, 1);
	/* No trials when probes decide, however long the wait. */
	assert_int_equal(health_admit(st, &in, 1 + 3600000 * MS), HEALTH_DOWN);
	health_report(st, &in, HEALTH_OK, 200, 2);
	assert_false(healthy(st));
	assert_int_equal(transitions(st), 1);
}

static void test_retry_after(void **state)
{
	struct config_instance in;
	passive_instance(&in, "quota");
	struct instance_state *st = health_state("quota");
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	uint64_t wall0_ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
	uint64_t t0 = http_now_us();

	health_retry_after(st, &in, 2, t0);
	assert_int_equal(health_admit(st, &in, t0), HEALTH_COOLING);
	assert_int_equal(health_admit(st, &in, t0 + 1999 * MS), HEALTH_COOLING);
	assert_int_equal(health_admit(st, &in, t0 + 2000 * MS), HEALTH_PASS);
	/* A shorter Retry-After does not cut a longer one short. */
	health_retry_after(st, &in, 1, t0 + 10);
	assert_int_equal(health_admit(st, &in, t0 + 1500 * MS), HEALTH_COOLING);

	struct health_snapshot s;
	health_snapshot(st, &s);
	assert_true(s.healthy);
	assert_int_equal(s.transitions, 0); /* not a health transition */
	assert_string_equal(s.source, "start");
	/* The period in wall-clock time: 2 s from when it was set, whenever the snapshot ran
	 * (the 10 ms cover the two clocks' rounding). Unless 2 s passed already. */
	clock_gettime(CLOCK_REALTIME, &ts);
	uint64_t wall1_ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
	if (http_now_us() < t0 + 1900 * MS) {
		assert_true(s.retry_after_until_unix_ms + 10 >= wall0_ms + 2000);
		assert_true(s.retry_after_until_unix_ms <= wall1_ms + 2000 + 10);
	}
	assert_int_equal(hook_calls(), 0);

	/* Huge values are capped. */
	health_retry_after(st, &in, 1000000000ull, t0);
	assert_int_equal(health_admit(st, &in, t0 + (HEALTH_RETRY_AFTER_MAX_S + 1) * 1000000ull),
	                 HEALTH_PASS);
}

static void test_state_survives_lookup(void **state)
{
	struct config_instance in;
	passive_instance(&in, "same-name");
	struct instance_state *a = health_state("same-name");
	assert_ptr_equal(health_state_find("same-name"), a);
	assert_null(health_state_find("other-name"));
	struct instance_state *b = health_state("other-name");
	assert_ptr_not_equal(a, b);
	assert_string_equal(health_state_name(a), "same-name");

	make_unhealthy(a, &in, 1);
	health_inflight_add(a, 3);
	health_inflight_add(a, -1);
	health_observe_latency(a, 1000, 8000);
	health_observe_latency(a, 9000, 16000);

	/* A reload looks it up again by name: same object, same state. */
	struct instance_state *again = health_state("same-name");
	assert_ptr_equal(again, a);
	struct health_snapshot s;
	health_snapshot(again, &s);
	assert_false(s.healthy);
	assert_int_equal(s.transitions, 1);
	assert_int_equal(s.inflight, 2);
	assert_int_equal(health_inflight(again), 2);
	/* Peak-EWMA: a slower sample is taken at once... */
	assert_int_equal(s.ewma_ttft_us, 9000);
	assert_int_equal(s.ewma_total_us, 16000);
	/* ...a faster one pulls the average down by 1/HEALTH_EWMA_DIV. */
	health_observe_latency(a, 1000, 8000);
	health_snapshot(again, &s);
	assert_int_equal(s.ewma_ttft_us, 9000 - 8000 / HEALTH_EWMA_DIV);
	assert_int_equal(s.ewma_total_us, 16000 - 8000 / HEALTH_EWMA_DIV);
	assert_true(healthy(b));
}

static void test_many_states(void **state)
{
	/* More names than buckets: chains work. */
	char name[32];
	struct instance_state *sts[600];
	for (int i = 0; i < 600; i++) {
		snprintf(name, sizeof(name), "instance-%d", i);
		sts[i] = health_state(name);
	}
	for (int i = 0; i < 600; i++) {
		snprintf(name, sizeof(name), "instance-%d", i);
		assert_ptr_equal(health_state_find(name), sts[i]);
		assert_string_equal(health_state_name(sts[i]), name);
	}
}

/* ================================================================ active probes */

static char mock_bin[PATH_MAX + 32];

static bool find_mock(void)
{
	const char *env = getenv("MOCKLLM_BIN");
	if (env && *env && access(env, X_OK) == 0) {
		snprintf(mock_bin, sizeof(mock_bin), "%s", env);
		return true;
	}
	/* Next to the build tree this test runs from: <build>/tests/test_health. */
	char self[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n > 0) {
		self[n] = '\0';
		char *slash = strrchr(self, '/');
		if (slash) {
			*slash = '\0';
			const char *rel[] = {"/../sluice-mockllm", "/sluice-mockllm"};
			for (size_t i = 0; i < N(rel); i++) {
				snprintf(mock_bin, sizeof(mock_bin), "%s%s", self, rel[i]);
				if (access(mock_bin, X_OK) == 0)
					return true;
			}
		}
	}
	mock_bin[0] = '\0';
	return false;
}

struct mock {
	pid_t pid;
	int port;
};

/* Start sluice-mockllm on 127.0.0.1:port (0: any) with extra flags; NULL-terminated. */
static bool mock_start(struct mock *m, int port, ...)
{
	const char *argv[32];
	char listen[64];
	int argc = 0;
	snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
	argv[argc++] = mock_bin;
	argv[argc++] = "--listen";
	argv[argc++] = listen;
	va_list ap;
	va_start(ap, port);
	const char *a;
	while ((a = va_arg(ap, const char *)) != NULL && argc < 30)
		argv[argc++] = a;
	va_end(ap);
	argv[argc] = NULL;

	int fds[2];
	if (pipe(fds) != 0)
		return false;
	pid_t pid = fork();
	if (pid < 0)
		return false;
	if (pid == 0) {
		dup2(fds[1], 1);
		close(fds[0]);
		close(fds[1]);
		execv(mock_bin, (char *const *)argv);
		_exit(127);
	}
	close(fds[1]);
	char buf[256];
	size_t len = 0;
	uint64_t deadline = http_now_us() + WAIT_MS * MS;
	bool ok = false;
	while (http_now_us() < deadline && len < sizeof(buf) - 1) {
		struct pollfd pfd = {fds[0], POLLIN, 0};
		if (poll(&pfd, 1, 100) <= 0)
			continue;
		ssize_t r = read(fds[0], buf + len, sizeof(buf) - 1 - len);
		if (r <= 0)
			break;
		len += (size_t)r;
		buf[len] = '\0';
		char *nl = strchr(buf, '\n');
		const char *colon = strrchr(buf, ':');
		if (nl && colon && strncmp(buf, "listening on ", 13) == 0) {
			m->port = atoi(colon + 1);
			ok = m->port > 0;
			break;
		}
	}
	close(fds[0]);
	m->pid = pid;
	if (!ok) {
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		m->pid = 0;
	}
	return ok;
}

static void mock_kill(struct mock *m)
{
	if (m->pid > 0) {
		kill(m->pid, SIGKILL);
		waitpid(m->pid, NULL, 0);
		m->pid = 0;
	}
}

static size_t curl_sink(char *data, size_t size, size_t nmemb, void *arg)
{
	size_t n = size * nmemb;
	char **buf = arg;
	size_t old = *buf ? strlen(*buf) : 0;
	char *b = realloc(*buf, old + n + 1);
	memcpy(b + old, data, n);
	b[old + n] = '\0';
	*buf = b;
	return n;
}

static json_t *mock_get_json(const struct mock *m, const char *path)
{
	char url[128], *body = NULL;
	snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", m->port, path);
	CURL *e = curl_easy_init();
	curl_easy_setopt(e, CURLOPT_URL, url);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, curl_sink);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, &body);
	curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)WAIT_MS);
	CURLcode rc = curl_easy_perform(e);
	curl_easy_cleanup(e);
	json_t *j = rc == CURLE_OK && body ? json_loads(body, 0, NULL) : NULL;
	free(body);
	return j;
}

/* The requests the mock received on path. */
static size_t mock_count(const struct mock *m, const char *path)
{
	json_t *arr = mock_get_json(m, "/_mock/requests");
	size_t i, n = 0;
	json_t *r;
	json_array_foreach(arr, i, r)
	{
		if (strcmp(json_string_value(json_object_get(r, "path")), path) == 0)
			n++;
	}
	json_decref(arr);
	return n;
}

static const char *header_ci(json_t *headers, const char *name)
{
	const char *k;
	json_t *v;
	json_object_foreach(headers, k, v)
	{
		if (strcasecmp(k, name) == 0)
			return json_string_value(v);
	}
	return NULL;
}

/* ---------------------------------------------------------------- loop */

static struct event_base *base;
static struct event *tick;

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
}

/* Run the loop until pred() holds or timeout_ms passes; returns pred(). */
static bool run_until(bool (*pred)(void *), void *arg, uint64_t timeout_ms)
{
	uint64_t deadline = http_now_us() + timeout_ms * MS;
	while (!(pred && pred(arg)) && http_now_us() < deadline)
		event_base_loop(base, EVLOOP_ONCE);
	return pred && pred(arg);
}

static int probe_setup(void **state)
{
	static bool warned;
	if (!find_mock() && !warned) {
		warned = true;
		print_message("sluice-mockllm not found (set MOCKLLM_BIN or build the "
		              "sluice-mockllm target): active probe tests skipped\n");
	}
	setup(state);
	base = event_base_new();
	tick = event_new(base, -1, EV_PERSIST, tick_cb, NULL);
	struct timeval tv = {0, 10000}; /* wake the loop to re-check conditions */
	event_add(tick, &tv);
	return 0;
}

static int probe_teardown(void **state)
{
	event_free(tick);
	event_base_free(base);
	base = NULL;
	return teardown(state);
}

#define NEED_MOCK()                                                                                \
	do {                                                                                       \
		if (mock_bin[0] == '\0')                                                           \
			skip();                                                                    \
	} while (0)

static char probe_body[] = "{\"model\":\"Qwen/Qwen2.5-32B-Instruct\",\"messages\":[{\"role\":"
                           "\"user\",\"content\":\"0\"}],\"stream\":false,\"max_tokens\":1}";
static char *probe_headers[] = {"Content-Type: application/json", "X-Probe: sluice",
                                "Authorization: Bearer probe-key"};

static void active_instance(struct config_instance *in, const char *name, int port,
                            uint64_t interval_ms)
{
	static char hosts[16][32];
	static int next_host;
	char *host = hosts[next_host++ % 16];
	snprintf(host, 32, "127.0.0.1:%d", port);
	passive_instance(in, name);
	struct config_active_check *a = &in->active;
	a->enabled = true;
	a->type = CHECK_HTTP;
	a->http_method = "POST";
	a->http_path = "/v1/chat/completions";
	a->host = host;
	a->http_req_body = probe_body;
	a->req_headers = probe_headers;
	a->n_req_headers = N(probe_headers);
	a->https_verify_certificate = false;
	a->timeout = 1000;
	a->concurrency = 10;
	a->healthy.interval = interval_ms;
	a->healthy.http_statuses = healthy_statuses;
	a->healthy.n_http_statuses = N(healthy_statuses);
	a->healthy.successes = 2;
	a->unhealthy.interval = interval_ms;
	a->unhealthy.http_statuses = unhealthy_statuses;
	a->unhealthy.n_http_statuses = N(unhealthy_statuses);
	a->unhealthy.http_failures = 2;
	a->unhealthy.tcp_failures = 2;
	a->unhealthy.timeouts = 2;
}

struct probe_wait {
	struct instance_state *st;
	uint64_t ok, failed;
	int healthy; /* -1: any */
};

static bool probes_reached(void *arg)
{
	struct probe_wait *w = arg;
	struct health_snapshot s;
	health_snapshot(w->st, &s);
	return s.probes_ok >= w->ok && s.probes_failed >= w->failed &&
	       (w->healthy < 0 || s.healthy == (w->healthy == 1));
}

static bool wait_probes(struct instance_state *st, uint64_t ok, uint64_t failed, int want_healthy,
                        uint64_t timeout_ms)
{
	struct probe_wait w = {st, ok, failed, want_healthy};
	return run_until(probes_reached, &w, timeout_ms);
}

static void test_probe_sends_configured_request(void **state)
{
	NEED_MOCK();
	struct mock m;
	assert_true(mock_start(&m, 0, NULL));
	struct config_instance ins[2], *in = &ins[0];
	active_instance(&ins[0], "qwen-a", m.port, 400);
	active_instance(&ins[1], "qwen-hourly", m.port, 3600 * 1000);
	struct config c = {.instances = ins, .n_instances = 2};

	struct health_checker *hc = health_checker_new(base);
	assert_non_null(hc);
	uint64_t t0 = http_now_us();
	health_checker_sync(hc, &c);
	assert_true(health_checker_probing(hc, "qwen-a"));
	struct instance_state *st = health_state_find("qwen-a");
	assert_non_null(st);

	/* The first probe runs at sync, not an interval later: the hourly one comes too. */
	assert_true(wait_probes(health_state_find("qwen-hourly"), 1, 0, 1, WAIT_MS));
	assert_true(wait_probes(st, 1, 0, 1, WAIT_MS));
	/* The next one comes an interval after the first started. */
	assert_true(wait_probes(st, 2, 0, 1, WAIT_MS));
	uint64_t second_ms = (http_now_us() - t0) / MS;
	assert_true(second_ms >= 380);

	json_t *reqs = mock_get_json(&m, "/_mock/requests");
	assert_non_null(reqs);
	size_t i, seen = 0;
	json_t *r;
	json_array_foreach(reqs, i, r)
	{
		if (strcmp(json_string_value(json_object_get(r, "path")), "/v1/chat/completions"))
			continue;
		seen++;
		assert_string_equal(json_string_value(json_object_get(r, "method")), "POST");
		assert_string_equal(json_string_value(json_object_get(r, "body")), probe_body);
		json_t *h = json_object_get(r, "headers");
		assert_string_equal(header_ci(h, "x-probe"), "sluice");
		assert_string_equal(header_ci(h, "authorization"), "Bearer probe-key");
		/* Once, not twice (the recorder joins repeated headers with ", "). */
		assert_string_equal(header_ci(h, "content-type"), "application/json");
		assert_string_equal(header_ci(h, "host"), in->active.host);
	}
	assert_true(seen >= 3);
	json_decref(reqs);

	struct health_snapshot s;
	health_snapshot(st, &s);
	assert_true(s.healthy);
	assert_int_equal(s.transitions, 0);
	assert_int_equal(s.probes_failed, 0);

	health_checker_free(hc);
	mock_kill(&m);
}

static void test_probe_http_failures(void **state)
{
	NEED_MOCK();
	struct mock m;
	assert_true(mock_start(&m, 0, "--status", "503", NULL));
	struct config_instance in;
	active_instance(&in, "qwen-503", m.port, 100);
	in.active.unhealthy.http_failures = 3;
	struct config c = {.instances = &in, .n_instances = 1};
	struct health_checker *hc = health_checker_new(base);
	health_checker_sync(hc, &c);
	struct instance_state *st = health_state("qwen-503");

	assert_true(wait_probes(st, 0, 2, 1, WAIT_MS));
	assert_true(healthy(st)); /* N-1 failed probes: still healthy */
	assert_true(wait_probes(st, 0, 3, 0, WAIT_MS));
	struct health_snapshot s;
	health_snapshot(st, &s);
	assert_int_equal(s.probes_failed, 3); /* the third one did it */
	assert_int_equal(s.transitions, 1);
	assert_string_equal(s.source, "active");
	assert_string_equal(s.last_reason, "3 consecutive failed probes (http 503)");
	assert_int_equal(hook_calls(), 1);

	/* It stays down while the mock keeps failing, with no new transition. */
	assert_true(wait_probes(st, 0, 6, 0, WAIT_MS));
	assert_int_equal(transitions(st), 1);
	health_checker_free(hc);
	mock_kill(&m);
}

static void test_probe_kill_and_restart(void **state)
{
	NEED_MOCK();
	struct mock m;
	assert_true(mock_start(&m, 0, NULL));
	int port = m.port;
	struct config_instance in;
	active_instance(&in, "qwen-k", port, 100);
	in.active.http_method = "GET";
	in.active.http_path = "/v1/models";
	in.active.http_req_body = NULL;
	struct config c = {.instances = &in, .n_instances = 1};
	struct health_checker *hc = health_checker_new(base);
	health_checker_sync(hc, &c);
	struct instance_state *st = health_state("qwen-k");
	assert_true(wait_probes(st, 2, 0, 1, WAIT_MS));
	/* >=: on a starved loop the third may be on the wire already */
	assert_true(mock_count(&m, "/v1/models") >= 2);

	mock_kill(&m);
	struct health_snapshot before;
	health_snapshot(st, &before);
	assert_true(wait_probes(st, 0, before.probes_failed + 2, 0, WAIT_MS));
	struct health_snapshot s;
	health_snapshot(st, &s);
	assert_int_equal(s.probes_failed, 2);
	assert_int_equal(s.transitions, 1);
	assert_non_null(strstr(s.last_reason, "2 consecutive failed probes (connect error: "));

	/* Back on the same port: healthy after `successes` good probes. */
	assert_true(mock_start(&m, port, NULL));
	assert_true(wait_probes(st, 0, 0, 1, WAIT_MS));
	health_snapshot(st, &s);
	assert_int_equal(s.transitions, 2);
	assert_string_equal(s.source, "active");
	assert_string_equal(s.last_reason, "2 consecutive successful probes (http 200)");
	assert_int_equal(hook_calls(), 2);
	assert_true(hook_seen.healthy);
	assert_true(mock_count(&m, "/v1/models") >= 2); /* the restarted mock saw both */

	health_checker_free(hc);
	mock_kill(&m);
}

static void test_probe_tcp(void **state)
{
	NEED_MOCK();
	struct mock m;
	assert_true(mock_start(&m, 0, NULL));
	int port = m.port;
	struct config_instance in;
	active_instance(&in, "tcp-only", port, 100);
	in.active.type = CHECK_TCP;
	in.active.unhealthy.tcp_failures = 3;
	struct config c = {.instances = &in, .n_instances = 1};
	struct health_checker *hc = health_checker_new(base);
	health_checker_sync(hc, &c);
	struct instance_state *st = health_state("tcp-only");
	assert_true(wait_probes(st, 3, 0, 1, WAIT_MS));
	/* A tcp probe only connects: nothing reached the HTTP layer. */
	assert_int_equal(mock_count(&m, "/v1/chat/completions"), 0);

	mock_kill(&m);
	assert_true(wait_probes(st, 0, 3, 0, WAIT_MS));
	struct health_snapshot s;
	health_snapshot(st, &s);
	assert_int_equal(s.probes_failed, 3);
	assert_non_null(strstr(s.last_reason, "Connection refused"));

	assert_true(mock_start(&m, port, NULL));
	assert_true(wait_probes(st, 0, 0, 1, WAIT_MS));
	health_snapshot(st, &s);
	assert_string_equal(s.last_reason, "2 consecutive successful probes (connected)");
	health_checker_free(hc);
	mock_kill(&m);
}

static void test_probe_tcp_hostname(void **state)
{
	NEED_MOCK();
	struct mock m;
	assert_true(mock_start(&m, 0, NULL));
	struct config_instance in;
	char host[64];
	active_instance(&in, "tcp-name", m.port, 100);
	snprintf(host, sizeof(host), "localhost:%d", m.port);
	in.active.host = host;
	in.active.type = CHECK_TCP;
	struct config c = {.instances = &in, .n_instances = 1};
	struct health_checker *hc = health_checker_new(base);
	health_checker_sync(hc, &c);
	struct instance_state *st = health_state("tcp-name");
	/* localhost may resolve to ::1 first, where the mock does not listen:
	 * what matters is that the resolver answers and probes complete. */
	uint64_t deadline = http_now_us() + WAIT_MS * MS;
	struct health_snapshot s;
	do {
		event_base_loop(base, EVLOOP_ONCE);
		health_snapshot(st, &s);
	} while (s.probes_ok + s.probes_failed < 2 && http_now_us() < deadline);
	assert_true(s.probes_ok + s.probes_failed >= 2);
	health_checker_free(hc);
	mock_kill(&m);
}

static void test_probe_timeouts(void **state)
{
	NEED_MOCK();
	struct mock m;
	assert_true(mock_start(&m, 0, "--hang", NULL));
	struct config_instance in;
	active_instance(&in, "hung", m.port, 100);
	in.active.timeout = 150;
	in.active.unhealthy.timeouts = 2;
	struct config c = {.instances = &in, .n_instances = 1};
	struct health_checker *hc = health_checker_new(base);
	health_checker_sync(hc, &c);
	struct instance_state *st = health_state("hung");
	assert_true(wait_probes(st, 0, 2, 0, WAIT_MS));
	struct health_snapshot s;
	health_snapshot(st, &s);
	assert_true(s.probes_failed >= 2);
	assert_string_equal(s.last_reason,
	                    "2 consecutive probe timeouts (no answer within 150 ms)");
	health_checker_free(hc);
	mock_kill(&m);
}

static void test_probe_concurrency(void **state)
{
	NEED_MOCK();
	struct mock m;
	assert_true(mock_start(&m, 0, "--ttft", "100", NULL));
	struct config_instance in[3];
	const char *names[] = {"conc-a", "conc-b", "conc-c"};
	for (int i = 0; i < 3; i++) {
		active_instance(&in[i], names[i], m.port, 100);
		in[i].active.concurrency = 1;
	}
	struct config c = {.instances = in, .n_instances = 3};
	struct health_checker *hc = health_checker_new(base);
	health_checker_sync(hc, &c);
	/* All three are due at once; one at a time goes out. */
	assert_true(wait_probes(health_state("conc-c"), 1, 0, 1, WAIT_MS));
	json_t *stats = mock_get_json(&m, "/_mock/stats");
	assert_non_null(stats);
	assert_int_equal(json_integer_value(json_object_get(stats, "max_active")), 1);
	json_decref(stats);
	for (int i = 0; i < 3; i++) {
		struct health_snapshot s;
		health_snapshot(health_state(names[i]), &s);
		assert_true(s.probes_ok >= 1);
	}
	health_checker_free(hc);
	mock_kill(&m);
}

static void test_probe_reload(void **state)
{
	NEED_MOCK();
	struct mock bad, good;
	assert_true(mock_start(&bad, 0, "--status", "503", NULL));
	assert_true(mock_start(&good, 0, NULL));
	struct config_instance in[2];
	active_instance(&in[0], "keep", bad.port, 100);
	active_instance(&in[1], "drop", good.port, 100);
	struct config c1 = {.instances = in, .n_instances = 2};
	struct health_checker *hc = health_checker_new(base);
	health_checker_sync(hc, &c1);
	struct instance_state *keep = health_state("keep"), *drop = health_state("drop");
	assert_true(wait_probes(keep, 0, 2, 0, WAIT_MS));
	assert_true(wait_probes(drop, 2, 0, 1, WAIT_MS));

	/* A reload that keeps "keep" (same settings, a new copy of them) and
	 * removes "drop": keep's state stays, drop's probes stop. */
	struct config_instance in2[1];
	active_instance(&in2[0], "keep", bad.port, 100);
	struct config c2 = {.instances = in2, .n_instances = 1};
	health_checker_sync(hc, &c2);
	assert_true(health_checker_probing(hc, "keep"));
	assert_false(health_checker_probing(hc, "drop"));
	assert_false(healthy(keep));
	assert_int_equal(transitions(keep), 1);

	/* One more probe of keep: anything drop had on the wire has landed. */
	struct health_snapshot k0;
	health_snapshot(keep, &k0);
	assert_true(wait_probes(keep, 0, k0.probes_failed + 1, 0, WAIT_MS));
	size_t n = mock_count(&good, "/v1/chat/completions");
	health_snapshot(keep, &k0);
	/* Four more intervals of keep's probes, and not one of drop's. */
	assert_true(wait_probes(keep, 0, k0.probes_failed + 4, 0, WAIT_MS));
	assert_int_equal(mock_count(&good, "/v1/chat/completions"), n);
	struct health_snapshot k1;
	health_snapshot(keep, &k1);
	assert_int_equal(k1.transitions, 1);

	/* A changed setting restarts the probe at once: point it at the good mock, every
	 * hour, healthy after one success. Healthy again proves the first came at once. */
	active_instance(&in2[0], "keep", good.port, 3600 * 1000);
	in2[0].active.healthy.successes = 1;
	health_checker_sync(hc, &c2);
	struct health_snapshot k2;
	health_snapshot(keep, &k2);
	assert_true(wait_probes(keep, k2.probes_ok + 1, 0, 1, WAIT_MS));
	assert_int_equal(transitions(keep), 2);

	health_checker_free(hc);
	mock_kill(&bad);
	mock_kill(&good);
}

static bool load_known(void *arg)
{
	struct health_load l;
	return health_load_get(arg, http_now_us(), &l);
}

static void test_load_scrape(void **state)
{
	NEED_MOCK();
	struct mock m;
	assert_true(mock_start(&m, 0, "--max-concurrency", "4", NULL));
	struct config_instance in;
	char url[64];
	passive_instance(&in, "loaded");
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/metrics", m.port);
	in.load.metrics_url = url;
	in.load.interval = 50;
	struct config c = {.instances = &in, .n_instances = 1};
	struct health_checker *hc = health_checker_new(base);
	health_checker_sync(hc, &c);
	struct instance_state *st = health_state("loaded");
	assert_true(run_until(load_known, st, WAIT_MS));
	struct health_load l;
	assert_true(health_load_get(st, http_now_us(), &l));
	assert_true(l.waiting == 0 && l.running == 0);
	assert_true(l.kv_cache >= 0 && l.kv_cache <= 1);
	/* Old numbers are unknown, not trusted. */
	assert_false(health_load_get(
	        st, http_now_us() + 50 * HEALTH_LOAD_STALE_INTERVALS * MS + l.age_us + 1000 * MS,
	        &l));

	/* The mock dies: the next scrape fails and the load becomes unknown. */
	mock_kill(&m);
	uint64_t deadline = http_now_us() + WAIT_MS * MS;
	while (health_load_get(st, http_now_us(), &l) && http_now_us() < deadline)
		event_base_loop(base, EVLOOP_ONCE);
	assert_false(health_load_get(st, http_now_us(), &l));

	/* Removing load.metrics_url stops the scraper. */
	in.load.metrics_url = NULL;
	health_checker_sync(hc, &c);
	health_checker_free(hc);
}

/* An older vLLM: two models, the gpu_ name for the KV cache, and names that
 * only start like the ones we read. */
static const char old_vllm_metrics[] =
        "# HELP vllm:num_requests_waiting Number of requests waiting.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        "vllm:num_requests_waiting{engine=\"0\",model_name=\"a\"} 3.0\n"
        "vllm:num_requests_waiting{model_name=\"b}\\\"x\"} 2\n"
        "vllm:num_requests_waiting_total 100\n"
        "vllm:num_requests_running{model_name=\"a\"} 5 1700000000000\n"
        "vllm:num_requests_running_max{model_name=\"a\"} 50\n"
        "vllm:gpu_cache_usage_perc{model_name=\"a\"} 0.25\n";

static void metrics_cb(struct evhttp_request *req, void *arg)
{
	struct evbuffer *b = evbuffer_new();
	evbuffer_add(b, old_vllm_metrics, strlen(old_vllm_metrics));
	evhttp_send_reply(req, 200, "OK", b);
	evbuffer_free(b);
}

static void test_load_parse(void **state)
{
	struct evhttp *srv = evhttp_new(base);
	evhttp_set_gencb(srv, metrics_cb, NULL);
	struct evhttp_bound_socket *bs = evhttp_bind_socket_with_handle(srv, "127.0.0.1", 0);
	assert_non_null(bs);
	struct sockaddr_in sin;
	socklen_t slen = sizeof(sin);
	getsockname(evhttp_bound_socket_get_fd(bs), (struct sockaddr *)&sin, &slen);

	struct config_instance in;
	char url[64];
	passive_instance(&in, "old-vllm");
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/metrics", ntohs(sin.sin_port));
	in.load.metrics_url = url;
	in.load.interval = 100;
	struct config c = {.instances = &in, .n_instances = 1};
	struct health_checker *hc = health_checker_new(base);
	health_checker_sync(hc, &c);
	struct instance_state *st = health_state("old-vllm");
	assert_true(run_until(load_known, st, WAIT_MS));
	struct health_load l;
	assert_true(health_load_get(st, http_now_us(), &l));
	assert_true(l.waiting == 5.0);
	assert_true(l.running == 5.0);
	assert_true(l.kv_cache == 0.25);
	health_checker_free(hc);
	evhttp_free(srv);
}

/* ---------------------------------------------------------------- pure parsers */

/* A copy in an exact-size heap block: ASan sees any read past the value. */
static char *exact(const char *s, size_t n)
{
	char *p = malloc(n ? n : 1);
	assert_non_null(p);
	memcpy(p, s, n);
	return p;
}

static bool retry_after(const char *s, int64_t now, uint64_t *out)
{
	size_t n = strlen(s);
	char *p = exact(s, n);
	bool ok = health_parse_retry_after(p, n, now, out);
	free(p);
	return ok;
}

static void test_parse_retry_after(void **state)
{
	uint64_t v;
	const int64_t now = 784111777; /* Sun, 06 Nov 1994 08:49:37 GMT */

	assert_true(retry_after("120", now, &v));
	assert_int_equal(v, 120);
	assert_true(retry_after("  7\t", now, &v));
	assert_int_equal(v, 7);
	assert_true(retry_after("0", now, &v));
	assert_int_equal(v, 0);
	/* Capped, however many digits (strtoull wrapped or saturated at 2^64-1). */
	assert_true(retry_after("3601", now, &v));
	assert_int_equal(v, HEALTH_RETRY_AFTER_MAX_S);
	assert_true(retry_after("99999999999999999999999999999999999999", now, &v));
	assert_int_equal(v, HEALTH_RETRY_AFTER_MAX_S);
	/* What strtoull accepted: signs, blanks inside, trailing garbage, hex. */
	assert_false(retry_after("-5", now, &v));
	assert_false(retry_after("+5", now, &v));
	assert_false(retry_after("5 s", now, &v));
	assert_false(retry_after("12x", now, &v));
	assert_false(retry_after("0x10", now, &v));
	assert_false(retry_after("", now, &v));
	assert_false(retry_after("   ", now, &v));
	/* The value of a header line that ends without a CR: no read past it. */
	char *p = exact("12", 1);
	assert_true(health_parse_retry_after(p, 1, now, &v));
	assert_int_equal(v, 1);
	free(p);

	/* HTTP-date, relative to now. */
	assert_true(retry_after("Sun, 06 Nov 1994 08:51:37 GMT", now, &v));
	assert_int_equal(v, 120);
	assert_true(retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now, &v));
	assert_int_equal(v, 0);
	assert_true(retry_after("Sat, 05 Nov 1994 08:49:37 GMT", now, &v)); /* past */
	assert_int_equal(v, 0);
	assert_true(retry_after("Fri, 01 Jan 2100 00:00:00 GMT", now, &v));
	assert_int_equal(v, HEALTH_RETRY_AFTER_MAX_S);
	assert_true(retry_after("Tue, 29 Feb 2000 00:00:00 GMT", 951782400 - 10, &v));
	assert_int_equal(v, 10);
	assert_false(retry_after("Thu, 29 Feb 2001 00:00:00 GMT", now, &v)); /* no such day */
	assert_false(retry_after("Sun, 31 Apr 1994 08:49:37 GMT", now, &v));
	assert_false(retry_after("Sun, 06 Nov 1994 24:00:00 GMT", now, &v));
	assert_false(retry_after("Sun, 06 Nov 1994 08:49:37 UTC", now, &v));
	assert_false(retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now, &v)); /* obsolete forms */
	assert_false(retry_after("Sun Nov  6 08:49:37 1994", now, &v));
	assert_false(retry_after("Sun, 06 Nov 1994 08:49:37 GMT trailing", now, &v));
}

static bool parse_load(const char *s, struct health_load *l)
{
	size_t n = strlen(s);
	char *p = exact(s, n);
	bool ok = health_parse_load(p, n, l);
	free(p);
	return ok;
}

static void test_parse_load(void **state)
{
	struct health_load l;

	assert_true(parse_load(old_vllm_metrics, &l));
	assert_true(l.waiting == 5.0 && l.running == 5.0 && l.kv_cache == 0.25);

	/* The last line without its newline, CRLF, tabs, a timestamp. */
	assert_true(
	        parse_load("vllm:num_requests_running 2\r\nvllm:num_requests_waiting\t3 17", &l));
	assert_true(l.waiting == 3.0 && l.running == 2.0 && l.kv_cache == -1);

	/* A number on the next line is not this sample's value. */
	assert_false(parse_load("vllm:num_requests_waiting \n7\n", &l));
	assert_true(l.waiting == 0);
	/* strtod took hex floats, "infinity" and a number followed by garbage; and it
	 * needed a NUL after the page to stop at the last line (read past it here). */
	assert_false(
	        parse_load("vllm:num_requests_waiting 0x10\n"
	                   "vllm:num_requests_waiting infinity\n"
	                   "vllm:num_requests_waiting 5abc\n"
	                   "vllm:num_requests_waiting 1e5000000000000000000000000000000000000000"
	                   "0000000000000000000000000000000000000000000000000000000000000\n",
	                   &l));
	assert_true(
	        parse_load("vllm:num_requests_waiting 7", &l)); /* the last byte is the number's */
	assert_true(l.waiting == 7.0);
	/* The text format's own words. */
	assert_true(
	        parse_load("vllm:num_requests_waiting +Inf\nvllm:kv_cache_usage_perc NaN\n", &l));
	assert_true(isinf(l.waiting) && isnan(l.kv_cache));
	/* A NUL is a byte like any other. */
	static const char nul[] = "vllm:num_requests_running 4\0\nvllm:num_requests_running 1\n";
	char *p = exact(nul, sizeof(nul) - 1);
	assert_true(health_parse_load(p, sizeof(nul) - 1, &l));
	assert_true(l.running == 1.0);
	free(p);
	assert_false(health_parse_load(NULL, 0, &l));
	assert_true(l.waiting == 0 && l.running == 0 && l.kv_cache == -1);
	/* Unterminated labels. */
	assert_false(parse_load("vllm:num_requests_running{a=\"}\" 3", &l));
}

int main(void)
{
	/* SLUICE_TEST_LOG=debug shows what the module logs. */
	enum log_level lvl = LOG_LEVEL_ERROR;
	if (getenv("SLUICE_TEST_LOG"))
		log_parse_level(getenv("SLUICE_TEST_LOG"), &lvl);
	log_set_level(lvl);
	evthread_use_pthreads();
	curl_global_init(CURL_GLOBAL_DEFAULT);
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test_setup_teardown(test_passive_http_threshold, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_passive_http_mixed_and_neutral, setup,
	                                        teardown),
	        cmocka_unit_test_setup_teardown(test_passive_tcp_threshold, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_passive_timeout_threshold, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_passive_zero_threshold_and_disabled, setup,
	                                        teardown),
	        cmocka_unit_test_setup_teardown(test_trial, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_trial_abandon_and_lease, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_trial_single_slot_across_threads, setup,
	                                        teardown),
	        cmocka_unit_test_setup_teardown(test_active_instance_recovers_by_probes_only, setup,
	                                        teardown),
	        cmocka_unit_test_setup_teardown(test_retry_after, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_state_survives_lookup, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_many_states, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_probe_sends_configured_request, probe_setup,
	                                        probe_teardown),
	        cmocka_unit_test_setup_teardown(test_probe_http_failures, probe_setup,
	                                        probe_teardown),
	        cmocka_unit_test_setup_teardown(test_probe_kill_and_restart, probe_setup,
	                                        probe_teardown),
	        cmocka_unit_test_setup_teardown(test_probe_tcp, probe_setup, probe_teardown),
	        cmocka_unit_test_setup_teardown(test_probe_tcp_hostname, probe_setup,
	                                        probe_teardown),
	        cmocka_unit_test_setup_teardown(test_probe_timeouts, probe_setup, probe_teardown),
	        cmocka_unit_test_setup_teardown(test_probe_concurrency, probe_setup,
	                                        probe_teardown),
	        cmocka_unit_test_setup_teardown(test_probe_reload, probe_setup, probe_teardown),
	        cmocka_unit_test_setup_teardown(test_load_scrape, probe_setup, probe_teardown),
	        cmocka_unit_test_setup_teardown(test_load_parse, probe_setup, probe_teardown),
	        cmocka_unit_test(test_parse_retry_after),
	        cmocka_unit_test(test_parse_load),
	};
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	curl_global_cleanup();
	return rc;
}
