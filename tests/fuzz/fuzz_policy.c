/* libFuzzer target: responses errord could hand a policy, through the
 * default policy (lua/default.lua, or $ERRORD_FUZZ_POLICY).
 *
 * The input is read as: two bytes choosing the status (100..599), field
 * lines up to an empty line, then the body. The lines become a real
 * response head through errord's own parser (a head it would refuse never
 * reaches a policy), and the head and body go to the status's handler.
 * Whatever they hold, the handler must give a well-formed verdict or fail
 * open, Retry-After must parse to a delay or to none, and every record the
 * handler had errord write (its log{} and alert{} records, a failure's
 * message) must be one JSON object on one line of valid UTF-8, whatever
 * bytes the response held. Records go to stdout, which is a memory file
 * here, read back after each input. */
#include "http.h"
#include "policy.h"

#include <cJSON.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static policy_t *policy;
static http_head_t *req;
static http_head_t *parsed;

static int keep_head(void *ud, http_head_t *h)
{
    (void)ud;
    if (parsed != NULL)
        http_head_free(parsed);
    parsed = h;
    return 0;
}

static int no_body(void *ud, const char *at, size_t n)
{
    (void)ud, (void)at, (void)n;
    return 0;
}

static int end(void *ud)
{
    (void)ud;
    return 0;
}

static const http_handler_t KEEP = {keep_head, no_body, end};
static const http_limits_t LIMITS = {8192, 65536};

/* Parses `text` as a whole message of `kind`; the head, or NULL. */
static http_head_t *parse(http_parse_kind_t kind, const char *text, size_t n)
{
    parsed = NULL;
    http_parser_t *p = http_parser_new(kind, &LIMITS, &KEEP, NULL);
    if (p == NULL)
        abort();
    ssize_t used = http_parser_feed(p, text, n);
    http_parser_free(p);
    http_head_t *h = parsed;
    parsed = NULL;
    if (used < 0 && h != NULL) {
        http_head_free(h);
        h = NULL;
    }
    return h;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    int fd = memfd_create("fuzz_policy-stdout", 0);
    if (fd < 0 || dup2(fd, STDOUT_FILENO) < 0)
        abort();
    close(fd);
    const char *path = getenv("ERRORD_FUZZ_POLICY");
    char err[512];
    policy = policy_load(path ? path : "lua/default.lua", err, sizeof err);
    if (policy == NULL) {
        fprintf(stderr, "fuzz_policy: %s (run from the repository's root)\n", err);
        exit(1);
    }
    static const char get[] = "GET /v1/items?page=2 HTTP/1.1\r\nHost: api\r\n\r\n";
    req = parse(HTTP_PARSE_REQUEST, get, sizeof get - 1);
    if (req == NULL)
        abort();
    return 0;
}

static void check(const verdict_t *v)
{
    if (v->kind != VERDICT_PASS && v->kind != VERDICT_RETRY && v->kind != VERDICT_RESPOND)
        abort();
    for (const char *c = v->reason; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '_'))
            abort();
    if (v->kind == VERDICT_RESPOND && (v->status < 100 || v->status > 599))
        abort();
    if (v->failure != NULL && v->kind != VERDICT_PASS)
        abort(); /* a failed handler fails open */
}

/* Whether `s` is well-formed UTF-8 (RFC 3629: no overlong forms, no
 * surrogates, nothing past U+10FFFF). Written apart from buf.c's check on
 * purpose: the oracle must not share the code it judges. */
static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len = c < 0x80 ? 1 : c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3
                   : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
        if (len == 0 || i + len > n)
            return 0;
        for (size_t k = 1; k < len; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
        if ((c == 0xE0 && s[i + 1] < 0xA0) || (c == 0xED && s[i + 1] > 0x9F) ||
            (c == 0xF0 && s[i + 1] < 0x90) || (c == 0xF4 && s[i + 1] > 0x8F))
            return 0;
        i += len;
    }
    return 1;
}

/* Reads back what was written to stdout since the last input: whole lines,
 * each a JSON object in valid UTF-8. */
static void check_records(void)
{
    off_t len = lseek(STDOUT_FILENO, 0, SEEK_CUR);
    if (len <= 0)
        return;
    char *text = malloc((size_t)len);
    if (text == NULL || pread(STDOUT_FILENO, text, (size_t)len, 0) != len)
        abort();
    for (char *line = text, *stop = text + len; line < stop;) {
        char *nl = memchr(line, '\n', (size_t)(stop - line));
        if (nl == NULL || !utf8_valid((unsigned char *)line, (size_t)(nl - line)))
            abort();
        cJSON *rec = cJSON_ParseWithLength(line, (size_t)(nl - line));
        if (!cJSON_IsObject(rec))
            abort();
        cJSON_Delete(rec);
        line = nl + 1;
    }
    free(text);
    if (ftruncate(STDOUT_FILENO, 0) < 0 || lseek(STDOUT_FILENO, 0, SEEK_SET) < 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    int status = 100 + (data[0] << 8 | data[1]) % 500;
    const char *s = (const char *)data + 2, *e = s + size - 2;

    /* field lines, up to an empty one; the rest is the body */
    char head[8192];
    int n = snprintf(head, sizeof head, "HTTP/1.1 %d X\r\n", status);
    while (s < e) {
        const char *nl = memchr(s, '\n', (size_t)(e - s));
        size_t len = nl ? (size_t)(nl - s) : (size_t)(e - s);
        if (len == 0) {
            s++;
            break;
        }
        if ((size_t)n + len + 4 >= sizeof head)
            return 0;
        memcpy(head + n, s, len);
        n += (int)len;
        memcpy(head + n, "\r\n", 2);
        n += 2;
        s += len + (nl != NULL);
    }
    memcpy(head + n, "\r\n", 2);
    n += 2;
    http_head_t *res = parse(HTTP_PARSE_RESPONSE, head, (size_t)n);
    if (res == NULL)
        return 0;

    if (http_retry_after_ms(res, 1700000000000) < -1)
        abort();
    if (policy_handles(policy, status)) {
        policy_input_t in = {.req = req, .request_id = "fuzz", .attempt = 1 + data[0] % 3,
                             .res = res, .body = s, .body_len = (size_t)(e - s)};
        verdict_t v = VERDICT_INIT;
        policy_decide(policy, &in, &v);
        check(&v);
        verdict_reset(&v);
        check_records();
    }
    http_head_free(res);
    return 0;
}
