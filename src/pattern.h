/* pattern: Lua's string matching functions for policies, with every step of
 * matching charged to the handler's instruction budget (see pattern.c). Only
 * the Lua modules include this header. */
#ifndef ERRORD_PATTERN_H
#define ERRORD_PATTERN_H

#include <lua.h>

/* Replaces string.find, string.match, string.gmatch and string.gsub (and so
 * the methods of strings) with the bounded versions. */
void pattern_open(lua_State *L);

#endif
