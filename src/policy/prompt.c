/* prompt.c — where the prompt text is in each client protocol: walk it by role, add messages. */
#include "sluice/prompt.h"

#include <stdlib.h>
#include <string.h>

const char *const prompt_role_names[] = {"system", "developer", "user", "assistant", "tool", NULL};

/* ---------------------------------------------------------------- walking */

/* The walk runs twice for last_only: once to find the last message with a selected piece,
 * once to visit it. `only` is that message (or SIZE_MAX: every message). */
struct walk {
	unsigned roles;
	size_t only;
	prompt_text_fn fn;
	void *arg;
	size_t last; /* first pass: the last message seen with a selected piece */
	bool found;
	bool stopped;
};

static void visit(struct walk *w, enum prompt_role role, size_t message, json_t *str)
{
	if (w->stopped || !json_is_string(str) || !(w->roles & PROMPT_ROLE_BIT(role)))
		return;
	if (w->fn == NULL) { /* first pass */
		w->last = message;
		w->found = true;
		return;
	}
	if (w->only != SIZE_MAX && message != w->only)
		return;
	struct prompt_text t = {.role = role, .message = message, .str = str};
	if (!w->fn(w->arg, &t))
		w->stopped = true;
}

static enum prompt_role role_of(const json_t *v)
{
	const char *r = json_string_value(v);
	if (r == NULL)
		return PROMPT_USER;
	for (int i = 0; i < PROMPT__ROLES; i++) {
		if (strcmp(prompt_role_names[i], r) == 0)
			return (enum prompt_role)i;
	}
	if (strcmp(r, "function") == 0)
		return PROMPT_TOOL;
	return PROMPT_USER; /* an unknown role never hides its text */
}

/* A content value: a string, or an array of parts each with a "text" string. */
static void visit_content(struct walk *w, enum prompt_role role, size_t message, json_t *content)
{
	size_t i;
	json_t *part;

	if (json_is_string(content)) {
		visit(w, role, message, content);
		return;
	}
	json_array_foreach(content, i, part)
	{
		if (json_is_string(part)) /* legacy: a list of strings */
			visit(w, role, message, part);
		else
			visit(w, role, message, json_object_get(part, "text"));
	}
}

static void walk_chat_messages(struct walk *w, json_t *messages, size_t first)
{
	size_t i;
	json_t *m;

	json_array_foreach(messages, i, m)
	{
		if (!json_is_object(m))
			continue;
		visit_content(w, role_of(json_object_get(m, "role")), first + i,
		              json_object_get(m, "content"));
	}
}

/* Anthropic blocks: text in the message's role; tool_result content as tool text. */
static void walk_anthropic_content(struct walk *w, enum prompt_role role, size_t message,
                                   json_t *content)
{
	size_t i;
	json_t *b;

	if (json_is_string(content)) {
		visit(w, role, message, content);
		return;
	}
	json_array_foreach(content, i, b)
	{
		const char *type = json_string_value(json_object_get(b, "type"));
		if (type != NULL && strcmp(type, "tool_result") == 0)
			visit_content(w, PROMPT_TOOL, message, json_object_get(b, "content"));
		else if (type == NULL || strcmp(type, "text") == 0)
			visit(w, role, message, json_object_get(b, "text"));
	}
}

static void walk_messages(struct walk *w, json_t *body)
{
	json_t *system = json_object_get(body, "system");
	json_t *messages = json_object_get(body, "messages");
	size_t first = system != NULL ? 1 : 0, i;
	json_t *m;

	if (system != NULL)
		walk_anthropic_content(w, PROMPT_SYSTEM, 0, system);
	json_array_foreach(messages, i, m)
	{
		if (json_is_object(m))
			walk_anthropic_content(w, role_of(json_object_get(m, "role")), first + i,
			                       json_object_get(m, "content"));
	}
}

static void walk_responses(struct walk *w, json_t *body)
{
	json_t *instructions = json_object_get(body, "instructions");
	json_t *input = json_object_get(body, "input");
	size_t first = instructions != NULL ? 1 : 0, i;
	json_t *item;

	if (instructions != NULL)
		visit(w, PROMPT_SYSTEM, 0, instructions);
	if (json_is_string(input)) {
		visit(w, PROMPT_USER, first, input);
		return;
	}
	json_array_foreach(input, i, item)
	{
		const char *type = json_string_value(json_object_get(item, "type"));
		if (type != NULL && strcmp(type, "function_call_output") == 0)
			visit(w, PROMPT_TOOL, first + i, json_object_get(item, "output"));
		else if (type == NULL || strcmp(type, "message") == 0)
			visit_content(w, role_of(json_object_get(item, "role")), first + i,
			              json_object_get(item, "content"));
	}
}

/* Completions and embeddings prompts: a string or a list of strings (token ids skipped). */
static void walk_strings(struct walk *w, json_t *v, size_t message)
{
	size_t i;
	json_t *s;

	if (json_is_string(v)) {
		visit(w, PROMPT_USER, message, v);
		return;
	}
	json_array_foreach(v, i, s) visit(w, PROMPT_USER, message, s);
}

static void walk(struct walk *w, json_t *body, enum proto proto)
{
	switch (proto) {
	case PROTO_MESSAGES:
	case PROTO_COUNT_TOKENS:
		walk_messages(w, body);
		return;
	case PROTO_RESPONSES:
		walk_responses(w, body);
		return;
	case PROTO_CHAT:
		walk_chat_messages(w, json_object_get(body, "messages"), 0);
		return;
	default: {
		json_t *messages = json_object_get(body, "messages");
		size_t n = json_is_array(messages) ? json_array_size(messages) : 0;
		walk_chat_messages(w, messages, 0);
		walk_strings(w, json_object_get(body, "prompt"), n);
		walk_strings(w, json_object_get(body, "input"), n + 1);
		return;
	}
	}
}

bool prompt_foreach(json_t *body, enum proto proto, unsigned roles, bool last_only,
                    prompt_text_fn fn, void *arg)
{
	struct walk w = {.roles = roles, .only = SIZE_MAX};

	if (!json_is_object(body) || fn == NULL)
		return true;
	if (last_only) {
		walk(&w, body, proto);
		if (!w.found)
			return true;
		w.only = w.last;
	}
	w.fn = fn;
	w.arg = arg;
	walk(&w, body, proto);
	return !w.stopped;
}

size_t prompt_message_count(const json_t *body, enum proto proto)
{
	const json_t *v;

	switch (proto) {
	case PROTO_RESPONSES:
		v = json_object_get(body, "input");
		return json_is_string(v) ? 1 : json_is_array(v) ? json_array_size(v) : 0;
	default:
		v = json_object_get(body, "messages");
		return json_is_array(v) ? json_array_size(v) : 0;
	}
}

/* ---------------------------------------------------------------- inserting */

static bool is_system(enum prompt_role r)
{
	return r == PROMPT_SYSTEM || r == PROMPT_DEVELOPER;
}

static json_t *text_block(const char *text)
{
	return json_pack("{s:s, s:s}", "type", "text", "text", text);
}

static json_t *chat_message(const struct prompt_message *m)
{
	return json_pack("{s:s, s:s}", "role", prompt_role_names[m->role], "content", m->text);
}

/* content as a new array of blocks: a string becomes one text block, an array is copied. */
static json_t *as_blocks(json_t *content)
{
	if (json_is_string(content)) {
		json_t *a = json_array();
		if (a != NULL && json_array_append_new(a, json_pack("{s:s, s:O}", "type", "text",
		                                                    "text", content)) != 0) {
			json_decref(a);
			return NULL;
		}
		return a;
	}
	return json_is_array(content) ? json_copy(content) : NULL;
}

/* Insert items into the array arr at the start or end. */
static bool array_put(json_t *arr, json_t *items, bool before)
{
	size_t i;
	json_t *v;

	json_array_foreach(items, i, v)
	{
		if ((before ? json_array_insert(arr, i, v) : json_array_append(arr, v)) != 0)
			return false;
	}
	return true;
}

static bool insert_chat(json_t *body, const struct prompt_message *msgs, size_t n, bool before,
                        const char **why)
{
	json_t *messages = json_object_get(body, "messages");
	json_t *items = json_array();
	bool ok = items != NULL;

	if (!json_is_array(messages)) {
		*why = "the request has no \"messages\" list";
		json_decref(items);
		return false;
	}
	for (size_t i = 0; ok && i < n; i++)
		ok = json_array_append_new(items, chat_message(&msgs[i])) == 0;
	ok = ok && array_put(messages, items, before);
	json_decref(items);
	if (!ok)
		*why = "out of memory";
	return ok;
}

/* Anthropic: our message next to a client message of the same role becomes one message
 * (text blocks, ours on the outside). */
static bool merge_into(json_t *client, const char *text, bool before)
{
	json_t *blocks = as_blocks(json_object_get(client, "content"));
	json_t *ours = text_block(text);
	bool ok = blocks != NULL && ours != NULL &&
	          (before ? json_array_insert(blocks, 0, ours) : json_array_append(blocks, ours)) ==
	                  0;
	json_decref(ours);
	ok = ok && json_object_set(client, "content", blocks) == 0;
	json_decref(blocks);
	return ok;
}

static bool insert_messages(json_t *body, const struct prompt_message *msgs, size_t n, bool before,
                            const char **why)
{
	json_t *messages = json_object_get(body, "messages");
	json_t *system = json_object_get(body, "system");
	json_t *sys_items = NULL, *items = NULL;
	bool ok = true;

	if (!json_is_array(messages) ||
	    (system != NULL && !json_is_string(system) && !json_is_array(system))) {
		*why = json_is_array(messages) ? "the request's \"system\" is neither a string nor "
		                                 "a list of blocks"
		                               : "the request has no \"messages\" list";
		return false;
	}
	*why = "out of memory";
	sys_items = json_array();
	items = json_array();
	ok = sys_items != NULL && items != NULL;
	for (size_t i = 0; ok && i < n; i++) {
		if (is_system(msgs[i].role))
			ok = json_array_append_new(sys_items, text_block(msgs[i].text)) == 0;
		else
			ok = json_array_append_new(items, chat_message(&msgs[i])) == 0;
	}
	/* The system field: a list of blocks with the client's own kept inside ours. */
	if (ok && json_array_size(sys_items) > 0) {
		json_t *blocks = system != NULL ? as_blocks(system) : json_array();
		ok = blocks != NULL && array_put(blocks, sys_items, before) &&
		     json_object_set(body, "system", blocks) == 0;
		json_decref(blocks);
	}
	/* The messages: merged with the neighbouring client message of the same role. */
	size_t k = json_array_size(items);
	if (ok && k > 0) {
		json_t *edge_ours = json_array_get(items, before ? k - 1 : 0);
		size_t nm = json_array_size(messages);
		json_t *edge_client = nm > 0 ? json_array_get(messages, before ? 0 : nm - 1) : NULL;
		const char *r1 = json_string_value(json_object_get(edge_ours, "role"));
		const char *r2 = json_string_value(json_object_get(edge_client, "role"));
		if (r1 != NULL && r2 != NULL && strcmp(r1, r2) == 0) {
			ok = merge_into(edge_client,
			                json_string_value(json_object_get(edge_ours, "content")),
			                before) &&
			     json_array_remove(items, before ? k - 1 : 0) == 0;
		}
		ok = ok && array_put(messages, items, before);
	}
	json_decref(sys_items);
	json_decref(items);
	return ok;
}

/* Responses: instructions joined by a blank line, the client's between ours. */
static bool join_instructions(json_t *body, const struct prompt_message *msgs, size_t n,
                              bool before)
{
	json_t *old = json_object_get(body, "instructions");
	size_t len = json_is_string(old) ? json_string_length(old) : 0;
	size_t cap = len + 1;

	for (size_t i = 0; i < n; i++)
		if (is_system(msgs[i].role))
			cap += strlen(msgs[i].text) + 2;
	char *buf = malloc(cap), *o = buf;
	if (buf == NULL)
		return false;
	if (!before && len > 0) {
		memcpy(o, json_string_value(old), len);
		o += len;
	}
	for (size_t i = 0; i < n; i++) {
		if (!is_system(msgs[i].role))
			continue;
		if (o != buf) {
			memcpy(o, "\n\n", 2);
			o += 2;
		}
		size_t l = strlen(msgs[i].text);
		memcpy(o, msgs[i].text, l);
		o += l;
	}
	if (before && len > 0) {
		if (o != buf) {
			memcpy(o, "\n\n", 2);
			o += 2;
		}
		memcpy(o, json_string_value(old), len);
		o += len;
	}
	bool ok = json_object_set_new(body, "instructions", json_stringn(buf, (size_t)(o - buf))) ==
	          0;
	free(buf);
	return ok;
}

static bool insert_responses(json_t *body, const struct prompt_message *msgs, size_t n, bool before,
                             const char **why)
{
	json_t *input = json_object_get(body, "input");
	json_t *instructions = json_object_get(body, "instructions");
	bool any_sys = false, any_other = false, ok = true;

	for (size_t i = 0; i < n; i++) {
		any_sys |= is_system(msgs[i].role);
		any_other |= !is_system(msgs[i].role);
	}
	if ((any_other && !json_is_string(input) && !json_is_array(input)) ||
	    (any_sys && instructions != NULL && !json_is_string(instructions) &&
	     !json_is_null(instructions))) {
		*why = any_other && !json_is_string(input) && !json_is_array(input)
		               ? "the request's \"input\" is neither a string nor a list of items"
		               : "the request's \"instructions\" is not a string";
		return false;
	}
	*why = "out of memory";
	if (any_sys && !join_instructions(body, msgs, n, before))
		return false;
	if (!any_other)
		return true;
	if (json_is_string(input)) {
		json_t *list = json_pack("[{s:s, s:O}]", "role", "user", "content", input);
		if (list == NULL || json_object_set_new(body, "input", list) != 0)
			return false;
		input = list;
	}
	json_t *items = json_array();
	ok = items != NULL;
	for (size_t i = 0; ok && i < n; i++)
		if (!is_system(msgs[i].role))
			ok = json_array_append_new(items, chat_message(&msgs[i])) == 0;
	ok = ok && array_put(input, items, before);
	json_decref(items);
	return ok;
}

bool prompt_insert(json_t *body, enum proto proto, const struct prompt_message *msgs, size_t n,
                   bool before, const char **why)
{
	const char *unused;

	if (why == NULL)
		why = &unused;
	if (n == 0)
		return true;
	if (!json_is_object(body)) {
		*why = "the request is not a JSON object";
		return false;
	}
	switch (proto) {
	case PROTO_CHAT:
		return insert_chat(body, msgs, n, before, why);
	case PROTO_MESSAGES:
	case PROTO_COUNT_TOKENS:
		return insert_messages(body, msgs, n, before, why);
	case PROTO_RESPONSES:
		return insert_responses(body, msgs, n, before, why);
	default:
		/* Any other path: decorated like chat when it carries a chat message list. */
		if (json_is_array(json_object_get(body, "messages")))
			return insert_chat(body, msgs, n, before, why);
		*why = "this kind of request has no message list to add messages to";
		return false;
	}
}
