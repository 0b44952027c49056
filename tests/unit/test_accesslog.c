/* test_accesslog.c — access-log lines: fields, JSON escaping, reopen after rename, concurrent
 * writers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "sluice/accesslog.h"
#include "sluice/record.h"

struct fixture {
	char dir[64];
	char path[128];
};

static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));
	snprintf(f->dir, sizeof(f->dir), "/tmp/sluice-accesslog-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->path, sizeof(f->path), "%s/access.log", f->dir);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *f = *state;
	char cmd[160];
	accesslog_close();
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->dir);
	assert_int_equal(system(cmd), 0);
	free(f);
	return 0;
}

/* The file's lines, each parsed; *n set to their count. */
static json_t **read_lines(const char *path, size_t *n)
{
	FILE *fp = fopen(path, "r");
	assert_non_null(fp);
	json_t **v = NULL;
	size_t cap = 0;
	char *line = NULL;
	size_t lcap = 0;
	ssize_t len;
	*n = 0;
	while ((len = getline(&line, &lcap, fp)) > 0) {
		assert_int_equal(line[len - 1], '\n');
		json_error_t err;
		json_t *j = json_loadb(line, (size_t)len - 1, 0, &err);
		if (j == NULL)
			fail_msg("line %zu is not JSON (%s): %.200s", *n + 1, err.text, line);
		if (*n == cap) {
			cap = cap ? cap * 2 : 16;
			json_t **nv = realloc(v, cap * sizeof(*v));
			assert_non_null(nv);
			v = nv;
		}
		v[(*n)++] = j;
	}
	free(line);
	fclose(fp);
	return v;
}

static void free_lines(json_t **v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		json_decref(v[i]);
	free(v);
}

static const char *str(json_t *o, const char *k)
{
	json_t *v = json_object_get(o, k);
	assert_true(json_is_string(v));
	return json_string_value(v);
}

static struct request_record full_record(void)
{
	struct request_record r = {0};
	r.request_id = "0a1b2c3d-7";
	r.start_unix_us = 1714564800123456ull; /* 2024-05-01T12:00:00.123456Z */
	r.method = "POST";
	r.path = "/v1/chat/completions";
	r.client_ip = "10.1.2.3";
	r.route = "chat";
	r.consumer = "team-a";
	r.key_fingerprint = "2c26b46b68ff";
	r.model_requested = "qwen";
	r.model_upstream = "Qwen/Qwen2.5-32B-Instruct";
	r.instance = "qwen-onprem-b";
	r.stream = true;
	r.status = 200;
	r.upstream_status = 200;
	r.attempts[0] = (struct record_attempt){"qwen-onprem-c", "http_503", 503, 12345};
	r.attempts[1] = (struct record_attempt){"qwen-onprem-b", "ok", 200, 2000001};
	r.n_attempts = 2;
	r.bytes_in = 321;
	r.bytes_out = 4567;
	r.ttft_us = 400250;
	r.total_us = 2100000;
	r.upstream_us = 2012346;
	r.overhead_us = 87654;
	r.usage = (struct record_usage){.present = true,
	                                .prompt = 11,
	                                .completion = 22,
	                                .total = 33,
	                                .cached = 4,
	                                .reasoning = 5};
	return r;
}

static void test_fields(void **state)
{
	struct fixture *f = *state;
	assert_true(accesslog_open(f->path));
	struct request_record r = full_record();
	accesslog_write(&r);
	struct request_record e = {0}; /* a request rejected before routing */
	e.method = "GET";
	e.path = "/nowhere";
	e.status = 404;
	e.error_code = "no_route";
	e.total_us = 150;
	accesslog_write(&e);

	size_t n;
	json_t **v = read_lines(f->path, &n);
	assert_int_equal(n, 2);
	json_t *j = v[0];
	assert_string_equal(str(j, "time"), "2024-05-01T12:00:00.123Z");
	assert_string_equal(str(j, "request_id"), "0a1b2c3d-7");
	assert_string_equal(str(j, "method"), "POST");
	assert_string_equal(str(j, "path"), "/v1/chat/completions");
	assert_string_equal(str(j, "client_ip"), "10.1.2.3");
	assert_string_equal(str(j, "route"), "chat");
	assert_string_equal(str(j, "consumer"), "team-a");
	assert_string_equal(str(j, "key_fingerprint"), "2c26b46b68ff");
	assert_string_equal(str(j, "model"), "qwen");
	assert_string_equal(str(j, "upstream_model"), "Qwen/Qwen2.5-32B-Instruct");
	assert_string_equal(str(j, "instance"), "qwen-onprem-b");
	assert_true(json_is_true(json_object_get(j, "stream")));
	assert_int_equal(json_integer_value(json_object_get(j, "status")), 200);
	assert_int_equal(json_integer_value(json_object_get(j, "upstream_status")), 200);
	assert_true(json_is_null(json_object_get(j, "error_code")));
	json_t *att = json_object_get(j, "attempts");
	assert_int_equal(json_array_size(att), 2);
	json_t *a0 = json_array_get(att, 0);
	assert_string_equal(str(a0, "instance"), "qwen-onprem-c");
	assert_string_equal(str(a0, "outcome"), "http_503");
	assert_int_equal(json_integer_value(json_object_get(a0, "status")), 503);
	assert_true(json_real_value(json_object_get(a0, "latency_ms")) == 12.345);
	assert_true(json_real_value(json_object_get(json_array_get(att, 1), "latency_ms")) ==
	            2000.001);
	assert_int_equal(json_integer_value(json_object_get(j, "bytes_in")), 321);
	assert_int_equal(json_integer_value(json_object_get(j, "bytes_out")), 4567);
	assert_true(json_real_value(json_object_get(j, "ttft_ms")) == 400.25);
	assert_true(json_real_value(json_object_get(j, "total_ms")) == 2100.0);
	assert_true(json_real_value(json_object_get(j, "upstream_ms")) == 2012.346);
	assert_true(json_real_value(json_object_get(j, "overhead_ms")) == 87.654);
	json_t *u = json_object_get(j, "usage");
	assert_int_equal(json_integer_value(json_object_get(u, "prompt")), 11);
	assert_int_equal(json_integer_value(json_object_get(u, "completion")), 22);
	assert_int_equal(json_integer_value(json_object_get(u, "total")), 33);
	assert_int_equal(json_integer_value(json_object_get(u, "cached")), 4);
	assert_int_equal(json_integer_value(json_object_get(u, "reasoning")), 5);
	assert_true(json_is_false(json_object_get(u, "estimated")));
	/* Payloads only with log.payloads (request.c sets them in the record). */
	assert_null(json_object_get(j, "prompt"));
	assert_null(json_object_get(j, "output"));

	j = v[1];
	assert_true(json_is_null(json_object_get(j, "route")));
	assert_true(json_is_null(json_object_get(j, "consumer")));
	assert_true(json_is_null(json_object_get(j, "upstream_status")));
	assert_true(json_is_null(json_object_get(j, "ttft_ms")));
	assert_true(json_is_null(json_object_get(j, "usage")));
	assert_string_equal(str(j, "error_code"), "no_route");
	assert_int_equal(json_array_size(json_object_get(j, "attempts")), 0);
	assert_true(json_real_value(json_object_get(j, "total_ms")) == 0.15);
	free_lines(v, n);
}

static void test_escaping_and_payloads(void **state)
{
	struct fixture *f = *state;
	assert_true(accesslog_open(f->path));
	struct request_record r = full_record();
	r.path = "/v1/\"quoted\"\\back\nnl\ttab\x01\x1f\x7f é 漢 😀 \xff\xc3 \xed\xa0\x80 end";
	r.prompt_payload = "[{\"role\":\"user\",\"content\":\"hi\\n\"}]";
	r.output_payload = "line1\nline2 \"q\"";
	r.usage.estimated = true;
	accesslog_write(&r);

	size_t n;
	json_t **v = read_lines(f->path, &n);
	assert_int_equal(n, 1);
	/* Valid UTF-8 passes through; bytes that are not UTF-8 (a stray 0xff, a
	 * truncated sequence, an encoded surrogate) become U+FFFD. */
	assert_string_equal(
	        str(v[0], "path"),
	        "/v1/\"quoted\"\\back\nnl\ttab\x01\x1f\x7f é 漢 😀 \xef\xbf\xbd\xef\xbf\xbd "
	        "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd end");
	assert_string_equal(str(v[0], "prompt"), r.prompt_payload);
	assert_string_equal(str(v[0], "output"), r.output_payload);
	assert_true(json_is_true(json_object_get(json_object_get(v[0], "usage"), "estimated")));
	free_lines(v, n);

	/* The formatter alone: snprintf semantics. */
	char small[16];
	size_t need = accesslog_format(&r, small, sizeof(small));
	assert_true(need > sizeof(small));
	assert_int_equal(strlen(small), sizeof(small) - 1);
	char *big = malloc(need + 1);
	assert_int_equal(accesslog_format(&r, big, need + 1), need);
	assert_int_equal(strlen(big), need);
	free(big);
}

static void test_long_line(void **state)
{
	struct fixture *f = *state;
	assert_true(accesslog_open(f->path));
	struct request_record r = full_record();
	size_t len = 100000;
	char *p = malloc(len + 1);
	for (size_t i = 0; i < len; i++)
		p[i] = (char)('a' + i % 26);
	p[len] = '\0';
	r.output_payload = p;
	accesslog_write(&r);
	size_t n;
	json_t **v = read_lines(f->path, &n);
	assert_int_equal(n, 1);
	assert_int_equal(strlen(str(v[0], "output")), len);
	free_lines(v, n);
	free(p);
}

static void test_reopen_after_rename(void **state)
{
	struct fixture *f = *state;
	char rotated[160];
	snprintf(rotated, sizeof(rotated), "%s.1", f->path);
	assert_true(accesslog_open(f->path));
	assert_true(accesslog_open(f->path)); /* the same target again: no-op */
	struct request_record r = full_record();
	r.request_id = "before";
	accesslog_write(&r);
	assert_int_equal(rename(f->path, rotated), 0);
	r.request_id = "between"; /* after logrotate's rename, before SIGUSR1 */
	accesslog_write(&r);
	accesslog_reopen();
	r.request_id = "after";
	accesslog_write(&r);

	size_t n;
	json_t **v = read_lines(rotated, &n);
	assert_int_equal(n, 2);
	assert_string_equal(str(v[0], "request_id"), "before");
	assert_string_equal(str(v[1], "request_id"), "between");
	free_lines(v, n);
	v = read_lines(f->path, &n);
	assert_int_equal(n, 1);
	assert_string_equal(str(v[0], "request_id"), "after");
	free_lines(v, n);

	struct stat st;
	assert_int_equal(stat(f->path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0640);
}

static void test_switch_and_off(void **state)
{
	struct fixture *f = *state;
	char other[160];
	snprintf(other, sizeof(other), "%s/other.log", f->dir);
	struct request_record r = full_record();

	accesslog_write(&r); /* not opened: nothing, no crash */
	assert_true(accesslog_open(f->path));
	r.request_id = "one";
	accesslog_write(&r);
	assert_true(accesslog_open(other)); /* reload with a new path */
	r.request_id = "two";
	accesslog_write(&r);
	assert_true(accesslog_open(NULL)); /* access_log: off */
	r.request_id = "three";
	accesslog_write(&r);
	assert_true(accesslog_open("off"));
	assert_false(accesslog_open("/nonexistent-dir/x/access.log"));
	assert_true(accesslog_open(f->path));
	r.request_id = "four";
	accesslog_write(&r);

	size_t n;
	json_t **v = read_lines(f->path, &n);
	assert_int_equal(n, 2);
	assert_string_equal(str(v[0], "request_id"), "one");
	assert_string_equal(str(v[1], "request_id"), "four");
	free_lines(v, n);
	v = read_lines(other, &n);
	assert_int_equal(n, 1);
	assert_string_equal(str(v[0], "request_id"), "two");
	free_lines(v, n);
}

#define WRITERS          4
#define LINES_PER_WRITER 400

struct writer {
	int id;
	char *payload;
};

static void *writer_main(void *arg)
{
	struct writer *w = arg;
	char id[32];
	struct request_record r = full_record();
	r.request_id = id;
	r.output_payload = w->payload;
	for (int i = 0; i < LINES_PER_WRITER; i++) {
		snprintf(id, sizeof(id), "w%d-%d", w->id, i);
		accesslog_write(&r);
	}
	return NULL;
}

static void test_concurrent_writers(void **state)
{
	struct fixture *f = *state;
	assert_true(accesslog_open(f->path));
	pthread_t t[WRITERS];
	struct writer w[WRITERS];
	for (int i = 0; i < WRITERS; i++) {
		/* Lines of different sizes, some beyond PIPE_BUF and the stack buffer. */
		size_t len = 1000 + (size_t)i * 4000;
		w[i].id = i;
		w[i].payload = malloc(len + 1);
		memset(w[i].payload, 'A' + i, len);
		w[i].payload[len] = '\0';
		assert_int_equal(pthread_create(&t[i], NULL, writer_main, &w[i]), 0);
	}
	for (int i = 0; i < WRITERS; i++)
		pthread_join(t[i], NULL);

	size_t n;
	json_t **v = read_lines(f->path, &n); /* fails on any interleaved line */
	assert_int_equal(n, WRITERS * LINES_PER_WRITER);
	int next[WRITERS] = {0};
	for (size_t i = 0; i < n; i++) {
		int wid, seq;
		assert_int_equal(sscanf(str(v[i], "request_id"), "w%d-%d", &wid, &seq), 2);
		assert_true(wid >= 0 && wid < WRITERS);
		assert_int_equal(seq, next[wid]++); /* each writer's lines in its order */
		assert_string_equal(str(v[i], "output"), w[wid].payload);
	}
	free_lines(v, n);
	for (int i = 0; i < WRITERS; i++)
		free(w[i].payload);
}

/* cost: in price units, exact to the micro-unit, only when a price applies */
static void test_cost_field(void **state)
{
	struct fixture *f = *state;
	char buf[4096];
	struct request_record r = full_record();

	accesslog_format(&r, buf, sizeof(buf));
	assert_null(strstr(buf, "\"cost\""));
	r.priced = true;
	r.cost_micros = 1234567;
	accesslog_format(&r, buf, sizeof(buf));
	assert_non_null(strstr(buf, ",\"cost\":1.234567"));
	r.cost_micros = 7;
	accesslog_format(&r, buf, sizeof(buf));
	assert_non_null(strstr(buf, ",\"cost\":0.000007"));
	r.cost_micros = 0; /* priced, and free: still said */
	assert_true(accesslog_open(f->path));
	accesslog_write(&r);
	size_t n;
	json_t **v = read_lines(f->path, &n);
	assert_int_equal(n, 1);
	assert_true(json_is_real(json_object_get(v[0], "cost")));
	assert_true(json_real_value(json_object_get(v[0], "cost")) == 0.0);
	free_lines(v, n);
}

/* Sets the file size limit of the process (the file system's "full" here): a write that
 * crosses it is cut short, the next one fails with EFBIG, as on a full disk. */
static void limit_file_size(rlim_t bytes)
{
	struct rlimit rl;
	assert_int_equal(getrlimit(RLIMIT_FSIZE, &rl), 0);
	rl.rlim_cur = bytes;
	assert_int_equal(setrlimit(RLIMIT_FSIZE, &rl), 0);
}

/* A line cut by a full disk is finished before the next one once there is room again: no
 * two records glued on one line. */
static void test_torn_line_is_finished(void **state)
{
	struct fixture *f = *state;
	struct request_record r = full_record();
	char id[32];
	struct stat st;
	struct rlimit saved;
	size_t n;

	assert_int_equal(getrlimit(RLIMIT_FSIZE, &saved), 0);
	signal(SIGXFSZ, SIG_IGN);
	assert_true(accesslog_open(f->path));
	r.request_id = id;
	snprintf(id, sizeof(id), "first");
	accesslog_write(&r);
	assert_int_equal(stat(f->path, &st), 0);
	/* room for a third of the next line */
	limit_file_size((rlim_t)st.st_size * 4 / 3);
	for (int i = 0; i < 3; i++) { /* cut, then refused: these are lost */
		snprintf(id, sizeof(id), "lost-%d", i);
		accesslog_write(&r);
	}
	assert_int_equal(setrlimit(RLIMIT_FSIZE, &saved), 0); /* room again */
	snprintf(id, sizeof(id), "after");
	accesslog_write(&r);
	accesslog_write(&r);
	signal(SIGXFSZ, SIG_DFL);

	json_t **v = read_lines(f->path, &n); /* fails on a glued or cut line */
	assert_int_equal(n, 4);
	assert_string_equal(str(v[0], "request_id"), "first");
	assert_string_equal(str(v[1], "request_id"), "lost-0"); /* its end written late */
	assert_string_equal(str(v[2], "request_id"), "after");
	assert_string_equal(str(v[3], "request_id"), "after");
	free_lines(v, n);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test_setup_teardown(test_fields, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_escaping_and_payloads, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_long_line, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_reopen_after_rename, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_switch_and_off, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_concurrent_writers, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_cost_field, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_torn_line_is_finished, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
