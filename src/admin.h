/* admin: the admin port (SPEC §5). A small HTTP server on its own listener
 * that only ever answers errord's own routes, never proxies. It runs on the
 * main event loop and reads the rest of errord through the route handlers
 * it is given. */
#ifndef ERRORD_ADMIN_H
#define ERRORD_ADMIN_H

#include "buf.h"
#include "config.h"
#include "http.h"

#include <uv.h>

typedef struct admin_s admin_t;

/* What a route handler answers: 200 and JSON unless it says otherwise. */
typedef struct {
    int status;
    const char *type;
    buf_t body;
} admin_reply_t;

typedef void (*admin_handler_t)(void *arg, const http_head_t *req, admin_reply_t *reply);

/* Listens on cfg->admin_addr. Serves GET /healthz itself; the other routes
 * are added with admin_route(). Returns NULL with a libuv error in *err. */
admin_t *admin_start(uv_loop_t *loop, const config_t *cfg, int *err);

/* Answers `method` (GET also answers HEAD) on `path` with `fn`. Returns 0
 * or -ENOMEM. */
int admin_route(admin_t *a, http_method_t method, const char *path, admin_handler_t fn,
                void *arg);

/* The address it listens on, "127.0.0.1:9901". */
int admin_address(admin_t *a, char *out, size_t n);

/* Closes the listener and every connection; `done` fires when all are
 * closed. */
void admin_close(admin_t *a, void (*done)(void *arg), void *arg);

/* Frees the admin port after admin_close()'s `done` fired. NULL is fine. */
void admin_free(admin_t *a);

#endif
