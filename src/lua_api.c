/* lua_api: what a policy sees (see lua_api.h). */
#include "lua_api.h"

#include "alert.h"
#include "budget.h"
#include "clock.h"
#include "counter.h"
#include "log.h"
#include "lua_json.h"
#include "lua_view.h"
#include "redact.h"
#include "retry.h"
#include "sandbox.h"

#include <lauxlib.h>

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Registry keys: the addresses of these are unique light userdata. */
static const char VERDICT_MT = 0, TEST_COUNTS = 0;

/* The longest delay retry{} and errord.cooldown() accept: an hour. */
#define MAX_AFTER_MS 3600000

static const char *push_redacted(lua_State *L, const lua_api_ctx_t *c, const char *s, size_t n,
                                 int json);

static lua_api_ctx_t *ctx_of(lua_State *L)
{
    return sandbox_context(L);
}

/* ---- errord.* helpers -------------------------------------------------------------- */

/* errord.count in a policy test: what the case's `counts` preset for the
 * key (1), plus the events counted since. A preset is a number, the count
 * of every window, or a table of counts by window in seconds; an event
 * falls in every window. */
static int test_count(lua_State *L, lua_Integer seconds, lua_Integer add)
{
    lua_rawgetp(L, LUA_REGISTRYINDEX, &TEST_COUNTS);
    int counts = lua_gettop(L);
    lua_pushvalue(L, 1);
    if (lua_rawget(L, counts) == LUA_TTABLE) {
        int windows = lua_gettop(L);
        if (add) {
            for (lua_pushnil(L); lua_next(L, windows) != 0; lua_pop(L, 1)) {
                lua_pushvalue(L, -2);
                lua_pushinteger(L, lua_tointeger(L, -2) + 1);
                lua_rawset(L, windows); /* an existing field: next() goes on */
            }
        }
        /* [0] holds the events counted since: all a window not preset has */
        if (lua_rawgeti(L, windows, seconds) == LUA_TNIL)
            lua_rawgeti(L, windows, 0);
        return 1;
    }
    lua_Integer sum = lua_tointeger(L, -1) + add;
    lua_pushvalue(L, 1);
    lua_pushinteger(L, sum);
    lua_rawset(L, counts);
    lua_pushinteger(L, sum);
    return 1;
}

/* errord.count(key, seconds = 60, add = 1): adds `add` (1 or 0) events and
 * returns the events of the last `seconds`. */
static int l_count(lua_State *L)
{
    size_t n;
    const char *key = luaL_checklstring(L, 1, &n);
    lua_Integer seconds = luaL_optinteger(L, 2, 60);
    lua_Integer add = luaL_optinteger(L, 3, 1);
    luaL_argcheck(L, seconds >= 1 && seconds <= COUNTER_MAX_WINDOW, 2,
                  "window must be 1 to 3600 seconds");
    luaL_argcheck(L, add == 0 || add == 1, 3, "add is 1 (count this event) or 0 (only read)");
    lua_api_ctx_t *c = ctx_of(L);
    if (c->testing && c->replay_now_ms == 0)
        return test_count(L, seconds, add);
    int64_t now = c->replay_now_ms != 0 ? c->replay_now_ms : clock_wall_ms();
    lua_pushinteger(L, add ? counter_hit(key, n, (int)seconds, now)
                           : counter_peek(key, n, (int)seconds, now));
    return 1;
}

static int l_backoff(lua_State *L)
{
    lua_api_ctx_t *c = ctx_of(L);
    lua_Integer attempt = luaL_optinteger(L, 1, c->in ? c->in->attempt : 1);
    luaL_argcheck(L, attempt >= 1, 1, "attempt must be 1 or more");
    lua_pushinteger(L, (lua_Integer)retry_backoff_ms(c->settings, &c->rng,
                                                      (int)(attempt > 64 ? 64 : attempt)));
    return 1;
}

/* errord.cooldown(ms): the upstream asked everyone to slow down; new
 * requests and retries are held until then. */
static int l_cooldown(lua_State *L)
{
    lua_Number ms = luaL_checknumber(L, 1);
    luaL_argcheck(L, ms >= 0 && ms <= MAX_AFTER_MS, 1, "a number of milliseconds, 0 to 3600000");
    if (!ctx_of(L)->testing)
        budget_cooldown(clock_now_ms() + (uint64_t)ms);
    return 0;
}

static int l_now_ms(lua_State *L)
{
    lua_api_ctx_t *c = ctx_of(L);
    lua_pushinteger(L, c->replay_now_ms != 0 ? c->replay_now_ms : clock_wall_ms());
    return 1;
}

/* ---- verdicts ------------------------------------------------------------------------ */

/* A verdict is an immutable userdata: what retry{} and respond{} checked is
 * what errord reads, whatever the script does with its tables afterwards.
 * User values: 1, the header lines of respond{}; 2, its body. */
typedef struct {
    verdict_kind_t kind;
    int64_t after_ms;
    char reason[VERDICT_REASON_MAX + 1];
    int unsafe;
    int cooldown;
    int status;
    int has_content_type;
} lverdict_t;

static lverdict_t *new_verdict(lua_State *L, verdict_kind_t kind)
{
    lverdict_t *v = lua_newuserdatauv(L, sizeof *v, 2);
    memset(v, 0, sizeof *v);
    v->kind = kind;
    v->after_ms = -1;
    lua_rawgetp(L, LUA_REGISTRYINDEX, &VERDICT_MT);
    lua_setmetatable(L, -2);
    return v;
}

/* verdict.verdict is "pass", "retry" or "respond"; nothing else reads. */
static int verdict_index(lua_State *L)
{
    const lverdict_t *v = lua_touserdata(L, 1);
    const char *k = lua_tostring(L, 2);
    if (k != NULL && strcmp(k, "verdict") == 0) {
        lua_pushstring(L, verdict_name(v->kind));
        return 1;
    }
    return 0;
}

int lua_api_next_unknown(lua_State *L, int t, const char *const *known)
{
    t = lua_absindex(L, t);
    while (lua_next(L, t) != 0) {
        lua_pop(L, 1); /* the value */
        const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        int found = 0;
        for (const char *const *q = known; k != NULL && *q != NULL && !found; q++)
            found = strcmp(k, *q) == 0;
        if (!found)
            return 1;
    }
    return 0;
}

/* Raises an error for the first key of the table at 1 not in `allowed`. */
static void check_keys(lua_State *L, const char *fn, const char *const *allowed)
{
    lua_pushnil(L);
    if (!lua_api_next_unknown(L, 1, allowed))
        return;
    if (lua_type(L, -1) == LUA_TSTRING)
        luaL_error(L, "%s{}: unknown field '%s'", fn, lua_tostring(L, -1));
    luaL_error(L, "%s{}: unknown %s key", fn, luaL_typename(L, -1));
}

/* Checks that the argument at 1 is a table with no keys but `fields`, and
 * pushes those fields in their order (read as the policy would: this runs
 * inside its call). */
static void push_fields(lua_State *L, const char *fn, const char *const *fields)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    check_keys(L, fn, fields);
    for (const char *const *f = fields; *f != NULL; f++)
        lua_getfield(L, 1, *f);
}

static int l_pass(lua_State *L)
{
    new_verdict(L, VERDICT_PASS);
    return 1;
}

static void copy_reason(const char *s, size_t n, char out[VERDICT_REASON_MAX + 1])
{
    /* Reasons become metric labels: lower-case words, bounded in length. */
    size_t i;
    for (i = 0; i < n && i < VERDICT_REASON_MAX; i++) {
        char c = (char)tolower((unsigned char)s[i]);
        out[i] = (isalnum((unsigned char)c) || c == '_') ? c : '_';
    }
    out[i] = '\0';
}


static int l_retry(lua_State *L)
{
    static const char *const fields[] = {"after", "reason", "unsafe", "cooldown", NULL};
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    }
    push_fields(L, "retry", fields); /* 2 to 5 */
    lverdict_t *v = new_verdict(L, VERDICT_RETRY);
    if (!lua_isnil(L, 2)) {
        double after = lua_tonumber(L, 2);
        if (!lua_isnumber(L, 2) || !(after >= 0 && after <= MAX_AFTER_MS))
            luaL_error(L, "retry{}: after must be a number of milliseconds from 0 to %d",
                       MAX_AFTER_MS);
        v->after_ms = (int64_t)after;
    }
    if (!lua_isnil(L, 3)) {
        size_t n;
        if (lua_type(L, 3) != LUA_TSTRING)
            luaL_error(L, "retry{}: reason must be a string");
        const char *r = lua_tolstring(L, 3, &n);
        r = push_redacted(L, ctx_of(L), r, n, 0); /* reasons are logged too */
        copy_reason(r, lua_rawlen(L, -1), v->reason);
        lua_pop(L, 1);
    }
    v->unsafe = lua_toboolean(L, 4);
    v->cooldown = lua_toboolean(L, 5);
    return 1;
}

static int valid_field_value(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return 0;
    }
    return 1;
}

static int l_respond(lua_State *L)
{
    static const char *const fields[] = {"status", "json", "body", "headers", NULL};
    static const char *const reserved[] = {"content-length", "transfer-encoding", "connection",
                                           "keep-alive", "upgrade", "te", "trailer",
                                           "proxy-connection", NULL};
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    push_fields(L, "respond", fields); /* 2 to 5 */
    if (!lua_isinteger(L, 2) || lua_tointeger(L, 2) < 200 || lua_tointeger(L, 2) > 599)
        luaL_error(L, "respond{}: status must be an integer from 200 to 599");
    if (!lua_isnil(L, 3) && !lua_isnil(L, 4))
        luaL_error(L, "respond{}: give json or body, not both");
    if (!lua_isnil(L, 4) && lua_type(L, 4) != LUA_TSTRING)
        luaL_error(L, "respond{}: body must be a string");
    if (!lua_isnil(L, 3))
        lua_json_encode(L, 3); /* 6: encoded now, so mistakes point at respond{} */
    else
        lua_pushvalue(L, 4); /* 6: the body, or nil */

    /* The header lines, checked and copied now, gathered in slot 7. */
    int has_ct = 0;
    lua_pushliteral(L, ""); /* 7 */
    if (!lua_isnil(L, 5)) {
        if (!lua_istable(L, 5))
            luaL_error(L, "respond{}: headers must be a table");
        lua_pushnil(L);
        while (lua_next(L, 5) != 0) {
            size_t kn, vn;
            if (lua_type(L, -2) != LUA_TSTRING ||
                (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER))
                luaL_error(L, "respond{}: headers map names to strings");
            const char *k = lua_tolstring(L, -2, &kn);
            const char *v = lua_tolstring(L, -1, &vn); /* the value slot may become a string */
            if (!http_is_token(k, kn))
                luaL_error(L, "respond{}: '%s' is not a valid header name", k);
            if (!valid_field_value(v, vn))
                luaL_error(L, "respond{}: header '%s' has a control character in its value", k);
            for (const char *const *r = reserved; *r != NULL; r++)
                if (strcasecmp(k, *r) == 0)
                    luaL_error(L, "respond{}: errord sets '%s' itself", k);
            if (strcasecmp(k, "content-type") == 0)
                has_ct = 1;
            lua_pushvalue(L, 7);
            lua_pushlstring(L, k, kn);
            lua_pushliteral(L, ": ");
            lua_pushlstring(L, v, vn);
            lua_pushliteral(L, "\r\n");
            lua_concat(L, 5);
            lua_replace(L, 7);
            lua_pop(L, 1); /* the value; the key stays for lua_next */
        }
    }
    if (!lua_isnil(L, 3) && !has_ct) {
        lua_pushvalue(L, 7);
        lua_pushliteral(L, "Content-Type: application/json\r\n");
        lua_concat(L, 2);
        lua_replace(L, 7);
        has_ct = 1;
    }
    lua_pushvalue(L, 7); /* the header lines */
    lverdict_t *v = new_verdict(L, VERDICT_RESPOND);
    v->status = (int)lua_tointeger(L, 2);
    v->has_content_type = has_ct;
    lua_insert(L, -2);
    lua_setiuservalue(L, -2, 1); /* pops the header lines */
    lua_pushvalue(L, 6);
    lua_setiuservalue(L, -2, 2); /* the body */
    return 1;
}

/* Turns the value at `idx` (what a handler returned: nil or a verdict
 * userdata) into `out`, copying respond{}'s header lines and body into
 * out's buffers. Runs no Lua code and does not raise. Returns 0, or -1
 * with a message in `err` when the value is not a verdict. */
static int read_verdict(lua_State *L, int idx, verdict_t *out, char *err, size_t errlen)
{
    idx = lua_absindex(L, idx);
    if (lua_isnil(L, idx)) {
        out->kind = VERDICT_PASS;
        return 0;
    }
    int is_verdict = 0;
    if (lua_type(L, idx) == LUA_TUSERDATA && lua_getmetatable(L, idx)) {
        lua_rawgetp(L, LUA_REGISTRYINDEX, &VERDICT_MT);
        is_verdict = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
    }
    if (!is_verdict) {
        snprintf(err, errlen, "handler returned a %s, not a verdict (pass(), retry{} or respond{})",
                 luaL_typename(L, idx));
        return -1;
    }
    const lverdict_t *v = lua_touserdata(L, idx);
    out->kind = v->kind;
    out->after_ms = v->after_ms;
    memcpy(out->reason, v->reason, sizeof out->reason);
    out->unsafe = v->unsafe;
    out->cooldown = v->cooldown;
    out->status = v->status;
    out->has_content_type = v->has_content_type;
    if (v->kind == VERDICT_RESPOND) {
        size_t n;
        const char *s;
        lua_getiuservalue(L, idx, 1);
        if ((s = lua_tolstring(L, -1, &n)) != NULL)
            buf_append(&out->headers, s, n);
        lua_getiuservalue(L, idx, 2);
        if ((s = lua_tolstring(L, -1, &n)) != NULL)
            buf_append(&out->body, s, n);
        lua_pop(L, 2);
    }
    return 0;
}

/* ---- side effects ------------------------------------------------------------------------ */

/* The status, attempt and request id of the call in progress. */
static void add_call_fields(log_record_t *r, const policy_input_t *in)
{
    if (in == NULL)
        return;
    log_str(r, "request_id", in->request_id);
    if (in->res != NULL)
        log_int(r, "status", in->res->status);
    else
        log_str(r, "error_kind", in->err_kind);
    log_int(r, "attempt", in->attempt);
}

/* Protected: pushes the text of the buffer (1). */
static int push_buf_step(lua_State *L)
{
    const buf_t *b = lua_touserdata(L, 1);
    lua_pushlstring(L, b->data, b->len);
    return 1;
}

/* Pushes `s` with the secrets of the call in progress (SPEC §6) replaced
 * by "[redacted]": a policy that logs or alerts with them leaks nothing.
 * With `json`, `s` is JSON text. `s` is a Lua string: secrets are looked
 * for up to its first NUL, and a string with one found ends there. Returns
 * the pushed string. */
static const char *push_redacted(lua_State *L, const lua_api_ctx_t *c, const char *s, size_t n,
                                 int json)
{
    buf_t clean = BUF_INIT;
    luaL_checkstack(L, 3, "redacting");
    if (!redact_scrub(c->settings, c->in, s, strlen(s), json, &clean)) {
        lua_pushlstring(L, s, n);
        return lua_tostring(L, -1);
    }
    lua_pushlightuserdata(L, &clean);
    sandbox_status_t st = sandbox_protect(L, push_buf_step, 1, 1, 0);
    buf_free(&clean);
    if (st != SANDBOX_OK)
        lua_error(L); /* rethrown, the copy freed */
    return lua_tostring(L, -1);
}

static int reserved_log_key(const char *k)
{
    static const char *const keys[] = {"time", "level", "type", "request_id", "status",
                                       "attempt", "error_kind", NULL};
    for (const char *const *p = keys; *p != NULL; p++)
        if (strcmp(k, *p) == 0)
            return 1;
    return 0;
}

static int l_log(lua_State *L)
{
    lua_api_ctx_t *c = ctx_of(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    log_level_t level = LOG_INFO;
    lua_getfield(L, 1, "level");
    if (!lua_isnil(L, -1) &&
        (lua_type(L, -1) != LUA_TSTRING || log_level_parse(lua_tostring(L, -1), &level) < 0))
        luaL_error(L, "log{}: level must be \"debug\", \"info\", \"warn\" or \"error\"");
    lua_pop(L, 1);
    /* Encode every field first: a field JSON cannot hold raises here, before
     * anything is written. */
    lua_newtable(L);
    int fields = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, 1) != 0) {
        if (lua_type(L, -2) == LUA_TSTRING && !reserved_log_key(lua_tostring(L, -2)) &&
            strcmp(lua_tostring(L, -2), "level") != 0) {
            lua_json_encode(L, -1);
            size_t n;
            const char *json = lua_tolstring(L, -1, &n);
            push_redacted(L, c, json, n, 1);
            lua_remove(L, -2);
            lua_pushvalue(L, -3);
            lua_insert(L, -2);
            lua_rawset(L, fields);
        }
        lua_pop(L, 1);
    }
    if (c->testing) {
        c->test_logs++;
        return 0;
    }
    log_record_t *r = log_begin(level, NULL);
    log_str(r, "type", "log");
    add_call_fields(r, c->in);
    lua_pushnil(L);
    while (lua_next(L, fields) != 0) {
        size_t n;
        const char *json = lua_tolstring(L, -1, &n);
        log_raw(r, lua_tostring(L, -2), json, n);
        lua_pop(L, 1);
    }
    log_end(r);
    return 0;
}

static int compare_labels(const void *a, const void *b)
{
    return strcmp(((const alert_label_t *)a)->key, ((const alert_label_t *)b)->key);
}

#define MAX_LABELS 32

static int l_alert(lua_State *L)
{
    static const char *const fields[] = {"name", "severity", "summary", "labels", NULL};
    lua_api_ctx_t *c = ctx_of(L);
    push_fields(L, "alert", fields); /* 2 to 5 */
    size_t name_len;
    const char *name = lua_tolstring(L, 2, &name_len);
    if (lua_type(L, 2) != LUA_TSTRING || !http_is_token(name, name_len))
        luaL_error(L, "alert{}: name must be a word such as \"UpstreamDown\"");
    const char *severity = lua_isnil(L, 3) ? "warning" : lua_tostring(L, 3);
    const char *summary = lua_isnil(L, 4) ? "" : lua_tostring(L, 4);
    if (severity == NULL || summary == NULL)
        luaL_error(L, "alert{}: severity and summary must be strings");

    alert_label_t labels[MAX_LABELS];
    size_t n_labels = 0;
    if (!lua_isnil(L, 5)) {
        luaL_argexpected(L, lua_istable(L, 5), 1, "labels as a table");
        lua_pushnil(L);
        while (lua_next(L, 5) != 0) {
            /* Strings held by the labels table stay put while it lives. */
            if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "alert{}: labels map names to strings");
            if (n_labels == MAX_LABELS)
                luaL_error(L, "alert{}: at most %d labels", MAX_LABELS);
            labels[n_labels].key = lua_tostring(L, -2);
            labels[n_labels].value = lua_tostring(L, -1);
            n_labels++;
            lua_pop(L, 1);
        }
        qsort(labels, n_labels, sizeof *labels, compare_labels);
    }
    if (c->testing) {
        buf_puts(&c->test_alerts, name);
        buf_puts(&c->test_alerts, "\n");
        return 0;
    }
    /* Secrets out: the redacted strings stay on the stack until the end. */
    luaL_checkstack(L, 2 + 2 * MAX_LABELS, "alert{}");
    severity = push_redacted(L, c, severity, strlen(severity), 0);
    summary = push_redacted(L, c, summary, strlen(summary), 0);
    for (size_t i = 0; i < n_labels; i++)
        labels[i].value = push_redacted(L, c, labels[i].value, strlen(labels[i].value), 0);
    alert_event_t ev = {name, severity, summary, labels, n_labels};
    int64_t count = alert_fire(&ev, clock_wall_ms());
    log_record_t *r = log_begin(LOG_WARN, NULL);
    log_str(r, "type", "alert");
    log_str(r, "name", name);
    log_str(r, "severity", severity);
    log_str(r, "summary", summary);
    if (n_labels > 0) {
        buf_t b = BUF_INIT;
        buf_puts(&b, "{");
        for (size_t i = 0; i < n_labels; i++) {
            buf_puts(&b, i ? ",\"" : "\"");
            buf_json_escape(&b, labels[i].key, strlen(labels[i].key));
            buf_puts(&b, "\":\"");
            buf_json_escape(&b, labels[i].value, strlen(labels[i].value));
            buf_puts(&b, "\"");
        }
        buf_puts(&b, "}");
        log_raw(r, "labels", b.data, b.len);
        buf_free(&b);
    }
    log_int(r, "count", count);
    add_call_fields(r, c->in);
    log_end(r);
    return 0;
}

/* print() writes a log record (kept inside a policy's tests) instead of
 * writing to stdout. */
static int l_print(lua_State *L)
{
    int n = lua_gettop(L);
    for (int i = 1; i <= n; i++) {
        luaL_tolstring(L, i, NULL); /* may run __tostring: this is inside the call */
        if (i < n)
            lua_pushliteral(L, "\t");
    }
    lua_concat(L, n == 0 ? 0 : 2 * n - 1);
    lua_api_ctx_t *c = ctx_of(L);
    if (c->testing) {
        c->test_logs++;
        return 0;
    }
    size_t len;
    const char *text = lua_tolstring(L, -1, &len);
    text = push_redacted(L, c, text, len, 0);
    log_record_t *r = log_begin(LOG_INFO, "policy print");
    log_str(r, "text", text);
    add_call_fields(r, c->in);
    log_end(r);
    return 0;
}

/* Pushes a copy of the preset table at `idx` ({[seconds] = count}) with
 * integer keys (a case read from JSON names its windows with strings), and
 * [0] = 0 for the events test_count() counts. */
static void push_window_counts(lua_State *L, int idx)
{
    lua_newtable(L);
    lua_pushinteger(L, 0);
    lua_rawseti(L, -2, 0);
    for (lua_pushnil(L); lua_next(L, idx) != 0; lua_pop(L, 1)) {
        int seconds_ok = 0, count_ok = 0;
        lua_Integer seconds = lua_tointegerx(L, -2, &seconds_ok);
        lua_Integer count = lua_tointegerx(L, -1, &count_ok);
        if (seconds_ok && count_ok && seconds > 0) {
            lua_pushinteger(L, count);
            lua_rawseti(L, -4, seconds);
        }
    }
}

void lua_api_reset_test_counts(lua_State *L, int idx)
{
    idx = lua_absindex(L, idx);
    lua_newtable(L);
    if (lua_istable(L, idx)) {
        for (lua_pushnil(L); lua_next(L, idx) != 0; lua_pop(L, 1)) {
            if (lua_type(L, -2) != LUA_TSTRING)
                continue;
            if (lua_istable(L, -1))
                push_window_counts(L, lua_gettop(L));
            else if (lua_isinteger(L, -1))
                lua_pushvalue(L, -1);
            else
                continue;
            lua_pushvalue(L, -3);
            lua_insert(L, -2);
            lua_rawset(L, -5);
        }
    }
    lua_rawsetp(L, LUA_REGISTRYINDEX, &TEST_COUNTS);
}

/* ---- the handler call ------------------------------------------------------------------------ */

/* Protected: pushes the views of the input (1). */
static int views_step(lua_State *L)
{
    lua_view_push(L, lua_touserdata(L, 1));
    return 2;
}

void lua_api_error_line(const char *msg, const char *path, char *out, size_t n)
{
    size_t len = strcspn(msg ? msg : "", "\n");
    snprintf(out, n, "%.*s", (int)len, msg ? msg : "(no message)");
    if (path == NULL || strncmp(out, "...", 3) != 0)
        return;
    const char *rest = out + 3;
    size_t plen = strlen(path);
    for (const char *c = strchr(rest, ':'); c != NULL; c = strchr(c + 1, ':')) {
        size_t k = (size_t)(c - rest);
        if (k <= plen && memcmp(rest, path + plen - k, k) == 0) {
            char tail[512];
            snprintf(tail, sizeof tail, "%s", c);
            snprintf(out, n, "%s%s", path, tail);
            return;
        }
    }
}

sandbox_status_t lua_api_call_handler(sandbox_t *sb, int ref, const policy_input_t *in,
                                      const char *path, verdict_t *out, char *msg, size_t msglen,
                                      buf_t *trace)
{
    lua_State *L = sandbox_state(sb);
    lua_api_ctx_t *c = ctx_of(L);
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
    c->in = in;
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    lua_pushvalue(L, top + 1);
    lua_pushvalue(L, top + 2);
    sandbox_status_t st = sandbox_call(sb, 2, 1);
    c->in = NULL;
    if (st == SANDBOX_OK) {
        if (read_verdict(L, -1, out, msg, msglen) < 0)
            st = SANDBOX_ERROR;
    } else {
        const char *text = lua_tostring(L, -1);
        lua_api_error_line(text, path, msg, msglen);
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
    lua_view_end(L, top + 1, top + 2);
    lua_settop(L, top);
    return st;
}

/* ---- installing -------------------------------------------------------------------------------- */

void lua_api_open(lua_State *L)
{
    lua_view_metatable(L, &VERDICT_MT, verdict_index);
    lua_view_open(L);
    lua_api_reset_test_counts(L, 0);

    static const luaL_Reg globals[] = {
        {"pass", l_pass}, {"retry", l_retry}, {"respond", l_respond},
        {"log", l_log},   {"alert", l_alert}, {"print", l_print}, {NULL, NULL},
    };
    lua_pushglobaltable(L);
    luaL_setfuncs(L, globals, 0);
    lua_pop(L, 1);

    static const luaL_Reg helpers[] = {
        {"count", l_count},   {"backoff", l_backoff}, {"now_ms", l_now_ms},
        {"cooldown", l_cooldown}, {NULL, NULL},
    };
    luaL_newlib(L, helpers);
    lua_json_push_lib(L);
    lua_setfield(L, -2, "json");
    lua_setglobal(L, "errord");
}
