/* test_notify.c — sd_notify datagrams to a socket named by NOTIFY_SOCKET (path and abstract). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "sluice/notify.h"

struct fixture {
	int fd;
	char dir[64];
	char path[128];
};

static int bind_socket(const char *name, bool abstract)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	size_t len = strlen(name);
	socklen_t salen;
	int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	assert_true(fd >= 0);
	if (abstract) {
		memcpy(sa.sun_path + 1, name, len); /* sun_path[0] stays NUL */
		salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
	} else {
		memcpy(sa.sun_path, name, len);
		salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
	}
	assert_int_equal(bind(fd, (struct sockaddr *)&sa, salen), 0);
	/* A receive timeout turns a lost datagram into a failure, not a hang. */
	struct timeval tv = {10, 0};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	return fd;
}

static int setup_path(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));
	snprintf(f->dir, sizeof(f->dir), "/tmp/sluice-notify-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->path, sizeof(f->path), "%s/notify.sock", f->dir);
	f->fd = bind_socket(f->path, false);
	setenv("NOTIFY_SOCKET", f->path, 1);
	*state = f;
	return 0;
}

static int teardown_path(void **state)
{
	struct fixture *f = *state;
	close(f->fd);
	unlink(f->path);
	rmdir(f->dir);
	unsetenv("NOTIFY_SOCKET");
	free(f);
	return 0;
}

static void receive(int fd, char *buf, size_t len)
{
	ssize_t n = recv(fd, buf, len - 1, 0);
	assert_true(n > 0);
	buf[n] = '\0';
}

static uint64_t now_usec(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void expect_sequence(int fd)
{
	char buf[512];

	notify_ready();
	receive(fd, buf, sizeof(buf));
	assert_string_equal(buf, "READY=1");

	uint64_t before = now_usec();
	notify_reloading();
	uint64_t after = now_usec();
	receive(fd, buf, sizeof(buf));
	uint64_t usec = 0;
	int end = 0;
	assert_int_equal(sscanf(buf, "RELOADING=1\nMONOTONIC_USEC=%" SCNu64 "%n", &usec, &end), 1);
	assert_int_equal((size_t)end, strlen(buf)); /* nothing after the number */
	assert_true(usec >= before && usec <= after);

	notify_ready();
	receive(fd, buf, sizeof(buf));
	assert_string_equal(buf, "READY=1");

	notify_status("serving %d workers\nsecond line", 4);
	receive(fd, buf, sizeof(buf));
	assert_string_equal(buf, "STATUS=serving 4 workers second line");

	notify_stopping();
	receive(fd, buf, sizeof(buf));
	assert_string_equal(buf, "STOPPING=1");
}

static void test_path_socket(void **state)
{
	struct fixture *f = *state;
	expect_sequence(f->fd);
}

static void test_abstract_socket(void **state)
{
	char name[64];
	snprintf(name, sizeof(name), "sluice-test-notify-%d", (int)getpid());
	int fd = bind_socket(name, true);
	char env[80];
	snprintf(env, sizeof(env), "@%s", name);
	setenv("NOTIFY_SOCKET", env, 1);
	expect_sequence(fd);
	unsetenv("NOTIFY_SOCKET");
	close(fd);
}

static void test_without_socket(void **state)
{
	unsetenv("NOTIFY_SOCKET");
	assert_true(notify_send("READY=1")); /* nothing to do is not an error */
	notify_ready();
	notify_reloading();
	notify_stopping();
	notify_status("x");
	setenv("NOTIFY_SOCKET", "", 1);
	assert_true(notify_send("READY=1"));
	setenv("NOTIFY_SOCKET", "relative/path", 1);
	assert_false(notify_send("READY=1"));
	setenv("NOTIFY_SOCKET", "/nonexistent-dir/notify.sock", 1);
	assert_false(notify_send("READY=1")); /* logged, not fatal */
	unsetenv("NOTIFY_SOCKET");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test_setup_teardown(test_path_socket, setup_path, teardown_path),
	        cmocka_unit_test(test_abstract_socket),
	        cmocka_unit_test(test_without_socket),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
