/* json: cold-path JSON over cJSON (see json.h). */
#include "json.h"

#include "clock.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

cJSON *json_text(const char *s, size_t n)
{
    if (n == 0)
        return cJSON_CreateString("");
    buf_t b = BUF_INIT;
    int rc = buf_reserve(&b, n + 1);
    for (size_t ok = buf_text_span(s, n); rc == 0;) {
        rc = buf_append(&b, s, ok);
        s += ok, n -= ok;
        if (n == 0)
            break;
        if (rc == 0)
            rc = buf_lit(&b, "\xef\xbf\xbd"); /* U+FFFD */
        s++, n--;
        ok = buf_text_span(s, n);
    }
    cJSON *node = NULL;
    if (rc == 0 && buf_reserve(&b, 1) == 0)
        node = cJSON_CreateString(buf_cstr(&b));
    buf_free(&b);
    return node;
}

cJSON *json_str(const char *s)
{
    if (s == NULL)
        return cJSON_CreateNull();
    size_t n = strlen(s);
    return buf_text_span(s, n) == n ? cJSON_CreateString(s) : json_text(s, n);
}

cJSON *json_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *text = NULL;
    int n = vasprintf(&text, fmt, ap);
    va_end(ap);
    if (n < 0)
        return NULL; /* and `text` is undefined */
    cJSON *node = json_text(text, (size_t)n);
    free(text);
    return node;
}

cJSON *json_time(int64_t ms)
{
    char iso[32];
    clock_rfc3339(ms, iso);
    return cJSON_CreateString(iso);
}

cJSON *json_lines(const char *text, size_t n)
{
    cJSON *arr = cJSON_CreateArray();
    for (size_t i = 0; arr != NULL && i < n;) {
        const char *nl = memchr(text + i, '\n', n - i);
        size_t len = nl != NULL ? (size_t)(nl - (text + i)) : n - i;
        json_push(arr, json_text(text + i, len));
        i += len + 1;
    }
    return arr;
}

/* Marks `container` as unfit to render: cJSON refuses to print an invalid
 * node, so json_render() fails for every tree that holds it. */
static void spoil(cJSON *container, cJSON *item)
{
    cJSON_Delete(item);
    if (container != NULL)
        container->type = cJSON_Invalid | (container->type & ~0xff);
}

void json_add(cJSON *obj, const char *key, cJSON *item)
{
    size_t n = strlen(key);
    int is_text = buf_text_span(key, n) == n;
    cJSON *made = is_text ? NULL : json_text(key, n); /* a key must be text too */
    if (made != NULL)
        key = made->valuestring;
    if (obj == NULL || item == NULL || (!is_text && made == NULL) ||
        !cJSON_AddItemToObject(obj, key, item))
        spoil(obj, item);
    cJSON_Delete(made);
}

void json_push(cJSON *arr, cJSON *item)
{
    if (arr == NULL || item == NULL || !cJSON_AddItemToArray(arr, item))
        spoil(arr, item);
}

int json_render(cJSON *node, buf_t *out)
{
    char *text = node != NULL ? cJSON_PrintUnformatted(node) : NULL;
    cJSON_Delete(node);
    int rc = text != NULL ? buf_puts(out, text) : -ENOMEM;
    cJSON_free(text);
    return rc;
}
