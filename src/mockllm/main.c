/* main.c — sluice-mockllm: command line, listening sockets, worker threads, signals. */
#include "mockllm.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/listener.h>
#include <event2/thread.h>

static void usage(FILE *f)
{
	fputs("usage: sluice-mockllm [options]\n"
	      "  --listen HOST:PORT       address to listen on [127.0.0.1:8000]; PORT 0 picks one\n"
	      "  --tokens N               completion tokens per reply [16]\n"
	      "  --ttft MS                delay before the first token / a non-stream reply [0]\n"
	      "  --itl MS                 delay between stream tokens [0]\n"
	      "  --status CODE            answer completions/embeddings with CODE [0 = off]\n"
	      "  --error-rate F           fraction of requests answered 500 [0]\n"
	      "  --hang                   never answer completions/embeddings\n"
	      "  --disconnect-after N     close the connection after N streamed tokens\n"
	      "  --max-concurrency N      requests generated at once [0 = unlimited]\n"
	      "  --queue N                requests waiting for a slot before 429 [0]\n"
	      "  --no-usage               never report usage\n"
	      "  --model NAME             model listed by /v1/models [mock-model]\n"
	      "  --record N               requests kept for /_mock/requests [1000]\n"
	      "  --record-body-max BYTES  bytes of each recorded body [1048576]\n"
	      "  --retry-after S          add Retry-After: S to 429/503 answers\n"
	      "  --threads N              event loops, one SO_REUSEPORT socket each [1]\n"
	      "  --seed N                 seed of the error-rate draws [1]\n"
	      "output controls (also per request, see docs/mockllm.md):\n"
	      "  --content TEXT           reply with exactly TEXT (deltas split before spaces)\n"
	      "  --chunks JSON            reply with these deltas (a JSON array of strings)\n"
	      "  --repeat TEXT            reply with TEXT --times times, one delta each\n"
	      "  --times N                repetitions of --repeat [the token count]\n"
	      "  --tool-call JSON         {\"name\",\"arguments\"} (or an array): call tools when "
	      "offered\n"
	      "  --cache-read N           cache-read prompt tokens reported [0]\n"
	      "  --cache-creation N       cache-creation prompt tokens reported [0]\n"
	      "  --stream-error-after N   end streams with an error event after N deltas\n"
	      "faults:\n"
	      "  --fault NAME             reset|stall|garbage|junk_sse|big_event|endless_headers\n"
	      "  --fault-after N          content deltas before a reset or stall [0]\n"
	      "  --fault-bytes N          junk_sse body / big_event delta size [4096 / 10485760]\n"
	      "  --close-on-accept        close every connection right after accepting it\n"
	      "moderations:\n"
	      "  --moderation-words SPEC  'category=word,word;category=word' [a built-in set]\n"
	      "  --moderation-score F     score of a flagged category [0.99]\n"
	      "  --help\n",
	      f);
}

static int opt_long(const char *name, const char *v, long min, long max, long *out)
{
	if (parse_long(v, min, max, out) == 0)
		return 0;
	fprintf(stderr, "sluice-mockllm: invalid value for --%s: %s\n", name, v);
	return -1;
}

/* A JSON flag value, kept alive for the whole run in cfg->owned_json. */
static json_t *flag_json(struct mock_config *cfg, const char *name, const char *v)
{
	json_error_t err;
	json_t *j = json_loads(v, 0, &err);
	int ok = 0;

	if (j != NULL && !strcmp(name, "chunks")) {
		size_t i;
		json_t *x;

		ok = json_is_array(j);
		json_array_foreach(j, i, x) ok = ok && json_is_string(x);
	} else if (j != NULL) {
		ok = json_is_object(j) ? json_is_string(json_object_get(j, "name"))
		                       : json_is_array(j) && json_array_size(j) > 0;
	}
	if (!ok) {
		fprintf(stderr, "sluice-mockllm: invalid value for --%s: %s\n", name, v);
		json_decref(j);
		return NULL;
	}
	if (cfg->owned_json == NULL)
		cfg->owned_json = json_array();
	json_array_append_new(cfg->owned_json, j);
	return j;
}

static int split_listen(const char *s, struct mock_config *cfg)
{
	const char *colon = strrchr(s, ':');
	size_t hl;

	if (colon == NULL || colon[1] == '\0')
		return -1;
	hl = (size_t)(colon - s);
	if (hl >= sizeof(cfg->host) || strlen(colon + 1) >= sizeof(cfg->port))
		return -1;
	memcpy(cfg->host, s, hl);
	cfg->host[hl] = '\0';
	strcpy(cfg->port, colon + 1);
	return 0;
}

static int parse_args(int argc, char **argv, struct mock_config *cfg)
{
	enum {
		O_LISTEN = 256,
		O_TOKENS,
		O_TTFT,
		O_ITL,
		O_STATUS,
		O_ERATE,
		O_HANG,
		O_DISC,
		O_MAXC,
		O_QUEUE,
		O_NOUSAGE,
		O_MODEL,
		O_RECORD,
		O_RECBODY,
		O_RETRY,
		O_THREADS,
		O_SEED,
		O_CONTENT,
		O_CHUNKS,
		O_REPEAT,
		O_TIMES,
		O_TOOL,
		O_CREAD,
		O_CCREATE,
		O_SERR,
		O_FAULT,
		O_FAFTER,
		O_FBYTES,
		O_CLOSE,
		O_MODWORDS,
		O_MODSCORE,
	};
	static const struct option opts[] = {
	        {"listen", required_argument, NULL, O_LISTEN},
	        {"tokens", required_argument, NULL, O_TOKENS},
	        {"ttft", required_argument, NULL, O_TTFT},
	        {"itl", required_argument, NULL, O_ITL},
	        {"status", required_argument, NULL, O_STATUS},
	        {"error-rate", required_argument, NULL, O_ERATE},
	        {"hang", no_argument, NULL, O_HANG},
	        {"disconnect-after", required_argument, NULL, O_DISC},
	        {"max-concurrency", required_argument, NULL, O_MAXC},
	        {"queue", required_argument, NULL, O_QUEUE},
	        {"no-usage", no_argument, NULL, O_NOUSAGE},
	        {"model", required_argument, NULL, O_MODEL},
	        {"record", required_argument, NULL, O_RECORD},
	        {"record-body-max", required_argument, NULL, O_RECBODY},
	        {"retry-after", required_argument, NULL, O_RETRY},
	        {"threads", required_argument, NULL, O_THREADS},
	        {"seed", required_argument, NULL, O_SEED},
	        {"content", required_argument, NULL, O_CONTENT},
	        {"chunks", required_argument, NULL, O_CHUNKS},
	        {"repeat", required_argument, NULL, O_REPEAT},
	        {"times", required_argument, NULL, O_TIMES},
	        {"tool-call", required_argument, NULL, O_TOOL},
	        {"cache-read", required_argument, NULL, O_CREAD},
	        {"cache-creation", required_argument, NULL, O_CCREATE},
	        {"stream-error-after", required_argument, NULL, O_SERR},
	        {"fault", required_argument, NULL, O_FAULT},
	        {"fault-after", required_argument, NULL, O_FAFTER},
	        {"fault-bytes", required_argument, NULL, O_FBYTES},
	        {"close-on-accept", no_argument, NULL, O_CLOSE},
	        {"moderation-words", required_argument, NULL, O_MODWORDS},
	        {"moderation-score", required_argument, NULL, O_MODSCORE},
	        {"help", no_argument, NULL, 'h'},
	        {NULL, 0, NULL, 0},
	};
	struct mock_params *p = &cfg->defaults;
	const char *mod_words = NULL;
	json_t *j;
	int o;
	long l;

	memset(cfg, 0, sizeof(*cfg));
	strcpy(cfg->host, "127.0.0.1");
	strcpy(cfg->port, "8000");
	p->tokens = 16;
	p->disconnect_after = -1;
	p->retry_after = -1;
	p->times = -1;
	p->stream_error_after = -1;
	p->fault_bytes = -1;
	p->moderation_score = MODERATION_SCORE;
	cfg->model = "mock-model";
	cfg->record = 1000;
	cfg->record_body_max = 1L << 20;
	cfg->threads = 1;
	cfg->seed = 1;

	while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (o) {
		case O_LISTEN:
			if (split_listen(optarg, cfg) != 0) {
				fprintf(stderr,
				        "sluice-mockllm: --listen wants HOST:PORT, got %s\n",
				        optarg);
				return -1;
			}
			break;
		case O_TOKENS:
			if (opt_long("tokens", optarg, 0, 10000000, &p->tokens))
				return -1;
			break;
		case O_TTFT:
			if (opt_long("ttft", optarg, 0, 86400000, &p->ttft_ms))
				return -1;
			break;
		case O_ITL:
			if (opt_long("itl", optarg, 0, 86400000, &p->itl_ms))
				return -1;
			break;
		case O_STATUS:
			if (opt_long("status", optarg, 0, 599, &l))
				return -1;
			p->status = (int)l;
			break;
		case O_ERATE:
			if (parse_double(optarg, 0, 1, &p->error_rate)) {
				fprintf(stderr, "sluice-mockllm: --error-rate wants 0..1, got %s\n",
				        optarg);
				return -1;
			}
			break;
		case O_HANG:
			p->hang = 1;
			break;
		case O_DISC:
			if (opt_long("disconnect-after", optarg, -1, 10000000,
			             &p->disconnect_after))
				return -1;
			break;
		case O_MAXC:
			if (opt_long("max-concurrency", optarg, 0, LONG_MAX, &cfg->max_concurrency))
				return -1;
			break;
		case O_QUEUE:
			if (opt_long("queue", optarg, 0, LONG_MAX, &cfg->queue))
				return -1;
			break;
		case O_NOUSAGE:
			p->no_usage = 1;
			break;
		case O_MODEL:
			cfg->model = optarg;
			break;
		case O_RECORD:
			if (opt_long("record", optarg, 0, 10000000, &cfg->record))
				return -1;
			break;
		case O_RECBODY:
			if (opt_long("record-body-max", optarg, 0, LONG_MAX, &cfg->record_body_max))
				return -1;
			break;
		case O_RETRY:
			if (opt_long("retry-after", optarg, -1, INT_MAX, &p->retry_after))
				return -1;
			break;
		case O_THREADS:
			if (opt_long("threads", optarg, 1, 1024, &l))
				return -1;
			cfg->threads = (int)l;
			break;
		case O_SEED:
			if (opt_long("seed", optarg, 0, LONG_MAX, &l))
				return -1;
			cfg->seed = (uint64_t)l;
			break;
		case O_CONTENT:
			p->content = optarg;
			p->content_len = strlen(optarg);
			p->chunks = NULL;
			p->repeat = NULL;
			break;
		case O_CHUNKS:
		case O_TOOL:
			j = flag_json(cfg, o == O_CHUNKS ? "chunks" : "tool-call", optarg);
			if (j == NULL)
				return -1;
			if (o == O_TOOL) {
				p->tool_call = j;
			} else {
				p->chunks = j;
				p->content = NULL;
				p->repeat = NULL;
			}
			break;
		case O_REPEAT:
			p->repeat = optarg;
			p->repeat_len = strlen(optarg);
			p->content = NULL;
			p->chunks = NULL;
			break;
		case O_TIMES:
			if (opt_long("times", optarg, 0, MAX_TOKENS, &p->times))
				return -1;
			break;
		case O_CREAD:
			if (opt_long("cache-read", optarg, 0, MAX_TOKENS, &p->cache_read))
				return -1;
			break;
		case O_CCREATE:
			if (opt_long("cache-creation", optarg, 0, MAX_TOKENS, &p->cache_creation))
				return -1;
			break;
		case O_SERR:
			if (opt_long("stream-error-after", optarg, -1, MAX_TOKENS,
			             &p->stream_error_after))
				return -1;
			break;
		case O_FAULT:
			if (params_fault(optarg, strlen(optarg), &p->fault) != 0) {
				fprintf(stderr, "sluice-mockllm: unknown --fault %s\n", optarg);
				return -1;
			}
			break;
		case O_FAFTER:
			if (opt_long("fault-after", optarg, 0, MAX_TOKENS, &p->fault_after))
				return -1;
			break;
		case O_FBYTES:
			if (opt_long("fault-bytes", optarg, -1, MAX_FAULT_BYTES, &p->fault_bytes))
				return -1;
			break;
		case O_CLOSE:
			cfg->close_on_accept = 1;
			break;
		case O_MODWORDS:
			mod_words = optarg;
			break;
		case O_MODSCORE:
			if (parse_double(optarg, 0, 1, &p->moderation_score)) {
				fprintf(stderr,
				        "sluice-mockllm: --moderation-score wants 0..1, got %s\n",
				        optarg);
				return -1;
			}
			break;
		case 'h':
			usage(stdout);
			exit(0);
		default:
			usage(stderr);
			return -1;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "sluice-mockllm: unexpected argument %s\n", argv[optind]);
		return -1;
	}
	if (moderation_parse(mod_words, cfg) != 0) {
		fprintf(stderr,
		        "sluice-mockllm: --moderation-words wants 'category=word,word;...', got "
		        "%s\n",
		        mod_words ? mod_words : "(built-in)");
		return -1;
	}
	return 0;
}

/* One listening socket; *port is the port to bind (updated with the one picked for 0). */
static int open_listener(const struct mock_config *cfg, char *port, size_t port_size, int reuseport)
{
	struct addrinfo hints, *res = NULL;
	char host[256];
	const char *h = cfg->host;
	size_t hl = strlen(h);
	int fd = -1, one = 1, rc;

	if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
		memcpy(host, h + 1, hl - 2);
		host[hl - 2] = '\0';
	} else {
		snprintf(host, sizeof(host), "%s", h);
	}
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
	rc = getaddrinfo(host[0] && strcmp(host, "*") ? host : NULL, port, &hints, &res);
	if (rc != 0) {
		fprintf(stderr, "sluice-mockllm: %s:%s: %s\n", cfg->host, port, gai_strerror(rc));
		return -1;
	}
	fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
		goto fail;
	/* Accepted sockets inherit TCP_NODELAY from the listener. */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 4096) != 0)
		goto fail;
	if (strcmp(port, "0") == 0) {
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);

		if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0)
			goto fail;
		snprintf(port, port_size, "%u",
		         ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
		                                  : ntohs(((struct sockaddr_in *)&ss)->sin_port));
	}
	freeaddrinfo(res);
	return fd;
fail:
	fprintf(stderr, "sluice-mockllm: listen on %s:%s: %s\n", cfg->host, port, strerror(errno));
	if (fd >= 0)
		close(fd);
	freeaddrinfo(res);
	return -1;
}

static void *worker_main(void *arg)
{
	struct mock_worker *w = arg;

	event_base_dispatch(w->base);
	return NULL;
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
	struct mock_app *a = arg;

	(void)sig;
	(void)what;
	/* loopexit (not loopbreak): it is not lost if a loop has not started yet. */
	for (int i = 0; i < a->cfg.threads; i++)
		event_base_loopexit(a->workers[i].base, NULL);
}

int main(int argc, char **argv)
{
	static struct mock_app app;
	struct mock_app *a = &app;
	struct event *sigterm = NULL, *sigint = NULL;
	char port[16];
	int rc = 1, started = 0;

	if (parse_args(argc, argv, &a->cfg) != 0) {
		moderation_free(&a->cfg);
		json_decref(a->cfg.owned_json);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	a->mt = a->cfg.threads > 1;
	if (a->mt && evthread_use_pthreads() != 0) {
		fprintf(stderr, "sluice-mockllm: evthread_use_pthreads failed\n");
		return 1;
	}
	pthread_mutex_init(&a->lock, NULL);
	a->st.last_disconnect_deltas = -1;
	rec_init(&a->rec, (size_t)a->cfg.record, (size_t)a->cfg.record_body_max);
	a->workers = calloc((size_t)a->cfg.threads, sizeof(*a->workers));
	if (a->workers == NULL)
		return 1;

	memcpy(port, a->cfg.port, sizeof(port));
	for (int i = 0; i < a->cfg.threads; i++) {
		struct mock_worker *w = &a->workers[i];

		w->app = a;
		w->index = i;
		w->listen_fd = -1;
		w->rng = (a->cfg.seed + 1) * 0x9E3779B97F4A7C15ULL +
		         (uint64_t)i * 0xD1B54A32D192ED03ULL;
		if (w->rng == 0)
			w->rng = 1;
		/* Without PRECISE_TIMER libevent reads CLOCK_MONOTONIC_COARSE (jiffies, 4 ms
		 * on many kernels): a 1 ms ttft took 4 ms. */
		{
			struct event_config *ec = event_config_new();

			if (ec != NULL) {
				event_config_set_flag(ec, EVENT_BASE_FLAG_PRECISE_TIMER);
				w->base = event_base_new_with_config(ec);
				event_config_free(ec);
			}
		}
		w->http = w->base ? evhttp_new(w->base) : NULL;
		w->scratch = evbuffer_new();
		w->pfx = evbuffer_new();
		if (w->http == NULL || w->scratch == NULL || w->pfx == NULL) {
			fprintf(stderr, "sluice-mockllm: out of memory\n");
			goto out;
		}
		evhttp_set_gencb(w->http, mock_handle, w);
		evhttp_set_allowed_methods(w->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST |
		                                            EVHTTP_REQ_HEAD | EVHTTP_REQ_PUT |
		                                            EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS |
		                                            EVHTTP_REQ_PATCH);
		/* Long gaps between stream events must not trip evhttp's read timeout. */
		evhttp_set_timeout(w->http, 3600);
		w->listen_fd = open_listener(&a->cfg, port, sizeof(port), a->cfg.threads > 1);
		if (w->listen_fd < 0)
			goto out;
		if (a->cfg.close_on_accept) {
			w->closer = fault_closer_new(w->base, w->listen_fd);
			if (w->closer == NULL) {
				fprintf(stderr, "sluice-mockllm: evconnlistener_new failed\n");
				close(w->listen_fd);
				goto out;
			}
		} else if (evhttp_accept_socket_with_handle(w->http, w->listen_fd) == NULL) {
			fprintf(stderr, "sluice-mockllm: evhttp_accept_socket failed\n");
			close(w->listen_fd);
			goto out;
		}
	}

	sigterm = evsignal_new(a->workers[0].base, SIGTERM, on_signal, a);
	sigint = evsignal_new(a->workers[0].base, SIGINT, on_signal, a);
	if (sigterm == NULL || sigint == NULL || evsignal_add(sigterm, NULL) != 0 ||
	    evsignal_add(sigint, NULL) != 0)
		goto out;

	printf("listening on %s:%s\n", a->cfg.host, port);
	fflush(stdout);

	for (int i = 1; i < a->cfg.threads; i++) {
		if (pthread_create(&a->workers[i].thread, NULL, worker_main, &a->workers[i]) != 0) {
			fprintf(stderr, "sluice-mockllm: pthread_create failed\n");
			on_signal(0, 0, a);
			break;
		}
		started = i;
	}
	event_base_dispatch(a->workers[0].base);
	for (int i = 1; i <= started; i++)
		pthread_join(a->workers[i].thread, NULL);
	rc = 0;

out:
	if (sigterm)
		event_free(sigterm);
	if (sigint)
		event_free(sigint);
	for (int i = 0; i < a->cfg.threads; i++) {
		struct mock_worker *w = &a->workers[i];

		if (w->closer)
			evconnlistener_free(w->closer);
		if (w->http) {
			mock_worker_drop_requests(w);
			evhttp_free(w->http);
		}
		if (w->scratch)
			evbuffer_free(w->scratch);
		if (w->pfx)
			evbuffer_free(w->pfx);
		if (w->base)
			event_base_free(w->base);
	}
	free(a->workers);
	rec_free(&a->rec);
	moderation_free(&a->cfg);
	json_decref(a->cfg.owned_json);
	pthread_mutex_destroy(&a->lock);
	libevent_global_shutdown();
	return rc;
}
