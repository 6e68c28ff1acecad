/* access: the access record, written and read (see access.h). */
#include "access.h"

#include "log.h"
#include "redact.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* What a replay gets of a response body at most. */
#define SEEN_BODY_MAX 4096

/* Appends the headers of `h` as a JSON object, names in lower case, the
 * values of secret headers (SPEC §6) redacted. */
static void json_headers(const policy_settings_t *s, buf_t *b, const http_head_t *h)
{
    buf_lit(b, "{");
    for (size_t i = 0; i < h->n_headers; i++) {
        const http_header_t *f = &h->headers[i];
        char name[128];
        size_t n = f->name_len < sizeof name ? f->name_len : sizeof name;
        for (size_t j = 0; j < n; j++)
            name[j] = (char)tolower((unsigned char)f->name[j]);
        buf_puts(b, i ? ",\"" : "\"");
        buf_json_escape(b, name, n);
        buf_lit(b, "\":\"");
        if (redact_header_secret(s, name, n))
            buf_lit(b, "[redacted]");
        else
            buf_json_escape(b, f->value, f->value_len);
        buf_lit(b, "\"");
    }
    buf_lit(b, "}");
}

void access_note_seen(buf_t *seen, access_attempt_t *a, const policy_settings_t *s,
                      const char *message, const http_head_t *res, const buf_t *body,
                      int body_over)
{
    if (a == NULL)
        return;
    size_t start = seen->len;
    if (message != NULL) {
        buf_lit(seen, ",\"message\":\"");
        buf_json_escape(seen, message, strlen(message));
        buf_lit(seen, "\"");
    } else {
        buf_lit(seen, ",\"headers\":");
        json_headers(s, seen, res);
        if (body_over) {
            buf_lit(seen, ",\"body_over_limit\":true");
        } else {
            size_t n = body->len < SEEN_BODY_MAX ? body->len : SEEN_BODY_MAX;
            buf_lit(seen, ",\"body\":\"");
            buf_json_escape(seen, body->data ? body->data : "", n);
            buf_lit(seen, "\"");
            if (n < body->len)
                buf_lit(seen, ",\"body_truncated\":true");
        }
    }
    a->seen_off = (uint32_t)start;
    a->seen_len = (uint32_t)(seen->len - start);
}

/* `,"key":"word"` for a word that needs no escaping, and `,"key":n`; `key`
 * is a literal, so each is two or three appends of known length. */
#define PUT_WORD(b, key, word) \
    (buf_lit(b, ",\"" key "\":\""), buf_puts(b, word), buf_lit(b, "\""))
#define PUT_NUMBER(b, key, v) (buf_lit(b, ",\"" key "\":"), buf_put_u64(b, v))

/* The attempts array of the record. */
static void put_attempts(buf_t *b, const access_record_t *r)
{
    buf_lit(b, "[");
    for (int i = 0; i < r->n_attempts; i++) {
        const access_attempt_t *at = &r->attempts[i];
        buf_puts(b, i ? ",{\"attempt\":" : "{\"attempt\":");
        buf_put_u64(b, (uint64_t)i + 1);
        if (at->status)
            PUT_NUMBER(b, "status", (uint64_t)at->status);
        else
            PUT_WORD(b, "error", at->error ? at->error : "aborted");
        buf_lit(b, ",\"duration_ms\":");
        buf_put_ms(b, at->ns);
        PUT_WORD(b, "verdict", verdict_name(at->verdict));
        if (at->reason[0] != '\0')
            PUT_WORD(b, "reason", at->reason);
        if (at->refused != NULL)
            PUT_WORD(b, "refused", at->refused);
        if (at->failure != NULL)
            PUT_WORD(b, "policy_error", at->failure);
        if (at->held_ms > 0)
            PUT_NUMBER(b, "held_ms", at->held_ms);
        if (at->delay_ms >= 0)
            PUT_NUMBER(b, "delay_ms", (uint64_t)at->delay_ms);
        if (at->seen_len > 0)
            buf_append(b, r->seen->data + at->seen_off, at->seen_len);
        buf_lit(b, "}");
    }
    buf_lit(b, "]");
}

void access_write(const access_record_t *r)
{
    log_record_t *rec = log_begin(LOG_INFO, NULL);
    if (rec == NULL)
        return;
    log_kraw(rec, LOG_KEY("type"), "\"access\"", 8);
    log_kstr(rec, LOG_KEY("request_id"), r->request_id, strlen(r->request_id));
    log_kstr(rec, LOG_KEY("client"), r->client, strlen(r->client));
    log_kstr(rec, LOG_KEY("method"), r->req->method_name, strlen(r->req->method_name));
    log_kstr(rec, LOG_KEY("path"), r->req->target, r->req->target_len);
    log_kraw(rec, LOG_KEY("version"), r->req->version == 10 ? "\"HTTP/1.0\"" : "\"HTTP/1.1\"", 10);
    log_kint(rec, LOG_KEY("status"), r->status);
    if (r->upstream_status >= 0)
        log_kint(rec, LOG_KEY("upstream_status"), r->upstream_status);
    else
        log_kraw(rec, LOG_KEY("upstream_status"), "null", 4);
    log_kint(rec, LOG_KEY("bytes_in"), (int64_t)r->bytes_in);
    log_kint(rec, LOG_KEY("bytes_out"), (int64_t)r->bytes_out);
    log_kms(rec, LOG_KEY("duration_ms"), r->duration_ns);

    buf_t b = BUF_INIT;
    put_attempts(&b, r);
    log_kraw(rec, LOG_KEY("attempts"), b.data, b.len);
    log_kint(rec, LOG_KEY("retries"), r->retries);
    log_kint(rec, LOG_KEY("waited_ms"), (int64_t)r->waited_ms);
    if (r->policy_sha256 != NULL)
        log_kstr(rec, LOG_KEY("policy_sha256"), r->policy_sha256, strlen(r->policy_sha256));
    if (r->seen->len > 0) { /* a handler ran: the request it saw, for replays */
        buf_clear(&b);
        json_headers(r->settings, &b, r->req);
        log_kraw(rec, LOG_KEY("req_headers"), b.data, b.len);
    }
    buf_free(&b);
    if (r->error != NULL)
        log_str(rec, "error", r->error);
    log_end(rec);
}

/* ---- reading records back --------------------------------------------------------- */

const char *access_str(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

cJSON *access_parse(const char *line, size_t len, int *own)
{
    cJSON *rec = cJSON_ParseWithLength(line, len);
    const char *type = access_str(rec, "type");
    *own = 0;
    if (type != NULL && strcmp(type, "access") == 0 &&
        cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(rec, "attempts")))
        return rec;
    *own = (type == NULL || strcmp(type, "access") != 0) && access_str(rec, "time") != NULL &&
           access_str(rec, "level") != NULL;
    cJSON_Delete(rec);
    return NULL;
}

int64_t access_time_ms(const cJSON *rec)
{
    /* "2026-11-25T17:59:39.365Z", as log.c writes it */
    const char *s = access_str(rec, "time");
    struct tm tm = {0};
    int ms = 0;
    if (s == NULL || sscanf(s, "%d-%d-%dT%d:%d:%d.%dZ", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
                            &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &ms) < 6)
        return 0;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    return (int64_t)timegm(&tm) * 1000 + ms;
}

int access_attempt_asked(const cJSON *a)
{
    if (cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(a, "status")))
        return 1;
    const char *k = access_str(a, "error");
    return k != NULL && (strcmp(k, "connect") == 0 || strcmp(k, "timeout") == 0 ||
                         strcmp(k, "reset") == 0 || strcmp(k, "protocol") == 0);
}

char *access_attempt_case(const cJSON *rec, const cJSON *a, int number)
{
    cJSON *c = cJSON_CreateObject();
    cJSON *req = cJSON_AddObjectToObject(c, "req");
    const char *method = access_str(rec, "method"), *path = access_str(rec, "path");
    cJSON_AddStringToObject(req, "method", method ? method : "GET");
    cJSON_AddStringToObject(req, "path", path ? path : "/");
    const cJSON *rh = cJSON_GetObjectItemCaseSensitive(rec, "req_headers");
    if (cJSON_IsObject(rh))
        cJSON_AddItemToObject(req, "headers", cJSON_Duplicate(rh, 1));
    const cJSON *status = cJSON_GetObjectItemCaseSensitive(a, "status");
    if (cJSON_IsNumber(status)) {
        cJSON *res = cJSON_AddObjectToObject(c, "res");
        cJSON_AddNumberToObject(res, "status", status->valuedouble);
        const cJSON *h = cJSON_GetObjectItemCaseSensitive(a, "headers");
        if (cJSON_IsObject(h))
            cJSON_AddItemToObject(res, "headers", cJSON_Duplicate(h, 1));
        const char *body = access_str(a, "body");
        if (body != NULL)
            cJSON_AddStringToObject(res, "body", body);
    } else {
        cJSON *err = cJSON_AddObjectToObject(c, "err");
        cJSON_AddStringToObject(err, "kind", access_str(a, "error"));
        const char *msg = access_str(a, "message");
        cJSON_AddStringToObject(err, "message", msg ? msg : "");
    }
    cJSON_AddNumberToObject(c, "attempt", number);
    char *text = cJSON_PrintUnformatted(c);
    cJSON_Delete(c);
    return text;
}
