/* What reload and the offline tools (errord check, test, replay) need from
 * the policy loader: every problem of a file reported with its line, the
 * policy's identity (sha256), external test cases, one recorded case asked
 * about on its own clock, and the headers whose values are never written. */
#include "counter.h"
#include "policy.h"
#include "policy_fixture.h"
#include "redact.h"
#include "test.h"

#include <stdlib.h>
#include <string.h>

/* Loads `src` as NAME from text, keeping the report. */
static policy_t *load_report(const char *name, const char *src, policy_report_t *rep)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", fx_dir(), name);
    return policy_load_text(path, src, strlen(src), rep);
}

/* Whether the report's text has a line "<dir>/<name>:<line>: <message...>". */
static int reported(buf_t *text, const char *name, int line, const char *message)
{
    char want[700];
    snprintf(want, sizeof want, "%s/%s:%d: %s", fx_dir(), name, line, message);
    return strstr(buf_cstr(text), want) != NULL;
}

TEST(policy_report_has_every_problem_with_its_line)
{
    policy_report_t rep = POLICY_REPORT_INIT;
    policy_t *p = load_report("many.lua",
                              "-- attempts = 99 in a comment is not the setting\n"
                              "return {\n"
                              "  settings = {\n"
                              "    attempts = 99,\n"
                              "    deadline_ms = -1,\n"
                              "    backoff = { base_ms = 100, max_ms = 10 },\n"
                              "  },\n"
                              "  [403] = 'retry',\n"
                              "  ['5xx'] = true,\n"
                              "  [\"429\"] = function() end,\n"
                              "  [700] = function() end,\n"
                              "  defualt = function() end,\n"
                              "}\n",
                              &rep);
    ASSERT(p == NULL);
    ASSERT_EQ(rep.n_errors, 7);
    ASSERT(reported(&rep.errors, "many.lua", 4, "settings.attempts must be an integer from 1 to 10"));
    ASSERT(reported(&rep.errors, "many.lua", 5, "settings.deadline_ms must be an integer"));
    ASSERT(reported(&rep.errors, "many.lua", 6, "settings.backoff.max_ms must not be below base_ms"));
    ASSERT(reported(&rep.errors, "many.lua", 8, "handler [403] must be a function, not a string"));
    ASSERT(reported(&rep.errors, "many.lua", 9, "handler 5xx must be a function, not a boolean"));
    ASSERT(reported(&rep.errors, "many.lua", 10, "handler key \"429\" is a string: write [429]"));
    /* [700] is a function: its line is where it is defined */
    ASSERT(reported(&rep.errors, "many.lua", 11, "handler key [700] is not a status"));
    ASSERT_EQ(rep.n_warnings, 1);
    ASSERT(reported(&rep.warnings, "many.lua", 12, "unknown key 'defualt' ignored"));
    policy_report_free(&rep);
}

TEST(policy_report_names_a_long_path_in_full)
{
    /* Lua cuts chunk names past 60 bytes to "...<end>"; errord does not. */
    char name[300];
    snprintf(name, sizeof name, "%s",
             "a-directory-name-long-enough-to-be-cut-by-lua-when-it-names-the-chunk.lua");
    policy_report_t rep = POLICY_REPORT_INIT;
    policy_t *p = load_report(name, "return {\n  [500] = function(\n}\n", &rep);
    ASSERT(p == NULL);
    char want[700];
    snprintf(want, sizeof want, "%s/%s:3:", fx_dir(), name);
    ASSERT(strncmp(buf_cstr(&rep.errors), want, strlen(want)) == 0);
    policy_report_free(&rep);
}

TEST(policy_identity_is_the_sha256_of_its_text)
{
    policy_report_t rep = POLICY_REPORT_INIT;
    int64_t before = clock_wall_ms();
    policy_t *p = load_report("empty.lua", "return {}\n", &rep);
    ASSERT_LOADED(p);
    ASSERT_STR(policy_sha256(p), "1232d8379de77e154ca533689af2e42629dd7574bda5a0a390799849f07607c3");
    ASSERT(policy_loaded_at(p) >= before && policy_loaded_at(p) <= clock_wall_ms());
    int handlers = -1, tests = -1;
    policy_describe(p, &handlers, &tests);
    ASSERT_EQ(handlers, 0);
    ASSERT_EQ(tests, 0);
    policy_release(p);
    policy_report_free(&rep);
}

typedef struct {
    int passed, failed;
    char names[512];
} tally_t;

static void tally(const policy_test_result_t *r, void *arg)
{
    tally_t *t = arg;
    if (r->passed)
        t->passed++;
    else
        t->failed++;
    size_t n = strlen(t->names);
    snprintf(t->names + n, sizeof t->names - n, "%s%s:%s", n ? "," : "", r->passed ? "ok" : "FAIL",
             r->name);
}

static const char CASES_POLICY[] =
    "return {\n"
    "  [403] = function(req, res)\n"
    "    if res.json and res.json.message == 'slow down' then\n"
    "      alert { name = 'Limited' }\n"
    "      return retry { reason = 'limit' }\n"
    "    end\n"
    "    return respond { status = 403, json = { message = 'no' } }\n"
    "  end,\n"
    "  tests = {\n"
    "    { name = 'own', res = { status = 403 }, expect = { status = 403 } },\n"
    "  },\n"
    "}\n";

TEST(policy_runs_external_cases_from_json)
{
    policy_report_t rep = POLICY_REPORT_INIT;
    policy_t *p = load_report("cases.lua", CASES_POLICY, &rep);
    ASSERT_LOADED(p);
    static const char cases[] =
        "[{\"name\":\"limit\",\"res\":{\"status\":403,\"json\":{\"message\":\"slow down\"}},"
        "  \"expect\":{\"verdict\":\"retry\",\"reason\":\"limit\",\"alert\":\"Limited\"}},"
        " {\"name\":\"forbidden\",\"res\":{\"status\":403,\"body\":\"{}\"},"
        "  \"expect\":{\"verdict\":\"retry\"}},"
        " {\"name\":\"typo\",\"res\":{\"status\":403},\"expcet\":{}}]";
    tally_t t = {0};
    char err[256] = "";
    ASSERT_EQ(policy_run_cases(p, cases, sizeof cases - 1, tally, &t, err, sizeof err), 2);
    ASSERT_EQ(t.passed, 1);
    ASSERT_STR(t.names, "ok:limit,FAIL:forbidden,FAIL:typo");

    /* not an array of cases */
    ASSERT_EQ(policy_run_cases(p, "{\"name\":\"x\"}", 12, tally, &t, err, sizeof err), -1);
    ASSERT_CONTAINS(err, "JSON array");
    ASSERT_EQ(policy_run_cases(p, "[{", 2, tally, &t, err, sizeof err), -1);
    ASSERT_CONTAINS(err, "not valid JSON");
    policy_release(p);
    policy_report_free(&rep);
}

/* A case's `counts` preset a number for every window of errord.count, or
 * a count per window (from JSON, with the windows as strings); an event
 * counted falls in every window. */
static const char WINDOWS_POLICY[] =
    "return {\n"
    "  [500] = function(req, res)\n"
    "    errord.count('k', 10)\n"
    "    local s = errord.count('k', 1, 0) .. '/' .. errord.count('k', 10, 0) .. '/'\n"
    "              .. errord.count('k', 60, 0) .. ' ' .. errord.count('n', 1, 0) .. '/'\n"
    "              .. errord.count('n', 10, 0)\n"
    "    return retry { reason = 'r' .. s:gsub('[/ ]', '_') }\n"
    "  end,\n"
    "}\n";

TEST(policy_case_counts_per_window)
{
    policy_report_t rep = POLICY_REPORT_INIT;
    policy_t *p = load_report("windows.lua", WINDOWS_POLICY, &rep);
    ASSERT_LOADED(p);
    static const char cases[] =
        "[{\"name\":\"windows\",\"res\":{\"status\":500},"
        "  \"counts\":{\"k\":{\"1\":2,\"10\":5},\"n\":7},"
        "  \"expect\":{\"reason\":\"r3_6_1_7_7\"}}]";
    tally_t t = {0};
    char err[256] = "";
    ASSERT_EQ(policy_run_cases(p, cases, sizeof cases - 1, tally, &t, err, sizeof err), 0);
    ASSERT_STR(t.names, "ok:windows");
    policy_release(p);
    policy_report_free(&rep);
}

TEST(policy_try_answers_one_case_and_keeps_its_effects_inside)
{
    policy_report_t rep = POLICY_REPORT_INIT;
    policy_t *p = load_report("try.lua", CASES_POLICY, &rep);
    ASSERT_LOADED(p);
    static const char limit[] =
        "{\"res\":{\"status\":403,\"headers\":{\"content-type\":\"application/json\"},"
        "\"body\":\"{\\\"message\\\":\\\"slow down\\\"}\"},\"attempt\":2}";
    policy_outcome_t o;
    char err[256];
    fx_capture_t cap;
    buf_t out = BUF_INIT;
    fx_capture_begin(&cap);
    int rc = policy_try(p, limit, sizeof limit - 1, clock_wall_ms(), &o, err, sizeof err);
    fx_capture_end(&cap, &out);
    ASSERT_EQ(rc, 0);
    ASSERT_EQ(out.len, 0); /* no alert record, no log: a replay writes nothing */
    ASSERT(o.handled);
    ASSERT_EQ(o.kind, VERDICT_RETRY);
    ASSERT_STR(o.reason, "limit");
    ASSERT_STR(o.alerts, "Limited");
    ASSERT_STR(o.error, "");

    static const char other[] = "{\"res\":{\"status\":404}}";
    ASSERT_EQ(policy_try(p, other, sizeof other - 1, clock_wall_ms(), &o, err, sizeof err), 0);
    ASSERT(!o.handled);
    ASSERT_EQ(o.kind, VERDICT_PASS);

    static const char bad[] = "{\"res\":{\"status\":1000}}";
    ASSERT_EQ(policy_try(p, bad, sizeof bad - 1, clock_wall_ms(), &o, err, sizeof err), -1);
    ASSERT_CONTAINS(err, "res.status");
    buf_free(&out);
    policy_release(p);
    policy_report_free(&rep);
}

/* Appends a JSON object of `n` fields "<name>1" .. "<name>n", field i
 * holding "<letter>i" thirty times. */
static void json_fields(buf_t *b, const char *name, char letter, int n)
{
    buf_puts(b, "{");
    for (int i = 1; i <= n; i++) {
        buf_printf(b, "%s\"%s%d\":\"", i > 1 ? "," : "", name, i);
        for (int k = 0; k < 30; k++)
            buf_printf(b, "%c%d", letter, i);
        buf_puts(b, "\"");
    }
    buf_puts(b, "}");
}

/* A case's heads hold every header it gives, however many: the head grows
 * (and moves) as they are added, and the handler still reads them all. */
TEST(policy_try_case_heads_keep_every_header)
{
    policy_report_t rep = POLICY_REPORT_INIT;
    policy_t *p = load_report("heads.lua",
                              "return { [200] = function(req, res)\n"
                              "  local ok = req.method == 'PUT' and req.path == '/p?q=1'\n"
                              "  for i = 1, 50 do\n"
                              "    ok = ok and req.headers['x-h' .. i] == ('v' .. i):rep(30)\n"
                              "  end\n"
                              "  for i = 1, 20 do\n"
                              "    ok = ok and res.headers['x-r' .. i] == ('r' .. i):rep(30)\n"
                              "  end\n"
                              "  return respond { status = ok and 201 or 500 }\n"
                              "end }\n",
                              &rep);
    ASSERT_LOADED(p);
    buf_t c = BUF_INIT;
    buf_puts(&c, "{\"req\":{\"method\":\"PUT\",\"path\":\"/p?q=1\",\"headers\":");
    json_fields(&c, "x-h", 'v', 50);
    buf_puts(&c, "},\"res\":{\"status\":200,\"headers\":");
    json_fields(&c, "x-r", 'r', 20);
    buf_puts(&c, "}}");
    policy_outcome_t o;
    char err[256];
    ASSERT_EQ(policy_try(p, c.data, c.len, clock_wall_ms(), &o, err, sizeof err), 0);
    ASSERT(o.handled);
    ASSERT_STR(o.error, "");
    ASSERT_EQ(o.kind, VERDICT_RESPOND);
    ASSERT_EQ(o.status, 201);
    buf_free(&c);
    policy_release(p);
    policy_report_free(&rep);
}

TEST(policy_try_counts_on_the_clock_of_the_record)
{
    policy_report_t rep = POLICY_REPORT_INIT;
    policy_t *p = load_report("count.lua",
                              "return { [502] = function()\n"
                              "  return respond { status = 400 + errord.count('bad', 10) }\n"
                              "end }\n",
                              &rep);
    ASSERT_LOADED(p);
    counter_reset();
    static const char c[] = "{\"res\":{\"status\":502}}";
    policy_outcome_t o;
    char err[256];
    int64_t t0 = 1700000000000; /* a recorded past: not now */
    int64_t at[] = {t0, t0 + 1000, t0 + 9000, t0 + 30000};
    int want[] = {401, 402, 403, 401}; /* the 10 s window moved on by the last */
    for (int i = 0; i < 4; i++) {
        ASSERT_EQ(policy_try(p, c, sizeof c - 1, at[i], &o, err, sizeof err), 0);
        ASSERT_EQ(o.kind, VERDICT_RESPOND);
        ASSERT_EQ(o.status, want[i]);
    }
    counter_reset();
    policy_release(p);
    policy_report_free(&rep);
}

TEST(policy_secret_headers)
{
    static const char *const secret[] = {"authorization", "proxy-authorization", "cookie",
                                         "set-cookie", "x-api-key"};
    for (size_t i = 0; i < sizeof secret / sizeof *secret; i++)
        ASSERT(redact_header_secret(NULL, secret[i], strlen(secret[i])));
    ASSERT(!redact_header_secret(NULL, "content-type", 12));
    ASSERT(!redact_header_secret(NULL, "x-api-keys", 10));
    ASSERT(!redact_header_secret(NULL, "cookie", 5));
    ASSERT(redact_header_secret(NULL, "X-Api-Key", 9)); /* any case */
}
