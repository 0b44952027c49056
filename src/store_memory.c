/* store_memory.c — the process-wide memory counter store: 64 shards, no global lock. */
#include "store.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define MEM_SHARDS            64 /* a power of two */
#define MEM_INITIAL_BUCKETS   64 /* per shard, a power of two */
#define MEM_SWEEP_INTERVAL_MS 1000

struct mem_entry {
	struct mem_entry *next;
	uint64_t hash;
	uint64_t start;
	uint64_t expire_at;
	uint64_t value;
	size_t len;
	char series[]; /* len bytes, not terminated */
};

/* Aligned so that two shards' locks never share a cache line. */
struct mem_shard {
	pthread_mutex_t lock;
	struct mem_entry **buckets;
	size_t n_buckets;
	size_t n_entries;
	uint64_t next_sweep;
} __attribute__((aligned(64)));

static struct mem_shard shards[MEM_SHARDS];
static pthread_once_t shards_once = PTHREAD_ONCE_INIT;

static void shards_init(void)
{
	for (size_t i = 0; i < MEM_SHARDS; i++) {
		pthread_mutex_init(&shards[i].lock, NULL);
		shards[i].buckets = NULL;
		shards[i].n_buckets = 0;
	}
}

uint64_t store_hash(const char *s, size_t len)
{
	/* Eight bytes a step (multiply and fold), FNV-1a over the tail, then a final mix so
	 * that the high bits (the shard) depend on every byte. Only this process uses it. */
	uint64_t h = 1469598103934665603ull ^ len;
	size_t i = 0;
	for (; len - i >= 8; i += 8) {
		uint64_t w;
		memcpy(&w, s + i, 8);
		h = (h ^ w) * 0x9e3779b97f4a7c15ull;
		h ^= h >> 29;
	}
	for (; i < len; i++) {
		h ^= (unsigned char)s[i];
		h *= 1099511628211ull;
	}
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdull;
	h ^= h >> 33;
	return h;
}

uint64_t store_weighted(uint64_t cur, uint64_t prev, uint32_t weight)
{
	uint64_t w;

	if (weight == 0 || prev == 0)
		return cur;
	w = (uint64_t)((unsigned __int128)prev * weight / 1000000u);
	return cur > UINT64_MAX - w ? UINT64_MAX : cur + w;
}

static size_t shard_of(uint64_t hash)
{
	return (size_t)(hash >> 58) & (MEM_SHARDS - 1);
}

static size_t bucket_of(const struct mem_shard *sh, uint64_t hash, uint64_t start)
{
	uint64_t h = hash ^ (start * 0x9e3779b97f4a7c15ull);
	return (size_t)(h ^ (h >> 29)) & (sh->n_buckets - 1);
}

static struct mem_entry *find(struct mem_shard *sh, const char *series, size_t len, uint64_t hash,
                              uint64_t start)
{
	if (sh->n_buckets == 0)
		return NULL;
	for (struct mem_entry *e = sh->buckets[bucket_of(sh, hash, start)]; e != NULL; e = e->next)
		if (e->hash == hash && e->start == start && e->len == len &&
		    memcmp(e->series, series, len) == 0)
			return e;
	return NULL;
}

/* Drops expired entries once a second per shard: the table holds a few buckets per
 * (limit, consumer), so a full pass under the shard's lock is short. */
static void sweep(struct mem_shard *sh, uint64_t now)
{
	if (now < sh->next_sweep)
		return;
	sh->next_sweep = now + MEM_SWEEP_INTERVAL_MS;
	for (size_t b = 0; b < sh->n_buckets; b++) {
		struct mem_entry **pp = &sh->buckets[b];
		while (*pp != NULL) {
			struct mem_entry *e = *pp;
			if (e->expire_at <= now) {
				*pp = e->next;
				free(e);
				sh->n_entries--;
			} else {
				pp = &e->next;
			}
		}
	}
}

static bool grow(struct mem_shard *sh)
{
	size_t n = sh->n_buckets ? sh->n_buckets * 2 : MEM_INITIAL_BUCKETS;
	struct mem_entry **nb = calloc(n, sizeof(*nb));
	struct mem_entry **old = sh->buckets;
	size_t old_n = sh->n_buckets;

	if (nb == NULL)
		return false;
	sh->buckets = nb;
	sh->n_buckets = n;
	for (size_t b = 0; b < old_n; b++) {
		struct mem_entry *e = old[b], *next;
		for (; e != NULL; e = next) {
			size_t i = bucket_of(sh, e->hash, e->start);
			next = e->next;
			e->next = nb[i];
			nb[i] = e;
		}
	}
	free(old);
	return true;
}

static struct mem_entry *find_or_add(struct mem_shard *sh, const struct mem_counter *c)
{
	struct mem_entry *e = find(sh, c->series, c->len, c->hash, c->start);
	size_t i;

	if (e != NULL) {
		if (e->expire_at < c->expire_at)
			e->expire_at = c->expire_at;
		return e;
	}
	if (sh->n_entries >= sh->n_buckets && !grow(sh) && sh->n_buckets == 0)
		return NULL;
	e = malloc(sizeof(*e) + c->len);
	if (e == NULL)
		return NULL;
	e->hash = c->hash;
	e->start = c->start;
	e->expire_at = c->expire_at;
	e->value = 0;
	e->len = c->len;
	memcpy(e->series, c->series, c->len);
	i = bucket_of(sh, c->hash, c->start);
	e->next = sh->buckets[i];
	sh->buckets[i] = e;
	sh->n_entries++;
	return e;
}

static uint64_t value_of(struct mem_shard *sh, const char *series, size_t len, uint64_t hash,
                         uint64_t start, uint64_t now)
{
	struct mem_entry *e = find(sh, series, len, hash, start);
	return e != NULL && e->expire_at > now ? e->value : 0;
}

/* The distinct shards of cs[0..n), ascending: the lock order. Returns their count. */
static size_t lock_set(const struct mem_counter *cs, size_t n, size_t *out)
{
	bool seen[MEM_SHARDS] = {false};
	size_t k = 0;

	for (size_t i = 0; i < n; i++)
		seen[shard_of(cs[i].hash)] = true;
	for (size_t s = 0; s < MEM_SHARDS; s++)
		if (seen[s])
			out[k++] = s;
	return k;
}

static void read_locked(struct mem_counter *c, uint64_t now)
{
	struct mem_shard *sh = &shards[shard_of(c->hash)];

	c->cur = value_of(sh, c->series, c->len, c->hash, c->start, now);
	c->prev = c->prev_weight > 0 ? value_of(sh, c->series, c->len, c->hash, c->prev_start, now)
	                             : 0;
}

bool store_memory_admit(struct mem_counter *cs, size_t n, uint64_t now)
{
	size_t order[MEM_SHARDS], k;
	bool ok = true;

	pthread_once(&shards_once, shards_init);
	k = lock_set(cs, n, order);
	for (size_t i = 0; i < k; i++) {
		pthread_mutex_lock(&shards[order[i]].lock);
		sweep(&shards[order[i]], now);
	}

	for (size_t i = 0; i < n; i++) {
		read_locked(&cs[i], now);
		if (store_weighted(cs[i].cur, cs[i].prev, cs[i].prev_weight) >= cs[i].limit)
			ok = false;
	}
	if (ok) {
		for (size_t i = 0; i < n; i++) {
			struct mem_entry *e = find_or_add(&shards[shard_of(cs[i].hash)], &cs[i]);
			/* Out of memory: admit without counting rather than refuse everyone. */
			if (e != NULL)
				e->value = e->value > UINT64_MAX - cs[i].amount
				                   ? UINT64_MAX
				                   : e->value + cs[i].amount;
		}
	}

	for (size_t i = k; i > 0; i--)
		pthread_mutex_unlock(&shards[order[i - 1]].lock);
	return ok;
}

void store_memory_adjust(const char *series, size_t len, uint64_t hash, uint64_t start,
                         int64_t delta, uint64_t now)
{
	struct mem_shard *sh;
	struct mem_entry *e;

	if (delta == 0)
		return;
	pthread_once(&shards_once, shards_init);
	sh = &shards[shard_of(hash)];
	pthread_mutex_lock(&sh->lock);
	e = find(sh, series, len, hash, start);
	/* A bucket that expired meanwhile is left alone: its window no longer counts. */
	if (e != NULL && e->expire_at > now) {
		if (delta < 0 && (uint64_t)(-(delta + 1)) + 1 >= e->value)
			e->value = 0;
		else if (delta > 0 && e->value > UINT64_MAX - (uint64_t)delta)
			e->value = UINT64_MAX;
		else
			e->value += (uint64_t)delta; /* modular: adds |delta| or subtracts it */
	}
	pthread_mutex_unlock(&sh->lock);
}

void store_memory_read(struct mem_counter *cs, size_t n, uint64_t now)
{
	size_t order[MEM_SHARDS], k;

	pthread_once(&shards_once, shards_init);
	k = lock_set(cs, n, order);
	for (size_t i = 0; i < k; i++)
		pthread_mutex_lock(&shards[order[i]].lock);
	for (size_t i = 0; i < n; i++)
		read_locked(&cs[i], now);
	for (size_t i = k; i > 0; i--)
		pthread_mutex_unlock(&shards[order[i - 1]].lock);
}

void store_memory_free(void)
{
	pthread_once(&shards_once, shards_init);
	for (size_t s = 0; s < MEM_SHARDS; s++) {
		struct mem_shard *sh = &shards[s];
		pthread_mutex_lock(&sh->lock);
		for (size_t b = 0; b < sh->n_buckets; b++) {
			struct mem_entry *e = sh->buckets[b], *next;
			for (; e != NULL; e = next) {
				next = e->next;
				free(e);
			}
		}
		free(sh->buckets);
		sh->buckets = NULL;
		sh->n_buckets = 0;
		sh->n_entries = 0;
		sh->next_sweep = 0;
		pthread_mutex_unlock(&sh->lock);
	}
}
