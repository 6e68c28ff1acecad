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
#include "settings.h"
#include "verdict.h"

#include <stddef.h>
#include <stdint.h>

typedef struct policy_s policy_t;

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

/* Frees what the report holds; it is empty (POLICY_REPORT_INIT) again
 * afterwards. */
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

/* The policy's settings, errord's defaults where it says nothing. They
 * belong to the policy and live as long as it does. */
const policy_settings_t *policy_settings(const policy_t *p);

/* The path the policy was loaded from; it lives as long as the policy. */
const char *policy_path(const policy_t *p);

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

/* Asks the handler for `in` (which must live for the call) and fills `out`
 * (which starts as VERDICT_INIT; the caller frees it with verdict_reset()).
 * Never fails: a broken handler, or one set aside, yields pass with
 * out->failure set, and the failure is logged with its secrets redacted. */
void policy_decide(policy_t *p, const policy_input_t *in, verdict_t *out);

/* The delay of a retry the handler gave no `after` for: backoff_delay_ms()
 * with the policy's settings and generator, what errord.backoff(attempt)
 * gives a handler too. Same thread as the policy. */
uint64_t policy_backoff_ms(policy_t *p, int attempt);

#endif
