/* test_upstream.c — transfers against a scripted raw-socket server: headers, URL lifetime. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/buffer.h>
#include <event2/event.h>

#include "sluice/http.h"
#include "sluice/log.h"
#include "sluice/upstream.h"

/*
 * The server is a thread with blocking sockets that answers requests in the
 * order they arrive with the bytes of a script, whatever they are (the point is
 * to send what no well-behaved server would). A NULL step closes the connection
 * after reading its request, without a byte of answer: to libcurl, a reused
 * connection that died.
 */

#define MAX_STEPS 8

struct step {
	const char *bytes;
	size_t len;
};

struct server {
	int lfd, port;
	pthread_t thread;
	struct step steps[MAX_STEPS];
	size_t n_steps;
	int connections; /* accepted, read by the test after the thread ended */
};

/* Read one request head (GET: no body); false on EOF. */
static bool read_request(int fd)
{
	char buf[8192];
	size_t n = 0;

	while (n < sizeof(buf)) {
		ssize_t r = read(fd, buf + n, sizeof(buf) - n);
		if (r <= 0)
			return false;
		n += (size_t)r;
		if (memmem(buf, n, "\r\n\r\n", 4) != NULL)
			return true;
	}
	return false;
}

static void *server_main(void *arg)
{
	struct server *s = arg;
	size_t next = 0;

	while (next < s->n_steps) {
		int fd = accept(s->lfd, NULL, NULL);
		if (fd < 0)
			break;
		s->connections++;
		while (next < s->n_steps && read_request(fd)) {
			const struct step *st = &s->steps[next++];
			if (st->bytes == NULL)
				break;
			if (write(fd, st->bytes, st->len) != (ssize_t)st->len)
				break;
		}
		close(fd);
	}
	return NULL;
}

static void server_start(struct server *s)
{
	struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t slen = sizeof(sin);

	s->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(s->lfd >= 0);
	assert_int_equal(bind(s->lfd, (struct sockaddr *)&sin, sizeof(sin)), 0);
	assert_int_equal(listen(s->lfd, 8), 0);
	assert_int_equal(getsockname(s->lfd, (struct sockaddr *)&sin, &slen), 0);
	s->port = ntohs(sin.sin_port);
	assert_int_equal(pthread_create(&s->thread, NULL, server_main, s), 0);
}

static void server_stop(struct server *s)
{
	shutdown(s->lfd, SHUT_RDWR); /* wakes a blocked accept */
	pthread_join(s->thread, NULL);
	close(s->lfd);
}

#define STEP(lit) ((struct step){(lit), sizeof(lit) - 1})

/* ---------------------------------------------------------------- a transfer */

struct run {
	struct upstream_xfer x;
	bool done;
	enum upstream_result res;
	char body[256];
	size_t body_len;
};

static bool on_head(void *arg, long status)
{
	return true;
}

static size_t on_body(void *arg, const char *data, size_t len)
{
	struct run *r = arg;
	size_t room = sizeof(r->body) - r->body_len;
	size_t n = len < room ? len : room;
	memcpy(r->body + r->body_len, data, n);
	r->body_len += n;
	return len;
}

static void on_done(void *arg, enum upstream_result res, const char *detail)
{
	struct run *r = arg;
	r->done = true;
	r->res = res;
}

static const struct upstream_ops ops = {.on_head = on_head, .on_body = on_body, .on_done = on_done};
static const struct upstream_timeouts timeouts = {
        .connect = 5000, .first_byte = 10000, .idle = 10000, .total = 20000};

static struct event_base *base;
static struct upstream *up;

static void start(struct run *r, const char *url, struct upstream_url *u)
{
	memset(r, 0, sizeof(*r));
	upstream_xfer_init(&r->x, up, &ops, r);
	upstream_xfer_curlu(&r->x, u);
	assert_true(upstream_xfer_start(&r->x, "GET", url, NULL, 0, &timeouts, false, 60));
}

static void wait_done(struct run *r)
{
	uint64_t deadline = http_now_us() + 20 * 1000000ull;
	while (!r->done && http_now_us() < deadline)
		event_base_loop(base, EVLOOP_ONCE);
	assert_true(r->done);
}

static char *headers_text(struct run *r)
{
	size_t n = evbuffer_get_length(r->x.headers);
	char *s = malloc(n + 1);
	assert_non_null(s);
	evbuffer_copyout(r->x.headers, s, n);
	s[n] = '\0';
	return s;
}

static int setup(void **state)
{
	base = event_base_new();
	up = upstream_new(base);
	return base && up ? 0 : -1;
}

static int teardown(void **state)
{
	upstream_free(up);
	event_base_free(base);
	return 0;
}

/* ---------------------------------------------------------------- tests */

/* A bare CR inside a value must not reach the passed-through lines, where the
 * request path splits on CR: "X-A: b\rXContent-Length: 0" became a second
 * Content-Length at the client, and Set-Cookie passed the deny list the same
 * way. Such a line, a name that is no token (obs-fold, space before the colon)
 * and a value with other control bytes are dropped; clean lines are kept. */
static void test_headers_with_control_bytes_are_dropped(void **state)
{
	struct server s = {.n_steps = 1};
	s.steps[0] = STEP("HTTP/1.1 200 OK\r\n"
	                  "Content-Length: 2\r\n"
	                  "X-A: b\rXContent-Length: 0\r\n"
	                  "X-B: c\rSet-Cookie: sid=1\r\n"
	                  "X-Keep:  fine \t\r\n"
	                  "Bad Name: x\r\n"
	                  "X-Fold: y\r\n"
	                  " folded\r\n"
	                  "X-Ctl: a\x01"
	                  "b\r\n"
	                  "X-Del: a\x7f\r\n"
	                  "X-Empty:\r\n"
	                  "Content-Type: text/pl\rain\r\n"
	                  "Retry-After: 120\r\n"
	                  "\r\n"
	                  "ok");
	server_start(&s);
	char url[64];
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/h", s.port);
	struct run r;
	start(&r, url, NULL);
	wait_done(&r);
	server_stop(&s);

	assert_int_equal(r.res, UPSTREAM_OK);
	assert_int_equal(r.x.status, 200);
	char *h = headers_text(&r);
	assert_string_equal(h, "X-Keep: fine\r\n"
	                       "X-Fold: y\r\n"
	                       "X-Empty: \r\n"
	                       "Retry-After: 120\r\n");
	free(h);
	assert_string_equal(r.x.content_type, "");

	const char *v;
	size_t vl;
	assert_true(upstream_xfer_find_header(&r.x, "retry-after", &v, &vl));
	assert_int_equal(vl, 3);
	assert_memory_equal(v, "120", 3);
	assert_true(upstream_xfer_find_header(&r.x, "X-EMPTY", &v, &vl));
	assert_int_equal(vl, 0);
	assert_false(upstream_xfer_find_header(&r.x, "x-a", &v, &vl));
	assert_false(upstream_xfer_find_header(&r.x, "retry", &v, &vl));
	upstream_xfer_cleanup(&r.x);
}

/* A NUL in a header line: the line never reaches the passed-through headers
 * (libcurl may refuse the whole answer; either way nothing is cut at the NUL). */
static void test_header_with_nul(void **state)
{
	struct server s = {.n_steps = 1};
	s.steps[0] = STEP("HTTP/1.1 200 OK\r\n"
	                  "Content-Length: 2\r\n"
	                  "X-Nul: a\0Set-Cookie: b\r\n"
	                  "X-Keep: 1\r\n"
	                  "\r\n"
	                  "ok");
	server_start(&s);
	char url[64];
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/h", s.port);
	struct run r;
	start(&r, url, NULL);
	wait_done(&r);
	server_stop(&s);

	char *h = headers_text(&r);
	if (r.res == UPSTREAM_OK)
		assert_string_equal(h, "X-Keep: 1\r\n");
	else
		assert_null(strstr(h, "X-Nul"));
	free(h);
	upstream_xfer_cleanup(&r.x);
}

/* The owner (a worker on reload) releases a pre-parsed URL while a transfer
 * started with it is running, and libcurl then reads the handle again: the
 * reused connection dies under the request, so libcurl retries on a fresh one
 * and re-reads the CURLU to connect. The handle must live until the transfer
 * ends (under ASan, a use-after-free otherwise), and be freed then (a leak
 * otherwise). */
static void test_url_outlives_release(void **state)
{
	struct server s = {.n_steps = 3};
	s.steps[0] = STEP("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none");
	s.steps[1] = (struct step){NULL, 0}; /* the second request kills the kept connection */
	s.steps[2] = STEP("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo");
	server_start(&s);
	char url[64];
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/u", s.port);
	struct upstream_url *u = upstream_url_new(url);
	assert_non_null(u);

	struct run r;
	start(&r, url, u);
	wait_done(&r);
	assert_int_equal(r.res, UPSTREAM_OK);
	assert_int_equal(r.body_len, 3);
	assert_memory_equal(r.body, "one", 3);
	upstream_xfer_cleanup(&r.x);

	start(&r, url, u);
	upstream_url_release(u); /* a reload, with the transfer in flight */
	wait_done(&r);
	server_stop(&s);
	assert_int_equal(r.res, UPSTREAM_OK);
	assert_int_equal(r.body_len, 3);
	assert_memory_equal(r.body, "two", 3);
	assert_int_equal(s.connections, 2); /* the retry really reconnected */
	upstream_xfer_cleanup(&r.x);
}

/* Released with no transfer holding it: freed at once (LeakSanitizer checks). */
static void test_url_release_idle(void **state)
{
	assert_null(upstream_url_new("not a url"));
	upstream_url_release(NULL);
	struct upstream_url *u = upstream_url_new("http://127.0.0.1:1/x");
	assert_non_null(u);
	upstream_url_release(u);
}

int main(void)
{
	enum log_level lvl = LOG_LEVEL_ERROR;
	if (getenv("SLUICE_TEST_LOG"))
		log_parse_level(getenv("SLUICE_TEST_LOG"), &lvl);
	log_set_level(lvl);
	curl_global_init(CURL_GLOBAL_DEFAULT);
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test_setup_teardown(test_headers_with_control_bytes_are_dropped, setup,
	                                        teardown),
	        cmocka_unit_test_setup_teardown(test_header_with_nul, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_url_outlives_release, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_url_release_idle, setup, teardown),
	};
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	curl_global_cleanup();
	return rc;
}
