/* policy: a user's Lua policy in a sandbox (see policy.h).
 *
 * Two rules keep a hostile or broken policy from taking errord down. Every
 * read of a table the policy made is raw (lua_rawget, lua_next), so none of
 * its metamethods runs outside a bounded call. And every step that touches
 * the Lua state runs in a protected call, so even running out of the
 * state's memory is an error errord handles, never a panic. */
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
    .deadline_ms = 15000,
    .try_timeout_ms = 0,
    .retry_after_max_ms = 60000,
    .budget_on = 1,
    .budget_ratio = 0.2,
    .budget_min_per_s = 5,
    .resolve_after_ms = 300000,
    .repeat_ms = 60000,
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

/* The first line of a Lua error (a traceback may follow it). */
static void first_line(const char *msg, char *out, size_t n)
{
    size_t len = strcspn(msg ? msg : "", "\n");
    snprintf(out, n, "%.*s", (int)len, msg ? msg : "(no message)");
}

/* Pushes t[k] without running metamethods; returns its type. */
static int rawfield(lua_State *L, int t, const char *k)
{
    t = lua_absindex(L, t);
    lua_pushstring(L, k);
    return lua_rawget(L, t);
}

/* Raises for any string key of the table at `t` not in `known`, or (with
 * `warn`) only logs it. */
static void check_known(lua_State *L, int t, const char *path, const char *where,
                        const char *const *known, int warn)
{
    t = lua_absindex(L, t);
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        lua_pop(L, 1);
        const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        int found = 0;
        for (const char *const *p = known; k != NULL && *p != NULL && !found; p++)
            found = strcmp(k, *p) == 0;
        if (found)
            continue;
        if (!warn)
            luaL_error(L, "%s: unknown key '%s'", where, k ? k : luaL_typename(L, -1));
        log_record_t *r = log_begin(LOG_WARN, "unknown setting ignored");
        log_str(r, "policy", path);
        log_str(r, "setting", where);
        log_str(r, "key", k ? k : luaL_typename(L, -1));
        log_end(r);
    }
}

/* ---- settings ------------------------------------------------------------------ */

/* Reads t.name as an integer in [min, max] into *out when present; raises
 * otherwise. */
static void setting_int(lua_State *L, int t, const char *where, const char *name, int64_t min,
                        int64_t max, int64_t *out)
{
    rawfield(L, t, name);
    if (!lua_isnil(L, -1)) {
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < min || lua_tointeger(L, -1) > max)
            luaL_error(L, "%s.%s must be an integer from %I to %I", where, name,
                       (lua_Integer)min, (lua_Integer)max);
        *out = lua_tointeger(L, -1);
    }
    lua_pop(L, 1);
}

static char *copy_string(lua_State *L, const char *s)
{
    char *c = strdup(s);
    if (c == NULL)
        luaL_error(L, "out of memory");
    return c;
}

/* settings.alerts: a list of { kind = ..., url = ..., ... }. */
static void read_sinks(policy_t *p, lua_State *L, int t)
{
    static const char *const known[] = {"kind", "url", "headers", "routing_key", "rate_per_min",
                                        "queue", "timeout_ms", NULL};
    static const char *const kinds[] = {"alertmanager", "webhook", "slack", "pagerduty", NULL};
    if (!lua_istable(L, t))
        luaL_error(L, "settings.alerts must be a list of { kind = ..., url = ... }");
    luaL_checkstack(L, 16, "settings.alerts");
    size_t n = (size_t)lua_rawlen(L, t);
    if (n > 32)
        luaL_error(L, "settings.alerts: at most 32 sinks");
    policy_settings_t *s = &p->settings;
    s->sinks = calloc(n + 1, sizeof *s->sinks);
    if (s->sinks == NULL)
        luaL_error(L, "out of memory");
    for (size_t i = 0; i < n; i++) {
        char where[48];
        snprintf(where, sizeof where, "settings.alerts[%zu]", i + 1);
        lua_rawgeti(L, t, (lua_Integer)i + 1);
        int e = lua_gettop(L);
        if (!lua_istable(L, e))
            luaL_error(L, "%s must be a table { kind = ..., url = ... }", where);
        check_known(L, e, p->path, where, known, 0);
        policy_sink_t *k = &s->sinks[i];
        s->n_sinks = i + 1; /* owned from here on, for policy_release */
        k->rate_per_min = 60;
        k->queue = 256;
        k->timeout_ms = 5000;
        if (rawfield(L, e, "kind") != LUA_TSTRING)
            luaL_error(L, "%s.kind must be alertmanager, webhook, slack or pagerduty", where);
        int kind = -1;
        for (int j = 0; kinds[j] != NULL; j++)
            if (strcmp(lua_tostring(L, -1), kinds[j]) == 0)
                kind = j;
        if (kind < 0)
            luaL_error(L, "%s.kind must be alertmanager, webhook, slack or pagerduty", where);
        k->kind = (sink_kind_t)kind;
        if (rawfield(L, e, "url") != LUA_TSTRING ||
            (strncmp(lua_tostring(L, -1), "http://", 7) != 0 &&
             strncmp(lua_tostring(L, -1), "https://", 8) != 0))
            luaL_error(L, "%s.url must be an http:// or https:// URL", where);
        k->url = copy_string(L, lua_tostring(L, -1));
        if (rawfield(L, e, "routing_key") == LUA_TSTRING)
            k->routing_key = copy_string(L, lua_tostring(L, -1));
        else if (k->kind == SINK_PAGERDUTY)
            luaL_error(L, "%s: a pagerduty sink needs routing_key", where);
        if (rawfield(L, e, "headers") != LUA_TNIL) {
            int hdr = lua_gettop(L);
            if (!lua_istable(L, hdr))
                luaL_error(L, "%s.headers must map names to strings", where);
            buf_t b = BUF_INIT;
            lua_pushnil(L);
            while (lua_next(L, hdr) != 0) {
                const char *name = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
                const char *val = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
                int ok = name != NULL && val != NULL && name[0] != '\0';
                for (const char *c = name; ok && *c; c++)
                    ok = (*c > 0x20 && *c < 0x7f && *c != ':');
                for (const char *c = val; ok && *c; c++)
                    ok = (*c >= 0x20 && *c != 0x7f) || *c == '\t';
                if (!ok) {
                    buf_free(&b);
                    luaL_error(L, "%s.headers: names and values must be valid header text", where);
                }
                buf_printf(&b, "%s: %s\r\n", name, val);
                lua_pop(L, 1);
            }
            if (b.len > 0 && buf_append(&b, "", 1) < 0) { /* a C string */
                buf_free(&b);
                luaL_error(L, "out of memory");
            }
            k->headers = b.data; /* owned; NULL when empty */
        }
        int64_t v = k->rate_per_min;
        setting_int(L, e, where, "rate_per_min", 1, 100000, &v);
        k->rate_per_min = (int)v;
        v = k->queue;
        setting_int(L, e, where, "queue", 1, 100000, &v);
        k->queue = (int)v;
        v = (int64_t)k->timeout_ms;
        setting_int(L, e, where, "timeout_ms", 10, 600000, &v);
        k->timeout_ms = (uint64_t)v;
        lua_settop(L, e - 1);
    }
}

static void read_settings(policy_t *p, lua_State *L, int policy)
{
    static const char *const known[] = {"attempts",       "backoff",           "body_limit",
                                        "replay_limit",   "limits",            "deadline_ms",
                                        "try_timeout_ms", "retry_after_max_ms", "budget",
                                        "alerts",         "resolve_after_ms",  "repeat_ms",
                                        NULL};
    static const char *const known_backoff[] = {"base_ms", "max_ms", NULL};
    static const char *const known_budget[] = {"ratio", "min_per_s", NULL};
    static const char *const known_limits[] = {"instructions", "time_ms", "memory_mb", NULL};
    policy_settings_t *s = &p->settings;
    int64_t v;

    *s = DEFAULTS;
    if (rawfield(L, policy, "settings") == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    int t = lua_gettop(L);
    if (!lua_istable(L, t))
        luaL_error(L, "settings must be a table");
    check_known(L, t, p->path, "settings", known, 1);
    v = s->attempts;
    setting_int(L, t, "settings", "attempts", 1, 10, &v);
    s->attempts = (int)v;
    v = (int64_t)s->body_limit;
    setting_int(L, t, "settings", "body_limit", 0, 16 << 20, &v);
    s->body_limit = (size_t)v;
    v = (int64_t)s->replay_limit;
    setting_int(L, t, "settings", "replay_limit", 0, 1 << 30, &v);
    s->replay_limit = (size_t)v;
    v = (int64_t)s->deadline_ms;
    setting_int(L, t, "settings", "deadline_ms", 0, 3600000, &v);
    s->deadline_ms = (uint64_t)v;
    v = (int64_t)s->try_timeout_ms;
    setting_int(L, t, "settings", "try_timeout_ms", 0, 3600000, &v);
    s->try_timeout_ms = (uint64_t)v;
    v = (int64_t)s->retry_after_max_ms;
    setting_int(L, t, "settings", "retry_after_max_ms", 0, 3600000, &v);
    s->retry_after_max_ms = (uint64_t)v;

    v = (int64_t)s->resolve_after_ms;
    setting_int(L, t, "settings", "resolve_after_ms", 100, 86400000, &v);
    s->resolve_after_ms = (uint64_t)v;
    v = (int64_t)s->repeat_ms;
    setting_int(L, t, "settings", "repeat_ms", 100, 86400000, &v);
    s->repeat_ms = (uint64_t)v;
    if (rawfield(L, t, "alerts") != LUA_TNIL)
        read_sinks(p, L, lua_gettop(L));
    lua_pop(L, 1);

    int bt = rawfield(L, t, "budget");
    if (bt == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
        s->budget_on = 0;
    } else if (bt == LUA_TTABLE) {
        int b = lua_gettop(L);
        check_known(L, b, p->path, "settings.budget", known_budget, 1);
        rawfield(L, b, "ratio");
        rawfield(L, b, "min_per_s");
        if ((!lua_isnil(L, -2) && (!lua_isnumber(L, -2) || lua_tonumber(L, -2) < 0 ||
                                   lua_tonumber(L, -2) > 100)) ||
            (!lua_isnil(L, -1) && (!lua_isnumber(L, -1) || lua_tonumber(L, -1) < 0 ||
                                   lua_tonumber(L, -1) > 1000000)))
            luaL_error(L, "settings.budget is { ratio = 0 to 100, min_per_s = 0 or more }, "
                          "or false");
        if (!lua_isnil(L, -2))
            s->budget_ratio = lua_tonumber(L, -2);
        if (!lua_isnil(L, -1))
            s->budget_min_per_s = lua_tonumber(L, -1);
        lua_pop(L, 2);
    } else if (bt != LUA_TNIL) {
        luaL_error(L, "settings.budget is { ratio = ..., min_per_s = ... }, or false");
    }
    lua_pop(L, 1);

    if (rawfield(L, t, "backoff") != LUA_TNIL) {
        int b = lua_gettop(L);
        int64_t base = (int64_t)s->backoff_base_ms, max = (int64_t)s->backoff_max_ms;
        if (!lua_istable(L, b))
            luaL_error(L, "settings.backoff must be a table { base_ms = ..., max_ms = ... }");
        check_known(L, b, p->path, "settings.backoff", known_backoff, 1);
        setting_int(L, b, "settings.backoff", "base_ms", 0, 3600000, &base);
        setting_int(L, b, "settings.backoff", "max_ms", 0, 3600000, &max);
        if (max < base)
            luaL_error(L, "settings.backoff.max_ms must not be below base_ms");
        s->backoff_base_ms = (uint64_t)base;
        s->backoff_max_ms = (uint64_t)max;
    }
    lua_pop(L, 1);

    if (rawfield(L, t, "limits") != LUA_TNIL) {
        int l = lua_gettop(L);
        int64_t ins = (int64_t)s->handler_instructions, ms = (int64_t)s->handler_time_ms;
        int64_t mb = (int64_t)(s->memory_limit >> 20);
        if (!lua_istable(L, l))
            luaL_error(L, "settings.limits must be a table");
        check_known(L, l, p->path, "settings.limits", known_limits, 1);
        setting_int(L, l, "settings.limits", "instructions", 10000, 1000000000, &ins);
        setting_int(L, l, "settings.limits", "time_ms", 1, 10000, &ms);
        setting_int(L, l, "settings.limits", "memory_mb", 4, 4096, &mb);
        s->handler_instructions = (uint64_t)ins;
        s->handler_time_ms = (uint64_t)ms;
        s->memory_limit = (size_t)mb << 20;
        if (sandbox_memory(p->sandbox) > s->memory_limit)
            luaL_error(L, "the policy already uses more than settings.limits.memory_mb");
    }
    lua_settop(L, t - 1);
}

/* ---- handlers ------------------------------------------------------------------ */

/* Reads the returned table's keys into handler refs; raises on a bad key. */
static void read_handlers(policy_t *p, lua_State *L, int policy)
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
                lua_pushvalue(L, -2);
                luaL_error(L, "handler key %s is not a status from 100 to 599",
                           lua_tostring(L, -1)); /* the copy may become a string */
            }
            slot = &exact[s];
            snprintf(name, sizeof name, "[%d]", (int)s);
        } else if (lua_type(L, -2) == LUA_TSTRING) {
            const char *k = lua_tostring(L, -2);
            size_t n = strlen(k);
            if (n == 3 && k[0] >= '1' && k[0] <= '5' && k[1] == 'x' && k[2] == 'x') {
                slot = &klass[k[0] - '0'];
            } else if (strcmp(k, "default") == 0) {
                slot = &deflt;
            } else if (strcmp(k, "error") == 0) {
                slot = &p->error_ref;
            } else if (strcmp(k, "settings") == 0) {
                lua_pop(L, 1);
                continue;
            } else if (strcmp(k, "tests") == 0) {
                if (!lua_istable(L, -1))
                    luaL_error(L, "tests must be a list of test tables");
                p->tests_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* pops it */
                continue;
            } else if (n == 3 && k[0] >= '1' && k[0] <= '5' && k[1] >= '0' && k[1] <= '9' &&
                       k[2] >= '0' && k[2] <= '9') {
                luaL_error(L, "handler key \"%s\" is a string: write [%s], a number", k, k);
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
            luaL_error(L, "policy keys are statuses, classes (\"4xx\"), default, error, "
                          "settings or tests; found a %s key",
                       luaL_typename(L, -2));
        }
        if (!lua_isfunction(L, -1))
            luaL_error(L, "handler %s must be a function, not a %s", name, luaL_typename(L, -1));
        *slot = luaL_ref(L, LUA_REGISTRYINDEX); /* pops the function */
    }
    for (int s = 100; s < N_STATUS; s++)
        p->handler[s] = exact[s] != LUA_NOREF ? exact[s]
                        : klass[s / 100] != LUA_NOREF ? klass[s / 100]
                                                      : deflt;
}

/* Protected: reads the policy table (2) into the policy (1). */
static int load_step(lua_State *L)
{
    policy_t *p = lua_touserdata(L, 1);
    if (!lua_istable(L, 2))
        luaL_error(L, "the policy must return a table (it returned a %s)", luaL_typename(L, 2));
    read_settings(p, L, 2);
    read_handlers(p, L, 2);
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

/* Protected: installs the API. */
static int open_step(lua_State *L)
{
    lua_api_open(L);
    return 0;
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
    lua_pushcfunction(L, open_step);
    if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
        errf(err, errlen, "out of memory");
        goto fail;
    }

    src = read_file(path, &len, err, errlen);
    if (src == NULL)
        goto fail;
    char chunkname[1024];
    snprintf(chunkname, sizeof chunkname, "@%s", path);
    if (luaL_loadbufferx(L, src, len, chunkname, "t") != LUA_OK) {
        first_line(lua_tostring(L, -1), err, errlen);
        goto fail;
    }
    if (sandbox_call(p->sandbox, 0, 1) != SANDBOX_OK) {
        first_line(lua_tostring(L, -1), err, errlen);
        goto fail;
    }
    lua_pushcfunction(L, load_step);
    lua_insert(L, -2);
    lua_pushlightuserdata(L, p);
    lua_insert(L, -2);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
        char why[512];
        first_line(lua_tostring(L, -1), why, sizeof why);
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

/* Protected: pushes the views of the input (1). */
static int views_step(lua_State *L)
{
    lua_api_push_views(L, lua_touserdata(L, 1));
    return 2;
}

/* Calls the handler `ref` for `in`. Returns the sandbox status; on success
 * the verdict is in `out`, else `msg` (and `trace`) say what went wrong. */
static sandbox_status_t call_handler(policy_t *p, int ref, const policy_input_t *in, verdict_t *out,
                                     char *msg, size_t msglen, buf_t *trace)
{
    lua_State *L = sandbox_state(p->sandbox);
    int top = lua_gettop(L);
    if (!lua_checkstack(L, 8)) {
        snprintf(msg, msglen, "out of memory");
        return SANDBOX_MEMORY;
    }
    lua_pushcfunction(L, views_step);
    lua_pushlightuserdata(L, (void *)in);
    if (lua_pcall(L, 1, 2, 0) != LUA_OK) { /* req at top+1, res (or err) at top+2 */
        lua_settop(L, top);
        snprintf(msg, msglen, "out of memory before the handler ran");
        return SANDBOX_MEMORY;
    }
    p->ctx.in = in;
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    lua_pushvalue(L, top + 1);
    lua_pushvalue(L, top + 2);
    sandbox_status_t st = sandbox_call(p->sandbox, 2, 1);
    p->ctx.in = NULL;
    if (st == SANDBOX_OK) {
        if (lua_api_verdict(L, -1, out, msg, msglen) < 0)
            st = SANDBOX_ERROR;
    } else {
        const char *text = lua_tostring(L, -1);
        first_line(text, msg, msglen);
        if (trace != NULL && text != NULL)
            buf_puts(trace, text);
        if (st == SANDBOX_MEMORY && strchr(msg, ':') == NULL) {
            /* Lua says "not enough memory" with no location: name the handler. */
            lua_Debug ar;
            lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
            if (lua_getinfo(L, ">S", &ar))
                snprintf(msg, msglen, "%s:%d: not enough memory (in the handler defined here)",
                         ar.short_src, ar.linedefined);
        }
    }
    lua_api_end_views(L, top + 1, top + 2);
    lua_settop(L, top);
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

/* One test being run: what it allocates in C lives here, so that the
 * caller frees it whatever the protected step did. */
typedef struct {
    policy_t *p;
    http_head_t *req;
    http_head_t *res;
    verdict_t v;
    int passed;
    char why[512];
} test_run_t;

#define TEST_FAIL(r, ...)                                       \
    do {                                                        \
        snprintf((r)->why, sizeof (r)->why, __VA_ARGS__);       \
        return 0;                                               \
    } while (0)

/* Builds a head from a test's req or res table at `idx` into *slot (which
 * owns it from the first allocation on). */
static void test_head(lua_State *L, int idx, int is_res, http_head_t **slot)
{
    http_head_t *h = calloc(1, sizeof *h);
    if (h == NULL)
        luaL_error(L, "out of memory");
    *slot = h;
    h->content_length = -1;
    h->version = 11;
    size_t n_headers = 0;
    int headers = rawfield(L, idx, "headers") == LUA_TTABLE ? lua_gettop(L) : 0;
    if (headers) {
        lua_pushnil(L);
        while (lua_next(L, headers) != 0) {
            n_headers++;
            lua_pop(L, 1);
        }
    }
    h->headers = calloc(n_headers + 1, sizeof *h->headers);
    if (h->headers == NULL)
        luaL_error(L, "out of memory");
    /* Every string goes into the arena first; pointers are taken after, as
     * appending may move it. */
    buf_t *a = &h->arena;
    size_t method_off = 0, target_off = 0;
    if (!is_res) {
        rawfield(L, idx, "method");
        const char *m = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "GET";
        method_off = a->len;
        buf_append(a, m, strlen(m) + 1);
        rawfield(L, idx, "path");
        const char *path = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "/";
        target_off = a->len;
        h->target_len = strlen(path);
        buf_append(a, path, h->target_len + 1);
        lua_pop(L, 2);
        static const struct {
            const char *name;
            http_method_t m;
        } methods[] = {{"GET", HTTP_M_GET},         {"HEAD", HTTP_M_HEAD},   {"POST", HTTP_M_POST},
                       {"PUT", HTTP_M_PUT},         {"DELETE", HTTP_M_DELETE},
                       {"OPTIONS", HTTP_M_OPTIONS}, {"PATCH", HTTP_M_PATCH}};
        for (size_t i = 0; i < sizeof methods / sizeof *methods; i++)
            if (strcmp(m, methods[i].name) == 0)
                h->method = methods[i].m;
    } else {
        rawfield(L, idx, "status");
        h->status = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 0;
        lua_pop(L, 1);
    }
    if (headers) {
        lua_pushnil(L);
        while (lua_next(L, headers) != 0) {
            if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING) {
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
    lua_pop(L, 1); /* headers */
    buf_append(a, "", 1);
    h->method_name = is_res ? "" : a->data + method_off;
    h->target = is_res ? "" : a->data + target_off;
    h->reason = "";
    for (size_t i = 0; i < h->n_headers; i++) {
        h->headers[i].name = a->data + h->headers[i].name_off;
        h->headers[i].value = a->data + h->headers[i].value_off;
    }
}

static const char *verdict_name(verdict_kind_t k)
{
    return k == VERDICT_RETRY ? "retry" : k == VERDICT_RESPOND ? "respond" : "pass";
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

/* Protected: the JSON text of the value at 1. */
static int encode_step(lua_State *L)
{
    lua_api_encode_json(L, 1);
    return 1;
}

/* Protected: runs the test table (2) for the run (1). Returns 0; r->passed
 * and r->why say how it went. */
static int test_step(lua_State *L)
{
    static const char *const known[] = {"name", "req", "res", "err", "attempt", "counts",
                                        "expect", NULL};
    static const char *const known_expect[] = {"verdict", "status", "reason", "alert", NULL};
    test_run_t *r = lua_touserdata(L, 1);
    policy_t *p = r->p;
    int t = 2;
    policy_input_t in = {0};
    size_t body_len = 0;

    check_known(L, t, p->path, "test", known, 0);
    int req = rawfield(L, t, "req") == LUA_TTABLE ? lua_gettop(L) : 0;
    if (!req && !lua_isnil(L, -1))
        TEST_FAIL(r, "req must be a table");
    if (req)
        test_head(L, req, 0, &r->req);
    else {
        lua_newtable(L);
        test_head(L, lua_gettop(L), 0, &r->req);
    }
    int res = rawfield(L, t, "res") == LUA_TTABLE ? lua_gettop(L) : 0;
    int err = rawfield(L, t, "err") == LUA_TTABLE ? lua_gettop(L) : 0;
    if (res) {
        test_head(L, res, 1, &r->res);
        if (r->res->status < 100 || r->res->status > 599)
            TEST_FAIL(r, "res.status must be a status from 100 to 599");
        if (rawfield(L, res, "json") != LUA_TNIL) {
            lua_pushcfunction(L, encode_step);
            lua_insert(L, -2);
            if (lua_pcall(L, 1, 1, 0) != LUA_OK)
                TEST_FAIL(r, "res.json: %s", lua_tostring(L, -1));
        } else {
            rawfield(L, res, "body");
        }
        if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
            TEST_FAIL(r, "res.body must be a string");
        in.body = lua_isnil(L, -1) ? "" : lua_tolstring(L, -1, &body_len);
        in.body_len = body_len;
    } else if (err) {
        rawfield(L, err, "kind");
        rawfield(L, err, "message");
        in.err_kind = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "connect";
        in.err_message = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
    } else {
        TEST_FAIL(r, "a test needs res = { status = ... } or err = { kind = ... }");
    }
    in.req = r->req;
    in.res = r->res;
    in.request_id = "test";
    rawfield(L, t, "attempt");
    in.attempt = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 1;
    lua_pop(L, 1);

    int ref = r->res != NULL ? p->handler[r->res->status] : p->error_ref;
    buf_clear(&p->ctx.test_alerts);
    p->ctx.test_logs = 0;
    rawfield(L, t, "counts"); /* what errord.count() has seen before the test */
    lua_api_reset_test_counts(L, -1);
    lua_pop(L, 1);
    if (ref != LUA_NOREF) {
        char msg[400];
        sandbox_status_t st = call_handler(p, ref, &in, &r->v, msg, sizeof msg, NULL);
        if (st != SANDBOX_OK)
            TEST_FAIL(r, "handler failed: %s", msg);
    }

    int e = rawfield(L, t, "expect") == LUA_TTABLE ? lua_gettop(L) : 0;
    if (!e)
        TEST_FAIL(r, "expect must be a table such as { verdict = \"retry\" }");
    check_known(L, e, p->path, "expect", known_expect, 0);
    rawfield(L, e, "verdict");
    if (lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), verdict_name(r->v.kind)) != 0)
        TEST_FAIL(r, "expected verdict %s, got %s", lua_tostring(L, -1), verdict_name(r->v.kind));
    rawfield(L, e, "status");
    if (lua_isinteger(L, -1) &&
        (r->v.kind != VERDICT_RESPOND || r->v.status != lua_tointeger(L, -1)))
        TEST_FAIL(r, "expected respond with status %d, got %s %d", (int)lua_tointeger(L, -1),
                  verdict_name(r->v.kind), r->v.status);
    rawfield(L, e, "reason");
    if (lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), r->v.reason) != 0)
        TEST_FAIL(r, "expected reason \"%s\", got \"%s\"", lua_tostring(L, -1), r->v.reason);
    rawfield(L, e, "alert");
    if (lua_type(L, -1) == LUA_TSTRING) {
        if (!raised_alert(&p->ctx.test_alerts, lua_tostring(L, -1)))
            TEST_FAIL(r, "expected alert %s, it was not raised", lua_tostring(L, -1));
    } else if (lua_isboolean(L, -1) && (p->ctx.test_alerts.len > 0) != lua_toboolean(L, -1)) {
        TEST_FAIL(r, "expected %s", lua_toboolean(L, -1) ? "an alert, none was raised"
                                                        : "no alert, one was raised");
    }
    r->passed = 1;
    return 0;
}

/* Runs the test table at `t`; returns 1 when it passed, else 0 with `why`. */
static int run_test(policy_t *p, lua_State *L, int t, char *why, size_t whylen)
{
    test_run_t r = {.p = p, .v = VERDICT_INIT};
    lua_pushcfunction(L, test_step);
    lua_pushlightuserdata(L, &r);
    lua_pushvalue(L, t);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
        first_line(lua_tostring(L, -1), r.why, sizeof r.why);
        r.passed = 0;
    }
    snprintf(why, whylen, "%s", r.why);
    verdict_reset(&r.v);
    http_head_free(r.req);
    http_head_free(r.res);
    return r.passed;
}

int policy_run_tests(policy_t *p, void (*report)(const policy_test_result_t *r, void *arg),
                     void *arg, char *err, size_t errlen)
{
    if (p->tests_ref == LUA_NOREF)
        return 0;
    lua_State *L = sandbox_state(p->sandbox);
    int top = lua_gettop(L), failed = 0;
    if (!lua_checkstack(L, 8)) {
        errf(err, errlen, "out of memory");
        return -1;
    }
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
        char name[128];
        lua_pushliteral(L, "name");
        if (lua_rawget(L, t) == LUA_TSTRING)
            snprintf(name, sizeof name, "%s", lua_tostring(L, -1));
        else
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
    for (size_t i = 0; i < p->settings.n_sinks; i++) {
        free(p->settings.sinks[i].url);
        free(p->settings.sinks[i].headers);
        free(p->settings.sinks[i].routing_key);
    }
    free(p->settings.sinks);
    sandbox_free(p->sandbox);
    buf_free(&p->ctx.test_alerts);
    free(p->path);
    free(p);
}
