/* txn_forward: a transaction's bytes (see txn_int.h): the request to the
 * upstream connection it leases, with backpressure both ways, and the
 * response back to the client, or into the buffer its handler reads. */
#include "txn_int.h"

#include "buf.h"
#include "clock.h"
#include "frame.h"
#include "log.h"

#include <stdio.h>

static void on_up_drain(io_t *io);
static void on_up_write_error(io_t *io);
static void on_up_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);
static void on_up_timeout(uv_timer_t *timer);

static void up_timer(txn_t *t, uint64_t ms)
{
    uv_timer_start(&upconn_io(t->up)->timer, on_up_timeout, ms, 0);
}

/* The upstream connection is ready: send the request (what has arrived).
 * Returns -1 when the transaction ended. */
static int txn_up_ready(txn_t *t)
{
    upconn_t *u = t->up;
    txn_env_t *env = t->env;
    t->up_ready = 1;
    io_t *io = upconn_io(u);
    io->on_drain = on_up_drain;
    io->on_error = on_up_write_error;
    http_parser_set_head_request(upconn_parser(u), t->req->method == HTTP_M_HEAD);
    io_append(io, t->head.data, t->head.len);
    txn_pump(t); /* a request that is all here starts the first-byte timer */
    if (!t->end_sent)
        up_timer(t, env->cfg->upstream_idle_timeout);
    if (txn_flush(t) < 0)
        return -1;
    txn_body_backpressure(t);
    return 0;
}

static void on_up_ready(upconn_t *u, int status)
{
    txn_t *t = upconn_owner(u);
    if (status == UPSTREAM_ETLS) {
        snprintf(t->tls_error, sizeof t->tls_error, "TLS handshake with the upstream failed: %s",
                 upconn_tls_error(u));
        txn_upstream_failed(t, "tls", 502, t->tls_error);
        return;
    }
    if (status < 0) {
        const char *why = status == UV_ETIMEDOUT ? "upstream connect timed out"
                          : (status == UV_EAI_NONAME || status == UV_EAI_AGAIN ||
                             status == UV_EAI_FAIL)
                              ? "could not resolve the upstream host"
                              : "upstream refused the connection";
        txn_upstream_failed(t, "connect", status == UV_ETIMEDOUT ? 504 : 502, why);
        return;
    }
    t->up_reused = 0;
    txn_up_ready(t);
}


int txn_connect(txn_t *t, int fresh)
{
    t->attempt_t0 = clock_now_ns();
    t->res_bytes = 0;
    t->body_fwd = 0;
    t->end_sent = 0;
    t->up_ready = 0;
    int rc = upstream_lease(t->env->upstream, t, fresh, on_up_ready, &t->up);
    if (rc < 0) {
        t->up = NULL;
        return txn_upstream_failed(t, "connect", 502, "could not open an upstream connection");
    }
    if (rc == 1) {
        t->up_reused = 1;
        return txn_up_ready(t);
    }
    return 0;
}

/* How long an attempt waits for its response once the request is sent:
 * the policy's settings.try_timeout_ms, else --first-byte-timeout. */
static uint64_t try_timeout(const txn_t *t)
{
    if (t->policy != NULL && policy_settings(t->policy)->try_timeout_ms > 0)
        return policy_settings(t->policy)->try_timeout_ms;
    return t->env->cfg->first_byte_timeout;
}

/* Forwards the request body that has arrived, framed for the upstream. */
void txn_pump(txn_t *t)
{
    if (!t->up_ready || t->end_sent)
        return;
    io_t *io = upconn_io(t->up);
    size_t n = t->body.len - t->body_fwd;
    if (n > 0) {
        if (t->req->flags & HTTP_F_CHUNKED) {
            char line[24];
            io_append(io, line, frame_chunk_size_line(line, n));
            io_append(io, t->body.data + t->body_fwd, n);
            io_append(io, "\r\n", 2);
        } else {
            io_append(io, t->body.data + t->body_fwd, n);
        }
        t->body_fwd = t->body.len;
        if (!t->replayable) {
            buf_clear(&t->body);
            t->body_fwd = 0;
        }
    }
    if (t->req_done) {
        if (t->req->flags & HTTP_F_CHUNKED)
            io_append(io, FRAME_LAST_CHUNK, FRAME_LAST_CHUNK_LEN);
        t->end_sent = 1;
        if (t->res == NULL)
            up_timer(t, try_timeout(t));
    }
}

/* Reads the request body only as fast as the upstream takes it: stops the
 * client's reads while too much waits, resumes them once it drained. */
void txn_body_backpressure(txn_t *t)
{
    if (t->req_done)
        return;
    size_t waiting = t->up_ready ? io_pending(upconn_io(t->up)) : t->body.len - t->body_fwd;
    int on = waiting <= HIGH_WATER;
    if (on == t->ops->reading(t->conn))
        return;
    t->ops->read(t->conn, on);
    /* While errord holds the body back, the client is not stalling: the
     * upstream's timer measures the wait instead. */
    t->ops->wait(t->conn, on ? WAIT_BODY : WAIT_NONE, 0);
}

/* Writes what both sides have gathered. Returns -1 when the transaction
 * ended because a connection broke. */
int txn_flush(txn_t *t)
{
    if (t->up != NULL && io_flush(upconn_io(t->up)) < 0)
        return txn_upstream_failed(t, "reset", 502, "upstream connection broke");
    if (io_flush(t->out) < 0) {
        t->ops->abort(t->conn, "client connection broke");
        return -1;
    }
    return 0;
}


/* Sends the response head to the client, with errord's framing. */
void txn_commit(txn_t *t)
{
    buf_t b = BUF_INIT;

    t->committed = 1;
    t->status = t->res->status;
    if (t->ops->waiting(t->conn) == WAIT_DEADLINE)
        t->ops->wait(t->conn, WAIT_NONE, 0); /* the answer has begun: no deadline cuts it */
    frame_response_t o = {
        .date = txn_date(t->env),
        .request_id = t->id,
        .client_version = t->req->version,
        .keep_alive = txn_wants_more(t),
    };
    switch (frame_response_head(&b, t->res, &o)) {
    case FRAME_BODY_CHUNKED: t->chunk_out = 1; break;
    case FRAME_BODY_TO_CLOSE: t->close_out = 1; break;
    case FRAME_BODY_AS_IS: break;
    }
    t->keep_alive = o.keep_alive;
    io_append(t->out, b.data, b.len);
    buf_free(&b);
}

/* Whether the upstream connection can take another request after this
 * response: it is complete, nothing followed it, nobody asked to close. */
int txn_response_reusable(const txn_t *t, int extra_bytes)
{
    const http_head_t *res = t->res;
    return t->res_done && !extra_bytes && t->end_sent &&
           !(res->flags & (HTTP_F_BODY_TO_EOF | HTTP_F_CLOSE)) &&
           (res->version == 11 || (res->flags & HTTP_F_KEEP_ALIVE));
}


/* Sends response body bytes to the client, framed. */
void txn_send_body(txn_t *t, const char *at, size_t n)
{
    io_t *out = t->out;
    if (t->chunk_out) {
        char line[24];
        io_append(out, line, frame_chunk_size_line(line, n));
        io_append(out, at, n);
        io_append(out, "\r\n", 2);
    } else {
        io_append(out, at, n);
    }
    t->bytes_out += n;
}


/* ---- upstream events ------------------------------------------------------------ */

static int on_res_head(void *ud, http_head_t *head)
{
    upconn_t *u = ud;
    txn_t *t = upconn_owner(u);
    if (head->status < 200) {
        http_head_free(head); /* interim: the final response follows */
        return 0;
    }
    t->res = head;
    if (t->policy != NULL && policy_handles(t->policy, head->status))
        t->holding = 1; /* its handler decides once the body is in (or too big) */
    else
        txn_commit(t);
    return 0; /* the idle timer is set after this read, if the body goes on */
}

static int on_res_body(void *ud, const char *at, size_t n)
{
    upconn_t *u = ud;
    txn_t *t = upconn_owner(u);
    if (t->holding) {
        /* Past body_limit the handler is asked at once (body = nil); until
         * then at most one more read lands here. */
        if (buf_append(&t->res_body, at, n) < 0)
            return -1;
        if (t->res_body.len > policy_settings(t->policy)->body_limit)
            t->res_over = 1;
        return 0;
    }
    txn_send_body(t, at, n);
    return 0;
}

static int on_res_end(void *ud)
{
    upconn_t *u = ud;
    txn_t *t = upconn_owner(u);
    if (t->res != NULL)
        t->res_done = 1;
    return 0;
}

static const http_handler_t RESPONSE_HANDLER = {on_res_head, on_res_body, on_res_end};

static void on_up_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    upconn_t *u = ((io_t *)s->data)->owner;
    txn_t *t = upconn_owner(u);
    http_parser_t *parser = upconn_parser(u);
    if (nread == 0)
        return;
    if (nread < 0) {
        if (http_parser_finish(parser) == 0 && t->res_done) {
            if (t->holding)
                txn_decide(t, 1);
            else
                txn_response_done(t, 0);
            return;
        }
        if (t->res == NULL)
            txn_upstream_failed(t, "reset", 502,
                                "upstream closed the connection before responding");
        else
            txn_upstream_failed(t, "reset", 502, "upstream closed the connection mid-response");
        return;
    }
    const char *data = b->base;
    size_t n = (size_t)nread;
    t->res_bytes += n;
    while (n > 0) {
        ssize_t used = http_parser_feed(parser, data, n);
        if (used < 0) {
            const http_error_t *e = http_parser_error(parser);
            log_record_t *r = log_begin(LOG_WARN, "invalid response from upstream");
            log_str(r, "request_id", t->id);
            log_str(r, "error", e->message);
            log_end(r);
            txn_upstream_failed(t, "protocol", 502, "invalid response from upstream");
            return;
        }
        data += used;
        n -= (size_t)used;
        if (!http_parser_ended(parser))
            break;
        if (!t->res_done) {
            http_parser_resume(parser); /* after an interim response */
            continue;
        }
        if (t->holding)
            txn_decide(t, n > 0);
        else
            txn_response_done(t, n > 0);
        return;
    }
    if (t->holding && t->res_over && txn_decide(t, 0) < 0)
        return;
    if (io_pending(t->out) > HIGH_WATER) {
        /* The client reads slower than the upstream sends: stop reading the
         * upstream (not its fault now) and time the client instead. */
        t->up_paused = 1;
        upconn_pause(u);
        uv_timer_stop(&upconn_io(u)->timer);
        t->ops->wait(t->conn, WAIT_SEND, 0);
    } else if (t->res != NULL) {
        up_timer(t, t->env->cfg->upstream_idle_timeout);
    }
    txn_flush(t);
}

static void on_up_timeout(uv_timer_t *timer)
{
    upconn_t *u = ((io_t *)timer->data)->owner;
    txn_t *t = upconn_owner(u);
    const char *why = !t->end_sent     ? "upstream stopped reading the request"
                      : t->res == NULL ? "upstream did not respond in time"
                                       : "upstream stalled mid-response";
    txn_upstream_failed(t, "timeout", 504, why);
}

static void on_up_drain(io_t *io)
{
    upconn_t *u = io->owner;
    txn_t *t = upconn_owner(u);
    if (!t->end_sent)
        up_timer(t, t->env->cfg->upstream_idle_timeout);
    txn_body_backpressure(t);
}

static void on_up_write_error(io_t *io)
{
    upconn_t *u = io->owner;
    txn_upstream_failed(upconn_owner(u), "reset", 502, "upstream connection broke");
}


void txn_upstream_events(upstream_owner_t *o)
{
    o->on_read = on_up_read;
    o->response = &RESPONSE_HANDLER;
}


void txn_client_drained(txn_t *t)
{
    if (!t->up_paused || t->up == NULL)
        return;
    t->up_paused = 0;
    upconn_resume(t->up);
    up_timer(t, t->env->cfg->upstream_idle_timeout);
    t->ops->wait(t->conn, t->req_done ? WAIT_NONE : WAIT_BODY, 0);
}

