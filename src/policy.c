/* policy: a user's Lua policy in a sandbox (see policy.h).
 *
 * Two rules keep a hostile or broken policy from taking errord down. Every
 * read of a table the policy made is raw (lua_rawget, lua_next), so none of
 * its metamethods runs outside a bounded call. And every step that touches
 * the Lua state runs in a protected call, so even running out of the
 * state's memory is an error errord handles, never a panic. */
#include "policy.h"

#include "backoff.h"
#include "clock.h"
#include "log.h"
#include "lua_api.h"
#include "lua_json.h"
#include "redact.h"
#include "sandbox.h"
#include "sha256.h"

#include <lauxlib.h>

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_POLICY_BYTES (4 * 1024 * 1024)
#define N_STATUS 600

/* A handler that keeps running out of time or memory is set aside: each
 * such call holds its worker's loop up to the handler's time limit (filling
 * tens of MiB of fresh memory takes about that long), so after
 * SET_ASIDE_AFTER of them within SET_ASIDE_WINDOW_MS errord stops calling
 * it for settings.limits.set_aside_s (its responses pass, as they would had
 * it failed), then tries it again. Back from a set-aside it is on
 * probation for SET_ASIDE_WINDOW_MS: one such failure sets it aside again,
 * for twice as long as the time before, up to SET_ASIDE_MAX_MS, so a
 * handler that is simply broken costs one call every few minutes. A handler
 * that raises costs little and is always called. */
#define SET_ASIDE_AFTER 3
#define SET_ASIDE_WINDOW_MS 10000
#define SET_ASIDE_MAX_MS 600000

typedef struct {
    int fails;             /* calls that ran out of time or memory since first_ms */
    int times;             /* set aside this many times in a row */
    uint64_t first_ms;     /* monotonic */
    uint64_t until_ms;     /* set aside until then (monotonic); 0: not */
    uint64_t probation_ms; /* back from a set-aside: on probation until then */
} handler_health_t;

struct policy_s {
    int refs;
    char *path;
    char *src; /* the source, for locating problems and tests */
    size_t src_len;
    char sha256[65];
    int64_t loaded_at_ms;
    policy_report_t *report; /* while loading */
    int anchor; /* ... where keys are looked for from (source_line) */
    sandbox_t *sandbox;
    lua_api_ctx_t ctx;
    policy_settings_t settings;
    int handler[N_STATUS]; /* registry refs by status, LUA_NOREF when none */
    int n_handlers;
    int error_ref;
    int tests_ref;
    handler_health_t health[N_STATUS + 1]; /* by status; the error handler last */
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
    .set_aside_ms = 30000,
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

/* The first line of a Lua error, with the file named in full: Lua cuts a
 * long chunk name to "...<its end>". */
static void full_source(const policy_t *p, const char *msg, char *out, size_t n)
{
    first_line(msg, out, n);
    if (strncmp(out, "...", 3) != 0)
        return;
    const char *rest = out + 3;
    size_t plen = strlen(p->path);
    for (const char *c = strchr(rest, ':'); c != NULL; c = strchr(c + 1, ':')) {
        size_t k = (size_t)(c - rest);
        if (k <= plen && memcmp(rest, p->path + plen - k, k) == 0) {
            char tail[512];
            snprintf(tail, sizeof tail, "%s", c);
            snprintf(out, n, "%s%s", p->path, tail);
            return;
        }
    }
}

/* Pushes t[k] without running metamethods; returns its type. */
static int rawfield(lua_State *L, int t, const char *k)
{
    t = lua_absindex(L, t);
    lua_pushstring(L, k);
    return lua_rawget(L, t);
}

/* ---- problems and where they are ------------------------------------------------- */

void policy_report_free(policy_report_t *r)
{
    buf_free(&r->errors);
    buf_free(&r->warnings);
    r->n_errors = r->n_warnings = 0;
}

static int ident_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static size_t skip_blanks(const char *s, size_t i, size_t n)
{
    while (i < n && (s[i] == ' ' || s[i] == '\t'))
        i++;
    return i;
}

/* Whether an assignment ('=' but not '==') starts at s[i], after blanks. */
static int assigns(const char *s, size_t i, size_t n)
{
    i = skip_blanks(s, i, n);
    return i < n && s[i] == '=' && (i + 1 == n || s[i + 1] != '=');
}

/* Whether the word before s[i] is `local` (a variable, not a key). */
static int after_local(const char *s, size_t i)
{
    while (i > 0 && (s[i - 1] == ' ' || s[i - 1] == '\t'))
        i--;
    return i >= 5 && memcmp(s + i - 5, "local", 5) == 0 && (i == 5 || !ident_char(s[i - 6]));
}

/* Whether the source names `key` as a table key at s[i]: `key =`,
 * `t.key =`, `["key"] =`, `['key'] =`, or `[key] =` (a number). Returns
 * the index past the '=', or 0. */
static size_t key_at(const char *s, size_t i, size_t n, const char *key, size_t klen)
{
    size_t j;
    if (s[i] == '[') {
        j = skip_blanks(s, i + 1, n);
        char q = j < n && (s[j] == '"' || s[j] == '\'') ? s[j] : 0;
        j += q != 0;
        if (j + klen > n || memcmp(s + j, key, klen) != 0)
            return 0;
        j += klen;
        if (q != 0 && (j >= n || s[j++] != q))
            return 0;
        j = skip_blanks(s, j, n);
        if (j >= n || s[j] != ']')
            return 0;
        j++;
    } else {
        if (i + klen > n || memcmp(s + i, key, klen) != 0 || (i > 0 && ident_char(s[i - 1])) ||
            (i + klen < n && ident_char(s[i + klen])) || after_local(s, i))
            return 0;
        j = i + klen;
    }
    if (!assigns(s, j, n))
        return 0;
    return skip_blanks(s, j, n) + 1;
}

/* Whether a test named `name` starts at s[i]: `name = "<name>"` (or with
 * single quotes). */
static int test_name_at(const char *s, size_t i, size_t n, const char *name, size_t len)
{
    size_t j = key_at(s, i, n, "name", 4);
    if (j == 0)
        return 0;
    j = skip_blanks(s, j, n);
    if (j >= n || (s[j] != '"' && s[j] != '\''))
        return 0;
    char q = s[j++];
    return j + len < n && memcmp(s + j, name, len) == 0 && s[j + len] == q;
}

/* The line, at or after p->anchor, where the source names `key` as a table
 * key for the nth time (from 1), or with `test` where the nth test named
 * `key` is; 0 when it does not. Lua keeps no positions for table keys, so
 * this reads the source, skipping comments. */
static int source_line(const policy_t *p, const char *key, int nth, int test)
{
    const char *s = p->src;
    size_t n = p->src_len, klen = strlen(key);
    int line = 1;
    if (s == NULL || klen == 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\n') {
            line++;
        } else if (s[i] == '-' && i + 1 < n && s[i + 1] == '-') {
            int block = i + 3 < n && s[i + 2] == '[' && s[i + 3] == '[';
            while (i + 1 < n && (block ? !(s[i] == ']' && s[i + 1] == ']') : s[i + 1] != '\n')) {
                line += s[i] == '\n';
                i++;
            }
        } else if (line >= p->anchor &&
                   (test ? test_name_at(s, i, n, key, klen) : key_at(s, i, n, key, klen) > 0)) {
            if (--nth <= 0)
                return line;
        }
    }
    return 0;
}

/* Looks for keys from where the source names `key` (at or after the
 * current anchor) on; returns the anchor it replaces. */
static int anchor_at(policy_t *p, const char *key)
{
    int was = p->anchor;
    int line = source_line(p, key, 1, 0);
    if (line > 0)
        p->anchor = line;
    return was;
}

static void problem(policy_t *p, int line, int warning, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Notes a problem of the policy being loaded, at `line` (0: unknown). */
static void problem(policy_t *p, int line, int warning, const char *fmt, ...)
{
    policy_report_t *r = p->report;
    buf_t *b = warning ? &r->warnings : &r->errors;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (line > 0)
        buf_printf(b, "%s:%d: %s\n", p->path, line, msg);
    else
        buf_printf(b, "%s: %s\n", p->path, msg);
    if (warning)
        r->n_warnings++;
    else
        r->n_errors++;
}

/* Notes every string key of the table at `t` that is not in `known`, as a
 * warning or an error. */
static void check_known(policy_t *p, lua_State *L, int t, const char *where,
                        const char *const *known, int warn)
{
    t = lua_absindex(L, t);
    for (lua_pushnil(L); lua_api_next_unknown(L, t, known);) {
        const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        problem(p, k ? source_line(p, k, 1, 0) : 0, warn, "%s: unknown key '%s'%s", where,
                k ? k : luaL_typename(L, -1), warn ? " (ignored)" : "");
    }
}

/* ---- settings ------------------------------------------------------------------ */

/* Reads t.name as an integer in [min, max] into *out when present; notes a
 * problem (and leaves *out) otherwise. */
static void setting_int(policy_t *p, lua_State *L, int t, const char *where, const char *name,
                        int64_t min, int64_t max, int64_t *out)
{
    rawfield(L, t, name);
    if (!lua_isnil(L, -1)) {
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < min || lua_tointeger(L, -1) > max)
            problem(p, source_line(p, name, 1, 0), 0, "%s.%s must be an integer from %lld to %lld",
                    where, name, (long long)min, (long long)max);
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

/* Reads the sink at `e` (the nth, from 1) into `k`; returns -1 after noting
 * a problem. */
static int read_sink(policy_t *p, lua_State *L, int e, int nth, policy_sink_t *k)
{
    static const char *const known[] = {"kind", "url", "headers", "routing_key", "rate_per_min",
                                        "queue", "timeout_ms", NULL};
    static const char *const kinds[] = {"alertmanager", "webhook", "slack", "pagerduty", NULL};
    char where[48];
    int line = source_line(p, "kind", nth, 0);
    snprintf(where, sizeof where, "settings.alerts[%d]", nth);
    if (!lua_istable(L, e)) {
        problem(p, 0, 0, "%s must be a table { kind = ..., url = ... }", where);
        return -1;
    }
    int before = p->report->n_errors;
    check_known(p, L, e, where, known, 0);
    k->rate_per_min = 60;
    k->queue = 256;
    k->timeout_ms = 5000;
    int kind = -1;
    if (rawfield(L, e, "kind") == LUA_TSTRING)
        for (int j = 0; kinds[j] != NULL; j++)
            if (strcmp(lua_tostring(L, -1), kinds[j]) == 0)
                kind = j;
    if (kind < 0)
        problem(p, line, 0, "%s.kind must be alertmanager, webhook, slack or pagerduty", where);
    k->kind = kind < 0 ? SINK_WEBHOOK : (sink_kind_t)kind;
    if (rawfield(L, e, "url") != LUA_TSTRING ||
        (strncmp(lua_tostring(L, -1), "http://", 7) != 0 &&
         strncmp(lua_tostring(L, -1), "https://", 8) != 0))
        problem(p, line, 0, "%s.url must be an http:// or https:// URL", where);
    else
        k->url = copy_string(L, lua_tostring(L, -1));
    if (rawfield(L, e, "routing_key") == LUA_TSTRING)
        k->routing_key = copy_string(L, lua_tostring(L, -1));
    else if (kind == SINK_PAGERDUTY)
        problem(p, line, 0, "%s: a pagerduty sink needs routing_key", where);
    if (rawfield(L, e, "headers") != LUA_TNIL) {
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
            problem(p, source_line(p, "headers", 1, 0), 0,
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
    if (!lua_istable(L, t)) {
        problem(p, source_line(p, "alerts", 1, 0), 0,
                "settings.alerts must be a list of { kind = ..., url = ... }");
        return;
    }
    luaL_checkstack(L, 16, "settings.alerts");
    size_t n = (size_t)lua_rawlen(L, t);
    if (n > 32) {
        problem(p, source_line(p, "alerts", 1, 0), 0, "settings.alerts: at most 32 sinks");
        return;
    }
    policy_settings_t *s = &p->settings;
    s->sinks = calloc(n + 1, sizeof *s->sinks);
    if (s->sinks == NULL)
        luaL_error(L, "out of memory");
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, t, (lua_Integer)i + 1);
        s->n_sinks = i + 1; /* owned from here on, for policy_release */
        read_sink(p, L, lua_gettop(L), (int)i + 1, &s->sinks[i]);
        lua_settop(L, t);
    }
}

/* settings.secret_headers: a list of header names whose values are never
 * written out, besides the usual ones. */
static void read_secret_headers(policy_t *p, lua_State *L, int t)
{
    int line = source_line(p, "secret_headers", 1, 0);
    size_t n = lua_istable(L, t) ? (size_t)lua_rawlen(L, t) : 0;
    if (!lua_istable(L, t) || n > 64) {
        problem(p, line, 0, "settings.secret_headers must be a list of at most 64 header names");
        return;
    }
    policy_settings_t *s = &p->settings;
    s->secret_headers = calloc(n + 1, sizeof *s->secret_headers);
    if (s->secret_headers == NULL)
        luaL_error(L, "out of memory");
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, t, (lua_Integer)i + 1);
        size_t len = 0;
        const char *name = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
        int ok = name != NULL && len > 0 && len < 128;
        for (size_t j = 0; ok && j < len; j++)
            ok = name[j] > 0x20 && name[j] < 0x7f && name[j] != ':';
        lua_pop(L, 1);
        if (!ok) {
            problem(p, line, 0, "settings.secret_headers[%zu] must be a header name", i + 1);
            continue;
        }
        char *copy = copy_string(L, name);
        for (char *c = copy; *c; c++)
            *c = (char)tolower((unsigned char)*c);
        s->secret_headers[s->n_secret_headers++] = copy;
    }
}

static void read_settings(policy_t *p, lua_State *L, int policy)
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

    *s = DEFAULTS;
    if (rawfield(L, policy, "settings") == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    int t = lua_gettop(L);
    if (!lua_istable(L, t)) {
        problem(p, source_line(p, "settings", 1, 0), 0, "settings must be a table");
        lua_settop(L, t - 1);
        return;
    }
    anchor_at(p, "settings"); /* its keys are looked for from there on */
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
    if (rawfield(L, t, "alerts") != LUA_TNIL) {
        int was = anchor_at(p, "alerts");
        read_sinks(p, L, lua_gettop(L));
        p->anchor = was;
    }
    lua_settop(L, t);

    if (rawfield(L, t, "secret_headers") != LUA_TNIL)
        read_secret_headers(p, L, lua_gettop(L));
    lua_settop(L, t);

    int bt = rawfield(L, t, "budget");
    int budget_line = source_line(p, "budget", 1, 0);
    if (bt == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
        s->budget_on = 0;
    } else if (bt == LUA_TTABLE) {
        int b = lua_gettop(L);
        int was = anchor_at(p, "budget");
        check_known(p, L, b, "settings.budget", known_budget, 1);
        p->anchor = was;
        rawfield(L, b, "ratio");
        rawfield(L, b, "min_per_s");
        if ((!lua_isnil(L, -2) && (!lua_isnumber(L, -2) || lua_tonumber(L, -2) < 0 ||
                                   lua_tonumber(L, -2) > 100)) ||
            (!lua_isnil(L, -1) && (!lua_isnumber(L, -1) || lua_tonumber(L, -1) < 0 ||
                                   lua_tonumber(L, -1) > 1000000))) {
            problem(p, budget_line, 0,
                    "settings.budget is { ratio = 0 to 100, min_per_s = 0 or more }, or false");
        } else {
            if (!lua_isnil(L, -2))
                s->budget_ratio = lua_tonumber(L, -2);
            if (!lua_isnil(L, -1))
                s->budget_min_per_s = lua_tonumber(L, -1);
        }
    } else if (bt != LUA_TNIL) {
        problem(p, budget_line, 0, "settings.budget is { ratio = ..., min_per_s = ... }, or false");
    }
    lua_settop(L, t);

    if (rawfield(L, t, "backoff") != LUA_TNIL) {
        int b = lua_gettop(L);
        int64_t base = (int64_t)s->backoff_base_ms, max = (int64_t)s->backoff_max_ms;
        if (!lua_istable(L, b)) {
            problem(p, source_line(p, "backoff", 1, 0), 0,
                    "settings.backoff must be a table { base_ms = ..., max_ms = ... }");
        } else {
            int was = anchor_at(p, "backoff");
            check_known(p, L, b, "settings.backoff", known_backoff, 1);
            setting_int(p, L, b, "settings.backoff", "base_ms", 0, 3600000, &base);
            setting_int(p, L, b, "settings.backoff", "max_ms", 0, 3600000, &max);
            if (max < base)
                problem(p, source_line(p, "max_ms", 1, 0), 0,
                        "settings.backoff.max_ms must not be below base_ms");
            else {
                s->backoff_base_ms = (uint64_t)base;
                s->backoff_max_ms = (uint64_t)max;
            }
            p->anchor = was;
        }
    }
    lua_settop(L, t);

    if (rawfield(L, t, "limits") != LUA_TNIL) {
        int l = lua_gettop(L);
        int64_t ins = (int64_t)s->handler_instructions, ms = (int64_t)s->handler_time_ms;
        int64_t mb = (int64_t)(s->memory_limit >> 20);
        int64_t aside = (int64_t)(s->set_aside_ms / 1000);
        if (!lua_istable(L, l)) {
            problem(p, source_line(p, "limits", 1, 0), 0, "settings.limits must be a table");
        } else {
            int was = anchor_at(p, "limits");
            check_known(p, L, l, "settings.limits", known_limits, 1);
            setting_int(p, L, l, "settings.limits", "instructions", 10000, 1000000000, &ins);
            setting_int(p, L, l, "settings.limits", "time_ms", 1, 10000, &ms);
            setting_int(p, L, l, "settings.limits", "memory_mb", 4, 4096, &mb);
            setting_int(p, L, l, "settings.limits", "set_aside_s", 1, 3600, &aside);
            s->set_aside_ms = (uint64_t)aside * 1000;
            s->handler_instructions = (uint64_t)ins;
            s->handler_time_ms = (uint64_t)ms;
            s->memory_limit = (size_t)mb << 20;
            if (sandbox_memory(p->sandbox) > s->memory_limit)
                problem(p, source_line(p, "memory_mb", 1, 0), 0,
                        "the policy already uses more than settings.limits.memory_mb");
            p->anchor = was;
        }
    }
    p->anchor = 0;
    lua_settop(L, t - 1);
}

/* ---- handlers ------------------------------------------------------------------ */

/* The line where the handler function at the top of the stack starts. */
static int function_line(lua_State *L)
{
    lua_Debug ar;
    lua_pushvalue(L, -1);
    return lua_getinfo(L, ">S", &ar) ? ar.linedefined : 0;
}

/* Reads the returned table's keys into handler refs; notes bad keys. */
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
        char name[48];
        int is_fn = lua_isfunction(L, -1);
        int line = is_fn ? function_line(L) : 0;
        if (lua_type(L, -2) == LUA_TNUMBER) {
            lua_Integer s = lua_isinteger(L, -2) ? lua_tointeger(L, -2) : 0;
            if (s < 100 || s > 599) {
                char key[48];
                lua_pushvalue(L, -2); /* a copy: lua_tostring changes it */
                snprintf(key, sizeof key, "%s", lua_tostring(L, -1));
                lua_pop(L, 1);
                problem(p, line ? line : source_line(p, key, 1, 0), 0,
                        "handler key [%s] is not a status from 100 to 599", key);
                lua_pop(L, 1);
                continue;
            }
            slot = &exact[s];
            snprintf(name, sizeof name, "[%d]", (int)s);
            if (!is_fn) {
                char key[16];
                snprintf(key, sizeof key, "%d", (int)s);
                line = source_line(p, key, 1, 0);
            }
        } else if (lua_type(L, -2) == LUA_TSTRING) {
            const char *k = lua_tostring(L, -2);
            size_t n = strlen(k);
            if (!is_fn)
                line = source_line(p, k, 1, 0);
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
                if (!lua_istable(L, -1)) {
                    problem(p, line, 0, "tests must be a list of test tables");
                    lua_pop(L, 1);
                } else {
                    p->tests_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* pops it */
                }
                continue;
            } else if (n == 3 && k[0] >= '1' && k[0] <= '5' && k[1] >= '0' && k[1] <= '9' &&
                       k[2] >= '0' && k[2] <= '9') {
                problem(p, line, 0, "handler key \"%s\" is a string: write [%s], a number", k, k);
                lua_pop(L, 1);
                continue;
            } else {
                problem(p, line, 1,
                        "unknown key '%s' ignored: handler keys are statuses ([403]), classes "
                        "(\"5xx\"), default and error",
                        k);
                lua_pop(L, 1);
                continue;
            }
            snprintf(name, sizeof name, "%s", k);
        } else {
            problem(p, line, 0,
                    "policy keys are statuses, classes (\"4xx\"), default, error, settings or "
                    "tests; found a %s key",
                    luaL_typename(L, -2));
            lua_pop(L, 1);
            continue;
        }
        if (!is_fn) {
            problem(p, line, 0, "handler %s must be a function, not a %s", name,
                    luaL_typename(L, -1));
            lua_pop(L, 1);
            continue;
        }
        p->n_handlers++;
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

char *policy_read_file(const char *path, size_t *len, char *err, size_t errlen)
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
    data[n] = '\0';
    *len = n;
    return data;
}

/* Protected: installs the API. */
static int open_step(lua_State *L)
{
    lua_api_open(L);
    return 0;
}

/* Notes a Lua error message as a problem. Lua's own messages start with
 * "file:line:" already. */
static void lua_problem(policy_t *p, const char *msg)
{
    char line[512];
    full_source(p, msg, line, sizeof line);
    if (strncmp(line, p->path, strlen(p->path)) == 0)
        buf_printf(&p->report->errors, "%s\n", line);
    else
        buf_printf(&p->report->errors, "%s: %s\n", p->path, line);
    p->report->n_errors++;
}

policy_t *policy_load_text(const char *path, const char *src, size_t len, policy_report_t *rep)
{
    policy_t *p = calloc(1, sizeof *p);
    if (p == NULL) {
        buf_printf(&rep->errors, "%s: out of memory\n", path);
        rep->n_errors++;
        return NULL;
    }
    p->refs = 1;
    p->error_ref = p->tests_ref = LUA_NOREF;
    for (int i = 0; i < N_STATUS; i++)
        p->handler[i] = LUA_NOREF;
    p->settings = DEFAULTS;
    p->report = rep;
    p->path = strdup(path);
    p->src = malloc(len + 1);
    sandbox_limits_t limits = limits_of(&DEFAULTS);
    p->sandbox = sandbox_new(&limits);
    if (p->path == NULL || p->src == NULL || p->sandbox == NULL) {
        buf_printf(&rep->errors, "%s: out of memory\n", path);
        rep->n_errors++;
        goto fail;
    }
    memcpy(p->src, src, len);
    p->src[len] = '\0';
    p->src_len = len;
    sha256_hex(src, len, p->sha256);
    p->loaded_at_ms = clock_wall_ms();
    p->ctx.settings = &p->settings;
    rand_seed(&p->ctx.rng);
    sandbox_set_context(p->sandbox, &p->ctx);
    lua_State *L = sandbox_state(p->sandbox);
    if (sandbox_protect(L, open_step, 0, 0, 1) != SANDBOX_OK) {
        lua_problem(p, "out of memory");
        goto fail;
    }

    char chunkname[1024];
    snprintf(chunkname, sizeof chunkname, "@%s", path);
    if (luaL_loadbufferx(L, src, len, chunkname, "t") != LUA_OK ||
        sandbox_call(p->sandbox, 0, 1) != SANDBOX_OK) {
        lua_problem(p, lua_tostring(L, -1));
        goto fail;
    }
    lua_pushlightuserdata(L, p);
    lua_insert(L, -2); /* under the policy table */
    if (sandbox_protect(L, load_step, 2, 0, 1) != SANDBOX_OK) {
        lua_problem(p, lua_tostring(L, -1));
        goto fail;
    }
    if (rep->n_errors > 0)
        goto fail;
    lua_settop(L, 0);
    limits = limits_of(&p->settings);
    sandbox_set_limits(p->sandbox, &limits);
    p->report = NULL;
    return p;

fail:
    p->report = NULL;
    policy_release(p);
    return NULL;
}

policy_t *policy_load(const char *path, char *err, size_t errlen)
{
    size_t len = 0;
    char *src = policy_read_file(path, &len, err, errlen);
    if (src == NULL)
        return NULL;
    policy_report_t rep = POLICY_REPORT_INIT;
    policy_t *p = policy_load_text(path, src, len, &rep);
    free(src);
    if (p == NULL)
        first_line(buf_cstr(&rep.errors), err, errlen);
    for (size_t i = 0; i < rep.warnings.len;) {
        size_t n = strcspn(rep.warnings.data + i, "\n");
        log_record_t *r = log_begin(LOG_WARN, "policy warning");
        log_strn(r, "warning", rep.warnings.data + i, n);
        log_end(r);
        i += n + 1;
    }
    policy_report_free(&rep);
    return p;
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

const char *policy_sha256(const policy_t *p)
{
    return p->sha256;
}

int64_t policy_loaded_at(const policy_t *p)
{
    return p->loaded_at_ms;
}

void policy_describe(const policy_t *p, int *handlers, int *tests)
{
    *handlers = p->n_handlers;
    *tests = 0;
    if (p->tests_ref != LUA_NOREF) {
        lua_State *L = sandbox_state(p->sandbox);
        lua_rawgeti(L, LUA_REGISTRYINDEX, p->tests_ref);
        *tests = (int)lua_rawlen(L, -1);
        lua_pop(L, 1);
    }
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
    return backoff_delay_ms(&p->settings, &p->ctx.rng, attempt);
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
    lua_pushlightuserdata(L, (void *)in);
    if (sandbox_protect(L, views_step, 1, 2, 0) != SANDBOX_OK) { /* req at top+1, res at top+2 */
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
        full_source(p, text, msg, msglen);
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

/* Writes `text` (`n` bytes) as the field `key` of `r`, the secrets of the
 * call `in` taken out. */
static void log_redacted(log_record_t *r, const char *key, const policy_settings_t *s,
                         const policy_input_t *in, const char *text, size_t n)
{
    buf_t clean = BUF_INIT;
    if (redact_scrub(s, in, text, n, 0, &clean))
        log_strn(r, key, clean.data, clean.len);
    else
        log_strn(r, key, text, n);
    buf_free(&clean);
}

/* Counts a handler call that ran out of time or memory; sets the handler
 * aside when it is the SET_ASIDE_AFTER-th within the window, or the first
 * on probation. */
static void note_exhausted(handler_health_t *h, const policy_settings_t *s,
                           const policy_input_t *in, uint64_t now)
{
    int failures;
    if (now < h->probation_ms) {
        failures = 1;
    } else {
        h->times = 0;
        if (h->fails == 0 || now - h->first_ms > SET_ASIDE_WINDOW_MS) {
            h->fails = 0;
            h->first_ms = now;
        }
        if (++h->fails < SET_ASIDE_AFTER)
            return;
        failures = SET_ASIDE_AFTER;
    }
    uint64_t ms = s->set_aside_ms; /* doubled each time in a row, up to the cap */
    for (int i = 0; i < h->times && ms < SET_ASIDE_MAX_MS; i++)
        ms = ms * 2 < SET_ASIDE_MAX_MS ? ms * 2 : SET_ASIDE_MAX_MS;
    h->times++;
    h->fails = 0;
    h->probation_ms = 0;
    h->until_ms = now + ms;
    log_record_t *r = log_begin(LOG_ERROR, "policy handler set aside: its responses pass for a while");
    if (in->res != NULL)
        log_int(r, "status", in->res->status);
    else
        log_str(r, "error_kind", in->err_kind);
    log_int(r, "failures", failures);
    log_int(r, "within_ms", SET_ASIDE_WINDOW_MS);
    log_int(r, "for_ms", (int64_t)ms);
    log_int(r, "times", h->times);
    log_end(r);
}

void policy_decide(policy_t *p, const policy_input_t *in, verdict_t *out)
{
    int ref = in->res != NULL ? p->handler[in->res->status] : p->error_ref;
    out->kind = VERDICT_PASS;
    if (ref == LUA_NOREF)
        return;
    handler_health_t *h = &p->health[in->res != NULL ? in->res->status : N_STATUS];
    if (h->until_ms != 0) {
        uint64_t now = clock_now_ms();
        if (now < h->until_ms) {
            out->failure = "set_aside";
            return;
        }
        h->until_ms = 0;
        h->probation_ms = now + SET_ASIDE_WINDOW_MS;
    }
    char msg[512];
    buf_t trace = BUF_INIT;
    msg[0] = '\0';
    sandbox_status_t st = call_handler(p, ref, in, out, msg, sizeof msg, &trace);
    if (st == SANDBOX_OK) {
        buf_free(&trace);
        return;
    }
    if (st == SANDBOX_TIMEOUT || st == SANDBOX_MEMORY)
        note_exhausted(h, &p->settings, in, clock_now_ms());
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
    /* a handler may raise with a secret in its message */
    log_redacted(r, "error", &p->settings, in, msg, strlen(msg));
    if (trace.len > 0)
        log_redacted(r, "traceback", &p->settings, in, trace.data, trace.len);
    log_end(r);
    buf_free(&trace);
}

/* ---- the policy's own tests ---------------------------------------------------- */

/* One test being run: what it allocates in C lives here, so that the
 * caller frees it whatever the protected step did. */
typedef struct {
    policy_t *p;
    http_head_t *req;
    http_head_t *res;
    verdict_t v;
    int handled;      /* a handler ran */
    char failed[256]; /* ... and failed: why */
    int expect;       /* check the test's expect table */
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
    lua_json_encode(L, 1);
    return 1;
}

/* Runs the case table at `t` through its handler: r->v, r->handled and
 * r->failed say what happened, the context what it raised. Returns 1, or 0
 * with r->why when the case itself is malformed. */
static int run_case(lua_State *L, test_run_t *r, int t)
{
    static const char *const known[] = {"name", "req", "res", "err", "attempt", "counts",
                                        "expect", NULL};
    policy_t *p = r->p;
    policy_input_t in = {0};
    size_t body_len = 0;

    lua_pushnil(L);
    if (lua_api_next_unknown(L, t, known))
        TEST_FAIL(r, "unknown key '%s' (a test has name, req, res or err, attempt, counts "
                     "and expect)",
                  lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1));
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
            if (sandbox_protect(L, encode_step, 1, 1, 0) != SANDBOX_OK) /* the message, whole */
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
        r->handled = 1;
        if (call_handler(p, ref, &in, &r->v, r->failed, sizeof r->failed, NULL) != SANDBOX_OK)
            verdict_reset(&r->v);
    }
    return 1;
}

/* Protected: runs the case table (2) for the run (1) and, for a test,
 * checks what it expects. Returns 0; r->passed and r->why say how it went. */
static int test_step(lua_State *L)
{
    static const char *const known_expect[] = {"verdict", "status", "reason", "alert", NULL};
    test_run_t *r = lua_touserdata(L, 1);
    policy_t *p = r->p;
    if (!run_case(L, r, 2))
        return 0;
    if (!r->expect) {
        r->passed = 1;
        return 0;
    }
    if (r->failed[0] != '\0')
        TEST_FAIL(r, "handler failed: %s", r->failed);

    int e = rawfield(L, 2, "expect") == LUA_TTABLE ? lua_gettop(L) : 0;
    if (!e)
        TEST_FAIL(r, "expect must be a table such as { verdict = \"retry\" }");
    lua_pushnil(L);
    if (lua_api_next_unknown(L, e, known_expect))
        TEST_FAIL(r, "expect: unknown key '%s' (it has verdict, status, reason and alert)",
                  lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1));
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

/* Runs the case table at `t` (r says whether it is a test); the caller
 * frees what r holds. */
static void run_protected(lua_State *L, test_run_t *r, int t)
{
    lua_pushlightuserdata(L, r);
    lua_pushvalue(L, t);
    if (sandbox_protect(L, test_step, 2, 0, 1) != SANDBOX_OK) {
        first_line(lua_tostring(L, -1), r->why, sizeof r->why);
        lua_pop(L, 1);
        r->passed = 0;
    }
}

static void test_run_free(test_run_t *r)
{
    verdict_reset(&r->v);
    http_head_free(r->req);
    http_head_free(r->res);
}

/* Runs the list of test tables at `tests`; `line_of` says whether their
 * names can be found in the policy's source. */
static int run_list(policy_t *p, lua_State *L, int tests, int line_of,
                    void (*report)(const policy_test_result_t *r, void *arg), void *arg,
                    char *err, size_t errlen)
{
    int failed = 0;
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
        int line = 0;
        if (rawfield(L, t, "name") == LUA_TSTRING) {
            snprintf(name, sizeof name, "%s", lua_tostring(L, -1));
            int nth = 1; /* tests may share a name: which one this is */
            for (lua_Integer j = 1; line_of && j < i; j++) {
                lua_rawgeti(L, tests, j);
                nth += lua_istable(L, -1) && rawfield(L, -1, "name") == LUA_TSTRING &&
                       strcmp(lua_tostring(L, -1), name) == 0;
                lua_settop(L, t + 1);
            }
            if (line_of) {
                p->anchor = source_line(p, "tests", 1, 0);
                line = source_line(p, name, nth, 1);
                p->anchor = 0;
            }
        } else {
            snprintf(name, sizeof name, "tests[%lld]", (long long)i);
        }
        test_run_t r = {.p = p, .v = VERDICT_INIT, .expect = 1};
        run_protected(L, &r, t);
        test_run_free(&r);
        failed += !r.passed;
        if (report != NULL) {
            policy_test_result_t res = {name, line, r.passed, r.why};
            report(&res, arg);
        }
        lua_settop(L, tests);
    }
    p->ctx.testing = 0;
    buf_free(&p->ctx.test_alerts);
    return failed;
}

int policy_run_tests(policy_t *p, void (*report)(const policy_test_result_t *r, void *arg),
                     void *arg, char *err, size_t errlen)
{
    if (p->tests_ref == LUA_NOREF)
        return 0;
    lua_State *L = sandbox_state(p->sandbox);
    int top = lua_gettop(L);
    if (!lua_checkstack(L, 8)) {
        errf(err, errlen, "out of memory");
        return -1;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->tests_ref);
    int failed = run_list(p, L, lua_gettop(L), 1, report, arg, err, errlen);
    lua_settop(L, top);
    return failed;
}

/* Protected: decodes the JSON (1, 2: text and length) into a Lua value. */
static int decode_step(lua_State *L)
{
    lua_json_decode(L, lua_touserdata(L, 1), (size_t)lua_tointeger(L, 2));
    return 1;
}

/* Pushes the Lua value of `json`, or returns -1 with `err`. */
static int push_json(policy_t *p, const char *json, size_t len, char *err, size_t errlen)
{
    lua_State *L = sandbox_state(p->sandbox);
    lua_pushlightuserdata(L, (void *)json);
    lua_pushinteger(L, (lua_Integer)len);
    if (sandbox_protect(L, decode_step, 2, 1, 1) != SANDBOX_OK) {
        first_line(lua_tostring(L, -1), err, errlen);
        lua_pop(L, 1);
        return -1;
    }
    if (lua_isnil(L, -1)) {
        errf(err, errlen, "not valid JSON");
        lua_pop(L, 1);
        return -1;
    }
    return 0;
}

int policy_run_cases(policy_t *p, const char *json, size_t len,
                     void (*report)(const policy_test_result_t *r, void *arg), void *arg,
                     char *err, size_t errlen)
{
    lua_State *L = sandbox_state(p->sandbox);
    int top = lua_gettop(L);
    if (!lua_checkstack(L, 8)) {
        errf(err, errlen, "out of memory");
        return -1;
    }
    size_t i = 0;
    while (i < len && (json[i] == ' ' || json[i] == '\t' || json[i] == '\r' || json[i] == '\n'))
        i++;
    if (i == len || json[i] != '[') {
        errf(err, errlen, "the cases must be a JSON array of test objects");
        return -1;
    }
    if (push_json(p, json, len, err, errlen) < 0)
        return -1;
    int failed = run_list(p, L, lua_gettop(L), 0, report, arg, err, errlen);
    lua_settop(L, top);
    return failed;
}

int policy_try(policy_t *p, const char *json, size_t len, int64_t now_ms, policy_outcome_t *out,
               char *err, size_t errlen)
{
    lua_State *L = sandbox_state(p->sandbox);
    int top = lua_gettop(L);
    memset(out, 0, sizeof *out);
    if (!lua_checkstack(L, 8)) {
        errf(err, errlen, "out of memory");
        return -1;
    }
    if (push_json(p, json, len, err, errlen) < 0)
        return -1;
    test_run_t r = {.p = p, .v = VERDICT_INIT};
    p->ctx.testing = 1;
    p->ctx.replay_now_ms = now_ms;
    run_protected(L, &r, lua_gettop(L));
    p->ctx.testing = 0;
    p->ctx.replay_now_ms = 0;
    lua_settop(L, top);
    int rc = 0;
    if (!r.passed) {
        errf(err, errlen, "%s", r.why);
        rc = -1;
    } else {
        out->handled = r.handled;
        out->kind = r.v.kind;
        snprintf(out->reason, sizeof out->reason, "%s", r.v.reason);
        out->status = r.v.status;
        snprintf(out->error, sizeof out->error, "%s", r.failed);
        out->logs = p->ctx.test_logs;
        const buf_t *a = &p->ctx.test_alerts;
        size_t n = a->len < sizeof out->alerts ? a->len : sizeof out->alerts - 1;
        for (size_t i = 0; i < n; i++)
            out->alerts[i] = a->data[i] == '\n' ? ',' : a->data[i];
        out->alerts[n > 0 && out->alerts[n - 1] == ',' ? n - 1 : n] = '\0';
    }
    test_run_free(&r);
    buf_free(&p->ctx.test_alerts);
    return rc;
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
    for (size_t i = 0; i < p->settings.n_secret_headers; i++)
        free(p->settings.secret_headers[i]);
    free(p->settings.secret_headers);
    sandbox_free(p->sandbox);
    buf_free(&p->ctx.test_alerts);
    free(p->path);
    free(p->src);
    free(p);
}
