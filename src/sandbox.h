/* sandbox: a Lua 5.4 state errord can hand a policy to.
 *
 * Only safe libraries are opened (string, table, math, utf8, the time parts
 * of os, and a base library without file access or binary chunks). Memory
 * is capped by errord's own allocator, and every call into the policy is
 * bounded by an instruction count and a wall-clock limit that the script's
 * own pcall cannot swallow. Only the Lua modules (sandbox, lua_api,
 * lua_json and the policy files) see this header. */
#ifndef ERRORD_SANDBOX_H
#define ERRORD_SANDBOX_H

#include <lua.h>

#include <stddef.h>
#include <stdint.h>

typedef struct sandbox_s sandbox_t;

/* How a protected call ended. */
typedef enum {
    SANDBOX_OK = 0,
    SANDBOX_ERROR,   /* the script raised an error */
    SANDBOX_TIMEOUT, /* instruction or time limit */
    SANDBOX_MEMORY,  /* the memory cap */
} sandbox_status_t;

typedef struct {
    uint64_t instructions; /* per call */
    uint64_t time_ms;      /* per call */
    size_t memory;         /* bytes, for the whole state */
} sandbox_limits_t;

/* Creates a state with the safe libraries open, under a copy of `limits`.
 * Returns NULL when out of memory. */
sandbox_t *sandbox_new(const sandbox_limits_t *limits);

/* Changes the limits (a policy's settings are read after its chunk ran). */
void sandbox_set_limits(sandbox_t *s, const sandbox_limits_t *limits);

/* The Lua state of `s`; it lives until sandbox_free(). */
lua_State *sandbox_state(sandbox_t *s);

/* The sandbox of a state made by sandbox_new(). */
sandbox_t *sandbox_of(lua_State *L);

/* Calls the function below `nargs` arguments on the stack, bounded by the
 * limits, like lua_pcall(L, nargs, nresults, msgh) with a traceback handler,
 * and returns how the call ended. On failure the stack holds the error
 * message (with its traceback) in place of the results. */
sandbox_status_t sandbox_call(sandbox_t *s, int nargs, int nresults);

/* Runs errord's own C function `fn` (building views, tables, JSON) on the
 * `nargs` values on top of the stack of a sandbox's state, in protected
 * mode: an error, running out of the state's memory included, comes back
 * instead of ending the process. It is not bounded by the limits, which
 * apply only while a sandbox_call() runs (inside one they go on applying).
 * Returns SANDBOX_OK with `nresults` results in place of the arguments, or
 * SANDBOX_ERROR / SANDBOX_MEMORY with the error object in their place: with
 * a traceback, as sandbox_call() gives it, when `traceback`; as raised
 * otherwise, for a caller that passes it on with lua_error(). */
sandbox_status_t sandbox_protect(lua_State *L, lua_CFunction fn, int nargs, int nresults,
                                 int traceback);

/* Charges `units` of work done in C on the policy's behalf (pattern
 * matching) to the call in progress, as if that many instructions ran: raises
 * the stop when the budget or the time is spent. Outside a call it does
 * nothing. */
void sandbox_charge(lua_State *L, uint64_t units);

/* The name of a status, as logs and the access record write a handler's
 * failure: "ok", "error", "timeout" or "memory". */
const char *sandbox_status_name(sandbox_status_t st);

/* Bytes the state uses now. */
size_t sandbox_memory(const sandbox_t *s);

/* Keeps `ctx` (not owned) for the Lua API functions of the state to find
 * with sandbox_context(). */
void sandbox_set_context(sandbox_t *s, void *ctx);

/* The context of the sandbox whose state `L` is, or NULL when none was
 * set. */
void *sandbox_context(lua_State *L);

/* Closes the state and frees `s`. NULL is fine. */
void sandbox_free(sandbox_t *s);

#endif
