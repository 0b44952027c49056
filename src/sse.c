/* sse.c — incremental text/event-stream parser: bytes in, one callback per complete event. */
#include "sluice/sse.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The header documents max_event == 0 as 1 MiB: large enough for any chat
 * chunk we have seen, small enough that a runaway upstream cannot make one
 * connection hold an unbounded buffer. */
#define SSE_DEFAULT_MAX_EVENT ((size_t)1 << 20)
/* First allocation of a buffer; it then doubles, so a stream of similar events
 * stops allocating after its first few events. */
#define SSE_MIN_ALLOC ((size_t)256)

enum sse_line {
	SSE_LINE_FIELD, /* a field, comment or unknown line: event continues */
	SSE_LINE_BLANK, /* the blank line that ends an event */
	SSE_LINE_NOMEM,
};

static bool sse_grow(char **buf, size_t *cap, size_t need);
static bool sse_raw_append(struct sse_parser *p, const char *s, size_t n);
static enum sse_line sse_line(struct sse_parser *p, const char *s, size_t n);
static bool sse_dispatch(struct sse_parser *p, const char *raw, size_t raw_len, sse_event_fn fn,
                         void *arg);
static bool sse_held_line_end(struct sse_parser *p, size_t eol_len, sse_event_fn fn, void *arg,
                              bool *dispatched);

/* ---------------------------------------------------------------------------
 * Public API
 * ------------------------------------------------------------------------- */

void sse_parser_init(struct sse_parser *p, size_t max_event)
{
	memset(p, 0, sizeof(*p));
	p->max_event = max_event ? max_event : SSE_DEFAULT_MAX_EVENT;
}

void sse_parser_free(struct sse_parser *p)
{
	free(p->raw);
	free(p->data);
	p->raw = p->data = NULL;
	p->raw_len = p->raw_cap = p->data_len = p->data_cap = 0;
}

size_t sse_pending(const struct sse_parser *p)
{
	return p->raw_len;
}

/*
 * Two modes share one loop. While no event is held from an earlier feed
 * (raw_len == 0), lines are parsed where they lie in buf and a complete event
 * is handed to the callback straight from buf: in the common case, where a
 * network read carries whole events, the raw bytes are never copied. Only the
 * unfinished tail of a feed is copied into p->raw; the next feed then appends
 * line by line to p->raw until the event's blank line, after which it is back
 * to parsing in place.
 *
 * A \r as the very last byte of a feed is the one case where a line end cannot
 * be classified yet (it may be the first half of \r\n). Its line is left
 * unprocessed, with cr_pending set, until the next byte arrives, so that an
 * event's raw bytes do not depend on where the stream was split.
 */
bool sse_feed(struct sse_parser *p, const char *buf, size_t len, sse_event_fn fn, void *arg)
{
	if (p->overflow)
		return false;
	if (len == 0)
		return true;

	size_t pos = 0;
	if (p->cr_pending) {
		size_t eol_len = 1;
		bool dispatched;

		p->cr_pending = false;
		if (buf[0] == '\n') {
			if (!sse_raw_append(p, buf, 1))
				return false;
			pos = 1;
			eol_len = 2;
		}
		if (!sse_held_line_end(p, eol_len, fn, arg, &dispatched))
			return false;
	}

	/* Start of the current event in buf; only meaningful while raw_len == 0. */
	size_t ev_start = pos;
	/* Position of the next \n at or after pos (len: none). Kept across lines so
	 * that a stream using lone \r does not rescan the rest of buf per line. */
	size_t nl_at = 0;
	bool nl_known = false;
	bool trailing_cr = false;

	while (pos < len) {
		if (!nl_known || nl_at < pos) {
			const char *q = memchr(buf + pos, '\n', len - pos);
			nl_at = q ? (size_t)(q - buf) : len;
			nl_known = true;
		}
		const char *cr = memchr(buf + pos, '\r', nl_at - pos);
		size_t e = cr ? (size_t)(cr - buf) : nl_at;
		size_t eol_len;

		if (e == len)
			break; /* unfinished line */
		if (buf[e] == '\n') {
			eol_len = 1;
		} else if (e + 1 < len) {
			eol_len = buf[e + 1] == '\n' ? 2 : 1;
		} else {
			trailing_cr = true;
			break;
		}

		size_t next = e + eol_len;
		if (p->raw_len > 0) {
			bool dispatched;

			if (!sse_raw_append(p, buf + pos, next - pos))
				return false;
			if (!sse_held_line_end(p, eol_len, fn, arg, &dispatched))
				return false;
			if (dispatched)
				ev_start = next;
		} else {
			if (next - ev_start > p->max_event) {
				p->overflow = true;
				return false;
			}
			switch (sse_line(p, buf + pos, e - pos)) {
			case SSE_LINE_FIELD:
				break;
			case SSE_LINE_BLANK:
				if (!sse_dispatch(p, buf + ev_start, next - ev_start, fn, arg))
					return false;
				ev_start = next;
				break;
			case SSE_LINE_NOMEM:
				p->overflow = true;
				return false;
			}
		}
		pos = next;
	}

	/* Keep what is left: an unfinished line, and in place mode also the
	 * complete lines of the unfinished event before it. */
	if (p->raw_len > 0) {
		if (!sse_raw_append(p, buf + pos, len - pos))
			return false;
	} else if (ev_start < len) {
		if (!sse_raw_append(p, buf + ev_start, len - ev_start))
			return false;
		p->line_start = pos - ev_start;
	}
	p->cr_pending = trailing_cr;
	return true;
}

/* ---------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------- */

static bool sse_grow(char **buf, size_t *cap, size_t need)
{
	if (need <= *cap)
		return true;

	size_t ncap = *cap ? *cap : SSE_MIN_ALLOC;
	while (ncap < need) {
		if (ncap > SIZE_MAX / 2)
			return false;
		ncap *= 2;
	}
	char *nbuf = realloc(*buf, ncap);
	if (!nbuf)
		return false;
	*buf = nbuf;
	*cap = ncap;
	return true;
}

/* Append to the held event, enforcing max_event before anything is allocated,
 * so an oversized event costs at most max_event bytes of memory. A failed
 * allocation is reported like an overflow: the event cannot be held either way. */
static bool sse_raw_append(struct sse_parser *p, const char *s, size_t n)
{
	if (n > p->max_event - p->raw_len || !sse_grow(&p->raw, &p->raw_cap, p->raw_len + n)) {
		p->overflow = true;
		return false;
	}
	memcpy(p->raw + p->raw_len, s, n);
	p->raw_len += n;
	return true;
}

/* Parse one line (without its line end) into the event in progress. */
static enum sse_line sse_line(struct sse_parser *p, const char *s, size_t n)
{
	if (n == 0)
		return SSE_LINE_BLANK;
	if (s[0] == ':')
		return SSE_LINE_FIELD; /* comment */

	const char *colon = memchr(s, ':', n);
	size_t name_len = colon ? (size_t)(colon - s) : n;
	const char *val = colon ? colon + 1 : s + n;
	size_t val_len = n - (size_t)(val - s);

	if (val_len > 0 && val[0] == ' ') {
		val++;
		val_len--;
	}

	if (name_len == 4 && memcmp(s, "data", 4) == 0) {
		size_t sep = p->has_data ? 1 : 0;
		/* data is never longer than the raw event, which max_event bounds. */
		if (!sse_grow(&p->data, &p->data_cap, p->data_len + sep + val_len + 1))
			return SSE_LINE_NOMEM;
		if (sep)
			p->data[p->data_len++] = '\n';
		memcpy(p->data + p->data_len, val, val_len);
		p->data_len += val_len;
		p->data[p->data_len] = '\0';
		p->has_data = true;
	} else if (name_len == 5 && memcmp(s, "event", 5) == 0) {
		/* Event names are short tokens ("message", "error", "ping");
		 * a longer one is truncated rather than allocated for. */
		size_t n_copy = val_len < sizeof(p->event) - 1 ? val_len : sizeof(p->event) - 1;
		memcpy(p->event, val, n_copy);
		p->event[n_copy] = '\0';
	}
	/* id, retry and unknown fields only travel in the raw bytes. */
	return SSE_LINE_FIELD;
}

/* Hand one event to the callback, then reset the per-event state; the buffers
 * keep their capacity for the next event. */
static bool sse_dispatch(struct sse_parser *p, const char *raw, size_t raw_len, sse_event_fn fn,
                         void *arg)
{
	struct sse_event ev = {
	        .raw = raw,
	        .raw_len = raw_len,
	        .event = p->event,
	        .data = p->has_data ? p->data : "",
	        .data_len = p->data_len,
	        .has_data = p->has_data,
	};
	bool go_on = fn(arg, &ev);

	p->event[0] = '\0';
	p->data_len = 0;
	p->has_data = false;
	p->raw_len = 0;
	p->line_start = 0;
	return go_on;
}

/* The held line raw[line_start..raw_len) is complete, its last eol_len bytes
 * being the line end: parse it, and dispatch the held event on a blank line. */
static bool sse_held_line_end(struct sse_parser *p, size_t eol_len, sse_event_fn fn, void *arg,
                              bool *dispatched)
{
	*dispatched = false;
	switch (sse_line(p, p->raw + p->line_start, p->raw_len - eol_len - p->line_start)) {
	case SSE_LINE_FIELD:
		p->line_start = p->raw_len;
		return true;
	case SSE_LINE_BLANK:
		*dispatched = true;
		return sse_dispatch(p, p->raw, p->raw_len, fn, arg);
	case SSE_LINE_NOMEM:
		break;
	}
	p->overflow = true;
	return false;
}
