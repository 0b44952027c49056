/* sse.h — incremental parser for text/event-stream (server-sent events). */
#ifndef SLUICE_SSE_H
#define SLUICE_SSE_H

#include <stdbool.h>
#include <stddef.h>

/*
 * Feed bytes as they arrive, split anywhere; the callback receives each complete
 * event (terminated by a blank line) exactly once, with the byte range of the
 * whole raw event (field lines + the blank line) so it can be forwarded
 * unchanged or dropped, plus the parsed "event:" name and joined "data:" value.
 * Lines end in \n, \r\n or \r (a \r at the end of one feed followed by \n at the
 * start of the next is ONE line end). Comment lines (":...") and unknown fields
 * are kept in the raw bytes and otherwise ignored. "data:" values are joined
 * with \n; one leading space after the colon is stripped. Every blank line ends
 * an event, so events without data (comment-only keep-alives) are delivered too
 * and the raw bytes of all events, concatenated, are exactly the input.
 *
 * The pointers in struct sse_event are valid only during the callback: raw may
 * point into the buffer passed to sse_feed or into the parser's own buffer.
 * A lone \r as the last byte of a feed cannot be told from the first half of a
 * \r\n; its line, and an event it ends, are processed when the next byte
 * arrives (until then those bytes count in sse_pending).
 */
struct sse_event {
	const char *raw;   /* whole event as received, including its blank line */
	size_t raw_len;
	const char *event; /* "" when absent; NUL-terminated */
	const char *data;  /* joined data lines; NUL-terminated */
	size_t data_len;
	bool has_data;     /* at least one data: line */
};

/* Return false to stop parsing (sse_feed then returns false too). */
typedef bool (*sse_event_fn)(void *arg, const struct sse_event *ev);

struct sse_parser {
	/* private: bytes of the event in progress (raw), and parsed fields */
	char *raw;
	size_t raw_len, raw_cap;
	char *data;
	size_t data_len, data_cap;
	char event[64];    /* longer names are truncated to 63 bytes */
	bool has_data;
	bool cr_pending;   /* last byte fed was \r: its line is not processed yet */
	size_t line_start; /* offset in raw of the current line */
	size_t max_event;  /* cap on one event's size; 0 = 1 MiB */
	bool overflow;
};

void sse_parser_init(struct sse_parser *p, size_t max_event);
void sse_parser_free(struct sse_parser *p);
/* Returns false when the callback stopped parsing (the rest of buf is not parsed)
 * or an event exceeded max_event (or its buffer could not be allocated); after an
 * overflow every later call returns false as well. */
bool sse_feed(struct sse_parser *p, const char *buf, size_t len, sse_event_fn fn, void *arg);
/* Bytes of an incomplete event held (to tell a truncated stream). */
size_t sse_pending(const struct sse_parser *p);

#endif
