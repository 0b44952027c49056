/* alerts.c — operator alerts: a bounded queue fed by any thread, POSTed in order by the main loop.
 *
 * Producers (workers making health transitions, the reload path) only format
 * the event, append it under a mutex and poke the main loop; they never wait
 * on the network. The main loop delivers one event at a time, so a receiver
 * sees them in the order they happened, and retries a failed delivery a few
 * times before giving up on it.
 */
#include "sluice/alerts.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <event2/event.h>

#include "sluice/log.h"
#include "sluice/upstream.h"

/* A receiver's answer is not read beyond this: only its status matters. */
#define WEBHOOK_BODY_MAX (64 * 1024)

static const uint64_t backoff_ms[ALERTS_RETRIES] = {500, 1000, 2000};

struct alert {
	struct alert *next;
	char *body; /* JSON text, owned */
	size_t len;
	char event[48]; /* for log lines */
};

static struct {
	pthread_mutex_t mu;        /* guards the fields up to "main thread only" */
	bool ready;                /* between alerts_init and alerts_shutdown */
	bool enabled;              /* a webhook is configured */
	struct alert *head, *tail; /* oldest first */
	size_t n;
	bool delivering;  /* the main thread holds one event outside the queue */
	bool overflowing; /* warned for this burst; cleared when the queue empties */
	uint64_t sent, failed, dropped;
	struct event *wake; /* event_active'd by producers */

	/* main thread only */
	struct event_base *base;
	struct upstream *up;
	char *url; /* NULL: no webhook */
	uint64_t timeout_ms;
	char **headers; /* "Name: value" lines */
	size_t n_headers;
	struct alert *cur; /* being delivered */
	int attempt;       /* 1 for the first try */
	struct upstream_xfer x;
	size_t body_bytes;
	struct event *retry_timer;
} A = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void deliver_next(void);

static void alert_free(struct alert *a)
{
	if (a != NULL) {
		free(a->body);
		free(a);
	}
}

static void format_time(char *buf, size_t len)
{
	struct timespec ts;
	struct tm tm;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	size_t n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(buf + n, len - n, ".%03ldZ", ts.tv_nsec / 1000000);
}

/* ---------------------------------------------------------------- producers */

void alerts_emit(const char *event_type, json_t *fields)
{
	char when[40];
	format_time(when, sizeof(when));

	json_t *o = json_pack("{s:s, s:s}", "event", event_type, "time", when);
	if (o != NULL && json_is_object(fields))
		json_object_update_missing(o, fields);
	json_decref(fields);
	char *body = o ? json_dumps(o, JSON_COMPACT) : NULL;
	json_decref(o);
	struct alert *a = body ? calloc(1, sizeof(*a)) : NULL;
	if (a == NULL) {
		free(body);
		log_error("alerts: out of memory: %s event dropped", event_type);
		return;
	}
	a->body = body;
	a->len = strlen(body);
	snprintf(a->event, sizeof(a->event), "%s", event_type);

	struct alert *pushed_out = NULL;
	bool warn = false;
	pthread_mutex_lock(&A.mu);
	if (!A.ready || !A.enabled) {
		/* No webhook: the caller's log line is the whole record. */
		pthread_mutex_unlock(&A.mu);
		alert_free(a);
		return;
	}
	if (A.n >= ALERTS_QUEUE_MAX) {
		pushed_out = A.head;
		A.head = pushed_out->next;
		if (A.head == NULL)
			A.tail = NULL;
		A.n--;
		A.dropped++;
		warn = !A.overflowing;
		A.overflowing = true;
	}
	if (A.tail)
		A.tail->next = a;
	else
		A.head = a;
	A.tail = a;
	A.n++;
	/* Under the lock, so alerts_shutdown cannot free the event meanwhile. */
	event_active(A.wake, 0, 0);
	pthread_mutex_unlock(&A.mu);

	alert_free(pushed_out);
	if (warn)
		log_warn("alerts: webhook queue full (%d events): dropping the oldest until it "
		         "drains",
		         ALERTS_QUEUE_MAX);
}

void alerts_stats(struct alerts_stats *out)
{
	pthread_mutex_lock(&A.mu);
	out->sent = A.sent;
	out->failed = A.failed;
	out->dropped = A.dropped;
	out->queued = A.n + (A.delivering ? 1 : 0);
	pthread_mutex_unlock(&A.mu);
}

/* ---------------------------------------------------------------- delivery (main thread) */

static bool on_head(void *arg, long status)
{
	return true;
}

static size_t on_body(void *arg, const char *data, size_t len)
{
	A.body_bytes += len;
	return A.body_bytes > WEBHOOK_BODY_MAX ? 0 : len;
}

static void on_done(void *arg, enum upstream_result res, const char *detail);

static const struct upstream_ops webhook_ops = {
        .on_head = on_head,
        .on_body = on_body,
        .on_done = on_done,
};

static void finish_current(bool ok)
{
	pthread_mutex_lock(&A.mu);
	A.delivering = false;
	if (ok)
		A.sent++;
	else
		A.failed++;
	pthread_mutex_unlock(&A.mu);
	alert_free(A.cur);
	A.cur = NULL;
	deliver_next();
}

static void attempt(void)
{
	if (A.url == NULL) { /* the webhook was removed by a reload */
		pthread_mutex_lock(&A.mu);
		A.delivering = false;
		A.dropped++;
		pthread_mutex_unlock(&A.mu);
		alert_free(A.cur);
		A.cur = NULL;
		deliver_next();
		return;
	}
	A.attempt++;
	A.body_bytes = 0;
	bool ok = true;
	for (size_t i = 0; i < A.n_headers && ok; i++)
		ok = upstream_xfer_header(&A.x, A.headers[i]);
	struct upstream_timeouts to = {
	        .connect = A.timeout_ms,
	        .first_byte = A.timeout_ms,
	        .idle = A.timeout_ms,
	        .total = A.timeout_ms,
	};
	if (ok)
		ok = upstream_xfer_start(&A.x, "POST", A.url, A.cur->body, A.cur->len, &to, true,
		                         60);
	if (!ok) {
		upstream_xfer_cleanup(&A.x);
		upstream_xfer_init(&A.x, A.up, &webhook_ops, NULL);
		log_warn("alerts: could not start the webhook POST; %s event dropped",
		         A.cur->event);
		finish_current(false);
	}
}

static void retry_cb(evutil_socket_t fd, short what, void *arg)
{
	if (A.cur != NULL)
		attempt();
}

static void on_done(void *arg, enum upstream_result res, const char *detail)
{
	long status = A.x.head_done ? A.x.status : 0;
	char why[200];

	if (status >= 200 && status < 300) {
		log_debug("alerts: %s event delivered (http %ld)", A.cur->event, status);
		finish_current(true);
		return;
	}
	/* Connect errors, timeouts and 5xx may pass; any other answer is the
	 * receiver refusing this event, and asking again will not change it. */
	bool retry = status >= 500 ||
	             (status == 0 && (res == UPSTREAM_CONNECT_ERROR || res == UPSTREAM_TIMEOUT ||
	                              res == UPSTREAM_ERROR));
	if (status != 0)
		snprintf(why, sizeof(why), "http %ld", status);
	else
		snprintf(why, sizeof(why), "%s: %s", upstream_result_name(res),
		         detail ? detail : "");
	if (retry && A.attempt <= ALERTS_RETRIES && A.url != NULL) {
		uint64_t ms = backoff_ms[A.attempt - 1];
		log_info("alerts: webhook POST of %s event failed (%s); retry %d of %d in %llu ms",
		         A.cur->event, why, A.attempt, ALERTS_RETRIES, (unsigned long long)ms);
		struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
		evtimer_add(A.retry_timer, &tv);
		return;
	}
	log_warn("alerts: webhook POST of %s event failed after %d attempt%s (%s); event dropped",
	         A.cur->event, A.attempt, A.attempt == 1 ? "" : "s", why);
	finish_current(false);
}

/* Start the oldest queued event unless one is under way. */
static void deliver_next(void)
{
	if (A.cur != NULL)
		return;
	pthread_mutex_lock(&A.mu);
	struct alert *a = A.head;
	if (a != NULL) {
		A.head = a->next;
		if (A.head == NULL)
			A.tail = NULL;
		A.n--;
		A.delivering = true;
	} else {
		A.overflowing = false; /* the burst is over */
	}
	pthread_mutex_unlock(&A.mu);
	if (a == NULL)
		return;
	a->next = NULL;
	A.cur = a;
	A.attempt = 0;
	attempt();
}

static void wake_cb(evutil_socket_t fd, short what, void *arg)
{
	deliver_next();
}

/* ---------------------------------------------------------------- lifecycle */

bool alerts_init(struct event_base *main_base)
{
	A.base = main_base;
	A.up = upstream_new(main_base);
	A.wake = event_new(main_base, -1, 0, wake_cb, NULL);
	A.retry_timer = evtimer_new(main_base, retry_cb, NULL);
	if (A.up == NULL || A.wake == NULL || A.retry_timer == NULL) {
		alerts_shutdown();
		log_error("alerts: out of memory");
		return false;
	}
	upstream_xfer_init(&A.x, A.up, &webhook_ops, NULL);
	pthread_mutex_lock(&A.mu);
	A.ready = true;
	pthread_mutex_unlock(&A.mu);
	return true;
}

static void free_hook(void)
{
	free(A.url);
	A.url = NULL;
	for (size_t i = 0; i < A.n_headers; i++)
		free(A.headers[i]);
	free(A.headers);
	A.headers = NULL;
	A.n_headers = 0;
}

void alerts_configure(const struct config *c)
{
	const struct config_alerts *al = &c->alerts;

	free_hook();
	if (al->webhook_url != NULL) {
		A.url = strdup(al->webhook_url);
		A.timeout_ms = al->webhook_timeout ? al->webhook_timeout : 2000;
		A.headers = calloc(al->n_webhook_headers + 1, sizeof(*A.headers));
		for (size_t i = 0; A.headers != NULL && i < al->n_webhook_headers; i++) {
			const struct config_kv *kv = &al->webhook_headers[i];
			/* The body is always JSON and upstream_xfer_start labels it so;
			 * a second Content-Type would make the request ambiguous. */
			if (strcasecmp(kv->name, "content-type") == 0)
				continue;
			size_t n = strlen(kv->name) + strlen(kv->value) + 3;
			char *line = malloc(n);
			if (line == NULL)
				break;
			snprintf(line, n, "%s: %s", kv->name, kv->value);
			A.headers[A.n_headers++] = line;
		}
		if (A.url == NULL || A.headers == NULL) {
			log_error("alerts: out of memory: webhook disabled");
			free_hook();
		}
	}

	struct alert *drop = NULL;
	pthread_mutex_lock(&A.mu);
	A.enabled = A.url != NULL;
	if (!A.enabled) {
		drop = A.head;
		A.dropped += A.n;
		A.head = A.tail = NULL;
		A.n = 0;
	}
	pthread_mutex_unlock(&A.mu);
	while (drop != NULL) {
		struct alert *next = drop->next;
		alert_free(drop);
		drop = next;
	}
}

void alerts_shutdown(void)
{
	pthread_mutex_lock(&A.mu);
	A.ready = false;
	A.enabled = false;
	struct alert *q = A.head;
	A.head = A.tail = NULL;
	A.n = 0;
	A.delivering = false;
	A.overflowing = false;
	A.sent = A.failed = A.dropped = 0;
	struct event *wake = A.wake;
	A.wake = NULL;
	pthread_mutex_unlock(&A.mu);

	while (q != NULL) {
		struct alert *next = q->next;
		alert_free(q);
		q = next;
	}
	if (A.up != NULL) {
		upstream_xfer_cleanup(&A.x);
		upstream_free(A.up);
		A.up = NULL;
	}
	alert_free(A.cur);
	A.cur = NULL;
	if (wake != NULL)
		event_free(wake);
	if (A.retry_timer != NULL)
		event_free(A.retry_timer);
	A.retry_timer = NULL;
	free_hook();
	A.base = NULL;
}
