/* io: a TCP connection with gathered, non-blocking output (see io.h). */
#include "io.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uv_write_t req;
    io_t *io;
    buf_t data;
    size_t off; /* already written by the fast path */
} write_req_t;

static _Thread_local char discard_buf[16384];

static void on_handle_closed(uv_handle_t *h)
{
    io_t *io = h->data;
    if (--io->open_handles == 0) {
        buf_free(&io->out);
        buf_free(&io->cipher);
        tls_conn_free(io->tls);
        io->tls = NULL;
        io->on_closed(io);
    }
}

int io_init(uv_loop_t *loop, io_t *io, void *owner)
{
    memset(io, 0, sizeof *io);
    /* With no address family given, neither call can fail (no socket is
     * made until connect or accept), so there is nothing to undo. */
    int rc = uv_tcp_init(loop, &io->tcp);
    if (rc < 0)
        return rc;
    uv_timer_init(loop, &io->timer);
    io->open_handles = 2;
    io->tcp.data = io;
    io->timer.data = io;
    io->owner = owner;
    io->low_water = 16 * 1024;
    return 0;
}

int io_accept(uv_stream_t *server, io_t *io, void *owner, io_cb on_closed)
{
    io_init(server->loop, io, owner); /* cannot fail without an address family */
    io->on_closed = on_closed;
    int rc = uv_accept(server, (uv_stream_t *)&io->tcp);
    if (rc < 0)
        io_close(io);
    return rc;
}

void io_alloc_scratch(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    (void)h;
    (void)suggested;
    static _Thread_local char scratch[16384];
    *b = uv_buf_init(scratch, sizeof scratch);
}

int io_append(io_t *io, const void *p, size_t n)
{
    if (io->closing || io->failed)
        return 0; /* nobody will read it; not an error for the producer */
    return buf_append(&io->out, p, n);
}

static void begin_linger(io_t *io);

static void on_write_done(uv_write_t *req, int status)
{
    write_req_t *w = (write_req_t *)req;
    io_t *io = w->io;
    io->in_flight -= w->data.len - w->off;
    buf_free(&w->data);
    free(w);
    if (io->closing)
        return;
    if (status < 0) {
        io->failed = 1;
        if (io->close_after)
            io_close(io);
        else if (io->on_error)
            io->on_error(io);
        return;
    }
    if (io->close_after) {
        if (io_pending(io) == 0)
            begin_linger(io);
        return;
    }
    if (io->on_drain && io_pending(io) <= io->low_water)
        io->on_drain(io);
}

/* Writes `b` (io->out or io->cipher): straight into the socket when it
 * takes it all, else handed to libuv with what is left. */
static int write_out(io_t *io, buf_t *b)
{
    if (b->len == 0)
        return 0;
    size_t off = 0;
    if (io->in_flight == 0) {
        uv_buf_t ub = uv_buf_init(b->data, (unsigned)b->len);
        int n = uv_try_write((uv_stream_t *)&io->tcp, &ub, 1);
        if (n >= 0) {
            off = (size_t)n;
            if (off == b->len) {
                buf_clear(b);
                return 0;
            }
        } else if (n != UV_EAGAIN) {
            io->failed = 1;
            buf_clear(b);
            return n;
        }
    }
    write_req_t *w = malloc(sizeof *w);
    if (w == NULL)
        return -ENOMEM;
    w->io = io;
    w->data = *b;
    w->off = off;
    *b = (buf_t)BUF_INIT;
    uv_buf_t ub = uv_buf_init(w->data.data + off, (unsigned)(w->data.len - off));
    int rc = uv_write(&w->req, (uv_stream_t *)&io->tcp, &ub, 1, on_write_done);
    if (rc < 0) {
        buf_free(&w->data);
        free(w);
        io->failed = 1;
        return rc;
    }
    io->in_flight += w->data.len - off;
    return 0;
}

int io_flush(io_t *io)
{
    if (io->closing)
        return 0;
    if (io->failed)
        return io->out.len + io->cipher.len > 0 ? -EPIPE : 0;
    if (io->tls == NULL)
        return write_out(io, &io->out);
    if (io->tls_ready && io->out.len > 0) {
        if (tls_write(io->tls, io->out.data, io->out.len) < 0) {
            io->failed = 1;
            return -EPROTO;
        }
        buf_clear(&io->out);
    }
    if (tls_take_output(io->tls, &io->cipher) < 0)
        return -ENOMEM;
    return write_out(io, &io->cipher);
}

int io_tls_start(io_t *io, tls_ctx_t *ctx, const char *host, uv_idle_cb on_idle)
{
    io->tls = tls_conn_new(ctx, host);
    if (io->tls == NULL)
        return -ENOMEM;
    uv_idle_init(io->tcp.loop, &io->tls_idle);
    io->tls_idle.data = io;
    io->tls_idle_cb = on_idle;
    io->open_handles++;
    return 0;
}

static void on_tls_idle(uv_idle_t *h)
{
    io_t *io = h->data;
    uv_idle_stop(h);
    if (!io->closing)
        io->tls_idle_cb(h);
}

void io_tls_kick(io_t *io)
{
    if (io->tls != NULL && !io->closing)
        uv_idle_start(&io->tls_idle, on_tls_idle);
}

static void on_tcp_reset(uv_handle_t *h)
{
    io_t *io = h->data;
    io->resetting = 0;
    if (io->closing) { /* closed meanwhile: this was the TCP handle's close */
        on_handle_closed(h);
        return;
    }
    uv_tcp_init(io->timer.loop, &io->tcp); /* no socket yet: cannot fail */
    io->tcp.data = io;
    io->reset_cb(io);
}

void io_reset(io_t *io, io_cb then)
{
    if (io->closing || io->resetting)
        return;
    io->resetting = 1;
    io->reset_cb = then;
    uv_close((uv_handle_t *)&io->tcp, on_tcp_reset);
}

void io_close(io_t *io)
{
    if (io->closing)
        return;
    io->closing = 1;
    if (!io->resetting) { /* else on_tcp_reset finishes its close */
        uv_read_stop((uv_stream_t *)&io->tcp);
        uv_close((uv_handle_t *)&io->tcp, on_handle_closed);
    }
    uv_close((uv_handle_t *)&io->timer, on_handle_closed);
    if (io->tls != NULL)
        uv_close((uv_handle_t *)&io->tls_idle, on_handle_closed);
}

static void on_linger_timeout(uv_timer_t *t)
{
    io_close(t->data);
}

static void on_discard_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    (void)h;
    (void)suggested;
    *b = uv_buf_init(discard_buf, sizeof discard_buf);
}

static void on_discard_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    (void)b;
    if (nread < 0)
        io_close(s->data);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    io_t *io = req->data;
    free(req);
    if (io->closing)
        return;
    if (status < 0) {
        io_close(io);
        return;
    }
    uv_timer_start(&io->timer, on_linger_timeout, io->linger_ms, 0);
    if (uv_read_start((uv_stream_t *)&io->tcp, on_discard_alloc, on_discard_read) < 0)
        io_close(io);
}

static void begin_linger(io_t *io)
{
    uv_shutdown_t *req = malloc(sizeof *req);
    uv_read_stop((uv_stream_t *)&io->tcp);
    uv_timer_stop(&io->timer);
    if (req == NULL) {
        io_close(io);
        return;
    }
    req->data = io;
    if (uv_shutdown(req, (uv_stream_t *)&io->tcp, on_shutdown) < 0) {
        free(req);
        io_close(io);
    }
}

void io_close_after_flush(io_t *io, uint64_t linger_ms)
{
    if (io->closing || io->close_after)
        return;
    io->close_after = 1;
    io->linger_ms = linger_ms;
    if (io->failed || io_flush(io) < 0) {
        io_close(io);
        return;
    }
    uv_read_stop((uv_stream_t *)&io->tcp);
    if (io_pending(io) == 0)
        begin_linger(io);
}

int io_listen_addr(uv_tcp_t *listener, char *out, size_t n)
{
    struct sockaddr_storage ss;
    int len = sizeof ss;
    char ip[INET6_ADDRSTRLEN];
    int rc = uv_tcp_getsockname(listener, (struct sockaddr *)&ss, &len);
    if (rc < 0)
        return rc;
    if (ss.ss_family == AF_INET6) {
        uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof ip);
        snprintf(out, n, "[%s]:%d", ip, ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
    } else {
        uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof ip);
        snprintf(out, n, "%s:%d", ip, ntohs(((struct sockaddr_in *)&ss)->sin_port));
    }
    return 0;
}

void io_peer_addr(io_t *io, char *out, size_t n)
{
    struct sockaddr_storage ss;
    int len = sizeof ss;
    snprintf(out, n, "-");
    if (uv_tcp_getpeername(&io->tcp, (struct sockaddr *)&ss, &len) < 0)
        return;
    if (ss.ss_family == AF_INET)
        uv_ip4_name((struct sockaddr_in *)&ss, out, n);
    else if (ss.ss_family == AF_INET6)
        uv_ip6_name((struct sockaddr_in6 *)&ss, out, n);
}
