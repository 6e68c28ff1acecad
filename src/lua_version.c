/* lua_version: the Lua version (see lua_version.h). */
#include "lua_version.h"

#include <lua.h>

const char *lua_version_string(void)
{
    return LUA_VERSION_MAJOR "." LUA_VERSION_MINOR "." LUA_VERSION_RELEASE;
}
