/* balancer.h — choose the instance for each attempt: priority groups, then weights in a group. */
#ifndef SLUICE_BALANCER_H
#define SLUICE_BALANCER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sluice/config.h"

/*
 * A route's targets fall into priority groups (equal `priority`, highest
 * first). Every pick uses the highest group that still has a candidate: a
 * target with weight > 0 that the caller has not excluded for this pick. A
 * lower group is reached only when every target above it is excluded or
 * drained (weight 0). Drained targets are never picked.
 *
 * Within the group, route->balancer.algorithm decides:
 *
 *  roundrobin      Smooth weighted round-robin (nginx's current/effective
 *                  weights). Deterministic: from a fresh balancer, weights
 *                  4:1 give exactly 8/2 of any 10 consecutive picks, and a
 *                  heavy target is spread out (5:1:1 -> a a b a c a a).
 *                  Only the candidates of a pick take part in it: an
 *                  excluded target neither gains nor loses weight that round.
 *  chash           Consistent hashing of balancer_input.hash_key on a ring of
 *                  virtual nodes per group, placed by hashing the instance
 *                  name (not its position), so the ring survives reloads that
 *                  keep the name. The target with the smallest positive
 *                  weight of a group gets 160 points, the others
 *                  proportionally more (within a bound, see balancer.c). A
 *                  key goes to the first point clockwise of its hash whose
 *                  target is a candidate: it moves only while its target is
 *                  excluded and returns to it once it is included again.
 *                  Without a key (NULL) the pick is a roundrobin one.
 *  least_requests  Power of two choices: two distinct candidates drawn at
 *                  random in proportion to their weights; the one with the
 *                  lower (inflight + 1) / weight wins (the heavier one on a
 *                  tie, then the first drawn). A lone candidate is taken.
 *  ewma            Peak-EWMA cost (the idea of Finagle's and Linkerd's
 *                  balancers): power of two choices as least_requests, but
 *                  the cost is latency * (inflight + 1) / weight, latency
 *                  being balancer_input.latency_us. A candidate with no
 *                  sample yet (0) is given the lowest latency among the
 *                  group's candidates (1 when none has a sample): a new
 *                  instance gets traffic at once, yet its own in-flight count
 *                  still holds it back. Without latency_us: least_requests.
 *  load            The model servers' own load (balancer_input.load): the
 *                  best candidate of the whole group by, in this order,
 *                  queue depth (waiting / weight), KV-cache use (in steps of
 *                  BALANCER_KV_STEP, not divided by weight: it already is a
 *                  fraction of the instance's own capacity), then in-flight
 *                  requests (inflight / weight). Metrics are scraped, so they
 *                  lag: the coarse KV step lets the live in-flight count
 *                  spread traffic between instances whose KV use differs by
 *                  a scrape's noise. Candidates still equal share the picks
 *                  by smooth weighted round-robin (as roundrobin, among them
 *                  only). A candidate whose load is unknown (load returns
 *                  false: never scraped, failed, stale) counts as saturated:
 *                  it is picked only when no candidate of the group has a
 *                  known load, and then by least_requests among them. running
 *                  is not scored (in-flight is the live measure of it).
 *                  Without load: least_requests.
 *
 * A balancer belongs to one worker and one route: it is not thread-safe and
 * takes no locks. It borrows the route, which must outlive it (the caller
 * holds the configuration snapshot). Everything is allocated by
 * balancer_new; balancer_pick allocates nothing and costs O(targets) for
 * roundrobin, least_requests, ewma and load, O(log points) plus the group
 * scan for chash. Per pick, ewma calls latency_us twice (plus once per
 * candidate of the group when a drawn one has no sample); load calls load and
 * inflight once per candidate of the group.
 */

/* KV-cache use is compared in steps of this size (1/20: 5 points). */
#define BALANCER_KV_STEP 0.05

/* One instance's load as its model server reports it (vLLM metric names). */
struct balancer_load {
	double waiting;  /* requests queued (vllm:num_requests_waiting); NaN: unknown */
	double running;  /* requests being served (vllm:num_requests_running); not scored */
	double kv_cache; /* KV-cache use, 0..1 (above 1 counts as 1); < 0 or NaN: not
	                    reported, counts as 0 */
};

struct balancer;

/* Returns NULL (logged) when out of memory or when the route has more targets
 * than an int can index. A route without targets is fine: every pick is -1. */
struct balancer *balancer_new(const struct config_route *route);
void balancer_free(struct balancer *b); /* NULL is fine */

struct balancer_input {
	/* chash: consumer name, header value or client address; NULL: roundrobin */
	const char *hash_key;
	size_t hash_key_len;
	/* least_requests: random source for the two choices. NULL: the balancer's
	 * own generator (seeded in balancer_new, deterministic). */
	uint64_t (*rand)(void *arg);
	void *rand_arg;
	/* least_requests, ewma, load: current in-flight requests of an instance.
	 * NULL: 0 for all, which makes a least_requests pick a weighted random one. */
	int (*inflight)(void *arg, const struct config_instance *in);
	void *inflight_arg;
	/* ewma: the instance's latency, exponentially weighted, in microseconds;
	 * 0: no sample yet. Best peak-sensitive (a slower sample counts at once, a
	 * faster one only gradually). NULL: ewma picks as least_requests. */
	uint64_t (*latency_us)(void *arg, const struct config_instance *in);
	void *latency_arg;
	/* load: fill *out and return true, or return false when the instance's load
	 * is unknown or stale (it then counts as saturated). NULL: load picks as
	 * least_requests. */
	bool (*load)(void *arg, const struct config_instance *in, struct balancer_load *out);
	void *load_arg;
	/* One flag per index of route->targets: true = not a candidate for this
	 * pick (already tried, unhealthy, out of quota, cooling down). NULL: none. */
	const bool *excluded;
};

/* Index into route->targets of the target to try next, or -1 when none is left.
 * The highest priority group that still has a candidate (weight > 0 and not
 * excluded) is used; a lower group only when every target above is excluded
 * or drained. in may be NULL (no key, no exclusions). */
int balancer_pick(struct balancer *b, const struct balancer_input *in);

/* The route's algorithm as run (an unknown value runs, and reports, least_requests). */
enum balancer_algorithm balancer_algorithm(const struct balancer *b);

#endif
