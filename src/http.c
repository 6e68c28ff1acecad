/* http: HTTP/1.1 messages on the wire (see http.h). */
#include "http.h"

#include "bytes.h"

#include <llhttp.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* The validating pass over a head (and a chunked body's trailer section). */
typedef enum {
    SC_MSG_START,    /* before the start line (a request may send empty lines) */
    SC_MSG_START_CR, /* CR of such an empty line */
    SC_LINE0,        /* in the start line */
    SC_LINE0_CR,     /* CR ending the start line */
    SC_FIELD_START,  /* start of a field line, or of the empty line ending the head */
    SC_NAME,         /* in a field name */
    SC_VALUE,        /* in a field value */
    SC_FIELD_CR,     /* CR ending a field line */
    SC_END_CR,       /* CR of the empty line */
    SC_BODY,         /* not scanning: the head is done */
} scan_state_t;

struct http_parser_s {
    llhttp_t ll;
    http_parse_kind_t kind;
    const http_limits_t *limits;
    const http_handler_t *h;
    void *ud;
    http_head_t *head; /* being parsed; NULL once handed over */
    scan_state_t scan;
    size_t head_bytes; /* bytes of this head (or trailer section) scanned */
    buf_t line0;       /* the start line, as received */
    int field_state;   /* 0: between fields, 1: in a name, 2: in a value */
    char name[16];     /* scanner: the field name so far, lower-case, first 16 bytes */
    size_t name_len;
    int in_cl_value;   /* scanner: in a Content-Length value */
    ssize_t tab_at;    /* scanner: an HTAB llhttp must see as SP, at this offset */
    int line0_known;   /* scanner: the start line's first word checked out */
    size_t target_off; /* where the target and reason start in the head's arena */
    size_t reason_off;
    int in_trailer;
    int head_request;  /* the response answers a HEAD request */
    int ended;         /* stopped at the end of a message */
    int failed;
    int started; /* a byte of the current message has been seen */
    http_error_t err;
};

/* Bytes a field value may hold besides HTAB: SP, VCHAR, obs-text. */
static const unsigned char VALUE_CHAR[256] = {[0x20 ... 0x7e] = 1, [0x80 ... 0xff] = 1};

static int is_field_vchar(unsigned char c)
{
    return c == '\t' || c == ' ' || (c > 0x20 && c != 0x7f);
}

static int is_ows(char c)
{
    return c == ' ' || c == '\t';
}

static int is_request(const http_parser_t *p)
{
    return p->kind == HTTP_PARSE_REQUEST;
}

/* Records why parsing failed. Requests get `status`; a response that breaks
 * the rules is the upstream's fault, so the answer is always 502. */
static int fail(http_parser_t *p, int status, const char *message)
{
    if (!p->failed) {
        p->failed = 1;
        p->err.status = is_request(p) ? status : 502;
        p->err.message = message;
    }
    return -1;
}

/* ---- the validating pass --------------------------------------------------- */

static int check_request_line(http_parser_t *p, const char *s, size_t n)
{
    size_t i = 0;
    while (i < n && HTTP_TCHAR[(unsigned char)s[i]])
        i++;
    if (i == 0 || i >= n || s[i] != ' ')
        return fail(p, 400, "malformed request line");
    size_t t = ++i;
    while (i < n && (unsigned char)s[i] > 0x20 && (unsigned char)s[i] < 0x7f)
        i++;
    if (i == t || i >= n || s[i] != ' ')
        return fail(p, 400, "malformed request line");
    i++;
    if (n - i != 8 || memcmp(s + i, "HTTP/", 5) != 0 || s[i + 5] < '0' || s[i + 5] > '9' ||
        s[i + 6] != '.' || s[i + 7] < '0' || s[i + 7] > '9')
        return fail(p, 400, "malformed HTTP version in request line");
    return 0;
}

static int check_status_line(http_parser_t *p, const char *s, size_t n)
{
    if (n < 12 || memcmp(s, "HTTP/", 5) != 0 || s[5] < '0' || s[5] > '9' || s[6] != '.' ||
        s[7] < '0' || s[7] > '9' || s[8] != ' ')
        return fail(p, 502, "malformed status line");
    for (size_t i = 9; i < 12; i++)
        if (s[i] < '0' || s[i] > '9')
            return fail(p, 502, "malformed status code");
    if (n > 12 && s[12] != ' ')
        return fail(p, 502, "malformed status line");
    for (size_t i = 13; i < n; i++)
        if (!is_field_vchar((unsigned char)s[i]))
            return fail(p, 502, "invalid character in reason phrase");
    return 0;
}

/* Whether `c` can extend the start line read so far: a request line starts
 * with a method token, a status line with "HTTP/". */
static int line0_prefix_ok(const http_parser_t *p, unsigned char c)
{
    size_t n = p->line0.len;
    if (!is_request(p))
        return n >= 5 || c == (unsigned char)"HTTP/"[n];
    if (n > 0 && memchr(p->line0.data, ' ', n) != NULL)
        return 1;
    return HTTP_TCHAR[c] || (c == ' ' && n > 0);
}

/* Scans head bytes, stopping right after the start line and right after the
 * empty line that ends the head (or the trailer section). Returns how many
 * bytes it took, or -1 when a byte breaks the rules. */
static ssize_t scan(http_parser_t *p, const char *data, size_t n)
{
    size_t limit = p->limits->max_head;
    size_t i;

    for (i = 0; i < n && p->scan != SC_BODY; i++) {
        /* Most of a head is names and values: take runs of ordinary bytes
         * at once, and the byte after them one by one below. */
        size_t j = i; /* where the run ends */
        if (p->scan == SC_LINE0 && p->line0_known) {
            for (uint64_t x; j + 8 <= n; j += 8) {
                x = bytes_load8(data + j);
                if (bytes_has(x, '\r') | bytes_has(x, '\n'))
                    break;
            }
            while (j < n && data[j] != '\r' && data[j] != '\n')
                j++;
            if (p->line0.len + (j - i) > p->limits->max_line)
                return fail(p, 414, "request line too long");
            if (buf_append(&p->line0, data + i, j - i) < 0)
                return fail(p, 500, "out of memory");
        } else if (p->scan == SC_NAME) {
            for (; j < n && HTTP_TCHAR[(unsigned char)data[j]]; j++, p->name_len++)
                if (p->name_len < sizeof p->name)
                    p->name[p->name_len] = (char)(data[j] | 0x20);
        } else if (p->scan == SC_VALUE) {
            for (uint64_t x; j + 8 <= n; j += 8) {
                x = bytes_load8(data + j);
                if (bytes_below(x, 0x20) | bytes_has(x, 0x7f))
                    break;
            }
            while (j < n && VALUE_CHAR[(unsigned char)data[j]])
                j++;
        }
        if (j > i) {
            p->head_bytes += j - i;
            if (p->head_bytes > limit)
                return fail(p, 431, "header section too large");
            i = j;
            if (i == n)
                break;
        }
        unsigned char c = (unsigned char)data[i];
        if (++p->head_bytes > limit)
            return fail(p, 431, "header section too large");
        if (c == 0)
            return fail(p, 400, "NUL byte in message head");
        switch (p->scan) {
        case SC_MSG_START:
            if (c == '\r' && is_request(p)) {
                p->scan = SC_MSG_START_CR;
                break;
            }
            p->scan = SC_LINE0;
            /* fall through */
        case SC_LINE0:
            if (c == '\r') {
                p->scan = SC_LINE0_CR;
            } else if (c == '\n') {
                return fail(p, 400, "bare LF in start line");
            } else if (p->line0.len >= p->limits->max_line) {
                return fail(p, 414, "request line too long");
            } else if (!line0_prefix_ok(p, c)) {
                /* not HTTP at all (TLS, a banner...): say so now, not at a line end */
                return fail(p, 400, "malformed start line");
            } else if (buf_append(&p->line0, &data[i], 1) < 0) {
                return fail(p, 500, "out of memory");
            } else {
                /* past the method (or "HTTP/"), the rest is checked whole */
                p->line0_known = is_request(p) ? c == ' ' : p->line0.len >= 5;
            }
            break;
        case SC_MSG_START_CR:
            if (c != '\n')
                return fail(p, 400, "bare CR before request line");
            p->scan = SC_MSG_START;
            break;
        case SC_LINE0_CR:
            if (c != '\n')
                return fail(p, 400, "bare CR in start line");
            if ((is_request(p) ? check_request_line : check_status_line)(p, p->line0.data,
                                                                         p->line0.len) < 0)
                return -1;
            p->scan = SC_FIELD_START;
            return (ssize_t)i + 1; /* the caller hands the whole line to llhttp */
        case SC_FIELD_START:
            if (c == '\r') {
                p->scan = SC_END_CR;
            } else if (c == ' ' || c == '\t') {
                return fail(p, 400, "obsolete line folding");
            } else if (HTTP_TCHAR[c]) {
                p->scan = SC_NAME;
                p->name[0] = (char)(c | 0x20);
                p->name_len = 1;
            } else if (c == ':') {
                return fail(p, 400, "empty header name");
            } else if (c == '\n') {
                return fail(p, 400, "bare LF in header section");
            } else {
                return fail(p, 400, "invalid character in header name");
            }
            break;
        case SC_NAME:
            /* the name's bytes went by in the fast path above */
            if (c == ':') {
                p->scan = SC_VALUE;
                p->in_cl_value = p->name_len == 14 && memcmp(p->name, "content-length", 14) == 0;
            } else if (c == ' ' || c == '\t') {
                return fail(p, 400, "whitespace between header name and colon");
            } else {
                return fail(p, 400, "invalid character in header name");
            }
            break;
        case SC_VALUE:
            if (c == '\r')
                p->scan = SC_FIELD_CR;
            else if (c == '\n')
                return fail(p, 400, "bare LF in header field");
            else if (!is_field_vchar(c))
                return fail(p, 400, "invalid character in header value");
            else if (c == '\t' && p->in_cl_value) {
                /* llhttp 8.1 takes only SP as whitespace after the digits;
                 * HTAB is OWS too (RFC 9110 5.6.3), so it is fed as SP. */
                p->tab_at = (ssize_t)i;
                return (ssize_t)i + 1;
            }
            break;
        case SC_FIELD_CR:
        case SC_END_CR:
            if (c != '\n')
                return fail(p, 400, "bare CR in header field");
            p->scan = p->scan == SC_END_CR ? SC_BODY : SC_FIELD_START;
            break;
        case SC_BODY:
            break;
        }
    }
    return (ssize_t)i;
}

/* ---- llhttp callbacks ------------------------------------------------------ */

static http_parser_t *parser_of(llhttp_t *ll)
{
    return (http_parser_t *)ll->data;
}

static int user_error(http_parser_t *p, int status, const char *message)
{
    fail(p, status, message);
    llhttp_set_error_reason(&p->ll, message);
    return HPE_USER;
}

static int on_message_begin(llhttp_t *ll)
{
    http_parser_t *p = parser_of(ll);
    if (p->head == NULL) {
        p->head = calloc(1, sizeof *p->head);
        /* one allocation for a typical head's strings, one for its fields */
        if (p->head == NULL || buf_reserve(&p->head->arena, 1024) < 0)
            return user_error(p, 500, "out of memory");
    }
    p->head->content_length = -1;
    return 0;
}

static int arena_append(http_parser_t *p, const char *at, size_t n)
{
    if (buf_append(&p->head->arena, at, n) < 0)
        return user_error(p, 500, "out of memory");
    return 0;
}

/* Appends a piece of the target or the reason, which llhttp may hand over
 * in several: the first piece says where it starts. */
static int span_append(http_parser_t *p, size_t *off, size_t *len, const char *at, size_t n)
{
    if (*len == 0)
        *off = p->head->arena.len;
    *len += n;
    return arena_append(p, at, n);
}

static int on_url(llhttp_t *ll, const char *at, size_t n)
{
    http_parser_t *p = parser_of(ll);
    return span_append(p, &p->target_off, &p->head->target_len, at, n);
}

static int on_status(llhttp_t *ll, const char *at, size_t n)
{
    http_parser_t *p = parser_of(ll);
    return span_append(p, &p->reason_off, &p->head->reason_len, at, n);
}

static int on_header_field(llhttp_t *ll, const char *at, size_t n)
{
    http_parser_t *p = parser_of(ll);
    http_head_t *h = p->head;
    if (p->in_trailer)
        return 0; /* trailer fields are not forwarded */
    if (p->field_state != 1) {
        if (h->n_headers == h->cap_headers) {
            size_t cap = h->cap_headers ? h->cap_headers * 2 : 16;
            http_header_t *f = realloc(h->headers, cap * sizeof *f);
            if (f == NULL)
                return user_error(p, 500, "out of memory");
            h->headers = f;
            h->cap_headers = cap;
        }
        http_header_t *f = &h->headers[h->n_headers++];
        memset(f, 0, sizeof *f);
        f->name_off = f->value_off = (uint32_t)h->arena.len;
        p->field_state = 1;
    }
    h->headers[h->n_headers - 1].name_len += (uint32_t)n;
    return arena_append(p, at, n);
}

static int on_header_value(llhttp_t *ll, const char *at, size_t n)
{
    http_parser_t *p = parser_of(ll);
    http_head_t *h = p->head;
    if (p->in_trailer)
        return 0;
    http_header_t *f = &h->headers[h->n_headers - 1];
    if (p->field_state != 2) {
        f->value_off = (uint32_t)h->arena.len;
        p->field_state = 2;
    }
    f->value_len += (uint32_t)n;
    return arena_append(p, at, n);
}

static int on_header_value_complete(llhttp_t *ll)
{
    http_parser_t *p = parser_of(ll);
    if (p->in_trailer)
        return 0;
    http_head_t *h = p->head;
    http_header_t *f = &h->headers[h->n_headers - 1];
    while (f->value_len > 0 && is_ows(h->arena.data[f->value_off])) {
        f->value_off++;
        f->value_len--;
    }
    while (f->value_len > 0 && is_ows(h->arena.data[f->value_off + f->value_len - 1]))
        f->value_len--;
    p->field_state = 0;
    return 0;
}

/* ---- head checks ----------------------------------------------------------- */

static int name_is(const http_header_t *f, const char *name, size_t n)
{
    return f->name_len == n && strncasecmp(f->name, name, n) == 0;
}

#define NAME_IS(f, lit) name_is((f), lit, sizeof lit - 1)

/* Absolute-form "http://authority/path?q" becomes origin-form with the
 * authority kept aside; asterisk-form is only for OPTIONS. Works on arena
 * offsets, before the head's pointers are set, as it may append to it. */
static int check_target(http_parser_t *p, http_head_t *h, size_t *authority_off)
{
    const char *t = h->arena.data + p->target_off;
    size_t n = h->target_len;

    if (n > 0 && t[0] == '/')
        return 0;
    if (n == 1 && t[0] == '*')
        return h->method == HTTP_M_OPTIONS
                   ? 0
                   : user_error(p, 400, "asterisk-form target is only for OPTIONS");
    size_t skip = 0;
    if (n > 7 && strncasecmp(t, "http://", 7) == 0)
        skip = 7;
    else if (n > 8 && strncasecmp(t, "https://", 8) == 0)
        skip = 8;
    else
        return user_error(p, 400, "invalid request target");
    size_t end = skip;
    while (end < n && t[end] != '/' && t[end] != '?')
        end++;
    if (end == skip || !http_valid_host(t + skip, end - skip))
        return user_error(p, 400, "invalid authority in request target");
    *authority_off = p->target_off + skip;
    h->authority_len = end - skip;
    if (end < n && t[end] == '/') {
        p->target_off += end;
        h->target_len = n - end;
        return 0;
    }
    /* An empty path is "/": "http://host?q" is sent as "/?q". */
    size_t off = h->arena.len, tail = p->target_off + end;
    if (buf_reserve(&h->arena, 1 + n - end) < 0)
        return user_error(p, 500, "out of memory");
    h->arena.data[h->arena.len++] = '/';
    buf_append(&h->arena, h->arena.data + tail, n - end);
    p->target_off = off;
    h->target_len = 1 + n - end;
    return 0;
}

static http_method_t method_of(uint8_t m)
{
    switch (m) {
    case HTTP_GET: return HTTP_M_GET;
    case HTTP_HEAD: return HTTP_M_HEAD;
    case HTTP_POST: return HTTP_M_POST;
    case HTTP_PUT: return HTTP_M_PUT;
    case HTTP_DELETE: return HTTP_M_DELETE;
    case HTTP_OPTIONS: return HTTP_M_OPTIONS;
    case HTTP_PATCH: return HTTP_M_PATCH;
    case HTTP_TRACE: return HTTP_M_TRACE;
    case HTTP_CONNECT: return HTTP_M_CONNECT;
    default: return HTTP_M_OTHER;
    }
}

/* Turns the arena offsets recorded while parsing into pointers; the arena
 * does not change after this. */
static void rebase(http_parser_t *p, http_head_t *h)
{
    const char *base = h->arena.data;
    h->target = h->target_len > 0 ? base + p->target_off : "";
    h->reason = h->reason_len > 0 ? base + p->reason_off : "";
    for (size_t i = 0; i < h->n_headers; i++) {
        h->headers[i].name = base + h->headers[i].name_off;
        h->headers[i].value = base + h->headers[i].value_off;
    }
}

struct hop_mark {
    http_head_t *head;
};

static int mark_hop(void *ctx, const char *s, size_t n)
{
    http_head_t *h = ((struct hop_mark *)ctx)->head;
    for (size_t i = 0; i < h->n_headers; i++)
        if (name_is(&h->headers[i], s, n))
            h->headers[i].flags |= HTTP_HDR_HOP;
    if (n == 5 && strncasecmp(s, "close", 5) == 0)
        h->flags |= HTTP_F_CLOSE;
    else if (n == 10 && strncasecmp(s, "keep-alive", 10) == 0)
        h->flags |= HTTP_F_KEEP_ALIVE;
    return 0;
}

/* Checks a complete head and hands it to the owner. Returns what llhttp's
 * on_headers_complete expects. */
static int finish_head(http_parser_t *p, http_te_t *te)
{
    llhttp_t *ll = &p->ll;
    http_head_t *h = p->head;
    int req = is_request(p);
    int n_host = 0, n_cl = 0, n_te = 0;
    const http_header_t *host = NULL;
    size_t authority_off = SIZE_MAX;

    h->head_bytes = p->head_bytes;
    ll->upgrade = 0; /* errord does not switch protocols: the message is plain HTTP */

    if (ll->http_major != 1 || ll->http_minor > 1)
        return user_error(p, 505, "HTTP version not supported");
    h->version = ll->http_minor == 0 ? 10 : 11;

    if (req) {
        h->method = method_of(ll->method);
        h->method_name = llhttp_method_name((llhttp_method_t)ll->method);
        if (h->method == HTTP_M_CONNECT)
            return user_error(p, 501, "CONNECT is not supported");
        if (check_target(p, h, &authority_off) != 0)
            return HPE_USER;
    } else {
        h->status = ll->status_code;
        if (h->status < 100 || h->status > 599)
            return user_error(p, 502, "upstream status code out of range");
        if (h->status == 101)
            return user_error(p, 502, "upstream switched protocols unasked");
    }
    rebase(p, h);
    if (authority_off != SIZE_MAX)
        h->authority = h->arena.data + authority_off;

    for (size_t i = 0; i < h->n_headers; i++) {
        http_header_t *f = &h->headers[i];
        if (NAME_IS(f, "host")) {
            n_host++;
            host = f;
        } else if (NAME_IS(f, "content-length")) {
            n_cl++;
            f->flags |= HTTP_HDR_HOP; /* framing is errord's to set on each side */
        } else if (NAME_IS(f, "transfer-encoding")) {
            n_te++;
            f->flags |= HTTP_HDR_HOP;
            http_te_read(te, f->value, f->value_len);
            if (f->value_len == 0)
                te->bad = 1;
        } else if (NAME_IS(f, "connection")) {
            f->flags |= HTTP_HDR_HOP;
        } else if (NAME_IS(f, "keep-alive") || NAME_IS(f, "proxy-connection") ||
                   NAME_IS(f, "te") || NAME_IS(f, "trailer") || NAME_IS(f, "upgrade")) {
            f->flags |= HTTP_HDR_HOP;
        } else if (req && NAME_IS(f, "expect")) {
            f->flags |= HTTP_HDR_HOP; /* errord answers the expectation itself */
            if (f->value_len == 12 && strncasecmp(f->value, "100-continue", 12) == 0)
                h->flags |= HTTP_F_EXPECT_CONTINUE;
            else
                return user_error(p, 417, "unsupported expectation");
        }
    }
    for (size_t i = 0; i < h->n_headers; i++) {
        http_header_t *f = &h->headers[i];
        if (NAME_IS(f, "connection")) {
            struct hop_mark m = {h};
            http_list_each(f->value, f->value_len, mark_hop, &m);
        }
    }

    /* Framing (RFC 9112 6) */
    if (n_cl > 1)
        return user_error(p, 400, "more than one Content-Length");
    if (n_te > 0 && n_cl > 0)
        return user_error(p, 400, "both Content-Length and Transfer-Encoding");
    if (n_te > 0) {
        if (req && h->version == 10)
            return user_error(p, 400, "Transfer-Encoding in an HTTP/1.0 request");
        if (te->unknown)
            return user_error(p, 501, "unknown transfer coding");
        if (te->bad || te->chunked_count != 1 || !te->chunked_seen)
            return user_error(p, 400, "Transfer-Encoding must end with chunked, once");
        if (!(ll->flags & F_CHUNKED))
            return user_error(p, 400, "ambiguous Transfer-Encoding");
        h->flags |= HTTP_F_CHUNKED;
        if (te->others.len > 0) {
            h->codings = h->codings_owned = te->others.data;
            h->codings_len = te->others.len;
            te->others = (buf_t)BUF_INIT;
        }
    } else if (n_cl == 1) {
        const http_header_t *cl = NULL;
        for (size_t i = 0; i < h->n_headers && cl == NULL; i++)
            if (NAME_IS(&h->headers[i], "content-length"))
                cl = &h->headers[i];
        int64_t v = 0;
        if (cl->value_len == 0 || cl->value_len > 18)
            return user_error(p, 400, "invalid Content-Length");
        for (uint32_t i = 0; i < cl->value_len; i++) {
            if (cl->value[i] < '0' || cl->value[i] > '9')
                return user_error(p, 400, "invalid Content-Length");
            v = v * 10 + (cl->value[i] - '0');
        }
        if (!(ll->flags & F_CONTENT_LENGTH) || (uint64_t)v != ll->content_length)
            return user_error(p, 400, "ambiguous Content-Length");
        h->content_length = v;
    }

    if (req) {
        if (h->version == 11 && n_host != 1)
            return user_error(p, 400, n_host ? "more than one Host header" : "missing Host header");
        if (n_host > 1)
            return user_error(p, 400, "more than one Host header");
        if (host != NULL && !http_valid_host(host->value, host->value_len))
            return user_error(p, 400, "invalid Host header");
        if (!(h->flags & HTTP_F_CHUNKED) && h->content_length <= 0)
            h->flags |= HTTP_F_NO_BODY;
    } else {
        if (p->head_request || h->status < 200 || h->status == 204 || h->status == 304)
            h->flags |= HTTP_F_NO_BODY;
        else if (!(h->flags & HTTP_F_CHUNKED) && h->content_length < 0)
            h->flags |= HTTP_F_BODY_TO_EOF;
    }

    /* 1 tells llhttp that no body follows, whatever the head says. */
    int skip_body = !req && (h->flags & HTTP_F_NO_BODY);
    p->head = NULL; /* the callee's now, and it may free it at once */
    if (p->h->on_head(p->ud, h) < 0)
        return user_error(p, 0, "stopped");
    return skip_body;
}

static int on_headers_complete(llhttp_t *ll)
{
    http_te_t te = {0};
    int rc = finish_head(parser_of(ll), &te);
    buf_free(&te.others);
    return rc;
}

static int on_body(llhttp_t *ll, const char *at, size_t n)
{
    http_parser_t *p = parser_of(ll);
    if (p->h->on_body != NULL && p->h->on_body(p->ud, at, n) < 0)
        return user_error(p, 0, "stopped");
    return 0;
}

static int on_chunk_header(llhttp_t *ll)
{
    /* The last chunk: stop so the trailer section goes through the
     * validating pass like a head. */
    return ll->content_length == 0 ? HPE_PAUSED : 0;
}

static int on_message_complete(llhttp_t *ll)
{
    http_parser_t *p = parser_of(ll);
    p->ended = 1;
    if (p->h->on_end != NULL && p->h->on_end(p->ud) < 0)
        return user_error(p, 0, "stopped");
    return HPE_PAUSED;
}

static const llhttp_settings_t SETTINGS = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_status = on_status,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_chunk_header = on_chunk_header,
    .on_message_complete = on_message_complete,
};

/* ---- the parser ------------------------------------------------------------ */

static void start_message(http_parser_t *p)
{
    p->scan = SC_MSG_START;
    p->head_bytes = 0;
    p->field_state = 0;
    p->in_trailer = 0;
    p->ended = 0;
    p->started = 0;
    p->line0_known = 0;
    buf_clear(&p->line0);
}

http_parser_t *http_parser_new(http_parse_kind_t kind, const http_limits_t *limits,
                               const http_handler_t *h, void *ud)
{
    http_parser_t *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->kind = kind;
    p->limits = limits;
    p->h = h;
    p->ud = ud;
    llhttp_init(&p->ll, kind == HTTP_PARSE_REQUEST ? HTTP_REQUEST : HTTP_RESPONSE, &SETTINGS);
    p->ll.data = p;
    start_message(p);
    return p;
}

void http_parser_free(http_parser_t *p)
{
    if (p == NULL)
        return;
    http_head_free(p->head);
    buf_free(&p->line0);
    free(p);
}

/* The error llhttp reported, in errord's terms. */
static int fail_llhttp(http_parser_t *p, llhttp_errno_t e)
{
    if (p->failed)
        return -1; /* one of our callbacks said why */
    if (!is_request(p))
        return fail(p, 502, "invalid response from upstream");
    switch (e) {
    case HPE_INVALID_METHOD: {
        /* A well-formed method errord does not know is 501, not 400. */
        size_t i = 0;
        while (i < p->line0.len && HTTP_TCHAR[(unsigned char)p->line0.data[i]])
            i++;
        if (i > 0 && (i == p->line0.len || p->line0.data[i] == ' '))
            return fail(p, 501, "method not implemented");
        return fail(p, 400, "malformed request line");
    }
    case HPE_INVALID_VERSION:
        return fail(p, 505, "HTTP version not supported");
    case HPE_INVALID_CONTENT_LENGTH:
    case HPE_UNEXPECTED_CONTENT_LENGTH:
        return fail(p, 400, "invalid Content-Length");
    case HPE_INVALID_TRANSFER_ENCODING:
        return fail(p, 400, "invalid Transfer-Encoding");
    case HPE_INVALID_CHUNK_SIZE:
    case HPE_STRICT:
        return fail(p, 400, "malformed chunked body");
    case HPE_INVALID_URL:
        return fail(p, 400, "invalid request target");
    default:
        return fail(p, 400, "malformed request");
    }
}

/* HTTP/1.2 and up are read as HTTP/1.1, the highest minor version errord
 * implements (RFC 9110 2.5). The start line was checked: the version is
 * "HTTP/d.d" at the end of a request line, at the start of a status line. */
static void minor_version_as_1_1(http_parser_t *p)
{
    char *v = is_request(p) ? p->line0.data + p->line0.len - 10 : p->line0.data;
    if (v[5] == '1' && v[7] > '1')
        v[7] = '1';
}

ssize_t http_parser_feed(http_parser_t *p, const char *data, size_t n)
{
    size_t off = 0;

    if (p->failed)
        return -1;
    while (off < n && !p->ended) {
        size_t len = n - off;
        const char *at = data + off;
        p->started = 1;
        if (p->scan <= SC_LINE0_CR) {
            /* The start line reaches llhttp only once it is whole and valid,
             * from our copy (without any empty lines before it), so its
             * errors do not depend on how the bytes were split. */
            ssize_t scanned = scan(p, at, len);
            if (scanned < 0)
                return -1;
            off += (size_t)scanned;
            if (p->scan <= SC_LINE0_CR)
                continue;
            if (buf_append(&p->line0, "\r\n", 2) < 0)
                return fail(p, 500, "out of memory");
            minor_version_as_1_1(p);
            at = p->line0.data;
            len = p->line0.len;
        } else {
            if (p->scan != SC_BODY) {
                p->tab_at = -1;
                ssize_t scanned = scan(p, at, len);
                if (scanned < 0)
                    return -1;
                len = (size_t)scanned;
                if (p->tab_at >= 0) {
                    /* the bytes before the tab, then a SP in its place */
                    llhttp_errno_t e = llhttp_execute(&p->ll, at, (size_t)p->tab_at);
                    if (e == HPE_OK)
                        e = llhttp_execute(&p->ll, " ", 1);
                    if (e != HPE_OK)
                        return fail_llhttp(p, e);
                    off += len;
                    continue;
                }
            }
            off += len;
        }
        llhttp_errno_t e = llhttp_execute(&p->ll, at, len);
        if (e == HPE_OK)
            continue;
        if (e != HPE_PAUSED)
            return fail_llhttp(p, e);
        /* Paused inside what was fed: give back the bytes after the pause. */
        off -= len - (size_t)(llhttp_get_error_pos(&p->ll) - at);
        llhttp_resume(&p->ll);
        if (!p->ended) {
            /* paused at the last chunk: the trailer section follows */
            p->in_trailer = 1;
            p->scan = SC_FIELD_START;
            p->head_bytes = 0;
        }
    }
    return (ssize_t)off;
}

int http_parser_finish(http_parser_t *p)
{
    if (p->failed)
        return -1;
    if (p->ended || !p->started)
        return 0;
    llhttp_finish(&p->ll); /* completes a body that runs to EOF */
    if (!p->ended)
        return fail(p, 400, "connection closed mid-message");
    return 0;
}

void http_parser_set_head_request(http_parser_t *p, int is_head)
{
    p->head_request = is_head;
}

void http_parser_resume(http_parser_t *p)
{
    http_head_free(p->head);
    p->head = NULL;
    start_message(p);
}

int http_parser_idle(const http_parser_t *p)
{
    return !p->started && !p->failed;
}

int http_parser_ended(const http_parser_t *p)
{
    return p->ended;
}

const http_error_t *http_parser_error(const http_parser_t *p)
{
    return &p->err;
}

const char *http_parser_version(void)
{
#define STR2(x) #x
#define STR(x) STR2(x)
    return STR(LLHTTP_VERSION_MAJOR) "." STR(LLHTTP_VERSION_MINOR) "." STR(LLHTTP_VERSION_PATCH);
#undef STR
#undef STR2
}
