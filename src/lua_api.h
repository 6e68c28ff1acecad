/* lua_api: what a policy sees — the verdict constructors (pass, retry,
 * respond), the side effects (log, alert, print), the errord helper table
 * (count, backoff, now_ms, cooldown, json) — and the one call of a handler,
 * with its req/res views (lua_view) and its verdict. It knows the policy's
 * settings and the call in progress through its context, never the policy
 * itself. Only the Lua modules include this header. */
#ifndef ERRORD_LUA_API_H
#define ERRORD_LUA_API_H

#include "buf.h"
#include "rand.h"
#include "sandbox.h"
#include "settings.h"
#include "verdict.h"

#include <lua.h>

/* The state the API functions of one sandbox share (its context). */
typedef struct {
    const policy_settings_t *settings;
    const policy_input_t *in; /* the call in progress, or NULL */
    rand_t rng;
    /* While a policy's own tests run, side effects stay inside the test:
     * logs are counted, alerts collected, counts kept in a scratch table. */
    int testing;
    buf_t test_alerts; /* names of the alerts raised, '\n'-terminated */
    int test_logs;
    /* Replaying recorded traffic: the wall clock of the record (ms), which
     * errord.count() windows and errord.now_ms() use; 0 otherwise. */
    int64_t replay_now_ms;
} lua_api_ctx_t;

/* Installs the API as globals of the state (whose sandbox context must be a
 * lua_api_ctx_t that outlives it). Raises when out of memory, so it runs
 * protected. */
void lua_api_open(lua_State *L);

/* Calls the handler `ref` (a registry ref in the state of `sb`, whose
 * context this API's is) for `in`, which must live for the call: pushes
 * the req and res (or err) views, runs the handler within the sandbox's
 * limits, reads its verdict into `out` and detaches the views, so a policy
 * that kept one gets an error instead of reading freed memory. Returns the
 * sandbox status: on success the verdict is in `out` (the caller frees it
 * with verdict_reset()); otherwise `msg` says what went wrong (its first
 * line, the file named as `path`) and `trace`, when not NULL, gets the
 * whole message with its traceback. The stack is as it was. */
sandbox_status_t lua_api_call_handler(sandbox_t *sb, int ref, const policy_input_t *in,
                                      const char *path, verdict_t *out, char *msg, size_t msglen,
                                      buf_t *trace);

/* Writes the first line of the Lua error message `msg` (a traceback may
 * follow it; NULL is "(no message)") into `out`, `n` bytes at most. With
 * `path`, a chunk name Lua cut to "...<its end>" is named in full again. */
void lua_api_error_line(const char *msg, const char *path, char *out, size_t n);

/* Steps, as lua_next() does and as raw, through the keys of the table at
 * `t` to the next one that is not a string listed in `known` (NULL
 * terminated). Start with nil pushed. Returns 1 with that key on top of
 * the stack (where the next call goes on from), or 0 when no such key is
 * left, the key popped. */
int lua_api_next_unknown(lua_State *L, int t, const char *const *known);

/* Clears the scratch counts errord.count() reads and adds to while a
 * policy's tests run, then presets them from the table at `idx` (when it is
 * one): key -> a count for every window, or key -> { [seconds] = count }.
 * Raises when out of memory. */
void lua_api_reset_test_counts(lua_State *L, int idx);

#endif
