/* auth.h — key-auth: which consumer presented which key, compared in constant time. */
#ifndef SLUICE_AUTH_H
#define SLUICE_AUTH_H

#include <stdbool.h>
#include <stddef.h>

#include "sluice/config.h"

enum auth_result {
	AUTH_OK,            /* *consumer_out is the consumer */
	AUTH_NONE_REQUIRED, /* route auth: none; *consumer_out is NULL */
	AUTH_MISSING,       /* no key in any of the route's key headers → 401 */
	AUTH_UNKNOWN,       /* a key no consumer holds → 401 */
	AUTH_FORBIDDEN,     /* a valid key whose consumer may not use this route → 403 */
};

/* Reads one request header by lower-case name; NULL when absent. */
typedef const char *(*auth_get_header_fn)(void *arg, const char *name);

/*
 * Authenticate one request on ROUTE.
 *
 * The key is read from route->key_headers in order (default authorization, apikey,
 * x-api-key): "authorization" carries "Bearer <key>" (scheme case-insensitive), any other
 * header carries the raw key; surrounding blanks are ignored and an empty or non-Bearer
 * value counts as absent. The key is hashed with SHA-256 and compared with every key of
 * every consumer with CRYPTO_memcmp, without stopping at a match, so the time taken does
 * not depend on which key (if any) matched.
 *
 * fingerprint_out (may be NULL) gets the presented key's fingerprint — the first 12 hex
 * digits of its SHA-256, the same as config_consumer_key.fingerprint — whenever a key was
 * presented (also for AUTH_UNKNOWN and AUTH_FORBIDDEN), "" otherwise. It is the only form
 * of a key that may be logged. consumer_out (may be NULL) gets the consumer for AUTH_OK and
 * AUTH_FORBIDDEN, NULL otherwise.
 *
 * A key that matched is remembered per thread with the snapshot it matched in (up to 64
 * keys of ≤ 128 bytes, snapshots with a nonzero generation only): the same key on the same
 * snapshot again skips the hash. Unknown keys are never remembered, and a new generation
 * (a reload) misses every entry of the old one.
 */
enum auth_result auth_check(const struct config *c, const struct config_route *route,
                            auth_get_header_fn get_header, void *arg,
                            const struct config_consumer **consumer_out, char fingerprint_out[13]);

/* How many checks on this thread were answered from the cache (for tests). */
size_t auth_cache_hits(void);

/* Status and OpenAI error "code" for a refusal: 401 invalid_api_key / missing_api_key,
 * 403 consumer_not_allowed; 0 and NULL for AUTH_OK and AUTH_NONE_REQUIRED. */
int auth_http_status(enum auth_result r);
const char *auth_error_code(enum auth_result r);
const char *auth_error_message(enum auth_result r);

/* SHA-256 of a key and its fingerprint (first 12 hex digits), as the loader stores them. */
void auth_hash_key(const char *key, size_t len, unsigned char sha256[32], char fingerprint[13]);

#endif
