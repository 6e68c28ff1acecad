/* lua_view: the req and res (or err) a handler is given — read-only
 * userdata over the C input, computing each field on first use and caching
 * it, and detached once the handler returned. For the Lua modules only. */
#ifndef ERRORD_LUA_VIEW_H
#define ERRORD_LUA_VIEW_H

#include "verdict.h"

#include <lua.h>

/* Registers the metatables of the views. Raises when out of memory. */
void lua_view_open(lua_State *L);

/* Registers under the registry key `key` a metatable with `index` as its
 * __index that refuses writes and hides itself from getmetatable() (the
 * views', and verdicts'). Raises when out of memory. */
void lua_view_metatable(lua_State *L, const void *key, lua_CFunction index);

/* Pushes the `req` view and then the `res` view of `in` (or the `err`
 * table when in->res is NULL). They read `in` lazily, so it must live until
 * lua_view_end(); the caller keeps owning it. Raises when out of memory. */
void lua_view_push(lua_State *L, const policy_input_t *in);

/* Detaches the views at `req_idx` and `res_idx` from their input: a policy
 * that kept them gets an error instead of reading freed memory. */
void lua_view_end(lua_State *L, int req_idx, int res_idx);

#endif
