/* upstream: connections to the upstream, its resolved addresses and the pool
 * of idle keep-alive connections.
 *
 * A connection is leased to one owner (a transaction) at a time. While
 * leased, the owner drives its io: reads, writes, the timer. Released, it
 * either goes back to the pool, where any byte or EOF from the server closes
 * it, or is closed. */
#ifndef ERRORD_UPSTREAM_H
#define ERRORD_UPSTREAM_H

#include "config.h"
#include "http.h"
#include "io.h"

#include <uv.h>

typedef struct upstream_s upstream_t;
typedef struct upconn_s upconn_t;

/* A leased connection is ready (status 0) or could not be made (a libuv
 * error: UV_ECONNREFUSED, UV_ETIMEDOUT, UV_EAI_NONAME..., or UPSTREAM_ETLS
 * when the TLS handshake failed: upconn_tls_error() says why). */
#define UPSTREAM_ETLS (-20001)
typedef void (*upconn_ready_cb)(upconn_t *c, int status);


/* What the owner of a leased connection is told, and how errord reads. A
 * read callback's stream->data is the connection's io_t, whose owner is
 * the upconn_t. */
typedef struct {
    uv_alloc_cb alloc;  /* read buffers, for every connection */
    uv_read_cb on_read; /* bytes or EOF on a leased connection; stream->data is its io_t */
    const http_handler_t *response; /* response parser callbacks; user data is the upconn_t */
    const http_limits_t *limits;
} upstream_owner_t;

/* Creates the upstream of one event loop. `owner` must outlive it. NULL
 * with a message in `err` when it cannot be made (memory, the CA file). */
upstream_t *upstream_new(uv_loop_t *loop, const config_t *cfg, const upstream_owner_t *owner,
                         char *err, size_t errlen);

/* Leases a connection to `owner`. When an idle pooled one exists (and
 * `fresh` is 0), it is returned ready in *out and the result is 1. Otherwise
 * a new connection is started, *out is set, the result is 0 and `cb` fires
 * later. A negative result is an error, and `cb` never fires. */
int upstream_lease(upstream_t *u, void *owner, int fresh, upconn_ready_cb cb, upconn_t **out);

/* Ends a lease: the connection goes back to the pool when `reusable`, else it
 * is closed (also cancelling a connect in progress). */
void upstream_release(upconn_t *c, int reusable);

/* Stops and restarts reading a leased connection (backpressure). A
 * connection reads from the moment it is connected until it is closed,
 * leased or pooled, so that reuse costs no system call. */
void upconn_pause(upconn_t *c);
void upconn_resume(upconn_t *c);

/* The connection's io: its TCP handle, its timer (the lessee's while
 * leased) and its output. */
io_t *upconn_io(upconn_t *c);

/* The parser of the responses on the connection; its callbacks get the
 * upconn_t as their user data. */
http_parser_t *upconn_parser(upconn_t *c);

/* The lessee given to upstream_lease(), NULL while the connection is idle. */
void *upconn_owner(const upconn_t *c);

/* Why the TLS handshake failed ("certificate has expired", ...). */
const char *upconn_tls_error(const upconn_t *c);

/* TLS handshakes so far on this upstream, full and resumed (0 for http). */
void upstream_tls_counts(const upstream_t *u, unsigned long *full, unsigned long *resumed);

/* Connections open now (pooled, leased and connecting). */
size_t upstream_open_count(const upstream_t *u);

/* ... of which pooled, waiting for reuse. */
size_t upstream_idle_count(const upstream_t *u);

/* Closes the pooled connections and refuses new leases. Leased ones close
 * when released. `done` fires once no connection is left open. */
void upstream_shutdown(upstream_t *u, void (*done)(void *arg), void *arg);

/* Frees the upstream after upstream_shutdown() completed. */
void upstream_free(upstream_t *u);

#endif
