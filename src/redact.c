/* redact: secret headers and their values out of text (see redact.h). */
#include "redact.h"

#include <string.h>
#include <strings.h>

int redact_header_secret(const policy_settings_t *s, const char *name, size_t n)
{
    static const struct {
        const char *name;
        size_t len;
    } secret[] = {{"authorization", 13}, {"proxy-authorization", 19}, {"cookie", 6},
                  {"set-cookie", 10},    {"x-api-key", 9}};
    for (size_t i = 0; i < sizeof secret / sizeof *secret; i++)
        if (n == secret[i].len && strncasecmp(name, secret[i].name, n) == 0)
            return 1;
    for (size_t i = 0; s != NULL && i < s->n_secret_headers; i++)
        if (strlen(s->secret_headers[i]) == n && strncasecmp(name, s->secret_headers[i], n) == 0)
            return 1;
    return 0;
}

/* The text being scrubbed: the caller's until the first secret is found,
 * then `out`, rewritten once per secret found. */
typedef struct {
    const char *text;
    size_t len;
    int json;
    buf_t *out;
    int changed;
} scrub_t;

/* Replaces every occurrence of `pat` (`n` bytes, n > 0), left to right. */
static void replace_all(scrub_t *sc, const char *pat, size_t n)
{
    const char *t = sc->changed ? sc->out->data : sc->text;
    size_t len = sc->changed ? sc->out->len : sc->len;
    const char *hit = len >= n ? memmem(t, len, pat, n) : NULL;
    if (hit == NULL)
        return;
    buf_t res = BUF_INIT;
    size_t i = 0;
    do {
        buf_append(&res, t + i, (size_t)(hit - (t + i)));
        buf_lit(&res, "[redacted]");
        i = (size_t)(hit - t) + n;
    } while (len - i >= n && (hit = memmem(t + i, len - i, pat, n)) != NULL);
    buf_append(&res, t + i, len - i);
    if (sc->changed)
        buf_free(sc->out);
    *sc->out = res;
    sc->changed = 1;
}

/* Takes the secret `v` (`n` bytes of a header value; its first NUL ends it)
 * out of the text, in the form the text writes it. */
static void scrub_secret(scrub_t *sc, const char *v, size_t n)
{
    n = strnlen(v, n);
    if (n == 0)
        return;
    int escaped = 0;
    for (size_t i = 0; sc->json && i < n && !escaped; i++)
        escaped = v[i] == '"' || v[i] == '\\' || v[i] == '\t';
    if (!escaped) {
        replace_all(sc, v, n);
        return;
    }
    buf_t pat = BUF_INIT;
    for (size_t i = 0; i < n; i++) {
        if (v[i] == '"' || v[i] == '\\')
            buf_lit(&pat, "\\");
        if (v[i] == '\t')
            buf_lit(&pat, "\\t");
        else
            buf_append(&pat, v + i, 1);
    }
    if (pat.len > 0)
        replace_all(sc, pat.data, pat.len);
    buf_free(&pat);
}

int redact_scrub(const policy_settings_t *s, const policy_input_t *in, const char *text, size_t n,
                 int json, buf_t *out)
{
    if (in == NULL)
        return 0;
    scrub_t sc = {text, n, json, out, 0};
    const http_head_t *heads[2] = {in->req, in->res};
    for (int h = 0; h < 2; h++) {
        for (size_t i = 0; heads[h] != NULL && i < heads[h]->n_headers; i++) {
            const http_header_t *f = &heads[h]->headers[i];
            if (!redact_header_secret(s, f->name, f->name_len) || f->value_len < REDACT_SECRET_MIN)
                continue;
            scrub_secret(&sc, f->value, f->value_len);
            const char *sp = memchr(f->value, ' ', f->value_len);
            size_t rest = sp != NULL ? f->value_len - (size_t)(sp + 1 - f->value) : 0;
            if (rest >= REDACT_SECRET_MIN)
                scrub_secret(&sc, sp + 1, rest);
        }
    }
    return sc.changed;
}
