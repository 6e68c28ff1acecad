/* admin_routes: the admin port's routes (see admin_routes.h). */
#include "admin_routes.h"

#include "json.h"
#include "lua_version.h"
#include "metrics.h"

#include <errno.h>
#include <string.h>

#ifndef ERRORD_VERSION
#define ERRORD_VERSION "dev"
#endif

/* Ends an answer whose JSON body was rendered with result `rc`: `status`
 * and a newline, or 500 when there was no memory for the body. */
static void end_json(admin_reply_t *reply, int status, int rc)
{
    reply->status = rc < 0 ? 500 : status;
    if (rc == 0)
        buf_lit(&reply->body, "\n");
}

/* Answers `status` with the JSON of `body` (taken over). */
static void reply_json(admin_reply_t *reply, int status, cJSON *body)
{
    end_json(reply, status, json_render(body, &reply->body));
}

/* Answers `status` with {"<key>":"<text>"}. */
static void reply_word(admin_reply_t *reply, int status, const char *key, const char *text)
{
    cJSON *body = cJSON_CreateObject();
    json_add(body, key, json_str(text));
    reply_json(reply, status, body);
}

/* The first problem of `errors` (one per line) as a JSON string. */
static cJSON *first_line(const buf_t *errors)
{
    const char *nl = errors->len > 0 ? memchr(errors->data, '\n', errors->len) : NULL;
    return json_text(errors->data, nl != NULL ? (size_t)(nl - errors->data) : errors->len);
}

/* Ready for traffic: the policy is loaded and the listeners are up (both
 * true once the admin port answers), and errord is not draining. */
static int ready(const admin_routes_t *ctx)
{
    return !workers_draining(ctx->workers);
}

static void route_readyz(void *arg, const http_head_t *req, admin_reply_t *reply)
{
    (void)req;
    if (ready(arg))
        reply_word(reply, 200, "status", "ready");
    else
        reply_word(reply, 503, "status", "draining");
}

static void route_metrics(void *arg, const http_head_t *req, admin_reply_t *reply)
{
    (void)req;
    const admin_routes_t *ctx = arg;
    const policy_t *policy = reload_policy(ctx->reload);
    const reload_status_t *st = reload_status(ctx->reload);
    metrics_control_t m = {
        .version = ERRORD_VERSION,
        .lua_version = lua_version_string(),
        .policy_path = policy != NULL ? reload_status(ctx->reload)->path : NULL,
        .policy_sha256 = policy != NULL ? policy_sha256(policy) : NULL,
        .policy_loaded_ms = policy != NULL ? policy_loaded_at(policy) : 0,
        .reloads = {st->n_reloaded, st->n_unchanged, st->n_failed},
        .client_connections = workers_connections(ctx->workers),
        .ready = ready(ctx),
    };
    reply->type = "text/plain; version=0.0.4; charset=utf-8";
    metrics_render(&reply->body, &m);
    sinks_metrics(ctx->sinks, &reply->body);
}

static void route_alerts(void *arg, const http_head_t *req, admin_reply_t *reply)
{
    (void)req;
    const admin_routes_t *ctx = arg;
    end_json(reply, 200, sinks_state_json(ctx->sinks, &reply->body));
}

/* GET /policy's "last_reload": how the last reload went, or null. */
static cJSON *last_reload_json(const reload_status_t *st)
{
    if (st->result == NULL)
        return cJSON_CreateNull();
    cJSON *obj = cJSON_CreateObject();
    json_add(obj, "result", json_str(st->result));
    json_add(obj, "trigger", json_str(st->trigger));
    json_add(obj, "at", json_time(st->at_ms));
    if (strcmp(st->result, "failed") == 0) {
        json_add(obj, "error", first_line(&st->errors));
        json_add(obj, "errors", json_lines(st->errors.data, st->errors.len));
    } else {
        json_add(obj, "error", cJSON_CreateNull());
    }
    return obj;
}

static void route_policy(void *arg, const http_head_t *req, admin_reply_t *reply)
{
    (void)req;
    const admin_routes_t *ctx = arg;
    const policy_t *policy = reload_policy(ctx->reload);
    const reload_status_t *st = reload_status(ctx->reload);
    cJSON *body = cJSON_CreateObject();
    if (policy == NULL) {
        json_add(body, "path", cJSON_CreateNull());
        json_add(body, "sha256", cJSON_CreateNull());
        json_add(body, "loaded_at", cJSON_CreateNull());
        json_add(body, "last_reload", cJSON_CreateNull());
        reply_json(reply, 200, body);
        return;
    }
    int handlers, tests;
    policy_describe(policy, &handlers, &tests);
    json_add(body, "path", json_str(reload_status(ctx->reload)->path));
    json_add(body, "sha256", json_str(policy_sha256(policy)));
    json_add(body, "loaded_at", json_time(policy_loaded_at(policy)));
    json_add(body, "handlers", cJSON_CreateNumber(handlers));
    json_add(body, "tests", cJSON_CreateNumber(tests));
    json_add(body, "watch", cJSON_CreateBool(reload_status(ctx->reload)->watching));
    json_add(body, "last_reload", last_reload_json(st));
    cJSON *reloads = cJSON_CreateObject();
    json_add(reloads, "reloaded", cJSON_CreateNumber((double)st->n_reloaded));
    json_add(reloads, "unchanged", cJSON_CreateNumber((double)st->n_unchanged));
    json_add(reloads, "failed", cJSON_CreateNumber((double)st->n_failed));
    json_add(body, "reloads", reloads);
    reply_json(reply, 200, body);
}

static void route_reload(void *arg, const http_head_t *req, admin_reply_t *reply)
{
    (void)req;
    const admin_routes_t *ctx = arg;
    if (reload_policy(ctx->reload) == NULL) {
        reply_word(reply, 409, "message",
                   "errord runs without a policy (--policy off); there is nothing to reload");
        return;
    }
    if (workers_draining(ctx->workers)) {
        reply_word(reply, 503, "message", "errord is stopping");
        return;
    }
    buf_t errors = BUF_INIT;
    cJSON *body = cJSON_CreateObject();
    int status = 200;
    if (reload_now(ctx->reload, "admin", &errors) == 0) {
        json_add(body, "result", json_str(reload_status(ctx->reload)->result));
        json_add(body, "sha256", json_str(policy_sha256(reload_policy(ctx->reload))));
        json_add(body, "path", json_str(reload_status(ctx->reload)->path));
    } else {
        status = 422;
        json_add(body, "message", first_line(&errors));
        json_add(body, "errors", json_lines(errors.data, errors.len));
        json_add(body, "running_sha256", json_str(policy_sha256(reload_policy(ctx->reload))));
    }
    reply_json(reply, status, body);
    buf_free(&errors);
}

int admin_routes_add(admin_t *admin, const admin_routes_t *ctx)
{
    void *arg = (void *)ctx; /* the handlers only read it */
    if (admin_route(admin, HTTP_M_GET, "/readyz", route_readyz, arg) < 0 ||
        admin_route(admin, HTTP_M_GET, "/metrics", route_metrics, arg) < 0 ||
        admin_route(admin, HTTP_M_GET, "/alerts", route_alerts, arg) < 0 ||
        admin_route(admin, HTTP_M_GET, "/policy", route_policy, arg) < 0 ||
        admin_route(admin, HTTP_M_POST, "/reload", route_reload, arg) < 0)
        return -ENOMEM;
    return 0;
}
