/* test_log.c — the error log: one descriptor number across reopens, control bytes escaped. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sluice/log.h"

static char dir[PATH_MAX];

static void path_of(char *out, size_t cap, const char *name)
{
	snprintf(out, cap, "%s/%s", dir, name);
}

static char *slurp(const char *path)
{
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	static char buf[65536];
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	return buf;
}

/* The descriptor number that currently refers to path, or -1. */
static int fd_of(const char *path)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int found = -1;

	assert_non_null(d);
	while ((e = readdir(d)) != NULL) {
		char link[PATH_MAX + 32], target[PATH_MAX];
		snprintf(link, sizeof(link), "/proc/self/fd/%s", e->d_name);
		ssize_t n = readlink(link, target, sizeof(target) - 1);
		if (n < 0)
			continue;
		target[n] = '\0';
		if (strcmp(target, path) == 0 && atoi(e->d_name) != dirfd(d))
			found = atoi(e->d_name);
	}
	closedir(d);
	return found;
}

static int setup(void **state)
{
	snprintf(dir, sizeof(dir), "/tmp/sluice-test-log-XXXXXX");
	assert_non_null(mkdtemp(dir));
	log_set_level(LOG_LEVEL_DEBUG);
	return 0;
}

static int teardown(void **state)
{
	log_open("stderr");
	char cmd[PATH_MAX + 16];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	assert_int_equal(system(cmd), 0);
	return 0;
}

/*
 * A worker may load the descriptor just before a reopen and write just after
 * it: the number it writes to must then still be the log, not a closed number
 * that a new client socket took. So once a file is open, every later target —
 * a reopened file, another file, stderr — lives at that same number.
 */
static void test_reopen_keeps_the_number(void **state)
{
	char a[PATH_MAX + 8], a1[PATH_MAX + 8], b[PATH_MAX + 8];
	path_of(a, sizeof(a), "a.log");
	path_of(a1, sizeof(a1), "a.log.1");
	path_of(b, sizeof(b), "b.log");

	assert_true(log_open(a));
	int fd = fd_of(a);
	assert_true(fd > 2);
	log_info("first");

	/* logrotate: rename, then SIGUSR1 */
	assert_int_equal(rename(a, a1), 0);
	log_reopen();
	assert_int_equal(fd_of(a), fd);
	assert_int_equal(fd_of(a1), -1); /* the renamed file is released */
	log_info("second");

	/* a reload naming another file */
	assert_true(log_open(b));
	assert_int_equal(fd_of(b), fd);
	assert_int_equal(fd_of(a), -1);
	log_info("third");

	/* a reload back to stderr, then to a file again */
	assert_true(log_open("stderr"));
	assert_int_equal(fd_of(b), -1);
	assert_true(log_open(a));
	assert_int_equal(fd_of(a), fd);
	log_info("fourth");

	assert_non_null(strstr(slurp(a1), "first"));
	assert_null(strstr(slurp(a1), "second"));
	char *s = slurp(a);
	assert_non_null(strstr(s, "second"));
	assert_non_null(strstr(s, "fourth"));
	assert_null(strstr(s, "third"));
	assert_non_null(strstr(slurp(b), "third"));
}

/* A failed reopen keeps the old file, and the next one works. */
static void test_failed_reopen_keeps_logging(void **state)
{
	char sub[PATH_MAX + 8], p[PATH_MAX + 16];
	path_of(sub, sizeof(sub), "sub");
	assert_int_equal(mkdir(sub, 0700), 0);
	snprintf(p, sizeof(p), "%s/x.log", sub);
	assert_true(log_open(p));
	log_info("before");
	char moved[PATH_MAX + 16];
	path_of(moved, sizeof(moved), "moved");
	assert_int_equal(rename(sub, moved), 0); /* the directory is gone: reopen fails */
	log_reopen();
	log_info("during");
	assert_int_equal(mkdir(sub, 0700), 0);
	log_reopen();
	log_info("after");
	char old[PATH_MAX + 32];
	snprintf(old, sizeof(old), "%s/x.log", moved);
	char *s = slurp(old);
	assert_non_null(strstr(s, "before"));
	assert_non_null(strstr(s, "during"));
	assert_non_null(strstr(slurp(p), "after"));
}

/* A request target with a bare LF once forged a second log line. */
static void test_control_bytes_escaped(void **state)
{
	char a[PATH_MAX + 8];
	path_of(a, sizeof(a), "ctl.log");
	assert_true(log_open(a));
	log_warn("bad target %s", "/v1/x\n2030-01-01T00:00:00.000Z [error] forged\r\x01\x7f");
	char *s = slurp(a);
	assert_int_equal(strchr(s, '\n'), s + strlen(s) - 1); /* one line */
	assert_non_null(
	        strstr(s, "/v1/x\\x0a2030-01-01T00:00:00.000Z [error] forged\\x0d\\x01\\x7f\n"));

	/* A long message stays one line within the line buffer. */
	char big[6000];
	memset(big, '\n', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	log_warn("%s", big);
	s = slurp(a);
	size_t lines = 0;
	for (char *q = s; (q = strchr(q, '\n')) != NULL; q++)
		lines++;
	assert_int_equal(lines, 2);
	assert_true(strlen(s) < 2 * 4096);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test_setup_teardown(test_reopen_keeps_the_number, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_failed_reopen_keeps_logging, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_control_bytes_escaped, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
