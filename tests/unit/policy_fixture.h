/* Helpers for the policy and sandbox unit tests (test_policy.c,
 * test_sandbox.c): policy files written into a temporary directory, request
 * and response heads parsed from raw bytes, errord's log (stdout) captured
 * around a call, and calls that may crash or hang errord run in a child
 * process, so one broken case cannot take the whole runner down.
 *
 * Every helper restores stdout before it returns: a test's ASSERT returns
 * early, so no capture may be left open across one. */
#ifndef ERRORD_TEST_POLICY_FIXTURE_H
#define ERRORD_TEST_POLICY_FIXTURE_H

#include "buf.h"
#include "clock.h"
#include "http.h"
#include "log.h"
#include "policy.h"
#include "test.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- policy files ---------------------------------------------------------- */

static char fx_dir_path[256];

static inline int fx_rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static inline void fx_rm_dir(void)
{
    if (fx_dir_path[0] != '\0')
        nftw(fx_dir_path, fx_rm_one, 8, FTW_DEPTH | FTW_PHYS);
}

/* The temporary directory of this test file, created on first use and
 * removed when the runner exits. */
static inline const char *fx_dir(void)
{
    if (fx_dir_path[0] == '\0') {
        snprintf(fx_dir_path, sizeof fx_dir_path, "/tmp/errord-unit-XXXXXX");
        if (mkdtemp(fx_dir_path) == NULL) {
            perror("mkdtemp");
            exit(2);
        }
        atexit(fx_rm_dir);
    }
    return fx_dir_path;
}

/* Writes `src` to NAME in the temporary directory; `path` receives its path.
 * Returns 0, or -1 (the test should fail). */
static inline int fx_write(const char *name, const char *src, size_t len, char *path, size_t n)
{
    snprintf(path, n, "%s/%s", fx_dir(), name);
    FILE *f = fopen(path, "wb");
    if (f == NULL)
        return -1;
    size_t w = fwrite(src, 1, len, f);
    return fclose(f) == 0 && w == len ? 0 : -1;
}

/* ---- capturing errord's log (stdout) -------------------------------------- */

typedef struct {
    int saved;
    FILE *f;
} fx_capture_t;

static inline void fx_capture_begin(fx_capture_t *c)
{
    fflush(stdout);
    log_flush();
    c->f = tmpfile();
    c->saved = dup(STDOUT_FILENO);
    if (c->f != NULL)
        dup2(fileno(c->f), STDOUT_FILENO);
}

/* Restores stdout and appends what was written meanwhile to `out` (which is
 * NUL-terminated afterwards). */
static inline void fx_capture_end(fx_capture_t *c, buf_t *out)
{
    fflush(stdout);
    log_flush();
    dup2(c->saved, STDOUT_FILENO);
    close(c->saved);
    if (c->f == NULL)
        return;
    rewind(c->f);
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, c->f)) > 0)
        if (out != NULL)
            buf_append(out, chunk, n);
    fclose(c->f);
    if (out != NULL) {
        buf_append(out, "", 1);
        out->len--;
    }
}

/* Whether the captured log holds `needle`. */
static inline int fx_has(const buf_t *logged, const char *needle)
{
    return logged->data != NULL && strstr(logged->data, needle) != NULL;
}

/* ---- loading --------------------------------------------------------------- */

static char fx_err[1024];

/* Writes `src` as NAME and loads it, its log captured into `logged` (NULL: thrown
 * away). Returns the policy, or NULL with the error in fx_err. */
static inline policy_t *fx_load_named(const char *name, const char *src, buf_t *logged)
{
    char path[512];
    fx_err[0] = '\0';
    if (fx_write(name, src, strlen(src), path, sizeof path) < 0) {
        snprintf(fx_err, sizeof fx_err, "cannot write %s", path);
        return NULL;
    }
    fx_capture_t c;
    fx_capture_begin(&c);
    policy_t *p = policy_load(path, fx_err, sizeof fx_err);
    fx_capture_end(&c, logged);
    return p;
}

static inline policy_t *fx_load(const char *src)
{
    return fx_load_named("policy.lua", src, NULL);
}

/* Loads a file as it is, its log captured into `logged` (NULL: thrown away). */
static inline policy_t *fx_load_path(const char *path, buf_t *logged)
{
    fx_capture_t c;
    fx_err[0] = '\0';
    fx_capture_begin(&c);
    policy_t *p = policy_load(path, fx_err, sizeof fx_err);
    fx_capture_end(&c, logged);
    return p;
}

/* ---- heads and calls ----------------------------------------------------------- */

static inline int fx_on_head(void *ud, http_head_t *h)
{
    http_head_t **out = ud;
    if (*out == NULL)
        *out = h;
    else
        http_head_free(h);
    return 0;
}

static inline int fx_on_body(void *ud, const char *at, size_t n)
{
    (void)ud;
    (void)at;
    (void)n;
    return 0;
}

static inline int fx_on_end(void *ud)
{
    (void)ud;
    return 0;
}

/* Parses the head of a request or response from raw bytes (CRLF lines).
 * Returns NULL when errord's parser refuses it. */
static inline http_head_t *fx_head(http_parse_kind_t kind, const char *raw)
{
    static const http_limits_t limits = {8192, 65536};
    static const http_handler_t h = {fx_on_head, fx_on_body, fx_on_end};
    http_head_t *head = NULL;
    http_parser_t *p = http_parser_new(kind, &limits, &h, &head);
    if (p == NULL)
        return NULL;
    ssize_t n = http_parser_feed(p, raw, strlen(raw));
    http_parser_free(p);
    if (n < 0) {
        http_head_free(head);
        return NULL;
    }
    return head;
}

/* One question for a policy: the heads it is about and the input. */
typedef struct {
    http_head_t *req;
    http_head_t *res;
    policy_input_t in;
} fx_call_t;

#define FX_DEFAULT_REQ "GET /x HTTP/1.1\r\nHost: upstream\r\n\r\n"

/* A call about the response `raw_res` (NULL: a failure without a status,
 * see fx_call_error) to the request `raw_req` (NULL: GET /x). `body` is the
 * buffered response body, NULL when it is being streamed. Returns 0, or -1
 * when a head did not parse. */
static inline int fx_call(fx_call_t *c, const char *raw_req, const char *raw_res,
                          const char *body)
{
    memset(c, 0, sizeof *c);
    c->req = fx_head(HTTP_PARSE_REQUEST, raw_req ? raw_req : FX_DEFAULT_REQ);
    c->res = raw_res ? fx_head(HTTP_PARSE_RESPONSE, raw_res) : NULL;
    c->in.req = c->req;
    c->in.res = c->res;
    c->in.request_id = "req-1";
    c->in.attempt = 1;
    c->in.body = body;
    c->in.body_len = body ? strlen(body) : 0;
    return c->req != NULL && (raw_res == NULL || c->res != NULL) ? 0 : -1;
}

/* A call about a plain response with `status` and `body`. */
static inline int fx_call_status(fx_call_t *c, int status, const char *body)
{
    char raw[256];
    if (status < 200 || status == 204 || status == 304) /* no body by status */
        snprintf(raw, sizeof raw, "HTTP/1.1 %d Something\r\n\r\n", status);
    else
        snprintf(raw, sizeof raw, "HTTP/1.1 %d Something\r\nContent-Length: %zu\r\n\r\n",
                 status, body ? strlen(body) : 0);
    return fx_call(c, NULL, raw, body);
}

/* A call about a failure without a status. */
static inline int fx_call_error(fx_call_t *c, const char *kind, const char *message)
{
    int rc = fx_call(c, NULL, NULL, NULL);
    c->in.err_kind = kind;
    c->in.err_message = message;
    return rc;
}

static inline void fx_call_free(fx_call_t *c)
{
    http_head_free(c->req);
    http_head_free(c->res);
    c->req = c->res = NULL;
}

/* policy_decide() with its log captured into `logged` (NULL: thrown away).
 * `v` is reset first. */
static inline void fx_decide(policy_t *p, const fx_call_t *c, verdict_t *v, buf_t *logged)
{
    fx_capture_t cap;
    verdict_reset(v);
    fx_capture_begin(&cap);
    policy_decide(p, &c->in, v);
    fx_capture_end(&cap, logged);
}

/* Decides a plain response with `status` and `body` in one go. Returns -1
 * when the call could not be built. */
static inline int fx_decide_status(policy_t *p, int status, const char *body, verdict_t *v,
                                   buf_t *logged)
{
    fx_call_t c;
    int rc = fx_call_status(&c, status, body);
    if (rc == 0)
        fx_decide(p, &c, v, logged);
    fx_call_free(&c);
    return rc;
}

/* The respond body of a verdict as a NUL-terminated string ("" when none). */
static inline const char *fx_body(verdict_t *v)
{
    if (v->body.len == 0)
        return "";
    buf_append(&v->body, "", 1);
    v->body.len--;
    return v->body.data;
}

/* The verdict's "Name: value\r\n" header lines as a NUL-terminated string. */
static inline const char *fx_headers(verdict_t *v)
{
    if (v->headers.len == 0)
        return "";
    buf_append(&v->headers, "", 1);
    v->headers.len--;
    return v->headers.data;
}

static inline const char *fx_failure(const verdict_t *v)
{
    return v->failure ? v->failure : "(none)";
}

/* Loads `src`, decides a response with `status` and `body`, and releases
 * the policy: for tests about one handler call. */
static inline policy_t *fx_decide_once(const char *src, int status, const char *body, verdict_t *v,
                             buf_t *logged)
{
    policy_t *p = fx_load(src);
    if (p == NULL)
        return NULL;
    if (fx_decide_status(p, status, body, v, logged) < 0) {
        policy_release(p);
        snprintf(fx_err, sizeof fx_err, "the response head did not parse");
        return NULL;
    }
    return p;
}

/* A handler whose checks call check(ok, what); the respond body lists the
 * ones that did not hold (see fx_lua_checks). */
#define FX_CHECKS_HEAD \
    "local J = errord.json\n" \
    "local function deep_eq(a, b)\n" \
    "  if type(a) ~= type(b) then return false end\n" \
    "  if type(a) ~= 'table' then return a == b end\n" \
    "  for k, v in pairs(a) do if not deep_eq(v, b[k]) then return false end end\n" \
    "  for k in pairs(b) do if a[k] == nil then return false end end\n" \
    "  return true\n" \
    "end\n" \
    "return { [200] = function(req, res)\n" \
    "  local bad = {}\n" \
    "  local function check(ok, what) if not ok then bad[#bad + 1] = what end end\n"
#define FX_CHECKS_TAIL \
    "  return respond { status = 200, body = table.concat(bad, '; ') }\n" \
    "end }\n"

/* Runs Lua `checks` in a handler, as lines between FX_CHECKS_HEAD and
 * FX_CHECKS_TAIL (so `check`, `deep_eq` and `J` = errord.json are there).
 * Returns 0 when they all held, else -1 with the ones that did not in msg. */
static inline int fx_lua_checks(const char *checks, char *msg, size_t n)
{
    buf_t src = BUF_INIT;
    buf_puts(&src, FX_CHECKS_HEAD);
    buf_puts(&src, checks);
    buf_puts(&src, FX_CHECKS_TAIL);
    buf_append(&src, "", 1);
    verdict_t v = VERDICT_INIT;
    buf_t lg = BUF_INIT;
    int rc = -1;
    policy_t *p = fx_decide_once(src.data, 200, "", &v, &lg);
    if (p == NULL)
        snprintf(msg, n, "did not load: %s", fx_err);
    else if (v.failure != NULL)
        snprintf(msg, n, "the checks failed with %s: %s", v.failure, lg.data ? lg.data : "");
    else if (v.body.len > 0)
        snprintf(msg, n, "%s", fx_body(&v));
    else
        rc = 0;
    policy_release(p);
    verdict_reset(&v);
    buf_free(&lg);
    buf_free(&src);
    return rc;
}

#define ASSERT_LUA_CHECKS(checks)                                                          \
    do {                                                                                   \
        char m_[2048];                                                                     \
        if (fx_lua_checks((checks), m_, sizeof m_) < 0) {                                     \
            test_fail(__FILE__, __LINE__, "%s", m_);                                       \
            return;                                                                        \
        }                                                                                  \
    } while (0)

/* ---- risky calls in a child process ------------------------------------------- */

typedef enum {
    FX_CHILD_PASSED,  /* the checks held */
    FX_CHILD_FAILED,  /* a check did not hold; msg says which */
    FX_CHILD_CRASHED, /* killed by a signal or a sanitizer */
    FX_CHILD_HUNG,    /* still running at the timeout; killed */
} fx_child_t;

/* Runs fn(arg, msg, n) in a child process, its stdout thrown away. fn
 * returns 0 when its checks held, else -1 with why in msg. Waits at most
 * `timeout_ms`. `msg` says what happened when the result is not PASSED. */
static inline fx_child_t fx_in_child(int (*fn)(void *arg, char *msg, size_t n), void *arg,
                                     int timeout_ms, char *msg, size_t msglen)
{
    int fds[2];
    msg[0] = '\0';
    fflush(stdout);
    fflush(stderr);
    log_flush();
    if (pipe(fds) < 0) {
        snprintf(msg, msglen, "pipe: %s", strerror(errno));
        return FX_CHILD_CRASHED;
    }
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(msg, msglen, "fork: %s", strerror(errno));
        close(fds[0]);
        close(fds[1]);
        return FX_CHILD_CRASHED;
    }
    if (pid == 0) {
        close(fds[0]);
        int null = open("/dev/null", O_WRONLY);
        if (null >= 0)
            dup2(null, STDOUT_FILENO);
        char why[512] = "";
        int rc = fn(arg, why, sizeof why);
        ssize_t w = write(fds[1], why, strlen(why));
        (void)w;
        log_flush();
        _exit(rc == 0 ? 0 : 3);
    }
    close(fds[1]);
    int status = 0, waited = 0;
    uint64_t deadline = clock_now_ns() + (uint64_t)timeout_ms * 1000000u;
    while ((waited = (int)waitpid(pid, &status, WNOHANG)) == 0 && clock_now_ns() < deadline) {
        struct timespec ts = {0, 5 * 1000000};
        nanosleep(&ts, NULL);
    }
    if (waited == 0) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        close(fds[0]);
        snprintf(msg, msglen, "still running after %d ms; killed", timeout_ms);
        return FX_CHILD_HUNG;
    }
    ssize_t n = read(fds[0], msg, msglen - 1);
    msg[n > 0 ? n : 0] = '\0';
    close(fds[0]);
    if (WIFSIGNALED(status)) {
        snprintf(msg, msglen, "errord crashed: killed by signal %d (%s)", WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
        return FX_CHILD_CRASHED;
    }
    if (WEXITSTATUS(status) == 0)
        return FX_CHILD_PASSED;
    if (WEXITSTATUS(status) == 3)
        return FX_CHILD_FAILED;
    snprintf(msg, msglen, "errord crashed: exit status %d (sanitizer report on stderr)",
             WEXITSTATUS(status));
    return FX_CHILD_CRASHED;
}

/* Fails the test unless the child's checks held. */
#define ASSERT_CHILD(fn, arg, timeout_ms)                                                  \
    do {                                                                                   \
        char child_msg_[600];                                                              \
        fx_child_t child_rc_ = fx_in_child((fn), (arg), (timeout_ms), child_msg_,          \
                                           sizeof child_msg_);                             \
        if (child_rc_ != FX_CHILD_PASSED) {                                                \
            test_fail(__FILE__, __LINE__, "%s: %s", #fn, child_msg_);                      \
            return;                                                                        \
        }                                                                                  \
    } while (0)

/* ---- assertions ------------------------------------------------------------ */

#define ASSERT_LOADED(p)                                                              \
    do {                                                                              \
        if ((p) == NULL) {                                                            \
            test_fail(__FILE__, __LINE__, "%s did not load: %s", #p, fx_err);        \
            return;                                                                   \
        }                                                                             \
    } while (0)

#define ASSERT_CONTAINS(hay, needle)                                                  \
    do {                                                                              \
        const char *h_ = (hay), *n_ = (needle);                                       \
        if (h_ == NULL || strstr(h_, n_) == NULL) {                                   \
            test_fail(__FILE__, __LINE__, "%s holds \"%s\" (it is \"%s\")", #hay, n_,    \
                      h_ ? h_ : "(null)");                                            \
            return;                                                                   \
        }                                                                             \
    } while (0)

#define ASSERT_NOT_CONTAINS(hay, needle)                                              \
    do {                                                                              \
        const char *h_ = (hay), *n_ = (needle);                                       \
        if (h_ != NULL && strstr(h_, n_) != NULL) {                                   \
            test_fail(__FILE__, __LINE__, "%s lacks \"%s\" (it is \"%s\")", #hay, n_, h_); \
            return;                                                                   \
        }                                                                             \
    } while (0)

/* Fails the test and jumps to the test's `out:` label, where it releases
 * what it holds (ASSERT returns at once, leaking it: noise in the
 * LeakSanitizer report of an ASan build). */
#define CHECK_OUT(cond, ...)                                                          \
    do {                                                                              \
        if (!(cond)) {                                                                \
            test_fail(__FILE__, __LINE__, __VA_ARGS__);                               \
            goto out;                                                                 \
        }                                                                             \
    } while (0)

/* The verdict failed open with `why` ("error", "timeout", "memory",
 * "verdict"), or did not fail when `why` is "(none)"; `lg` is the buf_t of
 * the call's log, shown when the check does not hold. */
#define ASSERT_FAILURE(v, why, lg)                                                    \
    do {                                                                              \
        const char *f_ = fx_failure(&(v)), *w_ = (why);                               \
        if (strcmp(f_, w_) != 0) {                                                    \
            test_fail(__FILE__, __LINE__, "failure of %s: \"%s\", expected \"%s\"; log: %s", \
                      #v, f_, w_, (lg).data ? (lg).data : "(empty)");                 \
            return;                                                                   \
        }                                                                             \
    } while (0)

#endif
