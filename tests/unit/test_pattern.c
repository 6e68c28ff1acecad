/* The bounded pattern functions give what Lua's own give: the same cases run
 * in a plain Lua state and in a sandbox, and their results must agree. */
#include "sandbox.h"
#include "test.h"

#include <lauxlib.h>
#include <lualib.h>

/* Runs each case (a chunk returning values) with pcall and renders what it
 * returned, one line per case. */
static const char *const DRIVER =
    "local cases = ...\n"
    "local out = {}\n"
    "local function render(...)\n"
    "  local t = table.pack(...)\n"
    "  for i = 1, t.n do t[i] = type(t[i]) == 'string' and ('%q'):format(t[i]) or tostring(t[i]) end\n"
    "  return table.concat(t, ',', 1, t.n)\n"
    "end\n"
    "for i, src in ipairs(cases) do\n"
    "  local f = assert(load(src))\n"
    "  local r = table.pack(pcall(f))\n"
    "  if r[1] then out[i] = render(table.unpack(r, 2, r.n))\n"
    "  else out[i] = 'error' end\n"
    "end\n"
    "return table.concat(out, '\\n')\n";

static const char *const CASES[] = {
    "return ('hello world'):find('o w')",
    "return ('hello world'):find('o', 6)",
    "return ('hello world'):find('l', -3)",
    "return ('hello'):find('', 10)",
    "return ('hello'):find('', 6)",
    "return ('a.b'):find('.', 1, true)",
    "return ('a+b'):find('+', 1, true)",
    "return ('hello world'):match('(h)(e)(l+)')",
    "return ('hello world'):match('()ll()')",
    "return ('key=value'):match('^(%w+)=(%w+)$')",
    "return ('  trim  '):match('^%s*(.-)%s*$')",
    "return ('THE (quick) fox'):find('%((%a+)%)')",
    "return ('f(a(b)c)d'):match('%b()')",
    "return ('THE (quick) fox'):gsub('%f[%a]%a+', function(w) return w:lower() end)",
    "return ('hello hello'):match('(h%a+) %1')",
    "return ('abc'):match('^(a?)(b?)(c?)(d?)$')",
    "return ('aaa'):match('a-b')",
    "return ('aaab'):match('a-b')",
    "return ('[x]'):match('[%[]')",
    "return ('a]b'):match('[]]')",
    "return ('a-b'):match('[a%-]+')",
    "return ('x9y'):match('[^%a]')",
    "return ('0x1F'):match('0x(%x+)')",
    "return ('A1b2'):gsub('%u', '*')",
    "return ('A1b2'):gsub('%d', '<%0>')",
    "return ('abc'):gsub('', '-')",
    "return ('hello world'):gsub('o', {o = '0'})",
    "return ('hello world'):gsub('(%w+)', '%1 %1', 1)",
    "return ('hello'):gsub('l', false and '' or function() return nil end)",
    "return ('a,b,,c'):gsub(',', ';', 2)",
    "return ('$x'):gsub('%$', '%%')",
    "return ('abc'):gsub('b', '%9')",
    "return ('abc'):gsub('(b)', '%2')",
    "return ('abc'):gsub('b', '%')",
    "local t = {} for k, v in ('a=1, b=2'):gmatch('(%w+)=(%w+)') do t[#t+1] = k .. v end return table.concat(t, ' ')",
    "local t = {} for w in ('one two  three'):gmatch('%a+') do t[#t+1] = w end return #t, t[3]",
    "local t = {} for w in ('abc'):gmatch('') do t[#t+1] = '.' end return #t",
    "local t = {} for p in ('aXbXc'):gmatch('()X') do t[#t+1] = p end return table.concat(t, ',')",
    "local t = {} for w in ('hello world from lua'):gmatch('%a+', 7) do t[#t+1] = w end return table.concat(t, '|')",
    "return ('^a'):gmatch('^a')()",
    "return ('abc'):find('b()')",
    "return ('abc'):match('%f[%w]%w+')",
    "return ('THE END'):match('%f[%z]')",
    "return ('a.b'):match('%.')",
    "return ('x'):match('(')",
    "return ('x'):match('%')",
    "return ('x'):match('[a')",
    "return ('x'):match('%b')",
    "return ('x'):match('%f')",
    "return ('x'):match('(()')",
    "return ('x'):match('%1')",
    "return ('x'):match(')')",
    "return ('x'):find('x', 10)",
    "return ('x'):match('x$x')",
    "return ('x$'):match('x$')",
    "return ('ab\\0cd'):find('\\0c')",
    "return ('ab\\0cd'):match('b(.)c')",
    "return ('ab'):match('.-$')",
    "return ('  x'):match('^%s*()')",
    "return ('2024-01-02'):match('(%d+)-(%d+)-(%d+)')",
    "return ('{\"message\":\"Request limit reached\"}'):match('\"message\":\"([^\"]*)\"')",
    "return string.find('abc', 'b', nil, nil)",
    "return string.gsub('hello', 'l+', function(x) return #x end)",
    "return string.gsub('abc', '%w', '%0%0')",
    "return string.gsub('abc', '.', {a = 1, b = true})",
};

static const char *run(lua_State *L, int (*call)(lua_State *, int, int, void *), void *arg)
{
    if (luaL_loadstring(L, DRIVER) != LUA_OK)
        return NULL;
    lua_createtable(L, (int)(sizeof CASES / sizeof *CASES), 0);
    for (size_t i = 0; i < sizeof CASES / sizeof *CASES; i++) {
        lua_pushstring(L, CASES[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    if (call(L, 1, 1, arg) != 0)
        return NULL;
    return lua_tostring(L, -1);
}

static int plain_call(lua_State *L, int nargs, int nresults, void *arg)
{
    (void)arg;
    return lua_pcall(L, nargs, nresults, 0);
}

static int sandbox_call_wrap(lua_State *L, int nargs, int nresults, void *arg)
{
    (void)L;
    return sandbox_call(arg, nargs, nresults) == SANDBOX_OK ? 0 : -1;
}

TEST(pattern_functions_agree_with_lua)
{
    lua_State *ref = luaL_newstate();
    luaL_openlibs(ref);
    sandbox_limits_t limits = {10000000, 1000, 64 << 20};
    sandbox_t *sb = sandbox_new(&limits);
    const char *want = run(ref, plain_call, NULL);
    const char *got = run(sandbox_state(sb), sandbox_call_wrap, sb);
    ASSERT(want != NULL);
    if (got == NULL) {
        test_fail(__FILE__, __LINE__, "the sandbox run failed: %s",
                  lua_tostring(sandbox_state(sb), -1));
    } else {
        /* compare case by case, to name the one that differs */
        const char *w = want, *g = got;
        for (size_t i = 0; i < sizeof CASES / sizeof *CASES; i++) {
            size_t wl = strcspn(w, "\n"), gl = strcspn(g, "\n");
            if (wl != gl || memcmp(w, g, wl) != 0)
                test_fail(__FILE__, __LINE__, "case %zu `%s`: Lua gives [%.*s], errord [%.*s]",
                          i + 1, CASES[i], (int)wl, w, (int)gl, g);
            w += wl + (w[wl] != '\0');
            g += gl + (g[gl] != '\0');
        }
    }
    sandbox_free(sb);
    lua_close(ref);
}

/* A pattern that backtracks for a long time is stopped by the budget. */
TEST(pattern_backtracking_is_bounded)
{
    sandbox_limits_t limits = {200000, 10000, 64 << 20};
    sandbox_t *sb = sandbox_new(&limits);
    lua_State *L = sandbox_state(sb);
    ASSERT_EQ(luaL_loadstring(L, "return (('a'):rep(3000)):find('(.*)x(.*)y')"), LUA_OK);
    ASSERT_EQ(sandbox_call(sb, 0, 1), SANDBOX_TIMEOUT);
    lua_settop(L, 0);
    ASSERT_EQ(luaL_loadstring(L, "return ('ok'):match('o(k)')"), LUA_OK);
    ASSERT_EQ(sandbox_call(sb, 0, 1), SANDBOX_OK);
    ASSERT_STR(lua_tostring(L, -1), "k");
    sandbox_free(sb);
}
