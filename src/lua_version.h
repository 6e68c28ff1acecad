/* lua_version: the version of the Lua errord was built with, for the files
 * that must not include lua.h. */
#ifndef ERRORD_LUA_VERSION_H
#define ERRORD_LUA_VERSION_H

/* Returns the Lua version as "5.4.6", a static string. */
const char *lua_version_string(void);

#endif
