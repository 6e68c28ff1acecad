/* tools: errord check, test and replay (see tools.h). */
#include "tools.h"

#include "access.h"

#include "buf.h"
#include "counter.h"
#include "log.h"
#include "policy.h"

#include <cJSON.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Recorded access logs are read line by line; a line longer than this is
 * not one of errord's records. */
#define MAX_RECORD (1024 * 1024)

static int usage(const char *cmd)
{
    fprintf(stderr,
            "usage: errord %s\n"
            "       errord check POLICY\n"
            "       errord test POLICY [CASES.json]\n"
            "       errord replay POLICY LOG.jsonl [--against OLD_POLICY]\n",
            cmd);
    return 2;
}

/* Prints the lines of `text` to stderr, each prefixed. */
static void print_lines(const buf_t *text, const char *infix)
{
    for (size_t i = 0; i < text->len;) {
        size_t n = strcspn(text->data + i, "\n");
        const char *line = text->data + i;
        /* "file:line: message" becomes "file:line: warning: message" */
        const char *cut = infix[0] ? strstr(line, ": ") : NULL;
        if (cut != NULL && cut < line + n)
            fprintf(stderr, "%.*s: %s%.*s\n", (int)(cut - line), line, infix,
                    (int)(n - (size_t)(cut + 2 - line)), cut + 2);
        else
            fprintf(stderr, "%.*s\n", (int)n, line);
        i += n + 1;
    }
}

/* Loads POLICY for a command, printing its problems. With `strict`,
 * warnings are problems too. Returns NULL when it did not load; *problems
 * counts what was printed. */
static policy_t *load(const char *path, int strict, int *problems)
{
    size_t len = 0;
    char err[512];
    char *src = policy_read_file(path, &len, err, sizeof err);
    if (src == NULL) {
        fprintf(stderr, "%s\n", err);
        *problems = 1;
        return NULL;
    }
    policy_report_t rep = POLICY_REPORT_INIT;
    policy_t *p = policy_load_text(path, src, len, &rep);
    free(src);
    print_lines(&rep.errors, "");
    print_lines(&rep.warnings, "warning: ");
    *problems = rep.n_errors + (strict ? rep.n_warnings : 0);
    policy_report_free(&rep);
    return p;
}

/* ---- check and test ------------------------------------------------------------- */

typedef struct {
    const char *path;
    int verbose; /* a line for every case, not only the failures */
    int passed, failed;
} tally_t;

static void report_case(const policy_test_result_t *r, void *arg)
{
    tally_t *t = arg;
    if (r->passed) {
        t->passed++;
        if (t->verbose)
            printf("ok    %s\n", r->name);
        return;
    }
    t->failed++;
    if (t->verbose)
        printf("FAIL  %s: %s\n", r->name, r->message);
    if (r->line > 0)
        fprintf(stderr, "%s:%d: test \"%s\" failed: %s\n", t->path, r->line, r->name, r->message);
    else if (!t->verbose)
        fprintf(stderr, "%s: test \"%s\" failed: %s\n", t->path, r->name, r->message);
}

static int cmd_check(int argc, char **argv)
{
    if (argc != 2)
        return usage("check POLICY");
    const char *path = argv[1];
    int problems = 0;
    policy_t *p = load(path, 1, &problems);
    tally_t t = {path, 0, 0, 0};
    if (p != NULL) {
        char err[512];
        int failed = policy_run_tests(p, report_case, &t, err, sizeof err);
        if (failed < 0) {
            fprintf(stderr, "%s: %s\n", path, err);
            problems++;
        }
        problems += t.failed;
    }
    if (problems > 0) {
        fprintf(stderr, "errord: %s: %d problem%s\n", path, problems, problems == 1 ? "" : "s");
        policy_release(p);
        return 1;
    }
    int handlers, tests;
    policy_describe(p, &handlers, &tests);
    printf("errord: %s is ok: %d handler%s, %d test%s passed, sha256 %.12s\n", path, handlers,
           handlers == 1 ? "" : "s", t.passed, t.passed == 1 ? "" : "s", policy_sha256(p));
    policy_release(p);
    return 0;
}

static char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    buf_t b = BUF_INIT;
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (buf_append(&b, chunk, n) < 0)
            break;
    int failed = ferror(f) || !feof(f);
    fclose(f);
    if (failed) {
        buf_free(&b);
        errno = EIO;
        return NULL;
    }
    *len = b.len;
    if (b.data == NULL)
        return calloc(1, 1);
    return b.data;
}

static int cmd_test(int argc, char **argv)
{
    if (argc != 2 && argc != 3)
        return usage("test POLICY [CASES.json]");
    const char *path = argv[1];
    int problems = 0;
    policy_t *p = load(path, 0, &problems);
    if (p == NULL)
        return 1;
    tally_t t = {path, 1, 0, 0};
    char err[512];
    int rc = 0;
    if (policy_run_tests(p, report_case, &t, err, sizeof err) < 0) {
        fprintf(stderr, "%s: %s\n", path, err);
        rc = 1;
    }
    if (argc == 3) {
        size_t len = 0;
        char *json = read_all(argv[2], &len);
        tally_t c = {argv[2], 1, 0, 0};
        if (json == NULL) {
            fprintf(stderr, "%s: %s\n", argv[2], strerror(errno));
            rc = 1;
        } else if (policy_run_cases(p, json, len, report_case, &c, err, sizeof err) < 0) {
            fprintf(stderr, "%s: %s\n", argv[2], err);
            rc = 1;
        }
        free(json);
        t.passed += c.passed;
        t.failed += c.failed;
    }
    printf("%d passed, %d failed\n", t.passed, t.failed);
    policy_release(p);
    return rc || t.failed > 0 ? 1 : 0;
}

/* ---- replay --------------------------------------------------------------------- */

/* One decision of a replay: a recorded attempt and what became of it. */
typedef struct {
    char *request;  /* "id METHOD path" */
    int attempt;
    char what[24];      /* the status, or the error kind */
    char recorded[64];  /* what the running policy decided then */
    char decided[64];   /* what the replayed policy decides */
    int status_only;    /* no headers or body were recorded for it */
    int handled;        /* the replayed policy has a handler for it */
    int was_handled;    /* ... and the recording (or the old policy) had */
} decision_t;

typedef struct {
    decision_t *d;
    size_t n, cap;
    size_t transactions;
    size_t skipped; /* lines that are not access records */
} replay_t;

static void replay_free(replay_t *r)
{
    for (size_t i = 0; i < r->n; i++)
        free(r->d[i].request);
    free(r->d);
}

/* A verdict in words: "pass", "retry (limit)", "respond 429". */
static void verdict_words(char *out, size_t n, const char *verdict, const char *reason,
                          int status)
{
    if (strcmp(verdict, "respond") == 0)
        snprintf(out, n, "respond %d", status);
    else if (reason != NULL && reason[0] != '\0')
        snprintf(out, n, "%s (%s)", verdict, reason);
    else
        snprintf(out, n, "%s", verdict);
}

static void outcome_words(char *out, size_t n, const policy_outcome_t *o)
{
    static const char *const names[] = {"pass", "retry", "respond"};
    if (o->error[0] != '\0')
        snprintf(out, n, "pass (handler failed)");
    else
        verdict_words(out, n, names[o->kind], o->reason, o->status);
}

static int add_decision(replay_t *r, decision_t *d)
{
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 256;
        decision_t *nd = realloc(r->d, cap * sizeof *nd);
        if (nd == NULL)
            return -1;
        r->d = nd;
        r->cap = cap;
    }
    r->d[r->n++] = *d;
    return 0;
}

/* Feeds the access records of `log` through `p`, one decision per recorded
 * attempt. Returns 0, or -1 after printing why. */
static int replay_log(policy_t *p, const char *log, replay_t *r)
{
    FILE *f = fopen(log, "r");
    if (f == NULL) {
        fprintf(stderr, "%s: %s\n", log, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int rc = 0;
    counter_reset(); /* each policy replays from the same empty windows */
    while (rc == 0 && (len = getline(&line, &cap, f)) >= 0) {
        int own = 0;
        cJSON *rec = len < MAX_RECORD ? access_parse(line, (size_t)len, &own) : NULL;
        if (rec == NULL) {
            r->skipped += len > 1 && !own;
            continue;
        }
        const cJSON *attempts = cJSON_GetObjectItemCaseSensitive(rec, "attempts");
        r->transactions++;
        int64_t at = access_time_ms(rec);
        const cJSON *final = cJSON_GetObjectItemCaseSensitive(rec, "status");
        int number = 0;
        const cJSON *a;
        cJSON_ArrayForEach(a, attempts)
        {
            number++;
            if (!access_attempt_asked(a))
                continue; /* aborted: nothing a policy is asked about */
            const cJSON *status = cJSON_GetObjectItemCaseSensitive(a, "status");
            const char *error = access_str(a, "error");
            decision_t d = {0};
            const char *verdict = access_str(a, "verdict");
            d.attempt = number;
            if (cJSON_IsNumber(status))
                snprintf(d.what, sizeof d.what, "%d", status->valueint);
            else
                snprintf(d.what, sizeof d.what, "%s", error);
            d.status_only = cJSON_IsNumber(status) &&
                            cJSON_GetObjectItemCaseSensitive(a, "headers") == NULL;
            d.was_handled = cJSON_GetObjectItemCaseSensitive(a, "headers") != NULL ||
                            cJSON_GetObjectItemCaseSensitive(a, "message") != NULL ||
                            (verdict != NULL && strcmp(verdict, "pass") != 0);
            if (access_str(a, "policy_error") != NULL)
                snprintf(d.recorded, sizeof d.recorded, "pass (handler failed)");
            else
                verdict_words(d.recorded, sizeof d.recorded, verdict ? verdict : "pass",
                              access_str(a, "reason"), cJSON_IsNumber(final) ? final->valueint : 0);
            char *text = access_attempt_case(rec, a, number);
            policy_outcome_t o;
            char err[256];
            if (text == NULL || policy_try(p, text, strlen(text), at, &o, err, sizeof err) < 0) {
                fprintf(stderr, "%s: record of %s: %s\n", log, access_str(rec, "request_id"),
                        text == NULL ? "out of memory" : err);
                cJSON_free(text);
                continue;
            }
            cJSON_free(text);
            outcome_words(d.decided, sizeof d.decided, &o);
            d.handled = o.handled;
            const char *id = access_str(rec, "request_id"), *method = access_str(rec, "method");
            const char *path = access_str(rec, "path");
            size_t n = strlen(id ? id : "-") + strlen(method ? method : "-") +
                       strlen(path ? path : "-") + 3;
            d.request = malloc(n);
            if (d.request != NULL)
                snprintf(d.request, n, "%s %s %s", id ? id : "-", method ? method : "-",
                         path ? path : "-");
            if (d.request == NULL || add_decision(r, &d) < 0) {
                free(d.request);
                fprintf(stderr, "errord: out of memory\n");
                rc = -1;
                break;
            }
        }
        cJSON_Delete(rec);
    }
    free(line);
    fclose(f);
    return rc;
}

/* The verdict word a description starts with. */
static int verdict_index(const char *words)
{
    return strncmp(words, "retry", 5) == 0     ? 1
           : strncmp(words, "respond", 7) == 0 ? 2
           : strstr(words, "failed") != NULL   ? 3
                                               : 0;
}

typedef struct {
    char what[24];
    size_t n, by_verdict[4], differ;
} row_t;

/* Prints the summary table: per status (or error kind), how the replayed
 * policy decided and how many decisions differ from the other side. */
static void summary(const replay_t *r, const char *other)
{
    row_t rows[64];
    size_t n_rows = 0, differ = 0;
    size_t untouched = 0;
    for (size_t i = 0; i < r->n; i++) {
        const decision_t *d = &r->d[i];
        row_t *row = NULL;
        if (!d->handled && !d->was_handled) {
            untouched++;
            continue;
        }
        for (size_t j = 0; j < n_rows && row == NULL; j++)
            if (strcmp(rows[j].what, d->what) == 0)
                row = &rows[j];
        if (row == NULL && n_rows < sizeof rows / sizeof *rows) {
            row = &rows[n_rows++];
            memset(row, 0, sizeof *row);
            snprintf(row->what, sizeof row->what, "%s", d->what);
        }
        int differs = strcmp(d->recorded, d->decided) != 0;
        differ += differs;
        if (row == NULL)
            continue;
        row->n++;
        row->by_verdict[verdict_index(d->decided)]++;
        row->differ += differs;
    }
    printf("\n%-10s %9s %7s %7s %8s %7s %8s\n", "status", "decisions", "pass", "retry", "respond",
           "failed", "differ");
    for (size_t j = 0; j < n_rows; j++)
        printf("%-10s %9zu %7zu %7zu %8zu %7zu %8zu\n", rows[j].what, rows[j].n,
               rows[j].by_verdict[0], rows[j].by_verdict[1], rows[j].by_verdict[2],
               rows[j].by_verdict[3], rows[j].differ);
    printf("\n%zu transactions, %zu decisions, %zu differ from %s; %zu responses no handler "
           "looked at\n",
           r->transactions, r->n - untouched, differ, other, untouched);
}

static int cmd_replay(int argc, char **argv)
{
    const char *policy = NULL, *log = NULL, *against = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--against") == 0 && i + 1 < argc)
            against = argv[++i];
        else if (strncmp(argv[i], "--against=", 10) == 0)
            against = argv[i] + 10;
        else if (policy == NULL)
            policy = argv[i];
        else if (log == NULL)
            log = argv[i];
        else
            return usage("replay POLICY LOG.jsonl [--against OLD_POLICY]");
    }
    if (policy == NULL || log == NULL)
        return usage("replay POLICY LOG.jsonl [--against OLD_POLICY]");
    int problems = 0;
    policy_t *p = load(policy, 0, &problems);
    policy_t *old = NULL;
    if (p == NULL)
        return 1;
    if (against != NULL && (old = load(against, 0, &problems)) == NULL) {
        policy_release(p);
        return 1;
    }
    replay_t now = {0}, then = {0};
    int rc = replay_log(p, log, &now);
    if (rc == 0 && old != NULL)
        rc = replay_log(old, log, &then);
    if (rc == 0 && old != NULL && then.n != now.n) {
        fprintf(stderr, "errord: %s changed while it was replayed\n", log);
        rc = -1;
    }
    if (rc == 0) {
        /* Against an old policy, it stands in for what was recorded. */
        for (size_t i = 0; old != NULL && i < now.n; i++) {
            memcpy(now.d[i].recorded, then.d[i].decided, sizeof now.d[i].recorded);
            now.d[i].was_handled = then.d[i].handled;
        }
        size_t shown = 0;
        for (size_t i = 0; i < now.n; i++) {
            const decision_t *d = &now.d[i];
            int same = strcmp(d->recorded, d->decided) == 0;
            if ((old != NULL && same) || (!d->handled && !d->was_handled))
                continue;
            shown++;
            printf("%s #%d %s: %s %s, %s %s%s%s\n", d->request, d->attempt, d->what,
                   old != NULL ? "old" : "recorded", d->recorded, old != NULL ? "new" : "replayed",
                   d->decided, same ? "" : "  <- differs",
                   d->status_only ? "  (status only: no headers or body were recorded)" : "");
        }
        if (old != NULL && shown == 0)
            printf("the two policies decide every recorded response alike\n");
        summary(&now, old != NULL ? against : "the recording");
        if (now.skipped > 0)
            printf("%zu lines were not access records\n", now.skipped);
    }
    replay_free(&now);
    replay_free(&then);
    policy_release(p);
    policy_release(old);
    return rc == 0 ? 0 : 1;
}

/* ---- dispatch ------------------------------------------------------------------- */

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
} COMMANDS[] = {{"check", cmd_check}, {"test", cmd_test}, {"replay", cmd_replay}};

int tools_has(const char *name)
{
    for (size_t i = 0; i < sizeof COMMANDS / sizeof *COMMANDS; i++)
        if (strcmp(name, COMMANDS[i].name) == 0)
            return 1;
    return 0;
}

int tools_main(int argc, char **argv)
{
    log_set_level(LOG_ERROR); /* the commands speak for themselves */
    for (size_t i = 0; i < sizeof COMMANDS / sizeof *COMMANDS; i++)
        if (strcmp(argv[0], COMMANDS[i].name) == 0)
            return COMMANDS[i].run(argc, argv);
    return usage("check|test|replay ...");
}
