/* log.h — leveled error log (stderr or a file), safe from any thread. */
#ifndef SLUICE_LOG_H
#define SLUICE_LOG_H

#include <stdbool.h>

enum log_level { LOG_LEVEL_DEBUG, LOG_LEVEL_INFO, LOG_LEVEL_WARN, LOG_LEVEL_ERROR };

/* Direct the log to "stderr" (or NULL) or a file path, appended. */
bool log_open(const char *target);
/* Reopen the file (SIGUSR1, after logrotate). */
void log_reopen(void);
void log_set_level(enum log_level level);
bool log_parse_level(const char *s, enum log_level *out);
extern enum log_level log_min_level;

void log_write(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_at(lvl, ...)                                                                           \
	do {                                                                                       \
		if ((lvl) >= log_min_level)                                                        \
			log_write((lvl), __VA_ARGS__);                                             \
	} while (0)
#define log_debug(...) log_at(LOG_LEVEL_DEBUG, __VA_ARGS__)
#define log_info(...) log_at(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_warn(...) log_at(LOG_LEVEL_WARN, __VA_ARGS__)
#define log_error(...) log_at(LOG_LEVEL_ERROR, __VA_ARGS__)

#endif
