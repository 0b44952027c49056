/* config.h — the typed, immutable configuration snapshot and its loader. */
#ifndef SLUICE_CONFIG_H
#define SLUICE_CONFIG_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "sluice/log.h"

/*
 * A snapshot is built by config_load() from one YAML file and never changes
 * afterwards. It is shared by every thread; whoever holds a pointer holds a
 * reference (config_ref/config_unref); the last unref frees it.
 *
 * Every reference inside a snapshot (route target -> instance, consumer limit
 * -> instance, consumer allow-list -> route) is resolved to a pointer into the
 * same snapshot. Durations are milliseconds, sizes bytes. Strings are owned by
 * the snapshot. "n_*" counts the array beside it.
 *
 * Defaults live in config.c, in one table, and are documented in
 * docs/configuration.md.
 */

#define CONFIG_MAX_ERRORS 64
/* Limits one instance or one consumer may declare: a request is checked against its
 * consumer's and its instance's, and the quota module tracks 2 x this many counters. */
#define CONFIG_MAX_LIMITS 8

struct config_kv {
	char *name;
	char *value;
};

struct config_listen {
	char *address;   /* as written: "0.0.0.0:8080", "[::1]:8080" */
	char *host;      /* "0.0.0.0", "::1" */
	int port;
	char *tls_cert;  /* NULL: plain TCP */
	char *tls_key;
};

struct config_server {
	struct config_listen *listen;
	size_t n_listen;
	int workers;                 /* "auto" is resolved to the CPU count */
	uint64_t max_body_size;      /* default 16MiB */
	uint64_t max_header_size;    /* default 64KiB */
	uint64_t client_timeout;     /* ms, default 60s */
	uint64_t keepalive_timeout;  /* ms, default 75s */
	int max_connections;         /* default 20000 */
	uint64_t drain_timeout;      /* ms, default 30s */
	bool expose_instance_header; /* default true */
};

struct config_admin {
	char *address; /* default 127.0.0.1:9180; NULL when admin is off */
	char *host;
	int port;
	char *key;     /* NULL when the key is the literal "none" (auth off) */
};

struct config_log {
	enum log_level level; /* default info */
	char *error_log;      /* "stderr" or a path */
	char *access_log;     /* "stdout", a path, or NULL for "off" */
	bool payloads;
};

enum store_type { STORE_MEMORY, STORE_REDIS };
enum store_on_error { STORE_ON_ERROR_ALLOW, STORE_ON_ERROR_DENY };

struct config_store {
	enum store_type type;
	struct {
		char *address; /* default 127.0.0.1:6379 */
		char *host;
		int port;
		char *password; /* NULL: none (also when it expands to "") */
		int db;
		char *prefix;   /* default "sluice:" */
		uint64_t timeout; /* ms, default 100ms */
	} redis;
	enum store_on_error on_error; /* default allow */
};

struct config_alerts {
	char *webhook_url; /* NULL: no webhook */
	uint64_t webhook_timeout; /* ms, default 2s */
	struct config_kv *webhook_headers;
	size_t n_webhook_headers;
};

/* A window: either a fixed number of milliseconds or whole calendar months. */
struct config_window {
	uint64_t ms;     /* 0 when months is set */
	unsigned months; /* "1mo" -> 1 */
};

/* LIMIT_COST counts what the usage costs at the instance's price (docs/quotas.md §4). */
enum limit_strategy {
	LIMIT_TOTAL_TOKENS,
	LIMIT_PROMPT_TOKENS,
	LIMIT_COMPLETION_TOKENS,
	LIMIT_COST,
};
enum limit_type { LIMIT_FIXED, LIMIT_SLIDING };

struct config_instance;
struct instance_state;

/*
 * One limit. Exactly one of tokens/requests is non-zero. On an instance it is
 * that instance's global quota (instance == the owner). On a consumer, instance
 * is NULL for "all instances together".
 */
struct config_limit {
	struct config_instance *instance;
	enum limit_strategy strategy; /* default total_tokens */
	uint64_t tokens;              /* the "limit:" key: tokens, or with strategy cost
	                                 micro-units of the price currency (200 -> 200000000) */
	uint64_t requests;            /* the "requests:" key */
	struct config_window window;
	enum limit_type type;         /* default fixed */
	char *id;                     /* stable name for counters and metrics, built by the loader:
	                                 "instance:<name>:<strategy|requests>:<window>" or
	                                 "consumer:<name>:<instance|*>:<strategy|requests>:<window>",
	                                 window in canonical form (config_format_window: "1h",
	                                 "90s", "1mo"); unique per owner */
};

enum provider {
	PROVIDER_OPENAI,
	PROVIDER_OPENAI_COMPATIBLE,
	PROVIDER_AZURE_OPENAI,
	PROVIDER_DEEPSEEK,
	PROVIDER_OPENROUTER,
	PROVIDER_GEMINI,
	PROVIDER_ANTHROPIC,
};

enum check_type { CHECK_HTTP, CHECK_HTTPS, CHECK_TCP };

struct config_active_check {
	bool enabled;          /* false when checks.active is absent */
	enum check_type type;  /* default: the endpoint's scheme (http, or https for https://) */
	char *http_method;     /* default GET */
	char *http_path;       /* default "/" */
	char *host;            /* host:port to probe; filled with the endpoint's when absent */
	char *http_req_body;   /* NULL: none */
	char **req_headers;    /* "Name: value" lines */
	size_t n_req_headers;
	bool https_verify_certificate; /* default true */
	uint64_t timeout;      /* ms, default 1s; a bare number means seconds */
	int concurrency;       /* default 10 */
	struct {
		uint64_t interval; /* ms, default 1s */
		int *http_statuses; /* default 200, 302 */
		size_t n_http_statuses;
		int successes;     /* default 2 (1..254) */
	} healthy;
	struct {
		uint64_t interval; /* ms, default 1s */
		int *http_statuses; /* default 429 404 500 501 502 503 504 505 */
		size_t n_http_statuses;
		int http_failures; /* default 5 */
		int tcp_failures;  /* default 2 */
		int timeouts;      /* default 3 */
	} unhealthy;
};

struct config_passive_check {
	bool enabled;          /* default true */
	int *http_statuses;    /* default 500 502 503 504 */
	size_t n_http_statuses;
	int http_failures;     /* default 3; 0: these never mark the instance unhealthy */
	int tcp_failures;      /* default 2; 0: idem */
	int timeouts;          /* default 2; 0: idem */
	uint64_t cooldown;     /* ms, default 10s */
};

/* An instance's price per million tokens, in micro-units of any currency (0.40 -> 400000):
 * that is also the price of one token in millionths of a micro-unit. */
struct config_price {
	bool set;              /* false: no price key (cost limits never count this instance) */
	uint64_t input;        /* prompt tokens not read from a cache */
	uint64_t cached_input; /* prompt tokens read from the cache; default: input */
	uint64_t output;       /* completion tokens */
};

struct config_instance {
	char *name;
	size_t index;              /* position in config->instances */
	enum provider provider;
	char *endpoint;            /* full URL; the provider default when absent */
	char *url;                 /* endpoint plus auth.query, ready for libcurl */
	char *responses_endpoint;  /* where the instance serves the Responses API; NULL: the
	                              provider's default when on its default endpoint
	                              (provider_upstream_proto), else nowhere */
	char *responses_url;       /* responses_endpoint plus auth.query; NULL without it */
	char *model;               /* NULL: keep the client's model */
	json_t *options;           /* object merged into the body (instance wins); NULL: none */
	struct config_kv *auth_headers;
	size_t n_auth_headers;
	struct config_kv *auth_query;
	size_t n_auth_query;
	struct {
		uint64_t connect;    /* default 5s */
		uint64_t first_byte; /* default 60s */
		uint64_t idle;       /* default 60s */
		uint64_t total;      /* default 10m */
	} timeouts;
	bool tls_verify;           /* default true */
	struct {
		int pool;              /* default 30 */
		uint64_t idle;         /* ms, default 60s */
	} keepalive;
	struct config_limit *limits;
	size_t n_limits;
	unsigned max_reservation;  /* default 32768: completion tokens one attempt may reserve */
	struct config_price price;
	struct config_active_check active;
	struct config_passive_check passive;
	/* Runtime state kept across reloads by name (health, in-flight): attached by
	 * the main thread (health_state) before the snapshot is published; the
	 * snapshot never owns it. */
	struct instance_state *state;
	struct {
		char *metrics_url;     /* NULL: not configured */
		uint64_t interval;     /* ms, default 250ms */
	} load;
};

struct config_consumer_key {
	unsigned char sha256[32]; /* plain keys are hashed at load; sha256:HEX kept as given */
	char fingerprint[13];     /* first 12 hex chars of sha256: safe to log */
};

struct config_route;
struct mcp_conf;
struct mcp_route_conf;
struct mcp_consumer_conf;

struct config_consumer {
	char *name;
	size_t index;
	struct config_consumer_key *keys;
	size_t n_keys;
	struct config_route **routes; /* allow-list; n_routes == 0 means every route */
	size_t n_routes;
	struct config_limit *limits;
	size_t n_limits;
	int max_concurrent;   /* 0: no cap */
	int rejected_code;    /* default 429 */
	char *rejected_msg;   /* NULL: a generic message */
	struct mcp_consumer_conf *mcp; /* mcp_tools (include/sluice/mcp.h); never NULL once loaded */
};

enum route_auth { ROUTE_AUTH_NONE, ROUTE_AUTH_KEY };
enum route_type { ROUTE_TYPE_LLM, ROUTE_TYPE_MCP }; /* `type:` llm (default) | mcp */
enum balancer_algorithm {
	BALANCER_ROUNDROBIN,
	BALANCER_CHASH,
	BALANCER_LEAST_REQUESTS,
	BALANCER_EWMA,
	BALANCER_LOAD,
};
enum hash_on { HASH_ON_CONSUMER, HASH_ON_HEADER, HASH_ON_CLIENT_IP };

/* Bits of config_route.fallback.on; bit i is named config_fallback_trigger_name(1u << i). */
enum fallback_trigger {
	FALLBACK_UNHEALTHY = 1u << 0,
	FALLBACK_QUOTA = 1u << 1,
	FALLBACK_HTTP_429 = 1u << 2,
	FALLBACK_HTTP_5XX = 1u << 3,
	FALLBACK_TIMEOUT = 1u << 4,
	FALLBACK_CONNECT_ERROR = 1u << 5,
};
#define FALLBACK_ALL 0x3fu /* every trigger above: the default */

struct config_target {
	struct config_instance *instance;
	int priority;     /* default 0; higher is preferred */
	unsigned weight;  /* default 100; 0 = drained */
	char *model;      /* the upstream model for this target; NULL: the instance's model */
};

struct policy_def;

/* One plugin entry of a route, in configured order: the policy that runs it (policy.h) and the
 * state its conf_parse compiled from the entry's mapping (regexes JIT-compiled, defaults
 * filled), immutable and shared by every thread; freed with the snapshot by
 * def->conf_free. */
struct config_plugin {
	char *name;                   /* in metrics and logs: the policy's name (prompt_guard, ...),
	                                 for an external plugin the plugin's own */
	const struct policy_def *def; /* src/policy/: never NULL */
	void *conf;                   /* what def's functions receive as conf; never NULL */
	unsigned phases;              /* policy_phase_bits this entry runs in */
};

struct config_route {
	char *name;
	size_t index;
	enum route_type type;       /* mcp routes have `mcp` and no targets, models or plugins */
	struct mcp_route_conf *mcp; /* type mcp only (include/sluice/mcp.h) */
	char **paths;         /* each starts with "/"; no query */
	size_t n_paths;
	char **models;        /* empty: any model. For one path, a route listing the requested
	                         model wins over a route with no models (the loader refuses two
	                         routes that could both claim a path and model) */
	size_t n_models;
	enum route_auth auth; /* default key-auth when consumers exist, else none */
	char **key_headers;   /* lower-case; default authorization, apikey, x-api-key */
	size_t n_key_headers;
	struct {
		enum balancer_algorithm algorithm; /* default roundrobin */
		enum hash_on hash_on;              /* default consumer */
		char *key;                         /* header name for hash_on: header */
	} balancer;
	struct {
		unsigned on;        /* fallback_trigger bits; default all */
		int *http_statuses;
		size_t n_http_statuses;
		int max_attempts;   /* default 3 */
	} fallback;
	struct config_target *targets; /* sorted by priority, highest first (stable) */
	size_t n_targets;
	struct config_plugin *plugins;
	size_t n_plugins;
	unsigned plugin_phases; /* OR of the plugins' phases: 0 when the route has none */
};

struct config {
	atomic_int refs;
	char *path;
	char sha256_hex[65];   /* of the file's bytes */
	uint64_t generation;   /* set by whoever publishes the snapshot */
	struct config_server server;
	struct config_admin admin;
	struct config_log log;
	struct config_store store;
	struct config_alerts alerts;
	struct config_instance *instances;
	size_t n_instances;
	struct config_consumer *consumers;
	size_t n_consumers;
	struct config_route *routes;
	size_t n_routes;
	struct mcp_conf *mcp; /* mcp_servers (include/sluice/mcp.h); never NULL once loaded */
};

/* Errors collected by the loader: each is one line,
 * "FILE:LINE:COLUMN: KEY.PATH: message" (key path like routes[0].targets[1].weight). */
struct config_errors {
	char *msgs[CONFIG_MAX_ERRORS];
	size_t n;
	size_t dropped; /* errors past CONFIG_MAX_ERRORS */
};

/* Load and validate FILE. Returns a snapshot with refs == 1, or NULL with every
 * error in *errs (the caller frees them with config_errors_free). *errs is
 * (re)initialised by the call and is empty on success; errs may be NULL.
 * Errors come sorted by line and column. */
struct config *config_load(const char *path, struct config_errors *errs);
/* Same from a string; name is used in error messages in place of the file. */
struct config *config_load_string(const char *yaml, size_t len, const char *name,
                                  struct config_errors *errs);
void config_errors_free(struct config_errors *errs);

struct config *config_ref(struct config *c);
void config_unref(struct config *c);

/* Value parsers, public for the unit tests and the admin API. */
/* All three accept "DIGITS[.DIGITS]UNIT" with no sign or spaces; a fraction only where the
 * result is whole ("1.5s" yes, "0.0001s" no); results above INT64_MAX are refused. Zero is
 * accepted by the duration and size parsers (each key decides whether it means anything),
 * never by the window parser. */
bool config_parse_duration(const char *s, uint64_t *ms);        /* "250ms" "30s" "5m" "1h" "1d" "1w"; bare number = seconds */
bool config_parse_window(const char *s, struct config_window *w); /* durations plus "1mo".."120mo" (whole calendar months) */
bool config_parse_size(const char *s, uint64_t *bytes);          /* "512", "512B", "512KiB", "16MiB", "1GiB", "1TiB", also KB/MB/GB/TB as powers of 1000 */

const char *config_provider_name(enum provider p);
const char *config_strategy_name(enum limit_strategy s);
const char *config_limit_type_name(enum limit_type t);
const char *config_balancer_name(enum balancer_algorithm a);
const char *config_hash_on_name(enum hash_on h);
const char *config_check_type_name(enum check_type t);
const char *config_fallback_trigger_name(enum fallback_trigger t); /* one bit; NULL otherwise */

/* Canonical text of a duration / window: the largest unit that divides it exactly
 * ("3600000" ms -> "1h", 1500 -> "1500ms", months -> "3mo"). Returns what snprintf does. */
size_t config_format_duration(uint64_t ms, char *buf, size_t len);
size_t config_format_window(const struct config_window *w, char *buf, size_t len);

/* Lookups by name; NULL when absent. */
struct config_instance *config_find_instance(const struct config *c, const char *name);
struct config_consumer *config_find_consumer(const struct config *c, const char *name);
struct config_route *config_find_route(const struct config *c, const char *name);

#endif
