/* policy_internal: what the files of the policy engine share — the policy
 * itself and the helpers loading, settings and tests have in common.
 * policy.c loads a policy, keeps its handler table and decides;
 * policy_source.c finds keys in the source and notes problems;
 * policy_settings.c reads settings; policy_test.c runs tests. Only those
 * files include this header: everyone else sees policy.h. */
#ifndef ERRORD_POLICY_INTERNAL_H
#define ERRORD_POLICY_INTERNAL_H

#include "buf.h"
#include "lua_api.h"
#include "policy.h"
#include "sandbox.h"

#include <lua.h>

#include <stddef.h>
#include <stdint.h>

#define N_STATUS 600

/* How a handler has been failing lately; what sets it aside (policy.c). */
typedef struct {
    int fails;             /* calls that ran out of time or memory since first_ms */
    int times;             /* set aside this many times in a row */
    uint64_t first_ms;     /* monotonic */
    uint64_t until_ms;     /* set aside until then (monotonic); 0: not */
    uint64_t probation_ms; /* back from a set-aside: on probation until then */
} handler_health_t;

struct policy_s {
    int refs;
    char *path;
    char *src; /* the source, for locating problems and tests */
    size_t src_len;
    char sha256[65];
    int64_t loaded_at_ms;
    policy_report_t *report; /* while loading */
    int anchor; /* ... where keys are looked for from (policy_source_line) */
    sandbox_t *sandbox;
    lua_api_ctx_t ctx;
    policy_settings_t settings;
    int handler[N_STATUS]; /* registry refs by status, LUA_NOREF when none */
    int n_handlers;
    int error_ref;
    int tests_ref;
    handler_health_t health[N_STATUS + 1]; /* by status; the error handler last */
};

/* ---- policy.c */

/* Pushes t[k] of the table at `t` without running metamethods; returns its
 * type. */
int policy_rawfield(lua_State *L, int t, const char *k);

/* ---- policy_source.c */

/* The line, at or after p->anchor, where the source names `key` as a table
 * key for the nth time (from 1), or with `test` where the nth test named
 * `key` is; 0 when it does not. Lua keeps no positions for table keys, so
 * this reads the source, skipping comments. */
int policy_source_line(const policy_t *p, const char *key, int nth, int test);

/* Looks for keys from where the source names `key` (at or after the
 * current anchor) on; returns the anchor it replaces, for the caller to put
 * back. */
int policy_anchor_at(policy_t *p, const char *key);

/* Notes a problem of the policy being loaded in p->report, as an error or
 * with `warning` a warning, at `line` (0: unknown). */
void policy_problem(policy_t *p, int line, int warning, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* ---- policy_settings.c */

/* errord's settings when a policy says nothing. */
extern const policy_settings_t policy_defaults;

/* Reads `settings` of the policy table at `policy` into p->settings (the
 * defaults where it says nothing), noting each bad value as a problem.
 * Raises when out of memory, so it runs protected; what it allocated is in
 * p->settings either way, for policy_settings_free(). */
void policy_read_settings(policy_t *p, lua_State *L, int policy);

/* Frees the sinks and secret header names policy_read_settings() copied;
 * they are empty afterwards. */
void policy_settings_free(policy_settings_t *s);

#endif
