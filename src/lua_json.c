/* lua_json: JSON to Lua values and back (errord.json, res.json,
 * respond{ json = ... }, log{} fields), with cJSON. See lua_json.h. */
#include "lua_json.h"

#include "buf.h"
#include "sandbox.h"

#include <cJSON.h>
#include <lauxlib.h>

#include <math.h>
#include <string.h>

#define JSON_MAX_DEPTH 64

/* Pushes the Lua value of the node `j`, `depth` levels down the tree. */
static void push_json(lua_State *L, const cJSON *j, int depth)
{
    luaL_checkstack(L, 3, "JSON nested too deeply");
    if (cJSON_IsString(j)) {
        lua_pushstring(L, j->valuestring);
    } else if (cJSON_IsNumber(j)) {
        double d = j->valuedouble;
        if (d == floor(d) && fabs(d) < 9007199254740992.0)
            lua_pushinteger(L, (lua_Integer)d);
        else
            lua_pushnumber(L, d);
    } else if (cJSON_IsBool(j)) {
        lua_pushboolean(L, cJSON_IsTrue(j));
    } else if (cJSON_IsArray(j) || cJSON_IsObject(j)) {
        if (depth >= CJSON_NESTING_LIMIT)
            luaL_error(L, "JSON nested too deeply");
        lua_createtable(L, cJSON_IsArray(j) ? cJSON_GetArraySize(j) : 0, 0);
        lua_Integer i = 1;
        for (const cJSON *c = j->child; c != NULL; c = c->next, i++) {
            if (cJSON_IsNull(c))
                continue; /* null is nil: an array keeps a hole */
            push_json(L, c, depth + 1);
            if (cJSON_IsArray(j))
                lua_rawseti(L, -2, i);
            else
                lua_setfield(L, -2, c->string);
        }
    } else {
        lua_pushnil(L);
    }
}

/* Protected: pushes the value of the tree (1). */
static int push_json_step(lua_State *L)
{
    push_json(L, lua_touserdata(L, 1), 0);
    return 1;
}

/* The parsed tree is freed whatever happens: converting runs in a protected
 * call. */
void lua_json_decode(lua_State *L, const char *s, size_t n)
{
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts(s, n, &end, 0);
    if (j != NULL) {
        while (end < s + n && (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n'))
            end++;
        if (end != s + n) {
            cJSON_Delete(j);
            j = NULL;
        }
    }
    if (j == NULL) {
        lua_pushnil(L);
        return;
    }
    lua_pushlightuserdata(L, j);
    sandbox_status_t st = sandbox_protect(L, push_json_step, 1, 1, 0);
    cJSON_Delete(j);
    if (st != SANDBOX_OK)
        lua_error(L); /* rethrown, the tree freed */
}

/* The length n of the table at `idx` when it is a sequence 1..n with nothing
 * else (n > 0), else 0. */
static lua_Integer sequence_length(lua_State *L, int idx)
{
    idx = lua_absindex(L, idx);
    lua_Integer n = (lua_Integer)lua_rawlen(L, idx), count = 0;
    if (n == 0)
        return 0;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        lua_pop(L, 1);
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1 || lua_tointeger(L, -1) > n) {
            lua_pop(L, 1);
            return 0;
        }
        count++;
    }
    return count == n ? n : 0;
}

/* Makes the value at `idx` (a string or a number) a string that JSON can
 * hold, in place, and returns it: UTF-8 (RFC 8259 section 8.1) without NUL,
 * which cJSON's C strings would cut it at. A byte that starts no UTF-8
 * sequence, and a NUL, become U+FFFD. */
static const char *json_text_at(lua_State *L, int idx)
{
    idx = lua_absindex(L, idx);
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    size_t ok = buf_text_span(s, n);
    if (ok == n)
        return s;
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (;;) {
        luaL_addlstring(&b, s, ok);
        s += ok, n -= ok;
        if (n == 0)
            break;
        luaL_addstring(&b, "\xef\xbf\xbd");
        s++, n--;
        ok = buf_text_span(s, n);
    }
    luaL_pushresult(&b);
    lua_replace(L, idx);
    return lua_tostring(L, idx);
}

/* A JSON node for the value at `idx`: a scalar, or an empty array/object
 * that json_fill() fills. Raises for what JSON cannot hold. */
static cJSON *json_node(lua_State *L, int idx)
{
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return cJSON_CreateNull();
    case LUA_TBOOLEAN: return cJSON_CreateBool(lua_toboolean(L, idx));
    case LUA_TNUMBER: {
        double d = lua_tonumber(L, idx);
        return isfinite(d) ? cJSON_CreateNumber(d) : cJSON_CreateNull();
    }
    case LUA_TSTRING: return cJSON_CreateString(json_text_at(L, idx));
    case LUA_TTABLE: return sequence_length(L, idx) > 0 ? cJSON_CreateArray() : cJSON_CreateObject();
    default: luaL_error(L, "cannot encode a %s as JSON", luaL_typename(L, idx));
    }
    return NULL;
}

/* Fills the container `node` (already part of the tree, so nothing leaks if
 * this raises) from the table at `idx`. Tables are read raw: a policy's
 * metamethods do not run here. */
static void json_fill(lua_State *L, int idx, cJSON *node, int depth)
{
    idx = lua_absindex(L, idx);
    if (depth > JSON_MAX_DEPTH)
        luaL_error(L, "cannot encode as JSON: nested too deeply (or a cycle)");
    luaL_checkstack(L, 6, "JSON nested too deeply"); /* key, value, key copy, a luaL_Buffer */
    if (cJSON_IsArray(node)) {
        lua_Integer n = (lua_Integer)lua_rawlen(L, idx);
        for (lua_Integer i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            cJSON *item = json_node(L, -1);
            if (item == NULL)
                luaL_error(L, "out of memory");
            cJSON_AddItemToArray(node, item);
            if (lua_istable(L, -1))
                json_fill(L, -1, item, depth + 1);
            lua_pop(L, 1);
        }
        return;
    }
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        int kt = lua_type(L, -2);
        if (kt != LUA_TSTRING && kt != LUA_TNUMBER)
            luaL_error(L, "cannot encode a %s key as JSON", lua_typename(L, kt));
        lua_pushvalue(L, -2); /* a copy: lua_next's own key must stay untouched */
        const char *k = json_text_at(L, -1);
        cJSON *item = json_node(L, -2);
        if (item == NULL)
            luaL_error(L, "out of memory");
        if (!cJSON_AddItemToObject(node, k, item)) {
            cJSON_Delete(item);
            luaL_error(L, "out of memory");
        }
        if (lua_istable(L, -2))
            json_fill(L, -2, item, depth + 1);
        lua_pop(L, 2);
    }
}

/* What json_build_step() built, for the caller to free. */
struct json_build {
    cJSON *root;
};

/* Protected: builds the tree of the value (2) into the json_build (1). */
static int json_build_step(lua_State *L)
{
    struct json_build *b = lua_touserdata(L, 1);
    b->root = json_node(L, 2);
    if (b->root == NULL)
        luaL_error(L, "out of memory");
    if (lua_istable(L, 2))
        json_fill(L, 2, b->root, 1);
    return 0;
}

/* Nothing built so far leaks when this raises: building runs in a
 * protected call. */
void lua_json_encode(lua_State *L, int idx)
{
    struct json_build b = {NULL};
    idx = lua_absindex(L, idx);
    lua_pushlightuserdata(L, &b);
    lua_pushvalue(L, idx);
    sandbox_status_t st = sandbox_protect(L, json_build_step, 2, 0, 0);
    char *text = st == SANDBOX_OK ? cJSON_PrintUnformatted(b.root) : NULL;
    cJSON_Delete(b.root);
    if (st != SANDBOX_OK)
        lua_error(L);
    if (text == NULL)
        luaL_error(L, "out of memory");
    lua_pushstring(L, text);
    cJSON_free(text);
}

static int l_json_encode(lua_State *L)
{
    luaL_checkany(L, 1);
    lua_json_encode(L, 1);
    return 1;
}

static int l_json_decode(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    lua_json_decode(L, s, n);
    if (!lua_isnil(L, -1))
        return 1;
    lua_pushliteral(L, "invalid JSON");
    return 2;
}

void lua_json_push_lib(lua_State *L)
{
    static const luaL_Reg json[] = {
        {"encode", l_json_encode}, {"decode", l_json_decode}, {NULL, NULL},
    };
    luaL_newlib(L, json);
}
