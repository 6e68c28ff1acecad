/* policy_source: where in a policy's source a key is, and the problems of
 * a policy being loaded, noted at their line (see policy_internal.h). */
#include "policy_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int ident_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static size_t skip_blanks(const char *s, size_t i, size_t n)
{
    while (i < n && (s[i] == ' ' || s[i] == '\t'))
        i++;
    return i;
}

/* Whether an assignment ('=' but not '==') starts at s[i], after blanks. */
static int assigns(const char *s, size_t i, size_t n)
{
    i = skip_blanks(s, i, n);
    return i < n && s[i] == '=' && (i + 1 == n || s[i + 1] != '=');
}

/* Whether the word before s[i] is `local` (a variable, not a key). */
static int after_local(const char *s, size_t i)
{
    while (i > 0 && (s[i - 1] == ' ' || s[i - 1] == '\t'))
        i--;
    return i >= 5 && memcmp(s + i - 5, "local", 5) == 0 && (i == 5 || !ident_char(s[i - 6]));
}

/* Whether the source names `key` as a table key at s[i]: `key =`,
 * `t.key =`, `["key"] =`, `['key'] =`, or `[key] =` (a number). Returns
 * the index past the '=', or 0. */
static size_t key_at(const char *s, size_t i, size_t n, const char *key, size_t klen)
{
    size_t j;
    if (s[i] == '[') {
        j = skip_blanks(s, i + 1, n);
        char q = j < n && (s[j] == '"' || s[j] == '\'') ? s[j] : 0;
        j += q != 0;
        if (j + klen > n || memcmp(s + j, key, klen) != 0)
            return 0;
        j += klen;
        if (q != 0 && (j >= n || s[j++] != q))
            return 0;
        j = skip_blanks(s, j, n);
        if (j >= n || s[j] != ']')
            return 0;
        j++;
    } else {
        if (i + klen > n || memcmp(s + i, key, klen) != 0 || (i > 0 && ident_char(s[i - 1])) ||
            (i + klen < n && ident_char(s[i + klen])) || after_local(s, i))
            return 0;
        j = i + klen;
    }
    if (!assigns(s, j, n))
        return 0;
    return skip_blanks(s, j, n) + 1;
}

/* Whether a test named `name` starts at s[i]: `name = "<name>"` (or with
 * single quotes). */
static int test_name_at(const char *s, size_t i, size_t n, const char *name, size_t len)
{
    size_t j = key_at(s, i, n, "name", 4);
    if (j == 0)
        return 0;
    j = skip_blanks(s, j, n);
    if (j >= n || (s[j] != '"' && s[j] != '\''))
        return 0;
    char q = s[j++];
    return j + len < n && memcmp(s + j, name, len) == 0 && s[j + len] == q;
}

int policy_source_line(const policy_t *p, const char *key, int nth, int test)
{
    const char *s = p->src;
    size_t n = p->src_len, klen = strlen(key);
    int line = 1;
    if (s == NULL || klen == 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\n') {
            line++;
        } else if (s[i] == '-' && i + 1 < n && s[i + 1] == '-') {
            int block = i + 3 < n && s[i + 2] == '[' && s[i + 3] == '[';
            while (i + 1 < n && (block ? !(s[i] == ']' && s[i + 1] == ']') : s[i + 1] != '\n')) {
                line += s[i] == '\n';
                i++;
            }
        } else if (line >= p->anchor &&
                   (test ? test_name_at(s, i, n, key, klen) : key_at(s, i, n, key, klen) > 0)) {
            if (--nth <= 0)
                return line;
        }
    }
    return 0;
}

int policy_anchor_at(policy_t *p, const char *key)
{
    int was = p->anchor;
    int line = policy_source_line(p, key, 1, 0);
    if (line > 0)
        p->anchor = line;
    return was;
}

void policy_problem(policy_t *p, int line, int warning, const char *fmt, ...)
{
    policy_report_t *r = p->report;
    buf_t *b = warning ? &r->warnings : &r->errors;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (line > 0)
        buf_printf(b, "%s:%d: %s\n", p->path, line, msg);
    else
        buf_printf(b, "%s: %s\n", p->path, msg);
    if (warning)
        r->n_warnings++;
    else
        r->n_errors++;
}
