/* mockllm.h — sluice-mockllm, a mock OpenAI/Anthropic model server (internal header). */
#ifndef SLUICE_MOCKLLM_H
#define SLUICE_MOCKLLM_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>

#define MAX_TOKENS   10000000L
#define MAX_DELAY_MS (24L * 3600 * 1000)
/* A tool call's arguments are streamed in at most this many pieces. */
#define TOOL_PIECES 4
/* Defaults of --fault-bytes for the faults that send a body of junk / one big event. */
#define JUNK_SSE_BYTES  4096L
#define BIG_EVENT_BYTES (10L * 1024 * 1024)
#define MAX_FAULT_BYTES (1L << 30)
/* Score of a category whose word was found (--moderation-score default). */
#define MODERATION_SCORE 0.99

/* Fault modes (--fault, x-mock-fault, "fault"). */
enum mock_fault {
	FAULT_NONE,
	FAULT_RESET,           /* RST after fault_after content deltas */
	FAULT_STALL,           /* head (and fault_after deltas), then silence */
	FAULT_GARBAGE,         /* bytes that are not HTTP, then close */
	FAULT_JUNK_SSE,        /* 200 text/event-stream whose body is binary junk */
	FAULT_BIG_EVENT,       /* one content delta of fault_bytes bytes */
	FAULT_ENDLESS_HEADERS, /* a status line, then header lines until the client leaves */
};

/* Behaviour knobs; flags give the defaults, x-mock-* headers and the body's "mock" object
 * override them per request. Strings and JSON values are borrowed: from argv, the request's
 * headers or its parsed body, all of which outlive the request's handling; the reply's plan
 * (struct gen) copies what it needs beyond that. */
struct mock_params {
	long tokens;           /* completion tokens per reply */
	long ttft_ms;          /* delay before the first token / the whole non-stream reply */
	long itl_ms;           /* delay between stream tokens */
	int status;            /* forced status, 0 = off */
	double error_rate;     /* fraction of requests answered 500 */
	int hang;              /* never answer */
	long disconnect_after; /* close the connection after N streamed tokens; -1 = off */
	int no_usage;          /* never report usage */
	long retry_after;      /* Retry-After seconds on 429/503/529; -1 = off */
	/* output controls (NULL / -1 = off) */
	const char *content; /* exact reply text, split before each space */
	size_t content_len;
	json_t *chunks;     /* array of strings: exactly these deltas */
	const char *repeat; /* this text, `times` times, one delta each */
	size_t repeat_len;
	long times;
	json_t *tool_call; /* {"name","arguments"} or an array of them */
	long cache_read, cache_creation;
	long stream_error_after; /* mid-stream error event after N deltas; -1 = off */
	int fault;               /* enum mock_fault */
	long fault_after;        /* content deltas before a reset / stall */
	long fault_bytes;        /* junk / big event size; -1 = the fault's default */
	double moderation_score;
};

struct moderation_category {
	char *name;
	char **words; /* lower-case */
	size_t *word_lens;
	size_t nwords;
};

struct mock_config {
	char host[256]; /* as given, IPv6 with brackets */
	char port[16];
	struct mock_params defaults;
	long max_concurrency; /* 0 = unlimited */
	long queue;
	const char *model;
	long record;          /* requests kept for /_mock/requests */
	long record_body_max; /* bytes of each body kept */
	int threads;
	uint64_t seed;
	int close_on_accept;
	struct moderation_category *mod; /* --moderation-words, or the built-in set */
	size_t nmod;
	json_t *owned_json; /* JSON values parsed from flags (kept alive for the run) */
};

/* --- recorder (record.c); callers hold the app lock --- */

/* How a generation request ended, as /_mock/requests reports it. */
enum rec_outcome {
	REC_NONE, /* not a generation request, or still running */
	REC_COMPLETED,
	REC_CLIENT_DISCONNECT,
	REC_MOCK_DISCONNECT, /* disconnect_after */
	REC_FAULT,
	REC_STREAM_ERROR,
	REC_ERROR, /* forced status, error rate */
	REC_REJECTED,
	REC_INVALID,
};

struct rec_entry {
	char *buf; /* path\0 query\0 (name\0 value\0)* body */
	size_t cap;
	const char *method;
	double time;
	uint64_t seq;
	size_t path_len, query_len, hdr_len, body_len;
	unsigned nhdr;
	int has_query;
	int truncated;
	int outcome; /* enum rec_outcome */
	long deltas;
};

struct recorder {
	struct rec_entry *ring;
	size_t cap, start, count;
	size_t body_max;
	uint64_t next_seq;
};

void rec_init(struct recorder *r, size_t cap, size_t body_max);
void rec_free(struct recorder *r);
void rec_clear(struct recorder *r);
/* Returns the record's sequence number (0 when recording is off). */
uint64_t rec_add(struct recorder *r, const char *method, const char *path, const char *query,
                 const struct evkeyvalq *headers, const char *body, size_t body_len, double time);
/* Set the outcome of record seq if it is still in the ring. */
void rec_finish(struct recorder *r, uint64_t seq, enum rec_outcome o, long deltas);
/* Returns a malloc'd JSON array text (oldest first). */
char *rec_dump(const struct recorder *r);

/* --- one reply: what to generate (plan.c) --- */

enum kind { K_NONE, K_CHAT, K_COMPL, K_EMB, K_MSG, K_COUNT, K_RESP, K_MOD };
enum finish { FIN_STOP, FIN_LENGTH, FIN_STOP_SEQ, FIN_TOOL };
enum src {
	SRC_LOREM,  /* the word list */
	SRC_PIECES, /* text[off[i] .. off[i+1]) */
	SRC_REPEAT, /* text[0 .. text_len) every time */
	SRC_FILL,   /* one piece of text_len filler bytes */
};

struct tool_call {
	const char *name, *args; /* in gen.own */
	size_t name_len, args_len;
	size_t cut[TOOL_PIECES + 1]; /* argument piece k is args[cut[k] .. cut[k+1]) */
	int npieces;
	int args_json; /* args is a JSON object text (Anthropic "input" can embed it) */
};

struct proto;

struct gen {
	enum kind kind;
	const struct proto *proto;
	int stream;
	int usage_chunk; /* chat/completions stream with include_usage */
	enum finish finish;
	long ntok;          /* text deltas */
	long ndeltas;       /* text deltas + tool argument pieces */
	long text_tokens;   /* tokens of the prompt text */
	long prompt_tokens; /* text_tokens + cache_read + cache_creation */
	struct mock_params p;
	const struct mock_config *cfg;
	uint64_t id;
	long long created;
	const char *model; /* borrowed (request body or ctx copy) */
	size_t model_len;
	const char *prev_id; /* Responses previous_response_id, or NULL */
	size_t prev_id_len;
	long max_output; /* Responses max_output_tokens echo, -1 = null */
	enum src src;
	const char *text;
	const size_t *off;
	size_t text_len;
	struct tool_call *tools;
	int ntools;
	const char *stop_seq; /* the stop sequence that ended the text */
	size_t stop_seq_len;
	char *own; /* one malloc behind text, off, tools, stop_seq; NULL when none */
	/* stream state */
	long seq;           /* Responses sequence_number */
	int open_block;     /* Anthropic block / Responses item now open, -1 = none */
	const char *prefix; /* chat/completions: event JSON up to "choices":[ */
	size_t prefix_len;
};

/* Resolve the output of g->p for the request body root: pieces, tool calls, stop sequence,
 * token counts. g->kind, g->p, g->stream are set. Returns 0, or -1 when out of memory. */
int plan_build(struct gen *g, json_t *root);
/* Copy what g borrows from the request (model, previous id) into buf, which has
 * plan_borrowed_size(g) bytes, and point g at the copies. */
size_t plan_borrowed_size(const struct gen *g);
void plan_adopt(struct gen *g, char *buf);
void plan_free(struct gen *g);
/* JSON-escaped text of text delta i, of all the text, of a tool's argument piece. */
void plan_piece(struct evbuffer *b, const struct gen *g, long i);
void plan_text(struct evbuffer *b, const struct gen *g);
void plan_args(struct evbuffer *b, const struct tool_call *t, int piece);
/* Which tool call and piece delta i (>= ntok) is. */
void plan_tool_of(const struct gen *g, long i, int *tool, int *piece);
/* Whether the reply has a text block (it has one unless it is only tool calls). */
int plan_has_text(const struct gen *g);
/* Content block (Anthropic) / output item (Responses) of delta i: the text first. */
int plan_block_of(const struct gen *g, long i);
/* Prompt tokens of text: ceil(bytes / 4) + token ids, at least 1. */
long plan_count(size_t bytes, long ids);
void plan_count_value(json_t *v, size_t *bytes, long *ids);

/* --- wire formats (proto_openai.c, proto_anthropic.c, moderation.c) --- */

/* Where stream events go: each event is built in b and sent as its own HTTP chunk. */
struct sse {
	struct evhttp_request *req;
	struct evbuffer *b;
};

void sse_send(struct sse *s);

struct proto {
	const char *stream_ctype;
	/* 400 reason for a request the real API refuses, or NULL. */
	const char *(*validate)(struct evhttp_request *req, json_t *root);
	/* Error body in the protocol's shape. */
	void (*error)(struct evbuffer *b, int status, const char *type, const char *msg,
	              const char *code);
	/* Error type for a forced status. */
	const char *(*status_type)(int status);
	void (*body)(struct evbuffer *b, struct gen *g, json_t *root);
	/* Streams (delta NULL: the endpoint does not stream). prefix: the text each chunk
	 * starts with, built once per reply into g->prefix. */
	void (*prefix)(struct evbuffer *pb, const struct gen *g);
	void (*start)(struct sse *s, struct gen *g);
	void (*delta)(struct sse *s, struct gen *g, long i);
	void (*finish)(struct sse *s, struct gen *g);
	void (*fail)(struct sse *s, struct gen *g); /* mid-stream error event(s) */
};

extern const struct proto proto_chat, proto_completions, proto_embeddings, proto_responses;
extern const struct proto proto_messages, proto_count_tokens, proto_moderations;
void proto_openai_error(struct evbuffer *b, int status, const char *type, const char *msg,
                        const char *code);
const char *proto_openai_status_type(int status);

/* moderation.c */
int moderation_parse(const char *spec, struct mock_config *cfg);
void moderation_free(struct mock_config *cfg);

/* --- the server (server.c) --- */
struct evconnlistener;
struct mock_ctx;
struct mock_app;

struct mock_worker {
	struct mock_app *app;
	int index;
	int listen_fd;
	struct event_base *base;
	struct evhttp *http;
	struct evconnlistener *closer; /* --close-on-accept */
	struct evbuffer *scratch;      /* reply building, reused */
	struct evbuffer *pfx;          /* SSE event prefix building, reused */
	uint64_t rng;
	struct mock_ctx *ctxs; /* live asynchronous requests of this worker */
	pthread_t thread;
};

struct mock_stats {
	uint64_t requests;     /* generation requests received */
	uint64_t all_requests; /* every recorded request */
	uint64_t completed;
	uint64_t cancelled; /* client went away first (also reported as client_disconnects) */
	uint64_t disconnected;
	uint64_t rejected; /* 429 because the queue was full */
	uint64_t errors;   /* forced status / error-rate answers, mid-stream error events */
	uint64_t faults;   /* replies shaped by a fault mode */
	long last_disconnect_deltas;
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

/* --- params.c: flags, x-mock-* headers and the body's "mock" object --- */
int params_fault(const char *name, size_t len, int *out);
/* Overrides from the x-mock-* headers; JSON parsed from them is appended to hold. */
void params_headers(struct evhttp_request *req, struct mock_params *p, json_t **hold);
void params_body(json_t *root, struct mock_params *p);

/* --- fault.c: the faults that bypass evhttp --- */
/* Close fd's socket with a RST (no FIN first); fd stays open, on an unconnected socket. */
void fault_reset_fd(int fd);
/* Write a short burst of bytes that are not HTTP. */
void fault_garbage(int fd);
/* Fill b with n bytes of junk that hold no line break. */
void fault_junk(struct evbuffer *b, size_t n);
/* Append header lines for the endless-headers fault; *line counts them. */
void fault_header_lines(struct evbuffer *b, size_t bytes, uint64_t *line);
struct evconnlistener *fault_closer_new(struct event_base *base, int fd);

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

#define ADD_LIT(b, lit) evbuffer_add((b), (lit), sizeof(lit) - 1)

#endif
