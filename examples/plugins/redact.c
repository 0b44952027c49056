/* redact.c — an example Sluice plugin: masks e-mail and IPv4 addresses in the request's prompt.
 *
 *   plugins:
 *     - external: { path: /usr/lib/sluice/plugins/redact.so, config: { fields: [email] } }
 *
 * config.fields lists what to mask: email (local@domain.tld) and/or ipv4 (a.b.c.d, each
 * 0-255). Every piece of prompt text, in every role and protocol (the host's
 * prompt_foreach), is rewritten in place: each address becomes "[email]" or "[ipv4]" before
 * the upstream sees it. Build it like any shared object against Sluice's headers and
 * jansson; docs/plugins.md shows how.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/plugin.h"

enum field { FIELD_EMAIL = 1u << 0, FIELD_IPV4 = 1u << 1 };

struct redact_conf {
	unsigned fields;
	const struct sluice_plugin_host *host;
};

static void *redact_conf_parse(const json_t *config, const struct sluice_plugin_host *host,
                               char *err, size_t errlen)
{
	const json_t *fields = json_object_get(config, "fields");
	struct redact_conf *c;
	size_t i;
	json_t *f;
	unsigned bits = 0;

	if (!json_is_object(config) || !json_is_array(fields) || json_array_size(fields) == 0) {
		snprintf(err, errlen, "config.fields must list what to redact: email, ipv4");
		return NULL;
	}
	if (json_object_size(config) != 1) {
		snprintf(err, errlen, "config takes only fields");
		return NULL;
	}
	json_array_foreach(fields, i, f)
	{
		const char *s = json_string_value(f);
		if (s != NULL && strcmp(s, "email") == 0) {
			bits |= FIELD_EMAIL;
		} else if (s != NULL && strcmp(s, "ipv4") == 0) {
			bits |= FIELD_IPV4;
		} else {
			snprintf(err, errlen, "config.fields[%zu]: unknown field (email, ipv4)", i);
			return NULL;
		}
	}
	c = calloc(1, sizeof *c);
	if (c == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	c->fields = bits;
	c->host = host;
	return c;
}

static void redact_conf_free(void *conf)
{
	free(conf);
}

/* ---------------------------------------------------------------- finding addresses */

static bool is_local(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       strchr("._%+-", c) != NULL;
}

static bool is_domain(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       c == '.' || c == '-';
}

static bool is_digit(unsigned char c)
{
	return c >= '0' && c <= '9';
}

/* An e-mail address around the '@' at s[at]: its span, or false. */
static bool email_at(const char *s, size_t len, size_t at, size_t *start, size_t *end)
{
	size_t a = at, b = at + 1;
	bool dot = false;

	while (a > 0 && is_local((unsigned char)s[a - 1]))
		a--;
	while (b < len && is_domain((unsigned char)s[b]))
		b++;
	while (b > at + 1 && (s[b - 1] == '.' || s[b - 1] == '-'))
		b--; /* "mail me at a@b.org." */
	for (size_t i = at + 1; i < b; i++)
		dot |= s[i] == '.' && i > at + 1 && i + 1 < b;
	if (a == at || !dot)
		return false;
	*start = a;
	*end = b;
	return true;
}

/* A dotted quad starting at s[i] (not preceded by a digit or a dot): its end, or 0. */
static size_t ipv4_at(const char *s, size_t len, size_t i)
{
	size_t p = i;

	if (i > 0 && (is_digit((unsigned char)s[i - 1]) || s[i - 1] == '.'))
		return 0;
	for (int part = 0; part < 4; part++) {
		unsigned v = 0, digits = 0;
		if (part > 0) {
			if (p >= len || s[p] != '.')
				return 0;
			p++;
		}
		while (p < len && is_digit((unsigned char)s[p]) && digits < 4) {
			v = v * 10 + (unsigned)(s[p] - '0');
			p++;
			digits++;
		}
		if (digits == 0 || digits > 3 || v > 255)
			return 0;
	}
	if (p < len && (is_digit((unsigned char)s[p]) ||
	                (s[p] == '.' && p + 1 < len && is_digit((unsigned char)s[p + 1]))))
		return 0;
	return p;
}

struct pass {
	const struct redact_conf *c;
	unsigned emails, ips;
	bool oom;
};

/* Rewrites one JSON string in place when it holds an address. */
static bool redact_text(void *arg, const struct prompt_text *t)
{
	struct pass *ps = arg;
	const char *s = json_string_value(t->str);
	size_t len = json_string_length(t->str), i = 0, out_len = 0;
	char *out = NULL;
	size_t copied = 0;

	for (i = 0; i < len; i++) {
		size_t start, end;
		const char *mask = NULL;
		if ((ps->c->fields & FIELD_EMAIL) && s[i] == '@' &&
		    email_at(s, len, i, &start, &end)) {
			if (start < copied)
				continue; /* inside what was just masked */
			mask = "[email]";
			ps->emails++;
		} else if ((ps->c->fields & FIELD_IPV4) && is_digit((unsigned char)s[i]) &&
		           (end = ipv4_at(s, len, i)) != 0) {
			start = i;
			mask = "[ipv4]";
			ps->ips++;
		} else {
			continue;
		}
		/* An address is at least 5 characters, its mask at most 7. */
		if (out == NULL && (out = malloc(2 * len + 16)) == NULL) {
			ps->oom = true;
			return false;
		}
		memcpy(out + out_len, s + copied, start - copied);
		out_len += start - copied;
		memcpy(out + out_len, mask, strlen(mask));
		out_len += strlen(mask);
		copied = end;
		i = end - 1;
	}
	if (out == NULL)
		return true;
	memcpy(out + out_len, s + copied, len - copied);
	out_len += len - copied;
	if (json_string_setn(t->str, out, out_len) != 0)
		ps->oom = true;
	free(out);
	return !ps->oom;
}

static enum policy_verdict redact_request(const void *conf, struct policy_request *req)
{
	const struct redact_conf *c = conf;
	struct pass ps = {.c = c};

	c->host->prompt_foreach(req->body, req->proto, PROMPT_ALL_ROLES, false, redact_text, &ps);
	if (ps.oom) {
		req->status = 503;
		req->type = "server_error";
		req->code = "out_of_memory";
		snprintf(req->message, sizeof req->message, "out of memory");
		return POLICY_REFUSE;
	}
	if (ps.emails + ps.ips == 0)
		return POLICY_CONTINUE;
	req->changed = true;
	req->action = "redacted";
	snprintf(req->rule, sizeof req->rule, "%u e-mail, %u ipv4", ps.emails, ps.ips);
	return POLICY_CONTINUE;
}

static const struct sluice_plugin plugin = {
        .abi_version = SLUICE_PLUGIN_ABI_VERSION,
        .size = sizeof(struct sluice_plugin),
        .name = "redact",
        .phases = POLICY_PHASE_REQUEST,
        .conf_parse = redact_conf_parse,
        .conf_free = redact_conf_free,
        .on_request = redact_request,
};

const struct sluice_plugin *sluice_plugin(void)
{
	return &plugin;
}
