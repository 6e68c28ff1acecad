/* policy_test: a policy's own tests (p.tests), external test cases, and
 * one case asked about on its own (see policy.h). Each runs its handler as
 * a request would, with side effects kept inside the test. */
#include "policy_internal.h"

#include "lua_json.h"

#include <lauxlib.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
 * owns it as soon as it exists). */
static void test_head(lua_State *L, int idx, int is_res, http_head_t **slot)
{
    size_t n_headers = 0;
    int headers = policy_rawfield(L, idx, "headers") == LUA_TTABLE ? lua_gettop(L) : 0;
    if (headers)
        for (lua_pushnil(L); lua_next(L, headers) != 0; lua_pop(L, 1))
            n_headers++;
    if (!is_res) {
        policy_rawfield(L, idx, "method");
        policy_rawfield(L, idx, "path");
        const char *m = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "GET";
        const char *path = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "/";
        *slot = http_head_new(m, path, 0, n_headers);
        lua_pop(L, 2);
    } else {
        policy_rawfield(L, idx, "status");
        int status = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 0;
        *slot = http_head_new(NULL, NULL, status, n_headers);
        lua_pop(L, 1);
    }
    if (*slot == NULL)
        luaL_error(L, "out of memory");
    if (headers) {
        for (lua_pushnil(L); lua_next(L, headers) != 0; lua_pop(L, 1)) {
            size_t kn, vn;
            if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
                continue;
            const char *k = lua_tolstring(L, -2, &kn);
            const char *v = lua_tolstring(L, -1, &vn);
            if (http_head_add(*slot, k, kn, v, vn) < 0)
                luaL_error(L, "out of memory");
        }
    }
    lua_pop(L, 1); /* headers */
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
    int req = policy_rawfield(L, t, "req") == LUA_TTABLE ? lua_gettop(L) : 0;
    if (!req && !lua_isnil(L, -1))
        TEST_FAIL(r, "req must be a table");
    if (req)
        test_head(L, req, 0, &r->req);
    else {
        lua_newtable(L);
        test_head(L, lua_gettop(L), 0, &r->req);
    }
    int res = policy_rawfield(L, t, "res") == LUA_TTABLE ? lua_gettop(L) : 0;
    int err = policy_rawfield(L, t, "err") == LUA_TTABLE ? lua_gettop(L) : 0;
    if (res) {
        test_head(L, res, 1, &r->res);
        if (r->res->status < 100 || r->res->status > 599)
            TEST_FAIL(r, "res.status must be a status from 100 to 599");
        if (policy_rawfield(L, res, "json") != LUA_TNIL) {
            if (sandbox_protect(L, encode_step, 1, 1, 0) != SANDBOX_OK) /* the message, whole */
                TEST_FAIL(r, "res.json: %s", lua_tostring(L, -1));
        } else {
            policy_rawfield(L, res, "body");
        }
        if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
            TEST_FAIL(r, "res.body must be a string");
        in.body = lua_isnil(L, -1) ? "" : lua_tolstring(L, -1, &body_len);
        in.body_len = body_len;
    } else if (err) {
        policy_rawfield(L, err, "kind");
        policy_rawfield(L, err, "message");
        in.err_kind = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "connect";
        in.err_message = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
    } else {
        TEST_FAIL(r, "a test needs res = { status = ... } or err = { kind = ... }");
    }
    in.req = r->req;
    in.res = r->res;
    in.request_id = "test";
    policy_rawfield(L, t, "attempt");
    in.attempt = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 1;
    lua_pop(L, 1);

    int ref = r->res != NULL ? p->handler[r->res->status] : p->error_ref;
    buf_clear(&p->ctx.test_alerts);
    p->ctx.test_logs = 0;
    policy_rawfield(L, t, "counts"); /* what errord.count() has seen before the test */
    lua_api_reset_test_counts(L, -1);
    lua_pop(L, 1);
    if (ref != LUA_NOREF) {
        r->handled = 1;
        if (lua_api_call_handler(p->sandbox, ref, &in, p->path, &r->v, r->failed,
                                 sizeof r->failed, NULL) != SANDBOX_OK)
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

    int e = policy_rawfield(L, 2, "expect") == LUA_TTABLE ? lua_gettop(L) : 0;
    if (!e)
        TEST_FAIL(r, "expect must be a table such as { verdict = \"retry\" }");
    lua_pushnil(L);
    if (lua_api_next_unknown(L, e, known_expect))
        TEST_FAIL(r, "expect: unknown key '%s' (it has verdict, status, reason and alert)",
                  lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1));
    policy_rawfield(L, e, "verdict");
    if (lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), verdict_name(r->v.kind)) != 0)
        TEST_FAIL(r, "expected verdict %s, got %s", lua_tostring(L, -1), verdict_name(r->v.kind));
    policy_rawfield(L, e, "status");
    if (lua_isinteger(L, -1) &&
        (r->v.kind != VERDICT_RESPOND || r->v.status != lua_tointeger(L, -1)))
        TEST_FAIL(r, "expected respond with status %d, got %s %d", (int)lua_tointeger(L, -1),
                  verdict_name(r->v.kind), r->v.status);
    policy_rawfield(L, e, "reason");
    if (lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), r->v.reason) != 0)
        TEST_FAIL(r, "expected reason \"%s\", got \"%s\"", lua_tostring(L, -1), r->v.reason);
    policy_rawfield(L, e, "alert");
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
        lua_api_error_line(lua_tostring(L, -1), NULL, r->why, sizeof r->why);
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
            snprintf(err, errlen, "tests[%lld] is a %s, not a test table", (long long)i,
                     luaL_typename(L, t));
            failed = -1;
            break;
        }
        char name[128];
        int line = 0;
        if (policy_rawfield(L, t, "name") == LUA_TSTRING) {
            snprintf(name, sizeof name, "%s", lua_tostring(L, -1));
            int nth = 1; /* tests may share a name: which one this is */
            for (lua_Integer j = 1; line_of && j < i; j++) {
                lua_rawgeti(L, tests, j);
                nth += lua_istable(L, -1) && policy_rawfield(L, -1, "name") == LUA_TSTRING &&
                       strcmp(lua_tostring(L, -1), name) == 0;
                lua_settop(L, t + 1);
            }
            if (line_of) {
                p->anchor = policy_source_line(p, "tests", 1, 0);
                line = policy_source_line(p, name, nth, 1);
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
        snprintf(err, errlen, "out of memory");
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
        lua_api_error_line(lua_tostring(L, -1), NULL, err, errlen);
        lua_pop(L, 1);
        return -1;
    }
    if (lua_isnil(L, -1)) {
        snprintf(err, errlen, "not valid JSON");
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
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    size_t i = 0;
    while (i < len && (json[i] == ' ' || json[i] == '\t' || json[i] == '\r' || json[i] == '\n'))
        i++;
    if (i == len || json[i] != '[') {
        snprintf(err, errlen, "the cases must be a JSON array of test objects");
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
        snprintf(err, errlen, "out of memory");
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
        snprintf(err, errlen, "%s", r.why);
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
