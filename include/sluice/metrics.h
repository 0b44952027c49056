/* metrics.h — Prometheus metrics: per-worker shards written lock-free, summed at scrape time. */
#ifndef SLUICE_METRICS_H
#define SLUICE_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

struct evbuffer;
struct request_record;
struct record_policy;

/*
 * Threads. Each worker owns one shard and is its only writer: recording a
 * request takes no lock and touches no cache line another worker writes.
 * The scrape (main thread) reads every shard with relaxed atomic loads and sums
 * them. A shard is a small hash table keyed by the label tuple; a series is
 * allocated the first time its tuple is seen and lives until metrics_free(),
 * so series of instances removed by a reload keep their last values (counters
 * never go backwards).
 *
 * Label values come only from configuration names (route, instance, consumer,
 * limit id) and fixed sets (status code, attempt outcome, token kind): never
 * from client input, so cardinality is bounded by the configuration.
 * An absent value (no route matched, no consumer) is the empty string.
 */

struct metrics_shard;

/* Main thread, once, before the workers start. n_workers >= 1. */
void metrics_init(int n_workers);
/* The shard of worker_id (0..n_workers-1); NULL when out of range or before
 * metrics_init (metrics_record_request ignores a NULL shard). */
struct metrics_shard *metrics_shard(int worker_id);

/* Worker, once per finished request, after the access log line. */
void metrics_record_request(struct metrics_shard *s, const struct request_record *r);
/* sluice_policy_actions_total for decisions made outside a model request (MCP tools/call);
 * metrics_record_request counts a model request's own. */
void metrics_record_policies(struct metrics_shard *s, const char *route,
                             const struct record_policy *p, int n);

/* Worker, once per MCP message (src/mcp/mcp_log.c): sluice_mcp_requests_total{route,server,
 * method,tool,outcome} and sluice_mcp_request_duration_seconds{route,server,method}. Every
 * label is a configured name or from a bounded set (the caller guarantees it). */
void metrics_record_mcp(struct metrics_shard *s, const char *route, const char *server,
                        const char *method, const char *tool, const char *outcome,
                        uint64_t duration_us);

/* Rare events, from any thread (a mutex inside). */
void metrics_health_transition(const char *instance, bool healthy);
/* Same, with the reason kept for the status page's list of recent transitions
 * (reason may be NULL). metrics_health_transition(i, h) == metrics_health_event(i, h, NULL). */
void metrics_health_event(const char *instance, bool healthy, const char *reason);
void metrics_reload(bool ok);
void metrics_store_error(const char *store); /* "redis", "memory" */

/* The last health transitions, newest first (at most 64):
 * [{"instance":"a","healthy":false,"reason":"...","time":"2024-05-01T12:00:00.000Z"}].
 * The caller owns the result. */
json_t *metrics_recent_transitions(void);

/* Gauges owned by other modules (instance health and in-flight, open
 * connections), asked for at scrape time on the main thread. fn appends
 * complete exposition lines, HELP and TYPE included; metrics_write_family and
 * metrics_write_sample below produce them with correct escaping. */
typedef void (*metrics_gauge_fn)(void *arg, struct evbuffer *out);
void metrics_add_gauge_source(metrics_gauge_fn fn, void *arg);
void metrics_remove_gauge_source(metrics_gauge_fn fn, void *arg);

/* "# HELP name help\n# TYPE name type\n" (help escaped). */
void metrics_write_family(struct evbuffer *out, const char *name, const char *type,
                          const char *help);
/* "name{l1="v1",l2="v2"} value\n". labels: name, value pairs ended by NULL
 * (or labels == NULL for none); values escaped. */
void metrics_write_sample(struct evbuffer *out, const char *name, const char *const *labels,
                          double value);

/* The gauges server.c's gauge source provides, written here so that their
 * names match docs/operations.md, the alert rules and the dashboard:
 *   sluice_upstream_healthy{upstream="<instance>"}   1 healthy, 0 unhealthy
 *   sluice_upstream_inflight{upstream="<instance>"}  requests in flight to it
 *   sluice_open_connections                          client connections, all workers */
struct metrics_upstream_state {
	const char *name; /* the instance's name in the configuration */
	bool healthy;
	unsigned long long inflight;
};
void metrics_write_upstreams(struct evbuffer *out, const struct metrics_upstream_state *v,
                             size_t n);
void metrics_write_connections(struct evbuffer *out, unsigned long long open,
                               unsigned long long accept_errors);

/* Everything, in the Prometheus text format 0.0.4 (Content-Type
 * "text/plain; version=0.0.4; charset=utf-8"). Main thread. */
void metrics_render(struct evbuffer *out);

/* At exit, after the workers stopped. */
void metrics_free(void);

#endif
