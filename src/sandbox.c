/* sandbox: a Lua 5.4 state errord can hand a policy to (see sandbox.h). */
#include "sandbox.h"

#include "clock.h"
#include "log.h"
#include "pattern.h"

#include <lauxlib.h>
#include <lualib.h>

#include <stdlib.h>
#include <string.h>

/* The count hook runs every this many VM instructions. */
#define HOOK_EVERY 1000
/* ... and the allocator looks at the clock after this many bytes: a few
 * instructions that each build a large string can take longer than a
 * thousand ordinary ones. */
#define CLOCK_EVERY_BYTES (256 * 1024)
/* Past the memory cap an allocation still succeeds, up to a quarter of the
 * cap (at least 1 MiB) more; at the next instruction the collector runs, and
 * if that does not bring the state back under the cap the call stops there,
 * with a location and a traceback. Past the slack an allocation fails. */
#define MEMORY_SLACK(cap) ((cap) / 4 > (1 << 20) ? (cap) / 4 : (size_t)1 << 20)

struct sandbox_s {
    lua_State *L;
    sandbox_limits_t limits;
    size_t used; /* bytes allocated */
    uint64_t budget; /* instructions left in this call */
    uint64_t deadline_ns;
    sandbox_status_t tripped;
    const char *why; /* the limit that stopped the call */
    int in_call;
    int gc_wanted; /* over the cap: collect at the next instruction */
    size_t grown; /* bytes allocated since the allocator last read the clock */
    void *ctx;
};

static void on_hook(lua_State *L, lua_Debug *ar);
static int spend(sandbox_t *s, uint64_t units);

/* The allocator: every byte of the state goes through here, so the cap
 * holds whatever the script does. When `ptr` is NULL, `osize` is a type
 * tag, not a size (Lua manual 4.6). */
static void *sandbox_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    sandbox_t *s = ud;
    size_t old = ptr != NULL ? osize : 0;
    if (nsize == 0) {
        free(ptr);
        s->used -= old;
        return NULL;
    }
    if (nsize > old && s->used + (nsize - old) > s->limits.memory) {
        if (!s->in_call || s->used + (nsize - old) > s->limits.memory + MEMORY_SLACK(s->limits.memory))
            return NULL;
        if (!s->gc_wanted && s->tripped == SANDBOX_OK) {
            s->gc_wanted = 1;
            lua_sethook(s->L, on_hook, LUA_MASKCOUNT, 1);
        }
    }
    void *p = realloc(ptr, nsize);
    if (p == NULL)
        return NULL;
    s->used = s->used - old + nsize;
    if (nsize > old && s->in_call && (s->grown += nsize - old) >= CLOCK_EVERY_BYTES) {
        s->grown = 0;
        (void)spend(s, 0); /* the allocator cannot raise; the hook does, at the next instruction */
    }
    return p;
}

sandbox_t *sandbox_of(lua_State *L)
{
    return *(sandbox_t **)lua_getextraspace(L);
}

void *sandbox_context(lua_State *L)
{
    return sandbox_of(L)->ctx;
}

void sandbox_set_context(sandbox_t *s, void *ctx)
{
    s->ctx = ctx;
}

/* Spends `units` of the call's instruction budget and looks at the clock.
 * Returns 0 while the call may go on; once a limit is hit, -1, and from then
 * on the hook fires on every instruction and raises again, so a script's
 * pcall can catch the error but never run on. */
static int spend(sandbox_t *s, uint64_t units)
{
    if (s->tripped == SANDBOX_OK) {
        if (s->budget <= units) {
            s->tripped = SANDBOX_TIMEOUT;
            s->why = "instruction limit reached";
        } else {
            s->budget -= units;
            if (clock_now_ns() > s->deadline_ns) {
                s->tripped = SANDBOX_TIMEOUT;
                s->why = "time limit reached";
            }
        }
        if (s->tripped == SANDBOX_OK)
            return 0;
    }
    lua_sethook(s->L, on_hook, LUA_MASKCOUNT | LUA_MASKLINE, 1);
    return -1;
}

static void on_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    sandbox_t *s = sandbox_of(L);
    if (s->gc_wanted && s->tripped == SANDBOX_OK) {
        s->gc_wanted = 0;
        lua_gc(L, LUA_GCCOLLECT); /* garbage of earlier calls must not count */
        if (s->used > s->limits.memory) {
            s->tripped = SANDBOX_MEMORY;
            s->why = "memory limit reached";
        } else {
            lua_sethook(L, on_hook, LUA_MASKCOUNT, HOOK_EVERY);
            return;
        }
    }
    if (spend(s, HOOK_EVERY) == 0)
        return;
    luaL_where(L, 0); /* level 0 in a hook: the Lua function it stopped */
    lua_pushfstring(L, "policy handler stopped: %s", s->why);
    lua_concat(L, 2);
    lua_error(L);
}

void sandbox_charge(lua_State *L, uint64_t units)
{
    sandbox_t *s = sandbox_of(L);
    if (!s->in_call || spend(s, units) == 0)
        return;
    luaL_error(L, "policy handler stopped: %s", s->why);
}

static int msg_handler(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (sandbox_of(L)->tripped == SANDBOX_OK && luaL_callmeta(L, 1, "__tostring") &&
            lua_type(L, -1) == LUA_TSTRING)
            return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* lua_pcall() of the function below the `nargs` arguments on top, with
 * msg_handler under it when `traceback`. Returns lua_pcall()'s code; the
 * handler is off the stack again either way. */
static int pcall_traced(lua_State *L, int nargs, int nresults, int traceback)
{
    if (!traceback)
        return lua_pcall(L, nargs, nresults, 0);
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, msg_handler);
    lua_insert(L, base); /* under the function and its arguments */
    int rc = lua_pcall(L, nargs, nresults, base);
    lua_remove(L, base);
    return rc;
}

sandbox_status_t sandbox_call(sandbox_t *s, int nargs, int nresults)
{
    lua_State *L = s->L;
    if (s->used > s->limits.memory / 4 * 3)
        lua_gc(L, LUA_GCCOLLECT); /* room first: old garbage is not this call's */
    s->tripped = SANDBOX_OK;
    s->gc_wanted = 0;
    s->grown = 0;
    s->budget = s->limits.instructions;
    s->deadline_ns = clock_now_ns() + s->limits.time_ms * 1000000u;
    s->in_call = 1;
    lua_sethook(L, on_hook, LUA_MASKCOUNT, HOOK_EVERY);
    int rc = pcall_traced(L, nargs, nresults, 1);
    lua_sethook(L, NULL, 0, 0);
    s->in_call = 0;
    s->gc_wanted = 0;
    if (rc == LUA_OK && s->tripped != SANDBOX_OK) {
        /* Tripped by an allocation in the last instructions of the call. */
        lua_pop(L, nresults < 0 ? 0 : nresults);
        lua_pushfstring(L, "policy handler stopped: %s", s->why);
        rc = LUA_ERRRUN;
    }
    if (rc == LUA_OK)
        return SANDBOX_OK;
    if (rc == LUA_ERRMEM || s->tripped == SANDBOX_MEMORY)
        lua_gc(L, LUA_GCCOLLECT); /* what the failed call left is garbage now */
    if (s->tripped != SANDBOX_OK)
        return s->tripped;
    return rc == LUA_ERRMEM ? SANDBOX_MEMORY : SANDBOX_ERROR;
}

sandbox_status_t sandbox_protect(lua_State *L, lua_CFunction fn, int nargs, int nresults,
                                 int traceback)
{
    lua_pushcfunction(L, fn);
    lua_insert(L, -nargs - 1); /* under its arguments */
    int rc = pcall_traced(L, nargs, nresults, traceback);
    return rc == LUA_OK ? SANDBOX_OK : rc == LUA_ERRMEM ? SANDBOX_MEMORY : SANDBOX_ERROR;
}

const char *sandbox_status_name(sandbox_status_t st)
{
    switch (st) {
    case SANDBOX_OK: return "ok";
    case SANDBOX_ERROR: return "error";
    case SANDBOX_TIMEOUT: return "timeout";
    case SANDBOX_MEMORY: return "memory";
    }
    return "error";
}

/* load() for text chunks only: binary chunks can break the VM. The
 * original load is this closure's upvalue, out of the script's reach. */
static int safe_load(lua_State *L)
{
    int nargs = lua_gettop(L) >= 4 ? 4 : 3; /* an env given as nil must stay given */
    luaL_checkany(L, 1);
    lua_settop(L, nargs);
    lua_pushliteral(L, "t");
    lua_replace(L, 3); /* mode */
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, nargs, LUA_MULTRET);
    return lua_gettop(L);
}

/* A script's own message handler, for xpcall. Once a limit stopped the call
 * it is not run at all: an error raised from the hook reaches handlers with
 * hooks off (Lua runs no hook inside a hook), so a handler that loops could
 * never be stopped. */
static int guarded_msgh(lua_State *L)
{
    if (sandbox_of(L)->tripped != SANDBOX_OK)
        return 1; /* the stop goes through as it is */
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

/* xpcall(f, msgh, ...) with msgh guarded as above; the original xpcall is
 * this closure's upvalue. */
static int safe_xpcall(lua_State *L)
{
    int n = lua_gettop(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushvalue(L, 2);
    lua_pushcclosure(L, guarded_msgh, 1);
    lua_replace(L, 2);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, n, LUA_MULTRET);
    return lua_gettop(L);
}

/* setmetatable() without __gc: a finalizer runs whenever the collector
 * likes, outside any bounded call (at the latest when the state closes), so
 * a policy may not have one. The original is this closure's upvalue. */
static int safe_setmetatable(lua_State *L)
{
    if (lua_istable(L, 2)) {
        lua_pushliteral(L, "__gc");
        if (lua_rawget(L, 2) != LUA_TNIL)
            return luaL_error(L, "setmetatable: __gc (finalizers) is not available to policies");
        lua_pop(L, 1);
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

static void remove_fields(lua_State *L, const char *table, const char *const *names)
{
    lua_getglobal(L, table); /* pushes the table */
    for (; *names != NULL; names++) {
        lua_pushnil(L);
        lua_setfield(L, -2, *names);
    }
    lua_pop(L, 1);
}

/* Protected: opens the safe libraries. */
static int open_safe_libraries(lua_State *L)
{
    static const luaL_Reg libs[] = {
        {LUA_GNAME, luaopen_base},        {LUA_STRLIBNAME, luaopen_string},
        {LUA_TABLIBNAME, luaopen_table},  {LUA_MATHLIBNAME, luaopen_math},
        {LUA_UTF8LIBNAME, luaopen_utf8},  {LUA_OSLIBNAME, luaopen_os},
        {NULL, NULL},
    };
    for (const luaL_Reg *lib = libs; lib->func != NULL; lib++) {
        luaL_requiref(L, lib->name, lib->func, 1);
        lua_pop(L, 1);
    }
    static const char *const base_out[] = {"dofile", "loadfile", "collectgarbage", NULL};
    static const char *const os_out[] = {"execute", "exit",    "getenv",    "remove",
                                         "rename",  "tmpname", "setlocale", NULL};
    static const char *const string_out[] = {"dump", NULL};
    remove_fields(L, LUA_GNAME, base_out);
    remove_fields(L, LUA_OSLIBNAME, os_out);
    remove_fields(L, LUA_STRLIBNAME, string_out);
    pattern_open(L, sandbox_charge);

    lua_getglobal(L, "load");
    lua_pushcclosure(L, safe_load, 1); /* pops the original load */
    lua_setglobal(L, "load");
    lua_getglobal(L, "xpcall");
    lua_pushcclosure(L, safe_xpcall, 1);
    lua_setglobal(L, "xpcall");
    lua_getglobal(L, "setmetatable");
    lua_pushcclosure(L, safe_setmetatable, 1);
    lua_setglobal(L, "setmetatable");
    return 0;
}

sandbox_t *sandbox_new(const sandbox_limits_t *limits)
{
    sandbox_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    s->limits = *limits;
    s->L = lua_newstate(sandbox_alloc, s);
    if (s->L == NULL) {
        free(s);
        return NULL;
    }
    *(sandbox_t **)lua_getextraspace(s->L) = s;
    lua_gc(s->L, LUA_GCGEN, 0, 0); /* short-lived garbage: generational mode */
    if (sandbox_protect(s->L, open_safe_libraries, 0, 0, 0) != SANDBOX_OK) {
        sandbox_free(s);
        return NULL;
    }
    return s;
}

void sandbox_set_limits(sandbox_t *s, const sandbox_limits_t *limits)
{
    s->limits = *limits;
}

lua_State *sandbox_state(sandbox_t *s)
{
    return s->L;
}

size_t sandbox_memory(const sandbox_t *s)
{
    return s->used;
}

void sandbox_free(sandbox_t *s)
{
    if (s == NULL)
        return;
    lua_close(s->L);
    free(s);
}
