/* proxy: the client side of errord (see proxy.h).
 *
 * A client connection serves one transaction (txn.h) at a time: the request
 * is parsed here and handed to its transaction as it arrives, and only
 * once it is answered is the next pipelined request parsed, so answers go
 * out in order. */
#include "proxy.h"

#include "buf.h"
#include "clock.h"
#include "frame.h"
#include "http.h"
#include "io.h"
#include "list.h"
#include "log.h"
#include "metrics.h"
#include "policy.h"
#include "rand.h"
#include "txn.h"
#include "upstream.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_BUF_SIZE (64 * 1024)
/* Pipelined bytes held while a request is being served. */
#define PIPELINE_LIMIT (64 * 1024)
/* How long a closing connection reads and discards what the client sends. */
#define LINGER_MS 2000

typedef struct {
    io_t io;
    proxy_t *proxy;
    list_t link;
    http_parser_t *parser;
    txn_t *txn;
    buf_t in; /* pipelined bytes held back while a request is served */
    char addr[64];
    int reading;
    int eof;
    int too_large;        /* the request's body is over --max-body-size */
    txn_wait_t timer_mode;
    uint64_t head_ms; /* loop time of a head's first byte while it is incomplete, or 0 */
} client_t;

struct proxy_s {
    txn_env_t env; /* first: what the transactions share */
    uv_loop_t *loop;
    const config_t *cfg;
    proxy_shared_t *shared;
    uv_tcp_t listener;
    uv_check_t flusher;
    upstream_owner_t upstream_owner;
    policy_t *policy; /* NULL: every response passes */
    http_limits_t req_limits;
    http_limits_t res_limits;
    list_t clients;
    char *rbuf;
    int listening;
    int draining;
    int open_handles;
    void (*on_done)(void *arg);
    void *done_arg;
};

static void client_read_on(client_t *c, int on);
static void client_timer(client_t *c, txn_wait_t mode, uint64_t ms);
static void client_next(client_t *c, int keep_alive);
static void client_close(client_t *c, const char *why);
static void client_abort(client_t *c, const char *why);
static void maybe_done(proxy_t *p);

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    (void)suggested;
    proxy_t *p = h->loop->data;
    *b = uv_buf_init(p->rbuf, READ_BUF_SIZE);
}

/* An error errord answers before a request's head is whole (no
 * transaction yet): JSON, and the connection closes. */
static void client_write_error(client_t *c, int status, const char *message)
{
    buf_t body = BUF_INIT, out = BUF_INIT;
    frame_error_body(&body, message);
    frame_local_t o = {
        .status = status,
        .type = "application/json",
        .has_length = 1,
        .body_len = body.len,
        .date = txn_date(&c->proxy->env),
        .client_version = 11,
    };
    frame_local_head(&out, &o);
    buf_append(&out, body.data, body.len);
    io_append(&c->io, out.data, out.len);
    buf_free(&out);
    buf_free(&body);
}

/* Counts a request errord refused before its head was whole: no verdict,
 * timed from its first byte. */
static void count_reject(client_t *c, int status)
{
    metrics_t *m = c->proxy->env.metrics;
    uint64_t ms = c->head_ms != 0 ? uv_now(c->io.timer.loop) - c->head_ms : 0;
    metric_add(&m->requests[status > 0 && status < METRICS_STATUS ? status : 0][MV_NONE], 1);
    metrics_observe(&m->request_seconds, ms * 1000000u);
}

/* ---- what a transaction asks of its connection (txn_conn_ops_t) ------------------- */

static void on_client_timeout(uv_timer_t *timer);

static void conn_wait(void *conn, txn_wait_t what, uint64_t ms)
{
    client_timer(conn, what, ms);
}

static txn_wait_t conn_waiting(void *conn)
{
    return ((client_t *)conn)->timer_mode;
}

static void conn_read(void *conn, int on)
{
    client_read_on(conn, on);
}

static int conn_reading(void *conn)
{
    return ((client_t *)conn)->reading;
}

/* After a half-close, only the requests the client already sent. */
static int conn_open(void *conn)
{
    const client_t *c = conn;
    return !(c->eof && c->in.len == 0) && !c->proxy->draining;
}

static void conn_done(void *conn, int keep_alive)
{
    client_t *c = conn;
    c->txn = NULL;
    client_next(c, keep_alive);
}

static void conn_close(void *conn, const char *why)
{
    client_close(conn, why);
}

static void conn_abort(void *conn, const char *why)
{
    client_abort(conn, why);
}

static const txn_conn_ops_t CONN_OPS = {conn_wait,  conn_waiting, conn_read,  conn_reading,
                                        conn_open,  conn_done,    conn_close, conn_abort};

/* ---- request events ---------------------------------------------------------------- */

static int on_req_head(void *ud, http_head_t *head)
{
    client_t *c = ud;
    proxy_t *p = c->proxy;
    c->head_ms = 0;
    int rc = txn_start(&p->env, p->policy, head, &CONN_OPS, c, &c->io, c->addr, &c->txn);
    c->too_large = rc == -EMSGSIZE;
    return rc < 0 ? -1 : 0;
}

static int on_req_body(void *ud, const char *at, size_t n)
{
    client_t *c = ud;
    int rc = txn_request_body(c->txn, at, n);
    c->too_large = rc == -EMSGSIZE;
    return rc < 0 ? -1 : 0;
}

static int on_req_end(void *ud)
{
    client_t *c = ud;
    txn_request_end(c->txn);
    return 0;
}

static const http_handler_t REQUEST_HANDLER = {on_req_head, on_req_body, on_req_end};

/* ---- client connections ---------------------------------------------------------- */

static void on_client_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);
static void client_reject(client_t *c, int status, const char *message);

static void client_read_on(client_t *c, int on)
{
    if (c->io.closing || c->io.close_after || on == c->reading)
        return;
    if (on && uv_read_start((uv_stream_t *)&c->io.tcp, on_alloc, on_client_read) < 0)
        return;
    if (!on)
        uv_read_stop((uv_stream_t *)&c->io.tcp);
    c->reading = on;
}

static void on_client_timeout(uv_timer_t *timer)
{
    client_t *c = ((io_t *)timer->data)->owner;
    txn_wait_t what = c->timer_mode;
    switch (what) {
    case WAIT_IDLE:
        client_close(c, NULL);
        return;
    case WAIT_SEND:
        client_abort(c, "client stopped reading the response");
        return;
    case WAIT_RETRY:
    case WAIT_HOLD:
    case WAIT_DEADLINE:
        c->timer_mode = WAIT_NONE;
        txn_wait_over(c->txn, what);
        return;
    default:
        client_reject(c, 408, c->txn != NULL ? "request body not received in time"
                                             : "request head not received in time");
    }
}

/* Starts the connection's timer for `mode`: the flags' timeouts for the
 * connection's own waits, `ms` for the transaction's. A retry delay or a
 * cooldown runs from now by the clock, not from the loop's cached time,
 * which lags by however long this iteration has run so far: it must not
 * end early. */
static void client_timer(client_t *c, txn_wait_t mode, uint64_t ms)
{
    const config_t *cfg = c->proxy->cfg;
    uv_timer_t *timer = &c->io.timer;
    c->timer_mode = mode;
    switch (mode) {
    case WAIT_HEADER:
        uv_timer_start(timer, on_client_timeout, cfg->client_header_timeout, 0);
        break;
    case WAIT_BODY:
    case WAIT_IDLE:
    case WAIT_SEND:
        uv_timer_start(timer, on_client_timeout, cfg->client_idle_timeout, 0);
        break;
    case WAIT_RETRY:
    case WAIT_HOLD:
        uv_update_time(timer->loop);
        uv_timer_start(timer, on_client_timeout, ms, 0);
        break;
    case WAIT_DEADLINE:
        /* armed on every read of the request: the loop's time will do here */
        uv_timer_start(timer, on_client_timeout, ms, 0);
        break;
    case WAIT_NONE:
        uv_timer_stop(timer);
        break;
    }
}

/* A request could not be read: answer it with errord's error and close. */
static void client_reject(client_t *c, int status, const char *message)
{
    if (c->txn == NULL) {
        client_write_error(c, status, message);
        count_reject(c, status);
        log_record_t *r = log_begin(LOG_INFO, "rejected a request");
        log_str(r, "client", c->addr);
        log_int(r, "status", status);
        log_str(r, "error", message);
        log_end(r);
    } else {
        txn_reject(c->txn, status, message);
    }
    client_close(c, NULL);
}

/* Parses what the client sent and forwards what can go upstream. */
static void client_feed(client_t *c, const char *data, size_t n)
{
    if (c->txn != NULL && txn_request_read(c->txn)) {
        /* The next request waits until this one is answered. */
        buf_append(&c->in, data, n);
        if (c->in.len > PIPELINE_LIMIT)
            client_read_on(c, 0);
        return;
    }
    if (c->txn == NULL && c->head_ms == 0 && n > 0)
        c->head_ms = uv_now(c->io.timer.loop); /* the loop's time: no clock read per request */
    ssize_t used = http_parser_feed(c->parser, data, n);
    txn_t *t = c->txn;
    if (used < 0) {
        const http_error_t *e = http_parser_error(c->parser);
        if (c->too_large)
            client_reject(c, 413, "request body too large");
        else if (e->status != 0)
            client_reject(c, e->status, e->message);
        else
            client_abort(c, "out of memory");
        return;
    }
    if ((size_t)used < n)
        buf_append(&c->in, data + used, n - (size_t)used);
    if (t == NULL) {
        /* a head still incomplete: it has from its first byte on */
        if (c->timer_mode != WAIT_HEADER)
            client_timer(c, WAIT_HEADER, 0);
        return;
    }
    if (c->timer_mode != WAIT_HOLD)
        client_timer(c, txn_request_read(t) ? WAIT_NONE : WAIT_BODY, 0);
    txn_proceed(t);
}

static void on_client_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    client_t *c = ((io_t *)s->data)->owner;
    if (nread > 0) {
        client_feed(c, b->base, (size_t)nread);
        return;
    }
    if (nread == 0)
        return;
    if (nread != UV_EOF) {
        client_abort(c, "client connection reset");
        return;
    }
    /* EOF: the client will send nothing more. */
    c->eof = 1;
    client_read_on(c, 0);
    if (c->txn == NULL) {
        client_close(c, NULL);
    } else if (!txn_request_read(c->txn)) {
        txn_client_left(c->txn);
        client_abort(c, "client closed the connection mid-request");
    }
    /* else: half-closed after a whole request; the answer still goes out */
}

/* After a transaction: wait for, or parse, the next request; or close. */
static void client_next(client_t *c, int keep_alive)
{
    if (c->io.closing || c->io.close_after)
        return;
    if (!keep_alive || (c->eof && c->in.len == 0) || c->proxy->draining) {
        client_close(c, NULL);
        return;
    }
    if (io_flush(&c->io) < 0) {
        client_abort(c, "client connection broke");
        return;
    }
    http_parser_resume(c->parser);
    client_timer(c, WAIT_IDLE, 0);
    if (c->in.len > 0) {
        buf_t held = c->in;
        c->in = (buf_t)BUF_INIT;
        client_feed(c, held.data, held.len);
        buf_free(&held);
    }
    if (c->io.closing || c->io.close_after)
        return;
    if (c->eof) {
        /* Half-closed: what it sent is served; an incomplete request never will be. */
        if (c->txn == NULL || !txn_request_read(c->txn))
            client_close(c, NULL);
        return;
    }
    if (c->txn == NULL || !txn_request_read(c->txn))
        client_read_on(c, 1);
}

static void on_client_closed(io_t *io)
{
    client_t *c = io->owner;
    proxy_t *p = c->proxy;
    list_remove(&c->link);
    http_parser_free(c->parser);
    buf_free(&c->in);
    free(c);
    atomic_fetch_sub(&p->shared->connections, 1);
    maybe_done(p);
}

/* Ends the transaction in progress, if any, as the connection goes away. */
static void client_drop_txn(client_t *c, const char *why)
{
    txn_t *t = c->txn;
    if (t == NULL)
        return;
    c->txn = NULL;
    txn_drop(t, why);
}

/* Closes the connection after what is gathered is written: the client sees
 * every byte sent so far, then the end of the connection. `why`, when given,
 * says what broke. */
static void client_close(client_t *c, const char *why)
{
    client_drop_txn(c, why);
    uv_timer_stop(&c->io.timer);
    io_close_after_flush(&c->io, LINGER_MS);
}

/* Closes the connection at once: the peer is gone or must be cut off. */
static void client_abort(client_t *c, const char *why)
{
    client_drop_txn(c, why);
    io_close(&c->io);
}

static void on_client_write_error(io_t *io)
{
    client_abort(io->owner, "client connection broke");
}

static void on_client_drain(io_t *io)
{
    client_t *c = io->owner;
    if (c->txn != NULL)
        txn_client_drained(c->txn);
}

/* Accepts a client connection of `p`, counted among the open ones (in all,
 * with it, in *open) from now until on_client_closed(). Returns it, or
 * NULL (out of memory, or the accept failed and the connection is closing). */
static client_t *client_accept(proxy_t *p, uv_stream_t *server, size_t *open)
{
    client_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->proxy = p;
    list_push_back(&p->clients, &c->link);
    *open = atomic_fetch_add(&p->shared->connections, 1) + 1;
    return io_accept(server, &c->io, c, on_client_closed) == 0 ? c : NULL;
}

static void on_connection(uv_stream_t *server, int status)
{
    proxy_t *p = server->loop->data;
    size_t open = 0;
    client_t *c = status == 0 ? client_accept(p, server, &open) : NULL;
    if (c == NULL)
        return;
    c->io.on_error = on_client_write_error;
    c->io.on_drain = on_client_drain;
    io_peer_addr(&c->io, c->addr, sizeof c->addr);
    if (open > p->cfg->max_connections) {
        client_write_error(c, 503, "too many connections");
        count_reject(c, 503);
        log_record_t *r = log_begin(LOG_WARN, "connection limit reached; refused a client");
        log_str(r, "client", c->addr);
        log_int(r, "max_connections", (int64_t)p->cfg->max_connections);
        log_end(r);
        io_close_after_flush(&c->io, 0);
        return;
    }
    c->parser = http_parser_new(HTTP_PARSE_REQUEST, &p->req_limits, &REQUEST_HANDLER, c);
    if (c->parser == NULL) {
        io_close(&c->io);
        return;
    }
    uv_tcp_nodelay(&c->io.tcp, 1);
    client_timer(c, WAIT_HEADER, 0);
    client_read_on(c, 1);
}

/* ---- the proxy ----------------------------------------------------------------------- */

static void on_check(uv_check_t *h)
{
    proxy_t *p = h->data;
    log_flush();
    metric_set(&p->env.metrics->upstream_open, upstream_open_count(p->env.upstream));
    metric_set(&p->env.metrics->upstream_idle, upstream_idle_count(p->env.upstream));
    unsigned long full, resumed;
    upstream_tls_counts(p->env.upstream, &full, &resumed);
    metric_set(&p->env.metrics->tls_full, full);
    metric_set(&p->env.metrics->tls_resumed, resumed);
}

proxy_t *proxy_new(uv_loop_t *loop, const config_t *cfg, proxy_shared_t *shared,
                   policy_t *policy, char *err, size_t errlen)
{
    proxy_t *p = calloc(1, sizeof *p);
    if (p == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    p->rbuf = malloc(READ_BUF_SIZE);
    p->env.metrics = metrics_new_worker(); /* lives as long as the process: a scrape reads it */
    if (p->rbuf == NULL || p->env.metrics == NULL) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    p->loop = loop;
    p->cfg = p->env.cfg = cfg;
    p->shared = shared;
    p->req_limits.max_line = cfg->max_request_line;
    p->req_limits.max_head = cfg->max_header_size;
    p->res_limits.max_line = cfg->max_header_size;
    p->res_limits.max_head = cfg->max_header_size;
    list_init(&p->clients);
    rand_seed(&p->env.rng);
    p->upstream_owner.alloc = on_alloc;
    p->upstream_owner.limits = &p->res_limits;
    txn_upstream_events(&p->upstream_owner);
    p->env.upstream = upstream_new(loop, cfg, &p->upstream_owner, err, errlen);
    if (p->env.upstream == NULL)
        goto fail;
    p->policy = policy;
    if (policy != NULL)
        policy_hold(policy);
    loop->data = p;
    uv_tcp_init(loop, &p->listener);
    uv_check_init(loop, &p->flusher);
    p->flusher.data = p;
    uv_check_start(&p->flusher, on_check);
    p->open_handles = 2;
    return p;

fail:
    free(p->rbuf);
    free(p);
    return NULL;
}

void proxy_set_policy(proxy_t *p, policy_t *policy)
{
    policy_hold(policy);
    policy_release(p->policy); /* freed once its last request ends */
    p->policy = policy;
}

int proxy_listen(proxy_t *p)
{
    const struct sockaddr *addr = (const struct sockaddr *)&p->cfg->listen_addr;
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (p->cfg->workers > 1)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    socklen_t len = addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                : sizeof(struct sockaddr_in);
    if (bind(fd, addr, len) < 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    int rc = uv_tcp_open(&p->listener, fd);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    rc = uv_listen((uv_stream_t *)&p->listener, 1024, on_connection);
    if (rc < 0)
        return rc;
    p->listening = 1;
    return 0;
}

int proxy_address(proxy_t *p, char *out, size_t n)
{
    return io_listen_addr(&p->listener, out, n);
}

static void on_proxy_handle_closed(uv_handle_t *h)
{
    proxy_t *p = h->loop->data;
    if (--p->open_handles == 0 && p->on_done != NULL)
        p->on_done(p->done_arg);
}

static void on_upstream_closed(void *arg)
{
    proxy_t *p = arg;
    uv_close((uv_handle_t *)&p->flusher, on_proxy_handle_closed);
}

/* When draining and the last client is gone, close the rest. */
static void maybe_done(proxy_t *p)
{
    if (!p->draining || !list_empty(&p->clients) || p->on_done == NULL)
        return;
    if (uv_is_closing((uv_handle_t *)&p->flusher))
        return;
    upstream_shutdown(p->env.upstream, on_upstream_closed, p);
}

void proxy_drain(proxy_t *p, void (*done)(void *arg), void *arg)
{
    int again = p->draining;
    p->draining = 1;
    p->on_done = done;
    p->done_arg = arg;
    if (!again)
        uv_close((uv_handle_t *)&p->listener, on_proxy_handle_closed);

    list_t *pos, *tmp;
    list_for_each_safe(pos, tmp, &p->clients)
    {
        client_t *c = list_entry(pos, client_t, link);
        if (again)
            client_abort(c, "shut down before the request finished");
        else if (c->txn == NULL && !c->io.closing && !c->io.close_after)
            client_close(c, NULL);
    }
    if (list_empty(&p->clients))
        maybe_done(p);
}

void proxy_free(proxy_t *p)
{
    if (p == NULL)
        return;
    upstream_free(p->env.upstream);
    policy_release(p->policy);
    free(p->rbuf);
    free(p);
}
