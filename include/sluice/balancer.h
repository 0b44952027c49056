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
 *  ewma, load      Not implemented yet: they behave as least_requests.
 *
 * A balancer belongs to one worker and one route: it is not thread-safe and
 * takes no locks. It borrows the route, which must outlive it (the caller
 * holds the configuration snapshot). Everything is allocated by
 * balancer_new; balancer_pick allocates nothing and costs O(targets) for
 * roundrobin and least_requests, O(log points) plus the group scan for chash.
 */

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
	/* least_requests: current in-flight requests of an instance. NULL: 0 for
	 * all, which makes the pick a weighted random one. */
	int (*inflight)(void *arg, const struct config_instance *in);
	void *inflight_arg;
	/* One flag per index of route->targets: true = not a candidate for this
	 * pick (already tried, unhealthy, out of quota, cooling down). NULL: none. */
	const bool *excluded;
};

/* Index into route->targets of the target to try next, or -1 when none is left.
 * The highest priority group that still has a candidate (weight > 0 and not
 * excluded) is used; a lower group only when every target above is excluded
 * or drained. in may be NULL (no key, no exclusions). */
int balancer_pick(struct balancer *b, const struct balancer_input *in);

/* The route's algorithm as actually run (ewma and load report least_requests). */
enum balancer_algorithm balancer_algorithm(const struct balancer *b);

#endif
