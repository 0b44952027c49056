/* notify.c — sd_notify over $NOTIFY_SOCKET: READY, RELOADING, STOPPING and STATUS datagrams.
 *
 * The protocol is a datagram of newline-separated KEY=VALUE assignments sent to
 * a unix socket; linking libsystemd for that would add a dependency for twenty
 * lines of code. The socket is opened per message: messages are rare (start,
 * reload, stop), and nothing is kept open that a fork or a reload could leak.
 */
#include "sluice/notify.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "sluice/log.h"

bool notify_send(const char *msg)
{
	const char *path = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	size_t len;
	socklen_t salen;

	if (path == NULL || path[0] == '\0')
		return true;
	len = strlen(path);
	if ((path[0] != '/' && path[0] != '@') || len >= sizeof(sa.sun_path)) {
		log_debug("NOTIFY_SOCKET %s: not a usable unix socket address", path);
		return false;
	}
	memcpy(sa.sun_path, path, len);
	if (path[0] == '@') {
		/* Abstract namespace: a leading NUL, and the length counts exactly
		 * the name (no terminating NUL). */
		sa.sun_path[0] = '\0';
		salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
	} else {
		salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
	}

	int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		log_debug("sd_notify: socket: %s", strerror(errno));
		return false;
	}
	ssize_t n = sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen);
	int err = errno;
	close(fd);
	if (n < 0) {
		log_debug("sd_notify to %s: %s", path, strerror(err));
		return false;
	}
	return true;
}

void notify_ready(void)
{
	notify_send("READY=1");
}

void notify_reloading(void)
{
	/* systemd >= 253 (Type=notify-reload, and Type=notify with ExecReload)
	 * matches RELOADING=1 to the reload it started by this timestamp. */
	struct timespec ts;
	char msg[64];
	clock_gettime(CLOCK_MONOTONIC, &ts);
	snprintf(msg, sizeof(msg), "RELOADING=1\nMONOTONIC_USEC=%" PRIu64,
	         (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u);
	notify_send(msg);
}

void notify_stopping(void)
{
	notify_send("STOPPING=1");
}

void notify_status(const char *fmt, ...)
{
	char msg[512] = "STATUS=";
	va_list ap;
	va_start(ap, fmt);
	/* NOLINTNEXTLINE(clang-analyzer-valist.Uninitialized): va_start is right above */
	vsnprintf(msg + 7, sizeof(msg) - 7, fmt, ap);
	va_end(ap);
	/* One assignment per line: a newline in the text would start another. */
	for (char *p = msg; *p; p++)
		if (*p == '\n')
			*p = ' ';
	notify_send(msg);
}
