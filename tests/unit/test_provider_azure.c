/* test_provider_azure.c — the azure-openai provider: deployment URLs, api-version, Azure's error
 * shapes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "provider_harness.h"

static const struct provider_ops *azure(void)
{
	return provider_ops(PROVIDER_AZURE_OPENAI);
}

static void test_ops(void **state)
{
	assert_string_equal(azure()->name, "azure-openai");
	assert_int_equal(azure()->upstream, PROTO_CHAT);
	assert_null(azure()->default_endpoint); /* the resource's URL is the operator's */
	assert_null(azure()->extra_headers);    /* api-key is written in auth.header */
}

static void test_drop_model(void **state)
{
	struct config_instance dep = {
	        .provider = PROVIDER_AZURE_OPENAI,
	        .endpoint = "https://res.openai.azure.com/openai/deployments/gpt4o/chat/completions"
	                    "?api-version=2024-10-21"};
	struct config_instance v1 = {
	        .provider = PROVIDER_AZURE_OPENAI,
	        .endpoint = "https://res.openai.azure.com/openai/v1/chat/completions"};

	/* the deployment URL names the model; the v1 API takes it in the body */
	assert_true(azure()->drop_model(&dep));
	assert_false(azure()->drop_model(&v1));
}

static void test_check_instance(void **state)
{
	struct config_kv q = {.name = "api-version", .value = "2024-10-21"};
	struct config_instance in = {
	        .provider = PROVIDER_AZURE_OPENAI,
	        .endpoint =
	                "https://res.openai.azure.com/openai/deployments/gpt4o/chat/completions"};
	char msg[256];

	assert_false(azure()->check_instance(&in, msg, sizeof(msg)));
	assert_non_null(strstr(msg, "api-version"));
	in.auth_query = &q;
	in.n_auth_query = 1;
	assert_true(azure()->check_instance(&in, msg, sizeof(msg)));
	in.auth_query = NULL;
	in.n_auth_query = 0;
	in.endpoint = "https://res.openai.azure.com/openai/deployments/gpt4o/chat/completions"
	              "?foo=1&api-version=2024-10-21";
	assert_true(azure()->check_instance(&in, msg, sizeof(msg)));
	in.endpoint = "https://res.openai.azure.com/openai/deployments/gpt4o/chat/completions"
	              "?xapi-version=1";
	assert_false(azure()->check_instance(&in, msg, sizeof(msg)));
	/* the v1 API needs no api-version */
	in.endpoint = "https://res.openai.azure.com/openai/v1/chat/completions";
	assert_true(azure()->check_instance(&in, msg, sizeof(msg)));
}

static void expect(const char *body, int status, int want_status, const char *type,
                   const char *code, const char *message)
{
	struct proto_error err = {0};

	assert_true(azure()->error_to_openai(body, strlen(body), status, &err));
	assert_int_equal(err.status, want_status);
	assert_string_equal(err.type, type);
	assert_string_equal(err.code, code);
	assert_string_equal(err.message, message);
}

static void test_errors(void **state)
{
	/* the content filter's 400, with the categories it filtered */
	expect("{\"error\":{\"message\":\"The response was filtered due to the prompt triggering "
	       "Azure OpenAI's content management policy.\",\"type\":null,\"param\":\"prompt\","
	       "\"code\":\"content_filter\",\"status\":400,\"innererror\":{\"code\":"
	       "\"ResponsibleAIPolicyViolation\",\"content_filter_result\":{\"hate\":{\"filtered\":"
	       "true,\"severity\":\"high\"},\"jailbreak\":{\"filtered\":false,\"detected\":false},"
	       "\"self_harm\":{\"filtered\":false,\"severity\":\"safe\"},\"violence\":{"
	       "\"filtered\":"
	       "true,\"severity\":\"medium\"}}}}}",
	       400, 400, "invalid_request_error", "content_filter",
	       "The response was filtered due to the prompt triggering Azure OpenAI's content "
	       "management policy. (filtered: hate, violence)");
	expect("{\"error\":{\"code\":\"DeploymentNotFound\",\"message\":\"The API deployment for "
	       "this resource does not exist.\"}}",
	       404, 404, "invalid_request_error", "model_not_found",
	       "The API deployment for this resource does not exist.");
	expect("{\"error\":{\"code\":\"429\",\"message\":\"Requests to the ChatCompletions_Create "
	       "Operation have exceeded token rate limit.\"}}",
	       429, 429, "rate_limit_error", "rate_limit_exceeded",
	       "Requests to the ChatCompletions_Create Operation have exceeded token rate limit.");
	expect("{\"error\":{\"code\":\"OperationNotSupported\",\"message\":\"The chatCompletion "
	       "operation does not work with the specified model.\"}}",
	       400, 400, "invalid_request_error", "invalid_request",
	       "OperationNotSupported: The chatCompletion operation does not work with the "
	       "specified model.");
	/* API Management in front of the resource */
	expect("{\"statusCode\":401,\"message\":\"Unauthorized. Access token is missing, invalid, "
	       "audience is incorrect, or have expired.\"}",
	       401, 401, "authentication_error", "invalid_api_key",
	       "Unauthorized. Access token is missing, invalid, audience is incorrect, or have "
	       "expired.");
	/* an OpenAI-shaped error is read as OpenAI's */
	expect("{\"error\":{\"message\":\"Max tokens\",\"type\":\"invalid_request_error\","
	       "\"code\":\"context_length_exceeded\"}}",
	       400, 400, "invalid_request_error", "context_length_exceeded", "Max tokens");

	struct proto_error err;
	assert_false(azure()->error_to_openai("upstream connect error", 22, 503, &err));
	assert_false(azure()->error_to_openai("{\"statusCode\":\"x\"}", 18, 503, &err));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_ops),
	        cmocka_unit_test(test_drop_model),
	        cmocka_unit_test(test_check_instance),
	        cmocka_unit_test(test_errors),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
