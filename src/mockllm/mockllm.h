/* mockllm.h — sluice-mockllm, an OpenAI-compatible mock model server (internal header). */
#ifndef SLUICE_MOCKLLM_H
#define SLUICE_MOCKLLM_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>

/* Behaviour knobs; flags give the defaults, x-mock-* headers and the body's "mock" object
 * override them per request. */
struct mock_params {
	long tokens;           /* completion tokens per reply */
	long ttft_ms;          /* delay before the first token / the whole non-stream reply */
	long itl_ms;           /* delay between stream tokens */
	int status;            /* forced status, 0 = off */
	double error_rate;     /* fraction of requests answered 500 */
	int hang;              /* never answer */
	long disconnect_after; /* close the connection after N streamed tokens; -1 = off */
	int no_usage;          /* never report usage */
	long retry_after;      /* Retry-After seconds on 429/503; -1 = off */
};

struct mock_config {
	char host[256];    /* as given, IPv6 with brackets */
	char port[16];
	struct mock_params defaults;
	long max_concurrency; /* 0 = unlimited */
	long queue;
	const char *model;
	long record;          /* requests kept for /_mock/requests */
	long record_body_max; /* bytes of each body kept */
	int threads;
	uint64_t seed;
};

/* --- recorder (record.c); callers hold the app lock --- */
struct rec_entry {
	char *buf; /* path\0 query\0 (name\0 value\0)* body */
	size_t cap;
	const char *method;
	double time;
	size_t path_len, query_len, hdr_len, body_len;
	unsigned nhdr;
	int has_query;
	int truncated;
};

struct recorder {
	struct rec_entry *ring;
	size_t cap, start, count;
	size_t body_max;
};

void rec_init(struct recorder *r, size_t cap, size_t body_max);
void rec_free(struct recorder *r);
void rec_clear(struct recorder *r);
void rec_add(struct recorder *r, const char *method, const char *path, const char *query,
	     const struct evkeyvalq *headers, const char *body, size_t body_len, double time);
/* Returns a malloc'd JSON array text (oldest first). */
char *rec_dump(const struct recorder *r);

/* --- the server (server.c) --- */
struct mock_ctx;
struct mock_app;

struct mock_worker {
	struct mock_app *app;
	int index;
	int listen_fd;
	struct event_base *base;
	struct evhttp *http;
	struct evbuffer *scratch; /* reply building, reused */
	struct evbuffer *pfx;     /* SSE event prefix building, reused */
	uint64_t rng;
	struct mock_ctx *ctxs; /* live asynchronous requests of this worker */
	pthread_t thread;
};

struct mock_stats {
	uint64_t requests;     /* completion / embedding requests received */
	uint64_t all_requests; /* every recorded request */
	uint64_t completed;
	uint64_t cancelled;
	uint64_t disconnected;
	uint64_t rejected; /* 429 because the queue was full */
	uint64_t errors;   /* forced status / error-rate answers */
	long active, running, waiting, max_active;
};

struct mock_app {
	struct mock_config cfg;
	int mt; /* more than one thread: take the lock */
	pthread_mutex_t lock;
	struct mock_stats st;
	struct mock_ctx *q_head, *q_tail; /* FIFO of requests waiting for a slot */
	uint64_t next_id;
	struct recorder rec;
	struct mock_worker *workers;
};

static inline void app_lock(struct mock_app *a)
{
	if (a->mt)
		pthread_mutex_lock(&a->lock);
}

static inline void app_unlock(struct mock_app *a)
{
	if (a->mt)
		pthread_mutex_unlock(&a->lock);
}

/* evhttp generic callback; arg is the struct mock_worker. */
void mock_handle(struct evhttp_request *req, void *arg);
/* Drop every live request of the worker (shutdown, loop stopped). */
void mock_worker_drop_requests(struct mock_worker *w);

/* --- helpers (util.c) --- */
void json_escape(struct evbuffer *out, const char *s, size_t n);
void prom_escape(struct evbuffer *out, const char *s);
int parse_long(const char *s, long min, long max, long *out);
int parse_double(const char *s, double min, double max, double *out);
int parse_bool(const char *s, int *out);
int ends_with(const char *s, size_t slen, const char *suffix);
double now_unix(void);
uint64_t rng_next(uint64_t *state);
double rng_double(uint64_t *state);

#endif
