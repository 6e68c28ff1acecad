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

/* Creates the proxy of `loop`, with its own instance of the policy at
 * `policy_path` (NULL: no policy). Returns NULL with a message in `err`. */
proxy_t *proxy_new(uv_loop_t *loop, const config_t *cfg, proxy_shared_t *shared,
                   const char *policy_path, char *err, size_t errlen);

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
