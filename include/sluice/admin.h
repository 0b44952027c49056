/* admin.h — the admin listener: JSON API, /metrics and the status page, on the main thread. */
#ifndef SLUICE_ADMIN_H
#define SLUICE_ADMIN_H

#include <stdbool.h>

#include <jansson.h>

struct event_base;
struct config;
struct admin;

/*
 * What the admin API shows comes from the modules that own it, through these
 * hooks (set by server.c). All are called on the main thread; each returns a
 * new reference the admin code releases. A NULL hook (or a NULL result) makes
 * its endpoint answer 503.
 *
 * The shapes the status page reads (more keys are welcome; missing keys show
 * as "–"):
 *
 * status: {"version":"0.1.0","uptime_s":3600,"generation":3,
 *          "config_path":"/etc/sluice/sluice.yaml","config_sha256":"<64 hex>",
 *          "workers":4,"connections":17,"ready":true}
 * instances: [{"name":"qwen-onprem-b","provider":"openai-compatible","healthy":true,
 *          "last_transition":{"healthy":true,"reason":"active check ok","time":"<ISO 8601>"}
 *                             or null,
 *          "inflight":3,"ewma_latency_ms":812.5,"ewma_ttft_ms":140.2,
 *          "limits":[{"id":"instance:qwen-onprem-b:total_tokens:1h","limit":50000,
 *                     "used":1200,"remaining":48800,"reset_s":1800}]}]
 * consumers: [{"name":"consumer_a","limits":[ same limit objects ],
 *          "max_concurrent":20,"inflight":1}]
 * routes: [{"name":"chat","paths":["/v1/chat/completions"],"models":[],
 *          "targets":[{"instance":"qwen-onprem-c","priority":10,"weight":100}]}]
 * reload: {"ok":true,"generation":4} or {"ok":false,"errors":["file:3:5: key: message"]}
 *          (*ok tells which; false answers 400)
 */
struct admin_hooks {
	json_t *(*status)(void *arg);
	json_t *(*instances)(void *arg);
	json_t *(*consumers)(void *arg);
	json_t *(*routes)(void *arg);
	json_t *(*reload)(void *arg, bool *ok);
	bool (*ready)(void *arg);
	void *arg;
};

/*
 * Listen on c->admin.address (host, port; port 0 picks a free one, see
 * admin_port) and serve on main_base. When c->admin.address is NULL the admin
 * API is off: the result is a valid, disabled admin (not an error). NULL when
 * the socket cannot be opened (logged). hooks is copied.
 *
 * Endpoints (all but /healthz need "Authorization: Bearer <admin.key>" unless
 * admin.key is "none"; the status page also accepts ?key=):
 *   GET /healthz       200 "ok"                 GET /readyz   200 ready / 503
 *   GET /status        GET /instances           GET /routes
 *   GET /consumers     GET /consumers/{name}    (404 when unknown)
 *   GET /transitions   recent health transitions (metrics_recent_transitions)
 *   POST /reload       200 with the result, 400 with the errors when refused
 *   GET /metrics       Prometheus text format 0.0.4
 *   GET /              the status page (HTML)
 */
struct admin *admin_new(struct event_base *main_base, const struct config *c,
                        const struct admin_hooks *hooks);
/* After a reload: takes the new key. A changed admin.listen is logged and
 * applies only after a restart. */
void admin_configure(struct admin *a, const struct config *c);
/* The port actually listened on (useful with port 0); 0 when disabled. */
int admin_port(const struct admin *a);
void admin_free(struct admin *a);

/* The status page (src/status_page.c). */
extern const char admin_status_page[];
extern const unsigned long admin_status_page_len;

#endif
