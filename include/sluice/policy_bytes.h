/* policy_bytes.h — request policies reading the client's chat body as bytes, without a tree
 * (src/policy/request_bytes.c).
 *
 * A request policy whose definition sets reads_bytes gets req->body NULL and the client's
 * bytes (req->bytes, req->bytes_len) with their json_scan (req->scan) until some policy asks
 * for the tree (policy_request_tree). The bytes were accepted by json_scan_body(), so these
 * readers validate nothing: they walk spans json_scan already checked. What they report is
 * what the same policy reads from the tree of the same bytes (tests/unit/test_policy_bytes.c
 * checks verdicts and bodies of both paths against each other).
 */
#ifndef SLUICE_POLICY_BYTES_H
#define SLUICE_POLICY_BYTES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sluice/json_scan.h"
#include "sluice/policy.h"

/* The members of an object span or the elements of an array span, in order. */
struct pb_iter {
	const char *p, *e;
	const struct json_scan *known; /* top-level spans already measured, or NULL */
};

/* v must be an OBJECT or ARRAY value json_scan handed back (or pb_next read). */
void pb_begin(struct pb_iter *it, const struct json_scan_value *v);
/* The top-level members of bytes[0, len), which scan describes (NULL: no scan): the
 * containers it measured are not walked again. */
void pb_begin_body(struct pb_iter *it, const char *bytes, size_t len,
                   const struct json_scan *scan);
/* The next member (key: its name, a STRING value; NULL for arrays) or element; false at the
 * end. val gets type, p, len; STRING also str_len and escaped; INTEGER also integer. */
bool pb_next(struct pb_iter *it, struct json_scan_value *key, struct json_scan_value *val);
/* A STRING value decoded equals the C string s (as strcmp on the decoded text would say). */
bool pb_string_is(const struct json_scan_value *v, const char *s);
/* A STRING value decoded into buf (cap ≥ 1), NUL-terminated, cut at cap - 1. */
void pb_string_cstr(const struct json_scan_value *v, char *buf, size_t cap);
/* A number value as json_number_value() would give it. */
double pb_number(const struct json_scan_value *v);
/* The body's object (bytes[0, len) without the whitespace around it). */
struct json_scan_value pb_body(const char *bytes, size_t len);
/* Its top-level member key (type JSON_SCAN_ABSENT when none). */
struct json_scan_value pb_member(const char *bytes, size_t len, const char *key);
/* Containers nested in bytes[0, len) at the deepest point (the body itself is 1). */
size_t pb_depth(const char *bytes, size_t len);

/* json_scan_estimate_prompt(req->scan) (req->scan must be set), computed once per version of
 * the bytes: the pipeline's quota estimate reuses it (policy_run_request_estimate). */
uint64_t policy_request_estimate(struct policy_request *req);
/* The body as a tree, parsed from the current bytes on first call (then req->body is it,
 * and every later policy reads the tree); NULL when out of memory. */
json_t *policy_request_tree(struct policy_request *req);
/* Splice chat members (policy.h: splice_before / splice_after) into the current bytes'
 * "messages" array; the later policies read the new bytes. False: the bytes cannot take
 * them here (no messages array) or out of memory — use the tree. */
bool policy_request_splice(struct policy_request *req, const char *before, const char *after);

#endif
