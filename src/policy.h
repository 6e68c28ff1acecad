/* policy: a user's Lua policy, loaded into a sandbox, asked about upstream
 * responses and failures, answering with a plain C verdict.
 *
 * A policy file returns a table whose keys pick the handler: the exact
 * status ([403]), its class (["4xx"]), then `default`; `error` gets failures
 * that have no status. Handlers are resolved once at load time, so a status
 * without one never enters Lua (policy_handles() is a table lookup).
 *
 * A policy_t belongs to one event loop (Lua states are not shared between
 * threads). Requests hold it while they run, so a reload can swap it while
 * they finish under the one they started with. */
#ifndef ERRORD_POLICY_H
#define ERRORD_POLICY_H

#include "buf.h"
#include "http.h"

#include <stddef.h>
#include <stdint.h>

typedef struct policy_s policy_t;

/* One alert sink from settings.alerts. */
typedef enum { SINK_ALERTMANAGER, SINK_WEBHOOK, SINK_SLACK, SINK_PAGERDUTY } sink_kind_t;

typedef struct {
    sink_kind_t kind;
    char *url;
    char *headers;     /* extra header lines for a webhook, "Name: value\r\n", or NULL */
    char *routing_key; /* PagerDuty's integration key */
    int rate_per_min;  /* deliveries a minute at most */
    int queue;         /* deliveries kept waiting at most; the oldest go first */
    uint64_t timeout_ms;
} policy_sink_t;

/* settings = { ... } of the policy file, with errord's defaults. */
typedef struct {
    int attempts;              /* tries per client request, the first included */
    uint64_t backoff_base_ms;  /* exponential backoff with full jitter */
    uint64_t backoff_max_ms;
    size_t body_limit;         /* response bodies up to this are buffered for handlers */
    size_t replay_limit;       /* request bodies up to this are kept for retries */
    uint64_t deadline_ms;      /* bounds a whole client request; 0: none */
    uint64_t try_timeout_ms;   /* an attempt's wait for its response; 0: --first-byte-timeout */
    uint64_t retry_after_max_ms; /* a longer Retry-After is not waited for */
    int budget_on;             /* settings.budget = false turns it off */
    double budget_ratio;       /* retries <= ratio x requests + min_per_s x window */
    double budget_min_per_s;
    policy_sink_t *sinks;      /* settings.alerts */
    size_t n_sinks;
    uint64_t resolve_after_ms; /* an alert quiet this long is resolved */
    uint64_t repeat_ms;        /* firing alerts are sent to Alertmanager again this often */
    char **secret_headers;     /* settings.secret_headers: more names (lower case) */
    size_t n_secret_headers;
    uint64_t handler_instructions; /* per handler call */
    uint64_t handler_time_ms;      /* per handler call */
    size_t memory_limit;           /* the Lua state's memory, bytes */
    uint64_t set_aside_ms;         /* a failing handler's first time set aside */
} policy_settings_t;

/* What a handler is asked about. `res` is NULL for the error handler, which
 * gets `err_kind` ("connect", "timeout", "reset", "protocol") and
 * `err_message` instead. `body` is NULL when the response body is larger than
 * body_limit (it is being streamed). */
typedef struct {
    const http_head_t *req;
    const char *request_id;
    int attempt;          /* 1 for the first try */
    uint64_t elapsed_ns;  /* since the client request arrived */
    const http_head_t *res;
    const char *body;
    size_t body_len;
    uint64_t attempt_ns;  /* since this attempt started */
    const char *err_kind;
    const char *err_message;
} policy_input_t;

typedef enum { VERDICT_PASS, VERDICT_RETRY, VERDICT_RESPOND } verdict_kind_t;

#define VERDICT_REASON_MAX 32

/* What a handler decided. */
typedef struct {
    verdict_kind_t kind;
    /* retry */
    int64_t after_ms; /* -1: not given, use the backoff */
    char reason[VERDICT_REASON_MAX + 1]; /* [a-z0-9_], "" when not given */
    int unsafe;       /* the policy vouches a non-idempotent request may repeat */
    int cooldown;     /* hold every request for the retry's delay too */
    /* respond */
    int status;
    buf_t headers; /* "Name: value\r\n" lines */
    buf_t body;
    int has_content_type;
    /* The handler failed (raised, ran too long, ran out of memory or
     * returned something that is not a verdict): errord passes (fails open)
     * and this says why: "error", "timeout", "memory", "verdict". */
    const char *failure;
} verdict_t;

#define VERDICT_INIT {VERDICT_PASS, -1, "", 0, 0, 0, BUF_INIT, BUF_INIT, 0, NULL}

/* What loading a policy found: `errors` stop it from loading, `warnings`
 * (unknown keys...) do not. One "file:line: message\n" per problem; the
 * line is left out when it cannot be told. */
typedef struct {
    buf_t errors;
    buf_t warnings;
    int n_errors;
    int n_warnings;
} policy_report_t;

#define POLICY_REPORT_INIT {BUF_INIT, BUF_INIT, 0, 0}

void policy_report_free(policy_report_t *r);

/* Loads and checks the policy source `src` (what the file `path` held):
 * runs its chunk, reads its settings and handlers. Every problem found goes
 * to `rep`; returns NULL when there was an error. */
policy_t *policy_load_text(const char *path, const char *src, size_t len, policy_report_t *rep);

/* Reads a policy file (at most 4 MiB). Returns the text (free() it) and its
 * length, or NULL with a message in `err`. */
char *policy_read_file(const char *path, size_t *len, char *err, size_t errlen);

/* Reads and loads a policy file. Returns NULL with the first problem (file
 * and line named) in `err`. Warnings are logged. */
policy_t *policy_load(const char *path, char *err, size_t errlen);

/* One result of policy_run_tests(). */
typedef struct {
    const char *name;
    int line;            /* where the test is in the policy file, 0 when unknown */
    int passed;
    const char *message; /* why it failed */
} policy_test_result_t;

/* Runs the policy's own p.tests (and nothing leaks out of them: logs,
 * alerts and counts stay inside the test). Calls `report` per test when not
 * NULL. Returns the number that failed, or -1 when p.tests is malformed
 * (`err` says why). */
int policy_run_tests(policy_t *p, void (*report)(const policy_test_result_t *r, void *arg),
                     void *arg, char *err, size_t errlen);

/* Runs external test cases: `json` is a JSON array of test tables in the
 * form of p.tests (see README). Same reporting and result as
 * policy_run_tests(); -1 when the JSON is not such an array. */
int policy_run_cases(policy_t *p, const char *json, size_t len,
                     void (*report)(const policy_test_result_t *r, void *arg), void *arg,
                     char *err, size_t errlen);

/* What a handler decided for one case, without expectations. */
typedef struct {
    int handled;          /* a handler ran (else the response passes untouched) */
    verdict_kind_t kind;
    char reason[VERDICT_REASON_MAX + 1];
    int status;           /* respond{}'s */
    char alerts[256];     /* names of the alerts raised, comma-separated */
    int logs;             /* log{} records written */
    char error[256];      /* the handler failed ("" when it did not) */
} policy_outcome_t;

/* Asks the policy about one case (a JSON object in the form of a test,
 * without `expect`) as if it happened at `now_ms` (wall clock): errord.count
 * windows are real and move with that clock; logs and alerts stay inside.
 * Returns 0, or -1 with `err` when the case itself is malformed. */
int policy_try(policy_t *p, const char *json, size_t len, int64_t now_ms, policy_outcome_t *out,
               char *err, size_t errlen);

/* Reference counting: the loader's reference is released with
 * policy_release(); the last release frees. Same thread only. */
void policy_hold(policy_t *p);
void policy_release(policy_t *p);

const policy_settings_t *policy_settings(const policy_t *p);
const char *policy_path(const policy_t *p);

/* Whether the header `name` (`n` bytes, any case) holds a secret whose
 * value errord never writes out (SPEC §6): Authorization,
 * Proxy-Authorization, Cookie, Set-Cookie, X-Api-Key, and the names of
 * settings.secret_headers (`s` may be NULL). */
int policy_header_secret(const policy_settings_t *s, const char *name, size_t n);

/* Secrets shorter than this are not looked for in text: they would match
 * ordinary words. */
#define SECRET_MIN 4

/* Calls `fn` with each secret the call `in` carries: the value of each of
 * its secret headers (request and response) and, for a "Scheme
 * credentials" value, the credentials alone; what errord takes out of
 * anything a policy writes. */
void policy_each_secret(const policy_settings_t *s, const policy_input_t *in,
                        void (*fn)(void *arg, const char *v, size_t n), void *arg);

/* The SHA-256 of the policy's source, 64 hex digits. */
const char *policy_sha256(const policy_t *p);

/* When it was loaded, wall-clock ms. */
int64_t policy_loaded_at(const policy_t *p);

/* How many handlers it has (exact statuses, classes, default, error), and
 * tests. */
void policy_describe(const policy_t *p, int *handlers, int *tests);

/* Whether a response with `status` goes to a handler. */
int policy_handles(const policy_t *p, int status);

/* Whether failures without a status go to an `error` handler. */
int policy_handles_errors(const policy_t *p);

/* Asks the handler for `in` and fills `out` (which starts as VERDICT_INIT).
 * Never fails: a broken handler yields pass with out->failure set. */
void policy_decide(policy_t *p, const policy_input_t *in, verdict_t *out);

/* errord.backoff(attempt) with the policy's settings: a random delay in
 * [0, min(max, base * 2^(attempt-1))] ms. */
uint64_t policy_backoff_ms(policy_t *p, int attempt);

/* Frees what a verdict holds; it is VERDICT_INIT again afterwards. */
void verdict_reset(verdict_t *v);

#endif
