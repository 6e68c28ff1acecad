/* admin: the admin port (see admin.h). One request per connection, answered
 * and closed: the admin port serves operators and scrapers, not traffic. */
#include "admin.h"

#include "clock.h"
#include "frame.h"
#include "http.h"
#include "io.h"
#include "list.h"
#include "log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define ADMIN_TIMEOUT_MS 10000

typedef struct {
    http_method_t method;
    char *path;
    admin_handler_t fn;
    void *arg;
} route_t;

struct admin_s {
    uv_loop_t *loop;
    uv_tcp_t listener;
    route_t *routes;
    size_t n_routes;
    const char *token; /* --admin-token, or NULL */
    http_limits_t limits;
    list_t conns;
    int closing;
    void (*done)(void *arg);
    void *done_arg;
};

typedef struct {
    io_t io;
    admin_t *admin;
    list_t link;
    http_parser_t *parser;
    http_head_t *req;
    int answered;
} conn_t;

static void maybe_done(admin_t *a)
{
    if (a->closing && list_empty(&a->conns) && uv_is_closing((uv_handle_t *)&a->listener) &&
        a->done != NULL) {
        void (*done)(void *) = a->done;
        a->done = NULL;
        done(a->done_arg);
    }
}

static void on_conn_closed(io_t *io)
{
    conn_t *c = io->owner;
    admin_t *a = c->admin;
    list_remove(&c->link);
    http_parser_free(c->parser);
    http_head_free(c->req);
    free(c);
    maybe_done(a);
}

/* Answers and closes; `extra` is more header lines ("Name: value\r\n") or "". */
static void respond(conn_t *c, int status, const char *type, const char *body, size_t len,
                    const char *extra)
{
    char date[32], headers[256];
    clock_http_date(time(NULL), date);
    int n = snprintf(headers, sizeof headers, "Cache-Control: no-store\r\n%s", extra);
    frame_local_t o = {
        .status = status,
        .type = type,
        .headers = headers,
        .headers_len = n > 0 && (size_t)n < sizeof headers ? (size_t)n : 0,
        .has_length = 1,
        .body_len = len,
        .date = date,
        .client_version = 11,
    };
    buf_t b = BUF_INIT;
    frame_local_head(&b, &o);
    if (c->req == NULL || c->req->method != HTTP_M_HEAD)
        buf_append(&b, body, len);
    io_append(&c->io, b.data, b.len);
    buf_free(&b);
    c->answered = 1;
    io_close_after_flush(&c->io, 1000);
}

static void respond_json(conn_t *c, int status, const char *message, const char *extra)
{
    buf_t b = BUF_INIT;
    frame_error_body(&b, message);
    respond(c, status, "application/json", b.data, b.len, extra);
    buf_free(&b);
}

static int path_is(const http_head_t *h, const char *path)
{
    size_t n = strlen(path), len = 0;
    while (len < h->target_len && h->target[len] != '?')
        len++;
    return len == n && memcmp(h->target, path, n) == 0;
}

/* Whether the request carries the admin token (or none is required). The
 * probes need none: a kubelet's probe cannot carry a secret. The comparison
 * takes the same time wherever the first difference is. */
static int authorized(const admin_t *a, const http_head_t *h)
{
    if (a->token == NULL || path_is(h, "/healthz") || path_is(h, "/readyz"))
        return 1;
    const http_header_t *f = http_head_find(h, "authorization");
    if (f == NULL || f->value_len < 7 || strncasecmp(f->value, "bearer ", 7) != 0)
        return 0;
    const char *v = f->value + 7;
    size_t n = f->value_len - 7, want = strlen(a->token);
    unsigned diff = n != want;
    for (size_t i = 0; i < want; i++)
        diff |= (unsigned char)a->token[i] ^ (unsigned char)(i < n ? v[i] : 0);
    return diff == 0;
}

static void route(conn_t *c)
{
    admin_t *a = c->admin;
    const http_head_t *h = c->req;
    if (!authorized(a, h)) {
        respond_json(c, 401, "this admin route needs Authorization: Bearer <the admin token>",
                     "WWW-Authenticate: Bearer realm=\"errord\"\r\n");
        return;
    }
    http_method_t m = h->method == HTTP_M_HEAD ? HTTP_M_GET : h->method;
    const route_t *found = NULL;
    buf_t allow = BUF_INIT;
    for (size_t i = 0; i < a->n_routes && found == NULL; i++) {
        const route_t *r = &a->routes[i];
        if (!path_is(h, r->path))
            continue;
        if (r->method == m)
            found = r;
        else
            buf_printf(&allow, "%s%s", allow.len ? ", " : "", r->method == HTTP_M_POST ? "POST" : "GET, HEAD");
    }
    if (found != NULL) {
        admin_reply_t reply = {200, "application/json", BUF_INIT};
        found->fn(found->arg, h, &reply);
        respond(c, reply.status, reply.type, buf_cstr(&reply.body), reply.body.len, "");
        buf_free(&reply.body);
    } else if (allow.len > 0) {
        char msg[128], hdr[128];
        snprintf(msg, sizeof msg, "use %s", buf_cstr(&allow));
        snprintf(hdr, sizeof hdr, "Allow: %s\r\n", buf_cstr(&allow));
        respond_json(c, 405, msg, hdr);
    } else {
        respond_json(c, 404, "no such admin route", "");
    }
    buf_free(&allow);
}

static int on_head(void *ud, http_head_t *head)
{
    conn_t *c = ud;
    c->req = head;
    return 0;
}

static const http_handler_t HANDLER = {on_head, NULL, NULL};

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    conn_t *c = ((io_t *)s->data)->owner;
    if (nread == 0 || c->answered)
        return;
    if (nread < 0) {
        io_close(&c->io);
        return;
    }
    if (http_parser_feed(c->parser, b->base, (size_t)nread) < 0) {
        const http_error_t *e = http_parser_error(c->parser);
        respond_json(c, e->status ? e->status : 400, e->message, "");
        return;
    }
    if (http_parser_ended(c->parser))
        route(c);
}

static void on_timeout(uv_timer_t *t)
{
    io_close(t->data);
}

static void on_connection(uv_stream_t *server, int status)
{
    admin_t *a = server->data;
    if (status < 0 || a->closing)
        return;
    conn_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return;
    c->admin = a;
    list_push_back(&a->conns, &c->link);
    if (io_accept(server, &c->io, c, on_conn_closed) < 0)
        return;
    c->parser = http_parser_new(HTTP_PARSE_REQUEST, &a->limits, &HANDLER, c);
    if (c->parser == NULL || uv_read_start((uv_stream_t *)&c->io.tcp, io_alloc_scratch, on_read) < 0) {
        io_close(&c->io);
        return;
    }
    uv_timer_start(&c->io.timer, on_timeout, ADMIN_TIMEOUT_MS, 0);
}

static void on_failed_closed(uv_handle_t *h)
{
    admin_free(h->data);
}

static void healthz(void *arg, const http_head_t *req, admin_reply_t *reply)
{
    (void)arg;
    (void)req;
    buf_lit(&reply->body, "{\"status\":\"ok\"}\n");
}

int admin_route(admin_t *a, http_method_t method, const char *path, admin_handler_t fn,
                void *arg)
{
    route_t *r = realloc(a->routes, (a->n_routes + 1) * sizeof *r);
    if (r == NULL)
        return -ENOMEM;
    a->routes = r;
    r += a->n_routes;
    r->path = strdup(path);
    if (r->path == NULL)
        return -ENOMEM;
    r->method = method;
    r->fn = fn;
    r->arg = arg;
    a->n_routes++;
    return 0;
}

admin_t *admin_start(uv_loop_t *loop, const config_t *cfg, int *err)
{
    admin_t *a = calloc(1, sizeof *a);
    if (a == NULL) {
        *err = UV_ENOMEM;
        return NULL;
    }
    a->loop = loop;
    a->token = cfg->admin_token;
    a->limits.max_line = 8192;
    a->limits.max_head = 65536;
    list_init(&a->conns);
    uv_tcp_init(loop, &a->listener);
    a->listener.data = a;
    int rc = uv_tcp_bind(&a->listener, (const struct sockaddr *)&cfg->admin_addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&a->listener, 64, on_connection);
    if (rc == 0)
        rc = admin_route(a, HTTP_M_GET, "/healthz", healthz, NULL);
    if (rc < 0) {
        *err = rc;
        uv_close((uv_handle_t *)&a->listener, on_failed_closed); /* frees it */
        return NULL;
    }
    *err = 0;
    return a;
}

int admin_address(admin_t *a, char *out, size_t n)
{
    return io_listen_addr(&a->listener, out, n);
}

static void on_listener_closed(uv_handle_t *h)
{
    maybe_done(h->data);
}

void admin_close(admin_t *a, void (*done)(void *arg), void *arg)
{
    a->closing = 1;
    a->done = done;
    a->done_arg = arg;
    if (!uv_is_closing((uv_handle_t *)&a->listener))
        uv_close((uv_handle_t *)&a->listener, on_listener_closed);
    list_t *pos, *tmp;
    list_for_each_safe(pos, tmp, &a->conns)
    {
        conn_t *c = list_entry(pos, conn_t, link);
        io_close(&c->io);
    }
    maybe_done(a);
}

void admin_free(admin_t *a)
{
    if (a == NULL)
        return;
    for (size_t i = 0; i < a->n_routes; i++)
        free(a->routes[i].path);
    free(a->routes);
    free(a);
}
