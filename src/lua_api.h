/* lua_api: what a policy sees — the verdict constructors (pass, retry,
 * respond), the side effects (log, alert), the errord helper table, the lazy
 * read-only req/res views, and JSON in both directions. Only the Lua modules
 * include this header. */
#ifndef ERRORD_LUA_API_H
#define ERRORD_LUA_API_H

#include "buf.h"
#include "policy.h"
#include "rand.h"

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
 * lua_api_ctx_t). */
void lua_api_open(lua_State *L);

/* Pushes the `req` view and then the `res` view (or the `err` table when
 * in->res is NULL). They read `in` lazily, so it must live until
 * lua_api_end_views(). */
void lua_api_push_views(lua_State *L, const policy_input_t *in);

/* Detaches the views at `req_idx` and `res_idx` from their input: a policy
 * that kept them gets an error instead of reading freed memory. */
void lua_api_end_views(lua_State *L, int req_idx, int res_idx);

/* Turns the value at `idx` (what a handler returned) into a verdict.
 * Returns 0, or -1 with a message in `err`. */
int lua_api_verdict(lua_State *L, int idx, verdict_t *out, char *err, size_t errlen);

/* Steps, as lua_next() does and as raw, through the keys of the table at
 * `t` to the next one that is not a string listed in `known` (NULL
 * terminated). Start with nil pushed. Returns 1 with that key on top of
 * the stack (where the next call goes on from), or 0 when no such key is
 * left, the key popped. */
int lua_api_next_unknown(lua_State *L, int t, const char *const *known);

/* Clears the scratch counts of errord.count() used by tests, then copies in
 * the key -> number pairs of the table at `idx` (when it is a table). */
void lua_api_reset_test_counts(lua_State *L, int idx);

#endif
