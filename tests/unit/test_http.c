/* http: the request cases of tests/cases/requests.txt through the request
 * parser (whole, and one byte per feed), and the response side, list and
 * hop-by-hop rules by hand. The case file format is described in its header;
 * tests/integration/cases.py reads the same file. */
#include "buf.h"
#include "http.h"
#include "test.h"

#include <errno.h>
#include <stdlib.h>
#include <strings.h>

#define CASES_FILE "tests/cases/requests.txt"
#define MAX_HEADS 8

/* The limits the case file assumes: errord's defaults. */
static const http_limits_t LIMITS = {8192, 65536};

/* ---- the case file ------------------------------------------------------- */

typedef struct {
    char name[80];
    int line;
    int expect; /* 0 for ok, else the status */
    char method[32];
    buf_t target;
    buf_t body;
    buf_t data;
} req_case_t;

typedef struct {
    req_case_t *v;
    size_t n;
    char error[256];
} case_list_t;

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decodes the escapes of TEXT (see the file header) onto `out`. Returns 0, or
 * -1 when the text is malformed. `nested` forbids \*N{...}. */
static int unescape(const char *s, size_t n, buf_t *out, int nested)
{
    size_t i = 0;
    while (i < n) {
        char c = s[i];
        if (c != '\\') {
            buf_append(out, &c, 1);
            i++;
            continue;
        }
        if (i + 1 >= n)
            return -1;
        char e = s[i + 1];
        char b;
        switch (e) {
        case 'r': b = '\r'; break;
        case 'n': b = '\n'; break;
        case 't': b = '\t'; break;
        case '0': b = '\0'; break;
        case '\\': b = '\\'; break;
        case 'x':
            if (i + 4 > n || hexval(s[i + 2]) < 0 || hexval(s[i + 3]) < 0)
                return -1;
            b = (char)(hexval(s[i + 2]) * 16 + hexval(s[i + 3]));
            buf_append(out, &b, 1);
            i += 4;
            continue;
        case '*': {
            if (nested)
                return -1;
            size_t j = i + 2;
            long count = 0;
            while (j < n && s[j] >= '0' && s[j] <= '9' && count < 10000000)
                count = count * 10 + (s[j++] - '0');
            if (j == i + 2 || j >= n || s[j] != '{')
                return -1;
            size_t start = ++j;
            while (j < n && s[j] != '}')
                j++;
            if (j >= n)
                return -1;
            buf_t once = BUF_INIT;
            if (unescape(s + start, j - start, &once, 1) < 0) {
                buf_free(&once);
                return -1;
            }
            for (long k = 0; k < count; k++)
                buf_append(out, once.data, once.len);
            buf_free(&once);
            i = j + 1;
            continue;
        }
        default:
            return -1;
        }
        buf_append(out, &b, 1);
        i += 2;
    }
    return 0;
}

static void cases_free(case_list_t *l)
{
    for (size_t i = 0; i < l->n; i++) {
        buf_free(&l->v[i].target);
        buf_free(&l->v[i].body);
        buf_free(&l->v[i].data);
    }
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

static int case_done(case_list_t *l, req_case_t *c)
{
    if (c == NULL)
        return 0;
    if (c->expect < 0 || c->data.len == 0 || (c->expect == 0 && c->method[0] == '\0')) {
        snprintf(l->error, sizeof l->error, "case %s (line %d): incomplete", c->name, c->line);
        return -1;
    }
    return 0;
}

#define STARTS(line, lit) (strncmp((line), lit, sizeof lit - 1) == 0)

/* Reads the case file. Returns 0, or -1 with l->error set. */
static int cases_load(const char *path, case_list_t *l)
{
    memset(l, 0, sizeof *l);
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(l->error, sizeof l->error, "%s: %s (run from the repository root)", path,
                 strerror(errno));
        return -1;
    }
    size_t cap = 0;
    req_case_t *cur = NULL;
    char *line = NULL;
    size_t line_cap = 0;
    ssize_t len;
    int no = 0, rc = 0;

    while (rc == 0 && (len = getline(&line, &line_cap, f)) >= 0) {
        no++;
        if (len > 0 && line[len - 1] == '\n')
            line[--len] = '\0';
        if (len > 0 && line[len - 1] == '\r') {
            snprintf(l->error, sizeof l->error, "line %d: CR in the file itself", no);
            rc = -1;
        } else if (len == 0 || line[0] == '#') {
            continue;
        } else if (STARTS(line, "case ")) {
            if ((rc = case_done(l, cur)) < 0)
                break;
            if (l->n == cap) {
                cap = cap ? cap * 2 : 64;
                req_case_t *v = realloc(l->v, cap * sizeof *v);
                if (v == NULL) {
                    snprintf(l->error, sizeof l->error, "out of memory");
                    rc = -1;
                    break;
                }
                l->v = v;
            }
            cur = &l->v[l->n++];
            memset(cur, 0, sizeof *cur);
            cur->expect = -1;
            cur->line = no;
            snprintf(cur->name, sizeof cur->name, "%s", line + 5);
        } else if (cur == NULL) {
            snprintf(l->error, sizeof l->error, "line %d: outside a case", no);
            rc = -1;
        } else if (STARTS(line, "> ")) {
            if (line[len - 1] == ' ' || line[len - 1] == '\t' ||
                unescape(line + 2, (size_t)len - 2, &cur->data, 0) < 0) {
                snprintf(l->error, sizeof l->error, "line %d: malformed bytes", no);
                rc = -1;
            }
        } else if (STARTS(line, "expect ")) {
            cur->expect = strcmp(line + 7, "ok") == 0 ? 0 : atoi(line + 7);
            if (cur->expect != 0 && (cur->expect < 400 || cur->expect > 505)) {
                snprintf(l->error, sizeof l->error, "line %d: bad expect", no);
                rc = -1;
            }
        } else if (STARTS(line, "forward ")) {
            const char *m = line + 8, *sp = strchr(m, ' ');
            if (sp == NULL || (size_t)(sp - m) >= sizeof cur->method ||
                unescape(sp + 1, strlen(sp + 1), &cur->target, 0) < 0) {
                snprintf(l->error, sizeof l->error, "line %d: forward METHOD TARGET", no);
                rc = -1;
            } else {
                memcpy(cur->method, m, (size_t)(sp - m));
                cur->method[sp - m] = '\0';
            }
        } else if (STARTS(line, "body ")) {
            if (unescape(line + 5, (size_t)len - 5, &cur->body, 0) < 0) {
                snprintf(l->error, sizeof l->error, "line %d: malformed body", no);
                rc = -1;
            }
        } else if (STARTS(line, "header ")) {
            /* what the upstream gets: checked by the integration tests */
        } else {
            snprintf(l->error, sizeof l->error, "line %d: unknown line", no);
            rc = -1;
        }
    }
    if (rc == 0)
        rc = case_done(l, cur);
    free(line);
    fclose(f);
    if (rc == 0 && l->n == 0) {
        snprintf(l->error, sizeof l->error, "no cases");
        rc = -1;
    }
    if (rc < 0)
        cases_free(l);
    return rc;
}

/* ---- a recording parser owner ---------------------------------------------- */

typedef struct {
    http_head_t *heads[MAX_HEADS];
    int n_heads;
    buf_t body;
    int ends;
} rec_t;

static int rec_head(void *ud, http_head_t *head)
{
    rec_t *r = ud;
    if (r->n_heads == MAX_HEADS) {
        http_head_free(head);
        return -1;
    }
    r->heads[r->n_heads++] = head;
    return 0;
}

static int rec_body(void *ud, const char *at, size_t n)
{
    rec_t *r = ud;
    return buf_append(&r->body, at, n) < 0 ? -1 : 0;
}

static int rec_end(void *ud)
{
    ((rec_t *)ud)->ends++;
    return 0;
}

static const http_handler_t REC = {rec_head, rec_body, rec_end};

static void rec_free(rec_t *r)
{
    for (int i = 0; i < r->n_heads; i++)
        http_head_free(r->heads[i]);
    buf_free(&r->body);
    memset(r, 0, sizeof *r);
}

/* Feeds `n` bytes, `step` at a time, until an error or the end of a message.
 * Returns the bytes consumed, or -1 on an error. */
static ssize_t feed(http_parser_t *p, const char *data, size_t n, size_t step)
{
    size_t off = 0;
    while (off < n && !http_parser_ended(p)) {
        size_t len = n - off < step ? n - off : step;
        ssize_t used = http_parser_feed(p, data + off, len);
        if (used < 0)
            return -1;
        off += (size_t)used;
        if ((size_t)used < len && !http_parser_ended(p))
            return -2; /* consumed less without ending the message: a contract breach */
    }
    return (ssize_t)off;
}

/* ---- request cases -------------------------------------------------------------- */

static int buf_is(const buf_t *b, const char *s, size_t n)
{
    return b->len == n && (n == 0 || memcmp(b->data, s, n) == 0);
}

/* Runs one case with the given feed size; reports a mismatch and returns 1,
 * or returns 0 when the parser did what the case says. */
static int run_case(const req_case_t *c, size_t step)
{
    const char *how = step == 1 ? "one byte per feed" : "whole";
    rec_t r = {0};
    http_parser_t *p = http_parser_new(HTTP_PARSE_REQUEST, &LIMITS, &REC, &r);
    if (p == NULL) {
        test_fail(__FILE__, __LINE__, "out of memory");
        return 1;
    }
    ssize_t used = feed(p, c->data.data, c->data.len, step);
    const http_error_t *e = http_parser_error(p);
    char got[160];
    int bad = 0;

    if (used == -1)
        snprintf(got, sizeof got, "%d (%s)", e->status, e->message ? e->message : "no message");
    else if (used == -2)
        snprintf(got, sizeof got, "a feed consumed less than given without ending");
    else if (!http_parser_ended(p))
        snprintf(got, sizeof got, "an incomplete message after %zd bytes", used);
    else if ((size_t)used < c->data.len)
        snprintf(got, sizeof got, "ok, with %zu bytes left over for a next request",
                 c->data.len - (size_t)used);
    else if (e->message != NULL)
        snprintf(got, sizeof got, "ok, though the parser recorded %d (%s) and went on",
                 e->status, e->message);
    else
        snprintf(got, sizeof got, "ok");

    if (c->expect != 0) {
        bad = used != -1 || e->status != c->expect || e->message == NULL || r.ends != 0;
    } else if (strcmp(got, "ok") != 0 || r.n_heads != 1 || r.ends != 1) {
        bad = 1;
    } else {
        const http_head_t *h = r.heads[0];
        if (strcmp(h->method_name, c->method) != 0 ||
            !buf_is(&c->target, h->target, h->target_len) ||
            !buf_is(&c->body, r.body.data, r.body.len)) {
            snprintf(got, sizeof got, "ok, but %s %.*s with a %zu-byte body", h->method_name,
                     (int)(h->target_len > 60 ? 60 : h->target_len), h->target, r.body.len);
            bad = 1;
        }
    }
    if (bad) {
        if (c->expect)
            test_fail(CASES_FILE, c->line, "case %s (%s): expected %d, got %s", c->name, how,
                      c->expect, got);
        else
            test_fail(CASES_FILE, c->line, "case %s (%s): expected ok, got %s", c->name, how,
                      got);
    }
    http_parser_free(p);
    rec_free(&r);
    return bad;
}

static void run_cases(size_t step)
{
    case_list_t l;
    if (cases_load(CASES_FILE, &l) < 0) {
        test_fail(__FILE__, __LINE__, "%s: %s", CASES_FILE, l.error);
        return;
    }
    int failed = 0;
    for (size_t i = 0; i < l.n; i++)
        failed += run_case(&l.v[i], step);
    if (failed)
        fprintf(stderr, "  %d of %zu cases failed (%s)\n", failed, l.n,
                step == 1 ? "one byte per feed" : "whole");
    cases_free(&l);
}

TEST(http_request_cases_whole)
{
    run_cases((size_t)-1);
}

TEST(http_request_cases_one_byte_feeds)
{
    run_cases(1);
}

TEST(http_case_file_escapes)
{
    buf_t b = BUF_INIT;
    const char *s = "a\\r\\n\\t\\0\\\\\\x7f\\*3{ab\\r}z";
    ASSERT_EQ(unescape(s, strlen(s), &b, 0), 0);
    ASSERT(b.len == 17 && memcmp(b.data, "a\r\n\t\0\\\x7f" "ab\rab\rab\rz", 17) == 0);
    buf_clear(&b);
    ASSERT_EQ(unescape("\\q", 2, &b, 0), -1);
    ASSERT_EQ(unescape("\\x4", 3, &b, 0), -1);
    ASSERT_EQ(unescape("\\*2{\\*2{a}}", 11, &b, 0), -1);
    buf_free(&b);
}

TEST(http_pipelined_requests_stop_after_each)
{
    const char two[] = "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
                       "GET /b HTTP/1.1\r\nHost: h\r\n\r\n";
    size_t first = sizeof "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc" - 1;
    rec_t r = {0};
    http_parser_t *p = http_parser_new(HTTP_PARSE_REQUEST, &LIMITS, &REC, &r);
    ASSERT_EQ(http_parser_feed(p, two, sizeof two - 1), first);
    ASSERT(http_parser_ended(p));
    ASSERT_EQ(r.n_heads, 1);
    ASSERT_MEM(r.body.data, r.body.len, "abc");
    http_parser_resume(p);
    ASSERT(http_parser_idle(p));
    ASSERT_EQ(http_parser_feed(p, two + first, sizeof two - 1 - first), sizeof two - 1 - first);
    ASSERT_EQ(r.n_heads, 2);
    ASSERT_EQ(r.ends, 2);
    ASSERT_MEM(r.heads[1]->target, r.heads[1]->target_len, "/b");
    http_parser_free(p);
    rec_free(&r);
}

/* ---- requests: heads ------------------------------------------------------------ */

/* Parses one whole request; returns its head (owned by `r`) or NULL. */
static const http_head_t *parse_request(rec_t *r, const char *data)
{
    http_parser_t *p = http_parser_new(HTTP_PARSE_REQUEST, &LIMITS, &REC, r);
    ssize_t used = feed(p, data, strlen(data), (size_t)-1);
    int ok = used == (ssize_t)strlen(data) && http_parser_ended(p) && r->n_heads == 1;
    http_parser_free(p);
    return ok ? r->heads[0] : NULL;
}

static const http_header_t *field(const http_head_t *h, const char *name)
{
    return http_head_find(h, name);
}

TEST(http_hop_by_hop_fields_are_flagged)
{
    rec_t r = {0};
    const http_head_t *h = parse_request(&r, "GET / HTTP/1.1\r\n"
                                             "Host: h\r\n"
                                             "Connection: close, X-Private\r\n"
                                             "connection: x-other\r\n"
                                             "X-Private: 1\r\n"
                                             "X-OTHER: 2\r\n"
                                             "X-Public: 3\r\n"
                                             "Keep-Alive: timeout=5\r\n"
                                             "Proxy-Connection: keep-alive\r\n"
                                             "TE: trailers\r\n"
                                             "Trailer: X-Checksum\r\n"
                                             "Upgrade: websocket\r\n"
                                             "\r\n");
    ASSERT(h != NULL);
    ASSERT(h->flags & HTTP_F_CLOSE);
    const char *hop[] = {"connection", "x-private", "x-other", "keep-alive", "proxy-connection",
                         "te", "trailer", "upgrade"};
    for (size_t i = 0; i < sizeof hop / sizeof *hop; i++) {
        const http_header_t *f = field(h, hop[i]);
        if (f == NULL || !(f->flags & HTTP_HDR_HOP)) {
            test_fail(__FILE__, __LINE__, "%s is not flagged hop-by-hop", hop[i]);
            break;
        }
    }
    ASSERT(field(h, "x-public") != NULL && !(field(h, "x-public")->flags & HTTP_HDR_HOP));
    ASSERT(field(h, "host") != NULL && !(field(h, "host")->flags & HTTP_HDR_HOP));
    /* the second Connection field's names count too */
    for (size_t i = 0; i < h->n_headers; i++)
        if (h->headers[i].name_len == 10 && strncasecmp(h->headers[i].name, "connection", 10) == 0)
            ASSERT(h->headers[i].flags & HTTP_HDR_HOP);
    rec_free(&r);
}

TEST(http_connection_keep_alive_flag)
{
    rec_t r = {0};
    const http_head_t *h = parse_request(&r, "GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
    ASSERT(h != NULL);
    ASSERT_EQ(h->version, 10);
    ASSERT(h->flags & HTTP_F_KEEP_ALIVE);
    ASSERT(!(h->flags & HTTP_F_CLOSE));
    rec_free(&r);
}

TEST(http_absolute_form_becomes_origin_form)
{
    static const struct {
        const char *line, *target, *authority;
    } cases[] = {
        {"GET http://api.example:8080/path?q=1 HTTP/1.1", "/path?q=1", "api.example:8080"},
        {"GET http://host?q HTTP/1.1", "/?q", "host"},
        {"GET http://host HTTP/1.1", "/", "host"},
        {"GET HTTP://Host.Example/x HTTP/1.1", "/x", "Host.Example"},
        {"GET https://[::1]:8443/a/b HTTP/1.1", "/a/b", "[::1]:8443"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char req[256];
        snprintf(req, sizeof req, "%s\r\nHost: h\r\n\r\n", cases[i].line);
        rec_t r = {0};
        const http_head_t *h = parse_request(&r, req);
        if (h == NULL) {
            test_fail(__FILE__, __LINE__, "%s: not parsed", cases[i].line);
        } else if (h->target_len != strlen(cases[i].target) ||
                   memcmp(h->target, cases[i].target, h->target_len) != 0 ||
                   h->authority == NULL || h->authority_len != strlen(cases[i].authority) ||
                   memcmp(h->authority, cases[i].authority, h->authority_len) != 0) {
            test_fail(__FILE__, __LINE__, "%s: target \"%.*s\" authority \"%.*s\"",
                      cases[i].line, (int)h->target_len, h->target,
                      h->authority ? (int)h->authority_len : 6,
                      h->authority ? h->authority : "(null)");
        }
        rec_free(&r);
    }
}

TEST(http_origin_form_has_no_authority)
{
    rec_t r = {0};
    const http_head_t *h = parse_request(&r, "GET /p?q HTTP/1.1\r\nHost: h\r\n\r\n");
    ASSERT(h != NULL);
    ASSERT(h->authority == NULL);
    ASSERT_MEM(h->target, h->target_len, "/p?q");
    ASSERT_EQ(h->method, HTTP_M_GET);
    ASSERT_EQ(h->content_length, -1);
    ASSERT(h->flags & HTTP_F_NO_BODY);
    rec_free(&r);
}

TEST(http_transfer_codings_before_chunked_are_kept)
{
    /* http.h: `codings` holds the codings before "chunked", which errord
     * must pass on with its own chunked framing. */
    rec_t r = {0};
    const http_head_t *h = parse_request(&r, "POST / HTTP/1.1\r\nHost: h\r\n"
                                             "Transfer-Encoding: gzip, chunked\r\n\r\n"
                                             "0\r\n\r\n");
    ASSERT(h != NULL);
    ASSERT(h->flags & HTTP_F_CHUNKED);
    ASSERT(h->codings != NULL);
    ASSERT_MEM(h->codings, h->codings_len, "gzip");
    rec_free(&r);

    h = parse_request(&r, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                          "0\r\n\r\n");
    ASSERT(h != NULL);
    ASSERT(h->codings == NULL);
    rec_free(&r);
}

TEST(http_content_length_value)
{
    rec_t r = {0};
    const http_head_t *h = parse_request(&r, "PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 007\r\n"
                                             "\r\n1234567");
    ASSERT(h != NULL);
    ASSERT_EQ(h->content_length, 7);
    ASSERT(!(h->flags & (HTTP_F_CHUNKED | HTTP_F_NO_BODY)));
    ASSERT_MEM(r.body.data, r.body.len, "1234567");
    rec_free(&r);
}

/* ---- http_list_has ----------------------------------------------------------------------- */

TEST(http_list_has_tokens)
{
    static const struct {
        const char *value, *token;
        int has;
    } cases[] = {
        {"chunked", "chunked", 1},
        {"gzip, chunked", "chunked", 1},
        {"gzip,chunked", "gzip", 1},
        {"Keep-Alive", "keep-alive", 1},
        {"  close  ", "close", 1},
        {",, ,close,,", "close", 1},
        {"a,\tb\t,c", "b", 1},
        {"xchunked", "chunked", 0},
        {"chunkedx", "chunked", 0},
        {"chunk", "chunked", 0},
        {"", "close", 0},
        {" , ", "close", 0},
        {"clo se", "close", 0},
        {"a b, c", "a", 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        int got = http_list_has(cases[i].value, strlen(cases[i].value), cases[i].token) != 0;
        if (got != cases[i].has)
            test_fail(__FILE__, __LINE__, "http_list_has(\"%s\", \"%s\") == %d", cases[i].value,
                      cases[i].token, got);
    }
    /* the length bounds the value: no reading past it */
    ASSERT(!http_list_has("gzip, chunked", 4, "chunked"));
    ASSERT(http_list_has("gzip, chunked", 4, "gzip"));
}

/* ---- responses ---------------------------------------------------------------------------- */

typedef struct {
    rec_t r;
    http_parser_t *p;
    ssize_t used;
} res_run_t;

static void parse_response(res_run_t *x, const char *data, size_t n, size_t step, int head_req)
{
    memset(x, 0, sizeof *x);
    x->p = http_parser_new(HTTP_PARSE_RESPONSE, &LIMITS, &REC, &x->r);
    http_parser_set_head_request(x->p, head_req);
    x->used = feed(x->p, data, n, step);
}

static void res_free(res_run_t *x)
{
    http_parser_free(x->p);
    rec_free(&x->r);
}

#define PARSE_RES(x, lit, head_req) parse_response((x), (lit), sizeof(lit) - 1, (size_t)-1, head_req)

TEST(http_response_status_line)
{
    res_run_t x;
    PARSE_RES(&x, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", 0);
    ASSERT_EQ(x.used, 40);
    ASSERT(http_parser_ended(x.p));
    ASSERT_EQ(x.r.n_heads, 1);
    ASSERT_EQ(x.r.heads[0]->status, 200);
    ASSERT_EQ(x.r.heads[0]->version, 11);
    ASSERT_MEM(x.r.heads[0]->reason, x.r.heads[0]->reason_len, "OK");
    ASSERT_EQ(x.r.heads[0]->content_length, 2);
    ASSERT_MEM(x.r.body.data, x.r.body.len, "hi");
    res_free(&x);

    PARSE_RES(&x, "HTTP/1.0 404 Not Found Here\r\nContent-Length: 0\r\n\r\n", 0);
    ASSERT(http_parser_ended(x.p));
    ASSERT_EQ(x.r.heads[0]->status, 404);
    ASSERT_EQ(x.r.heads[0]->version, 10);
    ASSERT_MEM(x.r.heads[0]->reason, x.r.heads[0]->reason_len, "Not Found Here");
    res_free(&x);
}

TEST(http_response_without_reason_phrase)
{
    const char *ok[] = {"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
                        "HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n"};
    for (size_t i = 0; i < 2; i++) {
        res_run_t x;
        parse_response(&x, ok[i], strlen(ok[i]), (size_t)-1, 0);
        if (x.used != (ssize_t)strlen(ok[i]) || x.r.n_heads != 1 || x.r.heads[0]->status != 200 ||
            x.r.heads[0]->reason_len != 0)
            test_fail(__FILE__, __LINE__, "\"%.14s...\" not taken as a 200 with no reason", ok[i]);
        res_free(&x);
    }
}

TEST(http_response_higher_minor_version_is_read_as_1_1)
{
    /* SPEC §7 rejects status lines that are not HTTP/1.x; RFC 9110 2.5: a
     * higher minor version is processed as the highest one implemented. */
    res_run_t x;
    PARSE_RES(&x, "HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nhi", 0);
    int ok = x.used >= 0 && http_parser_ended(x.p) && x.r.n_heads == 1 &&
             x.r.heads[0]->status == 200 && x.r.heads[0]->version == 11 &&
             x.r.body.len == 2 && memcmp(x.r.body.data, "hi", 2) == 0;
    if (!ok)
        test_fail(__FILE__, __LINE__, "an HTTP/1.2 200 response was not read as HTTP/1.1: %s",
                  x.used < 0 ? http_parser_error(x.p)->message : "wrong head or body");
    res_free(&x);
}

/* Responses errord must answer with 502. */
static const char *const BAD_RESPONSES[] = {
    "HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "http/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "ICY 200 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1  200 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 099 Early\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 600 Late\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 999 Late\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    "HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nContent-Length: 0\n\r\n",
    "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\n",
    "HTTP/1.1 200 OK\nContent-Length: 2\n\nhi",
    "HTTP/1.1 200 OK\rContent-Length: 0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi",
    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
    "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nhi",
    "HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nhi",
    "HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nhi",
    "HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551618\r\n\r\nhi",
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nX-A: a\x01z\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nX-(A): 1\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nhi\r\n0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-T: 1\n\r\n",
    "\x16\x03\x03\x01\x4a\x02\x01\x01\x46\x03\x03",
    "<html><body>hello</body></html>\r\n\r\n",
};

static void run_bad_responses(size_t step)
{
    for (size_t i = 0; i < sizeof BAD_RESPONSES / sizeof *BAD_RESPONSES; i++) {
        res_run_t x;
        parse_response(&x, BAD_RESPONSES[i], strlen(BAD_RESPONSES[i]), step, 0);
        const http_error_t *e = http_parser_error(x.p);
        if (x.used != -1 || e->status != 502)
            test_fail(__FILE__, __LINE__, "bad response %zu (\"%.40s\", %zu-byte feeds): %s",
                      i, BAD_RESPONSES[i], step,
                      x.used == -1 ? "wrong status" : http_parser_ended(x.p)
                                                          ? "accepted"
                                                          : "waits for more");
        res_free(&x);
    }
    /* the one with a NUL, which strlen cannot carry */
    res_run_t x;
    static const char nul[] = "HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 0\r\n\r\n";
    parse_response(&x, nul, sizeof nul - 1, step, 0);
    ASSERT_EQ(x.used, -1);
    ASSERT_EQ(http_parser_error(x.p)->status, 502);
    res_free(&x);
}

TEST(http_response_invalid_is_502)
{
    run_bad_responses((size_t)-1);
}

TEST(http_response_invalid_is_502_one_byte_feeds)
{
    run_bad_responses(1);
}

TEST(http_response_oversized_head_is_502)
{
    buf_t b = BUF_INIT;
    buf_puts(&b, "HTTP/1.1 200 OK\r\nX-Pad: ");
    for (int i = 0; i < 70000; i++)
        buf_append(&b, "p", 1);
    buf_puts(&b, "\r\nContent-Length: 0\r\n\r\n");
    res_run_t x;
    parse_response(&x, b.data, b.len, (size_t)-1, 0);
    ASSERT_EQ(x.used, -1);
    ASSERT_EQ(http_parser_error(x.p)->status, 502);
    res_free(&x);
    buf_free(&b);
}

TEST(http_response_to_head_has_no_body)
{
    res_run_t x;
#define RES_HEAD "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    PARSE_RES(&x, RES_HEAD "HTTP/1.1 204 No Content\r\n\r\n", 1);
    ASSERT_EQ(x.used, sizeof RES_HEAD - 1); /* the bytes after the head are the next response */
    ASSERT(http_parser_ended(x.p));
    ASSERT_EQ(x.r.ends, 1);
    ASSERT_EQ(x.r.heads[0]->content_length, 5);
    ASSERT(x.r.heads[0]->flags & HTTP_F_NO_BODY);
    ASSERT_EQ(x.r.body.len, 0);
    res_free(&x);

    /* the same head, not for HEAD: five body bytes */
    PARSE_RES(&x, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHTTP/", 0);
    ASSERT_EQ(x.used, sizeof RES_HEAD - 1 + 5);
#undef RES_HEAD
    ASSERT_MEM(x.r.body.data, x.r.body.len, "HTTP/");
    res_free(&x);
}

TEST(http_response_204_and_304_have_no_body)
{
    static const char *const heads[] = {
        "HTTP/1.1 204 No Content\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"x\"\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof heads / sizeof *heads; i++) {
        char data[256];
        size_t hn = strlen(heads[i]);
        snprintf(data, sizeof data, "%sHTTP/1.1 200 OK\r\n\r\n", heads[i]);
        res_run_t x;
        parse_response(&x, data, strlen(data), (size_t)-1, 0);
        if (x.used != (ssize_t)hn || !http_parser_ended(x.p) || x.r.body.len != 0 ||
            !(x.r.heads[0]->flags & HTTP_F_NO_BODY))
            test_fail(__FILE__, __LINE__, "\"%.26s\": used %zd of a %zu-byte head, body %zu",
                      heads[i], x.used, hn, x.r.body.len);
        res_free(&x);
    }
}

TEST(http_response_body_until_eof)
{
    res_run_t x;
    PARSE_RES(&x, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome data", 0);
    ASSERT(x.used > 0);
    ASSERT(!http_parser_ended(x.p));
    ASSERT(x.r.heads[0]->flags & HTTP_F_BODY_TO_EOF);
    ASSERT_EQ(http_parser_feed(x.p, " and more", 9), 9);
    ASSERT_EQ(x.r.ends, 0);
    ASSERT_EQ(http_parser_finish(x.p), 0);
    ASSERT(http_parser_ended(x.p));
    ASSERT_EQ(x.r.ends, 1);
    ASSERT_MEM(x.r.body.data, x.r.body.len, "some data and more");
    res_free(&x);

    PARSE_RES(&x, "HTTP/1.0 200 OK\r\n\r\nold", 0);
    ASSERT_EQ(http_parser_finish(x.p), 0);
    ASSERT_EQ(x.r.ends, 1);
    ASSERT_MEM(x.r.body.data, x.r.body.len, "old");
    res_free(&x);
}

TEST(http_response_cut_short_is_an_error)
{
    static const char *const cut[] = {
        "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
        "HTTP/1.1 200 OK\r\nContent-Le",
    };
    for (size_t i = 0; i < sizeof cut / sizeof *cut; i++) {
        res_run_t x;
        parse_response(&x, cut[i], strlen(cut[i]), (size_t)-1, 0);
        if (x.used < 0 || http_parser_finish(x.p) != -1 || x.r.ends != 0)
            test_fail(__FILE__, __LINE__, "cut-short response %zu taken as complete", i);
        res_free(&x);
    }
}

TEST(http_response_chunked_with_trailer)
{
    res_run_t x;
    PARSE_RES(&x, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                  "3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-Checksum: 1\r\n\r\n", 0);
    ASSERT(http_parser_ended(x.p));
    ASSERT(x.r.heads[0]->flags & HTTP_F_CHUNKED);
    ASSERT_EQ(x.r.heads[0]->content_length, -1);
    ASSERT_MEM(x.r.body.data, x.r.body.len, "abcde");
    ASSERT(http_head_find(x.r.heads[0], "x-checksum") == NULL); /* trailers are not fields */
    res_free(&x);
}

TEST(http_response_interim_before_final)
{
    static const char all[] = "HTTP/1.1 100 Continue\r\n\r\n"
                              "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                              "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    static const size_t steps[] = {(size_t)-1, 1, 7};
    for (size_t k = 0; k < sizeof steps / sizeof *steps; k++) {
        rec_t r = {0};
        http_parser_t *p = http_parser_new(HTTP_PARSE_RESPONSE, &LIMITS, &REC, &r);
        size_t off = 0;
        int messages = 0;
        /* each interim response is a message of its own; the owner resumes */
        while (off < sizeof all - 1 && messages < 5) {
            ssize_t used = feed(p, all + off, sizeof all - 1 - off, steps[k]);
            ASSERT(used >= 0);
            ASSERT(http_parser_ended(p));
            off += (size_t)used;
            messages++;
            http_parser_resume(p);
        }
        ASSERT_EQ(messages, 3);
        ASSERT_EQ(r.n_heads, 3);
        ASSERT_EQ(r.heads[0]->status, 100);
        ASSERT_EQ(r.heads[1]->status, 103);
        ASSERT_EQ(r.heads[2]->status, 200);
        ASSERT(r.heads[0]->flags & HTTP_F_NO_BODY);
        ASSERT(r.heads[1]->flags & HTTP_F_NO_BODY);
        ASSERT(!(r.heads[2]->flags & HTTP_F_NO_BODY));
        ASSERT_MEM(r.body.data, r.body.len, "ok");
        http_parser_free(p);
        rec_free(&r);
    }
}

/* A byte a field value or the request line may not hold is found wherever
 * it falls: values and lines are skimmed eight bytes at a time. */
TEST(http_forbidden_bytes_found_at_every_offset)
{
    const char bad[] = {'\r', '\n', '\0', '\x01', '\x7f'};
    for (size_t k = 0; k < sizeof bad; k++) {
        for (size_t at = 0; at < 24; at++) {
            char value[25], line[25], req[256];
            memset(value, 'v', 24);
            value[24] = '\0';
            memcpy(line, value, sizeof value);
            for (int where = 0; where < 2; where++) {
                char *s = where == 0 ? value : line;
                char saved = s[at];
                s[at] = bad[k];
                /* built by hand: the bad byte may be a NUL */
                size_t n = 0;
                n += (size_t)snprintf(req + n, sizeof req - n, "GET /");
                memcpy(req + n, line, 24), n += 24;
                n += (size_t)snprintf(req + n, sizeof req - n, " HTTP/1.1\r\nHost: h\r\nX-V: ");
                memcpy(req + n, value, 24), n += 24;
                n += (size_t)snprintf(req + n, sizeof req - n, "\r\n\r\n");
                s[at] = saved;
                rec_t r = {0};
                http_parser_t *p = http_parser_new(HTTP_PARSE_REQUEST, &LIMITS, &REC, &r);
                ssize_t used = feed(p, req, n, (size_t)-1);
                int status = used == -1 ? http_parser_error(p)->status : 0;
                http_parser_free(p);
                rec_free(&r);
                if (status != 400)
                    test_fail(__FILE__, __LINE__, "byte 0x%02x at %zu of the %s: status %d",
                              (unsigned char)bad[k], at, where ? "target" : "value", status);
            }
        }
    }
}
