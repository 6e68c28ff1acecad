/* httpc: errord's own small HTTP/1.1 client (see httpc.h). */
#include "httpc.h"

#include "buf.h"
#include "http.h"
#include "io.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct httpc_req_s {
    io_t io;
    uv_loop_t *loop;
    uv_getaddrinfo_t gai;
    uv_connect_t connect;
    http_parser_t *parser;
    http_limits_t limits;
    buf_t request;
    tls_ctx_t *tls; /* https */
    struct sockaddr_storage addrs[8]; /* resolved, tried in order */
    int n_addrs, next_addr;
    char host[256];
    char port[8];
    httpc_done_cb done;
    void *arg;
    int status;       /* the final response's, once its head is in */
    int answered;     /* ... and that response has ended */
    int resolving;    /* the name lookup is running */
    int finished;     /* done has fired, or the request was cancelled */
    int io_open;
    char rx[16384]; /* what is read, then what OpenSSL decrypts */
};

int httpc_parse_url(const char *url, httpc_url_t *out)
{
    memset(out, 0, sizeof *out);
    out->tls = strncasecmp(url, "https://", 8) == 0;
    if (!out->tls && strncasecmp(url, "http://", 7) != 0)
        return -EINVAL;
    const char *h = url + (out->tls ? 8 : 7), *end = h + strcspn(h, "/?#");
    const char *colon = NULL;
    if (*h == '[') {
        const char *close = memchr(h, ']', (size_t)(end - h));
        if (close == NULL)
            return -EINVAL;
        if (close + 1 < end && close[1] == ':')
            colon = close + 1;
        snprintf(out->host, sizeof out->host, "%.*s", (int)(close - h - 1), h + 1);
    } else {
        colon = memchr(h, ':', (size_t)(end - h));
        const char *hend = colon ? colon : end;
        if (hend == h || (size_t)(hend - h) >= sizeof out->host)
            return -EINVAL;
        snprintf(out->host, sizeof out->host, "%.*s", (int)(hend - h), h);
    }
    out->port = out->tls ? 443 : 80;
    if (colon != NULL) {
        char *e;
        long port = strtol(colon + 1, &e, 10);
        if (e != end || port < 1 || port > 65535)
            return -EINVAL;
        out->port = (int)port;
    }
    snprintf(out->authority, sizeof out->authority, "%.*s", (int)(end - h), h);
    if (*end == '\0' || *end == '?')
        snprintf(out->path, sizeof out->path, "/%s", end);
    else if (*end == '/')
        snprintf(out->path, sizeof out->path, "%s", end);
    else
        return -EINVAL;
    char *hash = strchr(out->path, '#');
    if (hash != NULL)
        *hash = '\0';
    return 0;
}

static void on_closed(io_t *io)
{
    httpc_req_t *r = io->owner;
    http_parser_free(r->parser);
    buf_free(&r->request);
    free(r);
}

/* Fires the callback once, then closes (or waits for the lookup to end). */
static void finish(httpc_req_t *r, int status, const char *error)
{
    if (!r->finished) {
        r->finished = 1;
        if (r->done != NULL)
            r->done(r->arg, status, error);
    }
    if (r->resolving)
        return; /* on_resolved closes */
    if (r->io_open) {
        r->io_open = 0;
        io_close(&r->io);
    }
}

static int on_head(void *ud, http_head_t *head)
{
    httpc_req_t *r = ud;
    if (head->status >= 200)
        r->status = head->status;
    http_head_free(head);
    return 0;
}

static int on_body(void *ud, const char *at, size_t n)
{
    (void)ud;
    (void)at;
    (void)n;
    return 0; /* sinks answer with little; only the status matters */
}

/* A response ended: a final one is the sink's answer; an interim one (1xx)
 * is followed by another. */
static int on_end(void *ud)
{
    httpc_req_t *r = ud;
    r->answered = r->status != 0;
    return 0;
}

static const http_handler_t HANDLER = {on_head, on_body, on_end};

/* Response bytes (plaintext). Returns -1 once the request finished. */
static int received(httpc_req_t *r, const char *data, size_t n)
{
    while (n > 0) {
        ssize_t used = http_parser_feed(r->parser, data, n);
        if (used < 0) {
            finish(r, 0, "invalid response from the sink");
            return -1;
        }
        data += used;
        n -= (size_t)used;
        if (!http_parser_ended(r->parser))
            break;
        if (r->answered) {
            finish(r, r->status, NULL);
            return -1;
        }
        http_parser_resume(r->parser); /* an interim response */
    }
    return 0;
}

/* Advances the handshake, then sends the request and reads what OpenSSL
 * has decrypted. */
static void tls_step(httpc_req_t *r)
{
    if (!r->io.tls_ready) {
        int rc = tls_handshake(r->io.tls);
        if (rc < 0) {
            char why[224];
            snprintf(why, sizeof why, "TLS handshake failed: %s", tls_error(r->io.tls));
            finish(r, 0, why);
            return;
        }
        r->io.tls_ready = rc == 1;
    }
    if (io_flush(&r->io) < 0) {
        finish(r, 0, "could not send the request");
        return;
    }
    for (;;) {
        ssize_t n = r->io.tls_ready ? tls_read(r->io.tls, r->rx, sizeof r->rx) : 0;
        if (n == 0)
            return;
        if (n < 0) {
            if (n == TLS_CLOSED && http_parser_finish(r->parser) == 0 && r->answered)
                finish(r, r->status, NULL);
            else
                finish(r, 0, "the sink closed the connection before answering");
            return;
        }
        if (received(r, r->rx, (size_t)n) < 0)
            return;
    }
}

static void on_tls_idle(uv_idle_t *h)
{
    tls_step(((io_t *)h->data)->owner);
}

/* Reads into the request's own buffer: ciphertext goes into OpenSSL before
 * tls_step() decrypts into the same buffer. */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    (void)suggested;
    httpc_req_t *r = ((io_t *)h->data)->owner;
    *b = uv_buf_init(r->rx, sizeof r->rx);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    httpc_req_t *r = ((io_t *)s->data)->owner;
    if (nread == 0)
        return;
    if (nread < 0) {
        if (http_parser_finish(r->parser) == 0 && r->answered)
            finish(r, r->status, NULL);
        else if (r->io.tls != NULL && !r->io.tls_ready)
            finish(r, 0, "TLS handshake failed: the sink closed the connection");
        else
            finish(r, 0, "the sink closed the connection before answering");
        return;
    }
    if (r->io.tls == NULL) {
        received(r, b->base, (size_t)nread);
        return;
    }
    if (tls_feed(r->io.tls, b->base, (size_t)nread) < 0) {
        finish(r, 0, "out of memory");
        return;
    }
    tls_step(r);
}

static void on_timeout(uv_timer_t *t)
{
    finish(((io_t *)t->data)->owner, 0, "timed out");
}

static void on_connected(uv_connect_t *req, int status);

static void connect_next(io_t *io)
{
    httpc_req_t *r = io->owner;
    r->connect.data = r;
    int rc = uv_tcp_connect(&r->connect, &r->io.tcp,
                            (const struct sockaddr *)&r->addrs[r->next_addr], on_connected);
    if (rc < 0)
        finish(r, 0, uv_strerror(rc));
}

static void on_connected(uv_connect_t *req, int status)
{
    httpc_req_t *r = req->data;
    if (status == UV_ECANCELED || r->finished)
        return;
    if (status < 0) {
        if (++r->next_addr < r->n_addrs)
            io_reset(&r->io, connect_next); /* the name's next address */
        else
            finish(r, 0, uv_strerror(status));
        return;
    }
    if (uv_read_start((uv_stream_t *)&r->io.tcp, on_alloc, on_read) < 0 ||
        io_append(&r->io, r->request.data, r->request.len) < 0) {
        finish(r, 0, "could not send the request");
        return;
    }
    if (r->tls != NULL) {
        /* the request waits in io.out until the handshake is done */
        if (io_tls_start(&r->io, r->tls, r->host, on_tls_idle) < 0)
            finish(r, 0, "out of memory");
        else
            tls_step(r);
        return;
    }
    if (io_flush(&r->io) < 0)
        finish(r, 0, "could not send the request");
}

static void on_write_error(io_t *io)
{
    finish(io->owner, 0, "the connection broke while sending");
}

static void on_resolved(uv_getaddrinfo_t *gai, int status, struct addrinfo *res)
{
    httpc_req_t *r = gai->data;
    r->resolving = 0;
    if (r->finished) { /* cancelled or timed out meanwhile */
        uv_freeaddrinfo(res);
        finish(r, 0, NULL);
        return;
    }
    if (status < 0 || res == NULL) {
        uv_freeaddrinfo(res);
        finish(r, 0, status < 0 ? uv_strerror(status) : "no address");
        return;
    }
    for (struct addrinfo *ai = res; ai != NULL && r->n_addrs < 8; ai = ai->ai_next)
        if (ai->ai_family == AF_INET || ai->ai_family == AF_INET6)
            memcpy(&r->addrs[r->n_addrs++], ai->ai_addr, ai->ai_addrlen);
    uv_freeaddrinfo(res);
    if (r->n_addrs == 0) {
        finish(r, 0, "no address");
        return;
    }
    connect_next(&r->io);
}

int httpc_post(uv_loop_t *loop, tls_ctx_t *tls, const httpc_url_t *url, const char *headers,
               const char *body, size_t len, uint64_t timeout_ms, httpc_done_cb done, void *arg,
               httpc_req_t **out)
{
    if (url->tls && tls == NULL)
        return -EPROTONOSUPPORT;
    httpc_req_t *r = calloc(1, sizeof *r);
    if (r == NULL)
        return -ENOMEM;
    r->loop = loop;
    r->tls = url->tls ? tls : NULL;
    snprintf(r->host, sizeof r->host, "%s", url->host);
    r->done = done;
    r->arg = arg;
    r->limits.max_line = 8192;
    r->limits.max_head = 65536;
    r->parser = http_parser_new(HTTP_PARSE_RESPONSE, &r->limits, &HANDLER, r);
    int rc = r->parser == NULL ? -ENOMEM : io_init(loop, &r->io, r);
    if (rc < 0) {
        http_parser_free(r->parser);
        free(r);
        return rc;
    }
    r->io_open = 1;
    r->io.on_closed = on_closed;
    r->io.on_error = on_write_error;
    buf_printf(&r->request,
               "POST %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: errord\r\n"
               "Content-Type: application/json\r\nContent-Length: %zu\r\nConnection: close\r\n",
               url->path, url->authority, len);
    if (headers != NULL)
        buf_puts(&r->request, headers);
    buf_lit(&r->request, "\r\n");
    buf_append(&r->request, body, len);

    snprintf(r->port, sizeof r->port, "%d", url->port);
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    r->gai.data = r;
    rc = uv_getaddrinfo(loop, &r->gai, on_resolved, url->host, r->port, &hints);
    if (rc < 0) {
        r->finished = 1; /* a failing call never fires its callback */
        finish(r, 0, NULL);
        return rc;
    }
    r->resolving = 1;
    uv_timer_start(&r->io.timer, on_timeout, timeout_ms, 0);
    *out = r;
    return 0;
}

void httpc_cancel(httpc_req_t *r)
{
    r->done = NULL;
    finish(r, 0, NULL);
}
