/* policy: a user's Lua policy in a sandbox (see policy.h). */
#include "policy.h"

#include "clock.h"
#include "log.h"
#include "lua_api.h"
#include "sandbox.h"

#include <lauxlib.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define MAX_POLICY_BYTES (4 * 1024 * 1024)
#define N_STATUS 600

struct policy_s {
    int refs;
    char *path;
    sandbox_t *sandbox;
    lua_api_ctx_t ctx;
    policy_settings_t settings;
    int handler[N_STATUS]; /* registry refs by status, LUA_NOREF when none */
    int error_ref;
    int tests_ref;
};

static const policy_settings_t DEFAULTS = {
    .attempts = 3,
    .backoff_base_ms = 100,
    .backoff_max_ms = 5000,
    .body_limit = 64 * 1024,
    .replay_limit = 1024 * 1024,
    .handler_instructions = 1000000,
    .handler_time_ms = 100,
    .memory_limit = 64 * 1024 * 1024,
};

static void errf(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void errf(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static sandbox_limits_t limits_of(const policy_settings_t *s)
{
    sandbox_limits_t l = {s->handler_instructions, s->handler_time_ms, s->memory_limit};
    return l;
}

/* The first line of a Lua error (the traceback follows it). */
static void first_line(const char *msg, char *out, size_t n)
{
    size_t len = strcspn(msg ? msg : "", "\n");
    snprintf(out, n, "%.*s", (int)len, msg ? msg : "(no message)");
}

/* ---- settings ------------------------------------------------------------------ */

/* Reads settings.<name> (or settings.<table>.<name>) as an integer in
 * [min, max] into *out when present. */
static int setting_int(lua_State *L, int t, const char *where, const char *name, int64_t min,
                       int64_t max, int64_t *out, char *err, size_t errlen)
{
    lua_getfield(L, t, name);
    int present = !lua_isnil(L, -1);
    int ok = !present || (lua_isinteger(L, -1) && lua_tointeger(L, -1) >= min &&
                          lua_tointeger(L, -1) <= max);
    if (present && ok)
        *out = lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (!ok)
        errf(err, errlen, "%s.%s must be an integer from %lld to %lld", where, name,
             (long long)min, (long long)max);
    return ok ? 0 : -1;
}

static void warn_unknown(lua_State *L, int t, const char *path, const char *where,
                         const char *const *known)
{
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        lua_pop(L, 1);
        const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "?";
        int found = 0;
        for (const char *const *p = known; *p != NULL && !found; p++)
            found = strcmp(k, *p) == 0;
        if (!found) {
            log_record_t *r = log_begin(LOG_WARN, "unknown setting ignored");
            log_str(r, "policy", path);
            log_str(r, "setting", where);
            log_str(r, "key", k);
            log_end(r);
        }
    }
}

static int read_settings(policy_t *p, lua_State *L, int policy, char *err, size_t errlen)
{
    static const char *const known[] = {"attempts", "backoff", "body_limit", "replay_limit",
                                        "limits", NULL};
    static const char *const known_backoff[] = {"base_ms", "max_ms", NULL};
    static const char *const known_limits[] = {"instructions", "time_ms", "memory_mb", NULL};
    policy_settings_t *s = &p->settings;
    int64_t v;
    int rc = -1;

    *s = DEFAULTS;
    lua_getfield(L, policy, "settings");
    int t = lua_gettop(L);
    if (lua_isnil(L, t)) {
        lua_pop(L, 1);
        return 0;
    }
    if (!lua_istable(L, t)) {
        errf(err, errlen, "settings must be a table");
        goto out;
    }
    warn_unknown(L, t, p->path, "settings", known);
    v = s->attempts;
    if (setting_int(L, t, "settings", "attempts", 1, 10, &v, err, errlen) < 0)
        goto out;
    s->attempts = (int)v;
    v = (int64_t)s->body_limit;
    if (setting_int(L, t, "settings", "body_limit", 0, 16 << 20, &v, err, errlen) < 0)
        goto out;
    s->body_limit = (size_t)v;
    v = (int64_t)s->replay_limit;
    if (setting_int(L, t, "settings", "replay_limit", 0, 1 << 30, &v, err, errlen) < 0)
        goto out;
    s->replay_limit = (size_t)v;

    lua_getfield(L, t, "backoff");
    if (!lua_isnil(L, -1)) {
        int b = lua_gettop(L);
        int64_t base = (int64_t)s->backoff_base_ms, max = (int64_t)s->backoff_max_ms;
        if (!lua_istable(L, b)) {
            errf(err, errlen, "settings.backoff must be a table { base_ms = ..., max_ms = ... }");
            goto out;
        }
        warn_unknown(L, b, p->path, "settings.backoff", known_backoff);
        if (setting_int(L, b, "settings.backoff", "base_ms", 0, 3600000, &base, err, errlen) < 0 ||
            setting_int(L, b, "settings.backoff", "max_ms", 0, 3600000, &max, err, errlen) < 0)
            goto out;
        if (max < base) {
            errf(err, errlen, "settings.backoff.max_ms must not be below base_ms");
            goto out;
        }
        s->backoff_base_ms = (uint64_t)base;
        s->backoff_max_ms = (uint64_t)max;
    }
    lua_pop(L, 1);

    lua_getfield(L, t, "limits");
    if (!lua_isnil(L, -1)) {
        int l = lua_gettop(L);
        int64_t ins = (int64_t)s->handler_instructions, ms = (int64_t)s->handler_time_ms;
        int64_t mb = (int64_t)(s->memory_limit >> 20);
        if (!lua_istable(L, l)) {
            errf(err, errlen, "settings.limits must be a table");
            goto out;
        }
        warn_unknown(L, l, p->path, "settings.limits", known_limits);
        if (setting_int(L, l, "settings.limits", "instructions", 10000, 1000000000, &ins, err,
                        errlen) < 0 ||
            setting_int(L, l, "settings.limits", "time_ms", 1, 10000, &ms, err, errlen) < 0 ||
            setting_int(L, l, "settings.limits", "memory_mb", 4, 4096, &mb, err, errlen) < 0)
            goto out;
        s->handler_instructions = (uint64_t)ins;
        s->handler_time_ms = (uint64_t)ms;
        s->memory_limit = (size_t)mb << 20;
        if (sandbox_memory(p->sandbox) > s->memory_limit) {
            errf(err, errlen, "the policy already uses more than settings.limits.memory_mb");
            goto out;
        }
    }
    lua_pop(L, 1);
    rc = 0;
out:
    lua_settop(L, t - 1);
    return rc;
}

/* ---- handlers ------------------------------------------------------------------ */

/* Reads the returned table's keys into handler refs. */
static int read_handlers(policy_t *p, lua_State *L, int policy, char *err, size_t errlen)
{
    int exact[N_STATUS], klass[6], deflt = LUA_NOREF;
    for (int i = 0; i < N_STATUS; i++)
        exact[i] = LUA_NOREF;
    for (int i = 0; i < 6; i++)
        klass[i] = LUA_NOREF;

    lua_pushnil(L);
    while (lua_next(L, policy) != 0) {
        int *slot = NULL;
        char name[32];
        if (lua_type(L, -2) == LUA_TNUMBER) {
            lua_Integer s = lua_isinteger(L, -2) ? lua_tointeger(L, -2) : 0;
            if (s < 100 || s > 599) {
                errf(err, errlen, "handler key %g is not a status from 100 to 599",
                     lua_tonumber(L, -2));
                return -1;
            }
            slot = &exact[s];
            snprintf(name, sizeof name, "[%d]", (int)s);
        } else if (lua_type(L, -2) == LUA_TSTRING) {
            const char *k = lua_tostring(L, -2);
            if (strlen(k) == 3 && k[0] >= '1' && k[0] <= '5' && k[1] == 'x' && k[2] == 'x') {
                slot = &klass[k[0] - '0'];
            } else if (strcmp(k, "default") == 0) {
                slot = &deflt;
            } else if (strcmp(k, "error") == 0) {
                slot = &p->error_ref;
            } else if (strcmp(k, "settings") == 0) {
                lua_pop(L, 1);
                continue;
            } else if (strcmp(k, "tests") == 0) {
                if (!lua_istable(L, -1)) {
                    errf(err, errlen, "tests must be a list of test tables");
                    return -1;
                }
                lua_pushvalue(L, -1);
                p->tests_ref = luaL_ref(L, LUA_REGISTRYINDEX);
                lua_pop(L, 1);
                continue;
            } else if (strlen(k) == 3 && k[0] >= '1' && k[0] <= '5' && k[1] >= '0' &&
                       k[1] <= '9' && k[2] >= '0' && k[2] <= '9') {
                errf(err, errlen, "handler key \"%s\" is a string: write [%s], a number", k, k);
                return -1;
            } else {
                log_record_t *r = log_begin(LOG_WARN, "unknown policy key ignored");
                log_str(r, "policy", p->path);
                log_str(r, "key", k);
                log_end(r);
                lua_pop(L, 1);
                continue;
            }
            snprintf(name, sizeof name, "%s", k);
        } else {
            errf(err, errlen, "policy keys are statuses, classes (\"4xx\"), default, error, "
                              "settings or tests; found a %s key",
                 luaL_typename(L, -2));
            return -1;
        }
        if (!lua_isfunction(L, -1)) {
            errf(err, errlen, "handler %s must be a function, not a %s", name,
                 luaL_typename(L, -1));
            return -1;
        }
        *slot = luaL_ref(L, LUA_REGISTRYINDEX); /* pops the function */
    }
    for (int s = 100; s < N_STATUS; s++)
        p->handler[s] = exact[s] != LUA_NOREF ? exact[s]
                        : klass[s / 100] != LUA_NOREF ? klass[s / 100]
                                                      : deflt;
    return 0;
}

/* ---- loading ------------------------------------------------------------------- */

static char *read_file(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        errf(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char *data = malloc(MAX_POLICY_BYTES + 1);
    size_t n = data ? fread(data, 1, MAX_POLICY_BYTES + 1, f) : 0;
    int failed = data == NULL || ferror(f);
    fclose(f);
    if (failed || n > MAX_POLICY_BYTES) {
        errf(err, errlen, "%s: %s", path, failed ? "cannot read" : "larger than 4 MiB");
        free(data);
        return NULL;
    }
    *len = n;
    return data;
}

policy_t *policy_load(const char *path, char *err, size_t errlen)
{
    size_t len = 0;
    char *src = NULL;
    policy_t *p = calloc(1, sizeof *p);
    if (p == NULL) {
        errf(err, errlen, "out of memory");
        return NULL;
    }
    p->refs = 1;
    p->error_ref = p->tests_ref = LUA_NOREF;
    for (int i = 0; i < N_STATUS; i++)
        p->handler[i] = LUA_NOREF;
    p->settings = DEFAULTS;
    p->path = strdup(path);
    sandbox_limits_t limits = limits_of(&DEFAULTS);
    p->sandbox = sandbox_new(&limits);
    if (p->path == NULL || p->sandbox == NULL) {
        errf(err, errlen, "out of memory");
        goto fail;
    }
    p->ctx.settings = &p->settings;
    if (getrandom(p->ctx.rng, sizeof p->ctx.rng, 0) != sizeof p->ctx.rng)
        p->ctx.rng[0] = clock_now_ns();
    p->ctx.rng[1] |= 1;
    sandbox_set_context(p->sandbox, &p->ctx);
    lua_State *L = sandbox_state(p->sandbox);
    lua_api_open(L);

    src = read_file(path, &len, err, errlen);
    if (src == NULL)
        goto fail;
    char chunkname[1024];
    snprintf(chunkname, sizeof chunkname, "@%s", path);
    if (luaL_loadbufferx(L, src, len, chunkname, "t") != LUA_OK) {
        first_line(lua_tostring(L, -1), err, errlen);
        goto fail;
    }
    sandbox_status_t st = sandbox_call(p->sandbox, 0, 1);
    if (st != SANDBOX_OK) {
        first_line(lua_tostring(L, -1), err, errlen);
        goto fail;
    }
    if (!lua_istable(L, -1)) {
        errf(err, errlen, "%s: the policy must return a table (it returned a %s)", path,
             luaL_typename(L, -1));
        goto fail;
    }
    int t = lua_gettop(L);
    char why[400];
    if (read_settings(p, L, t, why, sizeof why) < 0 ||
        read_handlers(p, L, t, why, sizeof why) < 0) {
        errf(err, errlen, "%s: %s", path, why);
        goto fail;
    }
    lua_settop(L, 0);
    limits = limits_of(&p->settings);
    sandbox_set_limits(p->sandbox, &limits);
    free(src);
    return p;

fail:
    free(src);
    policy_release(p);
    return NULL;
}

/* ---- deciding ------------------------------------------------------------------- */

const policy_settings_t *policy_settings(const policy_t *p)
{
    return &p->settings;
}

const char *policy_path(const policy_t *p)
{
    return p->path;
}

int policy_handles(const policy_t *p, int status)
{
    return status >= 0 && status < N_STATUS && p->handler[status] != LUA_NOREF;
}

int policy_handles_errors(const policy_t *p)
{
    return p->error_ref != LUA_NOREF;
}

uint64_t policy_backoff_ms(policy_t *p, int attempt)
{
    return lua_api_backoff(&p->ctx, attempt);
}

/* Calls the handler for `in`. Returns the sandbox status; on success the
 * verdict is in `out`, else `msg` (and `trace`) say what went wrong. */
static sandbox_status_t call_handler(policy_t *p, int ref, const policy_input_t *in, verdict_t *out,
                                     char *msg, size_t msglen, buf_t *trace)
{
    lua_State *L = sandbox_state(p->sandbox);
    int top = lua_gettop(L);
    p->ctx.in = in;
    lua_api_push_views(L, in); /* req at top+1, res (or err) at top+2 */
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    lua_pushvalue(L, top + 1);
    lua_pushvalue(L, top + 2);
    sandbox_status_t st = sandbox_call(p->sandbox, 2, 1);
    if (st == SANDBOX_OK) {
        if (lua_api_verdict(L, -1, out, msg, msglen) < 0)
            st = SANDBOX_ERROR;
    } else {
        const char *text = lua_tostring(L, -1);
        first_line(text, msg, msglen);
        if (trace != NULL && text != NULL)
            buf_puts(trace, text);
        if (st == SANDBOX_MEMORY && strchr(msg, ':') == NULL) {
            /* Lua raises "not enough memory" with no location: name the handler. */
            lua_Debug ar;
            lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
            if (lua_getinfo(L, ">S", &ar))
                snprintf(msg, msglen, "%s:%d: not enough memory (in the handler defined here)",
                         ar.short_src, ar.linedefined);
        }
    }
    lua_api_end_views(L, top + 1, top + 2);
    lua_settop(L, top);
    p->ctx.in = NULL;
    return st;
}

void policy_decide(policy_t *p, const policy_input_t *in, verdict_t *out)
{
    int ref = in->res != NULL ? p->handler[in->res->status] : p->error_ref;
    out->kind = VERDICT_PASS;
    if (ref == LUA_NOREF)
        return;
    char msg[512];
    buf_t trace = BUF_INIT;
    msg[0] = '\0';
    sandbox_status_t st = call_handler(p, ref, in, out, msg, sizeof msg, &trace);
    if (st == SANDBOX_OK) {
        buf_free(&trace);
        return;
    }
    /* Fail open: the response goes through as it is. */
    verdict_reset(out);
    out->failure = trace.len == 0 && st == SANDBOX_ERROR ? "verdict" : sandbox_status_name(st);
    log_record_t *r = log_begin(LOG_ERROR, "policy handler failed; passing the response through");
    log_str(r, "request_id", in->request_id);
    if (in->res != NULL)
        log_int(r, "status", in->res->status);
    else
        log_str(r, "error_kind", in->err_kind);
    log_str(r, "kind", out->failure);
    log_str(r, "error", msg);
    if (trace.len > 0)
        log_strn(r, "traceback", trace.data, trace.len);
    log_end(r);
    buf_free(&trace);
}

void verdict_reset(verdict_t *v)
{
    buf_free(&v->headers);
    buf_free(&v->body);
    *v = (verdict_t)VERDICT_INIT;
}

/* ---- the policy's own tests ---------------------------------------------------- */

/* Builds a head from a test's req or res table at `idx`. */
static http_head_t *test_head(lua_State *L, int idx, int is_res)
{
    http_head_t *h = calloc(1, sizeof *h);
    if (h == NULL)
        return NULL;
    h->content_length = -1;
    h->version = 11;
    size_t n_headers = 0;
    lua_getfield(L, idx, "headers");
    if (lua_istable(L, -1)) {
        lua_pushnil(L);
        while (lua_next(L, -2) != 0) {
            n_headers++;
            lua_pop(L, 1);
        }
    }
    h->headers = calloc(n_headers + 1, sizeof *h->headers);
    /* Every string goes into the arena first; pointers are taken after, as
     * appending may move it. */
    buf_t *a = &h->arena;
    size_t method_off = 0, target_off = 0;
    if (!is_res) {
        lua_getfield(L, idx, "method");
        const char *m = lua_isstring(L, -1) ? lua_tostring(L, -1) : "GET";
        method_off = a->len;
        buf_append(a, m, strlen(m) + 1);
        lua_getfield(L, idx, "path");
        const char *path = lua_isstring(L, -1) ? lua_tostring(L, -1) : "/";
        target_off = a->len;
        h->target_len = strlen(path);
        buf_append(a, path, h->target_len + 1);
        lua_pop(L, 2);
        h->method = strcmp(m, "GET") == 0    ? HTTP_M_GET
                    : strcmp(m, "HEAD") == 0 ? HTTP_M_HEAD
                    : strcmp(m, "POST") == 0 ? HTTP_M_POST
                                             : HTTP_M_OTHER;
    } else {
        lua_getfield(L, idx, "status");
        h->status = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
    }
    if (lua_istable(L, -1) && h->headers != NULL) {
        lua_pushnil(L);
        while (lua_next(L, -2) != 0) {
            if (lua_type(L, -2) == LUA_TSTRING && lua_isstring(L, -1)) {
                http_header_t *f = &h->headers[h->n_headers++];
                size_t kn, vn;
                const char *k = lua_tolstring(L, -2, &kn);
                const char *v = lua_tolstring(L, -1, &vn);
                f->name_off = (uint32_t)a->len;
                f->name_len = (uint32_t)kn;
                buf_append(a, k, kn);
                f->value_off = (uint32_t)a->len;
                f->value_len = (uint32_t)vn;
                buf_append(a, v, vn);
            }
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    buf_append(a, "", 1);
    if (!is_res) {
        h->method_name = a->data + method_off;
        h->target = a->data + target_off;
    } else {
        h->method_name = h->target = h->reason = "";
    }
    for (size_t i = 0; i < h->n_headers; i++) {
        h->headers[i].name = a->data + h->headers[i].name_off;
        h->headers[i].value = a->data + h->headers[i].value_off;
    }
    return h;
}

/* Whether `name` is one of the '\n'-terminated names in `alerts`. */
static int raised_alert(const buf_t *alerts, const char *name)
{
    size_t n = strlen(name), i = 0;
    while (i < alerts->len) {
        const char *line = alerts->data + i;
        size_t len = (size_t)((const char *)memchr(line, '\n', alerts->len - i) - line);
        if (len == n && memcmp(line, name, n) == 0)
            return 1;
        i += len + 1;
    }
    return 0;
}

static const char *verdict_name(verdict_kind_t k)
{
    return k == VERDICT_RETRY ? "retry" : k == VERDICT_RESPOND ? "respond" : "pass";
}

/* Runs test `i` (the table on top). Returns 1 when it passed; `why` says why
 * not. */
static int run_test(policy_t *p, lua_State *L, int t, char *why, size_t whylen)
{
    http_head_t *req = NULL, *res = NULL;
    policy_input_t in = {0};
    verdict_t v = VERDICT_INIT;
    int passed = 0;
    size_t body_len = 0;

    lua_getfield(L, t, "req");
    if (!lua_isnil(L, -1) && !lua_istable(L, -1)) {
        errf(why, whylen, "req must be a table");
        goto out;
    }
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
    }
    req = test_head(L, lua_gettop(L), 0);
    lua_getfield(L, t, "res");
    lua_getfield(L, t, "err");
    if (lua_istable(L, -2)) {
        res = test_head(L, lua_gettop(L) - 1, 1);
        lua_getfield(L, -2, "json");
        lua_getfield(L, -3, "body");
        if (!lua_isnil(L, -2)) {
            lua_getglobal(L, "errord");
            lua_getfield(L, -1, "json");
            lua_getfield(L, -1, "encode");
            lua_pushvalue(L, -5);
            if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
                errf(why, whylen, "res.json: %s", lua_tostring(L, -1));
                goto out;
            }
            lua_replace(L, -5); /* the encoded json stands in for the body */
            lua_pop(L, 2);
        }
        in.body = lua_tolstring(L, lua_isnil(L, -2) ? -1 : -2, &body_len);
        in.body_len = body_len;
        if (res == NULL || res->status < 100 || res->status > 599) {
            errf(why, whylen, "res.status must be a status from 100 to 599");
            goto out;
        }
    } else if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "kind");
        lua_getfield(L, -2, "message");
        in.err_kind = lua_isstring(L, -2) ? lua_tostring(L, -2) : "connect";
        in.err_message = lua_isstring(L, -1) ? lua_tostring(L, -1) : "";
    } else {
        errf(why, whylen, "a test needs res = { status = ... } or err = { kind = ... }");
        goto out;
    }
    in.req = req;
    in.res = res;
    in.request_id = "test";
    lua_getfield(L, t, "attempt");
    in.attempt = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 1;
    lua_pop(L, 1);

    int ref = res != NULL ? p->handler[res->status] : p->error_ref;
    buf_clear(&p->ctx.test_alerts);
    p->ctx.test_logs = 0;
    lua_getfield(L, t, "counts"); /* what errord.count() has seen before the test */
    lua_api_reset_test_counts(L, -1);
    lua_pop(L, 1);
    if (ref != LUA_NOREF) {
        char msg[400];
        buf_t trace = BUF_INIT;
        sandbox_status_t st = call_handler(p, ref, &in, &v, msg, sizeof msg, &trace);
        buf_free(&trace);
        if (st != SANDBOX_OK) {
            errf(why, whylen, "handler failed: %s", msg);
            goto out;
        }
    }

    lua_getfield(L, t, "expect");
    int e = lua_gettop(L);
    if (!lua_istable(L, e)) {
        errf(why, whylen, "expect must be a table such as { verdict = \"retry\" }");
        goto out;
    }
    lua_getfield(L, e, "verdict");
    if (lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), verdict_name(v.kind)) != 0) {
        errf(why, whylen, "expected verdict %s, got %s", lua_tostring(L, -1),
             verdict_name(v.kind));
        goto out;
    }
    lua_getfield(L, e, "status");
    if (lua_isinteger(L, -1) && (v.kind != VERDICT_RESPOND || v.status != lua_tointeger(L, -1))) {
        errf(why, whylen, "expected respond with status %d, got %s %d",
             (int)lua_tointeger(L, -1), verdict_name(v.kind), v.status);
        goto out;
    }
    lua_getfield(L, e, "reason");
    if (lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), v.reason) != 0) {
        errf(why, whylen, "expected reason \"%s\", got \"%s\"", lua_tostring(L, -1), v.reason);
        goto out;
    }
    lua_getfield(L, e, "alert");
    if (lua_type(L, -1) == LUA_TSTRING) {
        if (!raised_alert(&p->ctx.test_alerts, lua_tostring(L, -1))) {
            errf(why, whylen, "expected alert %s, it was not raised", lua_tostring(L, -1));
            goto out;
        }
    } else if (lua_isboolean(L, -1) && (p->ctx.test_alerts.len > 0) != lua_toboolean(L, -1)) {
        errf(why, whylen, "expected %s", lua_toboolean(L, -1) ? "an alert, none was raised"
                                                             : "no alert, one was raised");
        goto out;
    }
    passed = 1;
out:
    verdict_reset(&v);
    http_head_free(req);
    http_head_free(res);
    return passed;
}

int policy_run_tests(policy_t *p, void (*report)(const policy_test_result_t *r, void *arg),
                     void *arg, char *err, size_t errlen)
{
    if (p->tests_ref == LUA_NOREF)
        return 0;
    lua_State *L = sandbox_state(p->sandbox);
    int top = lua_gettop(L), failed = 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->tests_ref);
    int tests = lua_gettop(L);
    lua_Integer n = (lua_Integer)lua_rawlen(L, tests);
    p->ctx.testing = 1;
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, tests, i);
        int t = lua_gettop(L);
        if (!lua_istable(L, t)) {
            errf(err, errlen, "tests[%lld] is a %s, not a test table", (long long)i,
                 luaL_typename(L, t));
            failed = -1;
            break;
        }
        lua_getfield(L, t, "name");
        char name[128];
        snprintf(name, sizeof name, "%s",
                 lua_isstring(L, -1) ? lua_tostring(L, -1) : "(unnamed test)");
        if (!lua_isstring(L, -1))
            snprintf(name, sizeof name, "tests[%lld]", (long long)i);
        char why[512] = "";
        int ok = run_test(p, L, t, why, sizeof why);
        failed += !ok;
        if (report != NULL) {
            policy_test_result_t r = {name, ok, why};
            report(&r, arg);
        }
        lua_settop(L, tests);
    }
    p->ctx.testing = 0;
    buf_free(&p->ctx.test_alerts);
    lua_settop(L, top);
    return failed;
}

/* ---- lifetime ------------------------------------------------------------------- */

void policy_hold(policy_t *p)
{
    p->refs++;
}

void policy_release(policy_t *p)
{
    if (p == NULL || --p->refs > 0)
        return;
    sandbox_free(p->sandbox);
    buf_free(&p->ctx.test_alerts);
    free(p->path);
    free(p);
}
