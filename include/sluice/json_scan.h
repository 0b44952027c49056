/* json_scan.h — one validating pass over a JSON request body: the members the gateway reads, no
 * tree. */
#ifndef SLUICE_JSON_SCAN_H
#define SLUICE_JSON_SCAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * json_scan_body() reads the client's bytes once, accepts exactly what
 * json_loadb(JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL) accepts, and hands back the top-level
 * members the request path reads, as spans into the caller's bytes. It builds nothing and
 * allocates nothing: its state is a fixed frame on the stack (about 6 KiB).
 *
 * The rules, each checked against jansson 2.14 by tests/fuzz/fuzz_json_scan.c:
 *   - RFC 8259 JSON, whitespace = space, tab, CR, LF; no BOM, no trailing bytes (a NUL after
 *     the value is a trailing byte), no comments, no trailing commas;
 *   - strings: UTF-8 validated (no overlongs, no encoded surrogates, nothing past U+10FFFF),
 *     no raw byte under 0x20, the eight escapes plus \uXXXX with surrogates paired; "\u0000"
 *     is allowed in values (JSON_ALLOW_NUL) and refused in object keys (jansson cannot hold it);
 *   - numbers: an integer token (no '.', no exponent) must fit int64_t; a real must not
 *     overflow a double (strtod's ERANGE towards infinity; underflow to 0 is accepted);
 *   - nesting: every value, scalars included, counts one level; deeper than
 *     JSON_SCAN_MAX_DEPTH (jansson's 2048) is refused;
 *   - duplicate keys, compared after decoding escapes ("mod\u0065l" is "model"), are refused
 *     in every object at every depth, as jansson does.
 *
 * One deliberate difference: jansson 2.14 silently drops a NUL byte that directly follows a
 * number or a literal (its lexer reads one byte ahead and puts it back into a buffer where NUL
 * means "empty"), so it accepts {"a":1\0}. That byte is not JSON, and the scanner refuses it.
 *
 * Duplicate detection keeps the keys of every object still open on a fixed stack of
 * JSON_SCAN_MAX_OPEN_KEYS entries, and objects may nest JSON_SCAN_MAX_OBJECT_DEPTH deep. A
 * valid body past either bound, or longer than 4 GiB, is JSON_SCAN_TOO_COMPLEX: the scanner
 * cannot decide it in its fixed memory and the caller parses it with jansson instead. No
 * request a client library builds comes near either bound.
 */

#define JSON_SCAN_MAX_DEPTH        2048
#define JSON_SCAN_MAX_OPEN_KEYS    512
#define JSON_SCAN_MAX_OBJECT_DEPTH 128

enum json_scan_result {
	JSON_SCAN_OK,          /* a valid JSON object */
	JSON_SCAN_NOT_OBJECT,  /* valid JSON, but the top-level value is an array */
	JSON_SCAN_INVALID,     /* what jansson refuses; see error, line, column */
	JSON_SCAN_TOO_COMPLEX, /* past the scanner's fixed bounds: ask jansson */
};

enum json_scan_type {
	JSON_SCAN_ABSENT,
	JSON_SCAN_NULL,
	JSON_SCAN_TRUE,
	JSON_SCAN_FALSE,
	JSON_SCAN_INTEGER,
	JSON_SCAN_REAL,
	JSON_SCAN_STRING,
	JSON_SCAN_ARRAY,
	JSON_SCAN_OBJECT,
};

/* The top-level members handed back, by index into json_scan.member[]. */
enum json_scan_member {
	JSON_SCAN_MODEL,
	JSON_SCAN_STREAM,
	JSON_SCAN_STREAM_OPTIONS,
	JSON_SCAN_MAX_TOKENS,
	JSON_SCAN_MAX_COMPLETION_TOKENS,
	JSON_SCAN_MAX_OUTPUT_TOKENS,
	JSON_SCAN_N,
	JSON_SCAN_MESSAGES,
	JSON_SCAN_INPUT,
	JSON_SCAN_PROMPT,
	JSON_SCAN_SYSTEM,
	JSON_SCAN_INSTRUCTIONS,
	JSON_SCAN_TOOLS,
	JSON_SCAN_FUNCTIONS,
	JSON_SCAN_N_MEMBERS
};

/* The member's name as it appears in JSON (decoded). */
const char *json_scan_member_name(enum json_scan_member m);

struct json_scan_value {
	enum json_scan_type type; /* ABSENT: the body has no such member */
	const char *p;            /* the value's first byte in the body ('"' for a string) */
	size_t len;               /* bytes up to and including its last ('"', ']', '}') */
	size_t str_len;           /* STRING: decoded length in bytes (NULs from \u0000 count) */
	bool escaped;             /* STRING: holds an escape; else the text is p + 1, str_len */
	int64_t integer;          /* INTEGER: the value */
};

struct json_scan {
	struct json_scan_value member[JSON_SCAN_N_MEMBERS];
	size_t n_members;   /* top-level members, all names (json_object_size) */
	bool include_usage; /* stream_options is an object whose include_usage is true */
	/* JSON_SCAN_INVALID: a fixed reason, and where (byte offset; 1-based line and column) */
	const char *error;
	size_t error_pos;
	int line, column;
};

/* Scan body[0, len). out is filled whatever the result; its spans point into body. */
enum json_scan_result json_scan_body(const char *body, size_t len, struct json_scan *out);

/* A STRING value's decoded bytes into buf (at most cap, not terminated); returns the decoded
 * length, which is more than cap when buf was too small. 0 for anything else. */
size_t json_scan_string(const struct json_scan_value *v, char *buf, size_t cap);

/* usage_estimate_prompt() of the same body, computed over the spans (no tree): the same
 * number for every body json_scan_body() accepted. */
uint64_t json_scan_estimate_prompt(const struct json_scan *s);
/* usage_completion_budget() of the same body. */
uint64_t json_scan_completion_budget(const struct json_scan *s, uint64_t default_budget);

#endif
