/* test_store_redis.c — quotas on a real redis-server: sharing, bound, outages, timeouts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <hiredis/hiredis.h>

#include "sluice/config.h"
#include "sluice/log.h"
#include "sluice/quota.h"

#include "../../src/store.h"

/* ---------------------------------------------------------------- the redis-server */

static pid_t redis_pid = -1;
static int redis_port;
static bool have_redis;
static char log_path[256];

static uint64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int free_port(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port;

	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
	    getsockname(fd, (struct sockaddr *)&a, &len) < 0)
		return -1;
	port = ntohs(a.sin_port);
	close(fd);
	return port;
}

static redisContext *sync_client(void)
{
	struct timeval tv = {1, 0};
	redisContext *rc = redisConnectWithTimeout("127.0.0.1", redis_port, tv);
	if (rc == NULL || rc->err) {
		if (rc)
			redisFree(rc);
		return NULL;
	}
	return rc;
}

static void redis_stop(void)
{
	if (redis_pid > 0) {
		kill(redis_pid, SIGKILL);
		waitpid(redis_pid, NULL, 0);
		redis_pid = -1;
	}
}

static bool redis_start(void)
{
	char port[16];
	uint64_t deadline;

	snprintf(port, sizeof(port), "%d", redis_port);
	redis_pid = fork();
	if (redis_pid < 0)
		return false;
	if (redis_pid == 0) {
		int devnull = open("/dev/null", O_WRONLY);
		dup2(devnull, STDOUT_FILENO);
		dup2(devnull, STDERR_FILENO);
		execlp("redis-server", "redis-server", "--port", port, "--bind", "127.0.0.1",
		       "--save", "", "--appendonly", "no", (char *)NULL);
		_exit(127);
	}
	deadline = mono_ms() + 5000;
	while (mono_ms() < deadline) {
		redisContext *rc = sync_client();
		if (rc != NULL) {
			redisReply *r = redisCommand(rc, "PING");
			bool ok = r != NULL && r->type == REDIS_REPLY_STATUS;
			if (r)
				freeReplyObject(r);
			redisFree(rc);
			if (ok)
				return true;
		}
		usleep(20 * 1000);
	}
	redis_stop();
	return false;
}

static long long redis_int(const char *fmt, ...)
{
	redisContext *rc = sync_client();
	va_list ap;
	redisReply *r;
	long long v = -1;

	assert_non_null(rc);
	va_start(ap, fmt);
	r = redisvCommand(rc, fmt, ap);
	va_end(ap);
	assert_non_null(r);
	if (r->type == REDIS_REPLY_INTEGER)
		v = r->integer;
	else if (r->type == REDIS_REPLY_STRING)
		v = strtoll(r->str, NULL, 10);
	else if (r->type == REDIS_REPLY_NIL)
		v = 0;
	freeReplyObject(r);
	redisFree(rc);
	return v;
}

static void redis_do(const char *fmt, ...)
{
	redisContext *rc = sync_client();
	va_list ap;
	redisReply *r;

	assert_non_null(rc);
	va_start(ap, fmt);
	r = redisvCommand(rc, fmt, ap);
	va_end(ap);
	assert_non_null(r);
	freeReplyObject(r);
	redisFree(rc);
}

static int group_setup(void **state)
{
	if (system("command -v redis-server >/dev/null 2>&1") != 0) {
		fprintf(stderr,
		        "test_store_redis: redis-server is not installed: skipping every test\n");
		return 0;
	}
	atexit(redis_stop);
	redis_port = free_port();
	if (redis_port <= 0 || !redis_start()) {
		fprintf(stderr,
		        "test_store_redis: cannot start redis-server: skipping every test\n");
		return 0;
	}
	have_redis = true;
	snprintf(log_path, sizeof(log_path), "/tmp/sluice-test-redis-%d.log", (int)getpid());
	unlink(log_path);
	log_open(log_path);
	return 0;
}

static int group_teardown(void **state)
{
	redis_stop();
	log_open("stderr");
	if (log_path[0])
		unlink(log_path);
	return 0;
}

#define NEED_REDIS()                                                                               \
	do {                                                                                       \
		if (!have_redis)                                                                   \
			skip();                                                                    \
		if (redis_pid < 0)                                                                 \
			assert_true(redis_start());                                                \
	} while (0)

/* Occurrences of needle in the error log written since offset. */
static int log_count(long offset, const char *needle)
{
	FILE *f = fopen(log_path, "r");
	char line[4096];
	int n = 0;

	if (f == NULL)
		return 0;
	fseek(f, offset, SEEK_SET);
	while (fgets(line, sizeof(line), f))
		if (strstr(line, needle))
			n++;
	fclose(f);
	return n;
}

static long log_offset(void)
{
	struct stat st;
	return stat(log_path, &st) == 0 ? (long)st.st_size : 0;
}

/* ---------------------------------------------------------------- fixtures */

static _Atomic uint64_t fake_now;

static uint64_t fake_clock(void)
{
	return atomic_load(&fake_now);
}

static struct config *load_cfg(const char *prefix, const char *on_error, const char *timeout,
                               const char *password, int db)
{
	char yaml[2048];
	struct config_errors e;
	struct config *c;

	snprintf(yaml, sizeof(yaml),
	         "store:\n"
	         "  type: redis\n"
	         "  redis: { address: \"127.0.0.1:%d\", prefix: \"%s\", timeout: %s%s%s%s, db: %d "
	         "}\n"
	         "  on_error: %s\n"
	         "instances:\n"
	         "  - name: llm\n"
	         "    provider: openai\n"
	         "    limits: [{ limit: 50000, window: 1h }]\n"
	         "  - name: slide\n"
	         "    provider: openai\n"
	         "    limits: [{ limit: 1000, window: 1m, type: sliding }]\n"
	         "consumers:\n"
	         "  - name: team\n"
	         "    keys: [k]\n"
	         "    limits: [{ instance: llm, limit: 10000, window: 1h }]\n"
	         "  - name: other\n"
	         "    keys: [k2]\n",
	         redis_port, prefix, timeout, password ? ", password: \"" : "",
	         password ? password : "", password ? "\"" : "", db, on_error);
	c = config_load_string(yaml, strlen(yaml), "t.yaml", &e);
	if (c == NULL) {
		for (size_t i = 0; i < e.n; i++)
			print_error("%s\n", e.msgs[i]);
		config_errors_free(&e);
		fail_msg("the YAML did not load");
	}
	return c;
}

/* One "node": its own event_base and quota, as one worker of one process. */
struct node {
	struct event_base *base;
	struct quota *q;
};

/* Every live node: a worker's loop runs all the time, so whenever the tests wait on one
 * node, the others' loops turn too (their commands in the background must not stall). */
#define MAX_NODES 8
static struct node *live_nodes[MAX_NODES];

/* A node of its own thread (the race): its loop is pumped by that thread only. */
static void node_init_threaded(struct node *n, const struct config *c)
{
	n->base = event_base_new();
	n->q = quota_new(n->base, c);
	assert_non_null(n->q);
}

static void node_init(struct node *n, const struct config *c)
{
	node_init_threaded(n, c);
	for (int i = 0; i < MAX_NODES; i++)
		if (live_nodes[i] == NULL) {
			live_nodes[i] = n;
			return;
		}
	fail_msg("more than %d nodes", MAX_NODES);
}

static bool is_live(const struct node *n)
{
	for (int i = 0; i < MAX_NODES; i++)
		if (live_nodes[i] == n)
			return true;
	return false;
}

static void pump(struct node *n)
{
	event_base_loop(n->base, EVLOOP_NONBLOCK);
	for (int i = 0; is_live(n) && i < MAX_NODES; i++)
		if (live_nodes[i] != NULL && live_nodes[i] != n)
			event_base_loop(live_nodes[i]->base, EVLOOP_NONBLOCK);
}

/* Run the loops of nodes until *flag reaches target or timeout_ms passes. */
static bool run_until(struct node *nodes, int n_nodes, atomic_int *flag, int target, int timeout_ms)
{
	uint64_t deadline = mono_ms() + (uint64_t)timeout_ms;
	while (atomic_load(flag) < target) {
		if (mono_ms() > deadline)
			return false;
		for (int i = 0; i < n_nodes; i++)
			pump(&nodes[i]);
		usleep(200);
	}
	return true;
}

static bool drain(struct node *n, int timeout_ms)
{
	uint64_t deadline = mono_ms() + (uint64_t)timeout_ms;
	while (quota_inflight(n->q) > 0) {
		if (mono_ms() > deadline)
			return false;
		pump(n);
		usleep(200);
	}
	return true;
}

static void node_free(struct node *n)
{
	drain(n, 2000);
	for (int i = 0; i < MAX_NODES; i++)
		if (live_nodes[i] == n)
			live_nodes[i] = NULL;
	quota_free(n->q);
	event_base_free(n->base);
}

static void count_cb(void *arg, struct quota_ticket *t)
{
	atomic_fetch_add((atomic_int *)arg, 1);
}

/* Admission to completion; returns the status it first returned. */
static enum quota_status admit_wait(struct node *n, struct quota_ticket *t, const struct config *c,
                                    const char *cons, const char *inst, uint64_t p, uint64_t comp)
{
	atomic_int done = 0;
	enum quota_status st = quota_admit(n->q, t, c, cons ? config_find_consumer(c, cons) : NULL,
	                                   config_find_instance(c, inst), p, comp, count_cb, &done);
	if (st == QUOTA_PENDING) {
		assert_int_equal(atomic_load(&done), 0); /* never from inside quota_admit */
		assert_true(run_until(n, 1, &done, 1, 5000));
	}
	return st;
}

/* wait until a node's connection works again (admissions without store errors) */
static bool wait_shared(struct node *n, const struct config *c, int timeout_ms)
{
	uint64_t deadline = mono_ms() + (uint64_t)timeout_ms;
	while (mono_ms() < deadline) {
		struct quota_ticket t = {0};
		admit_wait(n, &t, c, "other", "slide", 0, 0);
		quota_release(n->q, &t);
		if (!t.store_error)
			return true;
		for (int i = 0; i < 20; i++) {
			pump(n);
			usleep(5000);
		}
	}
	return false;
}

static void test_setup_clock(void)
{
	/* a failed test may have left its nodes registered */
	memset(live_nodes, 0, sizeof(live_nodes));
	/* a fixed instant: 10:20 UTC, well inside its hour */
	atomic_store(&fake_now, 1735725600000ull + 20 * 60 * 1000);
	quota_set_clock_for_tests(fake_clock);
}

static void test_cleanup(void)
{
	quota_set_clock_for_tests(NULL);
	quota_global_free();
}

/* ---------------------------------------------------------------- tests */

static void test_admit_settle(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct config *c = load_cfg("t1:", "deny", "1s", NULL, 0);
	struct node n;
	struct quota_ticket t = {0};
	char key[256];
	uint64_t start = 1735725600000ull; /* the hour */

	node_init(&n, c);
	assert_int_equal(admit_wait(&n, &t, c, "team", "llm", 100, 400), QUOTA_PENDING);
	assert_true(t.admitted);
	assert_false(t.store_error);
	assert_int_equal(t.hdr_limit, 10000);
	assert_int_equal(t.hdr_remaining, 9500);
	assert_int_equal(t.hdr_reset_s, 40 * 60);

	/* the keys: <prefix><limit id>:<consumer|*>:<window start>, TTL two windows */
	snprintf(key, sizeof(key), "t1:consumer:team:llm:total_tokens:1h:team:%llu",
	         (unsigned long long)start);
	assert_int_equal(redis_int("GET %s", key), 500);
	long long ttl = redis_int("PTTL %s", key);
	assert_true(ttl > 2 * 3600 * 1000 - 60000 && ttl <= 2 * 3600 * 1000);
	snprintf(key, sizeof(key), "t1:instance:llm:total_tokens:1h:*:%llu",
	         (unsigned long long)start);
	assert_int_equal(redis_int("GET %s", key), 500);

	/* settlement: one round trip, fire and forget */
	quota_settle(n.q, &t, 120, 30);
	assert_int_equal(quota_inflight(n.q), 1);
	assert_true(drain(&n, 2000));
	assert_int_equal(redis_int("GET %s", key), 150);

	/* above the reservation */
	admit_wait(&n, &t, c, "team", "llm", 100, 100);
	quota_settle(n.q, &t, 500, 500);
	assert_true(drain(&n, 2000));
	assert_int_equal(redis_int("GET %s", key), 1150);

	/* release */
	admit_wait(&n, &t, c, "team", "llm", 100, 100);
	assert_int_equal(redis_int("GET %s", key), 1350);
	quota_release(n.q, &t);
	assert_true(drain(&n, 2000));
	assert_int_equal(redis_int("GET %s", key), 1150);

	/* exhaustion: refused, nothing reserved, retry at the hour */
	admit_wait(&n, &t, c, "team", "llm", 8850, 0);
	assert_true(t.admitted);
	quota_settle(n.q, &t, 8850, 0);
	assert_true(drain(&n, 2000));
	admit_wait(&n, &t, c, "team", "llm", 1, 1);
	assert_false(t.admitted);
	assert_false(t.store_error);
	assert_ptr_equal(t.denied_by, &config_find_consumer(c, "team")->limits[0]);
	assert_true(t.denied_is_consumer);
	assert_int_equal(t.retry_after_s, 40 * 60);
	assert_int_equal(redis_int("GET %s", key), 10000);

	/* the shared view for the admin API */
	node_free(&n);
	config_unref(c);
	test_cleanup();
}

static void peek_cb(void *arg, struct quota_limit_state *st, size_t n, bool store_error)
{
	uint64_t *out = arg;
	assert_false(store_error);
	assert_int_equal(n, 1);
	out[0] = st[0].used;
	out[1] = st[0].remaining;
	out[2] = 1;
}

static void test_peek_and_noscript(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct config *c = load_cfg("t2:", "deny", "1s", NULL, 0);
	struct node n;
	struct quota_ticket t = {0};
	uint64_t got[3] = {0};

	node_init(&n, c);
	admit_wait(&n, &t, c, "team", "llm", 300, 0);
	assert_true(t.admitted);
	/* the script cache flushed behind our back: NOSCRIPT → sent whole, still one answer */
	redis_do("SCRIPT FLUSH");
	quota_settle(n.q, &t, 200, 0);
	assert_true(drain(&n, 2000));
	redis_do("SCRIPT FLUSH");
	admit_wait(&n, &t, c, "team", "llm", 50, 0);
	assert_true(t.admitted);
	assert_false(t.store_error);
	assert_int_equal(t.hdr_remaining, 10000 - 250);

	struct quota_peek *p = quota_peek(n.q, config_find_consumer(c, "team"), NULL, peek_cb, got);
	assert_non_null(p);
	uint64_t deadline = mono_ms() + 2000;
	while (got[2] == 0 && mono_ms() < deadline) {
		pump(&n);
		usleep(200);
	}
	assert_int_equal(got[2], 1);
	assert_int_equal(got[0], 250);
	assert_int_equal(got[1], 9750);
	quota_release(n.q, &t);
	node_free(&n);
	config_unref(c);
	test_cleanup();
}

static void test_cancel(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct config *c = load_cfg("t3:", "deny", "1s", NULL, 0);
	struct node n;
	struct quota_ticket t = {0};
	atomic_int done = 0;
	char key[256];

	node_init(&n, c);
	admit_wait(&n, &t, c, "team", "llm", 1, 1); /* connected */
	quota_release(n.q, &t);
	assert_true(drain(&n, 2000));
	snprintf(key, sizeof(key), "t3:instance:llm:total_tokens:1h:*:%llu", 1735725600000ull);
	assert_int_equal(redis_int("GET %s", key), 0);

	assert_int_equal(quota_admit(n.q, &t, c, config_find_consumer(c, "team"),
	                             config_find_instance(c, "llm"), 700, 0, count_cb, &done),
	                 QUOTA_PENDING);
	quota_cancel(n.q, &t);
	assert_true(drain(&n, 2000)); /* the admission's reply, then the release it triggers */
	assert_int_equal(atomic_load(&done), 0);
	assert_int_equal(redis_int("GET %s", key), 0);
	node_free(&n);
	config_unref(c);
	test_cleanup();
}

/* Two nodes (two connections, two loops) enforce one quota. */
static void test_two_nodes_one_quota(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct config *c1 = load_cfg("t4:", "deny", "1s", NULL, 0);
	struct config *c2 =
	        load_cfg("t4:", "deny", "1s", NULL, 0); /* the other process' snapshot */
	struct node n[2];
	uint64_t charged = 0;
	int refused_in_a_row = 0;

	node_init(&n[0], c1);
	node_init(&n[1], c2);
	for (int i = 0; refused_in_a_row < 4 && i < 1000; i++) {
		struct quota_ticket t = {0};
		struct config *c = i % 2 ? c2 : c1;
		admit_wait(&n[i % 2], &t, c, "team", "llm", 100, 400);
		assert_false(t.store_error);
		if (!t.admitted) {
			refused_in_a_row++;
			continue;
		}
		refused_in_a_row = 0;
		quota_settle(n[i % 2].q, &t, 100, 400);
		assert_true(drain(&n[i % 2], 2000));
		charged += 500;
	}
	/* not 2 × 10,000: one quota */
	assert_int_equal(charged, 10000);
	node_free(&n[0]);
	node_free(&n[1]);
	config_unref(c1);
	config_unref(c2);
	test_cleanup();
}

/* 64 admissions at once from 8 threads (8 in flight each), every one on its own loop. */
#define RACE_THREADS    8
#define RACE_SLOTS      8
#define RACE_ROUNDS     12
#define RACE_PROMPT     60
#define RACE_COMPLETION 90

struct race {
	struct config *c;
	pthread_barrier_t go;
	atomic_uint_fast64_t charged, errors, max_in_flight;
};

struct slot {
	struct race *r;
	struct node *n;
	struct quota_ticket t;
	int rounds;
	unsigned seed;
	atomic_int *finished;
	atomic_int *in_flight;
};

static void slot_next(struct slot *s);

static void slot_cb(void *arg, struct quota_ticket *t)
{
	struct slot *s = arg;

	atomic_fetch_sub(s->in_flight, 1);
	if (t->store_error)
		atomic_fetch_add(&s->r->errors, 1);
	if (t->admitted) {
		uint64_t completion = (uint64_t)(rand_r(&s->seed) % (RACE_COMPLETION + 1));
		/* settle and admit again from inside the callback */
		quota_settle(s->n->q, t, RACE_PROMPT, completion);
		atomic_fetch_add(&s->r->charged, RACE_PROMPT + completion);
	}
	slot_next(s);
}

static void slot_next(struct slot *s)
{
	if (s->rounds-- <= 0) {
		atomic_fetch_add(s->finished, 1);
		return;
	}
	int fl = atomic_fetch_add(s->in_flight, 1) + 1;
	uint_fast64_t m = atomic_load(&s->r->max_in_flight);
	while ((uint_fast64_t)fl > m &&
	       !atomic_compare_exchange_weak(&s->r->max_in_flight, &m, (uint_fast64_t)fl))
		;
	const struct config *c = s->r->c;
	if (quota_admit(s->n->q, &s->t, c, config_find_consumer(c, "team"),
	                config_find_instance(c, "llm"), RACE_PROMPT, RACE_COMPLETION, slot_cb,
	                s) == QUOTA_DONE)
		slot_cb(s, &s->t);
}

static atomic_int global_in_flight;

static void *race_thread(void *arg)
{
	struct race *r = arg;
	struct node n;
	struct slot slots[RACE_SLOTS];
	atomic_int finished = 0;

	node_init_threaded(&n, r->c);
	memset(slots, 0, sizeof(slots));
	pthread_barrier_wait(&r->go);
	for (int i = 0; i < RACE_SLOTS; i++) {
		slots[i].r = r;
		slots[i].n = &n;
		slots[i].rounds = RACE_ROUNDS;
		slots[i].seed = (unsigned)(i * 7919 + (int)(uintptr_t)&n);
		slots[i].finished = &finished;
		slots[i].in_flight = &global_in_flight;
		slot_next(&slots[i]);
	}
	run_until(&n, 1, &finished, RACE_SLOTS, 20000);
	node_free(&n);
	return NULL;
}

static void test_concurrency_bound(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct race r;
	pthread_t th[RACE_THREADS];

	memset(&r, 0, sizeof(r));
	r.c = load_cfg("t5:", "deny", "2s", NULL, 0);
	pthread_barrier_init(&r.go, NULL, RACE_THREADS);
	for (int i = 0; i < RACE_THREADS; i++)
		pthread_create(&th[i], NULL, race_thread, &r);
	for (int i = 0; i < RACE_THREADS; i++)
		pthread_join(th[i], NULL);
	pthread_barrier_destroy(&r.go);

	uint64_t charged = atomic_load(&r.charged);
	print_message("redis, %d loops × %d in flight: %llu tokens charged, max %llu admissions in "
	              "flight\n",
	              RACE_THREADS, RACE_SLOTS, (unsigned long long)charged,
	              (unsigned long long)atomic_load(&r.max_in_flight));
	assert_int_equal(atomic_load(&r.errors), 0);
	assert_true(atomic_load(&r.max_in_flight) >= 32);
	assert_true(charged <= 10000 + RACE_PROMPT + RACE_COMPLETION);
	assert_true(charged >= 10000 - (RACE_PROMPT + RACE_COMPLETION));
	char key[256];
	snprintf(key, sizeof(key), "t5:consumer:team:llm:total_tokens:1h:team:%llu",
	         1735725600000ull);
	assert_int_equal(redis_int("GET %s", key), (long long)charged);
	config_unref(r.c);
	test_cleanup();
}

/* Redis killed: allow counts locally and warns once; restarted: shared counting resumes. */
static void test_outage_allow_then_back(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct config *c = load_cfg("t6:", "allow", "100ms", NULL, 0);
	struct node n[2];
	struct quota_ticket t = {0};
	long off = log_offset();

	node_init(&n[0], c);
	node_init(&n[1], c);
	admit_wait(&n[0], &t, c, "team", "llm", 100, 100);
	assert_true(t.admitted);
	assert_false(t.store_error);
	quota_settle(n[0].q, &t, 100, 100);
	assert_true(drain(&n[0], 2000));

	redis_stop();
	/* both nodes keep serving, on local counts */
	uint64_t local = 0;
	for (int i = 0; i < 10; i++) {
		admit_wait(&n[i % 2], &t, c, "team", "llm", 100, 100);
		assert_true(t.admitted);
		assert_true(t.store_error);
		assert_false(t.deny_on_error);
		quota_settle(n[i % 2].q, &t, 100, 100);
		local += 200;
	}
	struct quota_limit_state st[2];
	assert_int_equal(quota_peek_memory(config_find_consumer(c, "team"), NULL, st, 2), 1);
	assert_int_equal(st[0].used, local);
	/* local counting enforces the quota too */
	for (int i = 0; i < 100 && t.admitted; i++) {
		admit_wait(&n[0], &t, c, "team", "llm", 500, 500);
		if (t.admitted)
			quota_settle(n[0].q, &t, 500, 500);
	}
	assert_false(t.admitted);
	assert_true(t.store_error);
	assert_false(t.deny_on_error);
	assert_ptr_equal(t.denied_by, &config_find_consumer(c, "team")->limits[0]);
	/* a few reconnect attempts go by */
	for (int i = 0; i < 50; i++) {
		pump(&n[0]);
		pump(&n[1]);
		usleep(5000);
	}
	assert_int_equal(log_count(off, "redis unreachable, counting locally"), 1);

	assert_true(redis_start());
	assert_true(wait_shared(&n[0], c, 8000));
	assert_true(wait_shared(&n[1], c, 8000));
	/* what each node sent on reconnecting (the undo of the admission the outage cut) */
	assert_true(drain(&n[0], 2000));
	assert_true(drain(&n[1], 2000));
	assert_int_equal(log_count(off, "redis reachable again"), 1);
	assert_int_equal(log_count(off, "redis unreachable"), 1);

	/* shared again: both nodes' admissions land in Redis (fresh: it kept nothing) */
	for (int i = 0; i < 4; i++) {
		admit_wait(&n[i % 2], &t, c, "team", "llm", 100, 100);
		assert_true(t.admitted);
		assert_false(t.store_error);
		quota_settle(n[i % 2].q, &t, 100, 100);
		assert_true(drain(&n[i % 2], 2000));
	}
	char key[256];
	snprintf(key, sizeof(key), "t6:consumer:team:llm:total_tokens:1h:team:%llu",
	         1735725600000ull);
	assert_int_equal(redis_int("GET %s", key), 800);
	node_free(&n[0]);
	node_free(&n[1]);
	config_unref(c);
	test_cleanup();
}

static void test_outage_deny(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct config *c = load_cfg("t7:", "deny", "100ms", NULL, 0);
	struct node n;
	struct quota_ticket t = {0};
	long off = log_offset();

	node_init(&n, c);
	admit_wait(&n, &t, c, "team", "llm", 100, 100);
	assert_true(t.admitted);
	quota_release(n.q, &t);
	assert_true(drain(&n, 2000));

	redis_stop();
	for (int i = 0; i < 3; i++) {
		admit_wait(&n, &t, c, "team", "llm", 100, 100);
		assert_false(t.admitted);
		assert_true(t.store_error);
		assert_true(t.deny_on_error);
		assert_null(t.denied_by);
	}
	/* routes with nothing to count are not affected */
	admit_wait(&n, &t, c, "other", "llm", 1, 1);
	assert_int_equal(log_count(off, "redis unreachable, answering 503"), 1);
	assert_true(redis_start());
	assert_true(wait_shared(&n, c, 8000));
	node_free(&n);
	config_unref(c);
	test_cleanup();
}

/* A stalled server (SIGSTOP): every command ends within about the timeout, never hangs. */
static void test_command_timeout(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct config *c = load_cfg("t8:", "deny", "100ms", NULL, 0);
	struct node n;
	struct quota_ticket t = {0};

	node_init(&n, c);
	admit_wait(&n, &t, c, "team", "llm", 1, 1);
	assert_true(t.admitted);
	quota_release(n.q, &t);
	assert_true(drain(&n, 2000));

	kill(redis_pid, SIGSTOP);
	uint64_t t0 = mono_ms();
	assert_int_equal(admit_wait(&n, &t, c, "team", "llm", 1, 1), QUOTA_PENDING);
	uint64_t took = mono_ms() - t0;
	print_message("stalled redis: the admission failed after %llu ms (timeout 100 ms)\n",
	              (unsigned long long)took);
	assert_true(took >= 90);
	assert_true(took < 600);
	assert_false(t.admitted);
	assert_true(t.store_error);
	assert_true(t.deny_on_error);
	/* the next ones fail at once (no connection) or within the timeout (handshaking) */
	t0 = mono_ms();
	admit_wait(&n, &t, c, "team", "llm", 1, 1);
	assert_true(t.deny_on_error);
	assert_true(mono_ms() - t0 < 600);

	kill(redis_pid, SIGCONT);
	assert_true(wait_shared(&n, c, 8000));
	admit_wait(&n, &t, c, "team", "llm", 1, 1);
	assert_true(t.admitted);
	assert_false(t.store_error);
	quota_release(n.q, &t);
	node_free(&n);
	config_unref(c);
	test_cleanup();
}

/* ---------------------------------------------------------------- reservation tokens */

/* Live reservations ("<token>:<amount>" members) in a bucket's reservation set. */
static long long live_reservations(const char *key)
{
	redisContext *rc = sync_client();
	redisReply *r;
	long long n = 0;

	assert_non_null(rc);
	r = redisCommand(rc, "ZRANGE %s:r 0 -1", key);
	assert_non_null(r);
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	for (size_t i = 0; i < r->elements; i++)
		if (memchr(r->element[i]->str, ':', r->element[i]->len) != NULL)
			n++;
	freeReplyObject(r);
	redisFree(rc);
	return n;
}

/* Pump until node n's connection is back (an admission goes through Redis) and what it
 * queued meanwhile is delivered. */
static void wait_back(struct node *n, const struct config *c)
{
	assert_true(wait_shared(n, c, 8000));
	assert_true(drain(n, 4000));
}

/*
 * An admission sent to a stalled server times out; the server still runs it when it
 * resumes (the command waits in the old connection's socket). Its reservation must not
 * stay: it is undone by its token after the reconnection, or, if the undo runs first, the
 * late admission finds its token dead and reserves nothing.
 */
static void test_late_admission_is_undone(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct config *c = load_cfg("t11:", "deny", "100ms", NULL, 0);
	struct node n;
	struct quota_ticket t = {0};
	char key[256], ikey[256];

	snprintf(key, sizeof(key), "t11:consumer:team:llm:total_tokens:1h:team:%llu",
	         1735725600000ull);
	snprintf(ikey, sizeof(ikey), "t11:instance:llm:total_tokens:1h:*:%llu", 1735725600000ull);
	node_init(&n, c);
	admit_wait(&n, &t, c, "team", "llm", 1, 1); /* connected */
	quota_settle(n.q, &t, 1, 1);
	assert_true(drain(&n, 2000));
	assert_int_equal(redis_int("GET %s", key), 2);

	kill(redis_pid, SIGSTOP);
	for (int i = 0; i < 3; i++) {
		/* the first reaches the stalled server; later ones may reach a reconnection
		 * the kernel accepted for it */
		admit_wait(&n, &t, c, "team", "llm", 300, 400);
		assert_false(t.admitted);
		assert_true(t.deny_on_error);
	}
	kill(redis_pid, SIGCONT);
	wait_back(&n, c);
	assert_int_equal(redis_int("GET %s", key), 2);
	assert_int_equal(redis_int("GET %s", ikey), 2);
	assert_int_equal(live_reservations(key), 0);
	node_free(&n);
	config_unref(c);
	test_cleanup();
}

/*
 * A settlement made while the connection is down waits for the next one (it used to be
 * dropped, leaving the reservation charged); one whose reply is lost is sent again, and
 * running twice changes nothing (by token).
 */
static void test_settlement_waits_for_redis(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct config *c = load_cfg("t12:", "deny", "100ms", NULL, 0);
	struct node n;
	struct quota_ticket t = {0}, probe = {0}, copy;
	char key[256];

	snprintf(key, sizeof(key), "t12:consumer:team:llm:total_tokens:1h:team:%llu",
	         1735725600000ull);
	node_init(&n, c);
	admit_wait(&n, &t, c, "team", "llm", 100, 100);
	assert_true(t.admitted);
	assert_false(t.store_error);
	assert_int_equal(redis_int("GET %s", key), 200);
	copy = t; /* the same reservation, to settle it a second time below */

	kill(redis_pid, SIGSTOP);
	admit_wait(&n, &probe, c, "other", "slide", 1, 1); /* times out: connection closed */
	assert_true(probe.store_error);
	quota_settle(n.q, &t, 30, 20); /* no connection now */
	kill(redis_pid, SIGCONT);
	wait_back(&n, c);
	assert_int_equal(redis_int("GET %s", key), 50);
	assert_int_equal(live_reservations(key), 0);
	/* the same settlement once more (what a retry after a lost reply does): no change */
	quota_settle(n.q, &copy, 30, 20);
	assert_true(drain(&n, 2000));
	assert_int_equal(redis_int("GET %s", key), 50);
	node_free(&n);
	config_unref(c);
	test_cleanup();
}

/*
 * A reservation nobody settles (its node died) is reclaimed by the next admission on its
 * counter once its lease is over: the instance's timeouts.total (10 min by default) plus
 * QUOTA_LEASE_GRACE_MS. A settlement that still arrives charges what was used, once.
 */
static void test_orphan_is_reclaimed_after_its_lease(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct config *c = load_cfg("t13:", "deny", "1s", NULL, 0);
	struct node n;
	struct quota_ticket orphan = {0}, t = {0}, copy;
	char key[256];
	uint64_t lease = 10 * 60 * 1000 + QUOTA_LEASE_GRACE_MS;
	uint64_t t0 = atomic_load(&fake_now);

	snprintf(key, sizeof(key), "t13:instance:llm:total_tokens:1h:*:%llu", 1735725600000ull);
	node_init(&n, c);
	admit_wait(&n, &orphan, c, "team", "llm", 4000, 4000);
	assert_true(orphan.admitted);
	assert_int_equal(redis_int("GET %s", key), 8000);
	copy = orphan;

	/* within the lease: still held */
	atomic_store(&fake_now, t0 + lease - 1000);
	admit_wait(&n, &t, c, "team", "llm", 10, 10);
	assert_true(t.admitted);
	assert_int_equal(t.res[1].cur, 8000);
	quota_settle(n.q, &t, 10, 10);
	assert_true(drain(&n, 2000));
	assert_int_equal(redis_int("GET %s", key), 8020);
	/* past it: the next admission gives the orphan back first */
	atomic_store(&fake_now, t0 + lease + 1000);
	admit_wait(&n, &t, c, "team", "llm", 10, 10);
	assert_true(t.admitted);
	assert_int_equal(t.res[1].cur, 20);
	quota_settle(n.q, &t, 10, 10);
	assert_true(drain(&n, 2000));
	assert_int_equal(redis_int("GET %s", key), 40);
	assert_int_equal(live_reservations(key), 0);
	/* its owner was alive after all: its settlement charges the real use, once */
	quota_settle(n.q, &orphan, 300, 200);
	assert_true(drain(&n, 2000));
	assert_int_equal(redis_int("GET %s", key), 540);
	quota_settle(n.q, &copy, 300, 200);
	assert_true(drain(&n, 2000));
	assert_int_equal(redis_int("GET %s", key), 540);
	node_free(&n);
	config_unref(c);
	test_cleanup();
}

/* A settlement that waited longer than two leases is dropped, and said so once. */
static void test_waiting_settlement_expires(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct config *c = load_cfg("t14:", "deny", "100ms", NULL, 0);
	struct node n;
	struct quota_ticket t = {0}, probe = {0};
	char key[256];
	long off = log_offset();
	uint64_t lease = 10 * 60 * 1000 + QUOTA_LEASE_GRACE_MS;

	snprintf(key, sizeof(key), "t14:consumer:team:llm:total_tokens:1h:team:%llu",
	         1735725600000ull);
	node_init(&n, c);
	admit_wait(&n, &t, c, "team", "llm", 100, 100);
	assert_true(t.admitted);
	kill(redis_pid, SIGSTOP);
	admit_wait(&n, &probe, c, "other", "slide", 1, 1);
	assert_true(probe.store_error);
	quota_settle(n.q, &t, 30, 20);
	atomic_fetch_add(&fake_now, 2 * lease + 1000);
	kill(redis_pid, SIGCONT);
	wait_back(&n, c);
	assert_int_equal(log_count(off, "was dropped"), 1);
	assert_int_equal(redis_int("GET %s", key), 200); /* the bucket still holds it... */
	admit_wait(&n, &t, c, "team", "llm", 1, 1);     /* ...until its lease is over */
	assert_true(t.admitted);
	assert_int_equal(t.res[0].cur, 0);
	quota_release(n.q, &t);
	node_free(&n);
	config_unref(c);
	test_cleanup();
}

/* ---------------------------------------------------------------- replies (no server) */

/* The reply read from raw bytes, as the store's connections read it; NULL on a protocol
 * error or an incomplete reply. */
static redisReply *read_reply(const char *bytes, size_t len)
{
	struct redisReader *rd = redis_reply_reader_new();
	void *reply = NULL;

	assert_non_null(rd);
	assert_int_equal(redisReaderFeed(rd, bytes, len), REDIS_OK);
	if (redisReaderGetReply(rd, &reply) != REDIS_OK)
		reply = NULL;
	redisReaderFree(rd);
	return reply;
}

#define READ(lit) read_reply(lit, sizeof(lit) - 1)

/* Replies are bytes from outside: any type, size or nesting, read by type and length. */
static void test_reply_handling(void **state)
{
	uint64_t cur[2], prev[2], v;
	char text[16];
	redisReply *r;

	/* 13 bytes announcing 2^31 elements: refused, not a 16 GiB allocation */
	assert_null(READ("*2147483647\r\n"));
	assert_null(READ("*4097\r\n"));
	r = READ("*2\r\n*4097\r\n:1\r\n");
	assert_null(r);

	/* the admission's answer: exactly 1 + 2n integers, verdict 0 or 1 */
	r = READ("*5\r\n:1\r\n:100\r\n:-3\r\n:500\r\n:0\r\n");
	assert_non_null(r);
	assert_int_equal(redis_reply_admit(r, 2, cur, prev), REDIS_VERDICT_ADMITTED);
	assert_int_equal(cur[0], 100);
	assert_int_equal(prev[0], 0); /* negative → 0 */
	assert_int_equal(cur[1], 500);
	assert_int_equal(redis_reply_admit(r, 1, cur, prev), REDIS_VERDICT_BAD);
	assert_int_equal(redis_reply_admit(r, (SIZE_MAX - 1) / 2 + 1, cur, prev),
	                 REDIS_VERDICT_BAD);
	freeReplyObject(r);
	r = READ("*1\r\n:-1\r\n"); /* a dead token's answer */
	assert_int_equal(redis_reply_admit(r, 0, cur, prev), REDIS_VERDICT_BAD);
	freeReplyObject(r);
	r = READ("*3\r\n:0\r\n$1\r\n1\r\n:0\r\n");
	assert_int_equal(redis_reply_admit(r, 1, cur, prev), REDIS_VERDICT_BAD);
	freeReplyObject(r);

	/* counters: nil, integers, decimal strings that fit; nothing else */
	r = READ("*6\r\n$-1\r\n$20\r\n18446744073709551615\r\n$20\r\n18446744073709551616\r\n"
	         "$3\r\n1\0"
	         "2\r\n$2\r\n-1\r\n$0\r\n\r\n");
	assert_non_null(r);
	assert_true(redis_reply_u64(r->element[0], &v));
	assert_int_equal(v, 0);
	assert_true(redis_reply_u64(r->element[1], &v));
	assert_true(v == UINT64_MAX);
	for (size_t i = 2; i < 6; i++)
		assert_false(redis_reply_u64(r->element[i], &v));
	assert_false(redis_reply_values(r, 6, (uint64_t[6]){0}));
	assert_false(redis_reply_values(r, 2, (uint64_t[2]){0}));
	freeReplyObject(r);

	/* errors: NOSCRIPT by its bytes; a text for the log is printable and bounded */
	r = READ("-NOSCRIPT No matching script\r\n");
	assert_true(redis_reply_is_noscript(r));
	assert_true(redis_reply_is_error(r));
	freeReplyObject(r);
	r = READ("-NOSCRIP\r\n");
	assert_false(redis_reply_is_noscript(r));
	freeReplyObject(r);
	r = READ("-ERR a\x01"
	         "b\x7f\r\n");
	assert_int_equal(redis_reply_describe(r, text, sizeof(text)), 8);
	assert_string_equal(text, "ERR a?b?");
	assert_int_equal(redis_reply_describe(r, text, 4), 3);
	assert_string_equal(text, "ERR");
	freeReplyObject(r);
	assert_true(redis_reply_is_error(NULL));
	assert_int_equal(redis_reply_describe(NULL, text, sizeof(text)), 8);
	assert_string_equal(text, "no reply");
}

/* AUTH and SELECT: keys land in the configured db; a wrong password is a store error. */
static void test_password_and_db(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct node n;
	struct quota_ticket t = {0};
	char key[256];

	redis_do("CONFIG SET requirepass s3cret");
	struct config *c = load_cfg("t9:", "deny", "1s", "s3cret", 3);
	node_init(&n, c);
	admit_wait(&n, &t, c, "team", "llm", 40, 2);
	assert_true(t.admitted);
	assert_false(t.store_error);
	assert_true(drain(&n, 2000));

	redisContext *rc = sync_client();
	assert_non_null(rc);
	freeReplyObject(redisCommand(rc, "AUTH s3cret"));
	freeReplyObject(redisCommand(rc, "SELECT 3"));
	snprintf(key, sizeof(key), "t9:consumer:team:llm:total_tokens:1h:team:%llu",
	         1735725600000ull);
	redisReply *r = redisCommand(rc, "GET %s", key);
	assert_non_null(r);
	assert_int_equal(r->type, REDIS_REPLY_STRING);
	assert_string_equal(r->str, "42");
	freeReplyObject(r);
	quota_release(n.q, &t);
	assert_true(drain(&n, 2000));
	node_free(&n);
	config_unref(c);

	/* wrong password */
	c = load_cfg("t9:", "deny", "1s", "wrong", 3);
	node_init(&n, c);
	admit_wait(&n, &t, c, "team", "llm", 1, 1);
	assert_false(t.admitted);
	assert_true(t.store_error);
	node_free(&n);
	config_unref(c);

	freeReplyObject(redisCommand(rc, "CONFIG SET requirepass %s", ""));
	redisFree(rc);
	test_cleanup();
}

/* Reload: store settings follow the new snapshot; switching back to memory works. */
static void test_reconfigure(void **state)
{
	NEED_REDIS();
	test_setup_clock();
	struct config *c = load_cfg("t10:", "deny", "1s", NULL, 0);
	struct node n;
	struct quota_ticket t = {0};

	node_init(&n, c);
	admit_wait(&n, &t, c, "team", "llm", 10, 10);
	assert_true(t.admitted);
	/* a new prefix: the reservation made under the old one is not settled into the new */
	struct config *c2 = load_cfg("t10b:", "deny", "1s", NULL, 0);
	quota_configure(n.q, c2);
	quota_settle(n.q, &t, 1000, 1000);
	assert_true(drain(&n, 2000));
	admit_wait(&n, &t, c2, "team", "llm", 10, 10);
	assert_true(t.admitted);
	assert_int_equal(t.hdr_remaining, 10000 - 20);
	quota_release(n.q, &t);
	assert_true(drain(&n, 2000));

	/* back to the memory store */
	static const char mem_yaml[] = "instances: [{ name: llm, provider: openai, limits: [{ "
	                               "limit: 50000, window: 1h }] }]\n"
	                               "consumers: [{ name: team, keys: [k], limits: [{ instance: "
	                               "llm, limit: 10000, window: 1h }] }]\n";
	struct config *c3 = config_load_string(mem_yaml, strlen(mem_yaml), "m.yaml", NULL);
	assert_non_null(c3);
	quota_configure(n.q, c3);
	assert_int_equal(quota_admit(n.q, &t, c3, config_find_consumer(c3, "team"),
	                             config_find_instance(c3, "llm"), 5, 5, NULL, NULL),
	                 QUOTA_DONE);
	assert_true(t.admitted);
	assert_false(t.store_error);
	quota_settle(n.q, &t, 5, 5);
	node_free(&n);
	config_unref(c);
	config_unref(c2);
	config_unref(c3);
	test_cleanup();
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_reply_handling),
	        cmocka_unit_test(test_admit_settle),
	        cmocka_unit_test(test_peek_and_noscript),
	        cmocka_unit_test(test_cancel),
	        cmocka_unit_test(test_two_nodes_one_quota),
	        cmocka_unit_test(test_concurrency_bound),
	        cmocka_unit_test(test_outage_allow_then_back),
	        cmocka_unit_test(test_outage_deny),
	        cmocka_unit_test(test_command_timeout),
	        cmocka_unit_test(test_late_admission_is_undone),
	        cmocka_unit_test(test_settlement_waits_for_redis),
	        cmocka_unit_test(test_orphan_is_reclaimed_after_its_lease),
	        cmocka_unit_test(test_waiting_settlement_expires),
	        cmocka_unit_test(test_password_and_db),
	        cmocka_unit_test(test_reconfigure),
	};
	signal(SIGPIPE, SIG_IGN);
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
