/* usage.h — token usage: read it from upstream responses, or estimate it. */
#ifndef SLUICE_USAGE_H
#define SLUICE_USAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "sluice/record.h"

/*
 * The estimation rule (docs/quotas.md):
 *   text tokens   = ceil(bytes of text / USAGE_BYTES_PER_TOKEN)
 *   prompt        = text tokens of every message / prompt / input / system / tools
 *                   + USAGE_TOKENS_PER_MESSAGE per chat message + USAGE_TOKENS_PER_REPLY
 *                   + USAGE_TOKENS_PER_IMAGE per image / audio / file part (their bytes
 *                     are not text) + one per explicit token id
 *   completion    = max_completion_tokens, else max_tokens, else max_output_tokens, else
 *                   the caller's default budget; times n when n > 1
 * Four bytes per token is the usual figure for English with BPE tokenizers; the per-message
 * overhead covers the chat template's role markers.
 */
#define USAGE_BYTES_PER_TOKEN    4
#define USAGE_TOKENS_PER_MESSAGE 4
#define USAGE_TOKENS_PER_REPLY   3
#define USAGE_TOKENS_PER_IMAGE   1000
/* A reasonable completion budget when the request names none (the caller passes it). */
#define USAGE_DEFAULT_COMPLETION_BUDGET 512

/*
 * Non-stream body: finds the top-level "usage" member by scanning the JSON at depth 1 —
 * strings and nested values are skipped whole, so a "usage" inside message content or a
 * nested object is never taken — and parses only that object. Fills prompt, completion,
 * total (prompt + completion when absent), cached (prompt_tokens_details.cached_tokens)
 * and reasoning (completion_tokens_details.reasoning_tokens). Also understands the
 * Anthropic shape (input_tokens + cache_read_input_tokens + cache_creation_input_tokens,
 * output_tokens) and the Responses API shape (input_tokens, output_tokens, *_details).
 * Returns false, with *out zeroed, when there is no usable usage object (absent, null,
 * not an object, no count in it, or the body is not a JSON object). Sets present = true,
 * estimated = false on success.
 */
bool usage_from_body(const char *body, size_t len, struct record_usage *out);

/*
 * One SSE event's data (one chunk's JSON). true when the chunk carries a non-null
 * top-level "usage"; *usage_only (may be NULL) is then whether "choices" is an empty
 * array — the extra chunk that stream_options.include_usage adds, which Sluice hides
 * from a client that did not ask for it. Data that ends with a top-level "usage":null (every
 * chunk but the last under include_usage) is refused from its last bytes, data without the
 * substring "usage" by one search, both without parsing; a chunk that repeats the top-level
 * key "usage" is read by its last one when that is null.
 */
bool usage_from_sse_data(const char *data, size_t len, struct record_usage *out, bool *usage_only);

/* Estimated prompt tokens of a request body (chat, completions, embeddings, responses, anthropic
 * messages). */
uint64_t usage_estimate_prompt(const json_t *body);
/* Completion tokens the request may produce: its own cap, else default_budget; × n. */
uint64_t usage_completion_budget(const json_t *body, uint64_t default_budget);
/* Tokens in text_bytes of produced text (for streams cut short or upstreams without usage). */
uint64_t usage_estimate_text(size_t text_bytes);

/* An estimated usage record: present and estimated set, total = prompt + completion. */
void usage_set_estimate(struct record_usage *out, uint64_t prompt, uint64_t completion);

/* memmem(hay, len, needle, n), sixteen bytes at a time where SSE2 is there: made for quoted
 * keys ("\"content\":\""), whose bytes 1 and 3 are rarely both in place. */
const char *usage_find(const char *hay, size_t len, const char *needle, size_t n);

/* The raw value of top-level member `name` in a JSON object text, found by the same
 * depth-1 scan (nothing is built): *val points into buf. False when absent or when
 * buf is not an object. */
bool usage_scan_member(const char *buf, size_t len, const char *name, const char **val,
                       size_t *val_len);

#endif
