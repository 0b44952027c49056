/* prompt.h — the prompt text of a client body, by role, in each client protocol
 * (src/policy/prompt.c).
 *
 * Request policies read and decorate the client's body in the client's own protocol
 * (policy.h: on_request runs before any translation), so every one of them needs the same
 * knowledge of where the text is:
 *
 *   chat       messages[]: role, content a string or an array of parts with "text"
 *              (roles system, developer, user, assistant, tool; "function" is tool; an
 *              unknown role counts as user, so that an odd role never hides text)
 *   messages   (Anthropic, also count_tokens) system: a string or text blocks (role
 *              system), then messages[]: user / assistant with a string or blocks: text
 *              blocks in the message's role, tool_result blocks (their string or text
 *              blocks) as role tool
 *   responses  instructions (role system), then input: a string (one user message) or
 *              items: messages {role, content: string or parts with "text"} and
 *              function_call_output {output} (role tool)
 *   others     (completions, embeddings, any other path) messages[] as chat when present,
 *              then prompt and input (strings or lists of strings) as user text
 *
 * Messages are numbered in body order (a system / instructions field first), so "the last
 * user message" is the highest-numbered one that has user text. A field of the wrong type is
 * skipped, never an error: the upstream refuses what is malformed.
 */
#ifndef SLUICE_PROMPT_H
#define SLUICE_PROMPT_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "sluice/provider.h"

enum prompt_role {
	PROMPT_SYSTEM,
	PROMPT_DEVELOPER,
	PROMPT_USER,
	PROMPT_ASSISTANT,
	PROMPT_TOOL,
	PROMPT__ROLES,
};
#define PROMPT_ROLE_BIT(r) (1u << (r))
#define PROMPT_ALL_ROLES   ((1u << PROMPT__ROLES) - 1)

/* "system", "developer", "user", "assistant", "tool", NULL: indexed by enum prompt_role. */
extern const char *const prompt_role_names[];

/* One piece of the prompt's text. */
struct prompt_text {
	enum prompt_role role;
	size_t message; /* the message it belongs to, numbered in body order */
	json_t *str;    /* the JSON string holding it (borrowed from the body); a policy may
	                   rewrite it in place with json_string_setn */
};

/* false stops the walk. */
typedef bool (*prompt_text_fn)(void *arg, const struct prompt_text *t);

/*
 * Calls fn for every piece of text whose role is in roles (PROMPT_ROLE_BIT set), in body
 * order; with last_only, only the pieces of the last message that has one. Returns false
 * when fn stopped the walk.
 */
bool prompt_foreach(json_t *body, enum proto proto, unsigned roles, bool last_only,
                    prompt_text_fn fn, void *arg);

/* The number of messages (turns) the body carries: chat and Anthropic messages[], Responses
 * input items (a string input is one); a system / instructions field is not counted. */
size_t prompt_message_count(const json_t *body, enum proto proto);

/* A message to add around the client's. */
struct prompt_message {
	enum prompt_role role; /* system, developer, user or assistant */
	const char *text;      /* UTF-8, NUL-free */
};

/*
 * Adds msgs before (or after) the client's messages, in their order:
 *   chat       into messages[]
 *   messages   system and developer into the system field (as text blocks, the client's
 *              own system kept between ours), the others into messages[]; a message next
 *              to a client message of the same role is merged into it (as text blocks), as
 *              the Messages API wants roles to alternate
 *   responses  system and developer into instructions (joined by a blank line), the others
 *              into input as {role, content} items (a string input becomes the first item)
 * False with *why set when the body cannot take them (no message list in this protocol, or
 * a field of the wrong type: the body is then unchanged) or out of memory (the request is
 * to be refused: the body may be half changed).
 */
bool prompt_insert(json_t *body, enum proto proto, const struct prompt_message *msgs, size_t n,
                   bool before, const char **why);

#endif
