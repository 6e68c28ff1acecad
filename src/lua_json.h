/* lua_json: JSON text to Lua values and back, for the Lua modules only.
 * Tables are read raw (no metamethod of a policy runs), strings made valid
 * UTF-8 on the way out, JSON null read as nil. */
#ifndef ERRORD_LUA_JSON_H
#define ERRORD_LUA_JSON_H

#include <lua.h>

#include <stddef.h>

/* Pushes the Lua value of the `n` bytes of JSON text at `s` (nothing but
 * whitespace may follow the value), or nil when they are not JSON. Raises
 * when out of memory or nested too deeply. */
void lua_json_decode(lua_State *L, const char *s, size_t n);

/* Pushes the JSON text of the value at `idx`, as errord.json.encode does;
 * raises what JSON cannot hold (functions, userdata, cycles, keys that are
 * neither strings nor numbers). */
void lua_json_encode(lua_State *L, int idx);

/* Pushes a new table with encode and decode: what a policy sees as
 * errord.json. */
void lua_json_push_lib(lua_State *L);

#endif
