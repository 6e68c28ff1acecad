/* policy: the Lua policy engine as a user meets it (SPEC §2): which handler
 * a status reaches, what a handler sees in req and res, what its verdicts
 * become, the side effects and helpers, settings, the policy's own tests and
 * the errors a broken policy file gets. The sandbox's limits and escape
 * attempts are in test_sandbox.c.
 *
 * Policies are small files written into a temporary directory (see
 * policy_fixture.h), plus the checked-in ones under tests/policies/ and
 * lua/. errord's log goes to stdout; the tests capture it, both to keep the
 * runner's output clean and to check what a user would read there. */
#include "alert.h"
#include "clock.h"
#include "counter.h"
#include "policy.h"
#include "policy_fixture.h"
#include "test.h"

#include <cJSON.h>
#include <glob.h>
#include <math.h>
#include <stdlib.h>
#include <strings.h>

/* ---- helpers --------------------------------------------------------------------- */

/* The JSON body of a respond verdict (NULL when it is not JSON). */
static cJSON *body_json(verdict_t *v)
{
    return cJSON_Parse(fx_body(v));
}

static const char *jstr(const cJSON *o, const char *key)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(j) ? j->valuestring : NULL;
}

static double jnum(const cJSON *o, const char *key)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(j) ? j->valuedouble : NAN;
}

/* policy_run_tests() results, copied out of the report callback. */
#define MAX_RESULTS 32
typedef struct {
    int n;
    char name[MAX_RESULTS][128];
    int passed[MAX_RESULTS];
    char message[MAX_RESULTS][512];
} results_t;

static void collect(const policy_test_result_t *r, void *arg)
{
    results_t *res = arg;
    if (res->n == MAX_RESULTS)
        return;
    snprintf(res->name[res->n], sizeof res->name[0], "%s", r->name);
    res->passed[res->n] = r->passed;
    snprintf(res->message[res->n], sizeof res->message[0], "%s", r->message ? r->message : "");
    res->n++;
}

/* policy_run_tests() with its log captured into `logged`. */
static int run_tests(policy_t *p, results_t *res, char *err, size_t errlen, buf_t *logged)
{
    fx_capture_t c;
    memset(res, 0, sizeof *res);
    err[0] = '\0';
    fx_capture_begin(&c);
    int failed = policy_run_tests(p, collect, res, err, errlen);
    fx_capture_end(&c, logged);
    return failed;
}

static int result_index(const results_t *res, const char *name)
{
    for (int i = 0; i < res->n; i++)
        if (strcmp(res->name[i], name) == 0)
            return i;
    return -1;
}

/* The test named `name` ran and passed (or failed, with `why` in its
 * message). */
#define ASSERT_RESULT(res, name, want_pass, why)                                        \
    do {                                                                                  \
        int i_ = result_index(&(res), (name));                                            \
        if (i_ < 0) {                                                                     \
            test_fail(__FILE__, __LINE__, "no result for test \"%s\"", (name));          \
            return;                                                                       \
        }                                                                                 \
        if ((res).passed[i_] != (want_pass) ||                                            \
            (!(want_pass) && strstr((res).message[i_], (why)) == NULL)) {                 \
            test_fail(__FILE__, __LINE__, "test \"%s\": passed=%d message \"%s\"; wanted " \
                      "passed=%d with \"%s\"", (name), (res).passed[i_], (res).message[i_], \
                      (want_pass), (why));                                                \
            return;                                                                       \
        }                                                                                 \
    } while (0)

/* ---- handler lookup ------------------------------------------------------------------- */

TEST(policy_lookup_exact_beats_class_beats_default)
{
    policy_t *p = fx_load("local p = {}\n"
                          "p[503] = function() return retry { reason = 'exact' } end\n"
                          "p['5xx'] = function() return retry { reason = 'class' } end\n"
                          "p['4xx'] = function() return retry { reason = 'class4' } end\n"
                          "p.default = function() return retry { reason = 'default' } end\n"
                          "return p\n");
    ASSERT_LOADED(p);
    static const struct {
        int status;
        const char *reason;
    } cases[] = {
        {503, "exact"},   {500, "class"},   {502, "class"},   {599, "class"}, {404, "class4"},
        {429, "class4"},  {200, "default"}, {204, "default"}, {302, "default"},
    };
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        ASSERT(policy_handles(p, cases[i].status));
        ASSERT_EQ(fx_decide_status(p, cases[i].status, NULL, &v, &lg), 0);
        ASSERT_FAILURE(v, "(none)", lg);
        ASSERT_EQ(v.kind, VERDICT_RETRY);
        ASSERT_STR(v.reason, cases[i].reason);
    }
    for (int s = 100; s <= 599; s++)
        ASSERT(policy_handles(p, s)); /* default catches every status */
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

TEST(policy_lookup_without_default_handles_only_its_keys)
{
    policy_t *p = fx_load("return {\n"
                          "  [404] = function() return retry { reason = 'exact' } end,\n"
                          "  ['5xx'] = function() return retry { reason = 'class' } end,\n"
                          "  error = function() return retry { reason = 'error' } end,\n"
                          "}\n");
    ASSERT_LOADED(p);
    for (int s = 100; s <= 599; s++)
        ASSERT_EQ(policy_handles(p, s), s == 404 || (s >= 500 && s <= 599));
    ASSERT(policy_handles_errors(p));
    policy_release(p);

    p = fx_load("return { [404] = function() end }\n");
    ASSERT_LOADED(p);
    ASSERT(!policy_handles_errors(p));
    ASSERT(!policy_handles(p, 200));
    policy_release(p);
}

/* The 2xx fast path: a status without a handler never enters Lua. The only
 * handler counts, logs and raises, so entering it would show three ways. */
TEST(policy_unhandled_status_never_enters_lua)
{
    policy_t *p = fx_load("local p = {}\n"
                          "p[404] = function(req, res)\n"
                          "  errord.count('unit-entered', 60)\n"
                          "  log { msg = 'the 404 handler ran' }\n"
                          "  error('the 404 handler ran')\n"
                          "end\n"
                          "return p\n");
    ASSERT_LOADED(p);
    counter_reset();
    static const int statuses[] = {200, 201, 204, 301, 304, 400, 403, 405, 500, 503};
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (size_t i = 0; i < sizeof statuses / sizeof *statuses; i++) {
        ASSERT(!policy_handles(p, statuses[i]));
        ASSERT_EQ(fx_decide_status(p, statuses[i], "{\"message\":\"x\"}", &v, &lg), 0);
        ASSERT_EQ(v.kind, VERDICT_PASS);
        ASSERT_FAILURE(v, "(none)", lg);
    }
    ASSERT_EQ(lg.len, 0); /* not a line logged */
    ASSERT_EQ(counter_peek("unit-entered", 12, 60, clock_wall_ms()), 0);

    /* The control: the 404 handler does run, and shows it. */
    ASSERT(policy_handles(p, 404));
    ASSERT_EQ(fx_decide_status(p, 404, NULL, &v, &lg), 0);
    ASSERT_FAILURE(v, "error", lg);
    ASSERT_CONTAINS(lg.data, "the 404 handler ran");
    ASSERT_EQ(counter_peek("unit-entered", 12, 60, clock_wall_ms()), 1);
    counter_reset();
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

TEST(policy_error_handler_gets_kind_and_message)
{
    policy_t *p = fx_load("local p = {}\n"
                          "p.error = function(req, err)\n"
                          "  return respond { status = 504, json = { kind = err.kind,\n"
                          "    message = err.message, path = req.path, attempt = req.attempt } }\n"
                          "end\n"
                          "p[500] = function() return retry { reason = 'not_this_one' } end\n"
                          "return p\n");
    ASSERT_LOADED(p);
    ASSERT(policy_handles_errors(p));
    static const char *const kinds[] = {"connect", "timeout", "reset", "protocol"};
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (size_t i = 0; i < 4; i++) {
        fx_call_t c;
        ASSERT_EQ(fx_call_error(&c, kinds[i], "no answer from 10.0.0.7:8081"), 0);
        c.in.attempt = 2;
        fx_decide(p, &c, &v, &lg);
        fx_call_free(&c);
        ASSERT_FAILURE(v, "(none)", lg);
        ASSERT_EQ(v.kind, VERDICT_RESPOND);
        ASSERT_EQ(v.status, 504);
        cJSON *j = body_json(&v);
        ASSERT(j != NULL);
        ASSERT_STR(jstr(j, "kind"), kinds[i]);
        ASSERT_STR(jstr(j, "message"), "no answer from 10.0.0.7:8081");
        ASSERT_STR(jstr(j, "path"), "/x");
        ASSERT_EQ(jnum(j, "attempt"), 2);
        cJSON_Delete(j);
    }
    policy_release(p);

    /* Without an error handler, a failure is not the policy's business. */
    p = fx_load("return { default = function() error('must not run') end }\n");
    ASSERT_LOADED(p);
    ASSERT(!policy_handles_errors(p));
    fx_call_t c;
    ASSERT_EQ(fx_call_error(&c, "connect", "connection refused"), 0);
    fx_decide(p, &c, &v, &lg);
    fx_call_free(&c);
    ASSERT_EQ(v.kind, VERDICT_PASS);
    ASSERT_FAILURE(v, "(none)", lg);
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* Wrong handler keys are load errors that say what is wrong and where. */
TEST(policy_bad_handler_keys_are_load_errors)
{
    static const struct {
        const char *src;
        const char *message;
    } cases[] = {
        {"return { ['404'] = function() end }", "handler key \"404\" is a string: write [404]"},
        {"return { ['503'] = function() end }", "write [503], a number"},
        {"return { [700] = function() end }", "keys.lua:1: handler key [700] is not a status from 100 to 599"},
        {"return { [99] = function() end }", "handler key [99] is not a status from 100 to 599"},
        {"return { [0] = function() end }", "is not a status from 100 to 599"},
        {"return { [404.5] = function() end }", "handler key [404.5] is not a status"},
        {"return { [404] = 'retry' }", "keys.lua:1: handler [404] must be a function, not a string"},
        {"return { [500] = { reason = 'x' } }", "handler [500] must be a function, not a table"},
        {"return { ['5xx'] = true }", "handler 5xx must be a function, not a boolean"},
        {"return { default = 1 }", "handler default must be a function, not a number"},
        {"return { error = {} }", "handler error must be a function, not a table"},
        {"return { [true] = function() end }", "found a boolean key"},
        {"return { tests = 'none' }", "tests must be a list of test tables"},
        {"return { settings = 3 }", "settings must be a table"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        policy_t *p = fx_load_named("keys.lua", cases[i].src, NULL);
        if (p != NULL) {
            test_fail(__FILE__, __LINE__, "%s loaded; wanted \"%s\"", cases[i].src,
                      cases[i].message);
            policy_release(p);
            return;
        }
        ASSERT_CONTAINS(fx_err, cases[i].message);
        ASSERT_CONTAINS(fx_err, "keys.lua"); /* the file is named */
    }
}

TEST(policy_unknown_keys_only_warn)
{
    buf_t lg = BUF_INIT;
    policy_t *p = fx_load_named("unknown.lua",
                                "return {\n"
                                "  [500] = function() return retry {} end,\n"
                                "  retries = 3,\n"
                                "  ['6xx'] = function() end,\n"
                                "  on_error = function() end,\n"
                                "}\n",
                                &lg);
    ASSERT_LOADED(p);
    /* each named with the line it is on */
    ASSERT_CONTAINS(lg.data, "unknown.lua:3: unknown key 'retries' ignored");
    ASSERT_CONTAINS(lg.data, "unknown.lua:4: unknown key '6xx' ignored");
    ASSERT_CONTAINS(lg.data, "unknown.lua:5: unknown key 'on_error' ignored");
    ASSERT(policy_handles(p, 500));
    ASSERT(!policy_handles_errors(p));
    buf_free(&lg);
    policy_release(p);
}

/* ---- the req and res views ------------------------------------------------------------- */

TEST(policy_req_view)
{
    policy_t *p = fx_load(
        "return { [403] = function(req, res)\n"
        "  return respond { status = 200, json = { method = req.method, path = req.path,\n"
        "    id = req.id, attempt = req.attempt, elapsed_ms = req.elapsed_ms,\n"
        "    headers = req.headers, atype = math.type(req.attempt), missing = req.nothing } }\n"
        "end }\n");
    ASSERT_LOADED(p);
    fx_call_t c;
    ASSERT_EQ(fx_call(&c,
                      "PUT /v1/items/7?fields=id,name&q=a%20b HTTP/1.1\r\n"
                      "Host: api.example\r\n"
                      "Accept: text/plain\r\n"
                      "X-Trace: one\r\n"
                      "accept: application/json\r\n"
                      "Authorization: Bearer sekret-token\r\n"
                      "Cookie: sid=cookie-value\r\n"
                      "X-Api-Key: key-12345\r\n"
                      "Proxy-Authorization: Basic cHJveHk=\r\n"
                      "Content-Length: 0\r\n"
                      "\r\n",
                      "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", ""),
              0);
    c.in.request_id = "req-42";
    c.in.attempt = 2;
    c.in.elapsed_ns = 1500000; /* 1.5 ms */
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    fx_decide(p, &c, &v, &lg);
    fx_call_free(&c);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_RESPOND);
    const char *body = fx_body(&v);
    /* secret headers as sent: only what errord writes out is redacted */
    ASSERT_CONTAINS(body, "\"authorization\":\"Bearer sekret-token\"");
    ASSERT_CONTAINS(body, "\"cookie\":\"sid=cookie-value\"");
    ASSERT_CONTAINS(body, "\"x-api-key\":\"key-12345\"");
    ASSERT_CONTAINS(body, "\"proxy-authorization\":\"Basic cHJveHk=\"");
    cJSON *j = body_json(&v);
    ASSERT(j != NULL);
    ASSERT_STR(jstr(j, "method"), "PUT");
    ASSERT_STR(jstr(j, "path"), "/v1/items/7?fields=id,name&q=a%20b");
    ASSERT_STR(jstr(j, "id"), "req-42");
    ASSERT_EQ(jnum(j, "attempt"), 2);
    ASSERT_STR(jstr(j, "atype"), "integer");
    ASSERT(fabs(jnum(j, "elapsed_ms") - 1.5) < 1e-9);
    ASSERT(cJSON_GetObjectItemCaseSensitive(j, "missing") == NULL);
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(j, "headers");
    ASSERT(cJSON_IsObject(h));
    ASSERT_STR(jstr(h, "host"), "api.example");
    ASSERT_STR(jstr(h, "accept"), "text/plain, application/json"); /* both lines, in order */
    ASSERT_STR(jstr(h, "x-trace"), "one");
    ASSERT_STR(jstr(h, "authorization"), "Bearer sekret-token");
    ASSERT_STR(jstr(h, "cookie"), "sid=cookie-value");
    ASSERT_STR(jstr(h, "x-api-key"), "key-12345");
    ASSERT_STR(jstr(h, "proxy-authorization"), "Basic cHJveHk=");
    ASSERT(cJSON_GetObjectItemCaseSensitive(h, "Accept") == NULL); /* lower-case names only */
    ASSERT(cJSON_GetObjectItemCaseSensitive(h, "X-Trace") == NULL);
    cJSON_Delete(j);
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* A policy reads secret headers as sent; what it writes out of them (log
 * fields, a retry reason) carries "[redacted]" instead, whole values and
 * the credentials of "Scheme credentials" alike. */
TEST(policy_output_redacts_secret_values)
{
    policy_t *p = fx_load(
        "return { [403] = function(req, res)\n"
        "  local key, auth = req.headers['x-api-key'], req.headers.authorization\n"
        "  log { key = key, token = auth:sub(8), note = 'key ' .. key .. ' used' }\n"
        "  return retry { reason = key }\n"
        "end }\n");
    ASSERT_LOADED(p);
    fx_call_t c;
    ASSERT_EQ(fx_call(&c,
                      "GET / HTTP/1.1\r\nHost: a\r\nX-Api-Key: key-12345\r\n"
                      "Authorization: Bearer sekret-token\r\n\r\n",
                      "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", ""),
              0);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    fx_decide(p, &c, &v, &lg);
    fx_call_free(&c);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_RETRY);
    ASSERT_STR(v.reason, "_redacted_");
    ASSERT(lg.data != NULL);
    ASSERT_NOT_CONTAINS(lg.data, "key-12345");
    ASSERT_NOT_CONTAINS(lg.data, "sekret-token");
    ASSERT_CONTAINS(lg.data, "\"key\":\"[redacted]\"");
    ASSERT_CONTAINS(lg.data, "\"token\":\"[redacted]\"");
    ASSERT_CONTAINS(lg.data, "\"note\":\"key [redacted] used\"");
    policy_release(p);
    verdict_reset(&v);
    buf_free(&lg);
}

TEST(policy_res_view)
{
    policy_t *p = fx_load(
        "return { [403] = function(req, res)\n"
        "  local j = res.json\n"
        "  return respond { status = 200, json = { status = res.status,\n"
        "    stype = math.type(res.status), headers = res.headers, body = res.body,\n"
        "    message = j.message, limit = j.details.limit, scope2 = j.details.scopes[2],\n"
        "    nscopes = #j.details.scopes, ok = j.ok, ratio = j.ratio, rtype = math.type(j.ratio),\n"
        "    ltype = math.type(j.details.limit), elapsed_ms = res.elapsed_ms,\n"
        "    same = rawequal(res.json, res.json) } }\n"
        "end }\n");
    ASSERT_LOADED(p);
    const char *body = "{\"message\":\"Request limit exceeded\",\"details\":{\"limit\":100,"
                       "\"scopes\":[\"read\",\"write\",\"admin\"]},\"ok\":false,\"ratio\":0.25}";
    char raw[512];
    snprintf(raw, sizeof raw,
             "HTTP/1.1 403 Forbidden\r\n"
             "Content-Type: application/json\r\n"
             "Set-Cookie: session=abc123\r\n"
             "X-RateLimit-Remaining: 0\r\n"
             "Vary: Accept\r\n"
             "vary: Origin\r\n"
             "Content-Length: %zu\r\n\r\n",
             strlen(body));
    fx_call_t c;
    ASSERT_EQ(fx_call(&c, NULL, raw, body), 0);
    c.in.attempt_ns = 2500000; /* 2.5 ms */
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    fx_decide(p, &c, &v, &lg);
    fx_call_free(&c);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_CONTAINS(fx_body(&v), "\"set-cookie\":\"session=abc123\"");
    cJSON *j = body_json(&v);
    ASSERT(j != NULL);
    ASSERT_EQ(jnum(j, "status"), 403);
    ASSERT_STR(jstr(j, "stype"), "integer");
    ASSERT_STR(jstr(j, "body"), body);
    ASSERT_STR(jstr(j, "message"), "Request limit exceeded");
    ASSERT_EQ(jnum(j, "limit"), 100);
    ASSERT_STR(jstr(j, "ltype"), "integer");
    ASSERT_STR(jstr(j, "scope2"), "write");
    ASSERT_EQ(jnum(j, "nscopes"), 3);
    ASSERT(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(j, "ok")));
    ASSERT(jnum(j, "ratio") == 0.25);
    ASSERT_STR(jstr(j, "rtype"), "float");
    ASSERT(fabs(jnum(j, "elapsed_ms") - 2.5) < 1e-9);
    ASSERT(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "same")));
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(j, "headers");
    ASSERT_STR(jstr(h, "content-type"), "application/json");
    ASSERT_STR(jstr(h, "x-ratelimit-remaining"), "0");
    ASSERT_STR(jstr(h, "set-cookie"), "session=abc123");
    ASSERT_STR(jstr(h, "vary"), "Accept, Origin");
    cJSON_Delete(j);
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

static const char *const BODY_PROBE =
    "return { default = function(req, res)\n"
    "  return respond { status = 200, json = { body = type(res.body), json = type(res.json),\n"
    "    len = res.body and #res.body or -1 } }\n"
    "end }\n";

/* Checks what BODY_PROBE saw for `body`. */
static int probe_body(policy_t *p, const char *body, const char *want_body, const char *want_json,
                      char *why, size_t n)
{
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    int rc = -1;
    if (fx_decide_status(p, 502, body, &v, &lg) < 0 || v.failure != NULL) {
        snprintf(why, n, "handler failed: %s", lg.data ? lg.data : "");
        goto out;
    }
    cJSON *j = body_json(&v);
    const char *b = jstr(j, "body"), *js = jstr(j, "json");
    if (b == NULL || js == NULL || strcmp(b, want_body) != 0 || strcmp(js, want_json) != 0)
        snprintf(why, n, "body %s: res.body is a %s, res.json a %s; wanted %s and %s",
                 body ? body : "(streamed)", b ? b : "?", js ? js : "?", want_body, want_json);
    else
        rc = 0;
    cJSON_Delete(j);
out:
    verdict_reset(&v);
    buf_free(&lg);
    return rc;
}

TEST(policy_res_json_nil_when_not_json_or_streamed)
{
    policy_t *p = fx_load(BODY_PROBE);
    ASSERT_LOADED(p);
    char why[1024];
    static const struct {
        const char *body, *body_type, *json_type;
    } cases[] = {
        {"<html><body>Bad Gateway</body></html>", "string", "nil"},
        {"", "string", "nil"},
        {"{\"message\": \"unterminated", "string", "nil"},
        {"{\"message\":\"x\"}", "string", "table"},
        {"[1,2]", "string", "table"},
        {NULL, "nil", "nil"}, /* larger than body_limit: streamed, no body, no json */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        if (probe_body(p, cases[i].body, cases[i].body_type, cases[i].json_type, why,
                       sizeof why) < 0) {
            test_fail(__FILE__, __LINE__, "%s", why);
            policy_release(p);
            return;
        }
    }
    policy_release(p);
}

/* A text body that only begins like JSON is not JSON: Go's net/http answers
 * "404 page not found", nginx-style pages begin with digits too. */
TEST(policy_res_json_nil_for_text_with_a_json_prefix)
{
    policy_t *p = fx_load(BODY_PROBE);
    ASSERT_LOADED(p);
    char why[1024];
    static const char *const bodies[] = {
        "404 page not found\n",
        "502 Bad Gateway",
        "{\"message\":\"x\"} and then some text",
        "true story",
        "[1] [2]",
    };
    for (size_t i = 0; i < sizeof bodies / sizeof *bodies; i++) {
        if (probe_body(p, bodies[i], "string", "nil", why, sizeof why) < 0) {
            test_fail(__FILE__, __LINE__, "%s", why);
            policy_release(p);
            return;
        }
    }
    policy_release(p);
}

/* The default policy's 404 handler with the body a Go upstream sends. */
TEST(policy_default_lua_404_with_plain_text_body)
{
    buf_t lg = BUF_INIT;
    policy_t *p = fx_load_path("lua/default.lua", NULL);
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    ASSERT_EQ(fx_decide_status(p, 404, "404 page not found\n", &v, &lg), 0);
    CHECK_OUT(v.failure == NULL && v.kind == VERDICT_PASS,
              "the 404 handler failed (%s): %s", fx_failure(&v), lg.data ? lg.data : "");
    CHECK_OUT(fx_has(&lg, "upstream rejected the request"), "no log record: %s",
              lg.data ? lg.data : "");
out:
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* res.retry_after_ms for a response carrying `retry_after` (NULL: none),
 * as the handler's tostring() of it. */
static int retry_after_of(policy_t *p, const char *retry_after, char *out, size_t n)
{
    char raw[256];
    snprintf(raw, sizeof raw, "HTTP/1.1 503 Service Unavailable\r\n%s%s%sContent-Length: 0\r\n\r\n",
             retry_after ? "Retry-After: " : "", retry_after ? retry_after : "",
             retry_after ? "\r\n" : "");
    fx_call_t c;
    verdict_t v = VERDICT_INIT;
    if (fx_call(&c, NULL, raw, "") < 0) {
        fx_call_free(&c);
        return -1;
    }
    fx_decide(p, &c, &v, NULL);
    fx_call_free(&c);
    snprintf(out, n, "%s", v.failure ? v.failure : fx_body(&v));
    verdict_reset(&v);
    return 0;
}

TEST(policy_res_retry_after_ms)
{
    policy_t *p = fx_load("return { [503] = function(req, res)\n"
                          "  return respond { status = 200, body = tostring(res.retry_after_ms) }\n"
                          "end }\n");
    ASSERT_LOADED(p);
    char got[64];
    ASSERT_EQ(retry_after_of(p, "120", got, sizeof got), 0);
    ASSERT_STR(got, "120000");
    ASSERT_EQ(retry_after_of(p, "0", got, sizeof got), 0);
    ASSERT_STR(got, "0");
    ASSERT_EQ(retry_after_of(p, NULL, got, sizeof got), 0);
    ASSERT_STR(got, "nil");
    ASSERT_EQ(retry_after_of(p, "soon", got, sizeof got), 0);
    ASSERT_STR(got, "nil");
    ASSERT_EQ(retry_after_of(p, "-5", got, sizeof got), 0);
    ASSERT_STR(got, "nil");
    ASSERT_EQ(retry_after_of(p, "1.5", got, sizeof got), 0);
    ASSERT_STR(got, "nil");
    ASSERT_EQ(retry_after_of(p, "Mon, 99 Foo 2025 25:61:00 GMT", got, sizeof got), 0);
    ASSERT_STR(got, "nil");

    /* An HTTP-date a minute from now: about 60000 ms (whole seconds). */
    char date[40];
    clock_http_date(time(NULL) + 60, date);
    ASSERT_EQ(retry_after_of(p, date, got, sizeof got), 0);
    long long ms = strtoll(got, NULL, 10);
    if (ms < 58000 || ms > 61000) {
        test_fail(__FILE__, __LINE__, "Retry-After: %s gave %s ms, wanted about 60000", date, got);
        policy_release(p);
        return;
    }
    /* A date in the past: retry now. */
    ASSERT_EQ(retry_after_of(p, "Wed, 21 Oct 2015 07:28:00 GMT", got, sizeof got), 0);
    ASSERT_STR(got, "0");
    policy_release(p);
}

static const char *const READ_ONLY_POLICY =
    "local p = {}\n"
    "p[500] = function(req, res) req.method = 'POST' end\n"
    "p[501] = function(req, res) res.status = 200 end\n"
    "p[502] = function(req, res) req.anything = 1 end\n"
    "p[503] = function(req, res) res.json = {} end\n"
    "p[504] = function(req, res) res.body = 'replaced' end\n"
    /* the same, after the field was read once */
    "p[505] = function(req, res) local s = res.status; res.status = 200\n"
    "  return respond { status = 200, body = tostring(res.status) } end\n"
    "p[506] = function(req, res) local m = req.method; req.method = 'DELETE'\n"
    "  return respond { status = 200, body = req.method } end\n"
    "p[507] = function(req, res) local b = res.body; res.body = 'replaced'\n"
    "  return respond { status = 200, body = res.body } end\n"
    "return p\n";

TEST(policy_views_are_read_only)
{
    policy_t *p = fx_load(READ_ONLY_POLICY);
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (int s = 500; s <= 504; s++) {
        buf_clear(&lg);
        ASSERT_EQ(fx_decide_status(p, s, "{}", &v, &lg), 0);
        ASSERT_FAILURE(v, "error", lg);
        ASSERT_EQ(v.kind, VERDICT_PASS);
        ASSERT_CONTAINS(lg.data, "read-only");
    }
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* Reading a field must not make it writable. */
TEST(policy_views_stay_read_only_after_a_read)
{
    policy_t *p = fx_load(READ_ONLY_POLICY);
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (int s = 505; s <= 507; s++) {
        buf_clear(&lg);
        ASSERT_EQ(fx_decide_status(p, s, "{}", &v, &lg), 0);
        if (v.failure == NULL) {
            test_fail(__FILE__, __LINE__,
                      "[%d]: assigning a field after reading it was accepted (the handler "
                      "then read back \"%s\"); wanted an error",
                      s, fx_body(&v));
            verdict_reset(&v);
            buf_free(&lg);
            policy_release(p);
            return;
        }
        ASSERT_FAILURE(v, "error", lg);
    }
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* A view kept in a global and read in a later call raises; the first
 * call's heads are freed before the second, so reading them would be a
 * use-after-free (ASan builds catch it). */
TEST(policy_kept_view_raises_in_a_later_call)
{
    policy_t *p = fx_load("local p = {}\n"
                          "local kept_req, kept_res\n"
                          "p[500] = function(req, res)\n"
                          "  if kept_req == nil then kept_req, kept_res = req, res; return end\n"
                          "  return respond { status = 200, body = kept_req.path }\n"
                          "end\n"
                          "p[501] = function(req, res)\n"
                          "  return respond { status = 200, body = tostring(kept_res.body) }\n"
                          "end\n"
                          "p[502] = function(req, res)\n"
                          "  return respond { status = 200, body = kept_res.headers['x-a'] }\n"
                          "end\n"
                          "p[200] = function(req, res)\n"
                          "  return respond { status = 200, body = req.path }\n"
                          "end\n"
                          "return p\n");
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    fx_call_t c;
    ASSERT_EQ(fx_call(&c, "GET /first HTTP/1.1\r\nHost: h\r\n\r\n",
                      "HTTP/1.1 500 Oops\r\nX-A: first\r\nContent-Length: 5\r\n\r\n", "first"),
              0);
    fx_decide(p, &c, &v, &lg);
    fx_call_free(&c);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_PASS);

    for (int s = 500; s <= 502; s++) {
        buf_clear(&lg);
        ASSERT_EQ(fx_decide_status(p, s, "second", &v, &lg), 0);
        ASSERT_FAILURE(v, "error", lg);
        ASSERT_CONTAINS(lg.data, "kept past its handler");
    }
    /* and the state goes on working */
    ASSERT_EQ(fx_decide_status(p, 200, "", &v, &lg), 0);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_STR(fx_body(&v), "/x");
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* The same when the kept view's field had been read in its own call: the
 * later read raises too, instead of answering from the old request. */
TEST(policy_kept_view_raises_even_for_fields_read_before)
{
    policy_t *p = fx_load("local p = {}\n"
                          "local kept\n"
                          "p[500] = function(req, res)\n"
                          "  if kept == nil then kept = req; local _ = req.path; return end\n"
                          "  return respond { status = 200, body = kept.path }\n"
                          "end\n"
                          "return p\n");
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    fx_call_t c;
    ASSERT_EQ(fx_call(&c, "GET /first HTTP/1.1\r\nHost: h\r\n\r\n",
                      "HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", ""),
              0);
    fx_decide(p, &c, &v, &lg);
    fx_call_free(&c);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(fx_call(&c, "GET /second HTTP/1.1\r\nHost: h\r\n\r\n",
                      "HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", ""),
              0);
    fx_decide(p, &c, &v, &lg);
    fx_call_free(&c);
    if (v.failure == NULL) {
        test_fail(__FILE__, __LINE__,
                  "a view kept from the first call still answered \"%s\" in the second",
                  fx_body(&v));
        verdict_reset(&v);
        buf_free(&lg);
        policy_release(p);
        return;
    }
    ASSERT_FAILURE(v, "error", lg);
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* ---- verdicts ------------------------------------------------------------------------------ */

TEST(policy_verdict_nothing_or_pass)
{
    policy_t *p = fx_load("local p = {}\n"
                          "p[500] = function() end\n"
                          "p[501] = function() return pass() end\n"
                          "p[502] = function() return nil end\n"
                          "p[503] = function() return pass(), 'ignored' end\n"
                          "return p\n");
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (int s = 500; s <= 503; s++) {
        ASSERT_EQ(fx_decide_status(p, s, NULL, &v, &lg), 0);
        ASSERT_FAILURE(v, "(none)", lg);
        ASSERT_EQ(v.kind, VERDICT_PASS);
        ASSERT_EQ(v.body.len, 0);
        ASSERT_EQ(v.headers.len, 0);
    }
    ASSERT_EQ(lg.len, 0);
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

TEST(policy_verdict_retry)
{
    policy_t *p = fx_load("local p = {}\n"
                          "p[500] = function() return retry {} end\n"
                          "p[501] = function() return retry { after = 250, reason = 'rate_limited',"
                          " unsafe = true } end\n"
                          "p[502] = function() return retry() end\n"
                          "p[503] = function() return retry { after = 0, unsafe = false } end\n"
                          "p[504] = function() return retry { after = 12.7 } end\n"
                          "return p\n");
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    ASSERT_EQ(fx_decide_status(p, 500, NULL, &v, &lg), 0);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_RETRY);
    ASSERT_EQ(v.after_ms, -1); /* not given: errord's backoff */
    ASSERT_STR(v.reason, "");
    ASSERT_EQ(v.unsafe, 0);

    ASSERT_EQ(fx_decide_status(p, 501, NULL, &v, &lg), 0);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_RETRY);
    ASSERT_EQ(v.after_ms, 250);
    ASSERT_STR(v.reason, "rate_limited");
    ASSERT_EQ(v.unsafe, 1);

    ASSERT_EQ(fx_decide_status(p, 502, NULL, &v, &lg), 0);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_RETRY);
    ASSERT_EQ(v.after_ms, -1);

    ASSERT_EQ(fx_decide_status(p, 503, NULL, &v, &lg), 0);
    ASSERT_EQ(v.kind, VERDICT_RETRY);
    ASSERT_EQ(v.after_ms, 0);
    ASSERT_EQ(v.unsafe, 0);

    ASSERT_EQ(fx_decide_status(p, 504, NULL, &v, &lg), 0);
    ASSERT_EQ(v.kind, VERDICT_RETRY);
    ASSERT_EQ(v.after_ms, 12);
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

TEST(policy_verdict_retry_reason_normalised_and_bounded)
{
    static const struct {
        const char *lua, *want;
    } cases[] = {
        {"'rate_limited'", "rate_limited"},
        {"'Rate Limited!'", "rate_limited_"},
        {"'UPSTREAM-Down 502'", "upstream_down_502"},
        {"'caf\\u{e9}'", "caf__"}, /* two UTF-8 bytes, two underscores */
        {"''", ""},
        {"string.rep('abcdefghij', 5)", "abcdefghijabcdefghijabcdefghijab"}, /* 32 */
        {"'A\\0B'", "a_b"},
    };
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char src[256];
        snprintf(src, sizeof src, "return { [500] = function() return retry { reason = %s } end }\n",
                 cases[i].lua);
        policy_t *p = fx_decide_once(src, 500, NULL, &v, &lg);
        ASSERT_LOADED(p);
        policy_release(p);
        ASSERT_FAILURE(v, "(none)", lg);
        ASSERT_EQ(v.kind, VERDICT_RETRY);
        ASSERT_STR(v.reason, cases[i].want);
        ASSERT(strlen(v.reason) <= VERDICT_REASON_MAX);
        for (const char *c = v.reason; *c; c++)
            ASSERT((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '_');
    }
    verdict_reset(&v);
    buf_free(&lg);
}

/* Handler bodies that are mistakes: each fails open with "error". */
static int fails_open(const char *stmt, const char *why_in_log, char *msg, size_t n)
{
    char src[1024];
    snprintf(src, sizeof src, "local p = {}\np[500] = function(req, res)\n  %s\nend\nreturn p\n",
             stmt);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    int rc = -1;
    policy_t *p = fx_decide_once(src, 500, "{}", &v, &lg);
    if (p == NULL)
        snprintf(msg, n, "%s: did not load: %s", stmt, fx_err);
    else if (v.failure == NULL || strcmp(v.failure, "error") != 0 || v.kind != VERDICT_PASS ||
             v.body.len != 0 || v.headers.len != 0)
        snprintf(msg, n, "%s: failure %s, verdict %d (status %d, headers \"%s\"); wanted to fail "
                         "open with \"error\"",
                 stmt, fx_failure(&v), v.kind, v.status, fx_headers(&v));
    else if (why_in_log != NULL && !fx_has(&lg, why_in_log))
        snprintf(msg, n, "%s: the log does not say \"%s\": %s", stmt, why_in_log,
                 lg.data ? lg.data : "");
    else
        rc = 0;
    policy_release(p);
    verdict_reset(&v);
    buf_free(&lg);
    return rc;
}

#define ASSERT_FAILS_OPEN(stmt, why)                                                       \
    do {                                                                                   \
        char m_[2048];                                                                     \
        if (fails_open((stmt), (why), m_, sizeof m_) < 0) {                                \
            test_fail(__FILE__, __LINE__, "%s", m_);                                       \
            return;                                                                        \
        }                                                                                  \
    } while (0)

TEST(policy_verdict_retry_mistakes_fail_open)
{
    ASSERT_FAILS_OPEN("return retry { after = -1 }", "after must be a number");
    ASSERT_FAILS_OPEN("return retry { after = 'soon' }", "after must be a number");
    ASSERT_FAILS_OPEN("return retry { reason = 5 }", "reason must be a string");
    ASSERT_FAILS_OPEN("return retry { delay = 5 }", "unknown field 'delay'");
    ASSERT_FAILS_OPEN("return retry('server_error')", NULL);
}

/* after = math.huge or NaN must not become a negative delay (or "use the
 * backoff"): either it is refused, or it is a delay of 0 or more. */
TEST(policy_verdict_retry_after_not_finite)
{
    static const char *const afters[] = {"math.huge", "0/0", "1e300", "2^63"};
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (size_t i = 0; i < sizeof afters / sizeof *afters; i++) {
        char src[256];
        snprintf(src, sizeof src, "return { [500] = function() return retry { after = %s } end }\n",
                 afters[i]);
        policy_t *p = fx_decide_once(src, 500, NULL, &v, &lg);
        ASSERT_LOADED(p);
        policy_release(p);
        if (v.kind == VERDICT_RETRY && v.after_ms < 0) {
            test_fail(__FILE__, __LINE__, "retry { after = %s } became after_ms %lld", afters[i],
                      (long long)v.after_ms);
            verdict_reset(&v);
            buf_free(&lg);
            return;
        }
    }
    verdict_reset(&v);
    buf_free(&lg);
}

TEST(policy_verdict_respond_json)
{
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    policy_t *p = fx_decide_once(
        "return { [403] = function()\n"
        "  return respond { status = 429, json = { message = 'slow down',\n"
        "    retry = { after_s = 3 }, ids = { 1, 2, 3 }, ok = false, name = 'caf\\u{e9}' } }\n"
        "end }\n",
        403, NULL, &v, &lg);
    ASSERT_LOADED(p);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_RESPOND);
    ASSERT_EQ(v.status, 429);
    ASSERT_STR(fx_headers(&v), "Content-Type: application/json\r\n");
    ASSERT(v.has_content_type);
    cJSON *j = body_json(&v);
    ASSERT(j != NULL);
    ASSERT_STR(jstr(j, "message"), "slow down");
    ASSERT_STR(jstr(j, "name"), "caf\xc3\xa9");
    ASSERT_EQ(jnum(cJSON_GetObjectItemCaseSensitive(j, "retry"), "after_s"), 3);
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(j, "ids");
    ASSERT(cJSON_IsArray(ids));
    ASSERT_EQ(cJSON_GetArraySize(ids), 3);
    ASSERT_EQ(cJSON_GetArrayItem(ids, 2)->valuedouble, 3);
    ASSERT(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(j, "ok")));
    cJSON_Delete(j);
    policy_release(p);

    /* The policy's own Content-Type wins; there is only one. */
    p = fx_decide_once("return { [403] = function()\n"
                    "  return respond { status = 400, json = { title = 'bad' },\n"
                    "    headers = { ['content-type'] = 'application/problem+json' } }\n"
                    "end }\n",
                    403, NULL, &v, &lg);
    ASSERT_LOADED(p);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.status, 400);
    const char *h = fx_headers(&v);
    ASSERT_CONTAINS(h, "content-type: application/problem+json\r\n");
    ASSERT(strcasestr(h, "content-type") == strcasestr(h, "content-type: application/problem"));
    ASSERT(strcasestr(strcasestr(h, "content-type") + 1, "content-type") == NULL);
    ASSERT_STR(fx_body(&v), "{\"title\":\"bad\"}");
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

TEST(policy_verdict_respond_body_and_headers)
{
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    policy_t *p = fx_decide_once(
        "return { [404] = function()\n"
        "  return respond { status = 200, body = 'hello\\0world',\n"
        "    headers = { ['X-Served-By'] = 'errord', ['Cache-Control'] = 'no-store',\n"
        "                ['Retry-After'] = 3 } }\n"
        "end }\n",
        404, NULL, &v, &lg);
    ASSERT_LOADED(p);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_RESPOND);
    ASSERT_EQ(v.status, 200);
    ASSERT_MEM(v.body.data, v.body.len, "hello\0world"); /* binary-safe */
    const char *h = fx_headers(&v);
    ASSERT_CONTAINS(h, "X-Served-By: errord\r\n");
    ASSERT_CONTAINS(h, "Cache-Control: no-store\r\n");
    ASSERT_CONTAINS(h, "Retry-After: 3\r\n");
    ASSERT(strcasestr(h, "content-type") == NULL); /* a plain body gets none made up */
    ASSERT(!v.has_content_type);
    policy_release(p);

    p = fx_decide_once("return { [404] = function() return respond { status = 204 } end }\n", 404,
                    NULL, &v, &lg);
    ASSERT_LOADED(p);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_RESPOND);
    ASSERT_EQ(v.status, 204);
    ASSERT_EQ(v.body.len, 0);
    ASSERT_EQ(v.headers.len, 0);
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

TEST(policy_verdict_respond_mistakes_fail_open)
{
    ASSERT_FAILS_OPEN("return respond { status = 200, json = {}, body = 'x' }",
                      "give json or body, not both");
    ASSERT_FAILS_OPEN("return respond { status = 700 }", "status must be an integer");
    ASSERT_FAILS_OPEN("return respond { status = 99 }", "status must be an integer");
    ASSERT_FAILS_OPEN("return respond { status = 101 }", "status must be an integer");
    ASSERT_FAILS_OPEN("return respond { status = '200' }", "status must be an integer");
    ASSERT_FAILS_OPEN("return respond { status = 200.5 }", "status must be an integer");
    ASSERT_FAILS_OPEN("return respond { body = 'no status' }", "status must be an integer");
    ASSERT_FAILS_OPEN("return respond { status = 200, body = {} }", "body must be a string");
    ASSERT_FAILS_OPEN("return respond { status = 200, code = 1 }", "unknown field 'code'");
    ASSERT_FAILS_OPEN("return respond { status = 200, headers = 'X-A: 1' }", NULL);
    ASSERT_FAILS_OPEN("return respond { status = 200, headers = { [1] = 'x' } }", NULL);
    static const char *const owned[] = {"Content-Length",   "content-length", "Connection",
                                        "Transfer-Encoding", "Keep-Alive",     "Upgrade",
                                        "TE",               "Trailer",        "Proxy-Connection"};
    for (size_t i = 0; i < sizeof owned / sizeof *owned; i++) {
        char stmt[256];
        snprintf(stmt, sizeof stmt,
                 "return respond { status = 200, body = 'x', headers = { ['%s'] = '1' } }",
                 owned[i]);
        ASSERT_FAILS_OPEN(stmt, "errord sets");
    }
    ASSERT_FAILS_OPEN("return respond { status = 200, headers = { ['Bad Header'] = '1' } }",
                      "not a valid header name");
    ASSERT_FAILS_OPEN("return respond { status = 200, headers = { ['X:Y'] = '1' } }",
                      "not a valid header name");
    ASSERT_FAILS_OPEN("return respond { status = 200, headers = { [''] = '1' } }",
                      "not a valid header name");
    ASSERT_FAILS_OPEN("return respond { status = 200, headers = { ['X-A\\r\\nSet-Cookie'] = '1' } }",
                      "not a valid header name");
    ASSERT_FAILS_OPEN("return respond { status = 200, headers = { ['X-A'] = 'a\\r\\nSet-Cookie: s=1' } }",
                      "control character");
}

/* A table that cannot be JSON (a cycle) fails the handler too. Kept apart:
 * the encoder's partial output must not leak (LeakSanitizer in ASan builds). */
TEST(policy_verdict_respond_json_cycle_fails_open)
{
    ASSERT_FAILS_OPEN("local t = {}; t.self = t\n  return respond { status = 200, json = t }",
                      "nested too deeply");
    ASSERT_FAILS_OPEN("return respond { status = 200, json = { f = print } }", "cannot encode");
    ASSERT_FAILS_OPEN("return respond { status = 200, json = { a = { b = { c = print } } } }",
                      "cannot encode");
}

TEST(policy_verdict_that_is_not_a_verdict)
{
    static const char *const returns[] = {
        "{}", "{ verdict = 'retry' }", "'retry'", "42", "true", "false", "retry", "function() end",
    };
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (size_t i = 0; i < sizeof returns / sizeof *returns; i++) {
        char src[256];
        snprintf(src, sizeof src, "return { [500] = function() return %s end }\n", returns[i]);
        buf_clear(&lg);
        policy_t *p = fx_decide_once(src, 500, NULL, &v, &lg);
        ASSERT_LOADED(p);
        policy_release(p);
        if (v.failure == NULL || strcmp(v.failure, "verdict") != 0 || v.kind != VERDICT_PASS) {
            test_fail(__FILE__, __LINE__, "return %s: failure %s kind %d, wanted \"verdict\"",
                      returns[i], fx_failure(&v), v.kind);
            verdict_reset(&v);
            buf_free(&lg);
            return;
        }
        ASSERT_CONTAINS(lg.data, "not a verdict");
    }
    verdict_reset(&v);
    buf_free(&lg);
}

/* ---- side effects ------------------------------------------------------------------------------ */

/* The first log line holding `needle`, parsed. */
static cJSON *log_line(const buf_t *lg, const char *needle)
{
    if (lg->data == NULL)
        return NULL;
    const char *at = strstr(lg->data, needle);
    if (at == NULL)
        return NULL;
    const char *start = at;
    while (start > lg->data && start[-1] != '\n')
        start--;
    const char *end = strchr(at, '\n');
    return cJSON_ParseWithLength(start, end ? (size_t)(end - start) : strlen(start));
}

TEST(policy_log_writes_one_record_with_call_fields)
{
    policy_t *p = fx_load("return { [404] = function(req, res)\n"
                          "  log { msg = 'upstream rejected', path = req.path, level = 'warn',\n"
                          "        detail = { code = 7, tags = { 'a', 'b' } }, status = 999 }\n"
                          "end }\n");
    ASSERT_LOADED(p);
    fx_call_t c;
    ASSERT_EQ(fx_call(&c, "GET /orders?id=3 HTTP/1.1\r\nHost: h\r\n\r\n",
                      "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", ""),
              0);
    c.in.request_id = "req-9";
    c.in.attempt = 2;
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    fx_decide(p, &c, &v, &lg);
    fx_call_free(&c);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_PASS);
    cJSON *j = log_line(&lg, "upstream rejected");
    ASSERT(j != NULL);
    ASSERT_STR(jstr(j, "level"), "warn");
    ASSERT_STR(jstr(j, "type"), "log");
    ASSERT_STR(jstr(j, "msg"), "upstream rejected");
    ASSERT_STR(jstr(j, "path"), "/orders?id=3");
    ASSERT_STR(jstr(j, "request_id"), "req-9");
    ASSERT_EQ(jnum(j, "status"), 404); /* errord's, not the policy's 999 */
    ASSERT_EQ(jnum(j, "attempt"), 2);
    ASSERT(jstr(j, "time") != NULL);
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(j, "detail");
    ASSERT_EQ(jnum(d, "code"), 7);
    ASSERT_EQ(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(d, "tags")), 2);
    cJSON_Delete(j);
    /* exactly one record */
    ASSERT(strchr(lg.data, '\n') == lg.data + lg.len - 1);
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

TEST(policy_log_and_alert_inside_tests_stay_inside)
{
    policy_t *p = fx_load("local p = {}\n"
                          "p[404] = function(req, res)\n"
                          "  log { msg = 'log inside a test' }\n"
                          "  alert { name = 'InsideATest', summary = 'alert inside a test' }\n"
                          "  errord.count('unit-inside-a-test', 60)\n"
                          "end\n"
                          "p.tests = {\n"
                          "  { name = 'logs', res = { status = 404 },\n"
                          "    expect = { verdict = 'pass', alert = 'InsideATest' } },\n"
                          "}\n"
                          "return p\n");
    ASSERT_LOADED(p);
    alert_reset();
    counter_reset();
    results_t res;
    char err[256];
    buf_t lg = BUF_INIT;
    ASSERT_EQ(run_tests(p, &res, err, sizeof err, &lg), 0);
    ASSERT_EQ(res.n, 1);
    ASSERT_RESULT(res, "logs", 1, "");
    ASSERT_EQ(lg.len, 0); /* nothing printed */
    ASSERT_EQ(alert_count(), 0);
    ASSERT_EQ(counter_peek("unit-inside-a-test", 18, 60, clock_wall_ms()), 0);
    buf_free(&lg);
    policy_release(p);
}

/* print() writes a log record too (the sandbox's print); inside a test it
 * stays inside like log{}. */
TEST(policy_print_inside_tests_stays_inside)
{
    policy_t *p = fx_load("local p = {}\n"
                          "p[404] = function(req, res) print('print inside a test') end\n"
                          "p.tests = { { name = 'prints', res = { status = 404 },\n"
                          "              expect = { verdict = 'pass' } } }\n"
                          "return p\n");
    ASSERT_LOADED(p);
    results_t res;
    char err[256];
    buf_t lg = BUF_INIT;
    CHECK_OUT(run_tests(p, &res, err, sizeof err, &lg) == 0, "the test failed: %s", res.message[0]);
    CHECK_OUT(!fx_has(&lg, "print inside a test"), "print() in a test reached the log: %s", lg.data);
out:
    buf_free(&lg);
    policy_release(p);
}

TEST(policy_count_counts_within_a_window)
{
    policy_t *p = fx_load("local p = {}\n"
                          "p[500] = function()\n"
                          "  return respond { status = 200, body = tostring(errord.count('unit-5xx', 60)) }\n"
                          "end\n"
                          "p[501] = function()\n"
                          "  return respond { status = 200, body = tostring(errord.count('unit-5xx')) }\n"
                          "end\n"
                          "p[502] = function() errord.count('unit-5xx', 0) end\n"
                          "p[503] = function() errord.count('unit-5xx', 3601) end\n"
                          "p[504] = function() errord.count() end\n"
                          "return p\n");
    ASSERT_LOADED(p);
    counter_reset();
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (int i = 1; i <= 3; i++) {
        char want[16];
        snprintf(want, sizeof want, "%d", i);
        ASSERT_EQ(fx_decide_status(p, 500, NULL, &v, &lg), 0);
        ASSERT_FAILURE(v, "(none)", lg);
        ASSERT_STR(fx_body(&v), want);
    }
    ASSERT_EQ(counter_peek("unit-5xx", 8, 60, clock_wall_ms()), 3);
    ASSERT_EQ(fx_decide_status(p, 501, NULL, &v, &lg), 0); /* the window defaults to 60 s */
    ASSERT_STR(fx_body(&v), "4");
    for (int s = 502; s <= 504; s++) {
        buf_clear(&lg);
        ASSERT_EQ(fx_decide_status(p, s, NULL, &v, &lg), 0);
        ASSERT_FAILURE(v, "error", lg);
    }
    ASSERT_EQ(counter_peek("unit-5xx", 8, 60, clock_wall_ms()), 4);
    counter_reset();
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* Inside the policy's tests, counts start from zero in every test and never
 * touch the real counters. */
TEST(policy_count_inside_tests_is_scratch)
{
    policy_t *p = fx_load("local p = {}\n"
                          "p[500] = function()\n"
                          "  return retry { reason = 'n' .. errord.count('unit-scratch', 60) }\n"
                          "end\n"
                          "p[501] = function()\n"
                          "  errord.count('unit-scratch', 60)\n"
                          "  return retry { reason = 'n' .. errord.count('unit-scratch', 60) }\n"
                          "end\n"
                          "p.tests = {\n"
                          "  { name = 'first', res = { status = 500 }, expect = { reason = 'n1' } },\n"
                          "  { name = 'second', res = { status = 500 }, expect = { reason = 'n1' } },\n"
                          "  { name = 'twice', res = { status = 501 }, expect = { reason = 'n2' } },\n"
                          "}\n"
                          "return p\n");
    ASSERT_LOADED(p);
    counter_reset();
    ASSERT_EQ(counter_hit("unit-scratch", 12, 60, clock_wall_ms()), 1);
    results_t res;
    char err[256];
    ASSERT_EQ(run_tests(p, &res, err, sizeof err, NULL), 0);
    ASSERT_RESULT(res, "first", 1, "");
    ASSERT_RESULT(res, "second", 1, "");
    ASSERT_RESULT(res, "twice", 1, "");
    ASSERT_EQ(counter_peek("unit-scratch", 12, 60, clock_wall_ms()), 1);
    counter_reset();
    policy_release(p);
}

/* ---- the counter module, with explicit clocks -------------------------------------------------- */

#define T0 1700000000000LL /* a whole second, in ms */

TEST(counter_sliding_window_edges)
{
    counter_reset();
    ASSERT_EQ(counter_hit("k", 1, 10, T0), 1);
    ASSERT_EQ(counter_hit("k", 1, 10, T0 + 999), 2); /* same second */
    ASSERT_EQ(counter_hit("k", 1, 10, T0 + 5000), 3);
    ASSERT_EQ(counter_peek("k", 1, 10, T0 + 5000), 3); /* peek adds nothing */
    ASSERT_EQ(counter_peek("k", 1, 10, T0 + 9999), 3); /* the window's last second */
    ASSERT_EQ(counter_peek("k", 1, 10, T0 + 10000), 1); /* T0's two fell out */
    ASSERT_EQ(counter_peek("k", 1, 10, T0 + 14999), 1);
    ASSERT_EQ(counter_peek("k", 1, 10, T0 + 15000), 0);
    ASSERT_EQ(counter_peek("k", 1, 5, T0 + 5000), 1);   /* narrower window */
    ASSERT_EQ(counter_peek("k", 1, 6, T0 + 5000), 3);
    ASSERT_EQ(counter_hit("k", 1, 10, T0 + 15000), 1);  /* all gone, a fresh one */
    ASSERT_EQ(counter_hit("k", 1, 10, T0 + 3600 * 1000LL * 5), 1); /* hours later */
    ASSERT_EQ(counter_peek("absent", 6, 10, T0), 0);
    counter_reset();
    ASSERT_EQ(counter_peek("k", 1, 10, T0 + 3600 * 1000LL * 5), 0);
}

TEST(counter_keys_are_separate_and_binary)
{
    counter_reset();
    ASSERT_EQ(counter_hit("a", 1, 60, T0), 1);
    ASSERT_EQ(counter_hit("ab", 2, 60, T0), 1);
    ASSERT_EQ(counter_hit("a\0b", 3, 60, T0), 1);
    ASSERT_EQ(counter_hit("a\0c", 3, 60, T0), 1);
    ASSERT_EQ(counter_hit("a", 1, 60, T0 + 1000), 2);
    ASSERT_EQ(counter_peek("ab", 2, 60, T0 + 1000), 1);
    ASSERT_EQ(counter_peek("a\0b", 3, 60, T0 + 1000), 1);
    counter_reset();
}

TEST(counter_window_clamped)
{
    counter_reset();
    /* below 1 s: one second */
    ASSERT_EQ(counter_hit("c", 1, 0, T0), 1);
    ASSERT_EQ(counter_hit("c", 1, -5, T0 + 1000), 1);
    ASSERT_EQ(counter_peek("c", 1, 2, T0 + 1000), 2);
    /* above COUNTER_MAX_WINDOW: an hour, counted in whole minutes */
    ASSERT_EQ(counter_hit("h", 1, 1000000, T0), 1);
    ASSERT_EQ(counter_hit("h", 1, 1000000, T0 + 1000), 2);
    ASSERT_EQ(counter_peek("h", 1, 1000000, T0 + (COUNTER_MAX_WINDOW - 60) * 1000LL), 2);
    ASSERT_EQ(counter_peek("h", 1, 1000000, T0 + (COUNTER_MAX_WINDOW + 60) * 1000LL), 0);
    ASSERT_EQ(counter_peek("h", 1, COUNTER_MAX_WINDOW, T0 + (COUNTER_MAX_WINDOW + 60) * 1000LL), 0);
    ASSERT_EQ(counter_hit("h", 1, COUNTER_MAX_WINDOW, T0 + (COUNTER_MAX_WINDOW - 60) * 1000LL), 3);
    counter_reset();
}

/* One key counted with different windows (errord.count('5xx', 10) in one
 * handler, errord.count('5xx', 60) in another): each count still sees every
 * event of its own window. */
TEST(counter_one_key_with_different_windows)
{
    counter_reset();
    ASSERT_EQ(counter_hit("w", 1, 10, T0), 1);
    ASSERT_EQ(counter_peek("w", 1, 60, T0 + 20000), 1);
    ASSERT_EQ(counter_hit("w", 1, 10, T0 + 18000), 1);
    ASSERT_EQ(counter_hit("w", 1, 60, T0 + 20000), 3);
    ASSERT_EQ(counter_peek("w", 1, 10, T0 + 20000), 2);
    counter_reset();
}

TEST(counter_key_limit)
{
    counter_reset();
    char key[32];
    for (int i = 0; i < COUNTER_MAX_KEYS; i++) {
        int n = snprintf(key, sizeof key, "key-%d", i);
        ASSERT_EQ(counter_hit(key, (size_t)n, 60, T0), 1);
    }
    ASSERT_EQ(counter_hit("key-0", 5, 60, T0), 2); /* known keys go on counting */
    /* past the limit a new key counts only its own event */
    ASSERT_EQ(counter_hit("one-too-many", 12, 60, T0), 1);
    ASSERT_EQ(counter_hit("one-too-many", 12, 60, T0), 1);
    ASSERT_EQ(counter_peek("one-too-many", 12, 60, T0), 0);
    counter_reset();
    ASSERT_EQ(counter_hit("one-too-many", 12, 60, T0), 1);
    ASSERT_EQ(counter_hit("one-too-many", 12, 60, T0), 2);
    counter_reset();
}

/* ---- helpers: backoff, json, now_ms ------------------------------------------------------------ */

TEST(policy_backoff_within_bounds_and_growing)
{
    policy_t *p = fx_load("return { settings = { backoff = { base_ms = 100, max_ms = 5000 } } }\n");
    ASSERT_LOADED(p);
    double prev_mean = 0;
    for (int attempt = 1; attempt <= 9; attempt++) {
        uint64_t cap = 100ull << (attempt - 1);
        if (cap > 5000)
            cap = 5000;
        uint64_t lo = UINT64_MAX, hi = 0;
        double sum = 0;
        const int draws = 4000;
        for (int i = 0; i < draws; i++) {
            uint64_t d = policy_backoff_ms(p, attempt);
            if (d > cap) {
                test_fail(__FILE__, __LINE__, "attempt %d: backoff %llu above %llu", attempt,
                          (unsigned long long)d, (unsigned long long)cap);
                policy_release(p);
                return;
            }
            lo = d < lo ? d : lo;
            hi = d > hi ? d : hi;
            sum += (double)d;
        }
        double mean = sum / draws;
        /* full jitter: the whole range is used, the mean near the middle */
        ASSERT(hi >= cap * 9 / 10);
        ASSERT(lo <= cap / 10);
        ASSERT(mean > cap * 0.4 && mean < cap * 0.6);
        if (attempt <= 7)
            ASSERT(mean > prev_mean); /* grows until max_ms caps it */
        prev_mean = mean;
    }
    for (int i = 0; i < 1000; i++) {
        ASSERT(policy_backoff_ms(p, 64) <= 5000);
        ASSERT(policy_backoff_ms(p, 1000000) <= 5000);
    }
    policy_release(p);

    p = fx_load("return { settings = { backoff = { base_ms = 0, max_ms = 0 } } }\n");
    ASSERT_LOADED(p);
    for (int attempt = 1; attempt < 10; attempt++)
        ASSERT_EQ(policy_backoff_ms(p, attempt), 0);
    policy_release(p);
}

TEST(policy_backoff_from_lua)
{
    policy_t *p = fx_load(
        "local p = { settings = { backoff = { base_ms = 10, max_ms = 1000 } } }\n"
        "local function range(f)\n"
        "  local lo, hi = math.huge, -1\n"
        "  for i = 1, 500 do local d = f(); lo = math.min(lo, d); hi = math.max(hi, d) end\n"
        "  return lo, hi\n"
        "end\n"
        "p[500] = function(req, res)\n"
        "  local lo3, hi3 = range(function() return errord.backoff(3) end)\n"
        "  local lo0, hi0 = range(function() return errord.backoff() end)\n"
        "  local lo9, hi9 = range(function() return errord.backoff(1000) end)\n"
        "  return respond { status = 200, json = { lo3 = lo3, hi3 = hi3, lo0 = lo0, hi0 = hi0,\n"
        "    hi9 = hi9, type = math.type(errord.backoff(1)) } }\n"
        "end\n"
        "p[501] = function() return retry { after = errord.backoff(0) } end\n"
        "return p\n");
    ASSERT_LOADED(p);
    fx_call_t c;
    ASSERT_EQ(fx_call_status(&c, 500, NULL), 0);
    c.in.attempt = 5; /* errord.backoff() uses the request's attempt: cap 160 */
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    fx_decide(p, &c, &v, &lg);
    fx_call_free(&c);
    ASSERT_FAILURE(v, "(none)", lg);
    cJSON *j = body_json(&v);
    ASSERT(j != NULL);
    ASSERT(jnum(j, "lo3") >= 0);
    ASSERT(jnum(j, "hi3") <= 40 && jnum(j, "hi3") >= 30);
    ASSERT(jnum(j, "hi0") <= 160 && jnum(j, "hi0") > 40);
    ASSERT(jnum(j, "hi9") <= 1000 && jnum(j, "hi9") > 800);
    ASSERT_STR(jstr(j, "type"), "integer");
    cJSON_Delete(j);
    ASSERT_EQ(fx_decide_status(p, 501, NULL, &v, &lg), 0);
    ASSERT_FAILURE(v, "error", lg); /* attempt 0 is a mistake */
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

TEST(policy_json_encode_decode_round_trip)
{
    ASSERT_LUA_CHECKS(
        "  check(J.encode({ 1, 2, 3 }) == '[1,2,3]', 'a sequence is an array: ' .. J.encode({ 1, 2, 3 }))\n"
        "  check(J.encode({ a = 1 }) == '{\"a\":1}', 'a record is an object: ' .. J.encode({ a = 1 }))\n"
        "  check(J.encode('x\"y') == '\"x\\\\\"y\"', 'a string is escaped: ' .. J.encode('x\"y'))\n"
        "  check(J.encode(true) == 'true' and J.encode(false) == 'false', 'booleans')\n"
        "  check(J.encode(42) == '42', 'an integer: ' .. J.encode(42))\n"
        "  check(J.encode(-0.5) == '-0.5', 'a float: ' .. J.encode(-0.5))\n"
        "  check(J.encode(0/0) == 'null' and J.encode(math.huge) == 'null', 'NaN and inf are null')\n"
        "  local sparse = J.decode(J.encode({ [1] = 'a', [3] = 'c' }))\n"
        "  check(type(sparse) == 'table' and sparse['3'] == 'c', 'a sparse table is an object')\n"
        "  local v = J.decode('{\"a\":[1,{\"b\":\"c\"},[true,false]],\"d\":null,\"e\":1.5,'\n"
        "    .. '\"f\":-7,\"g\":\"\\\\u00e9\\\\ud83d\\\\ude00\\\\n\",\"h\":1e3,\"i\":{}}')\n"
        "  check(type(v) == 'table', 'decoded an object')\n"
        "  check(v.a[1] == 1 and math.type(v.a[1]) == 'integer', 'integers stay integers')\n"
        "  check(v.a[2].b == 'c', 'nested object in an array')\n"
        "  check(v.a[3][1] == true and v.a[3][2] == false, 'nested array of booleans')\n"
        "  check(v.d == nil, 'null is nil')\n"
        "  check(v.e == 1.5 and math.type(v.e) == 'float', 'a float')\n"
        "  check(v.f == -7, 'a negative number')\n"
        "  check(v.g == '\\u{e9}\\u{1F600}\\n', 'unicode escapes and surrogate pairs become UTF-8')\n"
        "  check(v.h == 1000, 'an exponent')\n"
        "  check(type(v.i) == 'table' and next(v.i) == nil, 'an empty object')\n"
        "  local t = { name = 'caf\\u{e9} \\u{2615}', list = { 1, 2.5, 'three', { four = 4 } },\n"
        "              nested = { deeper = { deepest = true } }, empty = '', zero = 0 }\n"
        "  check(deep_eq(J.decode(J.encode(t)), t), 'round trip: ' .. J.encode(t))\n"
        "  check(J.decode(J.encode('\\u{1F600}')) == '\\u{1F600}', 'an emoji round trip')\n"
        "  check(J.encode('\\u{e9}') == '\"\\u{e9}\"' or J.encode('\\u{e9}') == '\"\\\\u00e9\"',\n"
        "        'UTF-8 encodes as UTF-8 or an escape: ' .. J.encode('\\u{e9}'))\n"
        "  local arr = J.decode('[]')\n"
        "  check(type(arr) == 'table' and #arr == 0, 'an empty array')\n"
        "  check(J.decode(' \"x\" ') == 'x', 'a bare string')\n"
        "  local n, e = J.decode('{not json')\n"
        "  check(n == nil and type(e) == 'string', 'invalid JSON gives nil and a message')\n"
        "  check(not pcall(J.decode), 'decode needs a string')\n");
}

/* JSON text is UTF-8 (RFC 8259 8.1): what errord encodes for a policy
 * (errord.json.encode, respond{json}, log{} fields) stays valid whatever
 * bytes a string holds, a body's say. */
TEST(policy_json_encode_writes_only_utf8)
{
    ASSERT_LUA_CHECKS(
        "  local R = '\\u{FFFD}'\n"
        "  check(J.encode('a\\xffb') == '\"a' .. R .. 'b\"', 'a stray byte: ' .. J.encode('a\\xffb'))\n"
        "  check(J.encode('a\\0b') == '\"a' .. R .. 'b\"', 'a NUL is not an end: ' .. J.encode('a\\0b'))\n"
        "  check(J.encode('\\xed\\xa0\\x80') == '\"' .. R:rep(3) .. '\"', 'a surrogate is no character')\n"
        "  check(J.encode('\\xc0\\xaf') == '\"' .. R:rep(2) .. '\"', 'nor an overlong form')\n"
        "  check(J.encode({ ['k\\xff'] = 'v' }) == '{\"k' .. R .. '\":\"v\"}', 'keys too')\n"
        "  check(J.encode({ 'x\\x80', { y = '\\xfe' } }) == '[\"x' .. R .. '\",{\"y\":\"' .. R .. '\"}]',\n"
        "        'inside arrays and objects')\n"
        "  check(J.encode('caf\\u{e9} \\u{1F600}') == '\"caf\\u{e9} \\u{1F600}\"', 'UTF-8 is kept')\n");
}

TEST(policy_json_encode_errors_raise)
{
    ASSERT_LUA_CHECKS(
        "  check(not pcall(J.encode, print), 'encoding a function raises')\n"
        "  check(not pcall(J.encode, { f = print }), 'a function inside raises')\n"
        "  local cyc = {}; cyc.self = cyc\n"
        "  check(not pcall(J.encode, cyc), 'a cycle raises')\n"
        "  check(J.encode({ ok = 1 }) == '{\"ok\":1}', 'and the encoder goes on working')\n");
}

TEST(policy_json_decode_refuses_trailing_garbage)
{
    ASSERT_LUA_CHECKS(
        "  check(J.decode('{\"a\":1} trailing') == nil, 'an object and then text is not JSON')\n"
        "  check(J.decode('404 page not found') == nil, 'a number and then text is not JSON')\n"
        "  check(J.decode('[1] [2]') == nil, 'two values are not JSON')\n"
        "  check(J.decode('{\"a\":1}  \\n') ~= nil, 'trailing white space is fine')\n");
}

TEST(policy_now_ms_is_wall_clock)
{
    policy_t *p = fx_load("return { [200] = function()\n"
                          "  local t = errord.now_ms()\n"
                          "  return respond { status = 200, body = math.type(t) .. ' ' .. t }\n"
                          "end }\n");
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    int64_t before = clock_wall_ms();
    ASSERT_EQ(fx_decide_status(p, 200, NULL, &v, &lg), 0);
    int64_t after = clock_wall_ms();
    ASSERT_FAILURE(v, "(none)", lg);
    const char *b = fx_body(&v);
    ASSERT(strncmp(b, "integer ", 8) == 0);
    long long t = strtoll(b + 8, NULL, 10);
    ASSERT(t >= before && t <= after);
    ASSERT(t > 1600000000000LL); /* milliseconds since 1970, not seconds or a monotonic clock */
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* ---- alerts -------------------------------------------------------------------------------------- */

TEST(alert_fire_dedups_by_name_and_labels)
{
    alert_reset();
    alert_label_t prod[] = {{"env", "prod"}, {"region", "eu"}};
    alert_label_t dev[] = {{"env", "dev"}, {"region", "eu"}};
    alert_label_t joined[] = {{"env", "prodregion"}};
    alert_event_t a = {"UpstreamDown", "critical", "down", prod, 2};
    alert_event_t b = {"UpstreamDown", "critical", "down", dev, 2};
    alert_event_t c = {"UpstreamDown", "critical", "down", NULL, 0};
    alert_event_t d = {"Other", "warning", "other", prod, 2};
    alert_event_t e = {"UpstreamDown", "critical", "down", joined, 1};
    alert_event_t a2 = {"UpstreamDown", "warning", "a new summary", prod, 2};
    ASSERT_EQ(alert_fire(&a, T0), 1);
    ASSERT_EQ(alert_fire(&a, T0 + 1000), 2);
    ASSERT_EQ(alert_fire(&b, T0 + 1000), 1);
    ASSERT_EQ(alert_fire(&c, T0 + 1000), 1);
    ASSERT_EQ(alert_fire(&d, T0 + 1000), 1);
    ASSERT_EQ(alert_fire(&e, T0 + 1000), 1);
    ASSERT_EQ(alert_fire(&c, T0 + 2000), 2);
    ASSERT_EQ(alert_fire(&a2, T0 + 3000), 3); /* severity and summary are not identity */
    ASSERT_EQ(alert_count(), 5);
    alert_reset();
    ASSERT_EQ(alert_count(), 0);
    ASSERT_EQ(alert_fire(&a, T0), 1);
    alert_reset();
}

TEST(policy_alert_from_lua_is_deduplicated_and_logged)
{
    policy_t *p = fx_load(
        "local p = {}\n"
        "p[502] = function(req, res)\n"
        "  alert { name = 'UpstreamDown', severity = 'critical', summary = 'down',\n"
        "          labels = { region = 'eu', env = 'prod' } }\n"
        "end\n"
        "p[503] = function(req, res)\n"
        "  local labels = {}; labels.env = 'prod'; labels.region = 'eu'\n"
        "  alert { name = 'UpstreamDown', severity = 'critical', summary = 'still down',\n"
        "          labels = labels }\n"
        "end\n"
        "p[504] = function(req, res)\n"
        "  alert { name = 'UpstreamDown', summary = 'dev', labels = { env = 'dev' } }\n"
        "end\n"
        "p[500] = function() alert { summary = 'no name' } end\n"
        "p[501] = function() alert { name = 'Has Space' } end\n"
        "p[505] = function() alert { name = 'X', labels = { n = 1 } } end\n"
        "p[506] = function() alert { name = 'X', url = 'y' } end\n"
        "return p\n");
    ASSERT_LOADED(p);
    alert_reset();
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    ASSERT_EQ(fx_decide_status(p, 502, NULL, &v, &lg), 0);
    ASSERT_EQ(fx_decide_status(p, 503, NULL, &v, &lg), 0);
    buf_clear(&lg);
    ASSERT_EQ(fx_decide_status(p, 502, NULL, &v, &lg), 0);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_PASS);
    ASSERT_EQ(alert_count(), 1);
    cJSON *j = log_line(&lg, "\"type\":\"alert\"");
    ASSERT(j != NULL);
    ASSERT_STR(jstr(j, "name"), "UpstreamDown");
    ASSERT_STR(jstr(j, "severity"), "critical");
    ASSERT_STR(jstr(j, "summary"), "down");
    ASSERT_EQ(jnum(j, "count"), 3);
    ASSERT_STR(jstr(j, "request_id"), "req-1");
    ASSERT_EQ(jnum(j, "status"), 502);
    const cJSON *labels = cJSON_GetObjectItemCaseSensitive(j, "labels");
    ASSERT_STR(jstr(labels, "env"), "prod");
    ASSERT_STR(jstr(labels, "region"), "eu");
    cJSON_Delete(j);
    ASSERT_EQ(fx_decide_status(p, 504, NULL, &v, &lg), 0);
    ASSERT_EQ(alert_count(), 2);
    for (int s = 500; s <= 506; s++) {
        if (s >= 502 && s <= 504)
            continue;
        buf_clear(&lg);
        ASSERT_EQ(fx_decide_status(p, s, NULL, &v, &lg), 0);
        ASSERT_FAILURE(v, "error", lg);
    }
    ASSERT_EQ(alert_count(), 2);
    alert_reset();
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* ---- settings ------------------------------------------------------------------------------------ */

TEST(policy_settings_defaults)
{
    policy_t *p = fx_load("return {}\n");
    ASSERT_LOADED(p);
    const policy_settings_t *s = policy_settings(p);
    ASSERT_EQ(s->attempts, 3);
    ASSERT_EQ(s->backoff_base_ms, 100);
    ASSERT_EQ(s->backoff_max_ms, 5000);
    ASSERT_EQ(s->body_limit, 65536);
    ASSERT_EQ(s->replay_limit, 1048576);
    ASSERT_EQ(s->handler_instructions, 1000000);
    ASSERT_EQ(s->handler_time_ms, 100);
    ASSERT_EQ(s->memory_limit, 64 << 20);
    ASSERT(strstr(policy_path(p), "policy.lua") != NULL);
    policy_release(p);

    /* an empty settings table is the defaults too; so is a partial one */
    p = fx_load("return { settings = { backoff = { max_ms = 9000 } } }\n");
    ASSERT_LOADED(p);
    s = policy_settings(p);
    ASSERT_EQ(s->attempts, 3);
    ASSERT_EQ(s->backoff_base_ms, 100);
    ASSERT_EQ(s->backoff_max_ms, 9000);
    policy_release(p);
}

TEST(policy_settings_read)
{
    policy_t *p = fx_load("return { settings = {\n"
                          "  attempts = 5,\n"
                          "  backoff = { base_ms = 50, max_ms = 1000 },\n"
                          "  body_limit = 1024,\n"
                          "  replay_limit = 0,\n"
                          "  limits = { instructions = 20000, time_ms = 250, memory_mb = 16 },\n"
                          "} }\n");
    ASSERT_LOADED(p);
    const policy_settings_t *s = policy_settings(p);
    ASSERT_EQ(s->attempts, 5);
    ASSERT_EQ(s->backoff_base_ms, 50);
    ASSERT_EQ(s->backoff_max_ms, 1000);
    ASSERT_EQ(s->body_limit, 1024);
    ASSERT_EQ(s->replay_limit, 0);
    ASSERT_EQ(s->handler_instructions, 20000);
    ASSERT_EQ(s->handler_time_ms, 250);
    ASSERT_EQ(s->memory_limit, 16 << 20);
    policy_release(p);
}

TEST(policy_settings_invalid)
{
    static const struct {
        const char *settings, *message;
    } cases[] = {
        {"attempts = 0", "settings.attempts must be an integer from 1 to 10"},
        {"attempts = 11", "settings.attempts must be an integer from 1 to 10"},
        {"attempts = 2.5", "settings.attempts must be an integer"},
        {"attempts = '3'", "settings.attempts must be an integer"},
        {"backoff = { base_ms = 500, max_ms = 100 }", "settings.backoff.max_ms must not be below base_ms"},
        {"backoff = { base_ms = 6000 }", "settings.backoff.max_ms must not be below base_ms"},
        {"backoff = { base_ms = -1 }", "settings.backoff.base_ms must be an integer"},
        {"backoff = { max_ms = 'lots' }", "settings.backoff.max_ms must be an integer"},
        {"backoff = 100", "settings.backoff must be a table"},
        {"body_limit = -1", "settings.body_limit must be an integer"},
        {"body_limit = 1e12", "settings.body_limit must be an integer"},
        {"replay_limit = -5", "settings.replay_limit must be an integer"},
        {"limits = { instructions = 10 }", "settings.limits.instructions must be an integer from 10000"},
        {"limits = { instructions = 1e12 }", "settings.limits.instructions must be an integer"},
        {"limits = { time_ms = 0 }", "settings.limits.time_ms must be an integer from 1"},
        {"limits = { time_ms = 60000 }", "settings.limits.time_ms must be an integer"},
        {"limits = { memory_mb = 1 }", "settings.limits.memory_mb must be an integer from 4"},
        {"limits = { memory_mb = 100000 }", "settings.limits.memory_mb must be an integer"},
        {"limits = 5", "settings.limits must be a table"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char src[256];
        snprintf(src, sizeof src, "return { settings = { %s } }\n", cases[i].settings);
        policy_t *p = fx_load_named("settings.lua", src, NULL);
        if (p != NULL) {
            test_fail(__FILE__, __LINE__, "settings { %s } loaded", cases[i].settings);
            policy_release(p);
            return;
        }
        ASSERT_CONTAINS(fx_err, cases[i].message);
        ASSERT_CONTAINS(fx_err, "settings.lua");
    }
}

TEST(policy_settings_unknown_keys_warn)
{
    buf_t lg = BUF_INIT;
    policy_t *p = fx_load_named("unknown_settings.lua",
                                "return { settings = { attempts = 2, retries = 5,\n"
                                "  backoff = { base_ms = 10, max = 20 }, limits = { cpu = 1 } } }\n",
                                &lg);
    ASSERT_LOADED(p);
    ASSERT_EQ(policy_settings(p)->attempts, 2);
    ASSERT_EQ(policy_settings(p)->backoff_base_ms, 10);
    ASSERT_CONTAINS(lg.data, "unknown_settings.lua:1: settings: unknown key 'retries' (ignored)");
    ASSERT_CONTAINS(lg.data, ":2: settings.backoff: unknown key 'max' (ignored)");
    ASSERT_CONTAINS(lg.data, ":2: settings.limits: unknown key 'cpu' (ignored)");
    buf_free(&lg);
    policy_release(p);
}

TEST(policy_settings_memory_already_over_the_cap)
{
    policy_t *p = fx_load("local big = string.rep('x', 1024):rep(6 * 1024)\n"
                          "return { settings = { limits = { memory_mb = 4 } },\n"
                          "         [500] = function() return #big end }\n");
    ASSERT(p == NULL);
    ASSERT_CONTAINS(fx_err, "more than settings.limits.memory_mb");
}

/* ---- the policy's own tests -------------------------------------------------------------------- */

TEST(policy_tests_of_default_lua_pass)
{
    buf_t lg = BUF_INIT;
    policy_t *p = fx_load_path("lua/default.lua", &lg);
    ASSERT_LOADED(p);
    ASSERT_EQ(lg.len, 0); /* it loads without a warning */
    results_t res;
    char err[256];
    int failed = run_tests(p, &res, err, sizeof err, &lg);
    for (int i = 0; i < res.n; i++)
        if (!res.passed[i])
            test_fail(__FILE__, __LINE__, "default.lua test \"%s\": %s", res.name[i],
                      res.message[i]);
    ASSERT_EQ(failed, 0);
    ASSERT(res.n >= 12);
    ASSERT_EQ(lg.len, 0); /* nothing printed */
    buf_free(&lg);
    policy_release(p);
}

TEST(policy_tests_of_examples_and_spec_example_pass)
{
    glob_t g;
    ASSERT_EQ(glob("lua/examples/*.lua", 0, NULL, &g), 0);
    size_t n = g.gl_pathc;
    ASSERT(n >= 3);
    char **paths = calloc(n + 1, sizeof *paths);
    for (size_t i = 0; i < n; i++)
        paths[i] = strdup(g.gl_pathv[i]);
    paths[n] = strdup("tests/policies/spec_example.lua");
    globfree(&g);
    for (size_t i = 0; i <= n; i++) {
        policy_t *p = fx_load_path(paths[i], NULL);
        if (p == NULL) {
            test_fail(__FILE__, __LINE__, "%s did not load: %s", paths[i], fx_err);
            continue;
        }
        results_t res;
        char err[256];
        int failed = run_tests(p, &res, err, sizeof err, NULL);
        if (failed != 0 || res.n == 0)
            test_fail(__FILE__, __LINE__, "%s: %d of %d tests failed %s", paths[i], failed, res.n,
                      err);
        for (int k = 0; k < res.n; k++)
            if (!res.passed[k])
                test_fail(__FILE__, __LINE__, "%s test \"%s\": %s", paths[i], res.name[k],
                          res.message[k]);
        policy_release(p);
    }
    for (size_t i = 0; i <= n; i++)
        free(paths[i]);
    free(paths);
}

/* The SPEC's example policy decides as its comments say. */
TEST(policy_spec_example_decides)
{
    policy_t *p = fx_load_path("tests/policies/spec_example.lua", NULL);
    ASSERT_LOADED(p);
    counter_reset();
    alert_reset();
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    ASSERT_EQ(fx_decide_status(p, 403, "{\"message\":\"Request limit reached\"}", &v, &lg), 0);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_RETRY);
    ASSERT_STR(v.reason, "rate_limited");
    ASSERT_EQ(fx_decide_status(p, 403, "{\"message\":\"not yours\"}", &v, &lg), 0);
    ASSERT_FAILURE(v, "(none)", lg);
    ASSERT_EQ(v.kind, VERDICT_PASS);
    ASSERT_EQ(alert_count(), 1);
    for (int i = 1; i <= 21; i++) {
        ASSERT_EQ(fx_decide_status(p, 503, "", &v, &lg), 0);
        ASSERT_FAILURE(v, "(none)", lg);
        ASSERT_EQ(v.kind, VERDICT_RETRY);
        ASSERT_STR(v.reason, "server_error");
    }
    ASSERT_EQ(alert_count(), 2); /* Upstream5xxSpike after the 21st */
    ASSERT(!policy_handles(p, 200));
    counter_reset();
    alert_reset();
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

TEST(policy_tests_wrong_verdict_fails_naming_the_test)
{
    policy_t *p = fx_load("local p = {}\n"
                          "p[500] = function() end\n"
                          "p.tests = {\n"
                          "  { name = 'fine', res = { status = 500 }, expect = { verdict = 'pass' } },\n"
                          "  { name = '500 should retry', res = { status = 500 },\n"
                          "    expect = { verdict = 'retry' } },\n"
                          "  { name = 'no handler passes', res = { status = 200 },\n"
                          "    expect = { verdict = 'pass' } },\n"
                          "}\n"
                          "return p\n");
    ASSERT_LOADED(p);
    results_t res;
    char err[256];
    ASSERT_EQ(run_tests(p, &res, err, sizeof err, NULL), 1);
    ASSERT_EQ(res.n, 3);
    ASSERT_RESULT(res, "fine", 1, "");
    ASSERT_RESULT(res, "500 should retry", 0, "expected verdict retry, got pass");
    ASSERT_RESULT(res, "no handler passes", 1, "");
    policy_release(p);
}

TEST(policy_tests_check_alert_status_and_reason)
{
    policy_t *p = fx_load(
        "local p = {}\n"
        "p[403] = function(req, res)\n"
        "  alert { name = 'Forbidden', summary = 'x' }\n"
        "  return respond { status = 429, body = 'slow' }\n"
        "end\n"
        "p[500] = function() return retry { reason = 'server_error' } end\n"
        "p.tests = {\n"
        "  { name = 'alert raised', res = { status = 403 }, expect = { alert = 'Forbidden' } },\n"
        "  { name = 'alert missing', res = { status = 500 }, expect = { alert = 'Forbidden' } },\n"
        "  { name = 'other alert', res = { status = 403 }, expect = { alert = 'Other' } },\n"
        "  { name = 'alert true', res = { status = 403 }, expect = { alert = true } },\n"
        "  { name = 'alert true, none', res = { status = 500 }, expect = { alert = true } },\n"
        "  { name = 'alert false, one', res = { status = 403 }, expect = { alert = false } },\n"
        "  { name = 'status', res = { status = 403 }, expect = { verdict = 'respond', status = 429 } },\n"
        "  { name = 'status wrong', res = { status = 403 }, expect = { status = 503 } },\n"
        "  { name = 'status of a retry', res = { status = 500 }, expect = { status = 429 } },\n"
        "  { name = 'reason', res = { status = 500 }, expect = { reason = 'server_error' } },\n"
        "  { name = 'reason wrong', res = { status = 500 }, expect = { reason = 'timeout' } },\n"
        "}\n"
        "return p\n");
    ASSERT_LOADED(p);
    results_t res;
    char err[256];
    int failed = run_tests(p, &res, err, sizeof err, NULL);
    ASSERT_RESULT(res, "alert raised", 1, "");
    ASSERT_RESULT(res, "alert missing", 0, "expected alert Forbidden, it was not raised");
    ASSERT_RESULT(res, "other alert", 0, "expected alert Other, it was not raised");
    ASSERT_RESULT(res, "alert true", 1, "");
    ASSERT_RESULT(res, "alert true, none", 0, "expected an alert, none was raised");
    ASSERT_RESULT(res, "alert false, one", 0, "expected no alert, one was raised");
    ASSERT_RESULT(res, "status", 1, "");
    ASSERT_RESULT(res, "status wrong", 0, "expected respond with status 503, got respond 429");
    ASSERT_RESULT(res, "status of a retry", 0, "expected respond with status 429, got retry");
    ASSERT_RESULT(res, "reason", 1, "");
    ASSERT_RESULT(res, "reason wrong", 0, "expected reason \"timeout\", got \"server_error\"");
    ASSERT_EQ(failed, 7);
    policy_release(p);
}

/* What a test may say about the request, the response and the attempt
 * reaches the handler. */
TEST(policy_tests_build_req_res_and_err)
{
    policy_t *p = fx_load(
        "local p = {}\n"
        "p[403] = function(req, res)\n"
        "  local ok = req.method == 'POST' and req.path == '/orders?x=1'\n"
        "    and req.headers['x-api-key'] == 'secret' and req.headers.accept == 'a/b'\n"
        "    and req.attempt == 3 and res.retry_after_ms == 3000\n"
        "    and res.headers['retry-after'] == '3' and res.json.message == 'limit'\n"
        "  return retry { reason = ok and 'ok' or 'bad' }\n"
        "end\n"
        "p[500] = function(req, res)\n"
        "  return retry { reason = tostring(res.body) }\n"
        "end\n"
        "p.error = function(req, err) return retry { reason = err.kind .. '_' .. err.message } end\n"
        "p.tests = {\n"
        "  { name = 'fields', attempt = 3,\n"
        "    req = { method = 'POST', path = '/orders?x=1',\n"
        "            headers = { ['X-Api-Key'] = 'secret', Accept = 'a/b' } },\n"
        "    res = { status = 403, headers = { ['Retry-After'] = '3' },\n"
        "            json = { message = 'limit' } },\n"
        "    expect = { verdict = 'retry', reason = 'ok' } },\n"
        "  { name = 'body', res = { status = 500, body = 'text' }, expect = { reason = 'text' } },\n"
        "  { name = 'err', err = { kind = 'timeout', message = 'slow' },\n"
        "    expect = { verdict = 'retry', reason = 'timeout_slow' } },\n"
        "}\n"
        "return p\n");
    ASSERT_LOADED(p);
    results_t res;
    char err[256];
    ASSERT_EQ(run_tests(p, &res, err, sizeof err, NULL), 0);
    ASSERT_RESULT(res, "fields", 1, "");
    ASSERT_RESULT(res, "body", 1, "");
    ASSERT_RESULT(res, "err", 1, "");
    policy_release(p);
}

TEST(policy_tests_handler_failure_fails_the_test)
{
    policy_t *p = fx_load("local p = {}\n"
                          "p[500] = function() error('boom in a handler') end\n"
                          "p[501] = function() return 'retry' end\n"
                          "p.tests = {\n"
                          "  { name = 'raises', res = { status = 500 }, expect = { verdict = 'pass' } },\n"
                          "  { name = 'not a verdict', res = { status = 501 },\n"
                          "    expect = { verdict = 'pass' } },\n"
                          "}\n"
                          "return p\n");
    ASSERT_LOADED(p);
    results_t res;
    char err[256];
    ASSERT_EQ(run_tests(p, &res, err, sizeof err, NULL), 2);
    ASSERT_RESULT(res, "raises", 0, "boom in a handler");
    ASSERT_RESULT(res, "not a verdict", 0, "not a verdict");
    policy_release(p);
}

TEST(policy_tests_malformed_are_reported)
{
    policy_t *p = fx_load("return { tests = { 5 } }\n");
    ASSERT_LOADED(p);
    results_t res;
    char err[256];
    ASSERT_EQ(run_tests(p, &res, err, sizeof err, NULL), -1);
    ASSERT_CONTAINS(err, "tests[1] is a number, not a test table");
    policy_release(p);

    p = fx_load(
        "return { [500] = function() end, tests = {\n"
        "  { name = 'no res', expect = { verdict = 'pass' } },\n"
        "  { name = 'no expect', res = { status = 500 } },\n"
        "  { name = 'bad status', res = { status = 700 }, expect = {} },\n"
        "  { name = 'bad req', req = 5, res = { status = 500 }, expect = {} },\n"
        "  { name = 'bad json', res = { status = 500, json = { f = print } }, expect = {} },\n"
        "  { res = { status = 500 }, expect = { verdict = 'retry' } },\n"
        "} }\n");
    ASSERT_LOADED(p);
    ASSERT_EQ(run_tests(p, &res, err, sizeof err, NULL), 6);
    ASSERT_RESULT(res, "no res", 0, "a test needs res = { status = ... } or err = { kind = ... }");
    ASSERT_RESULT(res, "no expect", 0, "expect must be a table");
    ASSERT_RESULT(res, "bad status", 0, "res.status must be a status from 100 to 599");
    ASSERT_RESULT(res, "bad req", 0, "req must be a table");
    ASSERT_RESULT(res, "bad json", 0, "res.json");
    ASSERT_RESULT(res, "tests[6]", 0, "expected verdict retry, got pass");
    policy_release(p);
}

/* A misspelt expectation checks nothing: the test must not pass silently. */
TEST(policy_tests_unknown_expect_key_is_reported)
{
    policy_t *p = fx_load("return { [500] = function() end, tests = {\n"
                          "  { name = 'typo', res = { status = 500 }, expect = { verdcit = 'retry' } },\n"
                          "} }\n");
    ASSERT_LOADED(p);
    results_t res;
    char err[256];
    buf_t lg = BUF_INIT;
    int failed = run_tests(p, &res, err, sizeof err, &lg);
    if (failed == 0 && !fx_has(&lg, "verdcit")) {
        test_fail(__FILE__, __LINE__,
                  "expect = { verdcit = 'retry' } passed without a word about 'verdcit'");
        buf_free(&lg);
        policy_release(p);
        return;
    }
    buf_free(&lg);
    policy_release(p);
}

/* ---- load errors --------------------------------------------------------------------------------- */

TEST(policy_load_syntax_error_names_file_and_line)
{
    policy_t *p = fx_load_named("syntax.lua",
                                "local p = {}\n"
                                "p[500] = function()\n"
                                "  return retry {\n"
                                "    reason = 'x'\n"
                                "  )\n"
                                "end\n"
                                "return p\n",
                                NULL);
    ASSERT(p == NULL);
    char want[600];
    snprintf(want, sizeof want, "%s/syntax.lua:5:", fx_dir());
    ASSERT(strncmp(fx_err, want, strlen(want)) == 0);
    ASSERT_CONTAINS(fx_err, "near ')'");
    ASSERT(strchr(fx_err, '\n') == NULL);
}

TEST(policy_load_runtime_error_names_file_and_line)
{
    policy_t *p = fx_load_named("runtime.lua",
                                "local p = {}\n"
                                "local settings = nil\n"
                                "p.settings = { attempts = settings.attempts }\n"
                                "return p\n",
                                NULL);
    ASSERT(p == NULL);
    char want[600];
    snprintf(want, sizeof want, "%s/runtime.lua:3:", fx_dir());
    ASSERT_CONTAINS(fx_err, want);
    ASSERT_CONTAINS(fx_err, "attempt to index a nil value");
    ASSERT_NOT_CONTAINS(fx_err, "stack traceback"); /* the first line only */

    p = fx_load_named("raises.lua", "local p = {}\nerror('policy refuses to load')\nreturn p\n",
                      NULL);
    ASSERT(p == NULL);
    snprintf(want, sizeof want, "%s/raises.lua:2: policy refuses to load", fx_dir());
    ASSERT_CONTAINS(fx_err, want);

    p = fx_load_named("raises_table.lua", "error({ code = 1 })\n", NULL);
    ASSERT(p == NULL);
    ASSERT_CONTAINS(fx_err, "error object is a table value");
}

TEST(policy_load_refuses_a_chunk_that_is_not_a_table)
{
    static const struct {
        const char *src, *type;
    } cases[] = {
        {"return 42\n", "number"},
        {"return 'p'\n", "string"},
        {"return function() end\n", "function"},
        {"local p = {}\n", "nil"},
        {"", "nil"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        policy_t *p = fx_load_named("not_table.lua", cases[i].src, NULL);
        if (p != NULL) {
            test_fail(__FILE__, __LINE__, "\"%s\" loaded", cases[i].src);
            policy_release(p);
            return;
        }
        ASSERT_CONTAINS(fx_err, "must return a table");
        ASSERT_CONTAINS(fx_err, cases[i].type);
        ASSERT_CONTAINS(fx_err, "not_table.lua");
    }
}

TEST(policy_load_refuses_a_missing_file)
{
    char err[512] = "";
    policy_t *p = policy_load("/nonexistent/errord/policy.lua", err, sizeof err);
    ASSERT(p == NULL);
    ASSERT_CONTAINS(err, "/nonexistent/errord/policy.lua");
    ASSERT_CONTAINS(err, "No such file or directory");

    p = fx_load_path(fx_dir(), NULL); /* a directory */
    ASSERT(p == NULL);
    ASSERT_CONTAINS(fx_err, fx_dir());
}

TEST(policy_load_refuses_a_binary_chunk_file)
{
    static const char chunk[] = "\x1bLuaT\x00\x19\x93\r\n\x1a\n\x04\x08\x08"
                                "\x78\x56\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x28\x77\x40"
                                "\x01\x80\x80\x80\x00\x01\x02\x85\x51";
    char path[512];
    ASSERT_EQ(fx_write("binary.luac", chunk, sizeof chunk - 1, path, sizeof path), 0);
    policy_t *p = fx_load_path(path, NULL);
    ASSERT(p == NULL);
    ASSERT_CONTAINS(fx_err, "binary chunk");
}

TEST(policy_load_stops_a_chunk_that_never_ends)
{
    uint64_t t0 = clock_now_ns();
    policy_t *p = fx_load_named("forever.lua", "local p = {}\nwhile true do end\nreturn p\n", NULL);
    uint64_t ms = (clock_now_ns() - t0) / 1000000u;
    ASSERT(p == NULL);
    ASSERT_CONTAINS(fx_err, "limit reached");
    ASSERT_CONTAINS(fx_err, "forever.lua:2:");
    ASSERT(ms < 2000);
}

/* A handler that raises is logged with file:line and a traceback, the
 * request id and the status. */
TEST(policy_handler_error_is_logged_with_file_line)
{
    policy_t *p = fx_load_named("handler_error.lua",
                                "local p = {}\n"
                                "local function message(res)\n"
                                "  return res.json.message\n"
                                "end\n"
                                "p[500] = function(req, res)\n"
                                "  return retry { reason = message(res) }\n"
                                "end\n"
                                "return p\n",
                                NULL);
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    ASSERT_EQ(fx_decide_status(p, 500, "not json", &v, &lg), 0);
    ASSERT_FAILURE(v, "error", lg);
    ASSERT_EQ(v.kind, VERDICT_PASS);
    cJSON *j = log_line(&lg, "policy handler failed");
    ASSERT(j != NULL);
    ASSERT_STR(jstr(j, "level"), "error");
    ASSERT_STR(jstr(j, "kind"), "error");
    ASSERT_STR(jstr(j, "request_id"), "req-1");
    ASSERT_EQ(jnum(j, "status"), 500);
    char want[600];
    snprintf(want, sizeof want, "%s/handler_error.lua:3:", fx_dir());
    ASSERT_CONTAINS(jstr(j, "error"), want);
    ASSERT_CONTAINS(jstr(j, "traceback"), "handler_error.lua:6:");
    cJSON_Delete(j);
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* Holding a policy keeps it alive past the loader's release. */
TEST(policy_hold_and_release)
{
    policy_t *p = fx_load("return { [500] = function() return retry {} end }\n");
    ASSERT_LOADED(p);
    policy_hold(p);
    policy_release(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    ASSERT_EQ(fx_decide_status(p, 500, NULL, &v, &lg), 0);
    ASSERT_EQ(v.kind, VERDICT_RETRY);
    policy_release(p);
    policy_release(NULL);
    verdict_reset(&v);
    buf_free(&lg);
}
