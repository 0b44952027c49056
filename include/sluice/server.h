/* server.h — the process: worker threads, listeners, signals, reload and drain. */
#ifndef SLUICE_SERVER_H
#define SLUICE_SERVER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>

#include <curl/curl.h>

#include "sluice/config.h"

struct event_base;
struct event;
struct http_server;
struct upstream;
struct upstream_url;
struct server;
struct request;
struct balancer;
struct quota;
struct metrics_shard;
struct mcp_worker;

TAILQ_HEAD(request_list, request);

/*
 * A worker owns its event loop, its client connections, its libcurl multi and
 * every request it accepted, from accept to the last byte. The only state it
 * shares is reached through the config snapshot and the registries.
 */
struct worker {
	int id;
	pthread_t thread;
	struct server *server;
	struct event_base *base;
	struct http_server *http;
	struct upstream *upstream;
	struct config *config; /* this worker's current snapshot: one reference */
	struct balancer **balancers;     /* per route of balancers_config (== config) */
	struct upstream_url **urls;      /* per instance of balancers_config: pre-parsed, owned
	                                    (a transfer keeps its own until it ends) */
	struct config *balancers_config;
	struct quota *quota;             /* this worker's quota client (memory / Redis) */
	struct metrics_shard *metrics;   /* this worker's metric counters */
	struct mcp_worker *mcp;          /* this worker's MCP sessions and exchanges (src/mcp) */
	struct request_list requests; /* live requests (for shutdown) */
	uint64_t n_requests;          /* accepted so far: request-id sequence */
	uint64_t rng;                 /* xorshift state for ids and balancing */

	/* main → worker mailbox, under lock, signalled through wake_ev */
	pthread_mutex_t lock;
	struct event *wake_ev;
	struct config *next_config;
	bool drain;
	bool stop;
	atomic_bool exited;
	struct event *drain_check_ev;
};

/* Run until SIGTERM/SIGINT has drained the workers. Takes the reference on cfg.
 * Returns the process exit code. */
int server_run(struct config *cfg, const char *config_path);

#endif
