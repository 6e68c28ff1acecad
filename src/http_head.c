/* http_head: message heads as plain structs, apart from parsing them (see
 * http.h): the token table, lists, lookups, Retry-After, reason phrases, and
 * heads built by hand. */
#include "http.h"

#include "clock.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* tchar (RFC 9110 5.6.2) */
const unsigned char HTTP_TCHAR[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1,
    ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1,
    ['8'] = 1, ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1,
    ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1,
    ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1,
    ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1,
    ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1,
    ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1,
    ['y'] = 1, ['z'] = 1,
};

int http_is_token(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!HTTP_TCHAR[(unsigned char)s[i]])
            return 0;
    return n > 0;
}

static int is_ows(char c)
{
    return c == ' ' || c == '\t';
}

static int name_is(const http_header_t *f, const char *name, size_t n)
{
    return f->name_len == n && strncasecmp(f->name, name, n) == 0;
}

int http_list_each(const char *s, size_t n, int (*fn)(void *ctx, const char *s, size_t n),
                   void *ctx)
{
    size_t i = 0;
    while (i < n) {
        size_t start = i;
        while (i < n && s[i] != ',')
            i++;
        size_t a = start, b = i;
        while (a < b && is_ows(s[a]))
            a++;
        while (b > a && is_ows(s[b - 1]))
            b--;
        if (b > a) {
            int rc = fn(ctx, s + a, b - a);
            if (rc != 0)
                return rc;
        }
        i++;
    }
    return 0;
}

struct token_match {
    const char *token;
    size_t len;
};

static int match_token(void *ctx, const char *s, size_t n)
{
    struct token_match *m = ctx;
    return n == m->len && strncasecmp(s, m->token, n) == 0;
}

int http_list_has(const char *value, size_t n, const char *token)
{
    struct token_match m = {token, strlen(token)};
    return http_list_each(value, n, match_token, &m);
}

static int te_coding(void *ctx, const char *s, size_t n)
{
    static const char *const known[] = {"gzip", "x-gzip", "deflate", "compress", "x-compress"};
    http_te_t *te = ctx;
    size_t tok = 0;
    while (tok < n && HTTP_TCHAR[(unsigned char)s[tok]])
        tok++;
    if (tok == 0) { /* not even a token ("chunked" in quotes...): unknown */
        te->unknown = 1;
        return 1;
    }
    if (tok == 7 && strncasecmp(s, "chunked", 7) == 0) {
        if (tok != n) { /* chunked takes no parameters */
            te->bad = 1;
            return 1;
        }
        te->chunked_seen = 1;
        te->chunked_count++;
        return 0;
    }
    if (te->chunked_seen) { /* a coding after chunked */
        te->bad = 1;
        return 1;
    }
    for (size_t k = 0; k < sizeof known / sizeof *known; k++) {
        if (strlen(known[k]) == tok && strncasecmp(s, known[k], tok) == 0) {
            if ((te->others.len > 0 && buf_append(&te->others, ", ", 2) < 0) ||
                buf_append(&te->others, s, n) < 0)
                te->bad = 1;
            return 0;
        }
    }
    te->unknown = 1;
    return 1;
}

int http_te_read(http_te_t *te, const char *value, size_t n)
{
    return http_list_each(value, n, te_coding, te);
}

int http_valid_host(const char *s, size_t n)
{
    static const char ok[] = "-._~!$&'()*+,;=:[]%";
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              (c != 0 && strchr(ok, c) != NULL)))
            return 0;
    }
    return 1;
}

void http_head_free(http_head_t *h)
{
    if (h == NULL)
        return;
    free(h->codings_owned);
    buf_free(&h->arena);
    free(h->headers);
    free(h);
}

http_head_t *http_head_new(const char *method, const char *target, int status, size_t n_headers)
{
    static const struct {
        const char *name;
        http_method_t m;
    } methods[] = {{"GET", HTTP_M_GET},         {"HEAD", HTTP_M_HEAD},     {"POST", HTTP_M_POST},
                   {"PUT", HTTP_M_PUT},         {"DELETE", HTTP_M_DELETE}, {"OPTIONS", HTTP_M_OPTIONS},
                   {"PATCH", HTTP_M_PATCH},     {"TRACE", HTTP_M_TRACE},   {"CONNECT", HTTP_M_CONNECT}};
    http_head_t *h = calloc(1, sizeof *h);
    if (h == NULL)
        return NULL;
    h->version = 11;
    h->content_length = -1;
    h->method_name = h->target = h->reason = "";
    h->headers = calloc(n_headers + 1, sizeof *h->headers);
    h->cap_headers = n_headers;
    if (h->headers == NULL)
        goto fail;
    if (method == NULL) {
        h->status = status;
        return h;
    }
    /* The arena holds "method\0target\0", then the fields. */
    h->target_len = strlen(target);
    if (buf_append(&h->arena, method, strlen(method) + 1) < 0 ||
        buf_append(&h->arena, target, h->target_len + 1) < 0)
        goto fail;
    h->method_name = h->arena.data;
    h->target = h->arena.data + strlen(method) + 1;
    for (size_t i = 0; i < sizeof methods / sizeof *methods; i++)
        if (strcmp(method, methods[i].name) == 0)
            h->method = methods[i].m;
    return h;

fail:
    http_head_free(h);
    return NULL;
}

int http_head_add(http_head_t *h, const char *name, size_t name_len, const char *value,
                  size_t value_len)
{
    if (h->n_headers >= h->cap_headers)
        return -1;
    const char *old = h->arena.data;
    int req = h->arena.len > 0 && h->method_name == old;
    http_header_t *f = &h->headers[h->n_headers];
    f->name_off = (uint32_t)h->arena.len;
    f->name_len = (uint32_t)name_len;
    int rc = buf_append(&h->arena, name, name_len);
    f->value_off = (uint32_t)h->arena.len;
    f->value_len = (uint32_t)value_len;
    if (rc == 0)
        rc = buf_append(&h->arena, value, value_len);
    if (rc == 0)
        rc = buf_append(&h->arena, "", 1);
    const char *base = h->arena.data;
    if (base != old) { /* appending moved the arena: every pointer into it too */
        if (req) {
            h->method_name = base;
            h->target = base + strlen(base) + 1;
        }
        for (size_t i = 0; i < h->n_headers; i++) {
            h->headers[i].name = base + h->headers[i].name_off;
            h->headers[i].value = base + h->headers[i].value_off;
        }
    }
    if (rc < 0)
        return -1;
    f->name = base + f->name_off;
    f->value = base + f->value_off;
    h->n_headers++;
    return 0;
}

const http_header_t *http_head_find(const http_head_t *h, const char *name)
{
    size_t n = strlen(name);
    for (size_t i = 0; i < h->n_headers; i++)
        if (name_is(&h->headers[i], name, n))
            return &h->headers[i];
    return NULL;
}

int64_t http_retry_after_ms(const http_head_t *res, int64_t now_ms)
{
    const http_header_t *h = http_head_find(res, "retry-after");
    if (h == NULL || h->value_len == 0)
        return -1;
    int64_t secs = 0;
    uint32_t i = 0;
    while (i < h->value_len && h->value[i] >= '0' && h->value[i] <= '9' && secs < 100000000)
        secs = secs * 10 + (h->value[i++] - '0');
    if (i == h->value_len)
        return secs * 1000;
    time_t t;
    if (clock_parse_http_date(h->value, h->value_len, &t) < 0)
        return -1;
    int64_t delta = (int64_t)t * 1000 - now_ms;
    return delta > 0 ? delta : 0;
}

int http_method_idempotent(http_method_t m)
{
    return m == HTTP_M_GET || m == HTTP_M_HEAD || m == HTTP_M_OPTIONS || m == HTTP_M_PUT ||
           m == HTTP_M_DELETE || m == HTTP_M_TRACE;
}

const char *http_reason(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
}
