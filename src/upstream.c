/* upstream: connections to the upstream and the pool (see upstream.h). */
#include "upstream.h"

#include "clock.h"
#include "list.h"
#include "log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct upconn_s {
    io_t io;
    upstream_t *up;
    list_t link;
    void *owner;            /* the lessee, NULL when idle */
    upconn_ready_cb on_ready;
    http_parser_t *parser;  /* responses on this connection */
    uint64_t served;        /* responses completed on it */
    uv_connect_t connect_req;
    int state;
    int fail_status; /* a connect failure waiting to be reported */
    int paused;      /* reading stopped by the lessee */
    int tried;       /* addresses tried by this connect */
    int addr;        /* the one it tries now */
};

/* Resolved addresses are refreshed in the background after this long. */
#define RESOLVE_TTL_MS 30000
#define MAX_ADDRS 8

enum { UC_RESOLVING, UC_CONNECTING, UC_HANDSHAKE, UC_LEASED, UC_IDLE };

/* Plaintext out of OpenSSL, before it goes to the lessee. */
static _Thread_local char plain_buf[64 * 1024];

struct upstream_s {
    uv_loop_t *loop;
    const config_t *cfg;
    const upstream_owner_t *owner;
    list_t idle;    /* pooled, most recently used first */
    list_t waiting; /* leased, waiting for the first resolution */
    size_t n_idle;
    size_t n_open;
    struct sockaddr_storage addrs[MAX_ADDRS];
    int n_addrs;
    int next_addr;
    int literal; /* the host is an IP address: nothing to resolve */
    int resolving;
    int resolve_error;
    uint64_t resolved_at;
    uv_getaddrinfo_t gai;
    tls_ctx_t *tls; /* https */
    int closing;
    void (*on_shutdown)(void *arg);
    void *shutdown_arg;
};

static void start_connect(upconn_t *c);
static void on_conn_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);

/* ---- resolution ------------------------------------------------------------- */

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    upstream_t *u = req->data;
    u->resolving = 0;
    if (status == 0) {
        int n = 0;
        for (struct addrinfo *ai = res; ai != NULL && n < MAX_ADDRS; ai = ai->ai_next) {
            if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
                continue;
            memcpy(&u->addrs[n], ai->ai_addr, ai->ai_addrlen);
            n++;
        }
        if (n > 0) {
            u->n_addrs = n;
            u->next_addr = 0;
            u->resolve_error = 0;
        }
        u->resolved_at = clock_now_ms();
    } else {
        u->resolve_error = status;
        log_record_t *r = log_begin(LOG_WARN, "could not resolve the upstream host");
        log_str(r, "host", u->cfg->upstream_host);
        log_str(r, "error", uv_strerror(status));
        log_end(r);
    }
    uv_freeaddrinfo(res);

    list_t *pos, *tmp;
    list_for_each_safe(pos, tmp, &u->waiting)
    {
        upconn_t *c = list_entry(pos, upconn_t, link);
        list_remove(&c->link);
        if (u->n_addrs == 0) {
            c->state = UC_CONNECTING; /* failed: the owner releases it */
            c->on_ready(c, status < 0 ? status : UV_EAI_NONAME);
        } else {
            start_connect(c);
        }
    }
    if (u->closing && u->n_open == 0 && u->on_shutdown != NULL) {
        void (*done)(void *) = u->on_shutdown;
        u->on_shutdown = NULL;
        done(u->shutdown_arg);
    }
}

static void resolve(upstream_t *u)
{
    if (u->resolving || u->literal || u->closing)
        return;
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_ADDRCONFIG;
    char port[8];
    snprintf(port, sizeof port, "%d", u->cfg->upstream_port);
    u->gai.data = u;
    int rc = uv_getaddrinfo(u->loop, &u->gai, on_resolved, u->cfg->upstream_host, port, &hints);
    if (rc == 0)
        u->resolving = 1;
    else
        u->resolve_error = rc;
}

upstream_t *upstream_new(uv_loop_t *loop, const config_t *cfg, const upstream_owner_t *owner,
                         char *err, size_t errlen)
{
    upstream_t *u = calloc(1, sizeof *u);
    if (u == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (cfg->upstream_tls &&
        (u->tls = tls_ctx_new(cfg->upstream_ca, cfg->upstream_insecure, err, errlen)) == NULL) {
        free(u);
        return NULL;
    }
    u->loop = loop;
    u->cfg = cfg;
    u->owner = owner;
    list_init(&u->idle);
    list_init(&u->waiting);
    if (uv_ip4_addr(cfg->upstream_host, cfg->upstream_port, (struct sockaddr_in *)&u->addrs[0]) ==
            0 ||
        uv_ip6_addr(cfg->upstream_host, cfg->upstream_port, (struct sockaddr_in6 *)&u->addrs[0]) ==
            0) {
        u->literal = 1;
        u->n_addrs = 1;
    } else {
        resolve(u);
    }
    return u;
}

/* ---- connections ------------------------------------------------------------ */

static void on_conn_closed(io_t *io)
{
    upconn_t *c = io->owner;
    upstream_t *u = c->up;
    http_parser_free(c->parser);
    free(c);
    u->n_open--;
    if (u->closing && u->n_open == 0 && !u->resolving && u->on_shutdown != NULL) {
        void (*done)(void *) = u->on_shutdown;
        u->on_shutdown = NULL;
        done(u->shutdown_arg);
    }
}

static void conn_close(upconn_t *c)
{
    if (c->state == UC_IDLE)
        c->up->n_idle--;
    list_remove(&c->link);
    io_close(&c->io);
}

/* The connect timeout, or a failure reported from the loop (see fail_soon). */
static void on_connect_timeout(uv_timer_t *t)
{
    upconn_t *c = ((io_t *)t->data)->owner;
    int status = c->fail_status ? c->fail_status : UV_ETIMEDOUT;
    list_remove(&c->link);
    c->state = UC_CONNECTING;
    c->on_ready(c, status);
}

/* Reports `status` from the next loop turn: a lease never calls back from
 * inside upstream_lease(). */
static void fail_soon(upconn_t *c, int status)
{
    c->fail_status = status;
    uv_timer_stop(&c->io.timer);
    uv_timer_start(&c->io.timer, on_connect_timeout, 0, 0);
}

/* Advances the TLS handshake; reports the connection ready once done. */
static void conn_handshake(upconn_t *c)
{
    int rc = tls_handshake(c->io.tls);
    if (io_flush(&c->io) < 0 && rc >= 0)
        rc = -2;
    if (rc == 0)
        return;
    uv_timer_stop(&c->io.timer);
    if (rc < 0) {
        c->state = UC_CONNECTING; /* failed: the owner releases it */
        c->on_ready(c, rc == -1 ? UPSTREAM_ETLS : UV_EPIPE);
        return;
    }
    c->io.tls_ready = 1;
    c->state = UC_LEASED;
    c->on_ready(c, 0);
}

static void on_tls_pending(uv_idle_t *h);

static void on_reset(io_t *io)
{
    start_connect(io->owner);
}

static void on_connected(uv_connect_t *req, int status)
{
    upconn_t *c = req->data;
    if (status == UV_ECANCELED || c->io.closing)
        return;
    if (status < 0) {
        upstream_t *u = c->up;
        /* the next address, for this connection and as the first for the
         * following ones */
        c->addr = (c->addr + 1) % u->n_addrs;
        u->next_addr = c->addr;
        if (++c->tried < u->n_addrs) {
            /* and now, within the same connect timeout: a name with an IPv6
             * and an IPv4 address may be served on one of them only */
            io_reset(&c->io, on_reset);
            return;
        }
        uv_timer_stop(&c->io.timer);
        c->on_ready(c, status);
        return;
    }
    if (c->up->tls == NULL)
        uv_timer_stop(&c->io.timer);
    uv_tcp_nodelay(&c->io.tcp, 1);
    if (uv_read_start((uv_stream_t *)&c->io.tcp, c->up->owner->alloc, on_conn_read) < 0) {
        c->on_ready(c, UV_EIO);
        return;
    }
    if (c->up->tls != NULL) {
        /* the connect timeout runs on until the handshake is done */
        if (io_tls_start(&c->io, c->up->tls, c->up->cfg->upstream_host, on_tls_pending) < 0) {
            c->on_ready(c, UV_ENOMEM);
            return;
        }
        c->state = UC_HANDSHAKE;
        conn_handshake(c);
        return;
    }
    c->state = UC_LEASED;
    c->on_ready(c, 0);
}

static void start_connect(upconn_t *c)
{
    upstream_t *u = c->up;
    if (c->tried == 0)
        c->addr = u->next_addr;
    c->addr %= u->n_addrs; /* the addresses may have been resolved again */
    c->state = UC_CONNECTING;
    c->connect_req.data = c;
    int rc = uv_tcp_connect(&c->connect_req, &c->io.tcp,
                            (const struct sockaddr *)&u->addrs[c->addr], on_connected);
    if (rc < 0)
        fail_soon(c, rc);
}

int upstream_lease(upstream_t *u, void *owner, int fresh, upconn_ready_cb cb, upconn_t **out)
{
    if (u->closing)
        return -ECANCELED;
    if (!fresh && !list_empty(&u->idle)) {
        upconn_t *c = list_entry(u->idle.next, upconn_t, link);
        list_remove(&c->link);
        u->n_idle--;
        uv_timer_stop(&c->io.timer);
        c->state = UC_LEASED;
        c->owner = owner;
        c->on_ready = cb;
        *out = c;
        return 1;
    }

    upconn_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return -ENOMEM;
    c->parser = http_parser_new(HTTP_PARSE_RESPONSE, u->owner->limits, u->owner->response, c);
    if (c->parser == NULL) {
        free(c);
        return -ENOMEM;
    }
    int rc = io_init(u->loop, &c->io, c);
    if (rc < 0) {
        http_parser_free(c->parser);
        free(c);
        return rc;
    }
    c->io.on_closed = on_conn_closed;
    c->up = u;
    c->owner = owner;
    c->on_ready = cb;
    list_init(&c->link);
    u->n_open++;
    uv_timer_start(&c->io.timer, on_connect_timeout, u->cfg->connect_timeout, 0);

    if (!u->literal && clock_now_ms() - u->resolved_at > RESOLVE_TTL_MS)
        resolve(u);
    if (u->n_addrs == 0) {
        c->state = UC_RESOLVING;
        list_push_back(&u->waiting, &c->link);
        if (!u->resolving)
            fail_soon(c, u->resolve_error ? u->resolve_error : UV_EAI_NONAME);
    } else {
        start_connect(c);
    }
    *out = c;
    return 0;
}

/* Reads go to the lessee; a pooled connection must stay silent, so data or
 * EOF there means the connection is done. */
static void deliver(upconn_t *c, uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    if (c->state == UC_LEASED) {
        c->up->owner->on_read(s, nread, b);
        return;
    }
    if (nread == 0)
        return;
    log_record_t *r = log_begin(LOG_DEBUG, "pooled upstream connection closed");
    log_str(r, "reason", nread < 0 ? uv_strerror((int)nread) : "unexpected data");
    log_end(r);
    conn_close(c);
}

/* Hands the lessee the plaintext OpenSSL has, until it pauses; the peer's
 * close_notify or a broken record reads as EOF or a reset. */
static void tls_drain(upconn_t *c)
{
    uv_stream_t *s = (uv_stream_t *)&c->io.tcp;
    while (!c->io.closing && !c->paused && c->state != UC_CONNECTING) {
        ssize_t n = tls_read(c->io.tls, plain_buf, sizeof plain_buf);
        if (n == 0)
            break;
        if (n < 0) {
            deliver(c, s, n == TLS_CLOSED ? UV_EOF : UV_ECONNRESET, NULL);
            return;
        }
        uv_buf_t b = uv_buf_init(plain_buf, (unsigned)n);
        deliver(c, s, n, &b);
    }
    if (!c->io.closing && io_flush(&c->io) < 0 && c->state == UC_IDLE)
        conn_close(c);
}

static void on_tls_pending(uv_idle_t *h)
{
    upconn_t *c = ((io_t *)h->data)->owner;
    tls_drain(c);
}

static void on_conn_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    upconn_t *c = ((io_t *)s->data)->owner;
    if (c->io.tls == NULL || nread == 0) {
        deliver(c, s, nread, b);
        return;
    }
    if (nread < 0 || tls_feed(c->io.tls, b->base, (size_t)nread) < 0) {
        if (c->state != UC_HANDSHAKE) {
            deliver(c, s, nread < 0 ? nread : UV_ENOMEM, NULL);
            return;
        }
        uv_timer_stop(&c->io.timer);
        c->state = UC_CONNECTING;
        c->on_ready(c, nread == UV_EOF ? UPSTREAM_ETLS : (int)nread);
        return;
    }
    if (c->state == UC_HANDSHAKE) {
        conn_handshake(c);
        if (c->state != UC_LEASED)
            return;
    }
    tls_drain(c);
}

const char *upconn_tls_error(const upconn_t *c)
{
    return c->io.tls != NULL ? tls_error(c->io.tls)
                             : "the connection closed during the TLS handshake";
}

void upstream_tls_counts(const upstream_t *u, unsigned long *full, unsigned long *resumed)
{
    *full = *resumed = 0;
    if (u->tls != NULL)
        tls_ctx_counts(u->tls, full, resumed);
}

void upconn_pause(upconn_t *c)
{
    c->paused = 1;
    uv_read_stop((uv_stream_t *)&c->io.tcp);
}

void upconn_resume(upconn_t *c)
{
    c->paused = 0;
    uv_read_start((uv_stream_t *)&c->io.tcp, c->up->owner->alloc, on_conn_read);
    io_tls_kick(&c->io); /* what OpenSSL read before the pause */
}

static void on_idle_timeout(uv_timer_t *t)
{
    conn_close(((io_t *)t->data)->owner);
}

void upstream_release(upconn_t *c, int reusable)
{
    upstream_t *u = c->up;
    c->owner = NULL;
    c->on_ready = NULL;
    c->io.on_drain = NULL;
    c->io.on_error = NULL;
    if (!reusable || u->closing || c->state != UC_LEASED || c->io.failed ||
        io_pending(&c->io) > 0 || u->n_idle >= u->cfg->upstream_max_idle) {
        conn_close(c);
        return;
    }
    c->served++;
    if (!uv_is_active((uv_handle_t *)&c->io.tcp))
        upconn_resume(c); /* it was paused for backpressure */
    c->state = UC_IDLE;
    http_parser_resume(c->parser);
    uv_timer_start(&c->io.timer, on_idle_timeout, u->cfg->upstream_keepalive_timeout, 0);
    list_push_front(&u->idle, &c->link);
    u->n_idle++;
}

size_t upstream_open_count(const upstream_t *u)
{
    return u->n_open;
}

size_t upstream_idle_count(const upstream_t *u)
{
    return u->n_idle;
}

void upstream_shutdown(upstream_t *u, void (*done)(void *arg), void *arg)
{
    u->closing = 1;
    u->on_shutdown = done;
    u->shutdown_arg = arg;
    if (u->resolving)
        uv_cancel((uv_req_t *)&u->gai);
    while (!list_empty(&u->idle))
        conn_close(list_entry(u->idle.next, upconn_t, link));
    if (u->n_open == 0 && !u->resolving && u->on_shutdown != NULL) {
        u->on_shutdown = NULL;
        done(arg);
    }
}

void upstream_free(upstream_t *u)
{
    tls_ctx_free(u->tls);
    free(u);
}

io_t *upconn_io(upconn_t *c)
{
    return &c->io;
}

http_parser_t *upconn_parser(upconn_t *c)
{
    return c->parser;
}

void *upconn_owner(const upconn_t *c)
{
    return c->owner;
}
