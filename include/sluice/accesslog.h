/* accesslog.h — the JSON access log: one line per request, to stdout, a file, or nowhere. */
#ifndef SLUICE_ACCESSLOG_H
#define SLUICE_ACCESSLOG_H

#include <stdbool.h>
#include <stddef.h>

struct request_record;

/*
 * target: "stdout", a file path (opened for append, created 0640), or NULL
 * (or "off") for no access log. Main thread, at start and on every reload; the
 * same target again is a no-op. On failure the previous target stays and the
 * error is logged.
 */
bool accesslog_open(const char *target);
/* SIGUSR1: reopen the file by its path (after logrotate renamed it). */
void accesslog_reopen(void);
/* Any worker thread: one JSON line, written with a single write(2) on an
 * O_APPEND descriptor so concurrent lines never interleave. Fields are those of
 * docs/operations.md ("Access log"); prompt and output appear only when the
 * record carries them (log.payloads: true). Keys never appear: only
 * key_fingerprint. */
void accesslog_write(const struct request_record *r);
/* A line another module built (JSON, no newline; the MCP gateway's), written the same way. */
void accesslog_write_line(const char *line, size_t len);
/* At exit, after the workers stopped. */
void accesslog_close(void);

/* The line accesslog_write would write, without the trailing newline, into
 * buf (NUL-terminated). Returns its length; when that is >= len the line did
 * not fit (like snprintf). For tests and tools. */
size_t accesslog_format(const struct request_record *r, char *buf, size_t len);

#endif
