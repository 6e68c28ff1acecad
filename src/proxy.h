/* proxy: the client side of errord. It accepts connections, reads requests,
 * forwards each through an upstream connection and streams the response
 * back, answering itself (SPEC §4) when the request is malformed or the
 * upstream fails. One proxy runs per event loop. */
#ifndef ERRORD_PROXY_H
#define ERRORD_PROXY_H

#include "config.h"

#include <stdatomic.h>
#include <uv.h>

/* What the proxies of all event loops share. */
typedef struct {
    atomic_size_t connections; /* client connections open */
} proxy_shared_t;

typedef struct proxy_s proxy_t;
typedef struct policy_s policy_t; /* policy.h */

/* Creates the proxy of `loop`, running `policy` (NULL: none), an instance
 * of its own: a Lua state belongs to one loop. The proxy takes a reference.
 * Returns NULL with a message in `err`. */
proxy_t *proxy_new(uv_loop_t *loop, const config_t *cfg, proxy_shared_t *shared,
                   policy_t *policy, char *err, size_t errlen);

/* Runs `policy` (an instance of its own, not NULL) for the requests that
 * start from now on; those in flight finish under the one they started
 * with, which is freed when the last of them ends. On the proxy's loop. */
void proxy_set_policy(proxy_t *p, policy_t *policy);

/* Binds and listens on --listen (with SO_REUSEPORT, so that every event loop
 * can have its own listener). Returns 0 or a libuv error. */
int proxy_listen(proxy_t *p);

/* The address the proxy listens on, as "127.0.0.1:8080" (useful with port
 * 0, which picks a free port). Returns 0 or a libuv error. */
int proxy_address(proxy_t *p, char *out, size_t n);

/* Stops accepting, closes idle connections and lets requests in flight
 * finish; `done` fires once every connection is closed and the proxy's
 * handles are closed. Calling it again (the drain time ran out) closes the
 * remaining connections at once. */
void proxy_drain(proxy_t *p, void (*done)(void *arg), void *arg);

/* Frees the proxy after `done` fired. */
void proxy_free(proxy_t *p);

#endif
