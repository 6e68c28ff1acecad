/* reload: build, validate, swap (see reload.h). */
#include "reload.h"

#include "clock.h"
#include "json.h"
#include "log.h"
#include "notify.h"
#include "sha256.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The longest --watch waits for a file that keeps changing to settle. */
#define WATCH_SETTLE_MS 200
#define WATCH_MAX_WAIT_MS 1000

struct reload_s {
    uv_loop_t *loop;
    char *path;       /* NULL when running without a policy */
    int n_workers;
    policy_t *policy; /* the control loop's instance: settings, alert sinks */
    workers_t *workers;
    sinks_t *sinks;
    reload_status_t status;
    uv_signal_t sighup;
    int sighup_on;
    uv_fs_event_t watcher;  /* --watch: the policy file's directory */
    uv_timer_t watch_timer; /* ... debounces its events */
    uint64_t watch_first_ms;
    struct stat watched; /* the policy file as last seen */
    int watching;
};

reload_t *reload_new(const char *path, int n_workers)
{
    reload_t *r = calloc(1, sizeof *r);
    if (r == NULL)
        return NULL;
    r->n_workers = n_workers;
    if (path != NULL && (r->path = strdup(path)) == NULL) {
        free(r);
        return NULL;
    }
    r->status.path = r->path;
    return r;
}

/* ---- loading ---------------------------------------------------------------------- */

typedef struct {
    const char *path;
    buf_t *errors;
} test_report_t;

static void collect_failed_test(const policy_test_result_t *t, void *arg)
{
    const test_report_t *rep = arg;
    if (t->passed)
        return;
    if (t->line > 0)
        buf_printf(rep->errors, "%s:%d: test \"%s\" failed: %s\n", rep->path, t->line, t->name,
                   t->message);
    else
        buf_printf(rep->errors, "%s: test \"%s\" failed: %s\n", rep->path, t->name, t->message);
}

static void log_warnings(const reload_t *r, const buf_t *warnings)
{
    for (size_t i = 0; i < warnings->len;) {
        size_t n = strcspn(warnings->data + i, "\n");
        log_record_t *rec = log_begin(LOG_WARN, "policy warning");
        log_str(rec, "policy", r->path);
        log_strn(rec, "warning", warnings->data + i, n);
        log_end(rec);
        i += n + 1;
    }
}

/* Loads `src` (the policy file's text) as everything errord will run: the
 * control loop's instance, which runs the policy's tests, and one instance
 * per worker in `per_worker`. Returns the control instance, or NULL with one
 * problem per line in `errors` and per_worker[] all NULL. */
static policy_t *load_instances(const reload_t *r, const char *src, size_t len,
                                policy_t **per_worker, buf_t *errors)
{
    policy_report_t rep = POLICY_REPORT_INIT;
    policy_t *p = policy_load_text(r->path, src, len, &rep);
    log_warnings(r, &rep.warnings);
    if (p == NULL)
        buf_append(errors, rep.errors.data, rep.errors.len);
    policy_report_free(&rep);
    if (p == NULL)
        return NULL;
    char err[512];
    test_report_t tests = {r->path, errors};
    int failed = policy_run_tests(p, collect_failed_test, &tests, err, sizeof err);
    if (failed < 0)
        buf_printf(errors, "%s: %s\n", r->path, err);
    for (int i = 0; failed == 0 && i < r->n_workers; i++) {
        policy_report_t quiet = POLICY_REPORT_INIT;
        per_worker[i] = policy_load_text(r->path, src, len, &quiet);
        if (per_worker[i] == NULL) { /* loaded once already: out of memory */
            buf_append(errors, quiet.errors.data, quiet.errors.len);
            failed = -1;
        }
        policy_report_free(&quiet);
    }
    if (failed == 0)
        return p;
    for (int i = 0; i < r->n_workers; i++) {
        policy_release(per_worker[i]);
        per_worker[i] = NULL;
    }
    policy_release(p);
    return NULL;
}

int reload_first(reload_t *r, policy_t **per_worker, buf_t *msg)
{
    if (r->path == NULL)
        return 0;
    size_t len = 0;
    char err[512];
    char *src = policy_read_file(r->path, &len, err, sizeof err);
    if (src == NULL) {
        buf_printf(msg, "invalid policy: %s\n", err);
        return -1;
    }
    buf_t errors = BUF_INIT;
    r->policy = load_instances(r, src, len, per_worker, &errors);
    free(src);
    if (r->policy == NULL)
        buf_printf(msg, "invalid policy %s:\n%s", r->path, buf_cstr(&errors));
    buf_free(&errors);
    return r->policy != NULL ? 0 : -1;
}

void reload_attach(reload_t *r, workers_t *workers, sinks_t *sinks)
{
    r->workers = workers;
    r->sinks = sinks;
}

/* ---- reloading -------------------------------------------------------------------- */

/* Whether `src` is the text of the running policy. */
static int unchanged(const reload_t *r, const char *src, size_t len)
{
    char sha[65];
    sha256_hex(src, len, sha);
    return strcmp(sha, policy_sha256(r->policy)) == 0;
}

static void note(reload_t *r, const char *result, const char *trigger)
{
    r->status.result = result;
    r->status.trigger = trigger;
    r->status.at_ms = clock_wall_ms();
}

static void note_failure(reload_t *r, const char *trigger, const buf_t *errors)
{
    reload_status_t *st = &r->status;
    note(r, "failed", trigger);
    st->n_failed++;
    buf_clear(&st->errors);
    buf_append(&st->errors, errors->data, errors->len);
    log_record_t *rec = log_begin(LOG_ERROR, "policy reload failed; the running policy stays");
    log_str(rec, "trigger", trigger);
    log_str(rec, "policy", r->path);
    const char *text = buf_cstr(&st->errors);
    log_strn(rec, "error", text, strcspn(text, "\n"));
    buf_t list = BUF_INIT;
    if (json_render(json_lines(st->errors.data, st->errors.len), &list) == 0)
        log_raw(rec, "errors", list.data, list.len);
    buf_free(&list);
    log_str(rec, "running_sha256", policy_sha256(r->policy));
    log_end(rec);
}

/* Swaps in the control instance `p` and per_worker[] (both taken over):
 * the sinks follow the new settings, each worker gets its instance. */
static void swap(reload_t *r, policy_t *p, policy_t **per_worker)
{
    policy_release(r->policy);
    r->policy = p;
    if (r->sinks != NULL && sinks_update(r->sinks, policy_settings(p)) < 0)
        log_msgf(LOG_ERROR, "out of memory updating the alert sinks; they keep the old settings");
    workers_hand_over(r->workers, per_worker);
}

/* Reloads the policy file. Returns 0 when the new policy runs (or the file
 * has not changed), -1 when the old one stays; `errors` says why. */
static int reload_file(reload_t *r, const char *trigger, buf_t *errors)
{
    uint64_t t0 = clock_now_ns();
    size_t len = 0;
    char err[512];
    char *src = policy_read_file(r->path, &len, err, sizeof err);
    policy_t **per_worker = calloc((size_t)r->n_workers, sizeof *per_worker);
    policy_t *p = NULL;
    int rc = -1;
    if (src == NULL) {
        buf_printf(errors, "%s\n", err);
    } else if (per_worker == NULL) {
        buf_printf(errors, "out of memory\n");
    } else if (unchanged(r, src, len)) {
        note(r, "unchanged", trigger);
        r->status.n_unchanged++;
        log_record_t *rec = log_begin(LOG_DEBUG, "policy file unchanged; nothing to reload");
        log_str(rec, "trigger", trigger);
        log_end(rec);
        rc = 0;
        goto out;
    } else {
        p = load_instances(r, src, len, per_worker, errors);
    }
    if (p == NULL) {
        note_failure(r, trigger, errors);
        goto out;
    }
    buf_clear(&r->status.errors);
    swap(r, p, per_worker);
    note(r, "reloaded", trigger);
    r->status.n_reloaded++;
    r->status.took_ms = (double)(clock_now_ns() - t0) / 1e6;
    log_record_t *rec = log_begin(LOG_INFO, "policy reloaded");
    log_str(rec, "trigger", trigger);
    log_str(rec, "policy", r->path);
    log_str(rec, "sha256", policy_sha256(p));
    log_ms(rec, "took_ms", clock_now_ns() - t0);
    log_end(rec);
    rc = 0;
out:
    free(per_worker);
    free(src);
    return rc;
}

int reload_now(reload_t *r, const char *trigger, buf_t *errors)
{
    notify("RELOADING=1"); /* systemctl reload waits for the READY=1 */
    int rc = reload_file(r, trigger, errors);
    notify("READY=1");
    return rc;
}

static int stopping(const reload_t *r)
{
    return r->workers != NULL && workers_draining(r->workers);
}

/* A reload by a trigger that has no one to answer: the log says how it went. */
static void reload_quietly(reload_t *r, const char *trigger)
{
    buf_t errors = BUF_INIT;
    reload_now(r, trigger, &errors);
    buf_free(&errors);
}

static void on_sighup(uv_signal_t *s, int signum)
{
    (void)signum;
    reload_t *r = s->data;
    if (stopping(r))
        return;
    if (r->policy == NULL) {
        log_msgf(LOG_WARN, "SIGHUP: errord runs without a policy (--policy off); nothing to reload");
        return;
    }
    reload_quietly(r, "SIGHUP");
}

/* ---- --watch ---------------------------------------------------------------------- */

/* Whether the policy file is another file, or was written, since last seen
 * (a symlink is followed: Kubernetes swaps ConfigMap files that way). */
static int watched_file_changed(reload_t *r)
{
    struct stat now;
    if (stat(r->path, &now) < 0)
        return 0; /* gone for now: an editor between its write and its rename */
    const struct stat *was = &r->watched;
    int changed = now.st_dev != was->st_dev || now.st_ino != was->st_ino ||
                  now.st_size != was->st_size || now.st_mtim.tv_sec != was->st_mtim.tv_sec ||
                  now.st_mtim.tv_nsec != was->st_mtim.tv_nsec ||
                  now.st_ctim.tv_sec != was->st_ctim.tv_sec ||
                  now.st_ctim.tv_nsec != was->st_ctim.tv_nsec;
    r->watched = now;
    return changed;
}

static void on_watch_timer(uv_timer_t *t)
{
    reload_t *r = t->data;
    r->watch_first_ms = 0;
    if (stopping(r) || !watched_file_changed(r))
        return; /* something else in the directory changed */
    reload_quietly(r, "watch");
}

/* Something changed in the policy file's directory (editors write a new
 * file and rename it over the old one; Kubernetes swaps a symlink): reload
 * once things settle. An unchanged file is noticed by its hash. */
static void on_watch_event(uv_fs_event_t *h, const char *name, int events, int status)
{
    (void)name;
    (void)events;
    reload_t *r = h->data;
    if (status < 0)
        return;
    uint64_t now = clock_now_ms();
    if (r->watch_first_ms == 0)
        r->watch_first_ms = now;
    uint64_t waited = now - r->watch_first_ms;
    uint64_t delay = waited >= WATCH_MAX_WAIT_MS ? 0 : WATCH_SETTLE_MS;
    if (delay > WATCH_MAX_WAIT_MS - waited)
        delay = WATCH_MAX_WAIT_MS - waited;
    uv_timer_start(&r->watch_timer, on_watch_timer, delay, 0);
}

static int start_watch(reload_t *r, char *err, size_t errlen)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", r->path);
    char *slash = strrchr(dir, '/');
    if (slash == NULL)
        snprintf(dir, sizeof dir, ".");
    else if (slash == dir)
        dir[1] = '\0';
    else
        *slash = '\0';
    stat(r->path, &r->watched);
    uv_timer_init(r->loop, &r->watch_timer);
    uv_fs_event_init(r->loop, &r->watcher);
    r->watch_timer.data = r;
    r->watcher.data = r;
    r->watching = 1;
    r->status.watching = 1;
    int rc = uv_fs_event_start(&r->watcher, on_watch_event, dir, 0);
    if (rc < 0) {
        snprintf(err, errlen, "--watch: cannot watch %s: %s", dir, uv_strerror(rc));
        return -1;
    }
    return 0;
}

int reload_start(reload_t *r, uv_loop_t *loop, int watch, char *err, size_t errlen)
{
    r->loop = loop;
    uv_signal_init(r->loop, &r->sighup);
    r->sighup.data = r;
    r->sighup_on = 1;
    uv_signal_start(&r->sighup, on_sighup, SIGHUP);
    if (watch && r->policy != NULL)
        return start_watch(r, err, errlen);
    return 0;
}

/* ---- what the admin port reads ------------------------------------------------------ */

const policy_t *reload_policy(const reload_t *r)
{
    return r->policy;
}

const reload_status_t *reload_status(const reload_t *r)
{
    return &r->status;
}

void reload_close(reload_t *r)
{
    if (r->sighup_on)
        uv_close((uv_handle_t *)&r->sighup, NULL);
    if (r->watching) {
        uv_close((uv_handle_t *)&r->watcher, NULL);
        uv_close((uv_handle_t *)&r->watch_timer, NULL);
    }
}

void reload_free(reload_t *r)
{
    if (r == NULL)
        return;
    policy_release(r->policy);
    buf_free(&r->status.errors);
    free(r->path);
    free(r);
}
