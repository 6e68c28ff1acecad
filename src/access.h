/* access: the access record (SPEC §6), one JSON line per client request,
 * written when the request ends and read back by `errord replay`, which
 * asks a policy about what the record says its handlers saw.
 *
 * A request's attempts are kept as a ledger of access_attempt_t lines; what
 * a handler was shown (the response's headers and body, or the failure's
 * message) is kept as JSON text in one buffer per request, so a replay can
 * ask another policy the same question. */
#ifndef ERRORD_ACCESS_H
#define ERRORD_ACCESS_H

#include "buf.h"
#include "http.h"
#include "settings.h"
#include "verdict.h"

#include <cJSON.h>

#include <stddef.h>
#include <stdint.h>

/* One line of the attempt ledger. */
typedef struct {
    int status;             /* upstream status, or 0 */
    const char *error;      /* error kind when there is no status */
    verdict_kind_t verdict; /* what decided the attempt's fate */
    const char *refused;    /* why errord refused the policy's retry, or NULL */
    const char *failure;    /* how the policy handler failed, or NULL */
    char reason[VERDICT_REASON_MAX + 1];
    uint64_t ns;
    uint64_t held_ms;  /* held by a cooldown before it started */
    int64_t delay_ms;  /* waited after it before the next attempt, -1: none */
    uint32_t seen_off; /* what its handler saw, JSON in the request's `seen` */
    uint32_t seen_len;
} access_attempt_t;

/* What the record of one client request says. Nothing is owned. */
typedef struct {
    const char *request_id;
    const char *client;  /* the client's address */
    const http_head_t *req;
    int status;          /* what the client got (499: it left first) */
    int upstream_status; /* the last response's, or -1 when none came */
    uint64_t bytes_in;   /* request body bytes */
    uint64_t bytes_out;  /* response body bytes */
    uint64_t duration_ns;
    const access_attempt_t *attempts;
    int n_attempts;
    const buf_t *seen;   /* what handlers saw (access_note_seen) */
    int retries;
    uint64_t waited_ms;
    const char *policy_sha256;         /* NULL without a policy */
    const policy_settings_t *settings; /* which headers are secret; NULL: the built-in ones */
    const char *error;                 /* why the request ended badly, or NULL */
} access_record_t;

/* Writes the record to the log (at info level). */
void access_write(const access_record_t *r);

/* Appends to `seen` what the handler of ledger line `a` was shown, and
 * points `a` at it: the failure's `message` when not NULL, else the
 * response's headers (secret values redacted by `s`) and up to 4 KiB of
 * `body`, or that the body was over the handler's limit (`body_over`). */
void access_note_seen(buf_t *seen, access_attempt_t *a, const policy_settings_t *s,
                      const char *message, const http_head_t *res, const buf_t *body,
                      int body_over);

/* Parses one line of a log. Returns the access record it holds (the
 * caller deletes it), or NULL; then *own says whether the line was
 * another of errord's records (its messages, a policy's log and alert
 * records), which share the access log's stdout. */
cJSON *access_parse(const char *line, size_t len, int *own);

/* When the record was written, wall-clock ms since the epoch; 0 when it
 * does not say. */
int64_t access_time_ms(const cJSON *rec);

/* Whether ledger line `a` of a record is one a policy was asked about (a
 * response, or a failure an error handler gets), rather than an attempt
 * that was aborted. */
int access_attempt_asked(const cJSON *a);

/* The test case, in the form of p.tests, that asks a policy what the
 * handler of attempt `a` (1-based `number`) of record `rec` was asked.
 * Returns JSON text (cJSON_free() it), or NULL when out of memory. */
char *access_attempt_case(const cJSON *rec, const cJSON *a, int number);

/* The string member `key` of `o`, or NULL. */
const char *access_str(const cJSON *o, const char *key);

#endif
