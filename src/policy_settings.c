/* policy_settings: reading a policy's `settings = { ... }` into plain C
 * values, every bad value noted as a problem at its line (see
 * policy_internal.h). Tables are read raw: no metamethod of the policy
 * runs. */
#include "policy_internal.h"

#include <lauxlib.h>

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const policy_settings_t policy_defaults = {
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
    .set_aside_ms = 30000,
};

/* Notes every string key of the table at `t` that is not in `known`, as a
 * warning or an error. */
static void check_known(policy_t *p, lua_State *L, int t, const char *where,
                        const char *const *known, int warn)
{
    t = lua_absindex(L, t);
    for (lua_pushnil(L); lua_api_next_unknown(L, t, known);) {
        const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        policy_problem(p, k ? policy_source_line(p, k, 1, 0) : 0, warn, "%s: unknown key '%s'%s",
                       where, k ? k : luaL_typename(L, -1), warn ? " (ignored)" : "");
    }
}

/* Reads t.name as an integer in [min, max] into *out when present; notes a
 * policy_problem (and leaves *out) otherwise. */
static void setting_int(policy_t *p, lua_State *L, int t, const char *where, const char *name,
                        int64_t min, int64_t max, int64_t *out)
{
    policy_rawfield(L, t, name);
    if (!lua_isnil(L, -1)) {
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < min || lua_tointeger(L, -1) > max)
            policy_problem(p, policy_source_line(p, name, 1, 0), 0,
                           "%s.%s must be an integer from %lld to %lld", where, name,
                           (long long)min, (long long)max);
        else
            *out = lua_tointeger(L, -1);
    }
    lua_pop(L, 1);
}

/* setting_int() for a settings key held as a uint64_t. */
static void setting_u64(policy_t *p, lua_State *L, int t, const char *name, int64_t min,
                        int64_t max, uint64_t *field)
{
    int64_t v = (int64_t)*field;
    setting_int(p, L, t, "settings", name, min, max, &v);
    *field = (uint64_t)v;
}

static char *copy_string(lua_State *L, const char *s)
{
    char *c = strdup(s);
    if (c == NULL)
        luaL_error(L, "out of memory");
    return c;
}

/* A zeroed array of `n` + 1 elements of `size` bytes (free() it); raises
 * when out of memory. */
static void *new_list(lua_State *L, size_t n, size_t size)
{
    void *a = calloc(n + 1, size);
    if (a == NULL)
        luaL_error(L, "out of memory");
    return a;
}

/* Reads the sink at `e` (the nth, from 1) into `k`; returns -1 after noting
 * a policy_problem. */
static int read_sink(policy_t *p, lua_State *L, int e, int nth, policy_sink_t *k)
{
    static const char *const known[] = {"kind", "url", "headers", "routing_key", "rate_per_min",
                                        "queue", "timeout_ms", NULL};
    static const char *const kinds[] = {"alertmanager", "webhook", "slack", "pagerduty", NULL};
    char where[48];
    int line = policy_source_line(p, "kind", nth, 0);
    snprintf(where, sizeof where, "settings.alerts[%d]", nth);
    if (!lua_istable(L, e)) {
        policy_problem(p, 0, 0, "%s must be a table { kind = ..., url = ... }", where);
        return -1;
    }
    int before = p->report->n_errors;
    check_known(p, L, e, where, known, 0);
    k->rate_per_min = 60;
    k->queue = 256;
    k->timeout_ms = 5000;
    int kind = -1;
    if (policy_rawfield(L, e, "kind") == LUA_TSTRING)
        for (int j = 0; kinds[j] != NULL; j++)
            if (strcmp(lua_tostring(L, -1), kinds[j]) == 0)
                kind = j;
    if (kind < 0)
        policy_problem(p, line, 0, "%s.kind must be alertmanager, webhook, slack or pagerduty",
                       where);
    k->kind = kind < 0 ? SINK_WEBHOOK : (sink_kind_t)kind;
    if (policy_rawfield(L, e, "url") != LUA_TSTRING ||
        (strncmp(lua_tostring(L, -1), "http://", 7) != 0 &&
         strncmp(lua_tostring(L, -1), "https://", 8) != 0))
        policy_problem(p, line, 0, "%s.url must be an http:// or https:// URL", where);
    else
        k->url = copy_string(L, lua_tostring(L, -1));
    if (policy_rawfield(L, e, "routing_key") == LUA_TSTRING)
        k->routing_key = copy_string(L, lua_tostring(L, -1));
    else if (kind == SINK_PAGERDUTY)
        policy_problem(p, line, 0, "%s: a pagerduty sink needs routing_key", where);
    if (policy_rawfield(L, e, "headers") != LUA_TNIL) {
        int hdr = lua_gettop(L);
        int ok = lua_istable(L, hdr);
        buf_t b = BUF_INIT;
        lua_pushnil(L);
        while (ok && lua_next(L, hdr) != 0) {
            const char *name = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
            const char *val = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
            ok = name != NULL && val != NULL && name[0] != '\0';
            for (const char *c = name; ok && *c; c++)
                ok = (*c > 0x20 && *c < 0x7f && *c != ':');
            for (const char *c = val; ok && *c; c++)
                ok = (*c >= 0x20 && *c != 0x7f) || *c == '\t';
            if (ok)
                buf_printf(&b, "%s: %s\r\n", name, val);
            lua_pop(L, ok ? 1 : 2);
        }
        if (ok && b.len > 0 && buf_append(&b, "", 1) < 0) { /* a C string */
            buf_free(&b);
            luaL_error(L, "out of memory");
        }
        if (!ok) {
            buf_free(&b);
            policy_problem(p, policy_source_line(p, "headers", 1, 0), 0,
                           "%s.headers must map header names to header values (strings)", where);
        }
        k->headers = b.data; /* owned; NULL when empty */
    }
    int64_t v = k->rate_per_min;
    setting_int(p, L, e, where, "rate_per_min", 1, 100000, &v);
    k->rate_per_min = (int)v;
    v = k->queue;
    setting_int(p, L, e, where, "queue", 1, 100000, &v);
    k->queue = (int)v;
    v = (int64_t)k->timeout_ms;
    setting_int(p, L, e, where, "timeout_ms", 10, 600000, &v);
    k->timeout_ms = (uint64_t)v;
    return p->report->n_errors == before ? 0 : -1;
}

/* settings.alerts: a list of { kind = ..., url = ..., ... }. */
static void read_sinks(policy_t *p, lua_State *L, int t)
{
    int line = policy_source_line(p, "alerts", 1, 0);
    if (!lua_istable(L, t)) {
        policy_problem(p, line, 0, "settings.alerts must be a list of { kind = ..., url = ... }");
        return;
    }
    luaL_checkstack(L, 16, "settings.alerts");
    size_t n = (size_t)lua_rawlen(L, t);
    if (n > 32) {
        policy_problem(p, line, 0, "settings.alerts: at most 32 sinks");
        return;
    }
    policy_settings_t *s = &p->settings;
    s->sinks = new_list(L, n, sizeof *s->sinks);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, t, (lua_Integer)i + 1);
        s->n_sinks = i + 1; /* owned from here on, for policy_settings_free */
        read_sink(p, L, lua_gettop(L), (int)i + 1, &s->sinks[i]);
        lua_settop(L, t);
    }
}

/* settings.secret_headers: a list of header names whose values are never
 * written out, besides the usual ones. */
static void read_secret_headers(policy_t *p, lua_State *L, int t)
{
    int line = policy_source_line(p, "secret_headers", 1, 0);
    size_t n = lua_istable(L, t) ? (size_t)lua_rawlen(L, t) : 0;
    if (!lua_istable(L, t) || n > 64) {
        policy_problem(p, line, 0,
                       "settings.secret_headers must be a list of at most 64 header names");
        return;
    }
    policy_settings_t *s = &p->settings;
    s->secret_headers = new_list(L, n, sizeof *s->secret_headers);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, t, (lua_Integer)i + 1);
        size_t len = 0;
        const char *name = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
        int ok = name != NULL && len > 0 && len < 128;
        for (size_t j = 0; ok && j < len; j++)
            ok = name[j] > 0x20 && name[j] < 0x7f && name[j] != ':';
        lua_pop(L, 1);
        if (!ok) {
            policy_problem(p, line, 0, "settings.secret_headers[%zu] must be a header name", i + 1);
            continue;
        }
        char *copy = copy_string(L, name);
        for (char *c = copy; *c; c++)
            *c = (char)tolower((unsigned char)*c);
        s->secret_headers[s->n_secret_headers++] = copy;
    }
}

/* Starts reading the table settings.<key> at `t`: when it is not a table,
 * notes "settings.<key> must be a table<shape>" and returns -1; else notes
 * its unknown keys, looks for its keys from where it starts on, and returns
 * the anchor it replaced, for the caller to put back. */
static int enter_table(policy_t *p, lua_State *L, int t, const char *key,
                       const char *const *known, const char *shape)
{
    char where[32];
    snprintf(where, sizeof where, "settings.%s", key);
    if (!lua_istable(L, t)) {
        policy_problem(p, policy_source_line(p, key, 1, 0), 0, "%s must be a table%s", where,
                       shape);
        return -1;
    }
    int was = policy_anchor_at(p, key);
    check_known(p, L, t, where, known, 1);
    return was;
}

void policy_read_settings(policy_t *p, lua_State *L, int policy)
{
    static const char *const known[] = {"attempts",       "backoff",           "body_limit",
                                        "replay_limit",   "limits",            "deadline_ms",
                                        "try_timeout_ms", "retry_after_max_ms", "budget",
                                        "alerts",         "resolve_after_ms",  "repeat_ms",
                                        "secret_headers", NULL};
    static const char *const known_backoff[] = {"base_ms", "max_ms", NULL};
    static const char *const known_budget[] = {"ratio", "min_per_s", NULL};
    static const char *const known_limits[] = {"instructions", "time_ms", "memory_mb",
                                               "set_aside_s", NULL};
    policy_settings_t *s = &p->settings;
    int64_t v;

    *s = policy_defaults;
    if (policy_rawfield(L, policy, "settings") == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    int t = lua_gettop(L);
    if (!lua_istable(L, t)) {
        policy_problem(p, policy_source_line(p, "settings", 1, 0), 0, "settings must be a table");
        lua_settop(L, t - 1);
        return;
    }
    policy_anchor_at(p, "settings"); /* its keys are looked for from there on */
    check_known(p, L, t, "settings", known, 1);
    v = s->attempts;
    setting_int(p, L, t, "settings", "attempts", 1, 10, &v);
    s->attempts = (int)v;
    v = (int64_t)s->body_limit;
    setting_int(p, L, t, "settings", "body_limit", 0, 16 << 20, &v);
    s->body_limit = (size_t)v;
    v = (int64_t)s->replay_limit;
    setting_int(p, L, t, "settings", "replay_limit", 0, 1 << 30, &v);
    s->replay_limit = (size_t)v;
    setting_u64(p, L, t, "deadline_ms", 0, 3600000, &s->deadline_ms);
    setting_u64(p, L, t, "try_timeout_ms", 0, 3600000, &s->try_timeout_ms);
    setting_u64(p, L, t, "retry_after_max_ms", 0, 3600000, &s->retry_after_max_ms);

    setting_u64(p, L, t, "resolve_after_ms", 100, 86400000, &s->resolve_after_ms);
    setting_u64(p, L, t, "repeat_ms", 100, 86400000, &s->repeat_ms);
    if (policy_rawfield(L, t, "alerts") != LUA_TNIL) {
        int was = policy_anchor_at(p, "alerts");
        read_sinks(p, L, lua_gettop(L));
        p->anchor = was;
    }
    lua_settop(L, t);

    if (policy_rawfield(L, t, "secret_headers") != LUA_TNIL)
        read_secret_headers(p, L, lua_gettop(L));
    lua_settop(L, t);

    int bt = policy_rawfield(L, t, "budget");
    int budget_line = policy_source_line(p, "budget", 1, 0);
    if (bt == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
        s->budget_on = 0;
    } else if (bt == LUA_TTABLE) {
        int b = lua_gettop(L);
        p->anchor = enter_table(p, L, b, "budget", known_budget, ""); /* a table: back at once */
        policy_rawfield(L, b, "ratio");
        policy_rawfield(L, b, "min_per_s");
        if ((!lua_isnil(L, -2) && (!lua_isnumber(L, -2) || lua_tonumber(L, -2) < 0 ||
                                   lua_tonumber(L, -2) > 100)) ||
            (!lua_isnil(L, -1) && (!lua_isnumber(L, -1) || lua_tonumber(L, -1) < 0 ||
                                   lua_tonumber(L, -1) > 1000000))) {
            policy_problem(p, budget_line, 0,
                           "settings.budget is { ratio = 0 to 100, min_per_s = 0 or more }, "
                           "or false");
        } else {
            if (!lua_isnil(L, -2))
                s->budget_ratio = lua_tonumber(L, -2);
            if (!lua_isnil(L, -1))
                s->budget_min_per_s = lua_tonumber(L, -1);
        }
    } else if (bt != LUA_TNIL) {
        policy_problem(p, budget_line, 0,
                       "settings.budget is { ratio = ..., min_per_s = ... }, or false");
    }
    lua_settop(L, t);

    if (policy_rawfield(L, t, "backoff") != LUA_TNIL) {
        int b = lua_gettop(L);
        int64_t base = (int64_t)s->backoff_base_ms, max = (int64_t)s->backoff_max_ms;
        int was = enter_table(p, L, b, "backoff", known_backoff,
                              " { base_ms = ..., max_ms = ... }");
        if (was >= 0) {
            setting_int(p, L, b, "settings.backoff", "base_ms", 0, 3600000, &base);
            setting_int(p, L, b, "settings.backoff", "max_ms", 0, 3600000, &max);
            if (max < base)
                policy_problem(p, policy_source_line(p, "max_ms", 1, 0), 0,
                               "settings.backoff.max_ms must not be below base_ms");
            else {
                s->backoff_base_ms = (uint64_t)base;
                s->backoff_max_ms = (uint64_t)max;
            }
            p->anchor = was;
        }
    }
    lua_settop(L, t);

    if (policy_rawfield(L, t, "limits") != LUA_TNIL) {
        int l = lua_gettop(L);
        int64_t ins = (int64_t)s->handler_instructions, ms = (int64_t)s->handler_time_ms;
        int64_t mb = (int64_t)(s->memory_limit >> 20);
        int64_t aside = (int64_t)(s->set_aside_ms / 1000);
        int was = enter_table(p, L, l, "limits", known_limits, "");
        if (was >= 0) {
            setting_int(p, L, l, "settings.limits", "instructions", 10000, 1000000000, &ins);
            setting_int(p, L, l, "settings.limits", "time_ms", 1, 10000, &ms);
            setting_int(p, L, l, "settings.limits", "memory_mb", 4, 4096, &mb);
            setting_int(p, L, l, "settings.limits", "set_aside_s", 1, 3600, &aside);
            s->set_aside_ms = (uint64_t)aside * 1000;
            s->handler_instructions = (uint64_t)ins;
            s->handler_time_ms = (uint64_t)ms;
            s->memory_limit = (size_t)mb << 20;
            if (sandbox_memory(p->sandbox) > s->memory_limit)
                policy_problem(p, policy_source_line(p, "memory_mb", 1, 0), 0,
                               "the policy already uses more than settings.limits.memory_mb");
            p->anchor = was;
        }
    }
    p->anchor = 0;
    lua_settop(L, t - 1);
}

void policy_settings_free(policy_settings_t *s)
{
    for (size_t i = 0; i < s->n_sinks; i++) {
        free(s->sinks[i].url);
        free(s->sinks[i].headers);
        free(s->sinks[i].routing_key);
    }
    free(s->sinks);
    s->sinks = NULL;
    s->n_sinks = 0;
    for (size_t i = 0; i < s->n_secret_headers; i++)
        free(s->secret_headers[i]);
    free(s->secret_headers);
    s->secret_headers = NULL;
    s->n_secret_headers = 0;
}
