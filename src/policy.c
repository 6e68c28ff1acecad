/* policy: a user's Lua policy in a sandbox (see policy.h): loading it, its
 * handler table, deciding, and setting aside handlers that keep running
 * out of time or memory. Settings, the source scanner and the tests have
 * files of their own (see policy_internal.h).
 *
 * Two rules keep a hostile or broken policy from taking errord down. Every
 * read of a table the policy made is raw (lua_rawget, lua_next), so none of
 * its metamethods runs outside a bounded call. And every step that touches
 * the Lua state runs in a protected call, so even running out of the
 * state's memory is an error errord handles, never a panic. */
#include "policy_internal.h"

#include "clock.h"
#include "log.h"
#include "redact.h"
#include "retry.h"
#include "sha256.h"

#include <lauxlib.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_POLICY_BYTES (4 * 1024 * 1024)

/* A handler that keeps running out of time or memory is set aside: each
 * such call holds its worker's loop up to the handler's time limit (filling
 * tens of MiB of fresh memory takes about that long), so after
 * SET_ASIDE_AFTER of them within SET_ASIDE_WINDOW_MS errord stops calling
 * it for settings.limits.set_aside_s (its responses pass, as they would had
 * it failed), then tries it again. Back from a set-aside it is on
 * probation for SET_ASIDE_WINDOW_MS: one such failure sets it aside again,
 * for twice as long as the time before, up to SET_ASIDE_MAX_MS, so a
 * handler that is simply broken costs one call every few minutes. A handler
 * that raises costs little and is always called. */
#define SET_ASIDE_AFTER 3
#define SET_ASIDE_WINDOW_MS 10000
#define SET_ASIDE_MAX_MS 600000

static sandbox_limits_t limits_of(const policy_settings_t *s)
{
    sandbox_limits_t l = {s->handler_instructions, s->handler_time_ms, s->memory_limit};
    return l;
}

int policy_rawfield(lua_State *L, int t, const char *k)
{
    t = lua_absindex(L, t);
    lua_pushstring(L, k);
    return lua_rawget(L, t);
}

/* ---- handlers ------------------------------------------------------------------ */

/* The line where the handler function at the top of the stack starts. */
static int function_line(lua_State *L)
{
    lua_Debug ar;
    lua_pushvalue(L, -1);
    return lua_getinfo(L, ">S", &ar) ? ar.linedefined : 0;
}

/* Reads the returned table's keys into handler refs; notes bad keys. */
static void read_handlers(policy_t *p, lua_State *L, int policy)
{
    int exact[N_STATUS], klass[6], deflt = LUA_NOREF;
    for (int i = 0; i < N_STATUS; i++)
        exact[i] = LUA_NOREF;
    for (int i = 0; i < 6; i++)
        klass[i] = LUA_NOREF;

    lua_pushnil(L);
    while (lua_next(L, policy) != 0) {
        int *slot = NULL;
        char name[48];
        int is_fn = lua_isfunction(L, -1);
        int line = is_fn ? function_line(L) : 0;
        if (lua_type(L, -2) == LUA_TNUMBER) {
            lua_Integer s = lua_isinteger(L, -2) ? lua_tointeger(L, -2) : 0;
            if (s < 100 || s > 599) {
                char key[48];
                lua_pushvalue(L, -2); /* a copy: lua_tostring changes it */
                snprintf(key, sizeof key, "%s", lua_tostring(L, -1));
                lua_pop(L, 1);
                policy_problem(p, line ? line : policy_source_line(p, key, 1, 0), 0,
                               "handler key [%s] is not a status from 100 to 599", key);
                lua_pop(L, 1);
                continue;
            }
            slot = &exact[s];
            snprintf(name, sizeof name, "[%d]", (int)s);
            if (!is_fn) {
                char key[16];
                snprintf(key, sizeof key, "%d", (int)s);
                line = policy_source_line(p, key, 1, 0);
            }
        } else if (lua_type(L, -2) == LUA_TSTRING) {
            const char *k = lua_tostring(L, -2);
            size_t n = strlen(k);
            if (!is_fn)
                line = policy_source_line(p, k, 1, 0);
            if (n == 3 && k[0] >= '1' && k[0] <= '5' && k[1] == 'x' && k[2] == 'x') {
                slot = &klass[k[0] - '0'];
            } else if (strcmp(k, "default") == 0) {
                slot = &deflt;
            } else if (strcmp(k, "error") == 0) {
                slot = &p->error_ref;
            } else if (strcmp(k, "settings") == 0) {
                lua_pop(L, 1);
                continue;
            } else if (strcmp(k, "tests") == 0) {
                if (!lua_istable(L, -1)) {
                    policy_problem(p, line, 0, "tests must be a list of test tables");
                    lua_pop(L, 1);
                } else {
                    p->tests_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* pops it */
                }
                continue;
            } else if (n == 3 && k[0] >= '1' && k[0] <= '5' && k[1] >= '0' && k[1] <= '9' &&
                       k[2] >= '0' && k[2] <= '9') {
                policy_problem(p, line, 0, "handler key \"%s\" is a string: write [%s], a number",
                               k, k);
                lua_pop(L, 1);
                continue;
            } else {
                policy_problem(p, line, 1,
                               "unknown key '%s' ignored: handler keys are statuses ([403]), "
                               "classes (\"5xx\"), default and error",
                               k);
                lua_pop(L, 1);
                continue;
            }
            snprintf(name, sizeof name, "%s", k);
        } else {
            policy_problem(p, line, 0,
                           "policy keys are statuses, classes (\"4xx\"), default, error, "
                           "settings or tests; found a %s key",
                           luaL_typename(L, -2));
            lua_pop(L, 1);
            continue;
        }
        if (!is_fn) {
            policy_problem(p, line, 0, "handler %s must be a function, not a %s", name,
                           luaL_typename(L, -1));
            lua_pop(L, 1);
            continue;
        }
        p->n_handlers++;
        *slot = luaL_ref(L, LUA_REGISTRYINDEX); /* pops the function */
    }
    for (int s = 100; s < N_STATUS; s++)
        p->handler[s] = exact[s] != LUA_NOREF ? exact[s]
                        : klass[s / 100] != LUA_NOREF ? klass[s / 100]
                                                      : deflt;
}

/* Protected: reads the policy table (2) into the policy (1). */
static int load_step(lua_State *L)
{
    policy_t *p = lua_touserdata(L, 1);
    if (!lua_istable(L, 2))
        luaL_error(L, "the policy must return a table (it returned a %s)", luaL_typename(L, 2));
    policy_read_settings(p, L, 2);
    read_handlers(p, L, 2);
    return 0;
}

/* ---- loading ------------------------------------------------------------------- */

void policy_report_free(policy_report_t *r)
{
    buf_free(&r->errors);
    buf_free(&r->warnings);
    r->n_errors = r->n_warnings = 0;
}

char *policy_read_file(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char *data = malloc(MAX_POLICY_BYTES + 1);
    size_t n = data ? fread(data, 1, MAX_POLICY_BYTES + 1, f) : 0;
    int failed = data == NULL || ferror(f);
    fclose(f);
    if (failed || n > MAX_POLICY_BYTES) {
        snprintf(err, errlen, "%s: %s", path, failed ? "cannot read" : "larger than 4 MiB");
        free(data);
        return NULL;
    }
    data[n] = '\0';
    *len = n;
    return data;
}

/* Protected: installs the API. */
static int open_step(lua_State *L)
{
    lua_api_open(L);
    return 0;
}

/* Notes a Lua error message as a policy_problem. Lua's own messages start with
 * "file:line:" already. */
static void lua_problem(policy_t *p, const char *msg)
{
    char line[512];
    lua_api_error_line(msg, p->path, line, sizeof line);
    if (strncmp(line, p->path, strlen(p->path)) == 0)
        buf_printf(&p->report->errors, "%s\n", line);
    else
        buf_printf(&p->report->errors, "%s: %s\n", p->path, line);
    p->report->n_errors++;
}

policy_t *policy_load_text(const char *path, const char *src, size_t len, policy_report_t *rep)
{
    policy_t *p = calloc(1, sizeof *p);
    if (p == NULL) {
        buf_printf(&rep->errors, "%s: out of memory\n", path);
        rep->n_errors++;
        return NULL;
    }
    p->refs = 1;
    p->error_ref = p->tests_ref = LUA_NOREF;
    for (int i = 0; i < N_STATUS; i++)
        p->handler[i] = LUA_NOREF;
    p->settings = policy_defaults;
    p->report = rep;
    p->path = strdup(path);
    p->src = malloc(len + 1);
    sandbox_limits_t limits = limits_of(&policy_defaults);
    p->sandbox = sandbox_new(&limits);
    if (p->path == NULL || p->src == NULL || p->sandbox == NULL) {
        buf_printf(&rep->errors, "%s: out of memory\n", path);
        rep->n_errors++;
        goto fail;
    }
    memcpy(p->src, src, len);
    p->src[len] = '\0';
    p->src_len = len;
    sha256_hex(src, len, p->sha256);
    p->loaded_at_ms = clock_wall_ms();
    p->ctx.settings = &p->settings;
    rand_seed(&p->ctx.rng);
    sandbox_set_context(p->sandbox, &p->ctx);
    lua_State *L = sandbox_state(p->sandbox);
    if (sandbox_protect(L, open_step, 0, 0, 1) != SANDBOX_OK) {
        lua_problem(p, "out of memory");
        goto fail;
    }

    char chunkname[1024];
    snprintf(chunkname, sizeof chunkname, "@%s", path);
    if (luaL_loadbufferx(L, src, len, chunkname, "t") != LUA_OK ||
        sandbox_call(p->sandbox, 0, 1) != SANDBOX_OK) {
        lua_problem(p, lua_tostring(L, -1));
        goto fail;
    }
    lua_pushlightuserdata(L, p);
    lua_insert(L, -2); /* under the policy table */
    if (sandbox_protect(L, load_step, 2, 0, 1) != SANDBOX_OK) {
        lua_problem(p, lua_tostring(L, -1));
        goto fail;
    }
    if (rep->n_errors > 0)
        goto fail;
    lua_settop(L, 0);
    limits = limits_of(&p->settings);
    sandbox_set_limits(p->sandbox, &limits);
    p->report = NULL;
    return p;

fail:
    p->report = NULL;
    policy_release(p);
    return NULL;
}

policy_t *policy_load(const char *path, char *err, size_t errlen)
{
    size_t len = 0;
    char *src = policy_read_file(path, &len, err, errlen);
    if (src == NULL)
        return NULL;
    policy_report_t rep = POLICY_REPORT_INIT;
    policy_t *p = policy_load_text(path, src, len, &rep);
    free(src);
    if (p == NULL)
        lua_api_error_line(buf_cstr(&rep.errors), NULL, err, errlen);
    for (size_t i = 0; i < rep.warnings.len;) {
        size_t n = strcspn(rep.warnings.data + i, "\n");
        log_record_t *r = log_begin(LOG_WARN, "policy warning");
        log_strn(r, "warning", rep.warnings.data + i, n);
        log_end(r);
        i += n + 1;
    }
    policy_report_free(&rep);
    return p;
}

/* ---- deciding ------------------------------------------------------------------- */

const policy_settings_t *policy_settings(const policy_t *p)
{
    return &p->settings;
}

const char *policy_path(const policy_t *p)
{
    return p->path;
}

const char *policy_sha256(const policy_t *p)
{
    return p->sha256;
}

int64_t policy_loaded_at(const policy_t *p)
{
    return p->loaded_at_ms;
}

void policy_describe(const policy_t *p, int *handlers, int *tests)
{
    *handlers = p->n_handlers;
    *tests = 0;
    if (p->tests_ref != LUA_NOREF) {
        lua_State *L = sandbox_state(p->sandbox);
        lua_rawgeti(L, LUA_REGISTRYINDEX, p->tests_ref);
        *tests = (int)lua_rawlen(L, -1);
        lua_pop(L, 1);
    }
}

int policy_handles(const policy_t *p, int status)
{
    return status >= 0 && status < N_STATUS && p->handler[status] != LUA_NOREF;
}

int policy_handles_errors(const policy_t *p)
{
    return p->error_ref != LUA_NOREF;
}

uint64_t policy_backoff_ms(policy_t *p, int attempt)
{
    return retry_backoff_ms(&p->settings, &p->ctx.rng, attempt);
}

/* Writes `text` (`n` bytes) as the field `key` of `r`, the secrets of the
 * call `in` taken out. */
static void log_redacted(log_record_t *r, const char *key, const policy_settings_t *s,
                         const policy_input_t *in, const char *text, size_t n)
{
    buf_t clean = BUF_INIT;
    if (redact_scrub(s, in, text, n, 0, &clean))
        log_strn(r, key, clean.data, clean.len);
    else
        log_strn(r, key, text, n);
    buf_free(&clean);
}

/* Names in `r` what the handler was asked about: the status, or the kind
 * of failure. */
static void log_subject(log_record_t *r, const policy_input_t *in)
{
    if (in->res != NULL)
        log_int(r, "status", in->res->status);
    else
        log_str(r, "error_kind", in->err_kind);
}

/* Counts a handler call that ran out of time or memory; sets the handler
 * aside when it is the SET_ASIDE_AFTER-th within the window, or the first
 * on probation. */
static void note_exhausted(handler_health_t *h, const policy_settings_t *s,
                           const policy_input_t *in, uint64_t now)
{
    int failures;
    if (now < h->probation_ms) {
        failures = 1;
    } else {
        h->times = 0;
        if (h->fails == 0 || now - h->first_ms > SET_ASIDE_WINDOW_MS) {
            h->fails = 0;
            h->first_ms = now;
        }
        if (++h->fails < SET_ASIDE_AFTER)
            return;
        failures = SET_ASIDE_AFTER;
    }
    uint64_t ms = s->set_aside_ms; /* doubled each time in a row, up to the cap */
    for (int i = 0; i < h->times && ms < SET_ASIDE_MAX_MS; i++)
        ms = ms * 2 < SET_ASIDE_MAX_MS ? ms * 2 : SET_ASIDE_MAX_MS;
    h->times++;
    h->fails = 0;
    h->probation_ms = 0;
    h->until_ms = now + ms;
    log_record_t *r = log_begin(LOG_ERROR, "policy handler set aside: its responses pass for a while");
    log_subject(r, in);
    log_int(r, "failures", failures);
    log_int(r, "within_ms", SET_ASIDE_WINDOW_MS);
    log_int(r, "for_ms", (int64_t)ms);
    log_int(r, "times", h->times);
    log_end(r);
}

void policy_decide(policy_t *p, const policy_input_t *in, verdict_t *out)
{
    int ref = in->res != NULL ? p->handler[in->res->status] : p->error_ref;
    out->kind = VERDICT_PASS;
    if (ref == LUA_NOREF)
        return;
    handler_health_t *h = &p->health[in->res != NULL ? in->res->status : N_STATUS];
    if (h->until_ms != 0) {
        uint64_t now = clock_now_ms();
        if (now < h->until_ms) {
            out->failure = "set_aside";
            return;
        }
        h->until_ms = 0;
        h->probation_ms = now + SET_ASIDE_WINDOW_MS;
    }
    char msg[512];
    buf_t trace = BUF_INIT;
    msg[0] = '\0';
    sandbox_status_t st =
        lua_api_call_handler(p->sandbox, ref, in, p->path, out, msg, sizeof msg, &trace);
    if (st == SANDBOX_OK) {
        buf_free(&trace);
        return;
    }
    if (st == SANDBOX_TIMEOUT || st == SANDBOX_MEMORY)
        note_exhausted(h, &p->settings, in, clock_now_ms());
    /* Fail open: the response goes through as it is. */
    verdict_reset(out);
    out->failure = trace.len == 0 && st == SANDBOX_ERROR ? "verdict" : sandbox_status_name(st);
    log_record_t *r = log_begin(LOG_ERROR, "policy handler failed; passing the response through");
    log_str(r, "request_id", in->request_id);
    log_subject(r, in);
    log_str(r, "kind", out->failure);
    /* a handler may raise with a secret in its message */
    log_redacted(r, "error", &p->settings, in, msg, strlen(msg));
    if (trace.len > 0)
        log_redacted(r, "traceback", &p->settings, in, trace.data, trace.len);
    log_end(r);
    buf_free(&trace);
}

/* ---- lifetime ------------------------------------------------------------------- */

void policy_hold(policy_t *p)
{
    p->refs++;
}

void policy_release(policy_t *p)
{
    if (p == NULL || --p->refs > 0)
        return;
    policy_settings_free(&p->settings);
    sandbox_free(p->sandbox);
    buf_free(&p->ctx.test_alerts);
    free(p->path);
    free(p->src);
    free(p);
}

