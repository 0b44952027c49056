/* auth.c — key-auth: hash the presented key, compare it with every key in constant time;
 * a per-thread cache of the keys that matched spares the hash for a key seen before. */
#include "sluice/auth.h"

#include <stdint.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>
#include <openssl/sha.h>

static const char *const default_key_headers[] = {"authorization", "apikey", "x-api-key"};

static bool is_blank(char ch)
{
	return ch == ' ' || ch == '\t';
}

/* The key in one header value: [start, start+len). false when the value holds none. */
static bool key_from_value(const char *header, const char *value, const char **start, size_t *len)
{
	const char *p = value, *e;

	while (is_blank(*p))
		p++;
	if (strcmp(header, "authorization") == 0) {
		/* RFC 6750: "Bearer" then one or more spaces; the scheme is case-insensitive. */
		if (strncasecmp(p, "bearer", 6) != 0 || !is_blank(p[6]))
			return false;
		p += 6;
		while (is_blank(*p))
			p++;
	}
	e = p + strlen(p);
	while (e > p && is_blank(e[-1]))
		e--;
	if (e == p)
		return false;
	*start = p;
	*len = (size_t)(e - p);
	return true;
}

void auth_hash_key(const char *key, size_t len, unsigned char sha256[32], char fingerprint[13])
{
	static const char hex[] = "0123456789abcdef";

	SHA256((const unsigned char *)key, len, sha256);
	for (int i = 0; i < 6; i++) {
		fingerprint[2 * i] = hex[sha256[i] >> 4];
		fingerprint[2 * i + 1] = hex[sha256[i] & 15];
	}
	fingerprint[12] = '\0';
}

/*
 * The cache of keys that matched: per thread (one per worker), direct-mapped by a cheap hash
 * of the key's bytes. An entry holds the key, the snapshot it matched in (pointer and
 * generation: a reload publishes a new generation, so every entry of the old one misses and
 * a key the reload removed goes through the full check, and fails), the consumer and the
 * fingerprint. Only keys that matched are stored, so an unknown key always takes the full
 * path; the entry is compared over its whole fixed size with CRYPTO_memcmp and the length
 * folded in without a branch, so a miss takes the same time whatever the entry holds.
 * Snapshots with generation 0 (never published: tests, tools) are not cached.
 */
#define AUTH_CACHE_SLOTS 64
#define AUTH_CACHE_KEY_MAX 128

struct auth_cache_entry {
	const struct config *config; /* NULL: empty */
	uint64_t generation;
	const struct config_consumer *consumer;
	size_t len;
	unsigned char key[AUTH_CACHE_KEY_MAX]; /* zero past len */
	char fingerprint[13];
};

static _Thread_local struct auth_cache_entry auth_cache[AUTH_CACHE_SLOTS];
static _Thread_local size_t auth_cache_hit_count;

size_t auth_cache_hits(void)
{
	return auth_cache_hit_count;
}

static unsigned cache_slot(const char *key, size_t len)
{
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < len; i++)
		h = (h ^ (unsigned char)key[i]) * 16777619u;
	return (unsigned)((h ^ (h >> 16)) % AUTH_CACHE_SLOTS);
}

/* The consumer KEY matched in C earlier on this thread (and its fingerprint), or NULL. */
static const struct config_consumer *cache_find(const struct config *c, const char *key,
                                                size_t len, unsigned slot, char fp[13])
{
	const struct auth_cache_entry *e = &auth_cache[slot];
	unsigned char probe[AUTH_CACHE_KEY_MAX];

	if (c->generation == 0 || len > AUTH_CACHE_KEY_MAX)
		return NULL;
	/* How much to compare depends on the presented length only: a key of ≤ 64 bytes is
	 * compared over 64 (an entry longer than that differs in length anyway). */
	size_t span = len <= AUTH_CACHE_KEY_MAX / 2 ? AUTH_CACHE_KEY_MAX / 2 : AUTH_CACHE_KEY_MAX;
	memset(probe, 0, span);
	memcpy(probe, key, len);
	/* Both sides zero past their lengths: equal bytes and equal lengths, in one pass; the
	 * entry's snapshot is folded in too, so a miss costs the same whatever the slot holds. */
	int diff = CRYPTO_memcmp(probe, e->key, span) | (int)(e->len != len) |
	           (int)(e->config != c) | (int)(e->generation != c->generation);
	OPENSSL_cleanse(probe, span);
	if (diff != 0)
		return NULL;
	memcpy(fp, e->fingerprint, 13);
	auth_cache_hit_count++;
	return e->consumer;
}

static void cache_store(const struct config *c, const char *key, size_t len, unsigned slot,
                        const struct config_consumer *cons, const char fp[13])
{
	struct auth_cache_entry *e = &auth_cache[slot];

	if (c->generation == 0 || len > AUTH_CACHE_KEY_MAX)
		return;
	OPENSSL_cleanse(e->key, sizeof(e->key));
	memcpy(e->key, key, len);
	e->len = len;
	e->config = c;
	e->generation = c->generation;
	e->consumer = cons;
	memcpy(e->fingerprint, fp, 13);
}

static bool route_allowed(const struct config_consumer *cons, const struct config_route *route)
{
	if (cons->n_routes == 0)
		return true;
	for (size_t i = 0; i < cons->n_routes; i++)
		if (cons->routes[i] == route ||
		    (cons->routes[i] != NULL && strcmp(cons->routes[i]->name, route->name) == 0))
			return true;
	return false;
}

/* The consumer holding KEY (hashed into fp), or NULL. */
static const struct config_consumer *match_key(const struct config *c, const char *key,
                                               size_t len, char fp[13])
{
	unsigned char digest[32];
	const struct config_consumer *found = NULL;

	auth_hash_key(key, len, digest, fp);
	/*
	 * Every key of every consumer is compared, and the match is recorded without a
	 * branch that depends on the secret: the loop's duration tells nothing about which
	 * key matched or how many bytes of it did. The first consumer that matches wins
	 * (the loader refuses a key shared by two consumers).
	 */
	for (size_t i = 0; i < c->n_consumers; i++) {
		const struct config_consumer *cons = &c->consumers[i];
		for (size_t k = 0; k < cons->n_keys; k++) {
			uintptr_t hit =
			        (uintptr_t)(CRYPTO_memcmp(digest, cons->keys[k].sha256, 32) == 0);
			uintptr_t take = (uintptr_t)0 - (hit & (uintptr_t)(found == NULL));
			found = (const struct config_consumer *)(((uintptr_t)cons & take) |
			                                         ((uintptr_t)found & ~take));
		}
	}
	OPENSSL_cleanse(digest, sizeof(digest));
	return found;
}

enum auth_result auth_check(const struct config *c, const struct config_route *route,
                            auth_get_header_fn get_header, void *arg,
                            const struct config_consumer **consumer_out, char fingerprint_out[13])
{
	const char *const *headers = (const char *const *)route->key_headers;
	size_t n_headers = route->n_key_headers;
	const char *key = NULL;
	size_t key_len = 0;
	char fp[13];
	const struct config_consumer *found;

	if (consumer_out != NULL)
		*consumer_out = NULL;
	if (fingerprint_out != NULL)
		fingerprint_out[0] = '\0';
	if (route->auth == ROUTE_AUTH_NONE)
		return AUTH_NONE_REQUIRED;

	if (n_headers == 0) {
		headers = default_key_headers;
		n_headers = sizeof(default_key_headers) / sizeof(default_key_headers[0]);
	}
	for (size_t i = 0; i < n_headers && key == NULL; i++) {
		const char *v = get_header(arg, headers[i]);
		if (v != NULL && !key_from_value(headers[i], v, &key, &key_len))
			key = NULL;
	}
	if (key == NULL)
		return AUTH_MISSING;

	unsigned slot = cache_slot(key, key_len);
	found = cache_find(c, key, key_len, slot, fp);
	if (found == NULL) {
		found = match_key(c, key, key_len, fp);
		if (found != NULL)
			cache_store(c, key, key_len, slot, found, fp);
	}
	if (fingerprint_out != NULL)
		memcpy(fingerprint_out, fp, sizeof(fp));
	if (found == NULL)
		return AUTH_UNKNOWN;
	if (consumer_out != NULL)
		*consumer_out = found;
	if (!route_allowed(found, route))
		return AUTH_FORBIDDEN;
	return AUTH_OK;
}

int auth_http_status(enum auth_result r)
{
	switch (r) {
	case AUTH_MISSING:
	case AUTH_UNKNOWN:
		return 401;
	case AUTH_FORBIDDEN:
		return 403;
	default:
		return 0;
	}
}

const char *auth_error_code(enum auth_result r)
{
	switch (r) {
	case AUTH_MISSING:
		return "missing_api_key";
	case AUTH_UNKNOWN:
		return "invalid_api_key";
	case AUTH_FORBIDDEN:
		return "consumer_not_allowed";
	default:
		return NULL;
	}
}

const char *auth_error_message(enum auth_result r)
{
	switch (r) {
	case AUTH_MISSING:
		return "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.";
	case AUTH_UNKNOWN:
		return "Incorrect API key provided.";
	case AUTH_FORBIDDEN:
		return "This API key is not allowed to use this route.";
	default:
		return NULL;
	}
}
