/* json: JSON for errord's cold paths (the admin port's answers, the alert
 * sinks' payloads, a log field that holds a list) as cJSON trees. The
 * access log, a hot path, writes its JSON itself (log.c).
 *
 * Building a tree never stops halfway to check for memory: json_add() and
 * json_push() mark a container whose part could not be made, and
 * json_render() then refuses the whole tree. */
#ifndef ERRORD_JSON_H
#define ERRORD_JSON_H

#include "buf.h"

#include <cJSON.h>
#include <stddef.h>
#include <stdint.h>

/* Returns a new JSON string of the `n` bytes at `s` made into text: a byte
 * that is not part of well-formed UTF-8, or is a NUL, becomes U+FFFD. The
 * caller owns the node. NULL when out of memory. */
cJSON *json_text(const char *s, size_t n);

/* Returns json_text() of the C string `s`, or a JSON null when `s` is NULL.
 * The caller owns the node; NULL when out of memory. */
cJSON *json_str(const char *s);

/* Returns a new JSON string of the printf-style text `fmt` makes, made
 * into text like json_text(). The caller owns the node; NULL when out of
 * memory. */
cJSON *json_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Returns a new JSON string of `ms` (Unix epoch milliseconds) in RFC 3339,
 * "2026-11-25T15:33:33.123Z". The caller owns the node; NULL when out of
 * memory. */
cJSON *json_time(int64_t ms);

/* Returns a new JSON array of strings, one for each line of the `n` bytes
 * at `text` (a last line needs no newline). The caller owns the node; NULL
 * when out of memory. */
cJSON *json_lines(const char *text, size_t n);

/* Adds `item` (taken over, NULL allowed) to the object `obj` as `key`
 * (copied, and made into text like json_text()). When `item` is NULL or
 * cannot be added, it is deleted and `obj` is marked so that it does not
 * render. Does nothing but delete `item` when `obj` is NULL. */
void json_add(cJSON *obj, const char *key, cJSON *item);

/* Appends `item` (taken over, NULL allowed) to the array `arr`, like
 * json_add(). */
void json_push(cJSON *arr, cJSON *item);

/* Appends the compact text of the tree `node` to `out` and deletes the tree.
 * Returns 0, or -ENOMEM with `out` unchanged when `node` is NULL, a part of
 * it was marked by json_add() or json_push(), or memory ran out. */
int json_render(cJSON *node, buf_t *out);

#endif
