/* lua_api: what a policy sees (see lua_api.h). */
#include "lua_api.h"

#include "alert.h"
#include "clock.h"
#include "counter.h"
#include "log.h"
#include "sandbox.h"

#include <cJSON.h>
#include <lauxlib.h>

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Registry keys: the addresses of these are unique light userdata. */
static const char VERDICT_MT = 0, REQ_MT = 0, RES_MT = 0, VIEW_INPUT = 0, TEST_COUNTS = 0;

#define JSON_MAX_DEPTH 64

/* Header values a policy (and so its logs and alerts) never gets to see. */
static const char *const SECRET_HEADERS[] = {"authorization", "proxy-authorization", "cookie",
                                             "set-cookie", "x-api-key", NULL};

static lua_api_ctx_t *ctx_of(lua_State *L)
{
    return sandbox_context(L);
}

static uint64_t next_random(lua_api_ctx_t *c)
{
    uint64_t s1 = c->rng[0];
    const uint64_t s0 = c->rng[1];
    c->rng[0] = s0;
    s1 ^= s1 << 23;
    c->rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return c->rng[1] + s0;
}

/* ---- JSON <-> Lua -------------------------------------------------------------- */

static void push_json(lua_State *L, const cJSON *j, int depth)
{
    luaL_checkstack(L, 3, "JSON nested too deeply");
    if (cJSON_IsString(j)) {
        lua_pushstring(L, j->valuestring);
    } else if (cJSON_IsNumber(j)) {
        double d = j->valuedouble;
        if (d == floor(d) && fabs(d) < 9007199254740992.0)
            lua_pushinteger(L, (lua_Integer)d);
        else
            lua_pushnumber(L, d);
    } else if (cJSON_IsBool(j)) {
        lua_pushboolean(L, cJSON_IsTrue(j));
    } else if (cJSON_IsArray(j) || cJSON_IsObject(j)) {
        if (depth >= CJSON_NESTING_LIMIT)
            luaL_error(L, "JSON nested too deeply");
        lua_createtable(L, cJSON_IsArray(j) ? cJSON_GetArraySize(j) : 0, 0);
        lua_Integer i = 1;
        for (const cJSON *c = j->child; c != NULL; c = c->next, i++) {
            if (cJSON_IsNull(c))
                continue; /* null is nil: an array keeps a hole */
            push_json(L, c, depth + 1);
            if (cJSON_IsArray(j))
                lua_rawseti(L, -2, i);
            else
                lua_setfield(L, -2, c->string);
        }
    } else {
        lua_pushnil(L);
    }
}

/* Whether the table at `idx` is a sequence 1..n with nothing else (n > 0). */
static lua_Integer sequence_length(lua_State *L, int idx)
{
    lua_Integer n = (lua_Integer)lua_rawlen(L, idx), count = 0;
    if (n == 0)
        return 0;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        lua_pop(L, 1);
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1 || lua_tointeger(L, -1) > n) {
            lua_pop(L, 1);
            return 0;
        }
        count++;
    }
    return count == n ? n : 0;
}

/* Encodes the value at `idx`; raises a Lua error for what JSON cannot hold. */
static cJSON *to_json(lua_State *L, int idx, int depth)
{
    idx = lua_absindex(L, idx);
    if (depth > JSON_MAX_DEPTH)
        luaL_error(L, "cannot encode as JSON: nested too deeply (or a cycle)");
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return cJSON_CreateNull();
    case LUA_TBOOLEAN: return cJSON_CreateBool(lua_toboolean(L, idx));
    case LUA_TNUMBER: {
        double d = lua_tonumber(L, idx);
        return isfinite(d) ? cJSON_CreateNumber(d) : cJSON_CreateNull();
    }
    case LUA_TSTRING: return cJSON_CreateString(lua_tostring(L, idx));
    case LUA_TTABLE: break;
    default:
        luaL_error(L, "cannot encode a %s as JSON", luaL_typename(L, idx));
        return NULL;
    }
    luaL_checkstack(L, 4, "JSON nested too deeply");
    lua_Integer n = sequence_length(L, idx);
    cJSON *out = n > 0 ? cJSON_CreateArray() : cJSON_CreateObject();
    if (out == NULL)
        luaL_error(L, "out of memory");
    if (n > 0) {
        for (lua_Integer i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            cJSON *item = to_json(L, -1, depth + 1);
            lua_pop(L, 1);
            cJSON_AddItemToArray(out, item);
        }
        return out;
    }
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        /* keys become strings; the copy keeps lua_next's key untouched */
        lua_pushvalue(L, -2);
        const char *k = lua_tostring(L, -1);
        if (k == NULL) {
            cJSON_Delete(out);
            luaL_error(L, "cannot encode a %s key as JSON", luaL_typename(L, -3));
        }
        cJSON *item = to_json(L, -2, depth + 1);
        cJSON_AddItemToObject(out, k, item);
        lua_pop(L, 2);
    }
    return out;
}

/* Pushes the JSON text of the value at `idx`; raises on failure. */
static void push_json_text(lua_State *L, int idx)
{
    cJSON *j = to_json(L, idx, 0);
    char *text = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (text == NULL)
        luaL_error(L, "out of memory");
    lua_pushstring(L, text);
    cJSON_free(text);
}

static int l_json_encode(lua_State *L)
{
    luaL_checkany(L, 1);
    push_json_text(L, 1);
    return 1;
}

static int l_json_decode(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    cJSON *j = cJSON_ParseWithLength(s, n);
    if (j == NULL) {
        lua_pushnil(L);
        lua_pushliteral(L, "invalid JSON");
        return 2;
    }
    push_json(L, j, 0);
    cJSON_Delete(j);
    return 1;
}

/* ---- errord.* helpers -------------------------------------------------------------- */

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
    if (ctx_of(L)->testing) {
        lua_rawgetp(L, LUA_REGISTRYINDEX, &TEST_COUNTS);
        lua_pushvalue(L, 1);
        lua_rawget(L, -2);
        lua_Integer c = lua_tointeger(L, -1) + add;
        lua_pop(L, 1);
        lua_pushvalue(L, 1);
        lua_pushinteger(L, c);
        lua_rawset(L, -3);
        lua_pushinteger(L, c);
        return 1;
    }
    int64_t now = clock_wall_ms();
    lua_pushinteger(L, add ? counter_hit(key, n, (int)seconds, now)
                           : counter_peek(key, n, (int)seconds, now));
    return 1;
}

uint64_t lua_api_backoff(lua_api_ctx_t *c, int attempt)
{
    uint64_t cap = c->settings->backoff_base_ms;
    for (int i = 1; i < attempt && cap < c->settings->backoff_max_ms; i++)
        cap *= 2;
    if (cap > c->settings->backoff_max_ms)
        cap = c->settings->backoff_max_ms;
    return cap == 0 ? 0 : next_random(c) % (cap + 1);
}

static int l_backoff(lua_State *L)
{
    lua_api_ctx_t *c = ctx_of(L);
    lua_Integer attempt = luaL_optinteger(L, 1, c->in ? c->in->attempt : 1);
    luaL_argcheck(L, attempt >= 1, 1, "attempt must be 1 or more");
    lua_pushinteger(L, (lua_Integer)lua_api_backoff(c, (int)(attempt > 64 ? 64 : attempt)));
    return 1;
}

static int l_now_ms(lua_State *L)
{
    lua_pushinteger(L, clock_wall_ms());
    return 1;
}

/* ---- verdicts ------------------------------------------------------------------------ */

static void new_verdict(lua_State *L, const char *kind)
{
    lua_createtable(L, 0, 4);
    lua_pushstring(L, kind);
    lua_setfield(L, -2, "verdict");
    lua_rawgetp(L, LUA_REGISTRYINDEX, &VERDICT_MT);
    lua_setmetatable(L, -2);
}

/* Raises an error for any key of the table at 1 not in `allowed`. */
static void check_keys(lua_State *L, const char *fn, const char *const *allowed)
{
    lua_pushnil(L);
    while (lua_next(L, 1) != 0) {
        lua_pop(L, 1);
        const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        int ok = 0;
        for (const char *const *a = allowed; k != NULL && *a != NULL && !ok; a++)
            ok = strcmp(k, *a) == 0;
        if (!ok) {
            luaL_error(L, "%s{}: unknown field '%s'", fn,
                       k ? k : luaL_tolstring(L, -1, NULL));
        }
    }
}

static int l_pass(lua_State *L)
{
    new_verdict(L, "pass");
    return 1;
}

static int l_retry(lua_State *L)
{
    static const char *const fields[] = {"after", "reason", "unsafe", NULL};
    if (lua_isnoneornil(L, 1))
        lua_newtable(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    check_keys(L, "retry", fields);
    new_verdict(L, "retry");
    lua_getfield(L, 1, "after");
    if (!lua_isnil(L, -1)) {
        if (!lua_isnumber(L, -1) || lua_tonumber(L, -1) < 0)
            luaL_error(L, "retry{}: after must be a number of milliseconds, 0 or more");
        lua_setfield(L, -2, "after");
    } else {
        lua_pop(L, 1);
    }
    lua_getfield(L, 1, "reason");
    if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "retry{}: reason must be a string");
    lua_setfield(L, -2, "reason");
    lua_getfield(L, 1, "unsafe");
    lua_setfield(L, -2, "unsafe");
    return 1;
}

static int valid_token(const char *s, size_t n)
{
    static const char extra[] = "!#$%&'*+-.^_`|~";
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && (s[i] == 0 || strchr(extra, s[i]) == NULL))
            return 0;
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
    check_keys(L, "respond", fields);
    new_verdict(L, "respond");
    lua_getfield(L, 1, "status");
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 200 || lua_tointeger(L, -1) > 599)
        luaL_error(L, "respond{}: status must be an integer from 200 to 599");
    lua_setfield(L, -2, "status");
    lua_getfield(L, 1, "json");
    lua_getfield(L, 1, "body");
    if (!lua_isnil(L, -1) && !lua_isnil(L, -2))
        luaL_error(L, "respond{}: give json or body, not both");
    if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "respond{}: body must be a string");
    if (!lua_isnil(L, -2)) {
        push_json_text(L, -2); /* encoded now, so mistakes point at respond{} */
        lua_setfield(L, -4, "json");
    }
    lua_setfield(L, -3, "body");
    lua_pop(L, 1); /* json */
    lua_getfield(L, 1, "headers");
    if (!lua_isnil(L, -1)) {
        luaL_argexpected(L, lua_istable(L, -1), 1, "headers as a table");
        lua_pushnil(L);
        while (lua_next(L, -2) != 0) {
            size_t kn, vn;
            if (lua_type(L, -2) != LUA_TSTRING || !lua_isstring(L, -1))
                luaL_error(L, "respond{}: headers maps names to strings");
            const char *k = lua_tolstring(L, -2, &kn);
            const char *v = lua_tolstring(L, -1, &vn);
            if (!valid_token(k, kn))
                luaL_error(L, "respond{}: '%s' is not a valid header name", k);
            if (!valid_field_value(v, vn))
                luaL_error(L, "respond{}: header '%s' has a control character in its value", k);
            for (const char *const *r = reserved; *r != NULL; r++)
                if (strcasecmp(k, *r) == 0)
                    luaL_error(L, "respond{}: errord sets '%s' itself", k);
            lua_pop(L, 1);
        }
    }
    lua_setfield(L, -2, "headers");
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

int lua_api_verdict(lua_State *L, int idx, verdict_t *out, char *err, size_t errlen)
{
    idx = lua_absindex(L, idx);
    if (lua_isnil(L, idx)) {
        out->kind = VERDICT_PASS;
        return 0;
    }
    if (!lua_getmetatable(L, idx)) {
        snprintf(err, errlen, "handler returned a %s, not a verdict (pass(), retry{} or respond{})",
                 luaL_typename(L, idx));
        return -1;
    }
    lua_rawgetp(L, LUA_REGISTRYINDEX, &VERDICT_MT);
    int is_verdict = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    if (!is_verdict) {
        snprintf(err, errlen, "handler returned a table that is not a verdict "
                              "(pass(), retry{} or respond{})");
        return -1;
    }
    lua_getfield(L, idx, "verdict");
    const char *kind = lua_tostring(L, -1);
    lua_pop(L, 1);
    if (strcmp(kind, "pass") == 0) {
        out->kind = VERDICT_PASS;
    } else if (strcmp(kind, "retry") == 0) {
        out->kind = VERDICT_RETRY;
        lua_getfield(L, idx, "after");
        out->after_ms = lua_isnil(L, -1) ? -1 : (int64_t)lua_tonumber(L, -1);
        lua_getfield(L, idx, "reason");
        size_t n = 0;
        const char *r = lua_tolstring(L, -1, &n);
        if (r != NULL)
            copy_reason(r, n, out->reason);
        lua_getfield(L, idx, "unsafe");
        out->unsafe = lua_toboolean(L, -1);
        lua_pop(L, 3);
    } else {
        out->kind = VERDICT_RESPOND;
        lua_getfield(L, idx, "status");
        out->status = (int)lua_tointeger(L, -1);
        lua_getfield(L, idx, "json");
        lua_getfield(L, idx, "body");
        size_t n = 0;
        int is_json = !lua_isnil(L, -2);
        const char *body = lua_tolstring(L, is_json ? -2 : -1, &n);
        if (body != NULL)
            buf_append(&out->body, body, n);
        lua_pop(L, 3);
        lua_getfield(L, idx, "headers");
        if (lua_istable(L, -1)) {
            lua_pushnil(L);
            while (lua_next(L, -2) != 0) {
                const char *k = lua_tostring(L, -2), *v = lua_tostring(L, -1);
                if (strcasecmp(k, "content-type") == 0)
                    out->has_content_type = 1; /* the policy's own wins over json's */
                buf_puts(&out->headers, k);
                buf_puts(&out->headers, ": ");
                buf_puts(&out->headers, v);
                buf_puts(&out->headers, "\r\n");
                lua_pop(L, 1);
            }
        }
        lua_pop(L, 1);
        if (is_json && !out->has_content_type) {
            buf_puts(&out->headers, "Content-Type: application/json\r\n");
            out->has_content_type = 1;
        }
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
            push_json_text(L, -1);
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
    luaL_checktype(L, 1, LUA_TTABLE);
    check_keys(L, "alert", fields);
    lua_getfield(L, 1, "name");
    lua_getfield(L, 1, "severity");
    lua_getfield(L, 1, "summary");
    lua_getfield(L, 1, "labels");
    size_t name_len;
    const char *name = lua_tolstring(L, 2, &name_len);
    if (lua_type(L, 2) != LUA_TSTRING || !valid_token(name, name_len))
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

/* ---- the req and res views ------------------------------------------------------------------ */

static const policy_input_t *view_input(lua_State *L, const char *what)
{
    lua_rawgetp(L, 1, &VIEW_INPUT);
    const policy_input_t *in = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (in == NULL)
        luaL_error(L, "%s was kept past its handler; copy what you need instead", what);
    return in;
}

static int is_secret(const char *name, size_t n)
{
    for (const char *const *s = SECRET_HEADERS; *s != NULL; s++)
        if (strlen(*s) == n && strncasecmp(name, *s, n) == 0)
            return 1;
    return 0;
}

/* headers: lower-case names; repeated fields joined with ", "; secrets
 * replaced by "[redacted]". */
static void push_headers(lua_State *L, const http_head_t *h)
{
    lua_createtable(L, 0, (int)h->n_headers);
    char name[256];
    for (size_t i = 0; i < h->n_headers; i++) {
        const http_header_t *f = &h->headers[i];
        size_t n = f->name_len < sizeof name ? f->name_len : sizeof name - 1;
        for (size_t k = 0; k < n; k++)
            name[k] = (char)tolower((unsigned char)f->name[k]);
        lua_pushlstring(L, name, n);
        if (is_secret(name, n))
            lua_pushliteral(L, "[redacted]");
        else
            lua_pushlstring(L, f->value, f->value_len);
        lua_pushvalue(L, -2);
        lua_rawget(L, -4);
        if (!lua_isnil(L, -1)) {
            /* earlier, ", ", this one */
            lua_insert(L, -2);
            lua_pushliteral(L, ", ");
            lua_insert(L, -2);
            lua_concat(L, 3);
        } else {
            lua_pop(L, 1);
        }
        lua_rawset(L, -3);
    }
}

static double ms(uint64_t ns)
{
    return (double)ns / 1e6;
}

/* Caches the value on top under the key at 2 and returns it. */
static int cache(lua_State *L)
{
    lua_pushvalue(L, 2);
    lua_pushvalue(L, -2);
    lua_rawset(L, 1);
    return 1;
}

static int req_index(lua_State *L)
{
    const policy_input_t *in = view_input(L, "req");
    const char *k = luaL_checkstring(L, 2);
    const http_head_t *r = in->req;
    if (strcmp(k, "method") == 0)
        lua_pushstring(L, r->method_name);
    else if (strcmp(k, "path") == 0)
        lua_pushlstring(L, r->target, r->target_len);
    else if (strcmp(k, "headers") == 0)
        push_headers(L, r);
    else if (strcmp(k, "id") == 0)
        lua_pushstring(L, in->request_id);
    else if (strcmp(k, "attempt") == 0)
        lua_pushinteger(L, in->attempt);
    else if (strcmp(k, "elapsed_ms") == 0)
        lua_pushnumber(L, ms(in->elapsed_ns));
    else
        return 0;
    return cache(L);
}

/* Retry-After as milliseconds from now: delta-seconds or an HTTP-date. */
static int push_retry_after(lua_State *L, const http_head_t *res)
{
    const http_header_t *h = http_head_find(res, "retry-after");
    if (h == NULL || h->value_len == 0)
        return 0;
    int64_t secs = 0;
    uint32_t i = 0;
    while (i < h->value_len && isdigit((unsigned char)h->value[i]) && secs < 100000000)
        secs = secs * 10 + (h->value[i++] - '0');
    if (i == h->value_len) {
        lua_pushinteger(L, secs * 1000);
        return 1;
    }
    time_t t;
    if (clock_parse_http_date(h->value, h->value_len, &t) < 0)
        return 0;
    int64_t delta = (int64_t)t * 1000 - clock_wall_ms();
    lua_pushinteger(L, delta > 0 ? delta : 0);
    return 1;
}

static int res_index(lua_State *L)
{
    const policy_input_t *in = view_input(L, "res");
    const char *k = luaL_checkstring(L, 2);
    if (strcmp(k, "status") == 0) {
        lua_pushinteger(L, in->res->status);
    } else if (strcmp(k, "headers") == 0) {
        push_headers(L, in->res);
    } else if (strcmp(k, "body") == 0) {
        if (in->body == NULL)
            return 0;
        lua_pushlstring(L, in->body, in->body_len);
    } else if (strcmp(k, "json") == 0) {
        cJSON *j = in->body ? cJSON_ParseWithLength(in->body, in->body_len) : NULL;
        if (j == NULL)
            return 0;
        push_json(L, j, 0);
        cJSON_Delete(j);
    } else if (strcmp(k, "retry_after_ms") == 0) {
        if (!push_retry_after(L, in->res))
            return 0;
    } else if (strcmp(k, "elapsed_ms") == 0) {
        lua_pushnumber(L, ms(in->attempt_ns));
    } else {
        return 0;
    }
    return cache(L);
}

static int view_newindex(lua_State *L)
{
    return luaL_error(L, "req and res are read-only");
}

static void push_view(lua_State *L, const void *mt_key, const policy_input_t *in)
{
    lua_createtable(L, 0, 4);
    lua_pushlightuserdata(L, (void *)in);
    lua_rawsetp(L, -2, &VIEW_INPUT);
    lua_rawgetp(L, LUA_REGISTRYINDEX, mt_key);
    lua_setmetatable(L, -2);
}

void lua_api_push_views(lua_State *L, const policy_input_t *in)
{
    push_view(L, &REQ_MT, in);
    if (in->res != NULL) {
        push_view(L, &RES_MT, in);
        return;
    }
    lua_createtable(L, 0, 2);
    lua_pushstring(L, in->err_kind);
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, in->err_message);
    lua_setfield(L, -2, "message");
}

void lua_api_end_views(lua_State *L, int req_idx, int res_idx)
{
    lua_pushnil(L);
    lua_rawsetp(L, req_idx, &VIEW_INPUT);
    lua_pushnil(L);
    lua_rawsetp(L, res_idx, &VIEW_INPUT);
}

void lua_api_reset_test_counts(lua_State *L, int idx)
{
    idx = lua_absindex(L, idx);
    lua_newtable(L);
    if (lua_istable(L, idx)) {
        lua_pushnil(L);
        while (lua_next(L, idx) != 0) {
            if (lua_type(L, -2) == LUA_TSTRING && lua_isinteger(L, -1)) {
                lua_pushvalue(L, -2);
                lua_insert(L, -2);
                lua_rawset(L, -4);
            } else {
                lua_pop(L, 1);
            }
        }
    }
    lua_rawsetp(L, LUA_REGISTRYINDEX, &TEST_COUNTS);
}

/* ---- installing -------------------------------------------------------------------------------- */

static void new_metatable(lua_State *L, const void *key, lua_CFunction index)
{
    lua_createtable(L, 0, 3);
    if (index != NULL) {
        lua_pushcfunction(L, index);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, view_newindex);
        lua_setfield(L, -2, "__newindex");
    }
    lua_pushliteral(L, "locked");
    lua_setfield(L, -2, "__metatable"); /* getmetatable() cannot reach it */
    lua_rawsetp(L, LUA_REGISTRYINDEX, key);
}

void lua_api_open(lua_State *L)
{
    new_metatable(L, &VERDICT_MT, NULL);
    new_metatable(L, &REQ_MT, req_index);
    new_metatable(L, &RES_MT, res_index);
    lua_api_reset_test_counts(L, 0);

    static const luaL_Reg globals[] = {
        {"pass", l_pass}, {"retry", l_retry}, {"respond", l_respond},
        {"log", l_log},   {"alert", l_alert}, {NULL, NULL},
    };
    lua_pushglobaltable(L);
    luaL_setfuncs(L, globals, 0);
    lua_pop(L, 1);

    static const luaL_Reg helpers[] = {
        {"count", l_count}, {"backoff", l_backoff}, {"now_ms", l_now_ms}, {NULL, NULL},
    };
    static const luaL_Reg json[] = {
        {"encode", l_json_encode}, {"decode", l_json_decode}, {NULL, NULL},
    };
    luaL_newlib(L, helpers);
    luaL_newlib(L, json);
    lua_setfield(L, -2, "json");
    lua_setglobal(L, "errord");
}
