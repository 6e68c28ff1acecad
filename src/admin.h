/* admin: the admin port (SPEC §5). A small HTTP server on its own listener
 * that only ever answers errord's own routes, never proxies. It runs on the
 * main event loop and reads the rest of errord through the callbacks it is
 * given. */
#ifndef ERRORD_ADMIN_H
#define ERRORD_ADMIN_H

#include "buf.h"
#include "config.h"

#include <uv.h>

typedef struct admin_s admin_t;

/* What the admin port asks the rest of errord. */
typedef struct {
    /* GET /alerts: appends the JSON body. */
    void (*alerts)(void *arg, buf_t *out);
    void *arg;
} admin_sources_t;

/* Listens on cfg->admin_addr. Returns NULL with a libuv error in *err. */
admin_t *admin_start(uv_loop_t *loop, const config_t *cfg, const admin_sources_t *sources,
                     int *err);

/* Sets the `arg` the sources are called with. */
void admin_set_arg(admin_t *a, void *arg);

/* The address it listens on, "127.0.0.1:9901". */
int admin_address(admin_t *a, char *out, size_t n);

/* Closes the listener and every connection; `done` fires when all are
 * closed. */
void admin_close(admin_t *a, void (*done)(void *arg), void *arg);

void admin_free(admin_t *a);

#endif
