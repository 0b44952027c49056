/* auth.c — key-auth: hash the presented key, compare it with every key in constant time. */
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

enum auth_result auth_check(const struct config *c, const struct config_route *route,
                            auth_get_header_fn get_header, void *arg,
                            const struct config_consumer **consumer_out, char fingerprint_out[13])
{
	const char *const *headers = (const char *const *)route->key_headers;
	size_t n_headers = route->n_key_headers;
	const char *key = NULL;
	size_t key_len = 0;
	unsigned char digest[32];
	char fp[13];
	const struct config_consumer *found = NULL;

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

	auth_hash_key(key, key_len, digest, fp);
	if (fingerprint_out != NULL)
		memcpy(fingerprint_out, fp, sizeof(fp));

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
