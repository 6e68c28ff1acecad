/* sandbox: what a policy must not be able to do (SPEC §2 "Safety"), tried
 * the way a careless or hostile policy would: the unsafe libraries, binary
 * chunks, memory bombs, endless loops (also inside pcall, and in C code the
 * count hook cannot see), views and verdicts tampered with, metamethods
 * that errord's own C code trips over. Each attempt must fail cleanly — the
 * handler fails open with its reason — and the state must keep working
 * afterwards. Attempts that could crash or hang errord itself run in a child
 * process (fx_in_child), so they are reported as failures instead of taking
 * the runner down. */
#include "clock.h"
#include "policy.h"
#include "policy_fixture.h"
#include "test.h"

#include <stdlib.h>
#include <strings.h>

/* A handler at [200] every sandbox policy below carries: it proves the
 * state still works after an attempt failed. */
#define HEALTHY "p[200] = function(req, res) return respond { status = 200, body = 'ok' } end\n"

/* Fails the test unless [200] still answers "ok". */
#define ASSERT_STILL_WORKS(p)                                                                \
    do {                                                                                     \
        verdict_t ok_ = VERDICT_INIT;                                                        \
        buf_t oklg_ = BUF_INIT;                                                              \
        ASSERT_EQ(fx_decide_status((p), 200, "", &ok_, &oklg_), 0);                          \
        int fine_ = ok_.failure == NULL && ok_.kind == VERDICT_RESPOND &&                   \
                    strcmp(fx_body(&ok_), "ok") == 0;                                        \
        if (!fine_)                                                                          \
            test_fail(__FILE__, __LINE__, "the state stopped working: failure %s, log %s",  \
                      fx_failure(&ok_), oklg_.data ? oklg_.data : "");                       \
        verdict_reset(&ok_);                                                                 \
        buf_free(&oklg_);                                                                    \
        if (!fine_)                                                                          \
            return;                                                                          \
    } while (0)

static uint64_t ms_since(uint64_t t0)
{
    return (clock_now_ns() - t0) / 1000000u;
}

/* ---- what is not there ---------------------------------------------------------------------- */

TEST(sandbox_unsafe_functions_are_absent)
{
    ASSERT_LUA_CHECKS(
        "  for _, name in ipairs { 'io', 'require', 'dofile', 'loadfile', 'debug', 'package',\n"
        "                         'collectgarbage' } do\n"
        "    check(_G[name] == nil, name .. ' is there')\n"
        "  end\n"
        "  for _, name in ipairs { 'execute', 'getenv', 'exit', 'remove', 'rename', 'tmpname',\n"
        "                         'setlocale' } do\n"
        "    check(os[name] == nil, 'os.' .. name .. ' is there')\n"
        "  end\n"
        "  check(string.dump == nil, 'string.dump is there')\n"
        "  check(('').dump == nil, 'string.dump is there through a string')\n"
        "  check(getmetatable('').__index.dump == nil, 'dump is in the string metatable')\n"
        "  for _, f in ipairs { os.time, os.clock, os.date, string.format, table.concat,\n"
        "                       math.floor, utf8.char, load, pcall, pairs, tostring } do\n"
        "    check(type(f) == 'function', 'a safe function is missing')\n"
        "  end\n"
        "  check(type(os.date('!%Y-%m-%d', 0)) == 'string', 'os.date works')\n");
}

/* Each attempt raises inside its handler: the handler fails open and the
 * next call works. */
TEST(sandbox_escape_attempts_fail_cleanly)
{
    static const char *const attempts[] = {
        "io.open('/etc/passwd'):read('a')",
        "io.popen('id'):read('a')",
        "os.execute('true')",
        "os.getenv('HOME')",
        "os.remove('/tmp/errord-must-not-remove')",
        "require('io')",
        "dofile('/etc/passwd')",
        "loadfile('/etc/passwd')",
        "debug.getregistry()",
        "debug.sethook()",
        "string.dump(print)",
        "package.loadlib('libc.so.6', 'system')",
        "collectgarbage('stop')",
    };
    buf_t src = BUF_INIT;
    buf_puts(&src, "local p = {}\n" HEALTHY);
    for (size_t i = 0; i < sizeof attempts / sizeof *attempts; i++)
        buf_printf(&src, "p[%zu] = function() return respond { status = 200, body = tostring(%s) } end\n",
                   500 + i, attempts[i]);
    buf_puts(&src, "return p\n");
    buf_append(&src, "", 1);
    policy_t *p = fx_load(src.data);
    buf_free(&src);
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (size_t i = 0; i < sizeof attempts / sizeof *attempts; i++) {
        buf_clear(&lg);
        ASSERT_EQ(fx_decide_status(p, (int)(500 + i), "", &v, &lg), 0);
        if (v.failure == NULL || strcmp(v.failure, "error") != 0 || v.kind != VERDICT_PASS) {
            test_fail(__FILE__, __LINE__, "%s: failure %s, verdict %d, body \"%s\"", attempts[i],
                      fx_failure(&v), v.kind, fx_body(&v));
            break;
        }
        ASSERT_CONTAINS(lg.data, "nil value");
        ASSERT_STILL_WORKS(p);
    }
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

TEST(sandbox_load_refuses_binary_chunks)
{
    ASSERT_LUA_CHECKS(
        "  local header = '\\27Lua\\x54\\x00\\x19\\x93\\r\\n\\x1a\\n\\x04\\x08\\x08'\n"
        "    .. '\\x78\\x56\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x28\\x77\\x40'\n"
        "    .. '\\x01\\x80\\x80\\x80\\x00\\x01\\x02\\x85\\x51\\x00\\x00\\x00'\n"
        "  local f, err = load(header)\n"
        "  check(f == nil and tostring(err):find('binary', 1, true), 'a binary chunk: ' .. tostring(err))\n"
        "  f = load(header, 'x', 'b')\n"
        "  check(f == nil, 'a binary chunk with mode b')\n"
        "  f = load(header, 'x', 'bt', {})\n"
        "  check(f == nil, 'a binary chunk with mode bt and an env')\n"
        "  local parts = { '\\27', 'Lua', header:sub(5) }\n"
        "  f = load(function() return table.remove(parts, 1) end)\n"
        "  check(f == nil, 'a binary chunk from a reader function')\n"
        "  check(load('return 1 + 1')() == 2, 'a text chunk')\n"
        "  check(load('return x', 'c', 't', { x = 5 })() == 5, 'a text chunk with an env')\n"
        "  check(load('return x', 'c', 'b', { x = 6 })() == 6, 'a text chunk with mode b')\n"
        "  local g, e = load('syntax error here')\n"
        "  check(g == nil and type(e) == 'string', 'a syntax error gives nil and a message')\n"
        "  check(not pcall(load), 'load needs a chunk')\n");
}

/* print() writes one log record with its arguments, tab-separated, as
 * Lua's own print would (and nothing else). */
TEST(sandbox_print_logs_its_arguments)
{
    policy_t *p = fx_load("return { [500] = function() print('hello', 42, nil, true) end }\n");
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    ASSERT_EQ(fx_decide_status(p, 500, "", &v, &lg), 0);
    CHECK_OUT(v.failure == NULL, "print failed: %s", lg.data ? lg.data : "");
    CHECK_OUT(fx_has(&lg, "\"msg\":\"policy print\"") &&
                  fx_has(&lg, "\"text\":\"hello\\t42\\tnil\\ttrue\"") && !fx_has(&lg, "userdata"),
              "print('hello', 42, nil, true) logged %s", lg.data ? lg.data : "(nothing)");
out:
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* ---- memory ------------------------------------------------------------------------------------- */

/* (The clock out of the way: under sanitizers string.rep is slow enough
 * for the time limit to stop these first.) */
static const char *const MEMORY_POLICY =
    "local p = { settings = { limits = { memory_mb = 8, time_ms = 10000 } } }\n"
    "p[500] = function() local s = string.rep('x', 1 << 30); return respond { status = 200, body = s } end\n"
    "p[501] = function() local s = 'x'; while true do s = s .. s end end\n"
    "p[502] = function() local s = string.rep('x', 1 << 29, ','); return #s end\n"
    "p[503] = function()\n"
    "  local parts = {}\n"
    "  for i = 1, 6 do parts[i] = string.rep(string.char(64 + i), 1 << 20) end\n"
    "  return respond { status = 200, body = table.concat(parts) }\n"
    "end\n"
    "p[201] = function()\n"
    "  local s = string.rep('y', 1 << 20)\n"
    "  return respond { status = 200, body = tostring(#s) }\n"
    "end\n" HEALTHY "return p\n";

/* Each bomb fails with "memory" (logged), and a megabyte is still there to
 * allocate afterwards, bomb after bomb; after the third within seconds the
 * bomb's handler is set aside (its responses pass without a call), and the
 * others still run. */
static void memory_bomb(int status, const char *what)
{
    policy_t *p = fx_load(MEMORY_POLICY);
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (int round = 0; round < 5; round++) {
        const char *want = round < 3 ? "memory" : "set_aside";
        buf_clear(&lg);
        CHECK_OUT(fx_decide_status(p, status, "", &v, &lg) == 0, "no call");
        CHECK_OUT(v.failure != NULL && strcmp(v.failure, want) == 0 && v.kind == VERDICT_PASS,
                  "%s, round %d: failure %s, wanted \"%s\"; log: %s", what, round + 1,
                  fx_failure(&v), want, lg.data ? lg.data : "");
        CHECK_OUT(round >= 3 || fx_has(&lg, "\"kind\":\"memory\""), "log: %s", lg.data ? lg.data : "");
        CHECK_OUT(round != 2 || fx_has(&lg, "policy handler set aside"), "log: %s",
                  lg.data ? lg.data : "");
        buf_clear(&lg);
        CHECK_OUT(fx_decide_status(p, 201, "", &v, &lg) == 0, "no call");
        CHECK_OUT(v.failure == NULL && strcmp(fx_body(&v), "1048576") == 0,
                  "after %s (round %d) a handler allocating 1 MiB failed with %s: %s", what,
                  round + 1, fx_failure(&v), lg.data ? lg.data : "");
        CHECK_OUT(fx_decide_status(p, 200, "", &v, &lg) == 0 && v.failure == NULL,
                  "the state stopped working: %s", lg.data ? lg.data : "");
    }
out:
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

TEST(sandbox_memory_bomb_string_rep)
{
    memory_bomb(500, "string.rep('x', 1 << 30)");
}

TEST(sandbox_memory_bomb_doubling_concat)
{
    memory_bomb(501, "s = s .. s");
}

TEST(sandbox_memory_bomb_string_rep_with_separator)
{
    memory_bomb(502, "string.rep('x', 1 << 29, ',')");
}

TEST(sandbox_memory_bomb_table_concat)
{
    memory_bomb(503, "table.concat of six 1 MiB strings");
}

/* A handful of instructions that each copy 8 MiB reach the memory cap
 * before the instruction hook would look at the clock, and take longer
 * than the time limit: the allocator looks at the clock, so the call stops
 * at its time limit, not after filling the cap. */
TEST(sandbox_time_limit_stops_large_allocations)
{
    policy_t *p = fx_load("local p = { settings = { limits = { time_ms = 1 } } }\n"
                          "p[500] = function()\n"
                          "  local big, t = string.rep('x', 1024):rep(8192), {}\n"
                          "  for i = 1, 20 do t[i] = big .. i end\n"
                          "end\n" HEALTHY "return p\n");
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    ASSERT_EQ(fx_decide_status(p, 500, "", &v, &lg), 0);
    if (v.failure == NULL || strcmp(v.failure, "timeout") != 0 || v.kind != VERDICT_PASS ||
        !fx_has(&lg, "time limit reached"))
        test_fail(__FILE__, __LINE__, "failure %s, wanted a time limit; log: %s", fx_failure(&v),
                  lg.data ? lg.data : "");
    verdict_reset(&v);
    buf_free(&lg);
    ASSERT_STILL_WORKS(p);
    policy_release(p);
}

/* Set aside after its third failure, a handler that fails again when it is
 * back is set aside again at once, for twice as long. */
TEST(sandbox_handler_back_from_set_aside_is_on_probation)
{
    policy_t *p = fx_load("local p = { settings = { limits = { time_ms = 1, set_aside_s = 1 } } }\n"
                          "p[500] = function() while true do end end\n" HEALTHY "return p\n");
    ASSERT_LOADED(p);
    static const char *const want[] = {"timeout", "timeout", "timeout", "set_aside", NULL,
                                       "timeout", "set_aside"};
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        if (want[i] == NULL) {
            usleep(1100 * 1000); /* the first set-aside is over */
            continue;
        }
        buf_clear(&lg);
        CHECK_OUT(fx_decide_status(p, 500, "", &v, &lg) == 0, "no call");
        CHECK_OUT(v.failure != NULL && strcmp(v.failure, want[i]) == 0, "call %zu: %s, wanted %s",
                  i + 1, fx_failure(&v), want[i]);
        if (i == 2)
            CHECK_OUT(fx_has(&lg, "\"failures\":3,") && fx_has(&lg, "\"for_ms\":1000,") &&
                          fx_has(&lg, "\"times\":1"),
                      "first set-aside: %s", lg.data ? lg.data : "");
        if (i == 5)
            CHECK_OUT(fx_has(&lg, "\"failures\":1,") && fx_has(&lg, "\"for_ms\":2000,") &&
                          fx_has(&lg, "\"times\":2"),
                      "on probation: %s", lg.data ? lg.data : "");
    }
out:
    verdict_reset(&v);
    buf_free(&lg);
    ASSERT_STILL_WORKS(p);
    policy_release(p);
}

TEST(sandbox_memory_bomb_at_load)
{
    policy_t *p = fx_load("local s = string.rep('x', 1 << 30)\nreturn {}\n");
    ASSERT(p == NULL);
    ASSERT_CONTAINS(fx_err, "memory");
}

/* Garbage an earlier call left behind is the collector's, not the next
 * call's: two handlers that each stay well under the cap run one after the
 * other, again and again. */
TEST(sandbox_garbage_of_earlier_calls_is_not_held_against_later_ones)
{
    policy_t *p = fx_load("local p = { settings = { limits = { memory_mb = 8, time_ms = 10000 } } }\n"
                          "p[500] = function()\n"
                          "  local t = {}\n"
                          "  for i = 1, 5 do t[i] = string.rep(string.char(64 + i), 1 << 20) end\n"
                          "end\n"
                          "p[501] = function()\n"
                          "  local s = string.rep('z', 3 << 20)\n"
                          "  return respond { status = 200, body = tostring(#s) }\n"
                          "end\n"
                          "return p\n");
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (int round = 0; round < 5; round++) {
        buf_clear(&lg);
        CHECK_OUT(fx_decide_status(p, 500, "", &v, &lg) == 0 && v.failure == NULL,
                  "round %d, 5 MiB of garbage: %s", round + 1, lg.data ? lg.data : "");
        CHECK_OUT(fx_decide_status(p, 501, "", &v, &lg) == 0 && v.failure == NULL &&
                      strcmp(fx_body(&v), "3145728") == 0,
                  "round %d, 3 MiB after the other handler's garbage: failure %s: %s", round + 1,
                  fx_failure(&v), lg.data ? lg.data : "");
    }
out:
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* A policy that keeps the state's memory full (in globals, so no GC frees
 * it) must not take errord down: later calls fail open with "memory". */
static const char *const HOARD_POLICY =
    "local p = { settings = { limits = { memory_mb = 4 } } }\n"
    "p[500] = function()\n"
    "  pcall(function() while true do hoard = { hoard } end end)\n"
    "end\n" HEALTHY "return p\n";

static int hoard_child(void *arg, char *msg, size_t n)
{
    const char *path = arg;
    char err[512];
    policy_t *p = policy_load(path, err, sizeof err);
    if (p == NULL) {
        snprintf(msg, n, "did not load: %s", err);
        return -1;
    }
    verdict_t v = VERDICT_INIT;
    for (int i = 0; i < 4; i++) {
        int status = i == 0 ? 500 : 200;
        fx_call_t c;
        fx_call_status(&c, status, "");
        policy_decide(p, &c.in, &v);
        fx_call_free(&c);
        if (v.failure != NULL && strcmp(v.failure, "memory") != 0 && strcmp(v.failure, "error") != 0) {
            snprintf(msg, n, "call %d (status %d) failed with %s", i, status, v.failure);
            return -1;
        }
        verdict_reset(&v);
    }
    policy_release(p);
    return 0;
}

TEST(sandbox_memory_kept_full_fails_open)
{
    char path[512];
    ASSERT_EQ(fx_write("hoard.lua", HOARD_POLICY, strlen(HOARD_POLICY), path, sizeof path), 0);
    ASSERT_CHILD(hoard_child, path, 5000);
}

/* ---- time and instructions ------------------------------------------------------------------------ */

/* Handlers that never end, plain and behind the script's own pcall. */
static const char *const FOREVER_HANDLERS =
    "p[500] = function() while true do end end\n"
    "p[501] = function()\n"
    "  pcall(function() while true do end end)\n"
    "  return respond { status = 200, body = 'escaped' }\n"
    "end\n"
    "p[502] = function() while true do pcall(function() while true do end end) end end\n"
    "p[503] = function()\n"
    "  xpcall(function() while true do end end, function(e) return e end)\n"
    "  return respond { status = 200, body = 'escaped' }\n"
    "end\n"
    "p[504] = function()\n"
    "  pcall(table.sort, { 3, 2, 1, 5, 4 }, function(a, b) while true do end end)\n"
    "  return respond { status = 200, body = 'escaped' }\n"
    "end\n"
    "p[505] = function()\n"
    "  for i = 1, 10 do pcall(string.gsub, 'abc', '.', function() while true do end end) end\n"
    "  return respond { status = 200, body = 'escaped' }\n"
    "end\n"
    "p[506] = function() error(setmetatable({}, { __tostring = function() while true do end end })) end\n"
    "p[507] = function()\n"
    "  while true do xpcall(function() while true do end end, function() while true do end end) end\n"
    "end\n"
    "p[508] = function()\n"
    "  local ok, e = pcall(function() while true do end end)\n"
    "  local ok2 = pcall(error, e)\n"
    "  for i = 1, 1e12 do end\n"
    "  return respond { status = 200, body = 'escaped' }\n"
    "end\n";
#define FOREVER_FIRST 500
#define FOREVER_LAST 508

typedef struct {
    const char *path;
    uint64_t min_ms, max_ms;
    const char *limit;
} forever_arg_t;

/* In a child (a handler that is never stopped would hang the runner): every
 * FOREVER handler fails with "timeout" in between `min_ms` and `max_ms`, the
 * log naming `limit`, and the state works afterwards. */
static int forever_child(void *arg, char *msg, size_t n)
{
    const forever_arg_t *a = arg;
    policy_t *p = fx_load_path(a->path, NULL);
    if (p == NULL) {
        snprintf(msg, n, "did not load: %s", fx_err);
        return -1;
    }
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    int rc = 0;
    for (int s = FOREVER_FIRST; s <= FOREVER_LAST && rc == 0; s++) {
        buf_clear(&lg);
        uint64_t t0 = clock_now_ns();
        fx_decide_status(p, s, "", &v, &lg);
        uint64_t ms = ms_since(t0);
        if (v.failure == NULL || strcmp(v.failure, "timeout") != 0 || v.kind != VERDICT_PASS ||
            ms < a->min_ms || ms > a->max_ms || !fx_has(&lg, a->limit)) {
            snprintf(msg, n,
                     "[%d]: failure %s, verdict %d (%s) after %llu ms; wanted \"timeout\" in "
                     "%llu..%llu ms with \"%s\" in the log: %s",
                     s, fx_failure(&v), v.kind, fx_body(&v), (unsigned long long)ms,
                     (unsigned long long)a->min_ms, (unsigned long long)a->max_ms, a->limit,
                     lg.data ? lg.data : "");
            rc = -1;
            break;
        }
        buf_clear(&lg);
        fx_decide_status(p, 200, "", &v, &lg);
        if (v.failure != NULL || strcmp(fx_body(&v), "ok") != 0) {
            snprintf(msg, n, "after [%d] the state stopped working: %s", s,
                     lg.data ? lg.data : "");
            rc = -1;
        }
    }
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
    return rc;
}

#define ASSERT_FOREVER_STOPPED(limits, min_ms, max_ms, limit)                                   \
    do {                                                                                        \
        char src_[4096], path_[512];                                                            \
        snprintf(src_, sizeof src_,                                                             \
                 "local p = { settings = { limits = %s } }\n%s" HEALTHY "return p\n", (limits), \
                 FOREVER_HANDLERS);                                                             \
        ASSERT_EQ(fx_write("forever.lua", src_, strlen(src_), path_, sizeof path_), 0);         \
        forever_arg_t a_ = {path_, (min_ms), (max_ms), (limit)};                                \
        ASSERT_CHILD(forever_child, &a_, 20000);                                                \
    } while (0)

TEST(sandbox_time_limit_stops_endless_loops)
{
    /* the instruction limit out of the way: only the clock can stop these */
    ASSERT_FOREVER_STOPPED("{ instructions = 1000000000, time_ms = 50 }", 45, 1000,
                           "time limit reached");
}

TEST(sandbox_instruction_limit_stops_endless_loops)
{
    /* the clock out of the way: ten seconds, the instruction count stops them long before */
    ASSERT_FOREVER_STOPPED("{ instructions = 100000, time_ms = 10000 }", 0, 1000,
                           "instruction limit reached");
}

TEST(sandbox_default_limits_stop_endless_loops)
{
    ASSERT_FOREVER_STOPPED("nil", 0, 1000, "limit reached");
}

/* The budget is per call: a handler using most of it runs again and again. */
TEST(sandbox_limits_are_per_call)
{
    policy_t *p = fx_load("local p = { settings = { limits = { instructions = 100000,\n"
                          "                                     time_ms = 10000 } } }\n"
                          "p[500] = function()\n"
                          "  local n = 0\n"
                          "  for i = 1, 15000 do n = n + i end\n"
                          "  return respond { status = 200, body = tostring(n) }\n"
                          "end\n"
                          "return p\n");
    ASSERT_LOADED(p);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    for (int i = 0; i < 20; i++) {
        ASSERT_EQ(fx_decide_status(p, 500, "", &v, &lg), 0);
        ASSERT_FAILURE(v, "(none)", lg);
        ASSERT_STR(fx_body(&v), "112507500");
    }
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
}

/* Lua's pattern matcher is C: the count hook never runs inside it. A
 * backtracking pattern over a 4 KiB body must still end at the time
 * limit. */
static const char *const PATTERN_POLICY =
    "local p = { settings = { limits = { time_ms = 100 } } }\n"
    "p[500] = function(req, res)\n"
    "  return respond { status = 200, body = tostring(res.body:find('(.*)x(.*)y')) }\n"
    "end\n"
    "return p\n";

static int pattern_child(void *arg, char *msg, size_t n)
{
    const char *path = arg;
    char err[512];
    policy_t *p = policy_load(path, err, sizeof err);
    if (p == NULL) {
        snprintf(msg, n, "did not load: %s", err);
        return -1;
    }
    char *body = malloc(4097);
    memset(body, 'x', 4096);
    body[4096] = '\0';
    verdict_t v = VERDICT_INIT;
    fx_call_t c;
    fx_call_status(&c, 500, body);
    uint64_t t0 = clock_now_ns();
    policy_decide(p, &c.in, &v);
    uint64_t ms = ms_since(t0);
    fx_call_free(&c);
    free(body);
    int rc = 0;
    if (ms > 1000 || v.failure == NULL || strcmp(v.failure, "timeout") != 0) {
        snprintf(msg, n, "the handler took %llu ms with limits.time_ms = 100 (failure %s)",
                 (unsigned long long)ms, fx_failure(&v));
        rc = -1;
    }
    verdict_reset(&v);
    policy_release(p);
    return rc;
}

TEST(sandbox_time_limit_bounds_pattern_matching)
{
    char path[512];
    ASSERT_EQ(fx_write("pattern.lua", PATTERN_POLICY, strlen(PATTERN_POLICY), path, sizeof path),
              0);
    ASSERT_CHILD(pattern_child, path, 1500);
}

/* A finalizer (__gc) is policy code too: wherever errord happens to run it
 * (a later call, a GC step in errord's own C code, lua_close when the policy
 * is released after a reload), it is bounded. */
static const char *const GC_POLICY =
    "local p = {}\n"
    "setmetatable({}, { __gc = function() while true do end end })\n"
    "p[500] = function() local t = {} for i = 1, 1000 do t[i] = { i } end end\n" HEALTHY
    "return p\n";

/* A finalizer would run whenever the collector likes, at the latest while
 * the state closes, outside any bounded call: policies cannot have one. */
static int gc_child(void *arg, char *msg, size_t n)
{
    const char *path = arg;
    char err[512];
    policy_t *p = policy_load(path, err, sizeof err);
    if (p == NULL && strstr(err, "gc.lua:2:") != NULL && strstr(err, "__gc") != NULL)
        return 0; /* refused where it was asked for, and said why */
    if (p == NULL) {
        snprintf(msg, n, "did not load, but not for its __gc: %s", err);
        return -1;
    }
    verdict_t v = VERDICT_INIT;
    for (int i = 0; i < 50; i++) {
        fx_call_t c;
        fx_call_status(&c, i % 2 ? 500 : 200, "");
        policy_decide(p, &c.in, &v);
        fx_call_free(&c);
        verdict_reset(&v);
    }
    uint64_t t0 = clock_now_ns();
    policy_release(p);
    if (ms_since(t0) > 1000) {
        snprintf(msg, n, "releasing the policy took %llu ms", (unsigned long long)ms_since(t0));
        return -1;
    }
    return 0;
}

TEST(sandbox_finalizers_are_bounded)
{
    char path[512];
    ASSERT_EQ(fx_write("gc.lua", GC_POLICY, strlen(GC_POLICY), path, sizeof path), 0);
    ASSERT_CHILD(gc_child, path, 1500);
}

/* ---- views and verdicts tampered with -------------------------------------------------------------- */

/* The view's link to its input must not be reachable from Lua: a policy
 * that finds it (next() over the view) and puts it back into a view kept
 * from an earlier call reads a finished request's memory. */
static const char *const REVIVE_POLICY =
    "local p = {}\n"
    "local kept, key, ptr\n"
    "p[500] = function(req, res)\n"
    "  if kept == nil then\n"
    "    for k, v in next, req do\n"
    "      if type(k) == 'userdata' then key, ptr = k, v end\n"
    "    end\n"
    "    kept = req\n"
    "    return\n"
    "  end\n"
    "  if key ~= nil then rawset(kept, key, ptr) end\n"
    "  return respond { status = 200, body = kept.path }\n"
    "end\n"
    "return p\n";

/* Decides a first and a second request; `free_first` frees the first one's
 * heads (and input) before the second call, as errord does. */
static int revive(const char *path, int free_first, char *msg, size_t n)
{
    char err[512];
    policy_t *p = policy_load(path, err, sizeof err);
    if (p == NULL) {
        snprintf(msg, n, "did not load: %s", err);
        return -1;
    }
    fx_call_t *first = calloc(1, sizeof *first), second;
    fx_call(first, "GET /first HTTP/1.1\r\nHost: h\r\n\r\n",
            "HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", "");
    fx_call(&second, "GET /second HTTP/1.1\r\nHost: h\r\n\r\n",
            "HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", "");
    verdict_t v = VERDICT_INIT;
    policy_decide(p, &first->in, &v);
    verdict_reset(&v);
    if (free_first) {
        fx_call_free(first);
        free(first);
        first = NULL;
    }
    policy_decide(p, &second.in, &v);
    int rc = 0;
    if (v.failure == NULL) {
        snprintf(msg, n, "a view kept from the first call was revived and read \"%s\"",
                 fx_body(&v));
        rc = -1;
    }
    if (first != NULL) {
        fx_call_free(first);
        free(first);
    }
    fx_call_free(&second);
    verdict_reset(&v);
    policy_release(p);
    return rc;
}

static int revive_kept_child(void *arg, char *msg, size_t n)
{
    return revive(arg, 0, msg, n);
}

static int revive_freed_child(void *arg, char *msg, size_t n)
{
    return revive(arg, 1, msg, n);
}

TEST(sandbox_kept_view_cannot_be_revived)
{
    char path[512];
    ASSERT_EQ(fx_write("revive.lua", REVIVE_POLICY, strlen(REVIVE_POLICY), path, sizeof path), 0);
    char msg[600];
    /* the first call's heads still alive: nothing freed is read, whatever happens */
    if (fx_in_child(revive_kept_child, path, 3000, msg, sizeof msg) != FX_CHILD_PASSED)
        test_fail(__FILE__, __LINE__, "first request still in memory: %s", msg);
    /* freed, as in errord: a use-after-free (ASan builds report it) */
    if (fx_in_child(revive_freed_child, path, 3000, msg, sizeof msg) != FX_CHILD_PASSED)
        test_fail(__FILE__, __LINE__, "first request freed: %s", msg);
}

/* Whether a verdict is one respond{}/retry{} would have accepted; `msg`
 * says what is wrong with it. */
static int verdict_sane(verdict_t *v, char *msg, size_t n)
{
    static const char *const owned[] = {"content-length", "transfer-encoding", "connection",
                                        "keep-alive",     "upgrade",           "te",
                                        "trailer",        "proxy-connection",  "set-cookie",
                                        NULL};
    if (v->kind == VERDICT_RESPOND && (v->status < 200 || v->status > 599)) {
        snprintf(msg, n, "respond with status %d", v->status);
        return -1;
    }
    if (v->kind == VERDICT_RETRY && v->after_ms < -1) {
        snprintf(msg, n, "retry after %lld ms", (long long)v->after_ms);
        return -1;
    }
    const char *h = fx_headers(v);
    while (*h != '\0') {
        const char *eol = strstr(h, "\r\n");
        size_t len = eol ? (size_t)(eol - h) : strlen(h);
        const char *colon = memchr(h, ':', len);
        if (colon == NULL || colon == h || memchr(h, '\n', len) || memchr(h, '\r', len)) {
            snprintf(msg, n, "header line \"%.*s\"", (int)len, h);
            return -1;
        }
        for (const char *const *o = owned; *o != NULL; o++) {
            if ((size_t)(colon - h) == strlen(*o) && strncasecmp(h, *o, strlen(*o)) == 0) {
                snprintf(msg, n, "header line \"%.*s\"", (int)len, h);
                return -1;
            }
        }
        h += len + (eol ? 2 : 0);
    }
    return 0;
}

static int tamper_child(void *arg, char *msg, size_t n)
{
    const char *path = arg;
    char err[512];
    policy_t *p = policy_load(path, err, sizeof err);
    if (p == NULL) {
        snprintf(msg, n, "did not load: %s", err);
        return -1;
    }
    verdict_t v = VERDICT_INIT;
    fx_call_t c;
    fx_call_status(&c, 500, "");
    policy_decide(p, &c.in, &v);
    fx_call_free(&c);
    char why[256];
    int rc = 0;
    if (verdict_sane(&v, why, sizeof why) < 0) {
        snprintf(msg, n, "errord took the changed verdict: %s", why);
        rc = -1;
    }
    verdict_reset(&v);
    fx_call_status(&c, 200, "");
    policy_decide(p, &c.in, &v);
    fx_call_free(&c);
    if (rc == 0 && v.failure != NULL) {
        snprintf(msg, n, "the state stopped working: %s", v.failure);
        rc = -1;
    }
    verdict_reset(&v);
    policy_release(p);
    return rc;
}

/* A verdict is a table the script can still change after respond{} or
 * retry{} checked it. errord must check what it takes (or not let it be
 * changed): these end in a verdict respond{} would have refused, or in a
 * crash. */
TEST(sandbox_verdict_changed_after_it_was_made)
{
    static const char *const cases[] = {
        "local v = respond { status = 200, body = 'ok' }; v.status = 99; return v",
        "local v = respond { status = 200, body = 'ok' }; v.status = 'x'; return v",
        "local v = respond { status = 200, body = 'ok' }\n"
        "  v.headers = { ['Content-Length'] = '1000' }; return v",
        "local v = respond { status = 200, body = 'ok', headers = { ['X-A'] = 'b' } }\n"
        "  v.headers['X-A'] = 'b\\r\\nSet-Cookie: session=stolen'; return v",
        "local h = { ['X-A'] = 'b' }\n"
        "  local v = respond { status = 200, body = 'ok', headers = h }\n"
        "  h['Transfer-Encoding'] = 'chunked'; return v",
        "local v = pass(); v.verdict = 'respond'; return v",
        "local v = pass(); v.verdict = nil; return v",
        "local v = retry { reason = 'x' }; v.after = -5; return v",
        "local v = respond { status = 200, headers = {} }; v.headers[{}] = 'x'; return v",
        "local v = respond { status = 200, headers = {} }; v.headers[1] = 'x'; return v",
        "local v = respond { status = 200, headers = {} }; v.headers['X-A'] = {}; return v",
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char src[1024], path[512];
        snprintf(src, sizeof src, "local p = {}\np[500] = function(req, res)\n  %s\nend\n" HEALTHY
                                  "return p\n",
                 cases[i]);
        ASSERT_EQ(fx_write("tamper.lua", src, strlen(src), path, sizeof path), 0);
        char msg[600];
        if (fx_in_child(tamper_child, path, 3000, msg, sizeof msg) != FX_CHILD_PASSED) {
            test_fail(__FILE__, __LINE__, "%s: %s", cases[i], msg);
        }
    }
}

/* ---- metamethods errord's own C code reads through ------------------------------------------------- */

typedef struct {
    const char *path;
    int run_tests;
} meta_arg_t;

static int meta_child(void *arg, char *msg, size_t n)
{
    const meta_arg_t *a = arg;
    char err[512];
    (void)msg;
    (void)n;
    policy_t *p = policy_load(a->path, err, sizeof err);
    if (p == NULL)
        return 0; /* refused with a message: fine */
    if (a->run_tests)
        policy_run_tests(p, NULL, NULL, err, sizeof err);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    fx_decide_status(p, 500, "{\"message\": \"x\"}", &v, &lg);
    verdict_reset(&v);
    buf_free(&lg);
    policy_release(p);
    return 0;
}

/* Tables the policy hands errord may carry metamethods, and so may strings;
 * reading them must not crash errord (an error outside a protected call
 * aborts the process) nor hang it (no limit is armed there). Loading and the
 * tests run before every reload, inside the running proxy. */
TEST(sandbox_metamethods_on_policy_tables)
{
    static const struct {
        const char *src;
        int run_tests;
    } cases[] = {
        {"return setmetatable({}, { __index = function(t, k) error('no key ' .. k) end })", 0},
        {"return setmetatable({}, { __index = function() while true do end end })", 0},
        {"return { settings = setmetatable({}, { __index = function() error('boom') end }) }", 0},
        {"return { settings = { limits = setmetatable({}, { __index = function() while true do end end }) } }",
         0},
        {"return { [500] = function() end, tests = { setmetatable({ name = 't' },\n"
         "  { __index = function() error('boom') end }) } }",
         1},
        {"return { [500] = function() end, tests = { { name = 't', res = { status = 500 },\n"
         "  expect = setmetatable({}, { __index = function() while true do end end }) } } }",
         1},
        {"return { [500] = function() end, tests = { { name = 't', expect = {},\n"
         "  res = setmetatable({ status = 500 }, { __index = function() error('x') end }) } } }",
         1},
        /* Every string shares one metatable: a policy can tamper with it,
         * then hand errord strings where it reads tables, or return one. */
        {"getmetatable('').__index = function() while true do end end\n"
         "return { settings = 'x', [500] = function() return 'x' end }",
         0},
        {"local mt = getmetatable('')\n"
         "mt.__index = function() error('boom') end\n"
         "mt.__len = function() while true do end end\n"
         "mt.__concat = function() while true do end end\n"
         "mt.__eq = function() while true do end end\n"
         "return { [500] = function() return respond { status = 'x', body = 'y' } end,\n"
         "  tests = { 'x', { name = 't', res = 'x', expect = 'y' },\n"
         "    { name = 'u', res = { status = 500, body = 'x' }, expect = { verdict = 'x' } } } }",
         1},
        {"getmetatable('').__index = function() while true do end end\n"
         "return { [500] = function() return pass() end, tests = {\n"
         "  { name = 't', res = { status = 500, headers = { a = 'b' } }, expect = 'pass' } } }",
         1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char path[512];
        ASSERT_EQ(fx_write("meta.lua", cases[i].src, strlen(cases[i].src), path, sizeof path), 0);
        meta_arg_t a = {path, cases[i].run_tests};
        char msg[600];
        if (fx_in_child(meta_child, &a, 1500, msg, sizeof msg) != FX_CHILD_PASSED)
            test_fail(__FILE__, __LINE__, "%s (%s): %s", cases[i].src,
                      cases[i].run_tests ? "load + tests" : "load", msg);
    }
}
