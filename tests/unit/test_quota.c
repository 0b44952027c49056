/* test_quota.c — quotas on the memory store: the seed, the concurrency bound, windows. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "sluice/config.h"
#include "sluice/quota.h"
#include "sluice/usage.h"

/* ---------------------------------------------------------------- helpers */

static _Atomic uint64_t fake_now;

static uint64_t fake_clock(void)
{
	return atomic_load(&fake_now);
}

/* ms since the epoch of a UTC date */
static uint64_t utc(int y, int mo, int d, int h, int mi, int s)
{
	struct tm tm = {0};
	tm.tm_year = y - 1900;
	tm.tm_mon = mo - 1;
	tm.tm_mday = d;
	tm.tm_hour = h;
	tm.tm_min = mi;
	tm.tm_sec = s;
	return (uint64_t)timegm(&tm) * 1000;
}

static struct config *load(const char *yaml)
{
	struct config_errors e;
	struct config *c = config_load_string(yaml, strlen(yaml), "t.yaml", &e);
	if (c == NULL) {
		for (size_t i = 0; i < e.n; i++)
			print_error("%s\n", e.msgs[i]);
		config_errors_free(&e);
		fail_msg("the YAML did not load");
	}
	return c;
}

struct fixture {
	struct config *c;
	struct event_base *base;
	struct quota *q;
};

static struct fixture *fixture_new(const char *yaml)
{
	struct fixture *f = calloc(1, sizeof(*f));
	f->c = load(yaml);
	f->base = event_base_new();
	f->q = quota_new(f->base, f->c);
	assert_non_null(f->q);
	return f;
}

static void fixture_free(struct fixture *f)
{
	quota_free(f->q);
	event_base_free(f->base);
	config_unref(f->c);
	free(f);
	quota_global_free();
	quota_set_clock_for_tests(NULL);
}

static const struct config_consumer *consumer(struct fixture *f, const char *name)
{
	const struct config_consumer *c = config_find_consumer(f->c, name);
	assert_non_null(c);
	return c;
}

static const struct config_instance *instance(struct fixture *f, const char *name)
{
	const struct config_instance *in = config_find_instance(f->c, name);
	assert_non_null(in);
	return in;
}

/* Admit on the memory store: always synchronous. */
static bool admit(struct fixture *f, struct quota_ticket *t, const char *cons, const char *inst,
                  uint64_t prompt, uint64_t completion)
{
	enum quota_status st = quota_admit(f->q, t, f->c, cons ? consumer(f, cons) : NULL,
	                                   instance(f, inst), prompt, completion, NULL, NULL);
	assert_int_equal(st, QUOTA_DONE);
	assert_false(t->store_error);
	return t->admitted;
}

/* used of the idx-th limit of a consumer (or instance) */
static uint64_t used_of(struct fixture *f, const char *cons, const char *inst, size_t idx)
{
	struct quota_limit_state st[QUOTA_MAX_COUNTERS];
	size_t n = quota_peek_memory(cons ? consumer(f, cons) : NULL,
	                             inst ? instance(f, inst) : NULL, st, QUOTA_MAX_COUNTERS);
	assert_true(idx < n);
	return st[idx].used;
}

/* ---------------------------------------------------------------- the seed */

static const char seed_yaml[] =
        "instances:\n"
        "  - name: llm-a\n"
        "    provider: openai\n"
        "    limits: [{ strategy: total_tokens, limit: 50000, window: 1h }]\n"
        "  - name: llm-b\n"
        "    provider: openai\n"
        "consumers:\n"
        "  - name: a\n"
        "    keys: [ka]\n"
        "    limits: [{ instance: llm-a, strategy: total_tokens, limit: 10000, window: 1h }]\n"
        "    rejected_code: 429\n"
        "    rejected_msg: \"Insufficient token, try in one hour\"\n"
        "  - name: b\n"
        "    keys: [kb]\n"
        "    limits: [{ instance: llm-a, limit: 20000, window: 1h }]\n"
        "  - name: c\n"
        "    keys: [kc]\n"
        "    limits: [{ instance: llm-a, limit: 5000, window: 1h }]\n"
        "  - name: d\n"
        "    keys: [kd]\n"
        "    limits: [{ instance: llm-a, limit: 100000, window: 1h }]\n";

/* Spend 500-token requests until refused; returns the tokens charged. */
static uint64_t spend_until_refused(struct fixture *f, const char *cons, const char *inst,
                                    struct quota_ticket *t)
{
	uint64_t charged = 0;
	for (int i = 0; i < 1000; i++) {
		if (!admit(f, t, cons, inst, 100, 400))
			return charged;
		quota_settle(f->q, t, 100, 400);
		charged += 500;
	}
	fail_msg("never refused");
	return 0;
}

static void test_seed_example(void **state)
{
	struct fixture *f = fixture_new(seed_yaml);
	struct quota_ticket t = {0};
	const struct config_limit *inst_limit = &instance(f, "llm-a")->limits[0];

	atomic_store(&fake_now, utc(2025, 3, 1, 10, 0, 0));
	quota_set_clock_for_tests(fake_clock);

	/* Each stops at its own quota, exactly (500 divides every quota). */
	assert_int_equal(spend_until_refused(f, "a", "llm-a", &t), 10000);
	assert_ptr_equal(t.denied_by, &consumer(f, "a")->limits[0]);
	assert_true(t.denied_is_consumer);
	assert_int_equal(t.retry_after_s, 3600);
	assert_true(t.have_headers);
	assert_int_equal(t.hdr_limit, 10000);
	assert_int_equal(t.hdr_remaining, 0);
	assert_int_equal(t.hdr_reset_s, 3600);
	assert_int_equal(spend_until_refused(f, "b", "llm-a", &t), 20000);
	assert_ptr_equal(t.denied_by, &consumer(f, "b")->limits[0]);
	assert_int_equal(spend_until_refused(f, "c", "llm-a", &t), 5000);
	assert_ptr_equal(t.denied_by, &consumer(f, "c")->limits[0]);
	assert_int_equal(used_of(f, NULL, "llm-a", 0), 35000);

	/* b's headers while admitted: the tightest token limit is its own (least remaining) */
	atomic_store(&fake_now, utc(2025, 3, 1, 11, 0, 0)); /* a new hour: all fresh */
	assert_true(admit(f, &t, "b", "llm-a", 100, 400));
	assert_int_equal(t.hdr_limit, 20000);
	assert_int_equal(t.hdr_remaining, 19500);
	quota_release(f->q, &t);
	atomic_store(&fake_now, utc(2025, 3, 1, 10, 30, 0));

	/* d has room of its own: it takes the instance's quota to 50,000 and is refused by it */
	assert_int_equal(spend_until_refused(f, "d", "llm-a", &t), 15000);
	assert_ptr_equal(t.denied_by, inst_limit);
	assert_false(t.denied_is_consumer);
	assert_int_equal(t.retry_after_s, 1800);
	assert_int_equal(used_of(f, NULL, "llm-a", 0), 50000);
	/* the tightest token limit is now the instance's */
	assert_int_equal(t.hdr_limit, 50000);
	assert_int_equal(t.hdr_remaining, 0);

	/* a consumer with quota left is refused by the instance; one without, by its own
	 * (consumer first) */
	struct quota_ticket t2 = {0};
	assert_false(admit(f, &t2, "d", "llm-a", 1, 1));
	assert_ptr_equal(t2.denied_by, inst_limit);
	assert_false(t2.denied_is_consumer);
	assert_false(admit(f, &t2, "a", "llm-a", 1, 1));
	assert_ptr_equal(t2.denied_by, &consumer(f, "a")->limits[0]);
	assert_true(t2.denied_is_consumer);
	/* nothing was reserved by refused admissions */
	assert_int_equal(used_of(f, NULL, "llm-a", 0), 50000);
	assert_int_equal(used_of(f, "a", NULL, 0), 10000);

	/* another instance is unaffected (fallback target) */
	assert_true(admit(f, &t2, "a", "llm-b", 100, 400));
	assert_false(t2.have_headers); /* no token limit applies there */
	quota_settle(f->q, &t2, 10, 10);

	/* auth: none → only the instance's own limit */
	assert_false(admit(f, &t2, NULL, "llm-a", 1, 1));
	assert_ptr_equal(t2.denied_by, inst_limit);
	assert_true(admit(f, &t2, NULL, "llm-b", 1, 1));
	quota_release(f->q, &t2);

	/* an hour boundary resets every counter */
	atomic_store(&fake_now, utc(2025, 3, 1, 12, 0, 0));
	assert_true(admit(f, &t2, "c", "llm-a", 100, 400));
	quota_settle(f->q, &t2, 100, 400);
	fixture_free(f);
}

/* ---------------------------------------------------------------- the concurrency bound */

static const char conc_yaml[] =
        "instances:\n"
        "  - name: llm\n"
        "    provider: openai\n"
        "    limits: [{ limit: 10000, window: 1h }]\n"
        "consumers:\n"
        "  - name: team\n"
        "    keys: [k]\n"
        "    limits: [{ instance: llm, limit: 10000, window: 1h }, { limit: 10000, window: 1d }]\n";

#define N_THREADS      64
#define REQ_PROMPT     60
#define REQ_COMPLETION 90

struct race {
	struct fixture *f;
	pthread_barrier_t go;
	atomic_uint_fast64_t charged;
	atomic_uint_fast64_t admitted;
	atomic_uint_fast64_t in_flight_max;
	atomic_uint_fast64_t in_flight;
	int seed;
};

static void *racer(void *arg)
{
	struct race *r = arg;
	struct event_base *base = event_base_new();
	struct quota *q = quota_new(base, r->f->c); /* one per "worker" */
	const struct config_consumer *cons = config_find_consumer(r->f->c, "team");
	const struct config_instance *in = config_find_instance(r->f->c, "llm");
	unsigned seed = (unsigned)(uintptr_t)&seed;

	pthread_barrier_wait(&r->go);
	for (int i = 0; i < 200; i++) {
		struct quota_ticket t = {0};
		quota_admit(q, &t, r->f->c, cons, in, REQ_PROMPT, REQ_COMPLETION, NULL, NULL);
		if (!t.admitted)
			continue;
		uint64_t fl = atomic_fetch_add(&r->in_flight, 1) + 1;
		uint64_t m = atomic_load(&r->in_flight_max);
		while (fl > m && !atomic_compare_exchange_weak(&r->in_flight_max, &m, fl))
			;
		/* the upstream takes a while: many requests hold reservations at once */
		usleep((useconds_t)(200 + rand_r(&seed) % 800));
		/* real usage: never above the reservation (max_tokens bounds the completion) */
		uint64_t completion = (uint64_t)(rand_r(&seed) % (REQ_COMPLETION + 1));
		if (rand_r(&seed) % 8 == 0) {
			quota_release(q, &t); /* a failed attempt */
		} else {
			quota_settle(q, &t, REQ_PROMPT, completion);
			atomic_fetch_add(&r->charged, REQ_PROMPT + completion);
			atomic_fetch_add(&r->admitted, 1);
		}
		atomic_fetch_sub(&r->in_flight, 1);
	}
	quota_free(q);
	event_base_free(base);
	return NULL;
}

static void test_concurrency_bound(void **state)
{
	struct race r;
	pthread_t th[N_THREADS];

	memset(&r, 0, sizeof(r));
	r.f = fixture_new(conc_yaml);
	pthread_barrier_init(&r.go, NULL, N_THREADS);
	for (int i = 0; i < N_THREADS; i++)
		pthread_create(&th[i], NULL, racer, &r);
	for (int i = 0; i < N_THREADS; i++)
		pthread_join(th[i], NULL);
	pthread_barrier_destroy(&r.go);

	uint64_t charged = atomic_load(&r.charged);
	print_message(
	        "64 threads: %llu admitted and settled, %llu tokens charged, max %llu in flight\n",
	        (unsigned long long)atomic_load(&r.admitted), (unsigned long long)charged,
	        (unsigned long long)atomic_load(&r.in_flight_max));
	assert_true(atomic_load(&r.in_flight_max) >= 16);
	/* the bound: quota + one request's tokens */
	assert_true(charged <= 10000 + REQ_PROMPT + REQ_COMPLETION);
	/* and the quota was actually usable: at least quota − one request */
	assert_true(charged >= 10000 - (REQ_PROMPT + REQ_COMPLETION));
	/* every counter holds exactly what was charged: no reservation leaked */
	assert_int_equal(used_of(r.f, "team", NULL, 0), charged);
	assert_int_equal(used_of(r.f, "team", NULL, 1), charged);
	assert_int_equal(used_of(r.f, NULL, "llm", 0), charged);
	fixture_free(r.f);
}

/* ---------------------------------------------------------------- strategies */

static const char strat_yaml[] = "instances:\n"
                                 "  - name: llm\n"
                                 "    provider: openai\n"
                                 "    limits:\n"
                                 "      - { strategy: prompt_tokens, limit: 1000, window: 1h }\n"
                                 "      - { strategy: completion_tokens, limit: 300, window: 1h }\n"
                                 "consumers:\n"
                                 "  - name: team\n"
                                 "    keys: [k]\n";

static void test_strategies(void **state)
{
	struct fixture *f = fixture_new(strat_yaml);
	struct quota_ticket t = {0};
	const struct config_instance *in = instance(f, "llm");

	atomic_store(&fake_now, utc(2025, 1, 1, 0, 0, 0));
	quota_set_clock_for_tests(fake_clock);

	assert_true(admit(f, &t, "team", "llm", 400, 100));
	assert_int_equal(used_of(f, NULL, "llm", 0), 400); /* prompt counter: the prompt estimate */
	assert_int_equal(used_of(f, NULL, "llm", 1), 100); /* completion counter: the budget */
	quota_settle(f->q, &t, 350, 120);
	assert_int_equal(used_of(f, NULL, "llm", 0), 350);
	assert_int_equal(used_of(f, NULL, "llm", 1), 120);

	/* completion: 120 used → admits up to exhaustion */
	assert_true(admit(f, &t, "team", "llm", 10, 200));
	quota_settle(f->q, &t, 10, 200);
	assert_int_equal(used_of(f, NULL, "llm", 1), 320);
	assert_false(admit(f, &t, "team", "llm", 1, 1));
	assert_ptr_equal(t.denied_by, &in->limits[1]);
	assert_false(t.denied_is_consumer);
	/* headers: the tightest is the completion limit (remaining 0) */
	assert_int_equal(t.hdr_limit, 300);
	assert_int_equal(t.hdr_remaining, 0);
	fixture_free(f);
}

/* ---------------------------------------------------------------- windows */

static const char window_yaml[] = "instances:\n"
                                  "  - name: llm\n"
                                  "    provider: openai\n"
                                  "    limits: [{ limit: 1000, window: 1h }]\n"
                                  "  - name: slide\n"
                                  "    provider: openai\n"
                                  "    limits: [{ limit: 1000, window: 1m, type: sliding }]\n"
                                  "  - name: month\n"
                                  "    provider: openai\n"
                                  "    limits: [{ limit: 1000, window: 1mo }]\n"
                                  "consumers:\n"
                                  "  - name: team\n"
                                  "    keys: [k]\n";

static void test_fixed_window_boundary(void **state)
{
	struct fixture *f = fixture_new(window_yaml);
	struct quota_ticket t = {0};

	quota_set_clock_for_tests(fake_clock);
	atomic_store(&fake_now, utc(2025, 6, 1, 9, 15, 0));
	assert_true(admit(f, &t, "team", "llm", 500, 500));
	quota_settle(f->q, &t, 500, 500);
	assert_false(admit(f, &t, "team", "llm", 1, 1));
	assert_int_equal(t.retry_after_s, 45 * 60);

	/* one ms before the boundary: still refused, retry in 1 s */
	atomic_store(&fake_now, utc(2025, 6, 1, 10, 0, 0) - 1);
	assert_false(admit(f, &t, "team", "llm", 1, 1));
	assert_int_equal(t.retry_after_s, 1);
	/* on the boundary: a new window (calendar-aligned, not relative to first use) */
	atomic_store(&fake_now, utc(2025, 6, 1, 10, 0, 0));
	assert_true(admit(f, &t, "team", "llm", 1, 1));
	assert_int_equal(t.hdr_remaining, 998);
	assert_int_equal(t.hdr_reset_s, 3600);
	quota_settle(f->q, &t, 1, 1);
	fixture_free(f);
}

static void test_sliding_window(void **state)
{
	struct fixture *f = fixture_new(window_yaml);
	struct quota_ticket t = {0};
	uint64_t t0 = utc(2025, 6, 1, 9, 15, 0); /* a minute boundary */

	quota_set_clock_for_tests(fake_clock);
	atomic_store(&fake_now, t0 + 10 * 1000);
	assert_true(admit(f, &t, "team", "slide", 500, 500));
	quota_settle(f->q, &t, 500, 500);
	assert_false(admit(f, &t, "team", "slide", 1, 1));

	/* the next bucket starts: the previous one still weighs fully → refused, and the
	 * retry estimate is where its weight lets 1000 fall below the limit */
	atomic_store(&fake_now, t0 + 60 * 1000);
	assert_false(admit(f, &t, "team", "slide", 1, 1));
	assert_int_equal(t.retry_after_s, 1);
	/* 6 s in: 90% of 1000 → 900 used, 100 remain */
	atomic_store(&fake_now, t0 + 66 * 1000);
	assert_true(admit(f, &t, "team", "slide", 50, 0));
	assert_int_equal(t.hdr_remaining, 50);
	quota_settle(f->q, &t, 50, 0);
	/* 30 s in: 50% of 1000 + 50 → 550 used */
	atomic_store(&fake_now, t0 + 90 * 1000);
	assert_int_equal(used_of(f, NULL, "slide", 0), 550);
	/* smooth: the use decays steadily, with no cliff at the bucket boundary */
	uint64_t last = UINT64_MAX;
	for (uint64_t s = 60; s <= 120; s += 5) {
		atomic_store(&fake_now, t0 + s * 1000);
		uint64_t u = used_of(f, NULL, "slide", 0);
		assert_true(u <= last);
		last = u;
	}
	/* two windows later everything is gone */
	atomic_store(&fake_now, t0 + 180 * 1000);
	assert_int_equal(used_of(f, NULL, "slide", 0), 0);
	fixture_free(f);
}

static void test_sliding_retry_after(void **state)
{
	struct fixture *f = fixture_new(window_yaml);
	struct quota_ticket t = {0};
	uint64_t t0 = utc(2025, 6, 1, 9, 15, 0);

	quota_set_clock_for_tests(fake_clock);
	/* 2000 in one bucket (settled above the reservation) */
	atomic_store(&fake_now, t0);
	assert_true(admit(f, &t, "team", "slide", 10, 10));
	quota_settle(f->q, &t, 1000, 1000);
	assert_false(admit(f, &t, "team", "slide", 1, 1));
	/* in the next bucket it weighs (1 - f) × 2000 < 1000 once f > 1/2: after 60 + 30 s
	 * (strictly after: at exactly 90 s it still weighs 1000), so 91 whole seconds */
	assert_int_equal(t.retry_after_s, 91);
	atomic_store(&fake_now, t0 + 90 * 1000);
	assert_false(admit(f, &t, "team", "slide", 1, 1));
	atomic_store(&fake_now, t0 + 91 * 1000);
	assert_true(admit(f, &t, "team", "slide", 1, 1));
	quota_release(f->q, &t);
	fixture_free(f);
}

static void test_month_windows(void **state)
{
	struct config_window w1 = {0, 1}, w3 = {0, 3}, w12 = {0, 12}, h1 = {3600 * 1000, 0};
	uint64_t s, e, p;

	quota_window_bounds(&w1, utc(2024, 2, 15, 13, 0, 0), &s, &e, &p);
	assert_int_equal(s, utc(2024, 2, 1, 0, 0, 0));
	assert_int_equal(e, utc(2024, 3, 1, 0, 0, 0)); /* a leap February: 29 days */
	assert_int_equal(p, utc(2024, 1, 1, 0, 0, 0));
	quota_window_bounds(&w1, utc(2024, 12, 31, 23, 59, 59), &s, &e, &p);
	assert_int_equal(s, utc(2024, 12, 1, 0, 0, 0));
	assert_int_equal(e, utc(2025, 1, 1, 0, 0, 0));
	quota_window_bounds(&w3, utc(2024, 5, 10, 0, 0, 0), &s, &e, &p);
	assert_int_equal(s, utc(2024, 4, 1, 0, 0, 0));
	assert_int_equal(e, utc(2024, 7, 1, 0, 0, 0));
	assert_int_equal(p, utc(2024, 1, 1, 0, 0, 0));
	quota_window_bounds(&w12, utc(2024, 11, 10, 0, 0, 0), &s, &e, &p);
	assert_int_equal(s, utc(2024, 1, 1, 0, 0, 0));
	assert_int_equal(e, utc(2025, 1, 1, 0, 0, 0));
	quota_window_bounds(&h1, utc(2024, 11, 10, 7, 59, 59), &s, &e, &p);
	assert_int_equal(s, utc(2024, 11, 10, 7, 0, 0));
	assert_int_equal(e, utc(2024, 11, 10, 8, 0, 0));

	/* admission resets on the 1st of the month, not 30 days after first use */
	struct fixture *f = fixture_new(window_yaml);
	struct quota_ticket t = {0};
	quota_set_clock_for_tests(fake_clock);
	atomic_store(&fake_now, utc(2025, 1, 31, 23, 0, 0));
	assert_true(admit(f, &t, "team", "month", 500, 500));
	quota_settle(f->q, &t, 500, 500);
	assert_false(admit(f, &t, "team", "month", 1, 1));
	assert_int_equal(t.retry_after_s, 3600);
	atomic_store(&fake_now, utc(2025, 2, 1, 0, 0, 0));
	assert_true(admit(f, &t, "team", "month", 1, 1));
	assert_int_equal(t.hdr_reset_s, 28 * 24 * 3600);
	quota_release(f->q, &t);
	fixture_free(f);
}

/* ---------------------------------------------------------------- settlement */

static void test_release_and_settle(void **state)
{
	struct fixture *f = fixture_new(conc_yaml);
	struct quota_ticket t = {0}, u = {0};

	quota_set_clock_for_tests(fake_clock);
	atomic_store(&fake_now, utc(2025, 1, 1, 0, 30, 0));

	/* release gives the reservation back, on every counter */
	assert_true(admit(f, &t, "team", "llm", 100, 200));
	assert_int_equal(used_of(f, NULL, "llm", 0), 300);
	assert_int_equal(used_of(f, "team", NULL, 0), 300);
	assert_int_equal(used_of(f, "team", NULL, 1), 300);
	quota_release(f->q, &t);
	assert_int_equal(used_of(f, NULL, "llm", 0), 0);
	assert_int_equal(used_of(f, "team", NULL, 1), 0);
	quota_release(f->q, &t);      /* idempotent */
	quota_settle(f->q, &t, 5, 5); /* nothing held: no-op */
	assert_int_equal(used_of(f, NULL, "llm", 0), 0);

	/* actual below the reservation */
	assert_true(admit(f, &t, "team", "llm", 100, 200));
	quota_settle(f->q, &t, 90, 10);
	assert_int_equal(used_of(f, NULL, "llm", 0), 100);
	/* actual above it (an estimate too low): charged in full */
	assert_true(admit(f, &t, "team", "llm", 100, 200));
	quota_settle(f->q, &t, 150, 450);
	assert_int_equal(used_of(f, NULL, "llm", 0), 700);
	assert_int_equal(used_of(f, "team", NULL, 0), 700);

	/* two tickets in flight see each other's reservation */
	assert_true(admit(f, &t, "team", "llm", 4000, 4000));
	assert_true(admit(f, &u, "team", "llm", 4000, 4000)); /* 8700 < 10000 */
	struct quota_ticket v = {0};
	assert_false(admit(f, &v, "team", "llm", 1, 1)); /* 16700 ≥ 10000 */
	quota_release(f->q, &u);
	assert_true(admit(f, &v, "team", "llm", 1, 1));
	quota_settle(f->q, &v, 1, 1);
	quota_settle(f->q, &t, 10, 10);
	assert_int_equal(used_of(f, NULL, "llm", 0), 722);

	/* a ticket reused for the next attempt releases what it held */
	assert_true(admit(f, &t, "team", "llm", 1000, 0));
	assert_true(admit(f, &t, "team", "llm", 5, 0));
	assert_int_equal(used_of(f, NULL, "llm", 0), 727);
	quota_cancel(f->q, &t);
	assert_int_equal(used_of(f, NULL, "llm", 0), 722);

	/* a settlement after the window ended leaves the new window alone */
	assert_true(admit(f, &t, "team", "llm", 100, 100));
	atomic_store(&fake_now, utc(2025, 1, 1, 1, 0, 0));
	quota_settle(f->q, &t, 0, 0);
	assert_int_equal(used_of(f, NULL, "llm", 0), 0);
	atomic_store(&fake_now, utc(2025, 1, 1, 0, 59, 0));
	assert_int_equal(used_of(f, NULL, "llm", 0), 722);
	fixture_free(f);
}

/* ---------------------------------------------------------------- reservation size */

static const char size_yaml[] =
        "instances:\n"
        "  - name: llm\n"
        "    provider: openai\n"
        "    limits: [{ limit: 100000, window: 1h }]\n"
        "  - name: small\n"
        "    provider: openai\n"
        "    max_reservation: 1000\n"
        "    limits: [{ limit: 100000, window: 1h }]\n"
        "consumers:\n"
        "  - name: big\n"
        "    keys: [k]\n"
        "    limits: [{ limit: 10, window: 1h }]\n"
        "  - name: other\n"
        "    keys: [k2]\n";

/* The client's max_tokens × n cannot reserve more than max_reservation, nor wrap. */
static void test_reservation_size(void **state)
{
	struct fixture *f = fixture_new(size_yaml);
	struct quota_ticket big = {0}, other = {0};
	json_t *body;
	uint64_t budget;

	quota_set_clock_for_tests(fake_clock);
	atomic_store(&fake_now, utc(2025, 1, 1, 0, 30, 0));
	assert_int_equal(instance(f, "llm")->max_reservation, 32768); /* the default */
	assert_int_equal(instance(f, "small")->max_reservation, 1000);

	/* 9e18 × 1000 choices (n above 128 is not OpenAI's: ignored), and a product that would
	 * wrap to a small number: both saturate */
	body = json_pack("{s:I, s:i}", "max_tokens", (json_int_t)9000000000000000000ll, "n", 1000);
	assert_int_equal(usage_completion_budget(body, 512), 9000000000000000000ull);
	json_decref(body);
	body = json_pack("{s:I, s:i}", "max_tokens", (json_int_t)(1ll << 62), "n", 8);
	budget = usage_completion_budget(body, 512);
	assert_true(budget == UINT64_MAX);
	json_decref(body);

	/* reserved: the prompt estimate and max_reservation, on every counter */
	assert_true(admit(f, &big, "big", "llm", 17, budget));
	assert_int_equal(used_of(f, NULL, "llm", 0), 17 + 32768);
	assert_int_equal(used_of(f, "big", NULL, 0), 17 + 32768);
	/* another consumer still gets in, and sees the clamped reservation */
	assert_true(admit(f, &other, "other", "llm", 10, 10));
	assert_int_equal(other.hdr_remaining, 100000 - (17 + 32768) - 20);
	quota_settle(f->q, &other, 10, 10);
	/* the answer, larger than the reservation, is charged in full */
	quota_settle(f->q, &big, 17, 50000);
	assert_int_equal(used_of(f, NULL, "llm", 0), 50017 + 20);
	/* usage figures from the upstream saturate too */
	assert_true(admit(f, &big, "other", "small", UINT64_MAX, UINT64_MAX));
	assert_int_equal(used_of(f, NULL, "small", 0), 9007199254740991ull); /* one charge at most */
	quota_release(f->q, &big);
	assert_true(admit(f, &big, "other", "small", 1, UINT64_MAX));
	assert_int_equal(used_of(f, NULL, "small", 0), 1001);
	quota_settle(f->q, &big, UINT64_MAX, UINT64_MAX);
	assert_int_equal(used_of(f, NULL, "small", 0), 9007199254740991ull);
	fixture_free(f);
}

/* ---------------------------------------------------------------- tenant isolation */

static const char rate_yaml[] =
        "instances:\n"
        "  - name: llm\n"
        "    provider: openai\n"
        "consumers:\n"
        "  - name: team\n"
        "    keys: [k]\n"
        "    limits: [{ requests: 3, window: 1m }, { limit: 100000, window: 1d }]\n"
        "    max_concurrent: 2\n"
        "  - name: free\n"
        "    keys: [k2]\n";

static void test_request_rate(void **state)
{
	struct fixture *f = fixture_new(rate_yaml);
	struct quota_ticket t[4];
	const struct config_consumer *cons = consumer(f, "team");

	memset(t, 0, sizeof(t));
	quota_set_clock_for_tests(fake_clock);
	atomic_store(&fake_now, utc(2025, 1, 1, 0, 0, 30));
	for (int i = 0; i < 3; i++) {
		assert_true(admit(f, &t[i], "team", "llm", 1000, 1000));
		/* only the token limit makes headers */
		assert_int_equal(t[i].hdr_limit, 100000);
	}
	assert_false(admit(f, &t[3], "team", "llm", 1, 1));
	assert_ptr_equal(t[3].denied_by, &cons->limits[0]);
	assert_true(t[3].denied_is_consumer);
	assert_int_equal(t[3].retry_after_s, 30);
	/* a settled request still counts one; a released attempt gives its count back */
	quota_settle(f->q, &t[0], 10, 10);
	assert_false(admit(f, &t[3], "team", "llm", 1, 1));
	quota_release(f->q, &t[1]);
	assert_true(admit(f, &t[3], "team", "llm", 1, 1));
	assert_int_equal(used_of(f, "team", NULL, 0), 3);
	/* a consumer without limits is free */
	assert_true(admit(f, &t[1], "free", "llm", 1, 1));
	fixture_free(f);
}

/* count_tokens: request rates alone admit it; spent token and cost budgets, the consumer's
 * and the instance's own, neither refuse it nor are charged. */
static const char requests_only_yaml[] =
        "instances:\n"
        "  - name: claude\n"
        "    provider: anthropic\n"
        "    price: { input: 3, output: 15 }\n"
        "    limits:\n"
        "      - { limit: 100, window: 1h }\n"
        "      - { strategy: cost, limit: 0.0001, window: 1h }\n"
        "      - { requests: 10, window: 1m }\n"
        "consumers:\n"
        "  - name: team\n"
        "    keys: [k]\n"
        "    limits:\n"
        "      - { limit: 50, window: 1h }\n"
        "      - { instance: claude, strategy: prompt_tokens, limit: 40, window: 1h }\n"
        "      - { strategy: cost, limit: 0.001, window: 1h }\n"
        "      - { requests: 3, window: 1m }\n";

static bool admit_requests(struct fixture *f, struct quota_ticket *t, const char *cons,
                           const char *inst)
{
	enum quota_status st = quota_admit_requests(f->q, t, f->c, cons ? consumer(f, cons) : NULL,
	                                            instance(f, inst), NULL, NULL);
	assert_int_equal(st, QUOTA_DONE);
	assert_false(t->store_error);
	return t->admitted;
}

static void test_admit_requests(void **state)
{
	struct fixture *f = fixture_new(requests_only_yaml);
	const struct config_consumer *team = consumer(f, "team");
	struct quota_ticket t = {0};

	quota_set_clock_for_tests(fake_clock);
	atomic_store(&fake_now, utc(2025, 1, 1, 0, 0, 30));
	/* one completion spends every token and cost budget (1800 micro-units) */
	assert_true(admit(f, &t, "team", "claude", 100, 100));
	quota_settle(f->q, &t, 100, 100);
	assert_false(admit(f, &t, "team", "claude", 1, 1));
	assert_ptr_equal(t.denied_by, &team->limits[1]);
	assert_false(admit(f, &t, NULL, "claude", 1, 1)); /* the instance's own, too */
	/* a count is admitted on the request rates alone: the consumer's and the instance's */
	for (int i = 0; i < 2; i++) {
		assert_true(admit_requests(f, &t, "team", "claude"));
		assert_int_equal(t.n_res, 2);
		assert_false(t.have_headers); /* no token limit took part */
		quota_settle(f->q, &t, 0, 0);
	}
	/* it counted as a request and charged nothing else */
	assert_int_equal(used_of(f, "team", NULL, 0), 200);
	assert_int_equal(used_of(f, "team", NULL, 1), 100);
	assert_int_equal(used_of(f, "team", NULL, 2), 1800);
	assert_int_equal(used_of(f, "team", NULL, 3), 3);
	assert_int_equal(used_of(f, NULL, "claude", 0), 200);
	assert_int_equal(used_of(f, NULL, "claude", 1), 1800);
	assert_int_equal(used_of(f, NULL, "claude", 2), 3);
	/* the request rate still refuses it, and says when to retry */
	assert_false(admit_requests(f, &t, "team", "claude"));
	assert_ptr_equal(t.denied_by, &team->limits[3]);
	assert_int_equal(t.retry_after_s, 30);
	/* without a consumer (auth: none) only the instance's request rate applies */
	assert_true(admit_requests(f, &t, NULL, "claude"));
	assert_int_equal(t.n_res, 1);
	quota_release(f->q, &t);
	assert_int_equal(used_of(f, NULL, "claude", 2), 3);
	fixture_free(f);
}

static void test_max_concurrent(void **state)
{
	struct fixture *f = fixture_new(rate_yaml);
	const struct config_consumer *team = consumer(f, "team"), *free_ = consumer(f, "free");

	assert_true(quota_concurrency_acquire(team));
	assert_true(quota_concurrency_acquire(team));
	assert_false(quota_concurrency_acquire(team));
	assert_int_equal(quota_concurrency_current("team"), 2);
	quota_concurrency_release(team);
	assert_true(quota_concurrency_acquire(team));
	assert_false(quota_concurrency_acquire(team));

	/* a reload keeps the in-flight count (keyed by name) */
	struct config *c2 = load(rate_yaml);
	const struct config_consumer *team2 = config_find_consumer(c2, "team");
	assert_false(quota_concurrency_acquire(team2));
	quota_concurrency_release(team);
	assert_true(quota_concurrency_acquire(team2));
	quota_concurrency_release(team2);
	quota_concurrency_release(team);
	assert_int_equal(quota_concurrency_current("team"), 0);
	config_unref(c2);

	/* no cap: always admitted, nothing counted */
	for (int i = 0; i < 100; i++)
		assert_true(quota_concurrency_acquire(free_));
	assert_int_equal(quota_concurrency_current("free"), 0);
	assert_true(quota_concurrency_acquire(NULL));
	fixture_free(f);
}

struct conc_race {
	const struct config_consumer *cons;
	atomic_int inside, max_inside;
	pthread_barrier_t go;
};

static void *conc_racer(void *arg)
{
	struct conc_race *r = arg;
	pthread_barrier_wait(&r->go);
	for (int i = 0; i < 2000; i++) {
		if (!quota_concurrency_acquire(r->cons))
			continue;
		int n = atomic_fetch_add(&r->inside, 1) + 1, m = atomic_load(&r->max_inside);
		while (n > m && !atomic_compare_exchange_weak(&r->max_inside, &m, n))
			;
		atomic_fetch_sub(&r->inside, 1);
		quota_concurrency_release(r->cons);
	}
	return NULL;
}

static void test_max_concurrent_threads(void **state)
{
	struct fixture *f = fixture_new(rate_yaml);
	struct conc_race r;
	pthread_t th[16];

	memset(&r, 0, sizeof(r));
	r.cons = consumer(f, "team");
	pthread_barrier_init(&r.go, NULL, 16);
	for (int i = 0; i < 16; i++)
		pthread_create(&th[i], NULL, conc_racer, &r);
	for (int i = 0; i < 16; i++)
		pthread_join(th[i], NULL);
	pthread_barrier_destroy(&r.go);
	assert_true(atomic_load(&r.max_inside) <= 2);
	assert_int_equal(quota_concurrency_current("team"), 0);
	fixture_free(f);
}

/* ---------------------------------------------------------------- reload */

static void test_counters_survive_reload(void **state)
{
	struct fixture *f = fixture_new(seed_yaml);
	struct quota_ticket t = {0};

	quota_set_clock_for_tests(fake_clock);
	atomic_store(&fake_now, utc(2025, 1, 1, 0, 10, 0));
	assert_true(admit(f, &t, "a", "llm-a", 3000, 3000));
	quota_settle(f->q, &t, 3000, 3000);

	/* a's quota lowered from 10,000 to 7,000: the 6,000 used are kept */
	static const char lowered[] =
	        "instances:\n"
	        "  - name: llm-a\n"
	        "    provider: openai\n"
	        "    limits: [{ strategy: total_tokens, limit: 50000, window: 1h }]\n"
	        "consumers:\n"
	        "  - name: a\n"
	        "    keys: [ka]\n"
	        "    limits: [{ instance: llm-a, strategy: total_tokens, limit: 7000, window: 1h "
	        "}]\n";
	struct config *c2 = load(lowered);
	quota_configure(f->q, c2);
	const struct config_consumer *a2 = config_find_consumer(c2, "a");
	const struct config_instance *in2 = config_find_instance(c2, "llm-a");
	assert_int_equal(quota_admit(f->q, &t, c2, a2, in2, 500, 500, NULL, NULL), QUOTA_DONE);
	assert_true(t.admitted);
	assert_int_equal(t.hdr_remaining, 0); /* 6000 + 1000 = 7000 */
	quota_settle(f->q, &t, 500, 500);
	assert_int_equal(quota_admit(f->q, &t, c2, a2, in2, 1, 1, NULL, NULL), QUOTA_DONE);
	assert_false(t.admitted);
	assert_ptr_equal(t.denied_by, &a2->limits[0]);
	config_unref(c2);
	fixture_free(f);
}

/* ---------------------------------------------------------------- admin view */

static void peek_cb(void *arg, struct quota_limit_state *st, size_t n, bool store_error)
{
	size_t *out = arg;
	assert_false(store_error);
	assert_int_equal(n, 1);
	assert_int_equal(st[0].used, 1500);
	assert_int_equal(st[0].remaining, 3500);
	*out = n;
}

static void test_peek(void **state)
{
	struct fixture *f = fixture_new(seed_yaml);
	struct quota_ticket t = {0};
	size_t got = 0;

	quota_set_clock_for_tests(fake_clock);
	atomic_store(&fake_now, utc(2025, 1, 1, 0, 10, 0));
	assert_true(admit(f, &t, "c", "llm-a", 500, 1000));
	/* reservations in flight count as used */
	assert_null(quota_peek(f->q, consumer(f, "c"), NULL, peek_cb, &got));
	assert_int_equal(got, 1);

	struct quota_limit_state st[4];
	size_t n = quota_peek_memory(NULL, instance(f, "llm-a"), st, 4);
	assert_int_equal(n, 1);
	assert_int_equal(st[0].used, 1500);
	assert_int_equal(st[0].remaining, 48500);
	assert_int_equal(st[0].reset_s, 50 * 60);
	quota_settle(f->q, &t, 1, 1);
	fixture_free(f);
}

/* ---------------------------------------------------------------- cost */

/* Prices per million tokens; the budgets are in the same units, counted in micro-units. */
static const char cost_yaml[] = "instances:\n"
                                "  - name: cloud\n"
                                "    provider: openai\n"
                                "    price: { input: 0.40, cached_input: 0.10, output: 1.20 }\n"
                                "  - name: claude\n"
                                "    provider: anthropic\n"
                                "    price: { input: 3, cached_input: 0.30, output: 15 }\n"
                                "    limits: [{ strategy: cost, limit: 0.05, window: 1d }]\n"
                                "  - name: onprem\n"
                                "    provider: openai-compatible\n"
                                "    endpoint: http://127.0.0.1:1/v1/chat/completions\n"
                                "consumers:\n"
                                "  - name: team\n"
                                "    keys: [k]\n"
                                "    limits: [{ strategy: cost, limit: 0.01, window: 1h }]\n"
                                "  - name: mixed\n"
                                "    keys: [k2]\n"
                                "    limits:\n"
                                "      - { strategy: cost, limit: 0.001, window: 1mo }\n"
                                "      - { instance: cloud, limit: 100000, window: 1h }\n";

static struct record_usage usage3(uint64_t prompt, uint64_t cached, uint64_t completion)
{
	struct record_usage u = {.present = true,
	                         .prompt = prompt,
	                         .cached = cached,
	                         .completion = completion,
	                         .total = prompt + completion};
	return u;
}

static void test_cost_price_arithmetic(void **state)
{
	struct fixture *f = fixture_new(cost_yaml);
	const struct config_instance *cloud = instance(f, "cloud"), *claude = instance(f, "claude");
	struct record_usage u;

	/* (prompt - cached) x input + cached x cached_input + completion x output, per 10^6 */
	u = usage3(1000, 600, 200);
	assert_int_equal(quota_cost_micros(cloud, &u), 160 + 60 + 240);
	assert_int_equal(quota_cost_micros(claude, &u), 1200 + 180 + 3000);
	/* rounded up once, to the micro-unit: never under-charged */
	u = usage3(1, 0, 0);
	assert_int_equal(quota_cost_micros(cloud, &u), 1); /* 0.4 micro-units */
	u = usage3(3, 0, 0);
	assert_int_equal(quota_cost_micros(cloud, &u), 2); /* 1.2 */
	u = usage3(5, 0, 0);
	assert_int_equal(quota_cost_micros(cloud, &u), 2); /* exactly 2 */
	u = usage3(0, 0, 0);
	assert_int_equal(quota_cost_micros(cloud, &u), 0);
	u = usage3(1, 1, 1); /* 0.1 + 1.2 = 1.3 → 2, not 1 + 1 + ... per part */
	assert_int_equal(quota_cost_micros(cloud, &u), 2);
	/* a cached count above the prompt (a confused upstream) is not a discount below zero */
	u = usage3(10, 50, 0);
	assert_int_equal(quota_cost_micros(cloud, &u), 1); /* 10 x 0.1 */
	/* no price, no usage: nothing */
	assert_int_equal(quota_cost_micros(instance(f, "onprem"), &u), 0);
	assert_int_equal(quota_cost_micros(NULL, &u), 0);
	u.present = false;
	assert_int_equal(quota_cost_micros(cloud, &u), 0);
	/* an upstream's absurd counts saturate at the largest charge, never wrap */
	u = usage3(UINT64_MAX, 0, UINT64_MAX);
	assert_int_equal(quota_cost_micros(claude, &u), 9007199254740991ull);
	fixture_free(f);
}

static void test_cost_reserve_settle_reject(void **state)
{
	struct fixture *f = fixture_new(cost_yaml);
	struct quota_ticket t = {0};
	const struct config_limit *budget = &consumer(f, "team")->limits[0];
	struct record_usage u;

	quota_set_clock_for_tests(fake_clock);
	atomic_store(&fake_now, utc(2025, 3, 1, 10, 15, 0));

	/* reserved from the estimate at the instance's input and output prices */
	assert_true(admit(f, &t, "team", "cloud", 1000, 500));
	assert_int_equal(used_of(f, "team", NULL, 0), 400 + 600);
	assert_false(t.have_headers); /* x-ratelimit-*-tokens speak of token limits only */
	/* settled with the real usage, cached tokens at the cached price */
	u = usage3(1000, 600, 200);
	quota_settle_usage(f->q, &t, &u);
	assert_int_equal(used_of(f, "team", NULL, 0), 460);
	/* the old entry point prices every prompt token at input */
	assert_true(admit(f, &t, "team", "cloud", 1000, 500));
	quota_settle(f->q, &t, 1000, 200);
	assert_int_equal(used_of(f, "team", NULL, 0), 460 + 640);

	/* one budget across instances: each attempt priced by its own instance */
	assert_true(admit(f, &t, "team", "claude", 1000, 500));
	assert_int_equal(used_of(f, "team", NULL, 0), 1100 + 3000 + 7500);
	assert_int_equal(used_of(f, NULL, "claude", 0), 10500); /* the instance's own cost limit */
	u = usage3(1000, 0, 100);
	quota_settle_usage(f->q, &t, &u);
	assert_int_equal(used_of(f, "team", NULL, 0), 1100 + 4500);
	assert_int_equal(used_of(f, NULL, "claude", 0), 4500);

	/* spent: 5600 of 10000 micro-units; a request admits while below, then refused */
	assert_true(admit(f, &t, "team", "claude", 1000, 500));
	u = usage3(1000, 0, 300); /* 3000 + 4500 */
	quota_settle_usage(f->q, &t, &u);
	assert_int_equal(used_of(f, "team", NULL, 0), 13100);
	assert_false(admit(f, &t, "team", "cloud", 1, 1));
	assert_ptr_equal(t.denied_by, budget);
	assert_true(t.denied_is_consumer);
	assert_int_equal(t.retry_after_s, 45 * 60); /* the hour's end */
	assert_false(t.have_headers);
	assert_int_equal(used_of(f, "team", NULL, 0), 13100); /* a refusal reserves nothing */

	/* an instance without a price is not counted by cost limits: still served */
	assert_true(admit(f, &t, "team", "onprem", 1000, 500));
	assert_int_equal(t.n_res, 0);
	quota_settle(f->q, &t, 1000, 500);
	assert_int_equal(used_of(f, "team", NULL, 0), 13100);

	/* the next window starts afresh */
	atomic_store(&fake_now, utc(2025, 3, 1, 11, 0, 0));
	assert_true(admit(f, &t, "team", "cloud", 1, 1));
	quota_release(f->q, &t);
	assert_int_equal(used_of(f, "team", NULL, 0), 0);
	fixture_free(f);
}

static void test_cost_with_token_limits(void **state)
{
	struct fixture *f = fixture_new(cost_yaml);
	struct quota_ticket t = {0};
	const struct config_consumer *mixed = consumer(f, "mixed");
	struct record_usage u;

	quota_set_clock_for_tests(fake_clock);
	atomic_store(&fake_now, utc(2025, 1, 31, 23, 0, 0));
	/* the token limit gives the headers even when the cost budget is tighter */
	assert_true(admit(f, &t, "mixed", "cloud", 1000, 500));
	assert_true(t.have_headers);
	assert_int_equal(t.hdr_limit, 100000);
	assert_int_equal(t.hdr_remaining, 100000 - 1500);
	/* an attempt that fails over after the upstream worked: tokens and cost charged */
	quota_settle_tokens(f->q, &t, 1000, 250);
	assert_int_equal(used_of(f, "mixed", NULL, 0), 400 + 300);
	assert_int_equal(used_of(f, "mixed", NULL, 1), 1250);
	/* the budget (1000 micro-units a month) refuses; the token limit did not */
	assert_true(admit(f, &t, "mixed", "cloud", 100, 100));
	u = usage3(1000, 0, 0);
	quota_settle_usage(f->q, &t, &u);
	assert_false(admit(f, &t, "mixed", "cloud", 1, 1));
	assert_ptr_equal(t.denied_by, &mixed->limits[0]);
	assert_int_equal(t.retry_after_s, 3600); /* the month ends at midnight */
	assert_true(t.have_headers);             /* the token limit's, on a cost refusal */
	assert_int_equal(t.hdr_remaining, 100000 - 2250);
	/* the month turns */
	atomic_store(&fake_now, utc(2025, 2, 1, 0, 0, 0));
	assert_true(admit(f, &t, "mixed", "cloud", 1, 1));
	quota_release(f->q, &t);

	/* the admin view: used / remaining / reset of a cost limit, in micro-units */
	struct quota_limit_state st[4];
	assert_int_equal(quota_peek_memory(mixed, NULL, st, 4), 2);
	assert_ptr_equal(st[0].limit, &mixed->limits[0]);
	assert_int_equal(st[0].used, 0);
	assert_int_equal(st[0].remaining, 1000);
	assert_int_equal(st[0].reset_s, 28 * 24 * 3600);
	fixture_free(f);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_seed_example),
	        cmocka_unit_test(test_concurrency_bound),
	        cmocka_unit_test(test_strategies),
	        cmocka_unit_test(test_fixed_window_boundary),
	        cmocka_unit_test(test_sliding_window),
	        cmocka_unit_test(test_sliding_retry_after),
	        cmocka_unit_test(test_month_windows),
	        cmocka_unit_test(test_release_and_settle),
	        cmocka_unit_test(test_reservation_size),
	        cmocka_unit_test(test_request_rate),
	        cmocka_unit_test(test_admit_requests),
	        cmocka_unit_test(test_max_concurrent),
	        cmocka_unit_test(test_max_concurrent_threads),
	        cmocka_unit_test(test_counters_survive_reload),
	        cmocka_unit_test(test_peek),
	        cmocka_unit_test(test_cost_price_arithmetic),
	        cmocka_unit_test(test_cost_reserve_settle_reject),
	        cmocka_unit_test(test_cost_with_token_limits),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
