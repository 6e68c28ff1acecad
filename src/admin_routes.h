/* admin_routes: what the admin port answers beyond /healthz (SPEC §5):
 * GET /readyz, /metrics, /alerts and /policy, and POST /reload. The
 * answers are read from the control loop's state at each request. */
#ifndef ERRORD_ADMIN_ROUTES_H
#define ERRORD_ADMIN_ROUTES_H

#include "admin.h"
#include "reload.h"
#include "sink.h"
#include "worker.h"

/* What the routes read and act on. The members are read at each request,
 * so they may be set after admin_routes_add(). */
typedef struct {
    reload_t *reload;
    workers_t *workers;
    sinks_t *sinks; /* NULL: no alert delivery (yet) */
} admin_routes_t;

/* Adds the routes to `admin`, answering from `ctx`, which stays the
 * caller's and must outlive `admin`. Returns 0 or -ENOMEM. */
int admin_routes_add(admin_t *admin, const admin_routes_t *ctx);

#endif
