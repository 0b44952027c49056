/* log.c — leveled error log: one line per event, timestamped, written atomically. */
#include "sluice/log.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum log_level log_min_level = LOG_LEVEL_INFO;

/*
 * Descriptor handling, as in the access log (accesslog.c): writers load log_fd
 * and write a whole line with one write(2), so lines never interleave. Once a
 * file has been opened, log_fd is one number that never changes again; reopen
 * (SIGUSR1) and a new target (reload) dup3() the new file — or stderr — over
 * it, which is atomic: a worker writing at that moment lands whole in the old
 * file or the new one, never in a descriptor that was closed and reused for a
 * client socket. Open and reopen run on the main thread only.
 */
static _Atomic int log_fd = STDERR_FILENO;
static int log_stable = -1; /* the number kept across reopens; -1 until a file is opened */
static char log_path[4096]; /* the file, or "" for stderr (main thread) */
static const char *const level_names[] = {"debug", "info", "warn", "error"};

bool log_parse_level(const char *s, enum log_level *out)
{
	for (int i = 0; i < 4; i++) {
		if (strcasecmp(s, level_names[i]) == 0) {
			*out = (enum log_level)i;
			return true;
		}
	}
	if (strcasecmp(s, "warning") == 0) {
		*out = LOG_LEVEL_WARN;
		return true;
	}
	return false;
}

void log_set_level(enum log_level level)
{
	log_min_level = level;
}

/* Make log_stable refer to what fd refers to, then write through it; fd is
 * consumed unless it is stderr. */
static bool install(int fd)
{
	if (log_stable < 0) {
		if (fd == STDERR_FILENO)
			return true; /* nothing to swap yet: keep writing to 2 itself */
		log_stable = fd;
	} else if (fd != log_stable) {
		if (dup3(fd, log_stable, O_CLOEXEC) < 0) {
			int err = errno;
			if (fd != STDERR_FILENO)
				close(fd);
			log_error("log: dup3: %s", strerror(err));
			return false;
		}
		if (fd != STDERR_FILENO)
			close(fd);
	}
	atomic_store_explicit(&log_fd, log_stable, memory_order_release);
	return true;
}

static bool open_target(const char *target)
{
	int fd = STDERR_FILENO;

	if (target != NULL && strcmp(target, "stderr") != 0) {
		if (strlen(target) >= sizeof(log_path)) {
			log_error("log file path too long: %s", target);
			return false;
		}
		fd = open(target, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
		if (fd < 0) {
			log_error("cannot open log file %s: %s", target, strerror(errno));
			return false;
		}
	}
	if (!install(fd))
		return false;
	snprintf(log_path, sizeof(log_path), "%s", fd == STDERR_FILENO ? "" : target);
	return true;
}

bool log_open(const char *target)
{
	if (target != NULL && log_path[0] != '\0' && strcmp(target, log_path) == 0)
		return true;
	return open_target(target);
}

void log_reopen(void)
{
	/* On failure the old file keeps the log (and the next SIGUSR1 tries again). */
	if (log_path[0] != '\0') {
		char path[sizeof(log_path)];
		memcpy(path, log_path, sizeof(path));
		open_target(path);
	}
}

/* Bytes a message may carry from outside (a request target, an upstream's
 * error text): a CR or LF would forge a log line, other control bytes garble a
 * terminal. They are written as \xHH; the message is cut to what fits. */
static size_t escape_controls(char *msg, size_t len, size_t cap)
{
	size_t i = 0;

	while (i < len && (unsigned char)msg[i] >= 0x20 && msg[i] != 0x7f)
		i++;
	if (i == len)
		return len; /* the usual case: nothing to do, nothing copied */

	char tmp[4096];
	size_t n = 0;
	for (size_t j = i; j < len && n < sizeof(tmp); j++) {
		unsigned char c = (unsigned char)msg[j];
		if (c >= 0x20 && c != 0x7f) {
			tmp[n++] = (char)c;
		} else if (n + 4 <= sizeof(tmp)) {
			static const char hex[] = "0123456789abcdef";
			tmp[n++] = '\\';
			tmp[n++] = 'x';
			tmp[n++] = hex[c >> 4];
			tmp[n++] = hex[c & 15];
		} else {
			break;
		}
	}
	if (n > cap - i)
		n = cap - i;
	memcpy(msg + i, tmp, n);
	return i + n;
}

void log_write(enum log_level level, const char *fmt, ...)
{
	char line[4096];
	struct timeval tv;
	struct tm tm;
	size_t n;
	va_list ap;

	gettimeofday(&tv, NULL);
	gmtime_r(&tv.tv_sec, &tm);
	n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
	n += (size_t)snprintf(line + n, sizeof(line) - n, ".%03dZ [%s] ", (int)(tv.tv_usec / 1000),
	                      level_names[level]);
	va_start(ap, fmt);
	int w = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
	va_end(ap);
	if (w < 0)
		w = 0;
	size_t msg_len = (size_t)w < sizeof(line) - n ? (size_t)w : sizeof(line) - n - 1;
	n += escape_controls(line + n, msg_len, sizeof(line) - 1 - n);
	if (n > sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	ssize_t r = write(atomic_load_explicit(&log_fd, memory_order_acquire), line, n);
	(void)r;
}
