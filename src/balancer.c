/* balancer.c — pick a route's target: highest priority group with a candidate, then by weight. */
#include "sluice/balancer.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/log.h"

/*
 * Virtual nodes of the chash ring. The lightest target of a group gets
 * CHASH_POINTS points and the others CHASH_POINTS * weight / lightest, unless
 * that exceeds CHASH_SPREAD times the points equal weights would need; then
 * the group's budget is shared in proportion to weight (at least one point
 * each). 160 is what nginx and lua-resty-chash use: with fewer the split
 * between targets strays visibly from their weights.
 */
#define CHASH_POINTS 160u
#define CHASH_SPREAD 4u

/* Golden-ratio increment of splitmix64: walks the 64-bit space evenly. */
#define GOLDEN_GAMMA 0x9e3779b97f4a7c15ull

struct balancer_group {
	size_t first; /* into balancer.order */
	size_t count;
	size_t ring_first; /* into balancer.ring (chash only) */
	size_t ring_count;
};

struct balancer_point {
	uint64_t hash;
	uint32_t target; /* index into route->targets */
};

/* load: one candidate's score, kept for the tie-breaking pass. */
struct balancer_score {
	double waiting;    /* >= 0, or +inf */
	uint32_t kv_step;  /* floor(kv_cache / BALANCER_KV_STEP) */
	uint64_t inflight; /* >= 0 */
	bool known;        /* false: load unknown, or not a candidate of this pick */
};

struct balancer {
	const struct config_route *route; /* borrowed: the caller's snapshot holds it */
	enum balancer_algorithm algorithm;
	uint32_t *order; /* target indexes, priority descending, stable */
	struct balancer_group *groups;
	size_t n_groups;
	int64_t *current;            /* smooth round-robin state, per target index */
	struct balancer_point *ring; /* chash: each group's points, sorted by hash */
	size_t n_ring;
	uint64_t rng;                  /* least_requests without a caller's random source */
	struct balancer_score *scores; /* load: per target index, scratch of one pick */
};

static void balancer_build_groups(struct balancer *b);
static bool balancer_build_ring(struct balancer *b);
static int balancer_cmp_point(const void *pa, const void *pb);
struct balancer_share;
static void balancer_share_of(const struct balancer *b, const struct balancer_group *g,
                              struct balancer_share *s);
static uint32_t balancer_points_of(const struct balancer_share *s, uint64_t w);
static uint64_t balancer_mix64(uint64_t x);
static uint64_t balancer_fnv1a(const void *data, size_t len);
static uint64_t balancer_splitmix(void *arg);
static bool balancer_candidate(const struct balancer *b, const struct balancer_input *in,
                               uint32_t t);
static const struct balancer_group *balancer_group_for(const struct balancer *b,
                                                       const struct balancer_input *in);
static int balancer_pick_rr(struct balancer *b, const struct balancer_group *g,
                            const struct balancer_input *in);
static int balancer_pick_chash(struct balancer *b, const struct balancer_group *g,
                               const struct balancer_input *in);
static int balancer_pick_lr(struct balancer *b, const struct balancer_group *g,
                            const struct balancer_input *in);
static int balancer_pick_ewma(struct balancer *b, const struct balancer_group *g,
                              const struct balancer_input *in);
static int balancer_pick_load(struct balancer *b, const struct balancer_group *g,
                              const struct balancer_input *in);
static int balancer_pair(struct balancer *b, const struct balancer_group *g,
                         const struct balancer_input *in, int *second);
static uint64_t balancer_fastest(const struct balancer *b, const struct balancer_group *g,
                                 const struct balancer_input *in);
static bool balancer_score_of(const struct balancer *b, const struct balancer_input *in, int t,
                              struct balancer_score *s);
static int balancer_cmp_score(const struct balancer *b, int t1, int t2);
static int balancer_draw(const struct balancer *b, const struct balancer_group *g,
                         const struct balancer_input *in, uint64_t sum, uint64_t r, int skip);
static uint64_t balancer_inflight(const struct balancer *b, const struct balancer_input *in, int t);

/* ---------------------------------------------------------------------------
 * Construction
 * ------------------------------------------------------------------------- */

struct balancer *balancer_new(const struct config_route *route)
{
	struct balancer *b;
	size_t n = route->n_targets;

	if (n > INT_MAX || n > UINT32_MAX) {
		log_error("balancer: route %s: %zu targets, too many", route->name, n);
		return NULL;
	}
	b = calloc(1, sizeof(*b));
	if (!b)
		goto fail;
	b->route = route;
	switch (route->balancer.algorithm) {
	case BALANCER_ROUNDROBIN:
	case BALANCER_CHASH:
	case BALANCER_LEAST_REQUESTS:
	case BALANCER_EWMA:
	case BALANCER_LOAD:
		b->algorithm = route->balancer.algorithm;
		break;
	default:
		/* The loader knows no other value; least in-flight needs no input. */
		b->algorithm = BALANCER_LEAST_REQUESTS;
		break;
	}
	/* A fixed seed keeps least_requests reproducible in tests; callers that
	 * want real randomness pass their own source. */
	b->rng = 0x5eed5eed5eed5eedull ^ (uint64_t)route->index;

	if (n > 0) {
		b->order = calloc(n, sizeof(*b->order));
		b->groups = calloc(n, sizeof(*b->groups));
		b->current = calloc(n, sizeof(*b->current));
		if (!b->order || !b->groups || !b->current)
			goto fail;
		if (b->algorithm == BALANCER_LOAD) {
			b->scores = calloc(n, sizeof(*b->scores));
			if (!b->scores)
				goto fail;
		}
	}
	balancer_build_groups(b);
	/* Chash keeps the round-robin state too: a pick without a key is a
	 * round-robin one. */
	if (b->algorithm == BALANCER_CHASH && !balancer_build_ring(b))
		goto fail;
	return b;

fail:
	log_error("balancer: route %s: out of memory", route->name);
	balancer_free(b);
	return NULL;
}

void balancer_free(struct balancer *b)
{
	if (!b)
		return;
	free(b->order);
	free(b->groups);
	free(b->current);
	free(b->ring);
	free(b->scores);
	free(b);
}

enum balancer_algorithm balancer_algorithm(const struct balancer *b)
{
	return b->algorithm;
}

/*
 * The loader already sorts targets by priority, but a stable sort here costs
 * nothing at build time and means a hand-built route cannot split a group in
 * two. Sorting indexes keeps route->targets untouched.
 */
static void balancer_build_groups(struct balancer *b)
{
	const struct config_route *r = b->route;
	size_t n = r->n_targets;

	for (size_t i = 0; i < n; i++)
		b->order[i] = (uint32_t)i;
	/* Insertion sort: stable, no allocation, and n is small in practice
	 * (and already sorted, which makes it linear). */
	for (size_t i = 1; i < n; i++) {
		uint32_t v = b->order[i];
		size_t j = i;

		/* Move past strictly lower priorities only: equal ones keep their order. */
		while (j > 0 && r->targets[b->order[j - 1]].priority < r->targets[v].priority) {
			b->order[j] = b->order[j - 1];
			j--;
		}
		b->order[j] = v;
	}
	b->n_groups = 0;
	for (size_t i = 0; i < n; i++) {
		if (i == 0 ||
		    r->targets[b->order[i]].priority != r->targets[b->order[i - 1]].priority) {
			b->groups[b->n_groups].first = i;
			b->n_groups++;
		}
		b->groups[b->n_groups - 1].count++;
	}
}

/* How a group's ring is shared out; see CHASH_POINTS. */
struct balancer_share {
	uint64_t w_min; /* smallest positive weight; 0: nobody has points */
	uint64_t sum_w;
	uint64_t budget; /* points allowed before scaling down */
	bool scaled;     /* budget shared by weight instead of CHASH_POINTS per w_min */
};

static uint32_t balancer_points_of(const struct balancer_share *s, uint64_t w)
{
	if (w == 0 || s->w_min == 0)
		return 0;
	if (!s->scaled) /* w / w_min < 2^32: no overflow, and >= CHASH_POINTS */
		return (uint32_t)((CHASH_POINTS * w + s->w_min / 2) / s->w_min);
	/* double: budget * w could overflow 64 bits for huge weights */
	double p = (double)s->budget * (double)w / (double)s->sum_w + 0.5;

	return p < 1.0 ? 1u : (uint32_t)p;
}

static void balancer_share_of(const struct balancer *b, const struct balancer_group *g,
                              struct balancer_share *s)
{
	const struct config_target *targets = b->route->targets;
	uint64_t n_pos = 0, raw = 0;

	*s = (struct balancer_share){0};
	for (size_t k = 0; k < g->count; k++) {
		uint64_t w = targets[b->order[g->first + k]].weight;

		if (w == 0)
			continue;
		n_pos++;
		s->sum_w += w;
		if (s->w_min == 0 || w < s->w_min)
			s->w_min = w;
	}
	s->budget = (uint64_t)CHASH_POINTS * CHASH_SPREAD * n_pos;
	for (size_t k = 0; k < g->count; k++)
		raw += balancer_points_of(s, targets[b->order[g->first + k]].weight);
	s->scaled = raw > s->budget;
}

static bool balancer_build_ring(struct balancer *b)
{
	const struct config_target *targets = b->route->targets;
	size_t total = 0;

	/* First pass: how many points each group gets, to allocate once. */
	for (size_t gi = 0; gi < b->n_groups; gi++) {
		struct balancer_group *g = &b->groups[gi];
		struct balancer_share s;

		balancer_share_of(b, g, &s);
		g->ring_first = total;
		g->ring_count = 0;
		for (size_t k = 0; k < g->count; k++)
			g->ring_count +=
			        balancer_points_of(&s, targets[b->order[g->first + k]].weight);
		total += g->ring_count;
	}
	b->n_ring = total;
	if (total == 0)
		return true;
	b->ring = calloc(total, sizeof(*b->ring));
	if (!b->ring)
		return false;

	/* Second pass: place the points. A point depends only on the instance
	 * name and its replica number, so reordering, adding or removing targets
	 * leaves every other target's points where they were. */
	for (size_t gi = 0; gi < b->n_groups; gi++) {
		const struct balancer_group *g = &b->groups[gi];
		struct balancer_point *p = &b->ring[g->ring_first];
		struct balancer_share s;
		size_t used = 0;

		balancer_share_of(b, g, &s);
		for (size_t k = 0; k < g->count; k++) {
			uint32_t t = b->order[g->first + k];
			const struct config_instance *inst = targets[t].instance;
			const char *name = inst && inst->name ? inst->name : "";
			uint64_t seed = balancer_fnv1a(name, strlen(name));
			uint32_t np = balancer_points_of(&s, targets[t].weight);

			for (uint32_t j = 0; j < np; j++) {
				p[used].hash =
				        balancer_mix64(seed + (uint64_t)(j + 1) * GOLDEN_GAMMA);
				p[used].target = t;
				used++;
			}
		}
		qsort(p, g->ring_count, sizeof(*p), balancer_cmp_point);
	}
	return true;
}

/* By hash; equal hashes (two targets naming one instance) by target index, so
 * the order never depends on qsort's whims. */
static int balancer_cmp_point(const void *pa, const void *pb)
{
	const struct balancer_point *a = pa, *bp = pb;

	if (a->hash != bp->hash)
		return a->hash < bp->hash ? -1 : 1;
	return (a->target > bp->target) - (a->target < bp->target);
}

/* ---------------------------------------------------------------------------
 * Hashing
 * ------------------------------------------------------------------------- */

/* murmur3's 64-bit finaliser: FNV-1a alone leaves the high bits of short keys
 * poorly mixed, and the ring position is compared on all 64 bits. */
static uint64_t balancer_mix64(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return x;
}

static uint64_t balancer_fnv1a(const void *data, size_t len)
{
	const unsigned char *p = data;
	uint64_t h = 0xcbf29ce484222325ull;

	for (size_t i = 0; i < len; i++) {
		h ^= p[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

/* splitmix64: the fallback random source for least_requests. */
static uint64_t balancer_splitmix(void *arg)
{
	uint64_t *state = arg;
	uint64_t z = (*state += GOLDEN_GAMMA);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* ---------------------------------------------------------------------------
 * Picking
 * ------------------------------------------------------------------------- */

int balancer_pick(struct balancer *b, const struct balancer_input *in)
{
	static const struct balancer_input none;
	const struct balancer_group *g;

	if (!b)
		return -1;
	if (!in)
		in = &none;
	g = balancer_group_for(b, in);
	if (!g)
		return -1;
	switch (b->algorithm) {
	case BALANCER_CHASH:
		if (in->hash_key)
			return balancer_pick_chash(b, g, in);
		return balancer_pick_rr(b, g, in);
	case BALANCER_LEAST_REQUESTS:
		return balancer_pick_lr(b, g, in);
	case BALANCER_EWMA:
		if (in->latency_us)
			return balancer_pick_ewma(b, g, in);
		return balancer_pick_lr(b, g, in);
	case BALANCER_LOAD:
		if (in->load)
			return balancer_pick_load(b, g, in);
		return balancer_pick_lr(b, g, in);
	case BALANCER_ROUNDROBIN:
	default:
		return balancer_pick_rr(b, g, in);
	}
}

static bool balancer_candidate(const struct balancer *b, const struct balancer_input *in,
                               uint32_t t)
{
	return b->route->targets[t].weight > 0 && !(in->excluded && in->excluded[t]);
}

/* The highest group with at least one candidate, or NULL. */
static const struct balancer_group *balancer_group_for(const struct balancer *b,
                                                       const struct balancer_input *in)
{
	for (size_t gi = 0; gi < b->n_groups; gi++) {
		const struct balancer_group *g = &b->groups[gi];

		for (size_t k = 0; k < g->count; k++)
			if (balancer_candidate(b, in, b->order[g->first + k]))
				return g;
	}
	return NULL;
}

/*
 * Smooth weighted round-robin (nginx ngx_http_upstream_get_peer): every
 * candidate gains its weight, the richest is picked and pays back the total.
 * The sum of all current values stays 0, so the state cannot drift. From a
 * fresh balancer, with a fixed candidate set of total weight W, the state is
 * back to all zeros after W picks: the sequence repeats with period W and a
 * target of weight w appears exactly w times in any W consecutive picks
 * (4:1 -> a a b a a, 8/2 of any 10). Ties go to the earlier target, which
 * keeps the sequence deterministic across workers.
 */
static int balancer_pick_rr(struct balancer *b, const struct balancer_group *g,
                            const struct balancer_input *in)
{
	int64_t total = 0;
	int best = -1;

	for (size_t k = 0; k < g->count; k++) {
		uint32_t t = b->order[g->first + k];

		if (!balancer_candidate(b, in, t))
			continue;
		b->current[t] += b->route->targets[t].weight;
		total += b->route->targets[t].weight;
		if (best < 0 || b->current[t] > b->current[best])
			best = (int)t;
	}
	if (best >= 0)
		b->current[best] -= total;
	return best;
}

/*
 * First point at or after hash(key), wrapping; then clockwise past points
 * whose target is not a candidate. The group has a candidate, and every
 * candidate (weight > 0) owns at least one point, so the walk ends.
 */
static int balancer_pick_chash(struct balancer *b, const struct balancer_group *g,
                               const struct balancer_input *in)
{
	const struct balancer_point *ring = &b->ring[g->ring_first];
	size_t n = g->ring_count;
	uint64_t h = balancer_mix64(balancer_fnv1a(in->hash_key, in->hash_key_len));
	size_t lo = 0, hi = n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (ring[mid].hash < h)
			lo = mid + 1;
		else
			hi = mid;
	}
	for (size_t k = 0; k < n; k++) {
		const struct balancer_point *p = &ring[(lo + k) % n];

		if (balancer_candidate(b, in, p->target))
			return (int)p->target;
	}
	return -1; /* unreachable: see above */
}

/* One candidate drawn with probability weight / sum, skipping `skip`. */
static int balancer_draw(const struct balancer *b, const struct balancer_group *g,
                         const struct balancer_input *in, uint64_t sum, uint64_t r, int skip)
{
	uint64_t x;
	int last = -1;

	if (sum == 0) /* callers ensure candidates, which have weight > 0 */
		return -1;
	x = r % sum;
	for (size_t k = 0; k < g->count; k++) {
		uint32_t t = b->order[g->first + k];

		if ((int)t == skip || !balancer_candidate(b, in, t))
			continue;
		last = (int)t;
		if (x < b->route->targets[t].weight)
			return (int)t;
		x -= b->route->targets[t].weight;
	}
	return last;
}

static uint64_t balancer_inflight(const struct balancer *b, const struct balancer_input *in, int t)
{
	int v;

	if (!in->inflight)
		return 0;
	v = in->inflight(in->inflight_arg, b->route->targets[t].instance);
	return v > 0 ? (uint64_t)v : 0;
}

/*
 * The two choices: two distinct candidates drawn at random in proportion to
 * their weights. Returns the first; *second is -1 when the group has a single
 * candidate (then no random number is spent).
 */
static int balancer_pair(struct balancer *b, const struct balancer_group *g,
                         const struct balancer_input *in, int *second)
{
	uint64_t (*rnd)(void *) = in->rand ? in->rand : balancer_splitmix;
	void *rnd_arg = in->rand ? in->rand_arg : &b->rng;
	uint64_t sum = 0;
	size_t n = 0;
	int lone = -1;

	*second = -1;
	for (size_t k = 0; k < g->count; k++) {
		uint32_t t = b->order[g->first + k];

		if (balancer_candidate(b, in, t)) {
			sum += b->route->targets[t].weight;
			n++;
			lone = (int)t;
		}
	}
	if (n < 2)
		return lone;
	int first = balancer_draw(b, g, in, sum, rnd(rnd_arg), -1);
	if (first < 0)
		return lone;
	*second =
	        balancer_draw(b, g, in, sum - b->route->targets[first].weight, rnd(rnd_arg), first);
	return first;
}

/*
 * Power of two choices (Mitzenmacher): two weighted-random candidates, the
 * less loaded relative to its weight wins. Comparing (i1+1)/w1 < (i2+1)/w2 as
 * (i1+1)*w2 < (i2+1)*w1 stays exact: both factors fit in 32 bits.
 */
static int balancer_pick_lr(struct balancer *b, const struct balancer_group *g,
                            const struct balancer_input *in)
{
	int second;
	int first = balancer_pair(b, g, in, &second);

	if (second < 0)
		return first;
	uint64_t w1 = b->route->targets[first].weight, w2 = b->route->targets[second].weight;
	uint64_t l1 = (balancer_inflight(b, in, first) + 1) * w2;
	uint64_t l2 = (balancer_inflight(b, in, second) + 1) * w1;

	if (l2 < l1 || (l2 == l1 && w2 > w1))
		return second;
	return first;
}

/* ---------------------------------------------------------------------------
 * Peak-EWMA
 * ------------------------------------------------------------------------- */

/* The lowest latency sample among the group's candidates; 1 when none has one. */
static uint64_t balancer_fastest(const struct balancer *b, const struct balancer_group *g,
                                 const struct balancer_input *in)
{
	uint64_t best = 0;

	for (size_t k = 0; k < g->count; k++) {
		uint32_t t = b->order[g->first + k];
		uint64_t l;

		if (!balancer_candidate(b, in, t))
			continue;
		l = in->latency_us(in->latency_arg, b->route->targets[t].instance);
		if (l != 0 && (best == 0 || l < best))
			best = l;
	}
	return best ? best : 1;
}

/*
 * The cost of a candidate is latency * (inflight + 1) / weight: the time the
 * next request would wait if the instance served its queue one at a time. An
 * instance without a sample borrows the fastest one's latency: assuming it
 * slow would starve it of the very requests that measure it, and assuming it
 * instant would flood it, while the fastest known latency times its own
 * in-flight count lets it fill up like the best instance, no faster.
 *
 * The products overflow 64 bits for extreme values, so the comparison, cross
 * multiplied like least_requests, is in double: 53 bits of precision are far
 * beyond what a latency estimate carries, and equal inputs compare equal.
 */
static int balancer_pick_ewma(struct balancer *b, const struct balancer_group *g,
                              const struct balancer_input *in)
{
	int second;
	int first = balancer_pair(b, g, in, &second);

	if (second < 0)
		return first;
	const struct config_target *targets = b->route->targets;
	uint64_t lat1 = in->latency_us(in->latency_arg, targets[first].instance);
	uint64_t lat2 = in->latency_us(in->latency_arg, targets[second].instance);

	if (lat1 == 0 || lat2 == 0) {
		uint64_t fastest = balancer_fastest(b, g, in);

		if (lat1 == 0)
			lat1 = fastest;
		if (lat2 == 0)
			lat2 = fastest;
	}
	uint64_t w1 = targets[first].weight, w2 = targets[second].weight;
	double c1 = (double)lat1 * (double)(balancer_inflight(b, in, first) + 1) * (double)w2;
	double c2 = (double)lat2 * (double)(balancer_inflight(b, in, second) + 1) * (double)w1;

	if (c2 < c1 || (c2 == c1 && w2 > w1))
		return second;
	return first;
}

/* ---------------------------------------------------------------------------
 * Load
 * ------------------------------------------------------------------------- */

/* The candidate t's score, or false when its load is unknown. The metrics come
 * from another process: anything odd is made harmless here. */
static bool balancer_score_of(const struct balancer *b, const struct balancer_input *in, int t,
                              struct balancer_score *s)
{
	struct balancer_load l = {0};
	double kv;

	if (!in->load(in->load_arg, b->route->targets[t].instance, &l) || isnan(l.waiting))
		return false;
	s->waiting = l.waiting > 0 ? l.waiting : 0; /* +inf stays: saturated, but known */
	kv = l.kv_cache > 0 ? l.kv_cache : 0;       /* NaN, negative: not reported */
	if (kv > 1)
		kv = 1;
	s->kv_step = (uint32_t)(kv / BALANCER_KV_STEP);
	s->inflight = balancer_inflight(b, in, t);
	return true;
}

/*
 * <0 when t1 scores better than t2, 0 when equal. waiting / weight, then the
 * KV step, then inflight / weight; the ratios are cross multiplied. In-flight
 * products are exact (32 bits each factor), waiting ones for whole queues
 * below 2^21 requests (beyond, rounding can only make near-equal queues tie).
 */
static int balancer_cmp_score(const struct balancer *b, int t1, int t2)
{
	const struct balancer_score *s1 = &b->scores[t1], *s2 = &b->scores[t2];
	uint64_t w1 = b->route->targets[t1].weight, w2 = b->route->targets[t2].weight;
	double q1 = s1->waiting * (double)w2, q2 = s2->waiting * (double)w1;
	uint64_t i1 = s1->inflight * w2, i2 = s2->inflight * w1;

	if (q1 != q2)
		return q1 < q2 ? -1 : 1;
	if (s1->kv_step != s2->kv_step)
		return s1->kv_step < s2->kv_step ? -1 : 1;
	return (i1 > i2) - (i1 < i2);
}

/*
 * The best candidate of the group, in one pass that scores every candidate
 * (b->scores, allocated by balancer_new), then smooth weighted round-robin
 * among those that score as well as the best: without it the first of equal
 * instances would take every pick until the next scrape, and with it weights
 * 4:1 give exactly 8/2 of 10 picks while the loads stay equal. When no
 * candidate has a known load the pick is a least_requests one.
 *
 * Picking the best rather than the better of two is what the queue depth is
 * for: a server with requests waiting is one to avoid, not to spread over.
 * The in-flight count, which includes every pick since the last scrape,
 * keeps that choice from sticking to one instance for a whole interval.
 */
static int balancer_pick_load(struct balancer *b, const struct balancer_group *g,
                              const struct balancer_input *in)
{
	int best = -1, ties = 0;

	for (size_t k = 0; k < g->count; k++) {
		uint32_t t = b->order[g->first + k];
		struct balancer_score *s = &b->scores[t];
		int c;

		s->known = balancer_candidate(b, in, t) && balancer_score_of(b, in, (int)t, s);
		if (!s->known)
			continue;
		c = best < 0 ? -1 : balancer_cmp_score(b, (int)t, best);
		if (c < 0) {
			best = (int)t;
			ties = 1;
		} else if (c == 0) {
			ties++;
		}
	}
	if (best < 0)
		return balancer_pick_lr(b, g, in);
	if (ties == 1)
		return best;

	int64_t total = 0;
	int pick = -1;

	for (size_t k = 0; k < g->count; k++) {
		uint32_t t = b->order[g->first + k];

		if (!b->scores[t].known || balancer_cmp_score(b, (int)t, best) != 0)
			continue;
		b->current[t] += b->route->targets[t].weight;
		total += b->route->targets[t].weight;
		if (pick < 0 || b->current[t] > b->current[pick])
			pick = (int)t;
	}
	b->current[pick] -= total;
	return pick;
}
