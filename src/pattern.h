/* pattern: Lua's string matching functions for policies, with every step of
 * matching charged to the handler's instruction budget (see pattern.c). Only
 * the Lua modules include this header; it knows nothing of the sandbox. */
#ifndef ERRORD_PATTERN_H
#define ERRORD_PATTERN_H

#include <lua.h>

#include <stdint.h>

/* Charges `units` of matching work to the call in progress; raises when
 * its budget or time is spent (sandbox_charge() is one). */
typedef void (*pattern_charge_t)(lua_State *L, uint64_t units);

/* Replaces string.find, string.match, string.gmatch and string.gsub (and so
 * the methods of strings) with versions that call `charge` as they work.
 * Raises when out of memory. */
void pattern_open(lua_State *L, pattern_charge_t charge);

#endif
