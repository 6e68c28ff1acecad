/* lua_view: the req and res a handler is given (see lua_view.h). */
#include "lua_view.h"

#include "clock.h"
#include "lua_json.h"

#include <lauxlib.h>

#include <ctype.h>
#include <string.h>

/* Registry keys: the addresses of these are unique light userdata. */
static const char REQ_MT = 0, RES_MT = 0;

/* A view is a userdata holding a pointer to the input it shows, with a
 * table of the fields computed so far as its user value: scripts can neither
 * write to it nor iterate it, and once its handler returned the pointer is
 * cleared, so a kept view raises instead of reading freed memory. */
typedef struct {
    const policy_input_t *in;
} lview_t;

/* headers: lower-case names; repeated fields joined with ", ". Secret
 * headers too, as sent: what the policy writes out is redacted instead. */
static void push_headers(lua_State *L, const http_head_t *h)
{
    lua_createtable(L, 0, (int)h->n_headers);
    char name[256];
    for (size_t i = 0; i < h->n_headers; i++) {
        const http_header_t *f = &h->headers[i];
        size_t n = f->name_len < sizeof name ? f->name_len : sizeof name - 1;
        for (size_t k = 0; k < n; k++)
            name[k] = (char)tolower((unsigned char)f->name[k]);
        lua_pushlstring(L, name, n);
        lua_pushlstring(L, f->value, f->value_len);
        lua_pushvalue(L, -2);
        lua_rawget(L, -4);
        if (!lua_isnil(L, -1)) {
            /* earlier, ", ", this one */
            lua_insert(L, -2);
            lua_pushliteral(L, ", ");
            lua_insert(L, -2);
            lua_concat(L, 3);
        } else {
            lua_pop(L, 1);
        }
        lua_rawset(L, -3);
    }
}

static double ms(uint64_t ns)
{
    return (double)ns / 1e6;
}

/* Caches the value on top under the key at 2 and returns it. */
static int cache(lua_State *L)
{
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, -3);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    return 1;
}

/* Pushes the field `k` of the req view of `in`; returns 0 when there is
 * none. */
static int req_field(lua_State *L, const policy_input_t *in, const char *k)
{
    const http_head_t *r = in->req;
    if (strcmp(k, "method") == 0)
        lua_pushstring(L, r->method_name);
    else if (strcmp(k, "path") == 0)
        lua_pushlstring(L, r->target, r->target_len);
    else if (strcmp(k, "headers") == 0)
        push_headers(L, r);
    else if (strcmp(k, "id") == 0)
        lua_pushstring(L, in->request_id);
    else if (strcmp(k, "attempt") == 0)
        lua_pushinteger(L, in->attempt);
    else if (strcmp(k, "elapsed_ms") == 0)
        lua_pushnumber(L, ms(in->elapsed_ns));
    else
        return 0;
    return 1;
}

/* Pushes the field `k` of the res view of `in`; returns 0 when there is
 * none (a body that is not JSON has no json). */
static int res_field(lua_State *L, const policy_input_t *in, const char *k)
{
    if (strcmp(k, "status") == 0) {
        lua_pushinteger(L, in->res->status);
    } else if (strcmp(k, "headers") == 0) {
        push_headers(L, in->res);
    } else if (strcmp(k, "body") == 0) {
        if (in->body == NULL)
            return 0;
        lua_pushlstring(L, in->body, in->body_len);
    } else if (strcmp(k, "json") == 0) {
        if (in->body == NULL)
            return 0;
        lua_json_decode(L, in->body, in->body_len);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            return 0;
        }
    } else if (strcmp(k, "retry_after_ms") == 0) {
        int64_t ms = http_retry_after_ms(in->res, clock_wall_ms());
        if (ms < 0)
            return 0;
        lua_pushinteger(L, ms);
    } else if (strcmp(k, "elapsed_ms") == 0) {
        lua_pushnumber(L, ms(in->attempt_ns));
    } else {
        return 0;
    }
    return 1;
}

/* __index of a view (at 1, its input named `what` in messages) for the key
 * at 2: the cached value, or what `field` pushes, cached. */
static int view_index(lua_State *L, const char *what,
                      int (*field)(lua_State *L, const policy_input_t *in, const char *k))
{
    if (lua_type(L, 2) != LUA_TSTRING)
        return 0;
    const lview_t *v = lua_touserdata(L, 1);
    if (v->in == NULL)
        luaL_error(L, "%s was kept past its handler; copy what you need instead", what);
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    if (!lua_isnil(L, -1))
        return 1; /* cached */
    lua_pop(L, 2);
    if (!field(L, v->in, lua_tostring(L, 2)))
        return 0;
    return cache(L);
}

static int req_index(lua_State *L)
{
    return view_index(L, "req", req_field);
}

static int res_index(lua_State *L)
{
    return view_index(L, "res", res_field);
}

static int view_newindex(lua_State *L)
{
    return luaL_error(L, "req, res and verdicts are read-only");
}

void lua_view_metatable(lua_State *L, const void *key, lua_CFunction index)
{
    lua_createtable(L, 0, 3);
    lua_pushcfunction(L, index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, view_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushliteral(L, "locked");
    lua_setfield(L, -2, "__metatable"); /* getmetatable() cannot reach it */
    lua_rawsetp(L, LUA_REGISTRYINDEX, key);
}

void lua_view_open(lua_State *L)
{
    lua_view_metatable(L, &REQ_MT, req_index);
    lua_view_metatable(L, &RES_MT, res_index);
}

static void push_view(lua_State *L, const void *mt_key, const policy_input_t *in)
{
    lview_t *v = lua_newuserdatauv(L, sizeof *v, 1);
    v->in = in;
    lua_createtable(L, 0, 4);
    lua_setiuservalue(L, -2, 1); /* the cache */
    lua_rawgetp(L, LUA_REGISTRYINDEX, mt_key);
    lua_setmetatable(L, -2);
}

void lua_view_push(lua_State *L, const policy_input_t *in)
{
    push_view(L, &REQ_MT, in);
    if (in->res != NULL) {
        push_view(L, &RES_MT, in);
        return;
    }
    lua_createtable(L, 0, 2);
    lua_pushstring(L, in->err_kind);
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, in->err_message);
    lua_setfield(L, -2, "message");
}

void lua_view_end(lua_State *L, int req_idx, int res_idx)
{
    ((lview_t *)lua_touserdata(L, req_idx))->in = NULL;
    if (lua_type(L, res_idx) == LUA_TUSERDATA) /* the error handler's err is a table */
        ((lview_t *)lua_touserdata(L, res_idx))->in = NULL;
}
