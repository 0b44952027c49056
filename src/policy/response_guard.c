/* response_guard.c — masks or blocks what the deny patterns match in the output, streams included.
 *
 *   response_guard: { deny: [regex...], action: mask | block, mask: "[redacted]", hold: N }
 *
 * mask   each match is replaced by the mask string;
 * block  the text before the first match goes out and the answer ends with finish_reason
 *        content_filter (a stream: the pipeline ends it and cancels the upstream).
 *
 * Streams. The text arrives in pieces, and a match may straddle two of them ("1234 5678"
 * + "9012 3456"). Every piece is matched together with the text held back from the
 * previous ones, using PCRE2's hard partial matching: a partial match says where a match
 * could still start, so everything before that point is released at once and only the
 * possible start of a match is held. Nothing is ever held that cannot become a match. The
 * result is exactly what matching the whole text at once gives, as long as no match (with
 * the characters its lookaheads inspect) is longer than `hold` characters; the fuzz target
 * tests/fuzz/fuzz_response_guard.c checks that.
 *
 * hold defaults to the longest text any deny pattern can inspect from where its match
 * starts, found by a bounded reading of the pattern (quantifiers, alternations, classes,
 * escapes, groups and lookarounds; \d{16} is 16, (?!\d) one more); a pattern this reading
 * cannot bound (+, *, {n,}, back-references, (?x), recursion) counts as
 * RESPONSE_GUARD_HOLD_DEFAULT_CAP characters. So does a bound above the cap: hold may be
 * set higher by hand, up to RESPONSE_GUARD_HOLD_MAX. hold: 0 holds nothing back.
 *
 * Before the held text, the characters lookbehinds (and \b) need are kept as context
 * (PCRE2_INFO_MAXLOOKBEHIND, at least one for a multi-line ^). Characters are UTF-8 code
 * points; a sequence is never split.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "sluice/config_section.h"
#include "sluice/policy.h"
#include "sluice/policy_chain.h"

/* Defaults and bounds (docs/configuration.md). */
#define RESPONSE_GUARD_MASK             "[redacted]"
#define RESPONSE_GUARD_HOLD_DEFAULT_CAP 256
#define RESPONSE_GUARD_HOLD_MAX         65536
#define RESPONSE_GUARD_MASK_MAX         1024

struct rguard_conf {
	pcre2_code **deny;
	size_t n_deny;
	bool block;
	char *mask; /* owned */
	size_t mask_len;
	size_t hold;       /* characters */
	size_t lookbehind; /* characters of context kept before the held text */
};

static const char *const keys[] = {"deny", "action", "mask", "hold", NULL};
static const char *const action_names[] = {"mask", "block", NULL};

/* ============================================================================================
 * How far a match may reach: a bounded reading of PCRE2 syntax.
 * ========================================================================================== */

#define REACH_INF   (1L << 40) /* unbounded, or not understood */
#define REACH_DEPTH 64

struct rx {
	const char *p, *end;
	int depth;
	bool uses_G; /* \G: "where the last match ended" has no meaning across pieces */
};

struct span {
	long consume; /* characters a match consumes, at most */
	long reach;   /* characters from the match start it may inspect, at most */
};

static const struct span SPAN_INF = {REACH_INF, REACH_INF};

static long add(long a, long b)
{
	return a >= REACH_INF || b >= REACH_INF || a + b >= REACH_INF ? REACH_INF : a + b;
}

static long mul(long a, long n)
{
	if (a == 0 || n == 0)
		return 0;
	return a >= REACH_INF || n >= REACH_INF || a > REACH_INF / n ? REACH_INF : a * n;
}

static long max_of(long a, long b)
{
	return a > b ? a : b;
}

static struct span parse_alt(struct rx *r);

static bool at(const struct rx *r, char c)
{
	return r->p < r->end && *r->p == c;
}

static void skip_char(struct rx *r)
{
	r->p++;
	while (r->p < r->end && ((unsigned char)*r->p & 0xC0) == 0x80)
		r->p++;
}

/* "{...}" after \x, \o, \p, \N: skipped whole. */
static void skip_braces(struct rx *r)
{
	if (at(r, '{')) {
		const char *close = memchr(r->p, '}', (size_t)(r->end - r->p));
		r->p = close ? close + 1 : r->end;
	}
}

static struct span escape(struct rx *r)
{
	char c;

	r->p++; /* the backslash */
	if (r->p >= r->end)
		return SPAN_INF;
	c = *r->p;
	if (c == 'Q') { /* \Q...\E: literal characters */
		long n = 0;
		r->p++;
		while (r->p < r->end && !(r->p + 1 < r->end && r->p[0] == '\\' && r->p[1] == 'E')) {
			skip_char(r);
			n++;
		}
		if (r->p < r->end)
			r->p += 2;
		return (struct span){n, n};
	}
	r->p++;
	switch (c) {
	case 'b':
	case 'B':
	case 'A':
	case 'z':
	case 'Z':
	case 'K':
	case 'E':
		return (struct span){0, 0};
	case 'G':
		r->uses_G = true;
		return (struct span){0, 0};
	case 'R': /* \r\n counts two */
		return (struct span){2, 2};
	case 'X':
	case 'g':
	case 'k': /* graphemes, back-references */
		return SPAN_INF;
	case 'p':
	case 'P':
		if (at(r, '{'))
			skip_braces(r);
		else if (r->p < r->end)
			skip_char(r);
		return (struct span){1, 1};
	case 'x':
	case 'o':
	case 'N':
		if (at(r, '{'))
			skip_braces(r);
		else if (c == 'x')
			for (int i = 0;
			     i < 2 && r->p < r->end && strchr("0123456789abcdefABCDEF", *r->p); i++)
				r->p++;
		return (struct span){1, 1};
	case 'c':
		if (r->p < r->end)
			skip_char(r);
		return (struct span){1, 1};
	case '0':
		for (int i = 0; i < 2 && r->p < r->end && *r->p >= '0' && *r->p <= '7'; i++)
			r->p++;
		return (struct span){1, 1};
	default:
		if (c >= '1' && c <= '9')
			return SPAN_INF; /* a back-reference (or octal): not bounded here */
		if ((unsigned char)c >= 0x80) {
			r->p--;
			skip_char(r);
		}
		return (struct span){1, 1};
	}
}

static struct span char_class(struct rx *r)
{
	r->p++; /* '[' */
	if (at(r, '^'))
		r->p++;
	if (at(r, ']'))
		r->p++; /* a leading ] is literal */
	while (r->p < r->end && *r->p != ']') {
		if (*r->p == '\\') {
			r->p++;
			if (at(r, 'Q')) {
				while (r->p < r->end &&
				       !(r->p + 1 < r->end && r->p[0] == '\\' && r->p[1] == 'E'))
					r->p++;
			}
			if (r->p < r->end)
				skip_char(r);
		} else if (*r->p == '[' && r->p + 1 < r->end && r->p[1] == ':') {
			const char *close = NULL;
			for (const char *q = r->p + 2; q + 1 < r->end; q++) {
				if (q[0] == ':' && q[1] == ']') {
					close = q;
					break;
				}
			}
			r->p = close ? close + 2 : r->p + 1;
		} else {
			skip_char(r);
		}
	}
	if (r->p >= r->end)
		return SPAN_INF;
	r->p++;
	return (struct span){1, 1};
}

/* After "(?": flags, a named group, a lookaround, a comment. */
static struct span group(struct rx *r)
{
	enum { CAPTURE, LOOKAHEAD, LOOKBEHIND } kind = CAPTURE;

	r->p++; /* '(' */
	if (at(r, '*'))
		return SPAN_INF; /* (*VERB) and friends */
	if (at(r, '?')) {
		r->p++;
		if (at(r, '#')) { /* comment */
			const char *close = memchr(r->p, ')', (size_t)(r->end - r->p));
			r->p = close ? close + 1 : r->end;
			return (struct span){0, 0};
		}
		if (at(r, '=') || at(r, '!')) {
			kind = LOOKAHEAD;
			r->p++;
		} else if (at(r, '<') && r->p + 1 < r->end && (r->p[1] == '=' || r->p[1] == '!')) {
			kind = LOOKBEHIND;
			r->p += 2;
		} else if (at(r, ':') || at(r, '|') || at(r, '>')) {
			r->p++;
		} else if (at(r, '<') || at(r, '\'') ||
		           (at(r, 'P') && r->p + 1 < r->end && r->p[1] == '<')) {
			char close = at(r, '\'') ? '\'' : '>';
			const char *q = memchr(r->p, close, (size_t)(r->end - r->p));
			if (q == NULL)
				return SPAN_INF;
			r->p = q + 1;
		} else {
			/* flags: (?i) or (?i:...); anything else (recursion, conditions,
			 * callouts) is beyond this reading */
			while (r->p < r->end && strchr("imnsxJU^-", *r->p) != NULL) {
				if (*r->p == 'x')
					return SPAN_INF; /* extended: spaces and comments */
				r->p++;
			}
			if (at(r, ')')) {
				r->p++;
				return (struct span){0, 0};
			}
			if (!at(r, ':'))
				return SPAN_INF;
			r->p++;
		}
	}
	if (++r->depth > REACH_DEPTH)
		return SPAN_INF;
	struct span in = parse_alt(r);
	r->depth--;
	if (!at(r, ')'))
		return SPAN_INF;
	r->p++;
	switch (kind) {
	case LOOKAHEAD:
		return (struct span){0, in.reach};
	case LOOKBEHIND:
		return (struct span){0, 0}; /* looks before the start: the kept context */
	default:
		return in;
	}
}

static bool read_count(struct rx *r, long *out)
{
	long v = 0;
	if (r->p >= r->end || *r->p < '0' || *r->p > '9')
		return false;
	while (r->p < r->end && *r->p >= '0' && *r->p <= '9') {
		v = v * 10 + (*r->p - '0');
		if (v > 65535)
			v = REACH_INF;
		r->p++;
	}
	*out = v;
	return true;
}

/* A quantifier after an atom, if any: the atom's span repeated up to its maximum. */
static struct span quantify(struct rx *r, struct span a)
{
	long hi;

	if (at(r, '*') || at(r, '+')) {
		r->p++;
		hi = REACH_INF;
	} else if (at(r, '?')) {
		r->p++;
		hi = 1;
	} else if (at(r, '{')) {
		const char *save = r->p;
		long lo;
		r->p++;
		if (!read_count(r, &lo)) {
			r->p = save;
			return a; /* a literal '{' (consumed by the caller as a character) */
		}
		hi = lo;
		if (at(r, ',')) {
			r->p++;
			if (!read_count(r, &hi))
				hi = REACH_INF;
		}
		if (!at(r, '}')) {
			r->p = save;
			return a;
		}
		r->p++;
	} else {
		return a;
	}
	if (at(r, '?') || at(r, '+'))
		r->p++; /* lazy, possessive: the same bounds */
	if (hi >= REACH_INF)
		return a.consume == 0 ? (struct span){0, a.reach} : SPAN_INF;
	if (hi == 0)
		return (struct span){0, 0};
	return (struct span){mul(a.consume, hi), add(mul(a.consume, hi - 1), a.reach)};
}

static struct span parse_seq(struct rx *r)
{
	struct span s = {0, 0};

	while (r->p < r->end && *r->p != '|' && *r->p != ')') {
		struct span a;
		switch (*r->p) {
		case '(':
			a = group(r);
			break;
		case '[':
			a = char_class(r);
			break;
		case '\\':
			a = escape(r);
			break;
		case '^':
		case '$':
			r->p++;
			a = (struct span){0, 0};
			break;
		case '{': /* not a quantifier here: a literal */
		default:
			skip_char(r);
			a = (struct span){1, 1};
			break;
		}
		if (a.reach >= REACH_INF)
			return SPAN_INF;
		a = quantify(r, a);
		s.reach = max_of(s.reach, add(s.consume, a.reach));
		s.consume = add(s.consume, a.consume);
		if (s.reach >= REACH_INF)
			return SPAN_INF;
	}
	return s;
}

static struct span parse_alt(struct rx *r)
{
	struct span s = parse_seq(r);
	while (s.reach < REACH_INF && at(r, '|')) {
		r->p++;
		struct span b = parse_seq(r);
		s.consume = max_of(s.consume, b.consume);
		s.reach = max_of(s.reach, b.reach);
	}
	return s;
}

/* The most characters a match of re may inspect from its start; REACH_INF when unknown. */
static long pattern_reach(const char *re, bool *uses_G)
{
	struct rx r = {.p = re, .end = re + strlen(re)};
	struct span s = parse_alt(&r);
	*uses_G = r.uses_G;
	return r.p == r.end ? s.reach : REACH_INF; /* a stray ')' : not understood */
}

/* ============================================================================================
 * Configuration.
 * ========================================================================================== */

static void rguard_free(void *conf)
{
	struct rguard_conf *g = conf;
	if (g == NULL)
		return;
	csec_regex_free(g->deny, g->n_deny);
	free(g->mask);
	free(g);
}

static void *rguard_parse(struct config_section *sec, const struct cnode *m, const char *path)
{
	char p[CSEC_PATH_LEN], ip[CSEC_PATH_LEN];
	size_t failed = csec_error_count(sec);
	struct rguard_conf *g = calloc(1, sizeof *g);
	const struct cnode *v;
	long reach = 0;

	if (g == NULL)
		return NULL;
	csec_keys(sec, m, path, keys, NULL);
	if ((v = csec_get(m, "deny")) != NULL &&
	    csec_regex_list(sec, v, csec_path_key(p, path, "deny"), PCRE2_MATCH_INVALID_UTF,
	                    PCRE2_JIT_COMPLETE | PCRE2_JIT_PARTIAL_HARD, &g->deny, &g->n_deny)) {
		for (size_t i = 0; i < g->n_deny; i++) {
			uint32_t lb = 0;
			pcre2_pattern_info(g->deny[i], PCRE2_INFO_MAXLOOKBEHIND, &lb);
			if (lb > g->lookbehind)
				g->lookbehind = lb;
		}
	}
	for (size_t i = 0; v != NULL && v->kind == CNODE_SEQ && i < v->n; i++) {
		const struct cnode *re = v->kids[i];
		bool uses_G;
		if (re->kind != CNODE_SCALAR || re->null)
			continue;
		reach = max_of(reach, pattern_reach(re->str, &uses_G));
		if (uses_G)
			csec_error(sec, re, csec_path_index(ip, p, i),
			           "\\G cannot be used here: the output arrives in pieces");
	}
	/* At least one character: a multi-line ^ looks at the one before it. */
	if (g->lookbehind < 1)
		g->lookbehind = 1;
	if (g->lookbehind > RESPONSE_GUARD_HOLD_MAX)
		g->lookbehind = RESPONSE_GUARD_HOLD_MAX;
	g->hold = reach > RESPONSE_GUARD_HOLD_DEFAULT_CAP ? RESPONSE_GUARD_HOLD_DEFAULT_CAP
	                                                  : (size_t)reach;
	if ((v = csec_get(m, "hold")) != NULL) {
		long long h;
		if (csec_int(sec, v, csec_path_key(p, path, "hold"), 0, RESPONSE_GUARD_HOLD_MAX,
		             &h))
			g->hold = (size_t)h;
	}
	int action = 0;
	if ((v = csec_get(m, "action")) != NULL)
		csec_enum(sec, v, csec_path_key(p, path, "action"), action_names, &action);
	g->block = action == 1;
	const char *mask = RESPONSE_GUARD_MASK;
	if ((v = csec_get(m, "mask")) != NULL) {
		const char *s = csec_string(sec, v, csec_path_key(p, path, "mask"), 0);
		if (s != NULL && strlen(s) > RESPONSE_GUARD_MASK_MAX)
			csec_error(sec, v, p, "must be at most %d bytes long",
			           RESPONSE_GUARD_MASK_MAX);
		else if (s != NULL && g->block)
			csec_error(sec, v, p, "has no effect with action: block");
		if (s != NULL)
			mask = s;
	}
	g->mask = strdup(mask);
	if (g->mask == NULL) {
		rguard_free(g);
		return NULL;
	}
	g->mask_len = strlen(g->mask);
	if (csec_error_count(sec) != failed) {
		rguard_free(g);
		return NULL;
	}
	return g;
}

/* ============================================================================================
 * The output.
 * ========================================================================================== */

struct rguard_state {
	const struct rguard_conf *g;
	char *buf; /* [context][held]: original text, owned */
	size_t len, cap;
	size_t ctx;  /* bytes of context at the start of buf */
	bool notbol; /* text before buf was released and forgotten: ^ cannot match at buf[0] */
	bool stopped;
};

static void *rguard_begin(const void *conf, struct policy_stream *s, unsigned choice)
{
	struct rguard_state *st = calloc(1, sizeof *st);
	if (st != NULL)
		st->g = conf;
	return st;
}

static void rguard_end(void *state)
{
	struct rguard_state *st = state;
	if (st != NULL) {
		free(st->buf);
		free(st);
	}
}

static bool put(struct rguard_state *st, const char *s, size_t n)
{
	if (n == 0)
		return true;
	if (n > SIZE_MAX - st->len - 1)
		return false;
	if (st->len + n > st->cap) {
		size_t cap = st->cap ? st->cap : 256;
		while (cap < st->len + n)
			cap = cap > SIZE_MAX / 2 ? st->len + n : cap * 2;
		char *p = realloc(st->buf, cap);
		if (p == NULL)
			return false;
		st->buf = p;
		st->cap = cap;
	}
	memcpy(st->buf + st->len, s, n);
	st->len += n;
	return true;
}

/* The leftmost decision over buf[pos..end): a complete match [*s, *e) of pattern *which, and
 * the leftmost place a match may still start (*partial; SIZE_MAX: none). false on a match
 * error (the guard then fails closed). */
static bool scan(const struct rguard_state *st, size_t pos, size_t end, bool final, size_t *s,
                 size_t *e, size_t *which, size_t *partial)
{
	const struct rguard_conf *g = st->g;
	pcre2_match_data *md = policy_match_data();
	pcre2_match_context *mc = policy_match_context();
	uint32_t opts =
	        PCRE2_NOTEMPTY | (final ? 0 : PCRE2_PARTIAL_HARD) | (st->notbol ? PCRE2_NOTBOL : 0);

	*s = *partial = SIZE_MAX;
	if (md == NULL || mc == NULL)
		return false;
	for (size_t i = 0; i < g->n_deny; i++) {
		int rc = pcre2_match(g->deny[i], (PCRE2_SPTR)st->buf, end, pos, opts, md, mc);
		PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
		if (rc >= 0) {
			if (ov[0] < *s) {
				*s = ov[0];
				*e = ov[1];
				*which = i;
			}
		} else if (rc == PCRE2_ERROR_PARTIAL) {
			if (ov[0] < *partial)
				*partial = ov[0];
		} else if (rc != PCRE2_ERROR_NOMATCH) {
			*which = i;
			return false;
		}
	}
	return true;
}

static enum policy_verdict rguard_text(void *state, struct policy_text *t)
{
	struct rguard_state *st = state;
	const struct rguard_conf *g = st->g;
	size_t pos, end, s, e, which = 0, partial;
	unsigned masked = 0;

	if (st->stopped)
		return POLICY_STOP;
	bool held_none = st->len == st->ctx; /* then buf[ctx..) is exactly t->text */
	if (!put(st, t->text, t->len))
		goto fail;
	if (st->len == st->ctx)
		return POLICY_CONTINUE; /* nothing new, nothing held */
	pos = st->ctx;
	/* A sequence cut at the end of a piece waits for its last bytes. */
	end = t->final ? st->len
	               : st->ctx + policy_utf8_complete(st->buf + st->ctx, st->len - st->ctx);
	for (;;) {
		if (!scan(st, pos, end, t->final, &s, &e, &which, &partial)) {
			snprintf(t->rule, sizeof t->rule, "deny[%zu]: match error", which);
			s = pos; /* fail closed: everything left is a match */
			e = end;
			partial = SIZE_MAX;
			if (s == e)
				break;
		}
		if (s != SIZE_MAX && (partial == SIZE_MAX || partial > s)) {
			if (e <= s) /* \K games: never loop in place */
				e = s + policy_utf8_advance(st->buf + s, end - s, 1);
			evbuffer_add(t->out, st->buf + pos, s - pos);
			if (t->rule[0] == '\0')
				snprintf(t->rule, sizeof t->rule, "deny[%zu]", which);
			if (g->block) {
				st->stopped = true;
				t->finish_reason = "content_filter";
				t->action = "blocked";
				return POLICY_STOP;
			}
			evbuffer_add(t->out, g->mask, g->mask_len);
			masked++;
			pos = e;
			continue;
		}
		size_t upto = partial != SIZE_MAX ? partial : end;
		if (masked == 0 && held_none && pos == st->ctx && upto == st->len)
			t->passed = true; /* the whole text, unchanged, nothing held */
		else
			evbuffer_add(t->out, st->buf + pos, upto - pos);
		pos = upto;
		break;
	}
	/* At most hold characters stay back: a longer possible match is given up on. */
	size_t held = policy_utf8_count(st->buf + pos, end - pos);
	if (held > g->hold) {
		size_t k = policy_utf8_advance(st->buf + pos, end - pos, held - g->hold);
		evbuffer_add(t->out, st->buf + pos, k);
		pos += k;
	}
	if (masked > 0)
		t->action = "masked";
	/* Keep the context lookbehinds need before the held text; forget the rest. */
	size_t c0 = pos;
	for (size_t n = 0; n < g->lookbehind && c0 > 0; n++) {
		c0--;
		while (c0 > 0 && ((unsigned char)st->buf[c0] & 0xC0) == 0x80)
			c0--;
	}
	if (c0 > 0) {
		st->notbol = true;
		memmove(st->buf, st->buf + c0, st->len - c0);
		st->len -= c0;
	}
	st->ctx = pos - c0;
	if (t->final) {
		st->len = 0;
		st->ctx = 0;
	}
	return POLICY_CONTINUE;
fail:
	st->stopped = true;
	t->finish_reason = "content_filter";
	t->action = "blocked";
	snprintf(t->rule, sizeof t->rule, "out of memory");
	return POLICY_STOP;
}

const struct policy_def policy_response_guard = {
        .name = "response_guard",
        .phases = POLICY_PHASE_RESPONSE,
        .conf_parse = rguard_parse,
        .conf_free = rguard_free,
        .response_begin = rguard_begin,
        .on_response_text = rguard_text,
        .response_end = rguard_end,
};
