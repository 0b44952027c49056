/* loop_guard.c — cuts degenerate output: one span repeated over and over, or output past a cap.
 *
 *   loop_guard: { max_repeats: 8, window: 512, min_period: 8, max_output_chars: 0 }
 *
 * A loop is detected after a character when the output so far ends with one span of p
 * characters repeated max_repeats times (p × max_repeats <= window), the span not itself a
 * repetition of a shorter one, and either p >= min_period, or the whole last `window`
 * characters are that repetition. min_period keeps the short structures of ordinary text —
 * an indentation, a rule of dashes, a table's |---|---| — from counting as loops unless they
 * fill the window. With max_output_chars, a choice's output past that many characters is cut
 * as well. On detection the answer ends with finish_reason "length" (action "cut", alert
 * loop_detected): the pipeline cancels the upstream, so the model server stops generating,
 * and charges the tokens produced so far.
 *
 * How: the Knuth–Morris–Pratt failure function of the current "block" of output, extended
 * one character at a time (amortised O(1)), gives the block's smallest period p. When p
 * exceeds window / max_repeats, no loop can be found in this block any more, and a new block
 * starts at the current character. A repetition that starts inside a block is therefore
 * seen at most window / max_repeats + p characters later than the earliest possible point,
 * by the block that starts within it. Memory: two arrays of `window` entries per choice.
 * Characters are UTF-8 code points.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "sluice/config_section.h"
#include "sluice/policy.h"

/* Defaults and bounds (docs/configuration.md). */
#define LOOP_GUARD_MAX_REPEATS 8
#define LOOP_GUARD_WINDOW      512
#define LOOP_GUARD_MIN_PERIOD  8
#define LOOP_GUARD_WINDOW_MAX  65536
#define LOOP_GUARD_REPEATS_MAX 1000000
#define LOOP_GUARD_CHARS_MAX   1000000000LL

struct loop_conf {
	size_t max_repeats, window, min_period;
	size_t max_period;         /* window / max_repeats */
	uint64_t max_output_chars; /* 0: no cap */
};

static const char *const keys[] = {"max_repeats", "window", "min_period", "max_output_chars", NULL};

static void loop_free(void *conf)
{
	free(conf);
}

static void *loop_parse(struct config_section *sec, const struct cnode *m, const char *path)
{
	char p[CSEC_PATH_LEN];
	size_t failed = csec_error_count(sec);
	struct loop_conf *c = calloc(1, sizeof *c);
	const struct cnode *v;
	long long x;

	if (c == NULL)
		return NULL;
	c->max_repeats = LOOP_GUARD_MAX_REPEATS;
	c->window = LOOP_GUARD_WINDOW;
	c->min_period = LOOP_GUARD_MIN_PERIOD;
	csec_keys(sec, m, path, keys, NULL);
	if ((v = csec_get(m, "max_repeats")) != NULL &&
	    csec_int(sec, v, csec_path_key(p, path, "max_repeats"), 2, LOOP_GUARD_REPEATS_MAX, &x))
		c->max_repeats = (size_t)x;
	if ((v = csec_get(m, "window")) != NULL &&
	    csec_int(sec, v, csec_path_key(p, path, "window"), 1, LOOP_GUARD_WINDOW_MAX, &x))
		c->window = (size_t)x;
	if ((v = csec_get(m, "min_period")) != NULL &&
	    csec_int(sec, v, csec_path_key(p, path, "min_period"), 1, LOOP_GUARD_WINDOW_MAX, &x))
		c->min_period = (size_t)x;
	if ((v = csec_get(m, "max_output_chars")) != NULL &&
	    csec_int(sec, v, csec_path_key(p, path, "max_output_chars"), 1, LOOP_GUARD_CHARS_MAX,
	             &x))
		c->max_output_chars = (uint64_t)x;
	if (csec_error_count(sec) == failed && c->max_repeats * c->min_period > c->window) {
		const struct cnode *at = csec_get(m, "window") ? csec_get(m, "window") : m;
		csec_error(sec, at, csec_get(m, "window") ? csec_path_key(p, path, "window") : path,
		           "window (%zu) must hold max_repeats × min_period = %zu characters",
		           c->window, c->max_repeats * c->min_period);
	}
	if (csec_error_count(sec) != failed) {
		loop_free(c);
		return NULL;
	}
	c->max_period = c->window / c->max_repeats;
	return c;
}

/* ---------------------------------------------------------------- the output */

struct loop_state {
	const struct loop_conf *c;
	uint32_t *text; /* the block, code points (window entries) */
	uint32_t *fail; /* fail[i]: the longest proper border of text[0..i] */
	size_t len;
	uint64_t total;   /* code points so far */
	uint32_t partial; /* a UTF-8 sequence cut at the end of the last piece */
	unsigned need;    /* its bytes still to come */
	bool stopped;
};

static void *loop_begin(const void *conf, struct policy_stream *s, unsigned choice)
{
	const struct loop_conf *c = conf;
	struct loop_state *st = calloc(1, sizeof *st);
	if (st == NULL)
		return NULL;
	st->c = c;
	st->text = malloc(c->window * sizeof *st->text);
	st->fail = malloc(c->window * sizeof *st->fail);
	if (st->text == NULL || st->fail == NULL) {
		free(st->text);
		free(st->fail);
		free(st);
		return NULL;
	}
	return st;
}

static void loop_end(void *state)
{
	struct loop_state *st = state;
	if (st != NULL) {
		free(st->text);
		free(st->fail);
		free(st);
	}
}

/* One more character; true when the output now ends in a loop. *period gets its span. */
static bool feed(struct loop_state *st, uint32_t x, size_t *period)
{
	const struct loop_conf *c = st->c;
	size_t n = st->len;

	if (n == 0) {
		st->fail[0] = 0;
	} else {
		size_t k = st->fail[n - 1];
		while (k > 0 && st->text[k] != x)
			k = st->fail[k - 1];
		if (st->text[k] == x)
			k++;
		st->fail[n] = (uint32_t)k;
	}
	st->text[n] = x;
	st->len = ++n;
	size_t p = n - st->fail[n - 1];
	if (p > c->max_period) {
		/* No loop fits in this block any more: start again from this character. */
		st->text[0] = x;
		st->fail[0] = 0;
		st->len = 1;
		return false;
	}
	*period = p;
	return (p >= c->min_period && n >= c->max_repeats * p) || n >= c->window;
}

/* The next code point of s[*i..len) and where it starts (0 when it began in the last
 * piece), or false when the piece ends inside it (kept in st for the next piece). */
static bool next_char(struct loop_state *st, const unsigned char *s, size_t len, size_t *i,
                      uint32_t *out, size_t *start)
{
	if (st->need == 0)
		*start = *i;
	while (*i < len) {
		unsigned char b = s[(*i)++];
		if (st->need > 0) {
			if ((b & 0xC0) == 0x80) {
				st->partial = (st->partial << 6) | (b & 0x3F);
				if (--st->need == 0) {
					*out = st->partial;
					return true;
				}
				continue;
			}
			st->need = 0; /* a broken sequence: it counts as one character */
			*out = st->partial | 0x80000000u;
			(*i)--;
			return true;
		}
		if (b < 0x80) {
			*out = b;
			return true;
		}
		unsigned need = b >= 0xF0 ? 3 : b >= 0xE0 ? 2 : b >= 0xC0 ? 1 : 0;
		if (need == 0) {
			*out = 0x80000000u | b; /* a stray continuation byte */
			return true;
		}
		st->need = need;
		st->partial = b & (0x3Fu >> need);
	}
	return false;
}

/* feed() over the ASCII bytes of s from *i up to lim, with the block in locals; stops after
 * the character that completes a loop (true, *period its span) or at the first other byte. */
static bool feed_ascii(struct loop_state *st, const unsigned char *s, size_t lim, size_t *i,
                       size_t *period)
{
	const struct loop_conf *c = st->c;
	uint32_t *text = st->text, *fail = st->fail;
	const size_t max_period = c->max_period, min_period = c->min_period;
	const size_t repeats = c->max_repeats, window = c->window;
	/* Both ways of detecting need a block of at least repeats × min_period characters
	 * (p >= min_period, n >= repeats × p; or n >= window, which loop_parse keeps at least
	 * that): shorter blocks, all of ordinary text's, skip the test. */
	const size_t least = repeats * min_period;
	size_t n = st->len, j = *i;

	if (n == 0 && j < lim && s[j] < 0x80) { /* a block's first character: no border */
		text[0] = s[j];
		fail[0] = 0;
		n = 1;
		j++; /* p = 1, and least >= 2: neither a reset nor a loop */
	}
	for (; j < lim && s[j] < 0x80; j++) {
		uint32_t x = s[j];
		size_t k = fail[n - 1];
		while (k > 0 && text[k] != x)
			k = fail[k - 1];
		k += text[k] == x;
		fail[n] = (uint32_t)k;
		text[n] = x;
		n++;
		size_t p = n - k;
		if (p > max_period) {
			text[0] = x;
			fail[0] = 0;
			n = 1;
			continue;
		}
		if (n >= least && ((p >= min_period && n >= repeats * p) || n >= window)) {
			st->len = n;
			*period = p;
			*i = j + 1;
			return true;
		}
	}
	st->len = n;
	*i = j;
	return false;
}

/* The answer stops here: a loop (of span period), or the cap. */
static enum policy_verdict cut(struct loop_state *st, struct policy_text *t, bool cap,
                               size_t period)
{
	st->stopped = true;
	t->finish_reason = "length";
	t->action = "cut";
	t->alert = "loop_detected";
	if (cap)
		snprintf(t->rule, sizeof t->rule, "max_output_chars %llu",
		         (unsigned long long)st->c->max_output_chars);
	else
		snprintf(t->rule, sizeof t->rule, "a span of %zu characters repeated %zu times",
		         period, st->len / period);
	return POLICY_STOP;
}

static enum policy_verdict loop_text(void *state, struct policy_text *t)
{
	struct loop_state *st = state;
	const struct loop_conf *c = st->c;
	const unsigned char *s = (const unsigned char *)t->text;
	size_t i = 0, start = 0, period = 0;
	uint32_t x;

	if (st->stopped)
		return POLICY_STOP;
	for (;;) {
		/* A run of ASCII outside a sequence, the common case, in one tight loop (up to the
		 * cap, whose crossing the general path below reports). */
		if (st->need == 0 && i < t->len && s[i] < 0x80) {
			size_t lim = t->len, from = i;
			if (c->max_output_chars != 0) {
				uint64_t room = c->max_output_chars > st->total
				                        ? c->max_output_chars - st->total
				                        : 0;
				if (room < lim - i)
					lim = i + (size_t)room;
			}
			bool loop = feed_ascii(st, s, lim, &i, &period);
			st->total += i - from;
			if (loop) {
				evbuffer_add(t->out, t->text, i);
				return cut(st, t, false, period);
			}
			if (i > from)
				continue;
		}
		if (!next_char(st, s, t->len, &i, &x, &start))
			break;
		st->total++;
		bool cap = c->max_output_chars != 0 && st->total > c->max_output_chars;
		if (!cap && !feed(st, x, &period))
			continue;
		/* A loop is cut after the character that completes it; the cap before the
		 * first character past it. */
		evbuffer_add(t->out, t->text, cap ? start : i);
		return cut(st, t, cap, period);
	}
	t->passed = true; /* all of it, unchanged */
	return POLICY_CONTINUE;
}

const struct policy_def policy_loop_guard = {
        .name = "loop_guard",
        .phases = POLICY_PHASE_RESPONSE,
        .conf_parse = loop_parse,
        .conf_free = loop_free,
        .response_begin = loop_begin,
        .on_response_text = loop_text,
        .response_end = loop_end,
};
