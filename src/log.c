/* log.c — leveled error log: one line per event, timestamped, written atomically. */
#include "sluice/log.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum log_level log_min_level = LOG_LEVEL_INFO;

/* The fd is swapped under a mutex only on open/reopen; writers read it with one
 * load and write a whole line with one write(2), so lines never interleave. */
static int log_fd = STDERR_FILENO;
static char log_path[4096];
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

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

static bool open_target(const char *target)
{
	int fd;

	if (target == NULL || strcmp(target, "stderr") == 0) {
		fd = STDERR_FILENO;
		log_path[0] = '\0';
	} else {
		fd = open(target, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
		if (fd < 0) {
			log_error("cannot open log file %s: %s", target, strerror(errno));
			return false;
		}
		snprintf(log_path, sizeof(log_path), "%s", target);
	}
	pthread_mutex_lock(&log_lock);
	int old = log_fd;
	log_fd = fd;
	pthread_mutex_unlock(&log_lock);
	if (old != STDERR_FILENO && old != fd)
		close(old);
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
	if (log_path[0] != '\0') {
		char path[sizeof(log_path)];
		memcpy(path, log_path, sizeof(path));
		log_path[0] = '\0';
		open_target(path);
	}
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
	n += (size_t)w;
	if (n > sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	ssize_t r = write(log_fd, line, n);
	(void)r;
}
