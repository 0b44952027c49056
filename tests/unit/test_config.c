/* test_config.c — the configuration loader: defaults, the full contract, the examples, every
 * kind of error with its exact text and position, and the value syntaxes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/evp.h>

#include "sluice/config.h"
#include "sluice/provider.h"
#include "sluice/policy.h"
#include "sluice/policy_chain.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define EXAMPLES_DIR TEST_DATA_DIR "/../../../conf/examples"

/* ---- helpers ------------------------------------------------------------------------------ */

static struct config *load_file(const char *path)
{
	struct config_errors e;
	struct config *c = config_load(path, &e);
	if (c == NULL) {
		for (size_t i = 0; i < e.n; i++)
			print_error("%s\n", e.msgs[i]);
		config_errors_free(&e);
		fail_msg("%s did not load", path);
	}
	assert_int_equal(e.n, 0);
	return c;
}

static struct config *load_str(const char *yaml)
{
	struct config_errors e;
	struct config *c = config_load_string(yaml, strlen(yaml), "t.yaml", &e);
	if (c == NULL) {
		for (size_t i = 0; i < e.n; i++)
			print_error("%s\n", e.msgs[i]);
		config_errors_free(&e);
		fail_msg("the YAML did not load");
	}
	return c;
}

/* The load must fail with exactly these messages, in this order. */
static void expect_errors_(const char *yaml, const char *const *want, size_t n, const char *file,
                           int line)
{
	struct config_errors e;
	struct config *c = config_load_string(yaml, strlen(yaml), "t.yaml", &e);
	bool same = c == NULL && e.n == n;

	for (size_t i = 0; same && i < n; i++)
		same = strcmp(e.msgs[i], want[i]) == 0;
	if (!same) {
		print_error("%s:%d: errors differ\n  got:\n", file, line);
		for (size_t i = 0; i < e.n; i++)
			print_error("    %s\n", e.msgs[i]);
		print_error("  want:\n");
		for (size_t i = 0; i < n; i++)
			print_error("    %s\n", want[i]);
	}
	config_unref(c);
	config_errors_free(&e);
	if (!same)
		_fail(file, line);
}

#define EXPECT_ERRORS(yaml, ...)                                                                   \
	do {                                                                                       \
		const char *const want_[] = {__VA_ARGS__};                                         \
		expect_errors_((yaml), want_, ARRAY_LEN(want_), __FILE__, __LINE__);               \
	} while (0)

static void sha256_of(const char *data, size_t len, unsigned char out[32])
{
	unsigned int n = 32;
	assert_true(EVP_Digest(data, len, out, &n, EVP_sha256(), NULL));
}

static void sha256_hex_of_file(const char *path, char hex[65])
{
	FILE *f = fopen(path, "rb");
	static char buf[1 << 20];
	unsigned char md[32];
	assert_non_null(f);
	size_t len = fread(buf, 1, sizeof buf, f);
	fclose(f);
	sha256_of(buf, len, md);
	for (int i = 0; i < 32; i++)
		sprintf(hex + 2 * i, "%02x", md[i]);
}

static void assert_ints(const int *got, size_t n, const int *want, size_t n_want)
{
	assert_int_equal(n, n_want);
	for (size_t i = 0; i < n; i++)
		assert_int_equal(got[i], want[i]);
}

#define ASSERT_INTS(got, n, ...)                                                                   \
	do {                                                                                       \
		const int want_[] = {__VA_ARGS__};                                                 \
		assert_ints((got), (n), want_, ARRAY_LEN(want_));                                  \
	} while (0)

static int cpus(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	return n < 1 ? 1 : n > 256 ? 256 : (int)n;
}

static void set_contract_env(void)
{
	setenv("SLUICE_ADMIN_KEY", "admin-secret", 1);
	setenv("REDIS_PASSWORD", "redis-secret", 1);
	setenv("ALERT_TOKEN", "alert-token", 1);
	setenv("CUSTOM_API_KEY", "custom-key", 1);
	setenv("NLB_API_KEY", "nlb-key", 1);
	setenv("ALIYUN_API_KEY", "aliyun-key", 1);
	setenv("CONSUMER_A_KEY", "consumer-a-key", 1);
}

/* ---- good files --------------------------------------------------------------------------- */

static void test_minimal_defaults(void **state)
{
	const char *path = TEST_DATA_DIR "/minimal.yaml";
	struct config *c = load_file(path);
	char hex[65];

	assert_int_equal(atomic_load(&c->refs), 1);
	assert_string_equal(c->path, path);
	sha256_hex_of_file(path, hex);
	assert_string_equal(c->sha256_hex, hex);
	assert_int_equal(c->generation, 0);

	/* server */
	assert_int_equal(c->server.n_listen, 1);
	assert_string_equal(c->server.listen[0].address, "0.0.0.0:8080");
	assert_string_equal(c->server.listen[0].host, "0.0.0.0");
	assert_int_equal(c->server.listen[0].port, 8080);
	assert_null(c->server.listen[0].tls_cert);
	assert_null(c->server.listen[0].tls_key);
	assert_int_equal(c->server.workers, cpus());
	assert_int_equal(c->server.max_body_size, 16 * 1024 * 1024);
	assert_int_equal(c->server.max_header_size, 64 * 1024);
	assert_int_equal(c->server.client_timeout, 60000);
	assert_int_equal(c->server.keepalive_timeout, 75000);
	assert_int_equal(c->server.max_connections, 20000);
	assert_int_equal(c->server.drain_timeout, 30000);
	assert_true(c->server.expose_instance_header);

	/* no admin section: no admin listener */
	assert_null(c->admin.address);
	assert_null(c->admin.host);
	assert_int_equal(c->admin.port, 0);
	assert_null(c->admin.key);

	assert_int_equal(c->log.level, LOG_LEVEL_INFO);
	assert_string_equal(c->log.error_log, "stderr");
	assert_string_equal(c->log.access_log, "stdout");
	assert_false(c->log.payloads);

	assert_int_equal(c->store.type, STORE_MEMORY);
	assert_string_equal(c->store.redis.address, "127.0.0.1:6379");
	assert_string_equal(c->store.redis.host, "127.0.0.1");
	assert_int_equal(c->store.redis.port, 6379);
	assert_null(c->store.redis.password);
	assert_int_equal(c->store.redis.db, 0);
	assert_string_equal(c->store.redis.prefix, "sluice:");
	assert_int_equal(c->store.redis.timeout, 100);
	assert_int_equal(c->store.on_error, STORE_ON_ERROR_ALLOW);

	assert_null(c->alerts.webhook_url);
	assert_int_equal(c->alerts.webhook_timeout, 2000);
	assert_int_equal(c->alerts.n_webhook_headers, 0);

	/* the instance */
	assert_int_equal(c->n_instances, 1);
	struct config_instance *in = &c->instances[0];
	assert_string_equal(in->name, "local");
	assert_int_equal(in->index, 0);
	assert_int_equal(in->provider, PROVIDER_OPENAI_COMPATIBLE);
	assert_string_equal(in->endpoint, "http://127.0.0.1:8000/v1/chat/completions");
	assert_string_equal(in->url, in->endpoint);
	assert_null(in->model);
	assert_null(in->options);
	assert_int_equal(in->n_auth_headers, 0);
	assert_int_equal(in->n_auth_query, 0);
	assert_int_equal(in->timeouts.connect, 5000);
	assert_int_equal(in->timeouts.first_byte, 60000);
	assert_int_equal(in->timeouts.idle, 60000);
	assert_int_equal(in->timeouts.total, 600000);
	assert_true(in->tls_verify);
	assert_int_equal(in->keepalive.pool, 30);
	assert_int_equal(in->keepalive.idle, 60000);
	assert_int_equal(in->n_limits, 0);
	assert_null(in->load.metrics_url);
	assert_int_equal(in->load.interval, 250);

	/* active checks off, but their defaults filled in for whoever shows them */
	assert_false(in->active.enabled);
	assert_int_equal(in->active.type, CHECK_HTTP);
	assert_string_equal(in->active.http_method, "GET");
	assert_string_equal(in->active.http_path, "/");
	assert_string_equal(in->active.host, "127.0.0.1:8000");
	assert_null(in->active.http_req_body);
	assert_int_equal(in->active.n_req_headers, 0);
	assert_true(in->active.https_verify_certificate);
	assert_int_equal(in->active.timeout, 1000);
	assert_int_equal(in->active.concurrency, 10);
	assert_int_equal(in->active.healthy.interval, 1000);
	ASSERT_INTS(in->active.healthy.http_statuses, in->active.healthy.n_http_statuses, 200, 302);
	assert_int_equal(in->active.healthy.successes, 2);
	assert_int_equal(in->active.unhealthy.interval, 1000);
	ASSERT_INTS(in->active.unhealthy.http_statuses, in->active.unhealthy.n_http_statuses, 429,
	            404, 500, 501, 502, 503, 504, 505);
	assert_int_equal(in->active.unhealthy.http_failures, 5);
	assert_int_equal(in->active.unhealthy.tcp_failures, 2);
	assert_int_equal(in->active.unhealthy.timeouts, 3);

	assert_true(in->passive.enabled);
	ASSERT_INTS(in->passive.http_statuses, in->passive.n_http_statuses, 500, 502, 503, 504);
	assert_int_equal(in->passive.http_failures, 3);
	assert_int_equal(in->passive.tcp_failures, 2);
	assert_int_equal(in->passive.timeouts, 2);
	assert_int_equal(in->passive.cooldown, 10000);

	/* the route */
	assert_int_equal(c->n_consumers, 0);
	assert_int_equal(c->n_routes, 1);
	struct config_route *r = &c->routes[0];
	assert_string_equal(r->name, "chat");
	assert_int_equal(r->n_paths, 1);
	assert_string_equal(r->paths[0], "/v1/chat/completions");
	assert_int_equal(r->n_models, 0);
	assert_int_equal(r->auth, ROUTE_AUTH_NONE); /* no consumers */
	assert_int_equal(r->n_key_headers, 3);
	assert_string_equal(r->key_headers[0], "authorization");
	assert_string_equal(r->key_headers[1], "apikey");
	assert_string_equal(r->key_headers[2], "x-api-key");
	assert_int_equal(r->balancer.algorithm, BALANCER_ROUNDROBIN);
	assert_int_equal(r->balancer.hash_on, HASH_ON_CONSUMER);
	assert_null(r->balancer.key);
	assert_int_equal(r->fallback.on, FALLBACK_ALL);
	assert_int_equal(r->fallback.on, FALLBACK_UNHEALTHY | FALLBACK_QUOTA | FALLBACK_HTTP_429 |
	                                         FALLBACK_HTTP_5XX | FALLBACK_TIMEOUT |
	                                         FALLBACK_CONNECT_ERROR);
	assert_int_equal(r->fallback.n_http_statuses, 0);
	assert_int_equal(r->fallback.max_attempts, 3);
	assert_int_equal(r->n_targets, 1);
	assert_ptr_equal(r->targets[0].instance, in);
	assert_int_equal(r->targets[0].priority, 0);
	assert_int_equal(r->targets[0].weight, 100);
	assert_int_equal(r->n_plugins, 0);

	config_unref(c);
}

static void test_route_auth_default_with_consumers(void **state)
{
	struct config *c = load_str("instances: [{ name: a, provider: openai }]\n"
	                            "consumers: [{ name: team, keys: [k1] }]\n"
	                            "routes:\n"
	                            "  - { name: r1, paths: [/a], targets: [{ instance: a }] }\n"
	                            "  - { name: r2, paths: [/b], auth: none, "
	                            "targets: [{ instance: a }] }\n");
	assert_int_equal(c->routes[0].auth, ROUTE_AUTH_KEY);
	assert_int_equal(c->routes[1].auth, ROUTE_AUTH_NONE);
	assert_int_equal(c->consumers[0].n_routes, 0); /* every route */
	assert_int_equal(c->consumers[0].rejected_code, 429);
	assert_int_equal(c->consumers[0].max_concurrent, 0);
	assert_null(c->consumers[0].rejected_msg);
	/* the provider's default endpoint */
	assert_string_equal(c->instances[0].endpoint, "https://api.openai.com/v1/chat/completions");
	config_unref(c);
}

static void test_provider_default_endpoints(void **state)
{
	struct config *c = load_str("instances:\n"
	                            "  - { name: a, provider: openai }\n"
	                            "  - { name: b, provider: deepseek }\n"
	                            "  - { name: c, provider: openrouter }\n"
	                            "  - { name: d, provider: gemini }\n"
	                            "  - { name: e, provider: anthropic }\n"
	                            "  - { name: f, provider: azure-openai, endpoint: "
	                            "'https://x.openai.azure.com/openai/deployments/g/chat/"
	                            "completions?api-version=2024-06-01' }\n");
	assert_string_equal(c->instances[0].url, "https://api.openai.com/v1/chat/completions");
	assert_string_equal(c->instances[1].url, "https://api.deepseek.com/chat/completions");
	assert_string_equal(c->instances[2].url, "https://openrouter.ai/api/v1/chat/completions");
	assert_string_equal(
	        c->instances[3].url,
	        "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions");
	assert_string_equal(c->instances[4].url, "https://api.anthropic.com/v1/messages");
	assert_int_equal(c->instances[5].provider, PROVIDER_AZURE_OPENAI);
	const char *const providers[] = {"openai", "deepseek",  "openrouter",
	                                 "gemini", "anthropic", "azure-openai"};
	for (size_t i = 0; i < c->n_instances; i++)
		assert_string_equal(config_provider_name(c->instances[i].provider), providers[i]);
	config_unref(c);
}

static void test_active_check_present(void **state)
{
	struct config *c = load_str("instances:\n"
	                            "  - name: a\n"
	                            "    provider: openai\n"
	                            "    checks: { active: {}, passive: { enabled: false } }\n"
	                            "  - name: b\n"
	                            "    provider: openai-compatible\n"
	                            "    endpoint: 'http://[::1]:9000/v1/chat/completions'\n"
	                            "    checks:\n"
	                            "      active: { type: tcp, host: 'gpu7:8001' }\n"
	                            "      passive: { unhealthy: { http_failures: 0 } }\n");
	const struct config_instance *a = &c->instances[0], *b = &c->instances[1];
	assert_true(a->active.enabled);
	assert_int_equal(a->active.type, CHECK_HTTPS); /* the endpoint is https:// */
	assert_string_equal(a->active.host, "api.openai.com:443");
	assert_false(a->passive.enabled);
	assert_true(b->active.enabled);
	assert_int_equal(b->active.type, CHECK_TCP);
	assert_string_equal(b->active.host, "gpu7:8001");
	assert_true(b->passive.enabled);
	assert_int_equal(b->passive.http_failures, 0);
	assert_int_equal(b->passive.tcp_failures, 2);
	config_unref(c);
}

static void test_full_contract(void **state)
{
	const char *path = TEST_DATA_DIR "/full.yaml";
	unsigned char foo[32], key_a[32];
	char hex[65];

	set_contract_env();
	struct config *c = load_file(path);
	sha256_hex_of_file(path, hex);
	assert_string_equal(c->sha256_hex, hex);

	/* server */
	assert_int_equal(c->server.n_listen, 2);
	assert_string_equal(c->server.listen[0].address, "0.0.0.0:8080");
	assert_null(c->server.listen[0].tls_cert);
	assert_string_equal(c->server.listen[1].host, "0.0.0.0");
	assert_int_equal(c->server.listen[1].port, 8443);
	assert_string_equal(c->server.listen[1].tls_cert, "/etc/sluice/tls/cert.pem");
	assert_string_equal(c->server.listen[1].tls_key, "/etc/sluice/tls/key.pem");
	assert_int_equal(c->server.workers, cpus());
	assert_int_equal(c->server.max_body_size, 16u << 20);
	assert_int_equal(c->server.max_header_size, 64u << 10);
	assert_int_equal(c->server.drain_timeout, 30000);

	assert_string_equal(c->admin.address, "127.0.0.1:9180");
	assert_string_equal(c->admin.host, "127.0.0.1");
	assert_int_equal(c->admin.port, 9180);
	assert_string_equal(c->admin.key, "admin-secret");

	assert_string_equal(c->log.access_log, "stdout");
	assert_int_equal(c->store.type, STORE_MEMORY);
	assert_string_equal(c->store.redis.password, "redis-secret");
	assert_string_equal(c->store.redis.prefix, "sluice:");
	assert_int_equal(c->store.redis.timeout, 100);

	assert_string_equal(c->alerts.webhook_url, "http://127.0.0.1:9000/hooks/sluice");
	assert_int_equal(c->alerts.webhook_timeout, 2000);
	assert_int_equal(c->alerts.n_webhook_headers, 1);
	assert_string_equal(c->alerts.webhook_headers[0].name, "Authorization");
	assert_string_equal(c->alerts.webhook_headers[0].value, "Bearer alert-token");

	/* instances */
	assert_int_equal(c->n_instances, 3);
	struct config_instance *b = config_find_instance(c, "qwen-onprem-b");
	struct config_instance *cc = config_find_instance(c, "qwen-onprem-c");
	struct config_instance *cloud = config_find_instance(c, "qwen-cloud");
	assert_ptr_equal(b, &c->instances[0]);
	assert_ptr_equal(cc, &c->instances[1]);
	assert_ptr_equal(cloud, &c->instances[2]);
	assert_null(config_find_instance(c, "nope"));
	assert_int_equal(b->provider, PROVIDER_OPENAI_COMPATIBLE);
	assert_string_equal(b->url, "http://10.0.0.11:8000/v1/chat/completions");
	assert_string_equal(b->model, "Qwen/Qwen2.5-32B-Instruct");
	assert_true(json_is_object(b->options));
	assert_true(json_is_real(json_object_get(b->options, "temperature")));
	assert_true(json_real_value(json_object_get(b->options, "temperature")) == 0.7);
	assert_int_equal(b->n_auth_headers, 1);
	assert_string_equal(b->auth_headers[0].name, "Authorization");
	assert_string_equal(b->auth_headers[0].value, "Bearer custom-key");
	assert_int_equal(b->n_auth_query, 0);
	assert_int_equal(b->timeouts.connect, 2000);
	assert_int_equal(b->timeouts.first_byte, 30000);
	assert_int_equal(b->timeouts.idle, 60000);
	assert_int_equal(b->timeouts.total, 600000);
	assert_true(b->tls_verify);
	assert_int_equal(b->keepalive.pool, 30);
	assert_int_equal(b->keepalive.idle, 60000);
	assert_int_equal(b->n_limits, 1);
	assert_ptr_equal(b->limits[0].instance, b);
	assert_int_equal(b->limits[0].strategy, LIMIT_TOTAL_TOKENS);
	assert_int_equal(b->limits[0].tokens, 50000);
	assert_int_equal(b->limits[0].requests, 0);
	assert_int_equal(b->limits[0].window.ms, 3600000);
	assert_int_equal(b->limits[0].window.months, 0);
	assert_int_equal(b->limits[0].type, LIMIT_FIXED);
	assert_string_equal(b->limits[0].id, "instance:qwen-onprem-b:total_tokens:1h");

	assert_true(b->active.enabled);
	assert_int_equal(b->active.type, CHECK_HTTP);
	assert_string_equal(b->active.http_method, "POST");
	assert_string_equal(b->active.http_path, "/v1/chat/completions");
	assert_string_equal(b->active.host, "10.0.0.11:8000");
	assert_string_equal(b->active.http_req_body,
	                    "{\"model\":\"Qwen/Qwen2.5-32B-Instruct\",\"messages\":[{\"role\":"
	                    "\"user\",\"content\":\"0\"}],\"stream\":false,\"max_tokens\":1}");
	assert_int_equal(b->active.n_req_headers, 1);
	assert_string_equal(b->active.req_headers[0], "Content-Type: application/json");
	assert_false(b->active.https_verify_certificate);
	assert_int_equal(b->active.timeout, 2000);
	assert_int_equal(b->active.concurrency, 10);
	assert_int_equal(b->active.healthy.interval, 30000);
	ASSERT_INTS(b->active.healthy.http_statuses, b->active.healthy.n_http_statuses, 200, 302);
	assert_int_equal(b->active.healthy.successes, 1);
	assert_int_equal(b->active.unhealthy.interval, 30000);
	ASSERT_INTS(b->active.unhealthy.http_statuses, b->active.unhealthy.n_http_statuses, 404,
	            429, 500, 501, 502, 503, 504, 505);
	assert_int_equal(b->active.unhealthy.http_failures, 1);
	assert_int_equal(b->active.unhealthy.tcp_failures, 2);
	assert_int_equal(b->active.unhealthy.timeouts, 2);
	assert_true(b->passive.enabled);
	ASSERT_INTS(b->passive.http_statuses, b->passive.n_http_statuses, 500, 502, 503, 504);
	assert_int_equal(b->passive.http_failures, 3);
	assert_int_equal(b->passive.cooldown, 10000);
	assert_string_equal(b->load.metrics_url, "http://10.0.0.11:8000/metrics");
	assert_int_equal(b->load.interval, 250);
	assert_true(b->price.set); /* written, at zero */
	assert_int_equal(b->price.input + b->price.cached_input + b->price.output, 0);

	assert_string_equal(cc->auth_headers[0].value, "Bearer nlb-key");
	assert_false(cc->active.enabled);
	assert_int_equal(cc->n_limits, 0);
	assert_string_equal(cloud->url,
	                    "https://dashscope.aliyuncs.com/compatible-mode/v1/chat/completions");
	assert_string_equal(cloud->auth_headers[0].value, "Bearer aliyun-key");
	assert_string_equal(cloud->limits[0].id, "instance:qwen-cloud:total_tokens:1h");
	/* prices per million tokens, in micro-units */
	assert_false(cc->price.set);
	assert_true(cloud->price.set);
	assert_int_equal(cloud->price.input, 400000);
	assert_int_equal(cloud->price.cached_input, 100000);
	assert_int_equal(cloud->price.output, 1200000);

	/* the consumer: keys hashed, the sha256: one kept (sha256 of "foo") */
	assert_int_equal(c->n_consumers, 1);
	struct config_consumer *a = config_find_consumer(c, "consumer_a");
	assert_ptr_equal(a, &c->consumers[0]);
	assert_null(config_find_consumer(c, "consumer_b"));
	assert_int_equal(a->n_keys, 2);
	sha256_of("consumer-a-key", strlen("consumer-a-key"), key_a);
	sha256_of("foo", 3, foo);
	assert_memory_equal(a->keys[0].sha256, key_a, 32);
	assert_memory_equal(a->keys[1].sha256, foo, 32);
	assert_string_equal(a->keys[1].fingerprint, "2c26b46b68ff");
	assert_int_equal(strlen(a->keys[0].fingerprint), 12);
	assert_int_equal(a->n_routes, 1);
	assert_ptr_equal(a->routes[0], config_find_route(c, "chat"));
	assert_int_equal(a->n_limits, 5);
	assert_ptr_equal(a->limits[0].instance, cloud);
	assert_int_equal(a->limits[0].tokens, 10000);
	assert_string_equal(a->limits[0].id, "consumer:consumer_a:qwen-cloud:total_tokens:1h");
	assert_ptr_equal(a->limits[1].instance, b);
	assert_null(a->limits[2].instance);
	assert_int_equal(a->limits[2].tokens, 1000000);
	assert_int_equal(a->limits[2].window.months, 1);
	assert_int_equal(a->limits[2].window.ms, 0);
	assert_int_equal(a->limits[2].type, LIMIT_FIXED);
	assert_string_equal(a->limits[2].id, "consumer:consumer_a:*:total_tokens:1mo");
	assert_int_equal(a->limits[3].requests, 600);
	assert_int_equal(a->limits[3].tokens, 0);
	assert_int_equal(a->limits[3].window.ms, 60000);
	assert_int_equal(a->limits[3].type, LIMIT_SLIDING);
	assert_string_equal(a->limits[3].id, "consumer:consumer_a:*:requests:1m");
	assert_null(a->limits[4].instance);
	assert_int_equal(a->limits[4].strategy, LIMIT_COST);
	assert_int_equal(a->limits[4].tokens, 200000000); /* micro-units */
	assert_int_equal(a->limits[4].window.months, 1);
	assert_string_equal(a->limits[4].id, "consumer:consumer_a:*:cost:1mo");
	assert_int_equal(a->max_concurrent, 20);
	assert_int_equal(a->rejected_code, 429);
	assert_string_equal(a->rejected_msg, "Insufficient token, try in one hour");

	/* the route */
	struct config_route *r = config_find_route(c, "chat");
	assert_ptr_equal(r, &c->routes[0]);
	assert_int_equal(r->auth, ROUTE_AUTH_KEY);
	assert_int_equal(r->n_models, 0);
	assert_int_equal(r->n_key_headers, 3);
	assert_int_equal(r->balancer.algorithm, BALANCER_ROUNDROBIN);
	assert_int_equal(r->balancer.hash_on, HASH_ON_CONSUMER);
	assert_string_equal(r->balancer.key, "X-Session-Id");
	assert_int_equal(r->fallback.on, FALLBACK_ALL);
	assert_int_equal(r->fallback.n_http_statuses, 0);
	assert_int_equal(r->fallback.max_attempts, 3);
	assert_int_equal(r->n_targets, 3);
	assert_ptr_equal(r->targets[0].instance, cc);
	assert_int_equal(r->targets[0].priority, 10);
	assert_ptr_equal(r->targets[1].instance, b);
	assert_int_equal(r->targets[1].priority, 5);
	assert_ptr_equal(r->targets[2].instance, cloud);
	assert_int_equal(r->targets[2].priority, 1);
	assert_int_equal(r->targets[2].weight, 100);

	/* plugins, in order, each compiled by its policy (their defaults and decisions are
	 * tested in tests/unit/test_policy_*.c) */
	assert_int_equal(r->n_plugins, 5);
	const char *names[] = {"prompt_guard", "prompt_decorator", "request_override",
	                       "response_guard", "loop_guard"};
	for (size_t i = 0; i < 5; i++) {
		assert_string_equal(r->plugins[i].name, names[i]);
		assert_ptr_equal(r->plugins[i].def, policy_find(names[i]));
		assert_non_null(r->plugins[i].conf);
		assert_int_equal(r->plugins[i].phases, r->plugins[i].def->phases);
	}
	assert_int_equal(r->plugin_phases, POLICY_PHASE_REQUEST | POLICY_PHASE_RESPONSE);

	/* references */
	struct config *again = config_ref(c);
	assert_ptr_equal(again, c);
	assert_int_equal(atomic_load(&c->refs), 2);
	config_unref(again);
	assert_int_equal(atomic_load(&c->refs), 1);
	config_unref(c);
	config_unref(NULL);
}

static void test_examples_load(void **state)
{
	set_contract_env();
	setenv("CUSTOM_HOST_1", "10.0.0.11", 1);
	setenv("CUSTOM_PORT_1", "8000", 1);
	setenv("CUSTOM_NLB_HOST", "10.0.0.12", 1);
	setenv("CUSTOM_NLB_PORT", "8001", 1);
	setenv("CONSUMER_B_KEY", "consumer-b-key", 1);
	setenv("CONSUMER_C_KEY", "consumer-c-key", 1);

	struct config *c = load_file(EXAMPLES_DIR "/scenario1-fallback.yaml");
	struct config_route *r = &c->routes[0];
	assert_int_equal(r->n_targets, 3);
	assert_string_equal(r->targets[0].instance->name, "qwen2.5-32b-instruct-c");
	assert_int_equal(r->targets[0].priority, 10);
	assert_string_equal(r->targets[1].instance->name, "qwen2.5-32b-instruct-b");
	assert_string_equal(r->targets[2].instance->name, "qwen2.5-32b-instruct-ali-bailian");
	assert_int_equal(r->auth, ROUTE_AUTH_NONE);
	const struct config_instance *nlb = r->targets[0].instance;
	assert_string_equal(nlb->url, "http://10.0.0.12:8001/v1/chat/completions");
	assert_true(nlb->active.enabled);
	assert_string_equal(nlb->active.host, "10.0.0.12:8001");
	assert_int_equal(nlb->active.timeout, 3000);
	assert_int_equal(nlb->active.healthy.interval, 30000);
	assert_int_equal(nlb->active.unhealthy.http_failures, 2);
	assert_int_equal(nlb->active.unhealthy.timeouts, 3);
	assert_int_equal(nlb->keepalive.idle, 4000);
	assert_false(r->targets[2].instance->active.enabled);
	config_unref(c);

	c = load_file(EXAMPLES_DIR "/scenario2-quotas.yaml");
	assert_int_equal(c->n_consumers, 3);
	const uint64_t quota[] = {10000, 20000, 5000};
	for (size_t i = 0; i < 3; i++) {
		const struct config_consumer *cs = &c->consumers[i];
		assert_int_equal(cs->n_limits, 2);
		assert_int_equal(cs->limits[0].tokens, quota[i]);
		assert_int_equal(cs->limits[1].tokens, quota[i]);
		assert_int_equal(cs->limits[0].window.ms, 3600000);
		assert_int_equal(cs->rejected_code, 429);
		assert_string_equal(cs->rejected_msg, "Insufficient token, try in one hour");
	}
	for (size_t i = 0; i < c->n_instances; i++) {
		assert_int_equal(c->instances[i].n_limits, 1);
		assert_int_equal(c->instances[i].limits[0].tokens, 50000);
		assert_int_equal(c->instances[i].limits[0].window.ms, 3600000);
	}
	assert_int_equal(c->routes[0].auth, ROUTE_AUTH_KEY);
	config_unref(c);

	setenv("VLLM_API_KEY", "vllm-key", 1);
	setenv("ANTHROPIC_API_KEY", "anthropic-key", 1);
	setenv("APP_TEAM_KEY", "team-key", 1);
	c = load_file(EXAMPLES_DIR "/protocols.yaml");
	assert_string_equal(c->instances[0].responses_url, "http://10.0.0.11:8000/v1/responses");
	assert_string_equal(c->routes[0].targets[1].model, "claude-haiku-4-5");
	assert_int_equal(c->n_routes, 5);
	config_unref(c);
}

/* The provider keys: targets[].model, responses_endpoint, what a route's paths ask of its
 * targets, the providers' own checks (docs/providers.md). */
static void test_provider_keys(void **state)
{
	struct config *c = load_str(
	        "instances:\n"
	        "  - { name: q, provider: openai-compatible, endpoint: \"http://h/v1/chat/completions\","
	        " model: up, responses_endpoint: \"http://h/v1/responses\","
	        " auth: { query: { k: v } } }\n"
	        "  - { name: c, provider: anthropic }\n"
	        "routes:\n"
	        "  - name: r\n"
	        "    paths: [/v1/messages]\n"
	        "    models: [public]\n"
	        "    targets:\n"
	        "      - { instance: q, model: qwen-big }\n"
	        "      - { instance: c }\n"
	        "  - name: ct\n"
	        "    paths: [/v1/messages/count_tokens]\n"
	        "    targets: [{ instance: q }]\n");
	const char *url;
	assert_string_equal(c->routes[0].targets[0].model, "qwen-big");
	assert_null(c->routes[0].targets[1].model);
	assert_string_equal(c->instances[0].responses_url, "http://h/v1/responses?k=v");
	assert_int_equal(provider_upstream_proto(&c->instances[0], PROTO_RESPONSES, &url),
	                 PROTO_RESPONSES);
	assert_string_equal(url, "http://h/v1/responses?k=v");
	assert_string_equal(c->instances[1].endpoint, "https://api.anthropic.com/v1/messages");
	assert_int_equal(provider_upstream_proto(&c->instances[1], PROTO_CHAT, &url),
	                 PROTO_MESSAGES);
	config_unref(c);

	EXPECT_ERRORS(
	        "instances:\n"
	        "  - { name: c, provider: anthropic, responses_endpoint: \"http://h/v1/responses\" }\n"
	        "  - { name: az, provider: azure-openai,"
	        " endpoint: \"https://r.openai.azure.com/openai/deployments/d/chat/completions\" }\n"
	        "  - { name: q, provider: openai-compatible, endpoint: \"http://h/v1/embeddings\" }\n"
	        "routes:\n"
	        "  - name: emb\n"
	        "    paths: [/v1/embeddings]\n"
	        "    targets:\n"
	        "      - { instance: q }\n"
	        "      - { instance: c, model: \"\" }\n"
	        "  - name: legacy\n"
	        "    paths: [/v1/completions]\n"
	        "    targets: [{ instance: q }]\n"
	        "    plugins:\n"
	        "      - response_guard: { deny: [\"x\"] }\n",
	        "t.yaml:2:57: instances[0].responses_endpoint: provider anthropic does not serve the "
	        "Responses API",
	        "t.yaml:3:51: instances[1]: an azure-openai deployment endpoint needs an api-version: "
	        "add \"?api-version=2024-10-21\" to endpoint, or auth.query: { api-version: "
	        "2024-10-21 }",
	        "t.yaml:10:21: routes[0].targets[1].instance: instance \"c\" (provider anthropic) "
	        "cannot serve path \"/v1/embeddings\" (embeddings)",
	        "t.yaml:10:31: routes[0].targets[1].model: must not be empty",
	        "t.yaml:15:7: routes[1].plugins: response policies need chat, messages or responses "
	        "paths; path \"/v1/completions\" speaks completions, whose output they cannot read");
}

static void test_targets_sorted_stable(void **state)
{
	struct config *c = load_str("instances:\n"
	                            "  - { name: a, provider: openai }\n"
	                            "  - { name: b, provider: openai }\n"
	                            "  - { name: c, provider: openai }\n"
	                            "  - { name: d, provider: openai }\n"
	                            "  - { name: e, provider: openai }\n"
	                            "routes:\n"
	                            "  - name: r\n"
	                            "    paths: [/v1/chat/completions]\n"
	                            "    targets:\n"
	                            "      - { instance: a, priority: 1 }\n"
	                            "      - { instance: b, priority: 5, weight: 0 }\n"
	                            "      - { instance: c, priority: 1, weight: 7 }\n"
	                            "      - { instance: d, priority: -3 }\n"
	                            "      - { instance: e, priority: 5 }\n");
	const struct config_route *r = &c->routes[0];
	const char *order = "beacd";
	for (size_t i = 0; i < 5; i++)
		assert_int_equal(r->targets[i].instance->name[0], order[i]);
	assert_int_equal(r->targets[0].weight, 0);
	assert_int_equal(r->targets[3].weight, 7);
	assert_int_equal(r->targets[4].priority, -3);
	config_unref(c);
}

static void test_url_with_query(void **state)
{
	struct config *c = load_str(
	        "instances:\n"
	        "  - name: a\n"
	        "    provider: azure-openai\n"
	        "    endpoint: https://x.openai.azure.com/openai/deployments/g/chat/completions\n"
	        "    auth: { query: { api-version: 2024-06-01, key: 'a b&c=d/é' } }\n"
	        "  - name: b\n"
	        "    provider: openai-compatible\n"
	        "    endpoint: 'http://h:1/v1?x=1'\n"
	        "    auth: { query: { key: k } }\n"
	        "  - name: c\n"
	        "    provider: openai-compatible\n"
	        "    endpoint: 'http://h:1/v1?'\n"
	        "    auth: { query: { key: k } }\n");
	assert_string_equal(c->instances[0].url,
	                    "https://x.openai.azure.com/openai/deployments/g/chat/completions"
	                    "?api-version=2024-06-01&key=a%20b%26c%3Dd%2F%C3%A9");
	assert_int_equal(c->instances[0].n_auth_query, 2);
	assert_string_equal(c->instances[0].auth_query[1].value, "a b&c=d/é");
	assert_string_equal(c->instances[1].url, "http://h:1/v1?x=1&key=k");
	assert_string_equal(c->instances[2].url, "http://h:1/v1?key=k");
	config_unref(c);
}

static void test_options_to_json(void **state)
{
	struct config *c = load_str("instances:\n"
	                            "  - name: a\n"
	                            "    provider: openai\n"
	                            "    options:\n"
	                            "      i: 42\n"
	                            "      neg: -7\n"
	                            "      f: 0.5\n"
	                            "      e: 1e3\n"
	                            "      t: true\n"
	                            "      n: null\n"
	                            "      tilde: ~\n"
	                            "      qs: \"42\"\n"
	                            "      qb: 'true'\n"
	                            "      s: hello\n"
	                            "      l: [1, two, 3.0]\n"
	                            "      m: { stop: [\"\\n\"], nested: { deep: false } }\n");
	json_t *o = c->instances[0].options;
	assert_true(json_is_integer(json_object_get(o, "i")));
	assert_int_equal(json_integer_value(json_object_get(o, "i")), 42);
	assert_int_equal(json_integer_value(json_object_get(o, "neg")), -7);
	assert_true(json_is_real(json_object_get(o, "f")));
	assert_true(json_real_value(json_object_get(o, "e")) == 1000.0);
	assert_true(json_is_true(json_object_get(o, "t")));
	assert_true(json_is_null(json_object_get(o, "n")));
	assert_true(json_is_null(json_object_get(o, "tilde")));
	assert_string_equal(json_string_value(json_object_get(o, "qs")), "42");
	assert_string_equal(json_string_value(json_object_get(o, "qb")), "true");
	assert_string_equal(json_string_value(json_object_get(o, "s")), "hello");
	json_t *l = json_object_get(o, "l");
	assert_int_equal(json_array_size(l), 3);
	assert_true(json_is_integer(json_array_get(l, 0)));
	assert_true(json_is_string(json_array_get(l, 1)));
	assert_true(json_is_real(json_array_get(l, 2)));
	json_t *m = json_object_get(o, "m");
	assert_string_equal(json_string_value(json_array_get(json_object_get(m, "stop"), 0)), "\n");
	assert_true(json_is_false(json_object_get(json_object_get(m, "nested"), "deep")));
	config_unref(c);
}

static void test_env_substitution(void **state)
{
	setenv("SLUICE_TEST_HOST", "10.1.2.3", 1);
	setenv("SLUICE_TEST_EMPTY", "", 1);
	struct config *c = load_str("admin:\n"
	                            "  listen: ${SLUICE_TEST_HOST}:9180\n"
	                            "  key: 'pa$$word-$x-${SLUICE_TEST_EMPTY}-end$'\n"
	                            "store:\n"
	                            "  redis: { password: '${SLUICE_TEST_EMPTY}' }\n"
	                            "instances:\n"
	                            "  - name: a\n"
	                            "    provider: openai-compatible\n"
	                            "    endpoint: http://${SLUICE_TEST_HOST}:8000/v1\n"
	                            "    options: { n: '${SLUICE_TEST_HOST}' }\n");
	assert_string_equal(c->admin.address, "10.1.2.3:9180");
	assert_string_equal(c->admin.host, "10.1.2.3");
	assert_string_equal(c->admin.key, "pa$word-$x--end$");
	assert_null(c->store.redis.password); /* "" means none */
	assert_string_equal(c->instances[0].url, "http://10.1.2.3:8000/v1");
	assert_string_equal(json_string_value(json_object_get(c->instances[0].options, "n")),
	                    "10.1.2.3");
	config_unref(c);

	c = load_str("admin: { key: none }\nlog: { access_log: 'off', level: debug }\n");
	assert_string_equal(c->admin.address, "127.0.0.1:9180");
	assert_null(c->admin.key);
	assert_null(c->log.access_log);
	assert_int_equal(c->log.level, LOG_LEVEL_DEBUG);
	config_unref(c);
}

static void test_aliases(void **state)
{
	struct config *c = load_str("x-checks: &checks\n"
	                            "  active: { http_path: /health, timeout: 500ms }\n"
	                            "instances:\n"
	                            "  - { name: a, provider: openai, checks: *checks }\n"
	                            "  - { name: b, provider: openai, checks: *checks }\n");
	for (size_t i = 0; i < 2; i++) {
		assert_true(c->instances[i].active.enabled);
		assert_string_equal(c->instances[i].active.http_path, "/health");
		assert_int_equal(c->instances[i].active.timeout, 500);
	}
	config_unref(c);
}

/* ---- errors ------------------------------------------------------------------------------- */

static void test_err_unknown_key(void **state)
{
	EXPECT_ERRORS("instances: [{ name: a, provider: openai }]\n"
	              "routes:\n"
	              "  - name: chat\n"
	              "    paths: [/v1/chat/completions]\n"
	              "    targets:\n"
	              "      - { instance: a, weigth: 5 }\n"
	              "    fallbak: {}\n"
	              "    zzzzzz: 1\n"
	              "servr: {}\n",
	              "t.yaml:6:24: routes[0].targets[0]: unknown key \"weigth\" (did you mean "
	              "\"weight\"?)",
	              "t.yaml:7:5: routes[0]: unknown key \"fallbak\" (did you mean \"fallback\"?)",
	              "t.yaml:8:5: routes[0]: unknown key \"zzzzzz\"",
	              "t.yaml:9:1: unknown key \"servr\" (did you mean \"server\"?)");
}

static void test_err_too_many_limits(void **state)
{
	/* A request is checked against its consumer's and its instance's limits;
	 * more than CONFIG_MAX_LIMITS each could not all be tracked. */
	EXPECT_ERRORS("instances:\n"
	              "  - name: a\n"
	              "    provider: openai\n"
	              "    limits: [{limit: 1, window: 1s}, {limit: 1, window: 2s}, {limit: 1, window: 3s},\n"
	              "             {limit: 1, window: 4s}, {limit: 1, window: 5s}, {limit: 1, window: 6s},\n"
	              "             {limit: 1, window: 7s}, {limit: 1, window: 8s}, {limit: 1, window: 9s}]\n"
	              "routes: [{ name: chat, paths: [/v1/chat/completions], targets: [{ instance: a }] }]\n",
	              "t.yaml:4:13: instances[0].limits: at most 8 limits per instance (found 9)");
}

static void test_err_load_without_metrics(void **state)
{
	EXPECT_ERRORS("instances:\n"
	              "  - { name: a, provider: openai, load: { metrics_url: http://127.0.0.1:1/metrics } }\n"
	              "  - { name: b, provider: openai }\n"
	              "routes:\n"
	              "  - name: chat\n"
	              "    paths: [/v1/chat/completions]\n"
	              "    balancer: { algorithm: load }\n"
	              "    targets: [{ instance: a }, { instance: b }]\n",
	              "t.yaml:8:44: routes[0].targets[1].instance: balancer \"load\" needs instance "
	              "\"b\" to set load.metrics_url");
}

static void test_err_wrong_type(void **state)
{
	EXPECT_ERRORS("server: [a]\n"
	              "log:\n"
	              "  payloads: maybe\n"
	              "  error_log: { a: 1 }\n"
	              "instances: { name: a }\n"
	              "routes:\n"
	              "  - name: r\n"
	              "    paths: /v1/chat/completions\n"
	              "    targets: [{ instance: [a] }]\n",
	              "t.yaml:1:9: server: must be a mapping, not a list",
	              "t.yaml:3:13: log.payloads: must be true or false",
	              "t.yaml:4:14: log.error_log: must be a string, not a mapping",
	              "t.yaml:5:12: instances: must be a list, not a mapping",
	              "t.yaml:8:12: routes[0].paths: must be a list, not a string",
	              "t.yaml:9:27: routes[0].targets[0].instance: must be a string, not a list");
}

static void test_err_out_of_range(void **state)
{
	/* the message of the brief, at the very position it names */
	EXPECT_ERRORS("instances:\n"
	              "  - name: a\n"
	              "    provider: openai\n"
	              "  - name: b\n"
	              "    provider: openai\n"
	              "routes:\n"
	              "  - name: chat\n"
	              "    paths: [/v1/chat/completions]\n"
	              "    targets:\n"
	              "      - instance: a\n"
	              "      - instance: b\n"
	              "        weight: 1000001\n"
	              "    fallback: { max_attempts: 0 }\n"
	              "server: { max_connections: 99999999999999999999, listen: ['h:0'] }\n",
	              "t.yaml:12:17: routes[0].targets[1].weight: must be an integer from 0 to "
	              "1000000",
	              "t.yaml:13:31: routes[0].fallback.max_attempts: must be an integer from 1 "
	              "to 32",
	              "t.yaml:14:28: server.max_connections: must be an integer from 1 to 10000000",
	              "t.yaml:14:59: server.listen[0]: must be host:port (or [ipv6]:port) with a "
	              "port from 1 to 65535");
}

static void test_err_duplicate_names(void **state)
{
	EXPECT_ERRORS(
	        "instances:\n"
	        "  - { name: a, provider: openai }\n"
	        "  - { name: b, provider: openai }\n"
	        "  - { name: a, provider: openai }\n"
	        "consumers:\n"
	        "  - { name: c, keys: [k1] }\n"
	        "  - { name: c, keys: [k2] }\n"
	        "routes:\n"
	        "  - { name: r, paths: [/a], targets: [{ instance: a }] }\n"
	        "  - { name: r, paths: [/b], targets: [{ instance: b }] }\n",
	        "t.yaml:4:13: instances[2].name: duplicate instance name \"a\" (first defined "
	        "at line 2, column 13)",
	        "t.yaml:7:13: consumers[1].name: duplicate consumer name \"c\" (first defined "
	        "at line 6, column 13)",
	        "t.yaml:10:13: routes[1].name: duplicate route name \"r\" (first defined at "
	        "line 9, column 13)");
}

static void test_err_dangling_target(void **state)
{
	EXPECT_ERRORS("instances: [{ name: qwen-cloud, provider: openai }]\n"
	              "routes:\n"
	              "  - name: chat\n"
	              "    paths: [/v1/chat/completions]\n"
	              "    targets:\n"
	              "      - { instance: qwen-clod }\n"
	              "      - { instance: qwen-cloud }\n"
	              "      - { instance: qwen-cloud }\n"
	              "      - { priority: 3 }\n",
	              "t.yaml:6:21: routes[0].targets[0].instance: unknown instance \"qwen-clod\" "
	              "(did you mean \"qwen-cloud\"?)",
	              "t.yaml:8:21: routes[0].targets[2].instance: instance \"qwen-cloud\" is "
	              "already a target of this route (routes[0].targets[1])",
	              "t.yaml:9:9: routes[0].targets[3]: missing required key \"instance\"");
}

static void test_err_dangling_consumer_refs(void **state)
{
	EXPECT_ERRORS("instances: [{ name: qwen-cloud, provider: openai }]\n"
	              "routes: [{ name: chat, paths: [/a], targets: [{ instance: qwen-cloud }] }]\n"
	              "consumers:\n"
	              "  - name: team\n"
	              "    keys: [k]\n"
	              "    routes: [caht, chat, chat]\n"
	              "    limits:\n"
	              "      - { instance: qwen-clouds, limit: 10, window: 1h }\n",
	              "t.yaml:6:14: consumers[0].routes[0]: unknown route \"caht\" (did you mean "
	              "\"chat\"?)",
	              "t.yaml:6:26: consumers[0].routes[2]: route \"chat\" is listed twice",
	              "t.yaml:8:21: consumers[0].limits[0].instance: unknown instance "
	              "\"qwen-clouds\" (did you mean \"qwen-cloud\"?)");
}

static void test_err_missing_env(void **state)
{
	unsetenv("CUSTOM_API_KEY");
	unsetenv("SLUICE_TEST_UNSET_VAR");
	EXPECT_ERRORS("instances:\n"
	              "  - name: a\n"
	              "    provider: openai\n"
	              "    auth: { header: { Authorization: \"Bearer ${CUSTOM_API_KEY}\" } }\n"
	              "    endpoint: https://${SLUICE_TEST_UNSET_VAR}/v1\n"
	              "    model: '${BAD-NAME} ${UNCLOSED'\n",
	              "t.yaml:4:38: instances[0].auth.header.Authorization: environment variable "
	              "CUSTOM_API_KEY is not set",
	              "t.yaml:5:15: instances[0].endpoint: environment variable "
	              "SLUICE_TEST_UNSET_VAR is not set",
	              "t.yaml:6:12: instances[0].model: invalid environment variable name "
	              "\"BAD-NAME\"",
	              "t.yaml:6:12: instances[0].model: unterminated \"${\" (write \"$$\" for a "
	              "literal \"$\")");
	set_contract_env();
}

static void test_err_bad_duration(void **state)
{
	EXPECT_ERRORS("server:\n"
	              "  client_timeout: 5x\n"
	              "  drain_timeout: -1s\n"
	              "  keepalive_timeout: 1.0005s\n"
	              "instances:\n"
	              "  - name: a\n"
	              "    provider: openai\n"
	              "    timeouts: { connect: 0, idle: 30 s }\n"
	              "    limits: [{ limit: 5, window: 0s }, { limit: 5, window: 2y }]\n",
	              "t.yaml:2:19: server.client_timeout: invalid duration \"5x\": use a number "
	              "with a unit: ms, s, m, h, d or w (a bare number means seconds)",
	              "t.yaml:3:18: server.drain_timeout: invalid duration \"-1s\": use a number "
	              "with a unit: ms, s, m, h, d or w (a bare number means seconds)",
	              "t.yaml:4:22: server.keepalive_timeout: invalid duration \"1.0005s\": use a "
	              "number with a unit: ms, s, m, h, d or w (a bare number means seconds)",
	              "t.yaml:8:26: instances[0].timeouts.connect: must be greater than zero",
	              "t.yaml:8:35: instances[0].timeouts.idle: invalid duration \"30 s\": use a "
	              "number with a unit: ms, s, m, h, d or w (a bare number means seconds)",
	              "t.yaml:9:34: instances[0].limits[0].window: invalid window \"0s\": use a "
	              "duration such as 30s, 1h, 1d, 1w, or calendar months such as 1mo",
	              "t.yaml:9:60: instances[0].limits[1].window: invalid window \"2y\": use a "
	              "duration such as 30s, 1h, 1d, 1w, or calendar months such as 1mo");
}

static void test_err_bad_size(void **state)
{
	EXPECT_ERRORS("server:\n"
	              "  max_body_size: 16mb\n"
	              "  max_header_size: 0\n",
	              "t.yaml:2:18: server.max_body_size: invalid size \"16mb\": use bytes or a "
	              "number with a unit: KiB, MiB, GiB (powers of 1024) or KB, MB, GB (powers of "
	              "1000)",
	              "t.yaml:3:20: server.max_header_size: must be greater than zero");
}

static void test_err_bad_regex(void **state)
{
	EXPECT_ERRORS(
	        "instances: [{ name: a, provider: openai }]\n"
	        "routes:\n"
	        "  - name: chat\n"
	        "    paths: [/v1/chat/completions]\n"
	        "    targets: [{ instance: a }]\n"
	        "    plugins:\n"
	        "      - prompt_guard: { deny: [ok, \"(unclosed\"], allow: [\"a{2,1}\"] }\n"
	        "      - response_guard: { deny: [\"[z-a]\"], action: hide }\n",
	        "t.yaml:7:36: routes[0].plugins[0].prompt_guard.deny[1]: invalid regular "
	        "expression: missing closing parenthesis at offset 9",
	        "t.yaml:7:58: routes[0].plugins[0].prompt_guard.allow[0]: invalid regular "
	        "expression: numbers out of order in {} quantifier at offset 5",
	        "t.yaml:8:34: routes[0].plugins[1].response_guard.deny[0]: invalid regular "
	        "expression: range out of order in character class at offset 3",
	        "t.yaml:8:52: routes[0].plugins[1].response_guard.action: \"hide\" is not one "
	        "of mask, block");
}

static void test_err_plugins(void **state)
{
	EXPECT_ERRORS("instances: [{ name: a, provider: openai }]\n"
	              "routes:\n"
	              "  - name: chat\n"
	              "    paths: [/v1/chat/completions]\n"
	              "    targets: [{ instance: a }]\n"
	              "    plugins:\n"
	              "      - prompt_gaurd: {}\n"
	              "      - { loop_guard: {}, prompt_guard: {} }\n"
	              "      - loop_guard: { max_repeats: 1, windw: 5 }\n"
	              "      - loop_guard:\n"
	              "      - prompt_decorator: { prepend: [{ role: robot, content: hi }, { role: "
	              "user }] }\n"
	              "      - prompt_guard: { roles: [usr], history: some }\n"
	              "      - request_override: { cap: { max_tokens: many, temperature: -1 }, "
	              "remove: [''] }\n",
	              "t.yaml:7:9: routes[0].plugins[0]: unknown plugin \"prompt_gaurd\" (did you "
	              "mean \"prompt_guard\"?)",
	              "t.yaml:8:9: routes[0].plugins[1]: must be a mapping with one key, the "
	              "plugin's name (\"- prompt_guard: { ... }\")",
	              "t.yaml:9:36: routes[0].plugins[2].loop_guard.max_repeats: must be an "
	              "integer from 2 to 1000000",
	              "t.yaml:9:39: routes[0].plugins[2].loop_guard: unknown key \"windw\" (did "
	              "you mean \"window\"?)",
	              "t.yaml:10:9: routes[0].plugins[3]: plugin loop_guard is already configured "
	              "on this route",
	              "t.yaml:11:47: routes[0].plugins[4].prompt_decorator.prepend[0].role: "
	              "unknown role \"robot\"",
	              "t.yaml:11:69: routes[0].plugins[4].prompt_decorator.prepend[1]: missing "
	              "required key \"content\"",
	              "t.yaml:12:33: routes[0].plugins[5].prompt_guard.roles[0]: unknown role "
	              "\"usr\" (did you mean \"user\"?)",
	              "t.yaml:12:48: routes[0].plugins[5].prompt_guard.history: \"some\" is not "
	              "one of last, all",
	              "t.yaml:13:48: routes[0].plugins[6].request_override.cap.max_tokens: must be "
	              "a number",
	              "t.yaml:13:67: routes[0].plugins[6].request_override.cap.temperature: must "
	              "not be negative",
	              "t.yaml:13:82: routes[0].plugins[6].request_override.remove[0]: must not be "
	              "empty");
}

static void test_err_duplicate_consumer_key(void **state)
{
	setenv("SLUICE_TEST_KEY", "foo", 1);
	const char *yaml =
	        "consumers:\n"
	        "  - name: team-a\n"
	        "    keys: [\"${SLUICE_TEST_KEY}\", bar]\n"
	        "  - name: team-b\n"
	        "    keys: [\"sha256:2C26B46B68FFC68FF99B453C1D30413413422D706483BFA0F98A5E"
	        "886266E7AE\", bar, baz, baz]\n"
	        "  - name: team-c\n"
	        "    keys: [\"sha256:abc\", '']\n";
	EXPECT_ERRORS(yaml,
	              "t.yaml:5:12: consumers[1].keys[0]: key 2c26b46b68ff... is already used by "
	              "consumer \"team-a\" (line 3, column 12)",
	              "t.yaml:5:87: consumers[1].keys[1]: key fcde2b2edba5... is already used by "
	              "consumer \"team-a\" (line 3, column 34)",
	              "t.yaml:5:97: consumers[1].keys[3]: key baa5a0964d33... is listed twice "
	              "(first at line 5, column 92)",
	              "t.yaml:7:12: consumers[2].keys[0]: a hashed key must be \"sha256:\" "
	              "followed by 64 hex digits",
	              "t.yaml:7:26: consumers[2].keys[1]: must not be empty");

	/* and never the key itself */
	struct config_errors e;
	assert_null(config_load_string(yaml, strlen(yaml), "t.yaml", &e));
	for (size_t i = 0; i < e.n; i++) {
		assert_null(strstr(e.msgs[i], "foo"));
		assert_null(strstr(e.msgs[i], "bar"));
	}
	config_errors_free(&e);
}

static void test_err_missing_required(void **state)
{
	EXPECT_ERRORS("instances:\n"
	              "  - provider: openai\n"
	              "  - name: x\n"
	              "  - name: y\n"
	              "    provider: openai-compatible\n"
	              "consumers:\n"
	              "  - name: team\n"
	              "  - keys: []\n"
	              "routes:\n"
	              "  - name: r\n"
	              "  - paths: [/a]\n"
	              "    targets: []\n",
	              "t.yaml:2:5: instances[0]: missing required key \"name\"",
	              "t.yaml:3:5: instances[1]: missing required key \"provider\"",
	              "t.yaml:4:5: instances[2]: missing required key \"endpoint\" (provider "
	              "openai-compatible has no default endpoint)",
	              "t.yaml:7:5: consumers[0]: missing required key \"keys\"",
	              "t.yaml:8:5: consumers[1]: missing required key \"name\"",
	              "t.yaml:8:11: consumers[1].keys: must list at least one key",
	              "t.yaml:10:5: routes[0]: missing required key \"paths\"",
	              "t.yaml:10:5: routes[0]: missing required key \"targets\"",
	              "t.yaml:11:5: routes[1]: missing required key \"name\"",
	              "t.yaml:12:14: routes[1].targets: must list at least one target");
}

static void test_err_yaml_syntax(void **state)
{
	struct config_errors e;
	assert_null(config_load(TEST_DATA_DIR "/syntax_error.yaml", &e));
	assert_int_equal(e.n, 1);
	assert_string_equal(e.msgs[0],
	                    TEST_DATA_DIR "/syntax_error.yaml:4:12: YAML syntax error: "
	                                  "did not find expected ',' or ']' while "
	                                  "parsing a flow sequence at line 3, column 12");
	config_errors_free(&e);

	EXPECT_ERRORS("server:\n  workers: 2\n routes: x\n",
	              "t.yaml:3:2: YAML syntax error: did not find expected key while parsing a "
	              "block mapping at line 1, column 1");
	EXPECT_ERRORS("a: 1\n---\nb: 2\n",
	              "t.yaml:2:1: YAML syntax error: only one document is allowed, this is a "
	              "second one");
	EXPECT_ERRORS("log: \"\xff\"\n", "t.yaml:1:7: YAML syntax error: invalid leading UTF-8 "
	                                 "octet");
	EXPECT_ERRORS("log:\n  level: debug\n  level: info\n",
	              "t.yaml:3:3: log: duplicate key \"level\" (first at line 2, column 3)");
	EXPECT_ERRORS("x-a: &a { level: debug }\nlog:\n  <<: *a\nstore: !custom {}\n",
	              "t.yaml:3:3: log: merge keys (<<) are not supported: repeat the keys, or "
	              "alias the whole value",
	              "t.yaml:4:8: store: unsupported YAML tag \"!custom\"");
	EXPECT_ERRORS("log: *nothing\n",
	              "t.yaml:1:6: log: alias *nothing refers to no anchor &nothing before it");
	EXPECT_ERRORS("", "t.yaml:1:1: the configuration is empty");
	EXPECT_ERRORS("# only a comment\n", "t.yaml:1:1: the configuration is empty");
	EXPECT_ERRORS("- a\n", "t.yaml:1:1: the configuration must be a mapping of sections "
	                       "(server, instances, routes, ...), not a list");
}

static void test_err_billion_laughs(void **state)
{
	EXPECT_ERRORS("x-a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
	              "x-b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
	              "x-c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
	              "x-d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
	              "x-e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
	              "x-f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
	              "t.yaml:5:38: x-e[7]: alias *d expands past the limit of 100000 nodes or 128 "
	              "levels created by aliases");
}

static void test_err_ambiguous_routes(void **state)
{
	EXPECT_ERRORS(
	        "instances: [{ name: a, provider: openai }]\n"
	        "routes:\n"
	        "  - { name: chat, paths: [/v1/chat/completions], targets: [{instance: a}] }\n"
	        "  - { name: chat2, paths: [/v1/chat/completions], targets: [{instance: a}] }\n"
	        "  - { name: gpt, paths: [/v1/chat/completions], models: [gpt-4o, o1],\n"
	        "      targets: [{instance: a}] }\n"
	        "  - { name: o1, paths: [/v2, /v1/chat/completions, /v2], models: [o1],\n"
	        "      targets: [{instance: a}] }\n"
	        "  - { name: fine, paths: [/v1/chat/completions], models: [o3],\n"
	        "      targets: [{instance: a}] }\n",
	        "t.yaml:4:28: routes[1].paths[0]: path \"/v1/chat/completions\" is already "
	        "served by route \"chat\" for the same models",
	        "t.yaml:7:30: routes[3].paths[1]: path \"/v1/chat/completions\" is already "
	        "served by route \"gpt\" for the same models",
	        "t.yaml:7:52: routes[3].paths[2]: path \"/v2\" is listed twice");
}

static void test_err_many_at_once(void **state)
{
	struct config_errors e;
	const char *const want[] = {
	        "many_errors.yaml:2:12: server.workers: must be \"auto\" or an integer from 1 to "
	        "256",
	        "many_errors.yaml:3:18: server.max_body_size: invalid size \"16 MiB\": use bytes "
	        "or "
	        "a number with a unit: KiB, MiB, GiB (powers of 1024) or KB, MB, GB (powers of "
	        "1000)",
	        "many_errors.yaml:7:26: instances[0].timeouts.connect: must be greater than zero",
	        "many_errors.yaml:8:11: instances[1].name: duplicate instance name \"a\" (first "
	        "defined at line 5, column 11)",
	        "many_errors.yaml:14:24: routes[0].targets[0]: unknown key \"weigth\" (did you "
	        "mean "
	        "\"weight\"?)",
	        "many_errors.yaml:15:21: routes[0].targets[1].instance: unknown instance \"c\"",
	        "many_errors.yaml:18:12: consumers[0].keys[0]: environment variable "
	        "SLUICE_TEST_UNSET_VAR is not set",
	        "many_errors.yaml:19:20: consumers[0].rejected_code: must be an integer from 400 "
	        "to "
	        "599",
	};
	unsetenv("SLUICE_TEST_UNSET_VAR");
	assert_null(config_load(TEST_DATA_DIR "/many_errors.yaml", &e));
	assert_int_equal(e.n, ARRAY_LEN(want));
	assert_int_equal(e.dropped, 0);
	for (size_t i = 0; i < e.n; i++) {
		const char *msg = strstr(e.msgs[i], "many_errors.yaml:");
		assert_non_null(msg);
		assert_string_equal(msg, want[i]);
	}
	config_errors_free(&e);
	assert_int_equal(e.n, 0);
}

static void test_err_too_many(void **state)
{
	char yaml[8192] = "log:\n";
	for (int i = 0; i < 70; i++)
		snprintf(yaml + strlen(yaml), sizeof yaml - strlen(yaml), "  k%02d: 1\n", i);
	struct config_errors e;
	assert_null(config_load_string(yaml, strlen(yaml), "t.yaml", &e));
	assert_int_equal(e.n, CONFIG_MAX_ERRORS);
	assert_int_equal(e.dropped, 70 - CONFIG_MAX_ERRORS);
	assert_string_equal(e.msgs[0], "t.yaml:2:3: log: unknown key \"k00\"");
	config_errors_free(&e);
	/* errs may be NULL */
	assert_null(config_load_string(yaml, strlen(yaml), "t.yaml", NULL));
}

static void test_err_server_admin_store(void **state)
{
	EXPECT_ERRORS("server:\n"
	              "  listen:\n"
	              "    - address: 0.0.0.0:8080\n"
	              "    - address: 0.0.0.0:8080\n"
	              "    - address: 0.0.0.0:8443\n"
	              "      tls: { cert: /etc/cert.pem }\n"
	              "    - { address: '[::1]:443', tls: { key: k.pem, cert: '' } }\n"
	              "    - 0.0.0.0\n"
	              "  workers: 0\n"
	              "admin: { listen: 127.0.0.1:9180 }\n"
	              "store: { type: redis, redis: { db: -1, address: localhost }, on_error: "
	              "fail }\n"
	              "alerts: { webhook: { timeout: 5s } }\n",
	              "t.yaml:4:16: server.listen[1]: address 0.0.0.0:8080 is already listed "
	              "(server.listen[0])",
	              "t.yaml:6:12: server.listen[2].tls: missing required key \"key\"",
	              "t.yaml:7:56: server.listen[3].tls.cert: must not be empty",
	              "t.yaml:8:7: server.listen[4]: must be host:port (or [ipv6]:port) with a "
	              "port from 1 to 65535",
	              "t.yaml:9:12: server.workers: must be \"auto\" or an integer from 1 to 256",
	              "t.yaml:10:8: admin: missing required key \"key\"",
	              "t.yaml:11:36: store.redis.db: must be an integer from 0 to 65535",
	              "t.yaml:11:49: store.redis.address: must be host:port (or [ipv6]:port) with "
	              "a port from 1 to 65535",
	              "t.yaml:11:72: store.on_error: \"fail\" is not one of allow, deny",
	              "t.yaml:12:20: alerts.webhook: missing required key \"url\"");
	EXPECT_ERRORS("admin: { key: '' }\n",
	              "t.yaml:1:15: admin.key: must not be empty (write \"none\" to turn admin "
	              "authentication off)");
}

static void test_err_instances(void **state)
{
	EXPECT_ERRORS("instances:\n"
	              "  - name: 'a b'\n"
	              "    provider: openai-compatibel\n"
	              "    endpoint: ftp://x\n"
	              "  - name: b\n"
	              "    provider: openai\n"
	              "    endpoint: 'https://user:pw@host/v1'\n"
	              "    auth: { header: { 'Bad Header': x, Ok: \"a\\nb\" } }\n"
	              "    checks:\n"
	              "      active: { http_path: health, req_headers: [nocolon], host: h }\n"
	              "      passive: false\n"
	              "    options: { t: .inf }\n"
	              "    load: { metrics_url: 'http://h:99999/metrics' }\n",
	              "t.yaml:2:11: instances[0].name: must contain only letters, digits, '.', '_' "
	              "and '-'",
	              "t.yaml:3:15: instances[0].provider: \"openai-compatibel\" is not one of "
	              "openai, openai-compatible, azure-openai, deepseek, openrouter, gemini, "
	              "anthropic (did you mean \"openai-compatible\"?)",
	              "t.yaml:4:15: instances[0].endpoint: must be an http:// or https:// URL",
	              "t.yaml:7:15: instances[1].endpoint: must not contain credentials "
	              "(user@host): use auth.header or auth.query",
	              "t.yaml:8:23: instances[1].auth.header: \"Bad Header\" is not a valid header "
	              "name",
	              "t.yaml:8:44: instances[1].auth.header.Ok: must not contain line breaks or "
	              "control characters",
	              "t.yaml:10:28: instances[1].checks.active.http_path: must start with \"/\"",
	              "t.yaml:10:50: instances[1].checks.active.req_headers[0]: must be a header "
	              "line \"Name: value\"",
	              "t.yaml:10:66: instances[1].checks.active.host: must be host:port (or "
	              "[ipv6]:port) with a port from 1 to 65535",
	              "t.yaml:11:16: instances[1].checks.passive: must be a mapping; to turn "
	              "passive checks off write \"passive: { enabled: false }\"",
	              "t.yaml:12:19: instances[1].options.t: infinity and NaN cannot be sent as "
	              "JSON",
	              "t.yaml:13:26: instances[1].load.metrics_url: has a port outside 1..65535");
}

static void test_err_limits(void **state)
{
	EXPECT_ERRORS(
	        "instances:\n"
	        "  - name: a\n"
	        "    provider: openai\n"
	        "    limits:\n"
	        "      - { instance: a, limit: 10, window: 1h }\n"
	        "      - { limit: 10, requests: 5, window: 1h }\n"
	        "      - { window: 1h }\n"
	        "      - { requests: 5, window: 1mo, type: sliding, strategy: total_tokens }\n"
	        "      - { limit: 0, window: 1h }\n"
	        "      - { limit: 10, window: 60m, type: sliding }\n"
	        "consumers:\n"
	        "  - name: c\n"
	        "    keys: [k]\n"
	        "    limits: [{ limit: 5, window: 1d }, { limit: 6, window: 24h, strategy: "
	        "total_tokens }]\n",
	        "t.yaml:5:11: instances[0].limits[0]: key \"instance\" is not allowed in an "
	        "instance's limits: they apply to the instance itself",
	        "t.yaml:6:22: instances[0].limits[1]: \"limit\" (tokens) and \"requests\" "
	        "cannot be combined: write one entry for each",
	        "t.yaml:7:9: instances[0].limits[2]: missing required key \"limit\" (tokens) "
	        "or \"requests\"",
	        "t.yaml:8:32: instances[0].limits[3].window: a sliding window must be a "
	        "duration, not calendar months",
	        "t.yaml:8:52: instances[0].limits[3]: \"strategy\" applies to token limits "
	        "(limit:), not to requests:",
	        "t.yaml:9:18: instances[0].limits[4].limit: must be an integer from 1 to "
	        "9007199254740991",
	        "t.yaml:10:9: instances[0].limits[5]: counts the same thing as "
	        "instances[0].limits[0] (instance:a:total_tokens:1h): merge them",
	        "t.yaml:14:40: consumers[0].limits[1]: counts the same thing as "
	        "consumers[0].limits[0] (consumer:c:*:total_tokens:1d): merge them");
}

/* Prices and cost limits: decimals read exactly, in micro-units; cached_input defaults to
 * input (no discount known: never under-charge). */
static void test_price_and_cost_limits(void **state)
{
	struct config *c = load_str("instances:\n"
	                            "  - name: a\n"
	                            "    provider: openai\n"
	                            "    price: { input: 0.40, cached_input: 0.10, output: 1.20 }\n"
	                            "    limits: [{ strategy: cost, limit: 12.5, window: 1d }]\n"
	                            "  - name: b\n"
	                            "    provider: openai\n"
	                            "    price: { input: 3, output: 15.000001 }\n"
	                            "  - name: c\n"
	                            "    provider: openai\n"
	                            "consumers:\n"
	                            "  - name: u\n"
	                            "    keys: [k]\n"
	                            "    limits:\n"
	                            "      - { strategy: cost, limit: 200, window: 1mo }\n"
	                            "      - { instance: b, strategy: cost, limit: 0.000001, "
	                            "window: 1h }\n"
	                            "      - { strategy: cost, limit: 9007199254.740991, window: "
	                            "1d }\n");
	const struct config_instance *a = config_find_instance(c, "a");
	const struct config_instance *b = config_find_instance(c, "b");
	const struct config_consumer *u = config_find_consumer(c, "u");

	assert_true(a->price.set);
	assert_int_equal(a->price.input, 400000);
	assert_int_equal(a->price.cached_input, 100000);
	assert_int_equal(a->price.output, 1200000);
	assert_int_equal(a->limits[0].strategy, LIMIT_COST);
	assert_int_equal(a->limits[0].tokens, 12500000);
	assert_string_equal(a->limits[0].id, "instance:a:cost:1d");
	assert_int_equal(b->price.input, 3000000);
	assert_int_equal(b->price.cached_input, 3000000);
	assert_int_equal(b->price.output, 15000001);
	assert_false(config_find_instance(c, "c")->price.set);
	assert_int_equal(u->limits[0].tokens, 200000000);
	assert_string_equal(u->limits[0].id, "consumer:u:*:cost:1mo");
	assert_ptr_equal(u->limits[1].instance, b);
	assert_int_equal(u->limits[1].tokens, 1);
	assert_string_equal(u->limits[1].id, "consumer:u:b:cost:1h");
	assert_int_equal(u->limits[2].tokens, 9007199254740991ull);
	assert_string_equal(config_strategy_name(LIMIT_COST), "cost");
	config_unref(c);
}

static void test_err_price_and_cost_limits(void **state)
{
#define PRICE_ERR                                                                                  \
	"must be a price per million tokens: a number from 0 to 1000000 with at most 6 decimals"
#define COST_ERR                                                                                   \
	"must be a cost in price units: a number from 0.000001 to 9007199254.740991 with at most " \
	"6 decimals"
	EXPECT_ERRORS(
	        "instances:\n"
	        "  - name: a\n"
	        "    provider: openai\n"
	        "    price: { input: -1, cached_input: 0.0000001, output: 1e-3, inputs: 2 }\n"
	        "  - name: b\n"
	        "    provider: openai\n"
	        "    price: { input: 1000001, output: \"x\" }\n"
	        "  - name: c\n"
	        "    provider: openai\n"
	        "    price: 3\n"
	        "    limits: [{ strategy: cost, limit: 5, window: 1d }]\n"
	        "  - name: d\n"
	        "    provider: openai\n"
	        "    price: { input: 1.5 }\n"
	        "consumers:\n"
	        "  - name: u\n"
	        "    keys: [k]\n"
	        "    limits:\n"
	        "      - { instance: c, strategy: cost, limit: 5, window: 1d }\n"
	        "      - { strategy: cost, limit: 0, window: 1d }\n"
	        "      - { strategy: cost, limit: 1.0000001, window: 1h }\n"
	        "      - { strategy: cost, limit: 9007199254.740992, window: 1m }\n"
	        "      - { strategy: cost, limit: 1., window: 1w }\n"
	        "      - { strategy: cost, requests: 5, window: 1w }\n",
	        "t.yaml:4:21: instances[0].price.input: " PRICE_ERR,
	        "t.yaml:4:39: instances[0].price.cached_input: " PRICE_ERR,
	        "t.yaml:4:58: instances[0].price.output: " PRICE_ERR,
	        "t.yaml:4:64: instances[0].price: unknown key \"inputs\" (did you mean \"input\"?)",
	        "t.yaml:7:21: instances[1].price.input: " PRICE_ERR,
	        "t.yaml:7:38: instances[1].price.output: " PRICE_ERR,
	        "t.yaml:10:12: instances[2].price: must be a mapping, not a string",
	        "t.yaml:11:14: instances[2].limits[0]: strategy cost needs a price: instance \"c\" "
	        "has none (add price: { input, cached_input, output } to it)",
	        "t.yaml:14:12: instances[3].price: missing required key \"output\"",
	        "t.yaml:19:9: consumers[0].limits[0]: strategy cost needs a price: instance \"c\" "
	        "has none (add price: { input, cached_input, output } to it)",
	        "t.yaml:20:34: consumers[0].limits[1].limit: " COST_ERR,
	        "t.yaml:21:34: consumers[0].limits[2].limit: " COST_ERR,
	        "t.yaml:22:34: consumers[0].limits[3].limit: " COST_ERR,
	        "t.yaml:23:34: consumers[0].limits[4].limit: " COST_ERR,
	        "t.yaml:24:11: consumers[0].limits[5]: \"strategy\" applies to token limits "
	        "(limit:), not to requests:");
	/* On every instance: at least one must have a price, or the limit counts nothing. */
	EXPECT_ERRORS("instances: [{ name: a, provider: openai }]\n"
	              "consumers:\n"
	              "  - name: u\n"
	              "    keys: [k]\n"
	              "    limits: [{ strategy: cost, limit: 5, window: 1d }]\n",
	              "t.yaml:5:14: consumers[0].limits[0]: strategy cost needs a price: no "
	              "instance has one (add price: { input, cached_input, output } to the "
	              "instances it should count)");
#undef PRICE_ERR
#undef COST_ERR
}

static void test_err_routes(void **state)
{
	EXPECT_ERRORS(
	        "instances: [{ name: a, provider: openai }]\n"
	        "routes:\n"
	        "  - name: chat\n"
	        "    paths: [/v1/chat?x=1, v1]\n"
	        "    models: ['']\n"
	        "    auth: basic\n"
	        "    key_headers: []\n"
	        "    balancer: { algorithm: chash, hash_on: header }\n"
	        "    fallback: { on: [unhealthy, http_428], http_statuses: [99, 600, x] }\n"
	        "    targets: [{ instance: a, priority: 1000001 }]\n"
	        "    plugins: { prompt_guard: {} }\n",
	        "t.yaml:4:13: routes[0].paths[0]: must be a path only, without \"?\" or \"#\"",
	        "t.yaml:4:27: routes[0].paths[1]: must start with \"/\"",
	        "t.yaml:5:14: routes[0].models[0]: must not be empty",
	        "t.yaml:6:11: routes[0].auth: \"basic\" is not one of none, key-auth",
	        "t.yaml:7:18: routes[0].key_headers: must list at least one item",
	        "t.yaml:8:44: routes[0].balancer.hash_on: hash_on: header needs \"key\", the "
	        "header to hash on",
	        "t.yaml:9:33: routes[0].fallback.on[1]: \"http_428\" is not one of unhealthy, "
	        "quota, http_429, http_5xx, timeout, connect_error (did you mean "
	        "\"http_429\"?)",
	        "t.yaml:9:60: routes[0].fallback.http_statuses[0]: must be an HTTP status "
	        "from 100 to 599",
	        "t.yaml:9:64: routes[0].fallback.http_statuses[1]: must be an HTTP status "
	        "from 100 to 599",
	        "t.yaml:9:69: routes[0].fallback.http_statuses[2]: must be an HTTP status "
	        "from 100 to 599",
	        "t.yaml:10:40: routes[0].targets[0].priority: must be an integer from "
	        "-1000000 to 1000000",
	        "t.yaml:11:14: routes[0].plugins: must be a list, not a mapping");
}

static void test_err_file_missing(void **state)
{
	struct config_errors e;
	assert_null(config_load(TEST_DATA_DIR "/does-not-exist.yaml", &e));
	assert_int_equal(e.n, 1);
	assert_string_equal(e.msgs[0], TEST_DATA_DIR "/does-not-exist.yaml: cannot read: No such "
	                                             "file or directory");
	config_errors_free(&e);
}

/* ---- value syntaxes ----------------------------------------------------------------------- */

static void test_parse_duration(void **state)
{
	static const struct {
		const char *s;
		bool ok;
		uint64_t ms;
	} cases[] = {
	        {"250ms", true, 250},
	        {"30s", true, 30000},
	        {"5m", true, 300000},
	        {"1h", true, 3600000},
	        {"1d", true, 86400000},
	        {"1w", true, 604800000},
	        {"2", true, 2000}, /* a bare number means seconds */
	        {"0", true, 0},
	        {"0ms", true, 0},
	        {"1.5s", true, 1500},
	        {"0.25", true, 250},
	        {"1.5ms", false, 0}, /* finer than a millisecond */
	        {"9223372036854775807ms", true, 9223372036854775807ull},
	        {"9223372036854775808ms", false, 0}, /* past INT64_MAX */
	        {"99999999999999999999s", false, 0}, /* overflows uint64 */
	        {"15250284452w", true, 15250284452ull * 604800000ull},
	        {"15250284453w", false, 0},
	        {"", false, 0},
	        {"s", false, 0},
	        {"-1s", false, 0},
	        {"+1s", false, 0},
	        {" 1s", false, 0},
	        {"1s ", false, 0},
	        {"1 s", false, 0},
	        {"1S", false, 0},
	        {"1sec", false, 0},
	        {"1mo", false, 0}, /* a window, not a duration */
	        {"1.s", false, 0},
	        {".5s", false, 0},
	        {"1e3", false, 0},
	        {"0x10", false, 0},
	        {"1s1", false, 0},
	};
	for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
		uint64_t ms = 777;
		bool ok = config_parse_duration(cases[i].s, &ms);
		if (ok != cases[i].ok)
			fail_msg("\"%s\": expected %s", cases[i].s, cases[i].ok ? "ok" : "failure");
		if (ok)
			assert_int_equal(ms, cases[i].ms);
		else
			assert_int_equal(ms, 777); /* untouched */
	}
}

static void test_parse_window(void **state)
{
	struct config_window w;
	assert_true(config_parse_window("1mo", &w));
	assert_int_equal(w.months, 1);
	assert_int_equal(w.ms, 0);
	assert_true(config_parse_window("3mo", &w));
	assert_int_equal(w.months, 3);
	assert_true(config_parse_window("120mo", &w));
	assert_true(config_parse_window("1h", &w));
	assert_int_equal(w.ms, 3600000);
	assert_int_equal(w.months, 0);
	assert_true(config_parse_window("3600", &w));
	assert_int_equal(w.ms, 3600000);
	assert_true(config_parse_window("250ms", &w));

	const char *bad[] = {"0mo",  "121mo", "mo", "1.5mo", "-1mo", "1 mo", "1Mo",
	                     "1mon", "0",     "0s", "",      "1y",   "x1h",  "99999999999999mo"};
	for (size_t i = 0; i < ARRAY_LEN(bad); i++) {
		if (config_parse_window(bad[i], &w))
			fail_msg("\"%s\" should be refused", bad[i]);
	}
}

static void test_parse_size(void **state)
{
	static const struct {
		const char *s;
		bool ok;
		uint64_t bytes;
	} cases[] = {
	        {"512", true, 512},
	        {"0", true, 0},
	        {"512B", true, 512},
	        {"512KiB", true, 512 * 1024},
	        {"16MiB", true, 16u << 20},
	        {"1GiB", true, 1u << 30},
	        {"2TiB", true, 2ull << 40},
	        {"10KB", true, 10000},
	        {"16MB", true, 16000000},
	        {"1GB", true, 1000000000},
	        {"1.5KiB", true, 1536},
	        {"0.5MB", true, 500000},
	        {"1.1B", false, 0},
	        {"8388607TiB", true, 8388607ull << 40},
	        {"8388608TiB", false, 0}, /* 2^63: past INT64_MAX */
	        {"18446744073709551616", false, 0},
	        {"16mib", false, 0},
	        {"16kb", false, 0},
	        {"16 MiB", false, 0},
	        {"16MiBx", false, 0},
	        {"-1", false, 0},
	        {"MiB", false, 0},
	        {"", false, 0},
	        {"1e6", false, 0},
	};
	for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
		uint64_t b = 777;
		bool ok = config_parse_size(cases[i].s, &b);
		if (ok != cases[i].ok)
			fail_msg("\"%s\": expected %s", cases[i].s, cases[i].ok ? "ok" : "failure");
		if (ok)
			assert_int_equal(b, cases[i].bytes);
	}
}

static void test_format_window_and_names(void **state)
{
	char buf[32];
	struct config_window w = {.ms = 3600000};
	config_format_window(&w, buf, sizeof buf);
	assert_string_equal(buf, "1h");
	w.ms = 90000;
	config_format_window(&w, buf, sizeof buf);
	assert_string_equal(buf, "90s");
	w.ms = 1500;
	config_format_window(&w, buf, sizeof buf);
	assert_string_equal(buf, "1500ms");
	w.ms = 14 * 86400000ull;
	config_format_window(&w, buf, sizeof buf);
	assert_string_equal(buf, "2w");
	w = (struct config_window){.months = 3};
	config_format_window(&w, buf, sizeof buf);
	assert_string_equal(buf, "3mo");
	config_format_duration(0, buf, sizeof buf);
	assert_string_equal(buf, "0ms");

	assert_string_equal(config_provider_name(PROVIDER_OPENAI_COMPATIBLE), "openai-compatible");
	assert_string_equal(config_provider_name(PROVIDER_ANTHROPIC), "anthropic");
	assert_null(config_provider_name((enum provider)99));
	assert_string_equal(config_strategy_name(LIMIT_COMPLETION_TOKENS), "completion_tokens");
	assert_string_equal(config_limit_type_name(LIMIT_SLIDING), "sliding");
	assert_string_equal(config_balancer_name(BALANCER_LEAST_REQUESTS), "least_requests");
	assert_string_equal(config_hash_on_name(HASH_ON_CLIENT_IP), "client_ip");
	assert_string_equal(config_check_type_name(CHECK_TCP), "tcp");
	assert_string_equal(config_fallback_trigger_name(FALLBACK_CONNECT_ERROR), "connect_error");
	assert_string_equal(config_fallback_trigger_name(FALLBACK_UNHEALTHY), "unhealthy");
	assert_null(config_fallback_trigger_name(FALLBACK_UNHEALTHY | FALLBACK_QUOTA));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_minimal_defaults),
	        cmocka_unit_test(test_route_auth_default_with_consumers),
	        cmocka_unit_test(test_provider_default_endpoints),
	        cmocka_unit_test(test_active_check_present),
	        cmocka_unit_test(test_full_contract),
	        cmocka_unit_test(test_examples_load),
	        cmocka_unit_test(test_targets_sorted_stable),
	        cmocka_unit_test(test_url_with_query),
	        cmocka_unit_test(test_options_to_json),
	        cmocka_unit_test(test_env_substitution),
	        cmocka_unit_test(test_aliases),
	        cmocka_unit_test(test_err_unknown_key),
	        cmocka_unit_test(test_err_wrong_type),
	        cmocka_unit_test(test_err_out_of_range),
	        cmocka_unit_test(test_err_duplicate_names),
	        cmocka_unit_test(test_err_dangling_target),
	        cmocka_unit_test(test_err_dangling_consumer_refs),
	        cmocka_unit_test(test_err_missing_env),
	        cmocka_unit_test(test_err_bad_duration),
	        cmocka_unit_test(test_err_bad_size),
	        cmocka_unit_test(test_err_bad_regex),
	        cmocka_unit_test(test_err_plugins),
	        cmocka_unit_test(test_err_duplicate_consumer_key),
	        cmocka_unit_test(test_err_missing_required),
	        cmocka_unit_test(test_err_yaml_syntax),
	        cmocka_unit_test(test_err_billion_laughs),
	        cmocka_unit_test(test_err_ambiguous_routes),
	        cmocka_unit_test(test_err_many_at_once),
	        cmocka_unit_test(test_err_too_many),
	        cmocka_unit_test(test_err_server_admin_store),
	        cmocka_unit_test(test_err_instances),
	        cmocka_unit_test(test_err_limits),
	        cmocka_unit_test(test_price_and_cost_limits),
	        cmocka_unit_test(test_err_price_and_cost_limits),
	        cmocka_unit_test(test_err_routes),
	        cmocka_unit_test(test_err_file_missing),
	        cmocka_unit_test(test_parse_duration),
	        cmocka_unit_test(test_err_too_many_limits),
	        cmocka_unit_test(test_provider_keys),
	        cmocka_unit_test(test_err_load_without_metrics),
	        cmocka_unit_test(test_parse_window),
	        cmocka_unit_test(test_parse_size),
	        cmocka_unit_test(test_format_window_and_names),
	};
	set_contract_env();
	return cmocka_run_group_tests(tests, NULL, NULL);
}
