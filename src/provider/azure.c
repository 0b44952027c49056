/* azure.c — the azure-openai provider: deployment URLs, api-version, Azure's error shapes. */
#include "sluice/provider.h"

#include <stdio.h>
#include <string.h>

/*
 * Azure OpenAI speaks OpenAI chat (the chat codec) with three differences:
 * - Deployment URLs (…/openai/deployments/NAME/chat/completions?api-version=…) name the
 *   model, so the body carries none; the v1 URLs (…/openai/v1/chat/completions) take the
 *   deployment name as `model` like OpenAI does, so the body keeps it.
 * - The API version is a query parameter the operator writes, either in `endpoint` or
 *   as auth.query.api-version; a deployment URL without one is refused at load.
 * - The key goes in an `api-key` header (auth.header), and errors come in Azure's own
 *   shapes: {"error":{"code":"DeploymentNotFound","message":…}} without a type, the
 *   content filter's 400 {"error":{"code":"content_filter","innererror":{…}}}, and API
 *   Management's {"statusCode":401,"message":…}.
 */

#define AZURE_DEPLOYMENTS_PATH "/openai/deployments/"

static bool azure_deployment_url(const struct config_instance *in)
{
	return in != NULL && in->endpoint != NULL && strstr(in->endpoint, AZURE_DEPLOYMENTS_PATH);
}

static bool azure_drop_model(const struct config_instance *in)
{
	return azure_deployment_url(in);
}

static bool has_api_version(const struct config_instance *in)
{
	const char *q = strchr(in->endpoint, '?');

	for (size_t i = 0; i < in->n_auth_query; i++)
		if (strcmp(in->auth_query[i].name, "api-version") == 0)
			return true;
	for (; q != NULL; q = strchr(q + 1, '&'))
		if (strncmp(q + 1, "api-version=", 12) == 0)
			return true;
	return false;
}

static bool azure_check_instance(const struct config_instance *in, char *msg, size_t len)
{
	if (!azure_deployment_url(in) || has_api_version(in))
		return true;
	snprintf(msg, len,
	         "an azure-openai deployment endpoint needs an api-version: add "
	         "\"?api-version=2024-10-21\" to endpoint, or auth.query: { api-version: "
	         "2024-10-21 }");
	return false;
}

/* The content filter's verdict names the categories it filtered: say which. */
static void filtered_categories(const json_t *result, char *buf, size_t len)
{
	const char *k;
	const json_t *v;
	size_t off = 0;

	buf[0] = '\0';
	json_object_foreach((json_t *)result, k, v)
	{
		int n;
		if (!json_is_true(json_object_get(v, "filtered")))
			continue;
		n = snprintf(buf + off, len - off, "%s%s", off ? ", " : "", k);
		if (n < 0 || (size_t)n >= len - off)
			break;
		off += (size_t)n;
	}
}

static const struct {
	const char *code;
	int status;
	const char *type, *openai_code;
} azure_codes[] = {
        {"DeploymentNotFound", 404, "invalid_request_error", "model_not_found"},
        {"429", 429, "rate_limit_error", "rate_limit_exceeded"},
        {"RateLimitReached", 429, "rate_limit_error", "rate_limit_exceeded"},
        {"401", 401, "authentication_error", "invalid_api_key"},
        {"Unauthorized", 401, "authentication_error", "invalid_api_key"},
        {"PermissionDenied", 403, "permission_error", "permission_denied"},
        {"context_length_exceeded", 400, "invalid_request_error", "context_length_exceeded"},
};

static bool azure_error_to_openai(const char *body, size_t len, int status, struct proto_error *err)
{
	json_t *root = body ? json_loadb(body, len, 0, NULL) : NULL;
	const json_t *e = json_object_get(root, "error");
	const json_t *code = json_object_get(e, "code");
	const json_t *inner = json_object_get(e, "innererror");
	const char *msg = json_string_value(json_object_get(e, "message"));
	const char *c = json_string_value(code);
	char cats[128];
	bool ok = true;

	if (!json_is_object(e)) {
		/* API Management in front of the resource: {"statusCode":…,"message":…} */
		const json_t *sc = json_object_get(root, "statusCode");
		msg = json_string_value(json_object_get(root, "message"));
		if (!json_is_integer(sc) || msg == NULL) {
			ok = false;
			goto done;
		}
		proto_error_set(err, status, proto_type_for_status(status),
		                status == 401 ? "invalid_api_key" : "upstream_error", "%s", msg);
		goto done;
	}
	if ((c != NULL && strcmp(c, "content_filter") == 0) ||
	    (json_is_string(json_object_get(inner, "code")) &&
	     strcmp(json_string_value(json_object_get(inner, "code")),
	            "ResponsibleAIPolicyViolation") == 0)) {
		filtered_categories(json_object_get(inner, "content_filter_result"), cats,
		                    sizeof(cats));
		proto_error_set(err, status ? status : 400, "invalid_request_error",
		                "content_filter", "%s%s%s%s",
		                msg ? msg : "the prompt was filtered by the content filter",
		                cats[0] ? " (filtered: " : "", cats, cats[0] ? ")" : "");
		goto done;
	}
	if (json_is_string(json_object_get(e, "type"))) {
		/* An OpenAI-shaped error: read as OpenAI's. */
		json_decref(root);
		return proto_openai_error_to_err(body, len, status, err);
	}
	for (size_t i = 0; c != NULL && i < sizeof(azure_codes) / sizeof(azure_codes[0]); i++) {
		if (strcmp(c, azure_codes[i].code) == 0) {
			proto_error_set(err, status ? status : azure_codes[i].status,
			                azure_codes[i].type, azure_codes[i].openai_code, "%s",
			                msg ? msg : c);
			goto done;
		}
	}
	/* An Azure code the gateway does not know: keep it in the message. */
	proto_error_set(err, status, proto_type_for_status(status),
	                status >= 500 ? "upstream_error" : "invalid_request", "%s%s%s", c ? c : "",
	                c && msg ? ": " : "", msg ? msg : (c ? "" : "upstream error"));
done:
	json_decref(root);
	return ok;
}

const struct provider_ops provider_azure_openai = {
        .id = PROVIDER_AZURE_OPENAI,
        .name = "azure-openai",
        .upstream = PROTO_CHAT,
        .drop_model = azure_drop_model,
        .error_to_openai = azure_error_to_openai,
        .check_instance = azure_check_instance,
};
