/* test_balancer.c — priority groups, smooth WRR, chash, least requests, peak-EWMA, load. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/balancer.h"

/*
 * Routes are built by hand rather than with config_load so that these tests
 * exercise the balancer alone. Only the fields the balancer reads are set:
 * the algorithm, and each target's instance (its name), priority and weight.
 */

#define N(a)     (sizeof(a) / sizeof((a)[0]))
#define MAX_T    512
#define NAME_LEN 32

/* A route under construction, with storage for its targets and instances. */
struct fixture {
	struct config_route route;
	struct config_target targets[MAX_T];
	struct config_instance instances[MAX_T];
	char names[MAX_T][NAME_LEN];
	bool excluded[MAX_T];
	int inflight[MAX_T];
	uint64_t latency[MAX_T]; /* ewma: 0 = no sample */
	struct balancer_load load[MAX_T];
	bool load_known[MAX_T];
	uint64_t rng;
};

static struct fixture *fixture_new(enum balancer_algorithm algo)
{
	struct fixture *f = calloc(1, sizeof(*f));

	assert_non_null(f);
	f->route.name = "test";
	f->route.balancer.algorithm = algo;
	f->route.targets = f->targets;
	f->rng = 0x243f6a8885a308d3ull;
	return f;
}

/* Append a target; returns its index. */
static int fixture_add(struct fixture *f, const char *name, int priority, unsigned weight)
{
	size_t i = f->route.n_targets++;

	assert_true(i < MAX_T);
	snprintf(f->names[i], NAME_LEN, "%s", name);
	f->instances[i].name = f->names[i];
	f->instances[i].index = i;
	f->targets[i].instance = &f->instances[i];
	f->targets[i].priority = priority;
	f->targets[i].weight = weight;
	return (int)i;
}

static uint64_t test_rand(void *arg)
{
	struct fixture *f = arg;

	/* xorshift64*: any decent generator will do */
	f->rng ^= f->rng >> 12;
	f->rng ^= f->rng << 25;
	f->rng ^= f->rng >> 27;
	return f->rng * 0x2545f4914f6cdd1dull;
}

static int test_inflight(void *arg, const struct config_instance *in)
{
	struct fixture *f = arg;

	return f->inflight[in->index];
}

static uint64_t test_latency(void *arg, const struct config_instance *in)
{
	struct fixture *f = arg;

	return f->latency[in->index];
}

static bool test_load(void *arg, const struct config_instance *in, struct balancer_load *out)
{
	struct fixture *f = arg;

	if (!f->load_known[in->index])
		return false;
	*out = f->load[in->index];
	return true;
}

/* Every source is passed; each algorithm reads only its own. */
static struct balancer_input fixture_input(struct fixture *f)
{
	struct balancer_input in = {
	        .rand = test_rand,
	        .rand_arg = f,
	        .inflight = test_inflight,
	        .inflight_arg = f,
	        .latency_us = test_latency,
	        .latency_arg = f,
	        .load = test_load,
	        .load_arg = f,
	        .excluded = f->excluded,
	};
	return in;
}

static void set_load(struct fixture *f, int t, double waiting, double kv_cache)
{
	f->load[t] = (struct balancer_load){.waiting = waiting, .running = 4, .kv_cache = kv_cache};
	f->load_known[t] = true;
}

static int pick_key(struct balancer *b, struct fixture *f, const char *key)
{
	struct balancer_input in = fixture_input(f);

	in.hash_key = key;
	in.hash_key_len = key ? strlen(key) : 0;
	return balancer_pick(b, &in);
}

static int pick(struct balancer *b, struct fixture *f)
{
	return pick_key(b, f, NULL);
}

/* ---------------------------------------------------------------------------
 * Round-robin
 * ------------------------------------------------------------------------- */

static void test_rr_4_1_exact(void **state)
{
	struct fixture *f = fixture_new(BALANCER_ROUNDROBIN);
	int a = fixture_add(f, "a", 0, 4), b = fixture_add(f, "b", 0, 1);
	struct balancer *bal = balancer_new(&f->route);
	int seq[1000], count[2] = {0};

	assert_non_null(bal);
	for (int i = 0; i < 1000; i++) {
		seq[i] = pick(bal, f);
		assert_true(seq[i] == a || seq[i] == b);
		count[seq[i]]++;
		if (i == 9) {
			assert_int_equal(count[a], 8);
			assert_int_equal(count[b], 2);
		}
	}
	assert_int_equal(count[a], 800);
	assert_int_equal(count[b], 200);
	/* Every window of 10 consecutive picks, not just the first. */
	for (int s = 0; s + 10 <= 1000; s++) {
		int nb = 0;

		for (int i = s; i < s + 10; i++)
			nb += seq[i] == b;
		assert_int_equal(nb, 2);
	}
	/* Smooth: b never comes twice in a row, a never three times... */
	for (int i = 1; i < 1000; i++)
		assert_false(seq[i] == b && seq[i - 1] == b);
	balancer_free(bal);
	free(f);
}

static void test_rr_same_for_4_1_with_big_weights(void **state)
{
	/* 400:100 is the same ratio: still exactly 8/2 of 10. */
	struct fixture *f = fixture_new(BALANCER_ROUNDROBIN);
	int a = fixture_add(f, "a", 0, 400);
	fixture_add(f, "b", 0, 100);
	struct balancer *bal = balancer_new(&f->route);
	int na = 0;

	for (int i = 0; i < 10; i++)
		na += pick(bal, f) == a;
	assert_int_equal(na, 8);
	balancer_free(bal);
	free(f);
}

static void test_rr_5_1_1_smooth(void **state)
{
	struct fixture *f = fixture_new(BALANCER_ROUNDROBIN);
	int a = fixture_add(f, "a", 0, 5), b = fixture_add(f, "b", 0, 1),
	    c = fixture_add(f, "c", 0, 1);
	struct balancer *bal = balancer_new(&f->route);
	const int want[] = {a, a, b, a, c, a, a};

	for (int round = 0; round < 3; round++)
		for (size_t i = 0; i < N(want); i++)
			assert_int_equal(pick(bal, f), want[i]);
	balancer_free(bal);
	free(f);
}

static void test_rr_weight_zero_never_picked(void **state)
{
	struct fixture *f = fixture_new(BALANCER_ROUNDROBIN);
	fixture_add(f, "a", 0, 100);
	int z = fixture_add(f, "drained", 0, 0);
	fixture_add(f, "c", 0, 50);
	struct balancer *bal = balancer_new(&f->route);

	for (int i = 0; i < 1000; i++) {
		int t = pick(bal, f);

		assert_true(t >= 0);
		assert_int_not_equal(t, z);
	}
	balancer_free(bal);

	/* Only drained targets: nothing to pick. */
	struct fixture *g = fixture_new(BALANCER_ROUNDROBIN);
	fixture_add(g, "x", 0, 0);
	fixture_add(g, "y", 0, 0);
	bal = balancer_new(&g->route);
	assert_int_equal(pick(bal, g), -1);
	balancer_free(bal);
	free(g);
	free(f);
}

static void test_rr_exclusion_redistributes(void **state)
{
	struct fixture *f = fixture_new(BALANCER_ROUNDROBIN);
	int a = fixture_add(f, "a", 0, 1), b = fixture_add(f, "b", 0, 1),
	    c = fixture_add(f, "c", 0, 1);
	struct balancer *bal = balancer_new(&f->route);
	int count[3] = {0};

	f->excluded[b] = true;
	for (int i = 0; i < 100; i++)
		count[pick(bal, f)]++;
	assert_int_equal(count[a], 50);
	assert_int_equal(count[b], 0);
	assert_int_equal(count[c], 50);

	/* Back in: an equal share again, and b did not bank weight while out. */
	f->excluded[b] = false;
	memset(count, 0, sizeof(count));
	for (int i = 0; i < 300; i++)
		count[pick(bal, f)]++;
	assert_int_equal(count[a], 100);
	assert_int_equal(count[b], 100);
	assert_int_equal(count[c], 100);

	/* 4:1 among the remaining candidates when a third is excluded. */
	struct fixture *g = fixture_new(BALANCER_ROUNDROBIN);
	int x = fixture_add(g, "x", 0, 4), y = fixture_add(g, "y", 0, 1),
	    z = fixture_add(g, "z", 0, 5);
	struct balancer *gb = balancer_new(&g->route);
	int cg[3] = {0};

	g->excluded[z] = true;
	for (int i = 0; i < 10; i++)
		cg[pick(gb, g)]++;
	assert_int_equal(cg[x], 8);
	assert_int_equal(cg[y], 2);
	assert_int_equal(cg[z], 0);
	balancer_free(gb);
	free(g);
	balancer_free(bal);
	free(f);
}

/* ---------------------------------------------------------------------------
 * Priority groups (the same for every algorithm)
 * ------------------------------------------------------------------------- */

static void check_priority_groups(enum balancer_algorithm algo, const char *key)
{
	struct fixture *f = fixture_new(algo);
	int p10a = fixture_add(f, "onprem-a", 10, 100), p10b = fixture_add(f, "onprem-b", 10, 100);
	int p5a = fixture_add(f, "backup-a", 5, 100), p5b = fixture_add(f, "backup-b", 5, 100);
	int p1 = fixture_add(f, "cloud", 1, 100);
	struct balancer *bal = balancer_new(&f->route);
	char k[32];

	/* The lower groups look better by every measure: priority still wins. */
	f->latency[p10a] = f->latency[p10b] = 900000;
	f->latency[p5a] = 1000;
	f->latency[p1] = 10;
	f->inflight[p10a] = f->inflight[p10b] = 50;
	set_load(f, p10a, 30, 0.95);
	set_load(f, p10b, 40, 0.99);
	set_load(f, p5a, 0, 0.1);
	set_load(f, p5b, 2, 0.1);
	set_load(f, p1, 0, 0);
	assert_non_null(bal);
	for (int i = 0; i < 200; i++) {
		snprintf(k, sizeof(k), "%s-%d", key ? key : "", i);
		int t = pick_key(bal, f, key ? k : NULL);
		assert_true(t == p10a || t == p10b);
	}
	/* One of group 10 out: the other takes everything; no spill to 5. */
	f->excluded[p10a] = true;
	for (int i = 0; i < 100; i++) {
		snprintf(k, sizeof(k), "%s-%d", key ? key : "", i);
		assert_int_equal(pick_key(bal, f, key ? k : NULL), p10b);
	}
	/* All of group 10 out: group 5. */
	f->excluded[p10b] = true;
	for (int i = 0; i < 200; i++) {
		snprintf(k, sizeof(k), "%s-%d", key ? key : "", i);
		int t = pick_key(bal, f, key ? k : NULL);
		assert_true(t == p5a || t == p5b);
	}
	/* Group 5 out too: group 1. */
	f->excluded[p5a] = f->excluded[p5b] = true;
	for (int i = 0; i < 100; i++) {
		snprintf(k, sizeof(k), "%s-%d", key ? key : "", i);
		assert_int_equal(pick_key(bal, f, key ? k : NULL), p1);
	}
	/* Everything out. */
	f->excluded[p1] = true;
	assert_int_equal(pick_key(bal, f, key ? "k" : NULL), -1);

	/* Group 10 back: it takes the traffic again at once. */
	f->excluded[p10a] = f->excluded[p10b] = false;
	for (int i = 0; i < 100; i++) {
		snprintf(k, sizeof(k), "%s-%d", key ? key : "", i);
		int t = pick_key(bal, f, key ? k : NULL);
		assert_true(t == p10a || t == p10b);
	}
	/* Group 10 drained (weight 0), not excluded: group 5 is used. */
	memset(f->excluded, 0, sizeof(f->excluded));
	balancer_free(bal);
	f->targets[p10a].weight = f->targets[p10b].weight = 0;
	bal = balancer_new(&f->route);
	for (int i = 0; i < 100; i++) {
		snprintf(k, sizeof(k), "%s-%d", key ? key : "", i);
		int t = pick_key(bal, f, key ? k : NULL);
		assert_true(t == p5a || t == p5b);
	}
	balancer_free(bal);
	free(f);
}

static void test_priority_groups_rr(void **state)
{
	check_priority_groups(BALANCER_ROUNDROBIN, NULL);
}

static void test_priority_groups_chash(void **state)
{
	check_priority_groups(BALANCER_CHASH, "consumer");
}

static void test_priority_groups_least_requests(void **state)
{
	check_priority_groups(BALANCER_LEAST_REQUESTS, NULL);
}

static void test_priority_groups_ewma(void **state)
{
	check_priority_groups(BALANCER_EWMA, NULL);
}

static void test_priority_groups_load(void **state)
{
	check_priority_groups(BALANCER_LOAD, NULL);
}

static void test_priority_unsorted_targets(void **state)
{
	/* The loader sorts, but the balancer must not depend on it. */
	struct fixture *f = fixture_new(BALANCER_ROUNDROBIN);
	int lo = fixture_add(f, "low", 1, 100);
	int hi1 = fixture_add(f, "high-1", 10, 4);
	int mid = fixture_add(f, "mid", 5, 100);
	int hi2 = fixture_add(f, "high-2", 10, 1);
	struct balancer *bal = balancer_new(&f->route);
	int count[4] = {0};

	for (int i = 0; i < 10; i++)
		count[pick(bal, f)]++;
	assert_int_equal(count[hi1], 8);
	assert_int_equal(count[hi2], 2);
	f->excluded[hi1] = f->excluded[hi2] = true;
	assert_int_equal(pick(bal, f), mid);
	f->excluded[mid] = true;
	assert_int_equal(pick(bal, f), lo);
	balancer_free(bal);
	free(f);
}

static void test_empty_route(void **state)
{
	struct fixture *f = fixture_new(BALANCER_CHASH);
	struct balancer *bal = balancer_new(&f->route);

	assert_non_null(bal);
	assert_int_equal(pick(bal, f), -1);
	assert_int_equal(pick_key(bal, f, "k"), -1);
	assert_int_equal(balancer_pick(bal, NULL), -1);
	balancer_free(bal);
	balancer_free(NULL);
	free(f);
}

static void test_null_input(void **state)
{
	/* No input at all: no key, nothing excluded, round-robin. */
	struct fixture *f = fixture_new(BALANCER_ROUNDROBIN);
	int a = fixture_add(f, "a", 0, 4);
	fixture_add(f, "b", 0, 1);
	struct balancer *bal = balancer_new(&f->route);
	int na = 0;

	for (int i = 0; i < 10; i++)
		na += balancer_pick(bal, NULL) == a;
	assert_int_equal(na, 8);
	balancer_free(bal);
	free(f);
}

/* ---------------------------------------------------------------------------
 * Consistent hash
 * ------------------------------------------------------------------------- */

static void test_chash_sticky(void **state)
{
	struct fixture *f = fixture_new(BALANCER_CHASH);
	fixture_add(f, "a", 0, 100);
	fixture_add(f, "b", 0, 100);
	fixture_add(f, "c", 0, 100);
	struct balancer *bal = balancer_new(&f->route);
	const char *keys[] = {"alice", "bob", "carol", "10.0.0.1", ""};

	for (size_t k = 0; k < N(keys); k++) {
		int first = pick_key(bal, f, keys[k]);

		assert_true(first >= 0);
		for (int i = 0; i < 1000; i++)
			assert_int_equal(pick_key(bal, f, keys[k]), first);
	}
	/* A second balancer for the same route (another worker) agrees. */
	struct balancer *other = balancer_new(&f->route);
	for (size_t k = 0; k < N(keys); k++)
		assert_int_equal(pick_key(other, f, keys[k]), pick_key(bal, f, keys[k]));
	balancer_free(other);
	balancer_free(bal);
	free(f);
}

/* 10k distinct keys; each target's share within 5 points of its weight's. */
static void check_chash_split(const unsigned *weights, size_t n)
{
	struct fixture *f = fixture_new(BALANCER_CHASH);
	unsigned sum = 0;
	int count[16] = {0};
	char name[32], key[32];

	assert_true(n <= N(count));
	for (size_t i = 0; i < n; i++) {
		snprintf(name, sizeof(name), "instance-%zu", i);
		fixture_add(f, name, 0, weights[i]);
		sum += weights[i];
	}
	struct balancer *bal = balancer_new(&f->route);
	for (int i = 0; i < 10000; i++) {
		snprintf(key, sizeof(key), "consumer-%d", i);
		int t = pick_key(bal, f, key);
		assert_true(t >= 0 && (size_t)t < n);
		count[t]++;
	}
	for (size_t i = 0; i < n; i++) {
		double want = 100.0 * weights[i] / sum, got = count[i] / 100.0;

		if (got < want - 5.0 || got > want + 5.0)
			fail_msg("target %zu: %.2f%% of keys, want %.2f%% +- 5", i, got, want);
		if (weights[i] == 0)
			assert_int_equal(count[i], 0);
	}
	balancer_free(bal);
	free(f);
}

static void test_chash_split_by_weight(void **state)
{
	const unsigned equal[] = {100, 100, 100, 100};
	const unsigned three_one[] = {300, 100};
	const unsigned mixed[] = {50, 100, 0, 200, 150};
	const unsigned tiny[] = {1, 2, 1};
	const unsigned skewed[] = {1000, 1}; /* scaled down to the point budget */

	check_chash_split(equal, N(equal));
	check_chash_split(three_one, N(three_one));
	check_chash_split(mixed, N(mixed));
	check_chash_split(tiny, N(tiny));
	check_chash_split(skewed, N(skewed));
}

static void test_chash_exclusion_moves_and_returns(void **state)
{
	struct fixture *f = fixture_new(BALANCER_CHASH);
	enum { NT = 5, NK = 10000 };
	char key[32];
	static int before[NK];
	int moved = 0;

	for (int i = 0; i < NT; i++) {
		snprintf(key, sizeof(key), "qwen-%d", i);
		fixture_add(f, key, 0, 100);
	}
	struct balancer *bal = balancer_new(&f->route);
	for (int i = 0; i < NK; i++) {
		snprintf(key, sizeof(key), "user-%d", i);
		before[i] = pick_key(bal, f, key);
	}
	int victim = before[0];

	f->excluded[victim] = true;
	for (int i = 0; i < NK; i++) {
		snprintf(key, sizeof(key), "user-%d", i);
		int t = pick_key(bal, f, key);

		assert_int_not_equal(t, victim);
		if (before[i] == victim)
			moved++;
		else
			assert_int_equal(t, before[i]); /* keys elsewhere stay put */
	}
	assert_true(moved > NK / NT / 2); /* the victim did hold keys */
	/* Stable while excluded: a moved key keeps its new target. */
	int moved_to = pick_key(bal, f, "user-0");
	for (int i = 0; i < 100; i++)
		assert_int_equal(pick_key(bal, f, "user-0"), moved_to);

	/* Back: every key returns to exactly where it was. */
	f->excluded[victim] = false;
	for (int i = 0; i < NK; i++) {
		snprintf(key, sizeof(key), "user-%d", i);
		assert_int_equal(pick_key(bal, f, key), before[i]);
	}
	/* A rebuilt balancer (reload, same names) maps keys the same way. */
	balancer_free(bal);
	bal = balancer_new(&f->route);
	for (int i = 0; i < NK; i++) {
		snprintf(key, sizeof(key), "user-%d", i);
		assert_int_equal(pick_key(bal, f, key), before[i]);
	}
	balancer_free(bal);
	free(f);
}

static void test_chash_adding_target_moves_few(void **state)
{
	/* Points come from instance names, so a new target takes keys only
	 * from others' arcs: keys either stay or move to the new target. */
	struct fixture *f = fixture_new(BALANCER_CHASH);
	char key[32];
	static int before[4000];

	fixture_add(f, "a", 0, 100);
	fixture_add(f, "b", 0, 100);
	fixture_add(f, "c", 0, 100);
	struct balancer *bal = balancer_new(&f->route);
	for (int i = 0; i < 4000; i++) {
		snprintf(key, sizeof(key), "k%d", i);
		before[i] = pick_key(bal, f, key);
	}
	balancer_free(bal);
	int d = fixture_add(f, "d", 0, 100);
	bal = balancer_new(&f->route);
	for (int i = 0; i < 4000; i++) {
		snprintf(key, sizeof(key), "k%d", i);
		int t = pick_key(bal, f, key);
		assert_true(t == before[i] || t == d);
	}
	balancer_free(bal);
	free(f);
}

static void test_chash_null_key_is_roundrobin(void **state)
{
	struct fixture *f = fixture_new(BALANCER_CHASH);
	struct fixture *g = fixture_new(BALANCER_ROUNDROBIN);
	fixture_add(f, "a", 0, 5);
	fixture_add(f, "b", 0, 1);
	fixture_add(f, "c", 0, 1);
	fixture_add(g, "a", 0, 5);
	fixture_add(g, "b", 0, 1);
	fixture_add(g, "c", 0, 1);
	struct balancer *ch = balancer_new(&f->route), *rr = balancer_new(&g->route);
	int count[3] = {0};

	for (int i = 0; i < 70; i++) {
		int t = pick(ch, f);

		assert_int_equal(t, pick(rr, g));
		count[t]++;
	}
	assert_int_equal(count[0], 50);
	assert_int_equal(count[1], 10);
	assert_int_equal(count[2], 10);
	balancer_free(ch);
	balancer_free(rr);
	free(f);
	free(g);
}

static void test_chash_weight_zero_and_excluded(void **state)
{
	struct fixture *f = fixture_new(BALANCER_CHASH);
	int a = fixture_add(f, "a", 0, 100);
	int z = fixture_add(f, "drained", 0, 0);
	int c = fixture_add(f, "c", 0, 100);
	struct balancer *bal = balancer_new(&f->route);
	char key[32];

	for (int i = 0; i < 2000; i++) {
		snprintf(key, sizeof(key), "%d", i);
		assert_int_not_equal(pick_key(bal, f, key), z);
	}
	f->excluded[a] = true;
	for (int i = 0; i < 2000; i++) {
		snprintf(key, sizeof(key), "%d", i);
		assert_int_equal(pick_key(bal, f, key), c);
	}
	f->excluded[c] = true;
	assert_int_equal(pick_key(bal, f, "x"), -1);
	balancer_free(bal);
	free(f);
}

/* ---------------------------------------------------------------------------
 * Least requests
 * ------------------------------------------------------------------------- */

static void test_lr_prefers_lower_inflight(void **state)
{
	struct fixture *f = fixture_new(BALANCER_LEAST_REQUESTS);
	int a = fixture_add(f, "a", 0, 100), b = fixture_add(f, "b", 0, 100);
	struct balancer *bal = balancer_new(&f->route);

	f->inflight[a] = 5;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	f->inflight[a] = 0;
	f->inflight[b] = 1;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), a);
	/* Only one candidate: it, however busy. */
	f->inflight[a] = 1000;
	f->excluded[b] = true;
	for (int i = 0; i < 50; i++)
		assert_int_equal(pick(bal, f), a);
	balancer_free(bal);
	free(f);
}

static void test_lr_two_choices_among_many(void **state)
{
	/* With many targets only two are compared, so an idle target is not
	 * always found, but the busiest one is never picked (it loses to any
	 * other) and the idle one wins whenever it is drawn. */
	struct fixture *f = fixture_new(BALANCER_LEAST_REQUESTS);
	int count[8] = {0};

	for (int i = 0; i < 8; i++) {
		char name[16];

		snprintf(name, sizeof(name), "n%d", i);
		fixture_add(f, name, 0, 100);
		f->inflight[i] = 10 + i;
	}
	f->inflight[3] = 0;
	struct balancer *bal = balancer_new(&f->route);
	for (int i = 0; i < 8000; i++)
		count[pick(bal, f)]++;
	assert_int_equal(count[7], 0);
	/* The idle one is in the pair about 2/8 of the time: it wins all of those. */
	assert_true(count[3] > 1500 && count[3] < 2500);
	for (int i = 0; i < 7; i++)
		if (i != 3)
			assert_true(count[3] > count[i]);
	balancer_free(bal);
	free(f);
}

static void test_lr_respects_weights(void **state)
{
	/* Requests that never finish: the in-flight counts settle in the ratio
	 * of the weights, because each pick goes to the lowest (inflight+1)/w. */
	struct fixture *f = fixture_new(BALANCER_LEAST_REQUESTS);
	int a = fixture_add(f, "a", 0, 300), b = fixture_add(f, "b", 0, 100);
	struct balancer *bal = balancer_new(&f->route);

	for (int i = 0; i < 400; i++)
		f->inflight[pick(bal, f)]++;
	assert_true(f->inflight[a] >= 297 && f->inflight[a] <= 303);
	assert_int_equal(f->inflight[a] + f->inflight[b], 400);
	balancer_free(bal);

	/* No in-flight source: every load is 0, so the heavier of the pair wins
	 * (1/200 < 1/100) and equal weights go to the first drawn. x is in the
	 * pair with probability 1/2 + 1/2 * 2/3: about 8333 of 10000. */
	struct fixture *g = fixture_new(BALANCER_LEAST_REQUESTS);
	int count[3] = {0};
	fixture_add(g, "x", 0, 200);
	fixture_add(g, "y", 0, 100);
	fixture_add(g, "z", 0, 100);
	bal = balancer_new(&g->route);
	struct balancer_input in = {.rand = test_rand, .rand_arg = g};
	for (int i = 0; i < 10000; i++)
		count[balancer_pick(bal, &in)]++;
	assert_true(count[0] > 8000 && count[0] < 8700);
	assert_true(count[1] > 600 && count[2] > 600);
	balancer_free(bal);
	free(g);
	free(f);
}

static void test_lr_never_picks_excluded_or_drained(void **state)
{
	struct fixture *f = fixture_new(BALANCER_LEAST_REQUESTS);
	int ex = fixture_add(f, "excluded", 0, 100);
	int dr = fixture_add(f, "drained", 0, 0);
	fixture_add(f, "c", 0, 100);
	fixture_add(f, "d", 0, 100);
	struct balancer *bal = balancer_new(&f->route);

	f->excluded[ex] = true;
	f->inflight[ex] = -1; /* a confused counter must not matter */
	for (int i = 0; i < 2000; i++) {
		int t = pick(bal, f);

		assert_true(t >= 0);
		assert_int_not_equal(t, ex);
		assert_int_not_equal(t, dr);
		f->inflight[t]++;
	}
	balancer_free(bal);
	free(f);
}

static void test_lr_own_random_source(void **state)
{
	/* Without rand the balancer uses its own generator and still spreads. */
	struct fixture *f = fixture_new(BALANCER_LEAST_REQUESTS);
	int count[3] = {0};
	fixture_add(f, "a", 0, 100);
	fixture_add(f, "b", 0, 100);
	fixture_add(f, "c", 0, 100);
	struct balancer *bal = balancer_new(&f->route);
	for (int i = 0; i < 3000; i++)
		count[balancer_pick(bal, NULL)]++;
	for (int i = 0; i < 3; i++)
		assert_true(count[i] > 700);
	balancer_free(bal);
	free(f);
}

/* ---------------------------------------------------------------------------
 * Peak-EWMA
 * ------------------------------------------------------------------------- */

static void test_ewma_prefers_lower_latency(void **state)
{
	struct fixture *f = fixture_new(BALANCER_EWMA);
	int a = fixture_add(f, "a", 0, 100), b = fixture_add(f, "b", 0, 100);
	struct balancer *bal = balancer_new(&f->route);

	assert_non_null(bal);
	assert_int_equal(balancer_algorithm(bal), BALANCER_EWMA);
	f->latency[a] = 5000;
	f->latency[b] = 1000;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	f->inflight[a] = f->inflight[b] = 4;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	f->latency[a] = 999;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), a);
	balancer_free(bal);
	free(f);

	/* Two choices among many: the slowest loses to any other, the fastest
	 * wins whenever it is drawn (about 2/8 of the picks). */
	struct fixture *g = fixture_new(BALANCER_EWMA);
	int count[8] = {0};

	for (int i = 0; i < 8; i++) {
		char name[16];

		snprintf(name, sizeof(name), "n%d", i);
		fixture_add(g, name, 0, 100);
		g->latency[i] = (uint64_t)(i + 1) * 1000;
	}
	g->latency[3] = 100;
	bal = balancer_new(&g->route);
	for (int i = 0; i < 8000; i++)
		count[pick(bal, g)]++;
	assert_int_equal(count[7], 0);
	assert_true(count[3] > 1500 && count[3] < 2500);
	balancer_free(bal);
	free(g);
}

static void test_ewma_accounts_for_inflight(void **state)
{
	struct fixture *f = fixture_new(BALANCER_EWMA);
	int a = fixture_add(f, "a", 0, 100), b = fixture_add(f, "b", 0, 100);
	struct balancer *bal = balancer_new(&f->route);

	/* 1000 us * 10 in flight costs more than 2000 us * 1. */
	f->latency[a] = 1000;
	f->latency[b] = 2000;
	f->inflight[a] = 9;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	f->inflight[a] = 0;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), a);

	/* Requests that never finish: a, three times as fast, ends up holding
	 * three times as many: (ia + 1) * 1000 ~ (ib + 1) * 3000. */
	f->latency[b] = 3000;
	for (int i = 0; i < 400; i++)
		f->inflight[pick(bal, f)]++;
	assert_int_equal(f->inflight[a] + f->inflight[b], 400);
	assert_true(f->inflight[a] >= 298 && f->inflight[a] <= 303);
	balancer_free(bal);
	free(f);
}

static void test_ewma_accounts_for_weight(void **state)
{
	struct fixture *f = fixture_new(BALANCER_EWMA);
	int a = fixture_add(f, "a", 0, 100), b = fixture_add(f, "b", 0, 300);
	struct balancer *bal = balancer_new(&f->route);

	/* Equal latency: the heavier one costs less. */
	f->latency[a] = f->latency[b] = 1000;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	/* 1000/100 = 10 against 2000/300 = 6.7: still b; 4000/300 = 13.3: a. */
	f->latency[b] = 2000;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	f->latency[b] = 4000;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), a);

	/* Equal latency, requests that never finish: 1:3 by weight. */
	f->latency[b] = 1000;
	for (int i = 0; i < 400; i++)
		f->inflight[pick(bal, f)]++;
	assert_true(f->inflight[b] >= 297 && f->inflight[b] <= 303);
	balancer_free(bal);
	free(f);
}

static void test_ewma_new_instances_get_traffic(void **state)
{
	struct fixture *f = fixture_new(BALANCER_EWMA);
	int a = fixture_add(f, "fast", 0, 100), s = fixture_add(f, "slow", 0, 100),
	    n = fixture_add(f, "new", 0, 100);
	struct balancer *bal = balancer_new(&f->route);
	int count[3] = {0};

	/* The new one is as fast as the fastest: it ties with it (first drawn
	 * wins) and beats the slow one, about half of the picks. */
	f->latency[a] = 1000;
	f->latency[s] = 50000;
	for (int i = 0; i < 6000; i++)
		count[pick(bal, f)]++;
	assert_int_equal(count[s], 0);
	assert_true(count[n] > 2500 && count[n] < 3500);
	assert_true(count[a] > 2500 && count[a] < 3500);

	/* Not flooded either: its own in-flight requests count. */
	f->excluded[s] = true;
	for (int i = 0; i < 400; i++)
		f->inflight[pick(bal, f)]++;
	assert_true(abs(f->inflight[a] - f->inflight[n]) <= 1);
	f->inflight[a] = 0;
	f->inflight[n] = 5;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), a);

	/* Once measured, it is scored on its own latency. */
	f->inflight[n] = 0;
	f->latency[n] = 4000;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), a);
	balancer_free(bal);
	free(f);

	/* Nothing measured yet: least_requests. */
	struct fixture *g = fixture_new(BALANCER_EWMA);
	int x = fixture_add(g, "x", 0, 100), y = fixture_add(g, "y", 0, 100);
	bal = balancer_new(&g->route);
	g->inflight[x] = 3;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, g), y);
	balancer_free(bal);
	free(g);
}

static void test_ewma_never_picks_excluded_or_drained(void **state)
{
	struct fixture *f = fixture_new(BALANCER_EWMA);
	int ex = fixture_add(f, "excluded", 0, 100);
	int dr = fixture_add(f, "drained", 0, 0);
	int c = fixture_add(f, "c", 0, 100), d = fixture_add(f, "d", 0, 100);
	struct balancer *bal = balancer_new(&f->route);

	f->latency[ex] = f->latency[dr] = 1; /* the fastest, by far */
	f->latency[c] = 1000;
	f->latency[d] = 2000;
	f->excluded[ex] = true;
	for (int i = 0; i < 2000; i++) {
		int t = pick(bal, f);

		assert_true(t == c || t == d);
		f->inflight[t]++;
	}
	/* Only one candidate left: it, however slow. */
	f->excluded[c] = true;
	f->latency[d] = UINT64_MAX;
	assert_int_equal(pick(bal, f), d);
	f->excluded[d] = true;
	assert_int_equal(pick(bal, f), -1);
	balancer_free(bal);
	free(f);
}

/* ---------------------------------------------------------------------------
 * Load
 * ------------------------------------------------------------------------- */

static void test_load_prefers_shorter_queue(void **state)
{
	struct fixture *f = fixture_new(BALANCER_LOAD);
	int a = fixture_add(f, "a", 0, 100), b = fixture_add(f, "b", 0, 100),
	    c = fixture_add(f, "c", 0, 100);
	struct balancer *bal = balancer_new(&f->route);

	assert_non_null(bal);
	assert_int_equal(balancer_algorithm(bal), BALANCER_LOAD);
	/* The queue comes first: before KV use and in-flight requests. */
	set_load(f, a, 5, 0.1);
	set_load(f, b, 1, 0.9);
	set_load(f, c, 3, 0.0);
	f->inflight[b] = 20;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b); /* the best of all, not of two */
	f->load[b].waiting = 6;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), c);
	balancer_free(bal);
	free(f);
}

static void test_load_then_lower_kv(void **state)
{
	struct fixture *f = fixture_new(BALANCER_LOAD);
	int a = fixture_add(f, "a", 0, 100), b = fixture_add(f, "b", 0, 100),
	    c = fixture_add(f, "c", 0, 100);
	struct balancer *bal = balancer_new(&f->route);

	set_load(f, a, 2, 0.8);
	set_load(f, b, 2, 0.2);
	set_load(f, c, 2, 0.5);
	f->inflight[b] = 10;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	/* Within one KV step the in-flight count decides... */
	f->excluded[c] = true;
	f->load[a].kv_cache = 0.82;
	f->load[b].kv_cache = 0.83;
	f->inflight[b] = 4;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), a);
	f->inflight[a] = 5;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	/* ...a step apart, KV use does. */
	f->load[a].kv_cache = 0.86;
	f->inflight[a] = 0;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	balancer_free(bal);
	free(f);
}

static void test_load_then_inflight(void **state)
{
	struct fixture *f = fixture_new(BALANCER_LOAD);
	int a = fixture_add(f, "a", 0, 100), b = fixture_add(f, "b", 0, 100),
	    c = fixture_add(f, "c", 0, 100);
	struct balancer *bal = balancer_new(&f->route);

	set_load(f, a, 1, 0.3);
	set_load(f, b, 1, 0.3);
	set_load(f, c, 1, 0.3);
	f->inflight[a] = 3;
	f->inflight[b] = 1;
	f->inflight[c] = 2;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	/* Between two scrapes the metrics stand still: the in-flight count
	 * spreads the picks evenly meanwhile. */
	f->inflight[a] = f->inflight[b] = f->inflight[c] = 0;
	for (int i = 0; i < 300; i++)
		f->inflight[pick(bal, f)]++;
	assert_int_equal(f->inflight[a], 100);
	assert_int_equal(f->inflight[b], 100);
	assert_int_equal(f->inflight[c], 100);
	balancer_free(bal);
	free(f);
}

static void test_load_weights(void **state)
{
	struct fixture *f = fixture_new(BALANCER_LOAD);
	int a = fixture_add(f, "a", 0, 100), b = fixture_add(f, "b", 0, 300);
	struct balancer *bal = balancer_new(&f->route);

	/* The queue per unit of weight: 2/100 against 3/300. */
	set_load(f, a, 2, 0.1);
	set_load(f, b, 3, 0.1);
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	f->load[b].waiting = 7;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), a);
	/* KV use is a fraction of each instance's own capacity: not weighted. */
	set_load(f, a, 0, 0.2);
	set_load(f, b, 0, 0.5);
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), a);
	/* In flight per unit of weight: requests that never finish settle 1:3. */
	set_load(f, a, 0, 0.2);
	set_load(f, b, 0, 0.2);
	for (int i = 0; i < 400; i++)
		f->inflight[pick(bal, f)]++;
	assert_true(f->inflight[b] >= 299 && f->inflight[b] <= 301);
	balancer_free(bal);
	free(f);
}

static void test_load_equal_share_traffic(void **state)
{
	/* Equal loads and no change in flight (the caller gives no counts):
	 * smooth weighted round-robin among the equals, exactly. */
	struct fixture *f = fixture_new(BALANCER_LOAD);
	int a = fixture_add(f, "a", 0, 4), b = fixture_add(f, "b", 0, 1),
	    c = fixture_add(f, "c", 0, 5);
	struct balancer *bal = balancer_new(&f->route);
	int count[3] = {0};

	set_load(f, a, 0, 0.5);
	set_load(f, b, 0, 0.5);
	set_load(f, c, 1, 0.5); /* out of the tie */
	for (int i = 0; i < 10; i++)
		count[pick(bal, f)]++;
	assert_int_equal(count[a], 8);
	assert_int_equal(count[b], 2);
	assert_int_equal(count[c], 0);
	/* c joins the tie: 4:1:5 of every 10. */
	f->load[c].waiting = 0;
	memset(count, 0, sizeof(count));
	for (int i = 0; i < 1000; i++)
		count[pick(bal, f)]++;
	assert_int_equal(count[a], 400);
	assert_int_equal(count[b], 100);
	assert_int_equal(count[c], 500);
	balancer_free(bal);
	free(f);
}

static void test_load_unknown_is_saturated(void **state)
{
	struct fixture *f = fixture_new(BALANCER_LOAD);
	int a = fixture_add(f, "unknown-a", 0, 1000), b = fixture_add(f, "busy", 0, 1),
	    c = fixture_add(f, "unknown-c", 0, 100);
	struct balancer *bal = balancer_new(&f->route);

	/* However busy a known instance is, it beats an unknown one. */
	set_load(f, b, 50, 0.99);
	f->inflight[b] = 100;
	f->inflight[c] = 5;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	/* The known one out: only unknowns left, least_requests among them. */
	f->excluded[b] = true;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), a);
	/* Metrics going stale turn an instance into an unknown one. */
	f->excluded[b] = false;
	set_load(f, a, 0, 0.0);
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), a);
	f->load_known[a] = false;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), b);
	balancer_free(bal);
	free(f);
}

static void test_load_all_unknown_falls_back(void **state)
{
	struct fixture *f = fixture_new(BALANCER_LOAD);
	int a = fixture_add(f, "a", 0, 100), b = fixture_add(f, "b", 0, 100),
	    c = fixture_add(f, "c", 0, 100);
	struct balancer *bal = balancer_new(&f->route);
	int count[3] = {0};

	/* Two choices: c loses to either, b wins whenever drawn (2/3). */
	f->inflight[a] = 3;
	f->inflight[c] = 5;
	for (int i = 0; i < 3000; i++)
		count[pick(bal, f)]++;
	assert_int_equal(count[c], 0);
	assert_true(count[b] > 1800 && count[b] < 2200);
	assert_true(count[a] > 800 && count[a] < 1200);
	balancer_free(bal);
	free(f);
}

static void test_load_odd_metrics(void **state)
{
	struct fixture *f = fixture_new(BALANCER_LOAD);
	int a = fixture_add(f, "a", 0, 100), b = fixture_add(f, "b", 0, 100),
	    c = fixture_add(f, "c", 0, 100);
	struct balancer *bal = balancer_new(&f->route);

	f->excluded[c] = true;
	/* An unparsable queue is an unknown load. */
	set_load(f, a, NAN, 0.0);
	set_load(f, b, 100, 0.9);
	for (int i = 0; i < 50; i++)
		assert_int_equal(pick(bal, f), b);
	/* A negative queue counts as empty: then KV decides. */
	set_load(f, a, -5, 0.5);
	set_load(f, b, 0, 0.3);
	for (int i = 0; i < 50; i++)
		assert_int_equal(pick(bal, f), b);
	/* KV use not reported (-1, NaN) counts as 0... */
	set_load(f, a, 0, -1);
	for (int i = 0; i < 50; i++)
		assert_int_equal(pick(bal, f), a);
	set_load(f, a, 0, NAN);
	for (int i = 0; i < 50; i++)
		assert_int_equal(pick(bal, f), a);
	/* ...above 1 as 1: a tie with a full one, in-flight decides. */
	set_load(f, a, 0, 7.0);
	set_load(f, b, 0, 1.0);
	f->inflight[b] = 2;
	for (int i = 0; i < 50; i++)
		assert_int_equal(pick(bal, f), a);
	/* An infinite queue is known, and last among the known. */
	f->excluded[c] = false;
	set_load(f, a, INFINITY, 0.0);
	set_load(f, b, 1000, 1.0);
	for (int i = 0; i < 50; i++)
		assert_int_equal(pick(bal, f), b);
	f->excluded[b] = true;
	for (int i = 0; i < 50; i++)
		assert_int_equal(pick(bal, f), a);
	balancer_free(bal);
	free(f);
}

static void test_load_never_picks_excluded_or_drained(void **state)
{
	struct fixture *f = fixture_new(BALANCER_LOAD);
	int ex = fixture_add(f, "excluded", 0, 100);
	int dr = fixture_add(f, "drained", 0, 0);
	int c = fixture_add(f, "c", 0, 100), d = fixture_add(f, "d", 0, 100);
	struct balancer *bal = balancer_new(&f->route);

	set_load(f, ex, 0, 0.0); /* the two best */
	set_load(f, dr, 0, 0.0);
	set_load(f, c, 2, 0.5);
	set_load(f, d, 3, 0.1);
	f->excluded[ex] = true;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), c);
	f->excluded[c] = true;
	for (int i = 0; i < 200; i++)
		assert_int_equal(pick(bal, f), d);
	f->excluded[d] = true;
	assert_int_equal(pick(bal, f), -1);
	balancer_free(bal);
	free(f);
}

static void test_without_source_is_least_requests(void **state)
{
	/* ewma without latency_us, load without load: least_requests. */
	const enum balancer_algorithm algos[] = {BALANCER_EWMA, BALANCER_LOAD};

	for (size_t k = 0; k < N(algos); k++) {
		struct fixture *f = fixture_new(algos[k]);
		int a = fixture_add(f, "a", 0, 100), b = fixture_add(f, "b", 0, 100);
		struct balancer *bal = balancer_new(&f->route);
		struct balancer_input in = fixture_input(f);

		assert_int_equal(balancer_algorithm(bal), algos[k]);
		in.latency_us = NULL;
		in.load = NULL;
		f->latency[b] = 1000000; /* ignored */
		set_load(f, b, 100, 1.0);
		f->inflight[a] = 3;
		for (int i = 0; i < 100; i++)
			assert_int_equal(balancer_pick(bal, &in), b);
		/* No input at all: weighted random, every target served. */
		int count[2] = {0};
		for (int i = 0; i < 1000; i++)
			count[balancer_pick(bal, NULL)]++;
		assert_true(count[a] > 300 && count[b] > 300);
		balancer_free(bal);
		free(f);
	}
}

/* ---------------------------------------------------------------------------
 * Large routes
 * ------------------------------------------------------------------------- */

static void test_many_targets(void **state)
{
	const enum balancer_algorithm algos[] = {BALANCER_ROUNDROBIN, BALANCER_CHASH,
	                                         BALANCER_LEAST_REQUESTS, BALANCER_EWMA,
	                                         BALANCER_LOAD};

	for (size_t k = 0; k < N(algos); k++) {
		struct fixture *f = fixture_new(algos[k]);
		static int count[MAX_T];
		char name[32];

		for (int i = 0; i < 500; i++) {
			snprintf(name, sizeof(name), "instance-%d", i);
			/* two groups of 250, varied weights */
			fixture_add(f, name, i < 250 ? 2 : 1, 1 + (unsigned)(i % 7) * 10);
			/* varied latencies (some unsampled) and loads (some unknown) */
			f->latency[i] = (uint64_t)(i % 5) * 1000;
			if (i % 3)
				set_load(f, i, i % 4, (i % 10) / 10.0);
		}
		struct balancer *bal = balancer_new(&f->route);
		assert_non_null(bal);
		memset(count, 0, sizeof(count));
		for (int i = 0; i < 100000; i++) {
			snprintf(name, sizeof(name), "key-%d", i);
			int t = pick_key(bal, f, algos[k] == BALANCER_CHASH ? name : NULL);
			assert_true(t >= 0 && t < 250);
			count[t]++;
		}
		if (algos[k] == BALANCER_ROUNDROBIN) {
			/* Any run of (sum of weights) picks gives each target
			 * exactly its weight, wherever the run starts. */
			unsigned sum = 0;
			for (int i = 0; i < 250; i++)
				sum += f->targets[i].weight;
			memset(count, 0, sizeof(count));
			for (unsigned i = 0; i < sum * 4; i++)
				count[pick(bal, f)]++;
			for (int i = 0; i < 250; i++)
				assert_int_equal(count[i], (int)f->targets[i].weight * 4);
		}
		/* Group 2 all excluded: group 1 only. */
		for (int i = 0; i < 250; i++)
			f->excluded[i] = true;
		for (int i = 0; i < 1000; i++) {
			snprintf(name, sizeof(name), "key-%d", i);
			int t = pick_key(bal, f, algos[k] == BALANCER_CHASH ? name : NULL);
			assert_true(t >= 250 && t < 500);
		}
		balancer_free(bal);
		free(f);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_rr_4_1_exact),
	        cmocka_unit_test(test_rr_same_for_4_1_with_big_weights),
	        cmocka_unit_test(test_rr_5_1_1_smooth),
	        cmocka_unit_test(test_rr_weight_zero_never_picked),
	        cmocka_unit_test(test_rr_exclusion_redistributes),
	        cmocka_unit_test(test_priority_groups_rr),
	        cmocka_unit_test(test_priority_groups_chash),
	        cmocka_unit_test(test_priority_groups_least_requests),
	        cmocka_unit_test(test_priority_groups_ewma),
	        cmocka_unit_test(test_priority_groups_load),
	        cmocka_unit_test(test_priority_unsorted_targets),
	        cmocka_unit_test(test_empty_route),
	        cmocka_unit_test(test_null_input),
	        cmocka_unit_test(test_chash_sticky),
	        cmocka_unit_test(test_chash_split_by_weight),
	        cmocka_unit_test(test_chash_exclusion_moves_and_returns),
	        cmocka_unit_test(test_chash_adding_target_moves_few),
	        cmocka_unit_test(test_chash_null_key_is_roundrobin),
	        cmocka_unit_test(test_chash_weight_zero_and_excluded),
	        cmocka_unit_test(test_lr_prefers_lower_inflight),
	        cmocka_unit_test(test_lr_two_choices_among_many),
	        cmocka_unit_test(test_lr_respects_weights),
	        cmocka_unit_test(test_lr_never_picks_excluded_or_drained),
	        cmocka_unit_test(test_lr_own_random_source),
	        cmocka_unit_test(test_ewma_prefers_lower_latency),
	        cmocka_unit_test(test_ewma_accounts_for_inflight),
	        cmocka_unit_test(test_ewma_accounts_for_weight),
	        cmocka_unit_test(test_ewma_new_instances_get_traffic),
	        cmocka_unit_test(test_ewma_never_picks_excluded_or_drained),
	        cmocka_unit_test(test_load_prefers_shorter_queue),
	        cmocka_unit_test(test_load_then_lower_kv),
	        cmocka_unit_test(test_load_then_inflight),
	        cmocka_unit_test(test_load_weights),
	        cmocka_unit_test(test_load_equal_share_traffic),
	        cmocka_unit_test(test_load_unknown_is_saturated),
	        cmocka_unit_test(test_load_all_unknown_falls_back),
	        cmocka_unit_test(test_load_odd_metrics),
	        cmocka_unit_test(test_load_never_picks_excluded_or_drained),
	        cmocka_unit_test(test_without_source_is_least_requests),
	        cmocka_unit_test(test_many_targets),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
