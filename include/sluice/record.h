/* record.h — what one request did: filled by request.c, read by the access log and the metrics. */
#ifndef SLUICE_RECORD_H
#define SLUICE_RECORD_H

#include <stdbool.h>
#include <stdint.h>

#define RECORD_MAX_ATTEMPTS 8
#define RECORD_COST_UNIT    1000000u /* cost_micros in one price unit */
/* Distinct (policy, action) pairs one request records (policy_chain.h keeps as many). */
#define RECORD_MAX_POLICY_ACTIONS 16

/* One try at one instance. outcome is a fixed string: "ok", "http_429",
 * "http_4xx", "http_5xx" (an upstream status passed through or failed over), "timeout",
 * "connect_error", "upstream_error", "unhealthy" (skipped), "quota" (skipped),
 * "unsupported" (skipped: the instance cannot express the request, e.g. n > 1 on
 * Anthropic),
 * "client_gone". */
struct record_attempt {
	const char *instance;
	const char *outcome;
	int status;          /* upstream HTTP status, 0 when none */
	uint64_t latency_us; /* start of the attempt to its end */
};

struct record_usage {
	bool present;   /* any usage known */
	bool estimated; /* the upstream reported none: Sluice estimated it */
	uint64_t prompt, completion, total, cached, reasoning;
};

/* What a route's policy did to the request (sluice_policy_actions_total, the access log). */
struct record_policy {
	const char *policy; /* the plugin's name in the configuration */
	const char *action; /* a fixed string: "blocked", "masked", "cut", ... */
	unsigned count;     /* how many times in this request */
};

/* Strings point into the request or its config snapshot and are valid only
 * during the call that receives the record. NULL means "none". */
struct request_record {
	const char *request_id;
	uint64_t start_unix_us;  /* wall clock when the request arrived */
	const char *method;
	const char *path;
	const char *client_ip;
	const char *route;
	const char *consumer;
	const char *key_fingerprint; /* never the key itself */
	const char *model_requested;
	const char *model_upstream;
	const char *instance;    /* the instance that answered (last attempt) */
	bool stream;
	int status;              /* sent to the client */
	int upstream_status;     /* 0 when no upstream answered */
	const char *error_code;  /* the gateway's error code, when it made the error */
	const char *limit_id;    /* the limit that rejected the request, if any */
	struct record_attempt attempts[RECORD_MAX_ATTEMPTS];
	int n_attempts;
	uint64_t bytes_in, bytes_out;
	uint64_t ttft_us;        /* arrival to the first byte sent to the client */
	uint64_t total_us;       /* arrival to the last byte */
	uint64_t upstream_us;    /* time spent waiting on upstreams */
	uint64_t overhead_us;    /* total - upstream: the gateway's own time */
	struct record_usage usage;
	bool priced;          /* the instance that answered has a price: cost_micros applies */
	uint64_t cost_micros; /* usage at that price (quota_cost_micros): 10^-6 price units */
	struct record_policy policies[RECORD_MAX_POLICY_ACTIONS]; /* in order of first use */
	int n_policies;
	const char *prompt_payload; /* only with log.payloads: true */
	const char *output_payload;
};

#endif
