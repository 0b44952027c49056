/* alerts.h — operator alerts: JSON events POSTed to the configured webhook, from any thread. */
#ifndef SLUICE_ALERTS_H
#define SLUICE_ALERTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "sluice/config.h"

struct event_base;

/*
 * Every event is also logged by whoever raises it (the WARN line is the
 * record); the webhook is a courtesy copy. So delivery never blocks a worker
 * and gives up rather than piling up: a bounded queue that drops its oldest
 * event when full, one POST at a time in order, a few retries with backoff on
 * connect errors, timeouts and 5xx, then the event is dropped with a warning.
 */
#define ALERTS_QUEUE_MAX 1000
#define ALERTS_RETRIES   3 /* after the first attempt; backoff 0.5 s, 1 s, 2 s */

/* Main thread, once, before any emit. libevent must be set up for threads
 * (evthread_use_pthreads) before main_base was created. */
bool alerts_init(struct event_base *main_base) __attribute__((warn_unused_result));
/* Main thread, at start and after each successful reload: takes c->alerts
 * (copied). Without a webhook, queued events are dropped and new ones are not
 * queued. */
void alerts_configure(const struct config *c);
/*
 * Any thread. Queues {"event":event_type,"time":"<UTC ISO-8601 ms>", ...fields}
 * for the webhook. Steals the reference to fields (a JSON object, or NULL);
 * fields named "event" or "time" are overridden.
 */
void alerts_emit(const char *event_type, json_t *fields);
/* Main thread, at exit, after the workers stopped: drops whatever is queued
 * or in flight and frees everything. Emits after it are dropped. */
void alerts_shutdown(void);

struct alerts_stats {
	uint64_t sent;    /* delivered (2xx) */
	uint64_t failed;  /* given up after the retries, or refused with a 4xx */
	uint64_t dropped; /* pushed out of a full queue, or dropped by reconfiguration */
	size_t queued;    /* waiting, including the one being delivered */
};
void alerts_stats(struct alerts_stats *out);

#endif
