/* policy_chain.h — running a route's policies (src/policy/policy.c): what src/request.c calls.
 *
 * One struct policy_run per request whose route has plugins (route->n_plugins > 0); a route
 * without plugins never creates one and pays nothing. The run owns every policy state of
 * the request and is freed with it (policy_run_free), which also cancels any pending work.
 *
 * The calls, in the order the pipeline makes them:
 *
 *   run = policy_run_new(route, &env, streaming)         after authentication
 *   policy_run_request(run, proto, body, done, arg)      before any quota is reserved
 *       (or policy_run_request_bytes over the client's scanned bytes: a tree only when a
 *       policy needs one; then policy_run_request_take_tree / policy_run_request_bytes_result)
 *       CONTINUE: go on (policy_run_request_outcome(run)->changed: re-serialise body)
 *       REFUSE:   answer with ->status/->type/->code/->message
 *       PENDING:  done(arg, CONTINUE | REFUSE) comes later, once, from the loop
 *   — response, only when route->plugin_phases has POLICY_PHASE_RESPONSE —
 *   streams:  policy_run_on_stop(run, on_stop, arg)      before the first chunk
 *             policy_run_chat_chunk(run, chunk) per pivot chunk (or policy_run_text per
 *                 choice delta), then policy_run_flush at the upstream's end
 *   non-stream: policy_run_chat_completion(run, completion)
 *   both:     policy_run_done(run, done, arg)            after the last text
 *             (non-stream: then policy_run_chat_completion_done(run, completion))
 *   policy_run_actions / policy_run_emit_alerts          for metrics, access log, alerts
 *   policy_run_free(run)                                 when the request ends
 *
 * Callbacks (done, on_stop) run from the loop, never from inside the call that started the
 * work; they may end the request and free the run.
 */
#ifndef SLUICE_POLICY_CHAIN_H
#define SLUICE_POLICY_CHAIN_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "sluice/config.h"
#include "sluice/json_scan.h"
#include "sluice/policy.h"

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

struct evbuffer;

/* ------------------------------------------------------------------ the table */

/* The built-in policy named name (a key under `plugins:`), or NULL. */
const struct policy_def *policy_find(const char *name);
/* The i-th built-in, NULL past the last (for the loader's suggestions). */
const struct policy_def *policy_at(size_t i);

/* ------------------------------------------------------------------ one request */

/* Choices a response may have for the policies: a larger index ends the answer (REFUSE). */
#define POLICY_MAX_CHOICES 128
/* Distinct (policy, action) pairs kept per request; more are counted in dropped. */
#define POLICY_MAX_ACTIONS 16

/* A decision, for sluice_policy_actions_total{route,policy,action}, the access log and the
 * debug log. Strings are fixed or owned by the snapshot. */
struct policy_action {
	const char *policy; /* the plugin's name (config_plugin.name) */
	const char *action; /* "blocked", "masked", "capped", "decorated", "cut", ... */
	char rule[128];     /* what fired first, never the content */
	const char *alert;  /* alert event type (policy_run_emit_alerts), or NULL */
	unsigned count;     /* how many times in this request */
	bool alerted;
};

struct policy_run;

/* env is copied (its strings must live as long as the run). NULL when out of memory. */
struct policy_run *policy_run_new(const struct config_route *route, const struct policy_env *env,
                                  bool streaming);
/* Cancels pending work (without calling back) and frees every state. NULL is fine. */
void policy_run_free(struct policy_run *run);

/* ---- request phase -------------------------------------------------------------------- */

typedef void (*policy_request_done_fn)(void *arg, enum policy_verdict v);
/* The route's on_request chain over body (the client's, in protocol proto; borrowed, may be
 * changed in place), in order; a refusal ends the chain. Once per request. */
enum policy_verdict policy_run_request(struct policy_run *run, enum proto proto, json_t *body,
                                       policy_request_done_fn done, void *arg);
/* The same chain over the client's bytes, accepted by json_scan_body() into scan (both
 * borrowed, living until the run is freed): the policies that read bytes (policy_bytes.h)
 * read them, and a tree is parsed only when a policy needs one. After the chain, take the
 * tree (policy_run_request_take_tree) and the spliced bytes (policy_run_request_bytes). */
enum policy_verdict policy_run_request_bytes(struct policy_run *run, enum proto proto,
                                             const char *bytes, size_t len,
                                             const struct json_scan *scan,
                                             policy_request_done_fn done, void *arg);
/* The tree a bytes chain parsed (it is the body as the policies left it), handed to the
 * caller (who then owns it); NULL when none was parsed. */
json_t *policy_run_request_take_tree(struct policy_run *run);
/* After a bytes chain that changed the body: true when the change is all in bytes (a
 * decorator's splice, and no change to a tree after it): *bytes (malloc'd, NUL-terminated,
 * now the caller's) with *len, and *scan their scan (the run's: copy it) — NULL when the
 * scanner could not read them (parse them instead). False: re-serialise the tree. */
bool policy_run_request_bytes_result(struct policy_run *run, char **bytes, size_t *len,
                                     const struct json_scan **scan);
/* After a bytes chain: the prompt estimate a policy took of the final bytes (the same number
 * json_scan_estimate_prompt gives for them); false when none did, or when a tree was changed
 * after it. */
bool policy_run_request_estimate(const struct policy_run *run, uint64_t *est);
/* After the chain: changed, and for a refusal status (0 = 400), type (NULL =
 * invalid_request_error), code and message. */
const struct policy_request *policy_run_request_outcome(const struct policy_run *run);
/* After a chain that changed the body: true when its whole change was chat messages added
 * around the client's by one policy that described them as bytes (policy_request's
 * splice_before / splice_after, either may be NULL): the client's bytes can be spliced. */
bool policy_run_request_splice(const struct policy_run *run, const char **before,
                               const char **after);
/* body (len bytes) with before / after (chat messages as JSON, either may be NULL) spliced
 * into its "messages" array, the span messages (a scan of body) gives: a new malloc'd,
 * NUL-terminated buffer of *out_len bytes, NULL when out of memory. Used by the chain on the
 * byte path and by request.c when the chain ran on a tree. */
char *policy_splice_messages(const char *body, size_t len, const struct json_scan_value *messages,
                             const char *before, const char *after, size_t *out_len);

/* ---- response phases ------------------------------------------------------------------ */

/* Streams: where a decision taken asynchronously (a moderation window) stops the answer:
 * on_stop(arg, finish_reason) ends the stream (a final chunk with that finish_reason, then
 * the protocol's end) and cancels the upstream. Called at most once, from the loop. */
typedef void (*policy_stop_fn)(void *arg, const char *finish_reason);
void policy_run_on_stop(struct policy_run *run, policy_stop_fn fn, void *arg);

/* New output text of one choice (UTF-8, e.g. one delta's content), through the chain in
 * order, each policy receiving what the previous one let out; final: the choice's text is
 * complete (everything held is released). What may go to the client now is appended to out.
 *   CONTINUE  go on
 *   STOP      out holds the last text; end with policy_run_finish_reason(run, choice).
 *             In a stream the whole answer ends (cancel the upstream; every later call
 *             returns STOP); in a non-stream answer only this choice is cut.
 *   REFUSE    the policies cannot run (out of memory, choice >= POLICY_MAX_CHOICES): end
 *             the answer with an error. */
enum policy_verdict policy_run_text(struct policy_run *run, unsigned choice, const char *text,
                                    size_t len, bool final, struct evbuffer *out);

/* The same, except that when every policy let the text through unchanged (holding
 * nothing) *passed is set and out is left alone: the output is text itself, not copied. */
enum policy_verdict policy_run_text_ref(struct policy_run *run, unsigned choice,
                                        const char *text, size_t len, bool final,
                                        struct evbuffer *out, bool *passed);

/* Streams, at the upstream's end: final text for every choice not finished yet; emit gets
 * what each releases (only when not empty). Verdicts as policy_run_text. */
typedef void (*policy_flush_fn)(void *arg, unsigned choice, const char *text, size_t len);
enum policy_verdict policy_run_flush(struct policy_run *run, policy_flush_fn emit, void *arg);

/* After the last text (non-stream: before the answer is sent; stream: before its end):
 *   CONTINUE  send it as it is
 *   STOP      some choices are withheld: policy_run_finish_reason tells which
 *   PENDING   done(arg) comes later, once, from the loop; then read the finish reasons */
typedef void (*policy_done_fn)(void *arg);
enum policy_verdict policy_run_done(struct policy_run *run, policy_done_fn done, void *arg);

/* The finish_reason the policies impose on choice ("content_filter", "length"), NULL when
 * none. In a stream a stop applies to every choice. */
const char *policy_run_finish_reason(const struct policy_run *run, unsigned choice);
/* A stream was stopped (synchronously or asynchronously): its finish reason, else NULL. */
const char *policy_run_stopped(const struct policy_run *run);

/* ---- the pivot's shapes (provider.h), for request.c's convenience --------------------- */

/* A non-stream chat.completion: each choices[].message.content string through the chain
 * (final), rewritten in place; a stopped choice gets its cut text and finish_reason. */
enum policy_verdict policy_run_chat_completion(struct policy_run *run, json_t *completion);
/* After policy_run_done: the choices a done-phase policy withheld get content "" and their
 * finish_reason. */
void policy_run_chat_completion_done(struct policy_run *run, json_t *completion);
/* A chat.completion.chunk: each choices[].delta.content through the chain, final when the
 * choice carries a finish_reason, rewritten in place (held text leaves "" behind; text
 * released at a finish goes into that chunk). Verdicts as policy_run_text; on STOP the
 * chunk holds the last text and the stream ends with policy_run_stopped(run). */
enum policy_verdict policy_run_chat_chunk(struct policy_run *run, json_t *chunk);

/* ---- the same over the upstream's bytes (src/policy/chat_bytes.c) --------------------- */

/* Choices one document may have for the byte path; more: the tree path. */
#define POLICY_CHAT_BYTES_CHOICES 8

struct policy_chat_bytes {
	bool read;         /* false: the bytes were not read (see below); nothing ran */
	bool changed;      /* out holds the rewritten document; else the input stands */
	size_t text_bytes; /* decoded text the upstream produced (before the policies) */
};

/*
 * A chat.completion (chunk false) or a chat.completion.chunk (chunk true) as the upstream's
 * JSON bytes, through the chain without a tree: what policy_run_chat_completion /
 * policy_run_chat_chunk do, with the same verdicts, but the text is found in the bytes (and
 * decoded, escapes resolved, for the policies) and only a changed document is written to
 * out — the input's bytes with each changed text spliced in as a JSON string, and the
 * finish_reason the gateway imposes. res->read is false, with nothing run, when the bytes
 * are not a document this reader takes with certainty (invalid JSON, an escaped or
 * repeated key it looks at, an error event, more than POLICY_CHAT_BYTES_CHOICES choices):
 * use the tree functions then.
 */
enum policy_verdict policy_run_chat_bytes(struct policy_run *run, const char *data, size_t len,
                                          bool chunk, struct evbuffer *out,
                                          struct policy_chat_bytes *res);
/* Whether policy_run_chat_bytes would read these bytes (runs nothing). The run's variant
 * keeps what it read for the next policy_run_chat_bytes over the same bytes (data, len and
 * chunk the same, the bytes unchanged in between), which then does not read them again. */
bool policy_chat_bytes_readable(const char *data, size_t len, bool chunk);
bool policy_run_chat_bytes_readable(struct policy_run *run, const char *data, size_t len,
                                    bool chunk);
/* After policy_run_done: a done-phase policy withheld some choice's text (the answer then
 * needs policy_run_chat_completion_done on a tree). */
bool policy_run_withheld(const struct policy_run *run);

/* ---- decisions ------------------------------------------------------------------------ */

/* The decisions so far, in order of first occurrence; *dropped (may be NULL) gets how many
 * distinct ones did not fit. */
size_t policy_run_actions(const struct policy_run *run, const struct policy_action **out,
                          size_t *dropped);
/* Raises (alerts_emit) every decision with an alert type not raised yet, with fields
 * request_id, route, consumer, policy, action, rule and count, plus the members of extra
 * (e.g. instance, model, completion_tokens; stolen, may be NULL). */
void policy_run_emit_alerts(struct policy_run *run, json_t *extra);

/* ------------------------------------------------------------------ for the policy modules */

/* This thread's PCRE2 match data (one ovector pair: the whole match) and match context (a
 * JIT stack of up to 1 MiB), created on first use and freed when the thread exits. NULL when
 * out of memory. */
pcre2_match_data *policy_match_data(void);
pcre2_match_context *policy_match_context(void);
/* UTF-8: the number of code points in s[0..len) (an invalid byte counts as one), and the
 * length of the longest prefix of s[0..len) that does not end inside a sequence. */
size_t policy_utf8_count(const char *s, size_t len);
size_t policy_utf8_complete(const char *s, size_t len);
/* The byte offset after the first n code points of s[0..len) (len when it has fewer). */
size_t policy_utf8_advance(const char *s, size_t len, size_t n);

/* The run's buffers for chat_bytes.c: one it keeps decoded and rewritten texts in (emptied
 * by this call), and the chain's output buffer (emptied too). NULL when out of memory. */
struct evbuffer *policy_run_bytes_buffer(struct policy_run *run);
struct evbuffer *policy_run_text_out(struct policy_run *run);
/* A slot chat_bytes.c keeps a malloc'd block in; freed with the run. */
void **policy_run_bytes_slot(struct policy_run *run);

#endif
