/* lua_api: what a policy sees — the verdict constructors (pass, retry,
 * respond), the side effects (log, alert, print), the errord helper table
 * (count, backoff, now_ms, cooldown, json), and the lazy read-only req/res
 * views. It knows the policy's settings and the call in progress through
 * its context, never the policy itself. Only the Lua modules include this
 * header. */
#ifndef ERRORD_LUA_API_H
#define ERRORD_LUA_API_H

#include "buf.h"
#include "rand.h"
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

/* Pushes the `req` view and then the `res` view (or the `err` table when
 * in->res is NULL). They read `in` lazily, so it must live until
 * lua_api_end_views(); the caller keeps owning it. Raises when out of
 * memory. */
void lua_api_push_views(lua_State *L, const policy_input_t *in);

/* Detaches the views at `req_idx` and `res_idx` from their input: a policy
 * that kept them gets an error instead of reading freed memory. */
void lua_api_end_views(lua_State *L, int req_idx, int res_idx);

/* Turns the value at `idx` (what a handler returned: nil or a verdict
 * userdata) into `out`, copying respond{}'s header lines and body into
 * out's buffers, which the caller frees with verdict_reset(). Runs no Lua
 * code and does not raise. Returns 0, or -1 with a message in `err` when
 * the value is not a verdict. */
int lua_api_verdict(lua_State *L, int idx, verdict_t *out, char *err, size_t errlen);

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
