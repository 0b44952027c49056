/* health.h — per-instance health: active probes, passive observation, half-open trials, load. */
#ifndef SLUICE_HEALTH_H
#define SLUICE_HEALTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sluice/config.h"

struct event_base;

/*
 * Threads. Workers call health_admit/report/retry_after/inflight/observe_latency
 * for every request; the main thread runs the checker (probes, load scrapes) on
 * its own event_base. What a worker reads per request is atomic; the hysteresis
 * counters sit behind a per-instance mutex that only failures (and the first OK
 * after a failure) take. There is no global lock on the request path.
 *
 * Lifetime. A state is created on first lookup by name and lives until
 * health_registry_free (process exit), so it survives every reload that keeps
 * the instance's name. Pointers to it may be cached freely.
 */
struct instance_state;

/* Process-wide registry. init before anything else here; free only at exit,
 * after the checker and every worker are gone. */
void health_registry_init(void);
void health_registry_free(void);

/* Get or create the state of the instance called name; never NULL (aborts
 * only on out-of-memory). Lock-free when the state exists. */
struct instance_state *health_state(const char *name);
/* Lookup only: NULL when no state of that name exists. Lock-free. */
struct instance_state *health_state_find(const char *name);
const char *health_state_name(const struct instance_state *st);

/* Transition hook for the metrics module: set once at start, before workers
 * run. Called on whichever thread made the transition, with the instance's
 * per-instance lock held (so calls for one instance arrive in order): it must
 * not call back into this module for the same instance. */
typedef void (*health_transition_fn)(const char *instance, bool healthy, const char *reason,
                                     void *arg);
void health_set_transition_hook(health_transition_fn fn, void *arg);

/* ---------------------------------------------------------------- main thread: checker */

/*
 * The checker owns the active probes and load scrapers of the instances of
 * the last synced snapshot; it keeps its own copies of their settings, so the
 * snapshot may be freed after the sync.
 *
 * health_checker_sync: at start and after each successful reload, BEFORE the
 * snapshot is published to the workers (alerts_configure first, so that
 * transitions found by the first probes can be posted). It creates the state
 * of every instance of c, starts probes at once for instances with
 * checks.active (a changed probe config restarts the probe and its counters,
 * an unchanged one keeps its schedule), and stops the probes and scrapers of
 * instances that are gone or no longer configured for them.
 */
struct health_checker;
struct health_checker *health_checker_new(struct event_base *main_base);
void health_checker_sync(struct health_checker *hc, const struct config *c);
/* Cancels everything in flight. Before event_base_free(main_base). */
void health_checker_free(struct health_checker *hc);
/* Is an active probe configured for the instance? (admin API, tests) */
bool health_checker_probing(const struct health_checker *hc, const char *instance);

/* Probes another module runs itself (the MCP gateway's ping checks, src/mcp/mcp_probe.c),
 * on the main thread: one result into st's active streak, judged by check's thresholds
 * (healthy.successes, unhealthy.http_failures / tcp_failures / timeouts), with the same
 * transitions, log lines, alerts and metrics as the checker's own probes. */
enum health_probe_result {
	HEALTH_PROBE_OK,
	HEALTH_PROBE_HTTP_FAIL,
	HEALTH_PROBE_TCP_FAIL,
	HEALTH_PROBE_TIMEOUT,
};
void health_active_report(struct instance_state *st, const struct config_active_check *check,
                          enum health_probe_result r, long status, const char *detail);

/* ---------------------------------------------------------------- workers: per request */

enum health_gate {
	HEALTH_PASS,    /* healthy: use it */
	HEALTH_TRIAL,   /* unhealthy, no active checks, cooldown over: this caller holds the
	                   single half-open trial slot and must report the outcome
	                   (health_report, or health_trial_abandon when it never sent) */
	HEALTH_DOWN,    /* unhealthy: skip it */
	HEALTH_COOLING, /* healthy, but inside a 429 Retry-After period: skip it */
};
enum health_gate health_admit(struct instance_state *st, const struct config_instance *in,
                              uint64_t now_us);
/* The trial caller gave up before it had an outcome (client gone, quota): the
 * slot is free again at once, and the cooldown does not restart. */
void health_trial_abandon(struct instance_state *st);

enum health_outcome {
	HEALTH_OK,            /* the instance answered with a status we pass on (2xx, 3xx) */
	HEALTH_HTTP_STATUS,   /* an error status: a failure when it is in
	                         checks.passive.http_statuses,   otherwise neutral (counted neither way)
	                       */
	HEALTH_CONNECT_ERROR, /* refused, unreachable, DNS, TLS handshake, reset before the head */
	HEALTH_TIMEOUT,       /* connect or first-byte timeout */
};
/*
 * One passive observation: report once per attempt, as soon as the outcome is
 * known (the response head or the failure). While the instance is unhealthy,
 * reports count only as the outcome of a trial in progress; otherwise they are
 * stragglers admitted before the transition and are ignored.
 */
void health_report(struct instance_state *st, const struct config_instance *in,
                   enum health_outcome o, int http_status, uint64_t now_us);
/* A 429 with Retry-After: out of rotation for that long (capped at
 * HEALTH_RETRY_AFTER_MAX_S). Logged once per period; not a health transition. */
#define HEALTH_RETRY_AFTER_MAX_S 3600
void health_retry_after(struct instance_state *st, const struct config_instance *in,
                        uint64_t seconds, uint64_t now_us);

/* A Retry-After value (RFC 9110 §10.2.3) as received (bytes, not NUL-terminated,
 * surrounding blanks allowed): delta-seconds, or an IMF-fixdate HTTP-date taken
 * relative to now_unix_s (a past date is 0). Capped at HEALTH_RETRY_AFTER_MAX_S;
 * no input can overflow it. False when the value is neither. Pure. */
bool health_parse_retry_after(const char *v, size_t len, int64_t now_unix_s, uint64_t *seconds);

void health_inflight_add(struct instance_state *st, int delta);
int health_inflight(const struct instance_state *st);
bool health_is_healthy(const struct instance_state *st);

/* Latency of a successful attempt; ttft_us 0 when not measured. Exponentially
 * weighted (weight 1/HEALTH_EWMA_DIV per sample), for the admin API and the
 * ewma balancer. */
#define HEALTH_EWMA_DIV 8
void health_observe_latency(struct instance_state *st, uint64_t ttft_us, uint64_t total_us);
uint64_t health_ewma_ttft_us(const struct instance_state *st);  /* 0: no sample yet */
uint64_t health_ewma_total_us(const struct instance_state *st); /* 0: no sample yet */

/* The model server's own load (load.metrics_url, vLLM metric names), scraped
 * by the checker every load.interval. False when unknown: never scraped, the
 * last scrape failed, or it is older than HEALTH_LOAD_STALE_INTERVALS
 * intervals. */
#define HEALTH_LOAD_STALE_INTERVALS 4
struct health_load {
	double waiting;  /* vllm:num_requests_waiting, summed over label sets */
	double running;  /* vllm:num_requests_running */
	double kv_cache; /* vllm:kv_cache_usage_perc (or vllm:gpu_cache_usage_perc), 0..1; -1:
	                    absent */
	uint64_t age_us; /* since the scrape */
};
bool health_load_get(const struct instance_state *st, uint64_t now_us, struct health_load *out);
/* The gauges above from a scraped text exposition (bytes, not NUL-terminated): each
 * summed over its samples, whatever their labels; a value is a decimal float, NaN or
 * ±Inf, anything else skips the sample. Sets age_us 0. True when at least one sample
 * was read (false leaves 0 waiting, 0 running, kv_cache -1). Pure. */
bool health_parse_load(const char *body, size_t len, struct health_load *out);

/* ---------------------------------------------------------------- admin API, metrics */

struct health_snapshot {
	bool healthy;
	int inflight;
	uint64_t transitions;
	uint64_t last_transition_unix_ms; /* 0: never (source "start") */
	char last_reason[160];
	const char *source; /* "active" | "passive" | "trial" | "start" */
	uint64_t ewma_ttft_us, ewma_total_us;
	uint64_t retry_after_until_unix_ms; /* 0: not cooling */
	uint64_t probes_ok, probes_failed;  /* active probes since start */
};
void health_snapshot(const struct instance_state *st, struct health_snapshot *out);

#endif
