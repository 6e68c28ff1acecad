"""Observability, black-box (SPEC §5 admin port and metrics, §6 logs and
redaction): the real errord binary, its admin port, its /metrics read back
by Debian's promtool and by a real Prometheus server, and every place a
secret header value could leak to.

- Admin routes: /healthz, /readyz (503 while draining), /metrics, /policy,
  POST /reload, /alerts; 405 with Allow, 404, the admin port never proxies.
- --admin-token / ERRORD_ADMIN_TOKEN: Bearer auth on every route but the probes (/healthz, /readyz).
- /metrics: every family with its type, `promtool check metrics` after mixed
  traffic (one and two workers), exact counts for a scripted run, bounded
  retry-reason cardinality, reload counters and the policy's sha256, gauges.
- A real Prometheus (/usr/bin/prometheus, config template in tests/prometheus/)
  scrapes errord's admin port every second, with and without the token.
- Redaction: secret header values never reach stdout, stderr, /alerts, a
  webhook sink or /metrics, whatever the policy does with them.
- Logs: JSON lines; --log-level warn drops info records, not the counting.

Every server here binds 127.0.0.1 on a free port and is stopped by its
fixture; every wait is bounded and scaled by SLOW."""

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import string
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest

from support import ERRORD, ROOT, SLOW, Client, closed_port, response, stop_process, wait_until

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROM_TEMPLATE = os.path.join(ROOT, "tests", "prometheus", "prometheus.yml.in")
FAST = "backoff = { base_ms = 1, max_ms = 5 }"
CONTENT_TYPE = "text/plain; version=0.0.4"

# Every family errord exposes, with its type (SPEC §5, issue "metrics").
FAMILIES = {
    "errord_requests_total": "counter",
    "errord_upstream_responses_total": "counter",
    "errord_upstream_errors_total": "counter",
    "errord_retries_total": "counter",
    "errord_retries_refused_total": "counter",
    "errord_policy_errors_total": "counter",
    "errord_policy_reloads_total": "counter",
    "errord_policy_info": "gauge",
    "errord_policy_loaded_timestamp_seconds": "gauge",
    "errord_request_duration_seconds": "histogram",
    "errord_upstream_attempt_duration_seconds": "histogram",
    "errord_client_connections": "gauge",
    "errord_upstream_connections": "gauge",
    "errord_cooldown_active": "gauge",
    "errord_cooldown_remaining_seconds": "gauge",
    "errord_alerts_firing": "gauge",
    "errord_alert_events_total": "counter",
    "errord_ready": "gauge",
    "errord_build_info": "gauge",
    "errord_alert_deliveries_total": "counter",
    "errord_alert_queue": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_start_time_seconds": "gauge",
}
UPSTREAM_ERROR_KINDS = {"connect", "tls", "timeout", "reset", "protocol", "deadline", "aborted"}
REFUSALS = {"attempts", "budget", "deadline", "unsafe", "body_too_large", "body_incomplete",
            "retry_after"}
POLICY_ERROR_KINDS = {"error", "timeout", "memory", "verdict", "set_aside"}
RELOAD_RESULTS = {"reloaded", "unchanged", "failed"}


# ---- helpers ----------------------------------------------------------------------------


def write_policy(tmp_path, body, settings="", name="policy.lua"):
    """Writes `local p = {} p.settings = {settings} <body> return p`; returns
    its path."""
    path = tmp_path / name
    path.write_text("local p = {}\np.settings = { %s }\n%s\nreturn p\n" % (settings, body))
    return str(path)


def admin_req(port, path, method="GET", headers=None, body=None):
    """(status, {lower-case header: value}, body bytes) of one admin request."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10 * SLOW)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?'
                     r'\s+(\S+)(?:\s+-?\d+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def _unescape(v):
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


class Metrics:
    """A parsed Prometheus text exposition."""

    def __init__(self, text):
        self.text = text
        self.types = {}
        self.samples = []  # (name, {label: value}, float)
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, typ = line.split(" ", 3)
                assert name not in self.types, "family %s declared twice" % name
                self.types[name] = typ
                continue
            if not line.strip() or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            assert m, "not a sample line: %r" % line
            labels = {}
            inner = (m.group(2) or "{}")[1:-1]
            pos = 0
            while pos < len(inner):
                lm = _LABEL.match(inner, pos)
                assert lm, "bad labels in %r" % line
                labels[lm.group(1)] = _unescape(lm.group(2))
                pos = lm.end()
            self.samples.append((m.group(1), labels, float(m.group(3))))

    def series(self, name):
        return [(labels, v) for n, labels, v in self.samples if n == name]

    def has(self, name, **labels):
        return any(all(l.get(k) == str(v) for k, v in labels.items()) for l, _ in self.series(name))

    def value(self, name, **labels):
        """The sum of the samples of `name` whose labels include `labels` (0 if none)."""
        return sum(v for l, v in self.series(name)
                   if all(l.get(k) == str(v2) for k, v2 in labels.items()))

    def by(self, name, *keys):
        """{(label values of keys): value} for `name`."""
        return {tuple(l.get(k) for k in keys): v for l, v in self.series(name)}


def scrape(e, headers=None):
    status, hdrs, body = admin_req(e.admin_port, "/metrics", headers=headers)
    assert status == 200, (status, body)
    assert hdrs["content-type"].startswith(CONTENT_TYPE), hdrs
    return Metrics(body.decode())


def settled(e, pred, timeout=5.0):
    """Scrapes until `pred(metrics)` holds (bounded); returns the last scrape."""
    last = [None]

    def check():
        last[0] = scrape(e)
        return pred(last[0])

    wait_until(check, timeout=timeout, interval=0.05)
    return last[0]


def promtool(text):
    """Runs `promtool check metrics` on `text`; fails the test on a non-zero exit."""
    if not os.access(PROMTOOL, os.X_OK):
        pytest.fail("%s is missing: run scripts/setup (it installs prometheus)" % PROMTOOL)
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True,
                       timeout=60)
    out = (p.stdout + p.stderr).decode("utf-8", "replace")
    assert p.returncode == 0, "promtool check metrics exited %d:\n%s\n---\n%s" % (
        p.returncode, out, text)
    return out


BUCKET_ENDS = ("0.0005", "60")


def check_histogram(m, name):
    """The histogram `name` is well formed; returns its _count."""
    buckets = m.series(name + "_bucket")
    les = [l["le"] for l, _ in buckets]
    assert les[0] == BUCKET_ENDS[0] and les[-2] == BUCKET_ENDS[1] and les[-1] == "+Inf", les
    bounds = [float(x) for x in les[:-1]]
    assert bounds == sorted(set(bounds)), les
    counts = [v for _, v in buckets]
    assert all(a <= b for a, b in zip(counts, counts[1:])), (name, counts)  # cumulative
    count = m.value(name + "_count")
    assert counts[-1] == count, (name, counts, count)
    total = m.value(name + "_sum")
    assert total >= 0 and (count > 0 or total == 0), (name, total, count)
    return count


def one_request(port, path, headers=None):
    """GET `path` on a connection of its own; returns the response."""
    c = Client(port)
    try:
        return c.get(path, headers)
    finally:
        c.close()


def malformed(port):
    """An HTTP/1.1 request without Host: errord answers 400 itself."""
    c = Client(port)
    try:
        c.send(b"GET /no-host HTTP/1.1\r\n\r\n")
        r = c.response()
        assert r is not None and r.status == 400, r and (r.status, r.body)
    finally:
        c.close()


def by_target(statuses):
    """An upstream handler: the n-th request for a path prefix gets
    statuses[prefix][n-1] (the last one repeats). Keeps connections alive."""
    seen = {}
    lock = threading.Lock()

    def handler(req):
        prefix = "/" + req.target.split("/")[1].split("?")[0]
        with lock:
            n = seen[req.target] = seen.get(req.target, 0) + 1
        seq = statuses.get(prefix, [200])
        status = seq[min(n, len(seq)) - 1]
        return response(status, b"upstream %d for %s" % (status, req.target.encode()))

    return handler


class Held:
    """An upstream answer held until release() (or 30 s)."""

    def __init__(self):
        self.arrived = threading.Event()
        self.go = threading.Event()

    def answer(self, req):
        def hold(conn):
            self.arrived.set()
            self.go.wait(30 * SLOW)
            try:
                # the connection ends with this answer: errord must not pool it
                conn.sendall(response(200, b"held", [("Connection", "close")]))
            except OSError:
                pass
        return hold

    def release(self):
        self.go.set()


# ---- admin routes -----------------------------------------------------------------------


def test_admin_routes_answer(upstream, errord, tmp_path):
    up = upstream()
    pol = write_policy(tmp_path, "p[503] = function(req, res) return retry {} end", FAST)
    sha = hashlib.sha256(open(pol, "rb").read()).hexdigest()
    e = errord(up.url, "--policy", pol)
    port = e.admin_port

    status, h, body = admin_req(port, "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert h["content-type"].startswith("application/json"), h
    status, h, body = admin_req(port, "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready"})
    status, h, body = admin_req(port, "/metrics")
    assert status == 200 and h["content-type"].startswith(CONTENT_TYPE), (status, h)
    assert b"errord_ready 1\n" in body
    status, h, body = admin_req(port, "/policy")
    assert status == 200 and json.loads(body)["sha256"] == sha, body
    status, h, body = admin_req(port, "/reload", method="POST")
    assert status == 200 and sha in body.decode(), body
    status, h, body = admin_req(port, "/alerts")
    assert status == 200 and isinstance(json.loads(body).get("alerts"), list), body
    # HEAD is GET without the body
    status, h, body = admin_req(port, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(h["content-length"]) > 0, (status, h)
    assert up.requests == []


@pytest.mark.parametrize("method,path,allow", [
    ("POST", "/metrics", "GET, HEAD"),
    ("DELETE", "/healthz", "GET, HEAD"),
    ("PUT", "/readyz", "GET, HEAD"),
    ("POST", "/policy", "GET, HEAD"),
    ("POST", "/alerts", "GET, HEAD"),
    ("GET", "/reload", "POST"),
])
def test_wrong_method_is_405_with_allow(upstream, errord, method, path, allow):
    e = errord(upstream().url)
    status, h, body = admin_req(e.admin_port, path, method=method,
                                body=b"" if method in ("POST", "PUT") else None)
    assert status == 405, (status, body)
    assert h.get("allow") == allow, h
    assert "message" in json.loads(body), body


def test_unknown_admin_path_is_404_and_the_admin_port_never_proxies(upstream, errord):
    up = upstream()
    e = errord(up.url)
    for method, path in (("GET", "/v1/items"), ("GET", "/"), ("POST", "/v1/items"),
                         ("GET", "/metrics/x"), ("GET", "/healthzz")):
        status, h, body = admin_req(e.admin_port, path, method=method,
                                    body=b"{}" if method == "POST" else None)
        assert status == 404, (method, path, status, body)
        assert "message" in json.loads(body), body
    # An absolute-form target naming the upstream is not proxied either.
    status, _, _ = admin_req(e.admin_port, up.url + "/v1/items")
    assert status == 404
    assert up.requests == [] and up.connections == 0
    # ...and the proxy port does not serve admin routes: /metrics there is the upstream's.
    r = one_request(e.port, "/metrics")
    assert (r.status, r.body) == (200, b"ok")
    assert [q.target for q in up.requests] == ["/metrics"]


def test_readyz_is_503_while_draining_then_errord_exits(upstream, errord):
    held = Held()
    up = upstream(held.answer)
    e = errord(up.url, "--drain-timeout", "%ds" % int(30 * SLOW))
    assert scrape(e).value("errord_ready") == 1
    c = Client(e.port, timeout=30)
    try:
        c.request("GET", "/slow")
        assert held.arrived.wait(10 * SLOW), "the request did not reach the upstream"
        e.send_signal(signal.SIGTERM)
        assert wait_until(lambda: e.find(msg="stopping: draining in-flight requests"), 5)
        status, _, body = admin_req(e.admin_port, "/readyz")
        assert (status, json.loads(body)) == (503, {"status": "draining"})
        # liveness is not readiness: /healthz still answers 200
        status, _, body = admin_req(e.admin_port, "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        m = scrape(e)
        assert m.value("errord_ready") == 0
        assert m.value("errord_client_connections") == 1
        time.sleep(0.3)  # still draining: the request is held
        assert e.proc.poll() is None
        status, _, _ = admin_req(e.admin_port, "/readyz")
        assert status == 503
        held.release()
        r = c.response()
        assert (r.status, r.body) == (200, b"held")
    finally:
        held.release()
        c.close()
    e.proc.wait(20 * SLOW)
    assert e.stop() == 0


# ---- the admin token ---------------------------------------------------------------------

TOKEN = "s3cret-Admin.token_42"
GUARDED = [("GET", "/metrics"), ("GET", "/policy"), ("POST", "/reload"),
           ("GET", "/alerts")]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_admin_token_guards_every_route_but_the_probes(upstream, errord, tmp_path, how):
    pol = write_policy(tmp_path, "", FAST)
    if how == "flag":
        e = errord(upstream().url, "--policy", pol, "--admin-token", TOKEN)
    else:
        e = errord(upstream().url, "--policy", pol, env={"ERRORD_ADMIN_TOKEN": TOKEN})
    port = e.admin_port
    status, _, body = admin_req(port, "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = admin_req(port, "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready"})
    wrong = [None, "Bearer wrong", "Bearer " + TOKEN[:-1], "Bearer " + TOKEN + "x",
             "Bearer " + TOKEN[1:], "Basic " + TOKEN, TOKEN, "Bearer", "Bearer ",
             "Bearer  " + TOKEN, "Bearer " + TOKEN.upper()]
    for method, path in GUARDED:
        body_arg = b"" if method == "POST" else None
        for auth in wrong:
            headers = {"Authorization": auth} if auth is not None else {}
            status, h, body = admin_req(port, path, method, headers, body_arg)
            assert status == 401, (method, path, auth, status, body)
            assert h.get("www-authenticate") == 'Bearer realm="errord"', h
            assert h["content-type"].startswith("application/json"), h
            assert "message" in json.loads(body) and TOKEN not in body.decode(), body
        status, h, body = admin_req(port, path, method, {"Authorization": "Bearer " + TOKEN},
                                    body_arg)
        assert status == 200, (method, path, status, body)
        assert "www-authenticate" not in h
    # A wrong method or an unknown path without the token does not reveal the routes.
    assert admin_req(port, "/metrics", "POST", body=b"")[0] == 401
    assert admin_req(port, "/nope")[0] == 401
    assert admin_req(port, "/nope", headers={"Authorization": "Bearer " + TOKEN})[0] == 404
    e.stop()
    assert TOKEN not in "".join(e.lines) + "".join(e.stderr)


@pytest.mark.parametrize("token,via", [("a b", "flag"), ("", "flag"), ("two words", "env"),
                                       ("tab\there", "flag")])
def test_bad_admin_token_exits_2(upstream, token, via):
    up = upstream()
    cmd = [ERRORD, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--policy", "off",
           "--upstream", up.url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERRORD_")}
    if via == "flag":
        cmd += ["--admin-token", token]
    else:
        env["ERRORD_ADMIN_TOKEN"] = token
    p = subprocess.run(cmd, capture_output=True, timeout=20 * SLOW, env=env)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert b"admin-token" in p.stderr, p.stderr


# ---- /metrics: families and promtool ------------------------------------------------------


def mixed_policy(tmp_path, hook_url):
    return write_policy(tmp_path, """
p[503] = function(req, res) return retry { reason = "flaky" } end
p[418] = function(req, res)
  alert { name = "Teapot", severity = "info", summary = "a teapot answered" }
  return respond { status = 200, body = "tea" }
end
p[500] = function(req, res) error("the 500 handler broke") end
p.error = function(req, err) error("the error handler broke on " .. err.kind) end
""", "attempts = 2, budget = false, %s, alerts = { { kind = \"webhook\", url = \"%s\" } }"
        % (FAST, hook_url))


def mixed_traffic(e, held=None):
    """Successes, retried 5xx, a respond{}, a failing handler, a malformed
    request, an upstream that resets, and (with `held`) a client that leaves
    before its answer."""
    for path in ("/ok/1", "/ok/2", "/once/1", "/flaky/1", "/tea/1", "/boom/1", "/reset/1"):
        one_request(e.port, path)
    malformed(e.port)
    if held is not None:
        c = Client(e.port)
        c.request("GET", "/held/1")
        assert held.arrived.wait(10 * SLOW)
        c.reset()


MIXED = {"/ok": [200], "/once": [503, 200], "/flaky": [503], "/tea": [418], "/boom": [500]}


def mixed_upstream(upstream, held):
    plain = by_target(MIXED)

    def handler(req):
        if req.target.startswith("/reset"):
            return None  # closes without an answer
        if req.target.startswith("/held"):
            return held.answer(req)
        return plain(req)

    return upstream(handler)


@pytest.mark.parametrize("workers", [1, 2])
def test_promtool_accepts_the_metrics_after_mixed_traffic(upstream, errord, tmp_path, workers):
    hook = upstream(lambda req: response(200, b"{}"))
    held = Held()
    up = mixed_upstream(upstream, held)
    pol = mixed_policy(tmp_path, hook.url + "/hook")
    e = errord(up.url, "--policy", pol, "--workers", str(workers))
    try:
        mixed_traffic(e, held)
    finally:
        held.release()
    # An upstream that refuses connections, with an error handler that errors.
    dead = errord("http://127.0.0.1:%d" % closed_port(), "--policy", pol, "--workers",
                  str(workers))
    for i in range(3):
        r = one_request(dead.port, "/refused/%d" % i)
        assert r.status == 502, (r.status, r.body)

    m = settled(e, lambda m: m.value("errord_requests_total", status=499) == 1
                and m.value("errord_alert_deliveries_total", result="sent") == 1, timeout=10)
    out = promtool(m.text)
    assert set(FAMILIES) <= set(m.types), sorted(set(FAMILIES) - set(m.types))
    for name, typ in FAMILIES.items():
        assert m.types[name] == typ, (name, m.types[name], typ)
    assert m.value("errord_requests_total", status=200, verdict="respond") == 1
    assert m.value("errord_retries_total", reason="flaky") == 2
    assert m.value("errord_policy_errors_total", kind="error") == 2  # /boom, and /reset's error()
    assert m.value("errord_upstream_errors_total", kind="aborted") == 1
    assert m.value("errord_alert_events_total") == 1
    assert m.value("errord_alert_deliveries_total", sink="1", kind="webhook", result="sent") == 1
    assert m.has("errord_alert_queue", sink="1", kind="webhook")
    check_histogram(m, "errord_request_duration_seconds")
    check_histogram(m, "errord_upstream_attempt_duration_seconds")

    d = settled(dead, lambda m: m.value("errord_upstream_errors_total", kind="connect") >= 3)
    promtool(d.text)
    assert d.value("errord_upstream_errors_total", kind="connect") >= 3, d.text
    assert d.value("errord_requests_total", status=502) == 3, d.text
    assert d.value("errord_policy_errors_total", kind="error") >= 3, d.text
    print("promtool check metrics (%d workers): %s" % (workers, out.strip() or "no remarks"))


def test_fixed_label_sets_and_build_info(upstream, errord, tmp_path):
    pol = write_policy(tmp_path, "", FAST)
    e = errord(upstream().url, "--policy", pol)
    m = scrape(e)
    assert set(m.by("errord_upstream_errors_total", "kind")) == {(k,) for k in UPSTREAM_ERROR_KINDS}
    assert set(m.by("errord_retries_refused_total", "why")) == {(k,) for k in REFUSALS}
    assert set(m.by("errord_policy_errors_total", "kind")) == {(k,) for k in POLICY_ERROR_KINDS}
    assert set(m.by("errord_policy_reloads_total", "result")) == {(k,) for k in RELOAD_RESULTS}
    assert set(m.by("errord_upstream_connections", "state")) == {("active",), ("idle",)}
    assert all(v == 0 for _, v in m.series("errord_upstream_errors_total"))
    (labels, v), = m.series("errord_build_info")
    assert v == 1 and set(labels) == {"version", "libuv", "llhttp", "lua"}, labels
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", labels[k]) for k in ("libuv", "llhttp", "lua")), labels
    assert labels["lua"].startswith("5.4."), labels
    version = subprocess.run([ERRORD, "--version"], capture_output=True, timeout=10).stdout.decode()
    assert labels["version"] in version, (labels, version)
    # the process_* family describes errord itself
    assert m.value("process_open_fds") > 3
    assert m.value("process_resident_memory_bytes") > 0
    assert m.value("process_virtual_memory_bytes") >= m.value("process_resident_memory_bytes")
    start = m.value("process_start_time_seconds")
    assert time.time() - 120 * SLOW < start <= time.time() + 1, start
    assert m.value("process_cpu_seconds_total") >= 0
    assert m.value("errord_ready") == 1
    assert m.value("errord_alerts_firing") == 0
    assert m.value("errord_cooldown_active") == 0
    assert m.value("errord_cooldown_remaining_seconds") == 0
    promtool(m.text)


# ---- /metrics: exact counts ----------------------------------------------------------------

EXACT_POLICY = """
p[503] = function(req, res) return retry { reason = "flaky" } end
p[418] = function(req, res) return respond { status = 200, body = "teapot answered" } end
p[500] = function(req, res) error("handler broke on " .. req.path) end
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_exact_counts_for_a_scripted_run(upstream, errord, tmp_path, workers):
    n = 5
    up = upstream(by_target(MIXED))
    pol = write_policy(tmp_path, EXACT_POLICY, "attempts = 2, budget = false, " + FAST)
    e = errord(up.url, "--policy", pol, "--workers", str(workers))
    expect_body = {"/ok": (200, b"upstream 200"), "/once": (200, b"upstream 200"),
                   "/flaky": (503, b"upstream 503"), "/tea": (200, b"teapot answered"),
                   "/boom": (500, b"upstream 500")}
    for i in range(n):
        for prefix, (status, body) in expect_body.items():
            r = one_request(e.port, "%s/%d" % (prefix, i))
            assert (r.status, r.body[:len(body)]) == (status, body), (prefix, r.status, r.body)
    total = 5 * n
    recs = e.wait_access(total)
    m = settled(e, lambda m: m.value("errord_requests_total") >= total
                and m.value("errord_client_connections") == 0)

    # requests by final status and the verdict of their last attempt
    assert m.by("errord_requests_total", "status", "verdict") == {
        ("200", "pass"): 2 * n,       # /ok, /once (503 then 200)
        ("503", "retry"): n,          # /flaky: the retry of its last 503 was refused
        ("200", "respond"): n,        # /tea
        ("500", "pass"): n,           # /boom: the handler failed open
    }, m.text
    # ...which is what the access records' ledgers say
    from_log = {}
    for rec in recs:
        verdict = rec["attempts"][-1]["verdict"] if rec["attempts"] else "none"
        key = (str(rec["status"]), verdict)
        from_log[key] = from_log.get(key, 0) + 1
    assert from_log == m.by("errord_requests_total", "status", "verdict"), from_log
    assert m.by("errord_upstream_responses_total", "status") == {
        ("200",): 2 * n, ("503",): 3 * n, ("418",): n, ("500",): n}, m.text
    assert len(up.requests) == 7 * n
    assert m.by("errord_retries_total", "reason") == {("flaky",): 2 * n}, m.text
    refused = m.by("errord_retries_refused_total", "why")
    assert refused == {(w,): (n if w == "attempts" else 0) for w in REFUSALS}, refused
    assert m.by("errord_policy_errors_total", "kind") == {
        ("error",): n, ("timeout",): 0, ("memory",): 0, ("verdict",): 0, ("set_aside",): 0}, m.text
    assert all(v == 0 for _, v in m.series("errord_upstream_errors_total")), m.text
    assert m.by("errord_policy_reloads_total", "result") == {
        ("reloaded",): 0, ("unchanged",): 0, ("failed",): 0}
    assert check_histogram(m, "errord_request_duration_seconds") == total
    assert check_histogram(m, "errord_upstream_attempt_duration_seconds") == 7 * n
    # every request took at least its attempts' time: the sums agree in order
    assert m.value("errord_request_duration_seconds_sum") >= \
        m.value("errord_upstream_attempt_duration_seconds_sum") * 0.9
    # the failed handler was logged once per call, with a file:line
    errs = e.all(msg="policy handler failed; passing the response through")
    assert len(errs) == n, errs
    assert m.value("errord_client_connections") == 0
    promtool(m.text)
    # A scrape changes nothing: counters are the same on the next one.
    again = scrape(e)
    for name in ("errord_requests_total", "errord_upstream_responses_total",
                 "errord_retries_total", "errord_retries_refused_total"):
        assert again.series(name) == m.series(name), name


@pytest.mark.parametrize("raw,status", [
    (b"GET /no-host HTTP/1.1\r\n\r\n", 400),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
])
def test_a_request_errord_rejects_is_counted_with_verdict_none(upstream, errord, raw, status):
    up = upstream()
    e = errord(up.url)
    c = Client(e.port)
    try:
        c.send(raw)
        r = c.response()
        assert r is not None and r.status == status, r and (r.status, r.body)
    finally:
        c.close()
    assert up.requests == []
    m = settled(e, lambda m: m.value("errord_requests_total") >= 1, timeout=2)
    assert m.by("errord_requests_total", "status", "verdict") == {(str(status), "none"): 1}, m.text
    assert m.value("errord_request_duration_seconds_count") == 1, m.text


def test_upstream_errors_and_client_gone_are_counted(upstream, errord, tmp_path):
    # connect: nothing listens at the upstream's port
    dead = errord("http://127.0.0.1:%d" % closed_port(), "--connect-timeout", "2s")
    for i in range(3):
        assert one_request(dead.port, "/c/%d" % i).status == 502
    recs = dead.wait_access(3)
    m = settled(dead, lambda m: m.value("errord_requests_total") >= 3)
    assert m.value("errord_upstream_errors_total", kind="connect") == 3, m.text
    verdicts = {r["attempts"][-1]["verdict"] for r in recs}
    assert len(verdicts) == 1, recs
    assert m.by("errord_requests_total", "status", "verdict") == {("502", verdicts.pop()): 3}
    assert m.series("errord_upstream_responses_total") == []
    check_histogram(m, "errord_upstream_attempt_duration_seconds")

    # aborted and 499: the client leaves while its request waits at the upstream
    held = Held()
    up = upstream(held.answer)
    e = errord(up.url)
    try:
        c = Client(e.port)
        c.request("GET", "/gone")
        assert held.arrived.wait(10 * SLOW)
        c.reset()  # gone: a half-close would still be answered
        time.sleep(0.3)  # errord may notice now, or only when the upstream answers
        held.release()
        rec = e.wait_access(1)[0]
    finally:
        held.release()
    assert rec["status"] == 499, rec
    m = settled(e, lambda m: m.value("errord_requests_total") >= 1)
    verdict = rec["attempts"][-1]["verdict"] if rec["attempts"] else "none"
    assert m.by("errord_requests_total", "status", "verdict") == {("499", verdict): 1}, m.text
    assert m.value("errord_upstream_errors_total", kind="aborted") == 1, m.text
    assert m.value("errord_upstream_errors_total") == 1, m.text
    assert check_histogram(m, "errord_request_duration_seconds") == 1


# ---- /metrics: retry reasons ---------------------------------------------------------------


def test_retry_reason_cardinality_is_bounded(upstream, errord, tmp_path):
    up = upstream(by_target({"/r": [503, 200]}))
    pol = write_policy(tmp_path, """
p[503] = function(req, res)
  return retry { reason = "r" .. req.path:match("/r/(%d+)") }
end
""", "attempts = 2, budget = false, " + FAST)
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    try:
        for i in range(40):
            r = c.get("/r/%d" % i)
            assert r.status == 200, (i, r.status)
    finally:
        c.close()
    e.wait_access(40)
    m = settled(e, lambda m: m.value("errord_retries_total") >= 40)
    reasons = m.by("errord_retries_total", "reason")
    named = {k[0]: v for k, v in reasons.items() if k[0] != "other"}
    assert len(named) <= 32, sorted(named)
    assert "other" in {k[0] for k in reasons}, reasons
    assert sum(reasons.values()) == 40, reasons
    # The first reasons seen keep their own series, one retry each.
    assert all(v == 1 for v in named.values()), named
    assert {"r%d" % i for i in range(len(named))} == set(named), sorted(named)
    assert reasons[("other",)] == 40 - len(named)
    assert len(reasons) == len(named) + 1
    promtool(m.text)


def test_retry_reasons_are_safe_label_values(upstream, errord, tmp_path):
    up = upstream(by_target({"/q": [503, 200]}))
    pol = write_policy(tmp_path, r"""
p[503] = function(req, res)
  return retry { reason = 'Say "Hi"\\ there\n' .. string.rep("x", 40) }
end
""", "attempts = 2, budget = false, " + FAST)
    e = errord(up.url, "--policy", pol)
    assert one_request(e.port, "/q/1").status == 200
    m = settled(e, lambda m: m.value("errord_retries_total") >= 1)
    promtool(m.text)
    (labels, v), = m.series("errord_retries_total")
    assert v == 1
    assert re.fullmatch(r"[a-z0-9_]{1,32}", labels["reason"]), labels
    rec = e.wait_access(1)[0]
    assert rec["attempts"][0]["reason"] == labels["reason"], rec  # the ledger says the same


# ---- /metrics: reloads ----------------------------------------------------------------------


def test_reload_counters_and_policy_info(upstream, errord, tmp_path):
    up = upstream()
    text1 = "local p = {}\np.settings = { %s }\np[500] = function() return retry {} end\nreturn p\n" \
        % FAST
    path = tmp_path / "reloadable.lua"
    path.write_text(text1)
    sha1 = hashlib.sha256(text1.encode()).hexdigest()
    e = errord(up.url, "--policy", str(path))
    m = scrape(e)
    (labels, v), = m.series("errord_policy_info")
    assert (labels, v) == ({"path": str(path), "sha256": sha1}, 1), m.series("errord_policy_info")
    loaded1 = m.value("errord_policy_loaded_timestamp_seconds")
    assert time.time() - 60 * SLOW < loaded1 <= time.time() + 1, loaded1

    def reloads():
        return {k[0]: v for k, v in scrape(e).by("errord_policy_reloads_total", "result").items()}

    assert reloads() == {"reloaded": 0, "unchanged": 0, "failed": 0}
    status, _, body = admin_req(e.admin_port, "/reload", "POST", body=b"")
    assert status == 200, body
    assert reloads() == {"reloaded": 0, "unchanged": 1, "failed": 0}

    time.sleep(0.05)  # the new load time is later
    text2 = text1.replace("retry {}", "respond { status = 200 }")
    path.write_text(text2)
    sha2 = hashlib.sha256(text2.encode()).hexdigest()
    status, _, body = admin_req(e.admin_port, "/reload", "POST", body=b"")
    assert status == 200 and sha2 in body.decode(), body
    assert reloads() == {"reloaded": 1, "unchanged": 1, "failed": 0}
    m = scrape(e)
    assert m.series("errord_policy_info") == [({"path": str(path), "sha256": sha2}, 1)]
    assert m.value("errord_policy_loaded_timestamp_seconds") > loaded1

    path.write_text("local p = {\nreturn p\n")  # a syntax error
    status, _, body = admin_req(e.admin_port, "/reload", "POST", body=b"")
    assert status == 422, body
    assert reloads() == {"reloaded": 1, "unchanged": 1, "failed": 1}
    m = scrape(e)
    assert m.series("errord_policy_info") == [({"path": str(path), "sha256": sha2}, 1)], \
        "a failed reload keeps the running policy"

    # SIGHUP counts too, once its reload is done.
    text3 = text2 + "-- a comment\n"
    path.write_text(text3)
    sha3 = hashlib.sha256(text3.encode()).hexdigest()
    e.send_signal(signal.SIGHUP)
    m = settled(e, lambda m: m.value("errord_policy_reloads_total", result="reloaded") == 2)
    assert m.by("errord_policy_reloads_total", "result") == {
        ("reloaded",): 2, ("unchanged",): 1, ("failed",): 1}, m.text
    assert m.series("errord_policy_info") == [({"path": str(path), "sha256": sha3}, 1)]
    # GET /policy tells the same story
    status, doc = e.admin("/policy")
    assert status == 200 and doc["sha256"] == sha3, doc
    assert doc.get("reloads") in (None, {"reloaded": 2, "unchanged": 1, "failed": 1}), doc
    promtool(m.text)


def test_policy_off_has_no_policy_info(upstream, errord):
    e = errord(upstream().url)
    m = scrape(e)
    assert m.series("errord_policy_info") == []
    promtool(m.text)


# ---- /metrics: gauges -----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_client_connections_gauge(upstream, errord, workers):
    e = errord(upstream().url, "--workers", str(workers))
    clients = []
    try:
        for i in range(6):
            c = Client(e.port)
            clients.append(c)
            r = c.get("/k/%d" % i)  # keep-alive: the connection stays open
            assert r.status == 200
        m = settled(e, lambda m: m.value("errord_client_connections") == 6)
        assert m.value("errord_client_connections") == 6, m.text
    finally:
        for c in clients[:3]:
            c.close()
    m = settled(e, lambda m: m.value("errord_client_connections") == 3)
    assert m.value("errord_client_connections") == 3, m.text
    for c in clients[3:]:
        c.close()
    m = settled(e, lambda m: m.value("errord_client_connections") == 0)
    assert m.value("errord_client_connections") == 0, m.text


def test_upstream_connections_gauge(upstream, errord):
    held = Held()
    up = upstream(lambda req: held.answer(req) if req.target == "/held" else response(200, b"ok"))
    e = errord(up.url)
    c = Client(e.port)
    try:
        assert c.get("/one").status == 200
        m = settled(e, lambda m: m.value("errord_upstream_connections", state="idle") == 1)
        assert m.by("errord_upstream_connections", "state") == {("active",): 0, ("idle",): 1}
        c2 = Client(e.port)
        try:
            c2.request("GET", "/held")
            assert held.arrived.wait(10 * SLOW)
            m = settled(e, lambda m: m.value("errord_upstream_connections", state="active") == 1)
            assert m.by("errord_upstream_connections", "state") == {("active",): 1, ("idle",): 0}
            held.release()
            assert c2.response().status == 200
        finally:
            held.release()
            c2.close()
        m = settled(e, lambda m: m.value("errord_upstream_connections", state="active") == 0)
        assert m.by("errord_upstream_connections", "state") == {("active",): 0, ("idle",): 0}
        assert c.get("/two").status == 200  # a new connection, pooled after its answer
        m = settled(e, lambda m: m.value("errord_upstream_connections", state="idle") == 1)
        assert m.by("errord_upstream_connections", "state") == {("active",): 0, ("idle",): 1}
        assert up.connections == 2
    finally:
        c.close()


def test_cooldown_gauges(upstream, errord, tmp_path):
    cool_ms = int(2000 * SLOW)
    up = upstream(lambda req: response(503, b"slow down"))
    pol = write_policy(tmp_path, "p[503] = function(req, res) errord.cooldown(%d) end" % cool_ms,
                       FAST)
    e = errord(up.url, "--policy", pol)
    m = scrape(e)
    assert (m.value("errord_cooldown_active"), m.value("errord_cooldown_remaining_seconds")) == (0, 0)
    t0 = time.monotonic()
    assert one_request(e.port, "/x").status == 503
    m = scrape(e)
    assert m.value("errord_cooldown_active") == 1, m.text
    remaining = m.value("errord_cooldown_remaining_seconds")
    assert 0 < remaining <= cool_ms / 1000.0, remaining
    m = settled(e, lambda m: m.value("errord_cooldown_active") == 0, timeout=10)
    assert m.value("errord_cooldown_active") == 0 and m.value("errord_cooldown_remaining_seconds") == 0
    assert time.monotonic() - t0 >= cool_ms / 1000.0 - 0.1


# ---- a real Prometheus ----------------------------------------------------------------------


class Prometheus:
    """/usr/bin/prometheus on a free loopback port scraping `targets`, its
    storage in `workdir`."""

    def __init__(self, workdir, **targets):
        if not os.access(PROMETHEUS, os.X_OK):
            pytest.fail("%s is missing: run scripts/setup (it installs prometheus)" % PROMETHEUS)
        os.makedirs(workdir, exist_ok=True)
        self.config = os.path.join(workdir, "prometheus.yml")
        with open(PROM_TEMPLATE) as f:
            text = string.Template(f.read()).substitute(targets)
        with open(self.config, "w") as f:
            f.write(text)
        check = subprocess.run([PROMTOOL, "check", "config", self.config], capture_output=True,
                               timeout=60)
        assert check.returncode == 0, (check.stdout + check.stderr).decode()
        self.proc = None
        self.log_path = os.path.join(workdir, "prometheus.log")
        for _ in range(3):  # another process may take the free port first
            self.port = closed_port()
            self.url = "http://127.0.0.1:%d" % self.port
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [PROMETHEUS, "--config.file=" + self.config,
                     "--storage.tsdb.path=" + os.path.join(workdir, "data"),
                     "--web.listen-address=127.0.0.1:%d" % self.port,
                     "--log.level=warn"],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            if wait_until(lambda: self.proc.poll() is not None or self._ready(), timeout=30) \
                    and self.proc.poll() is None:
                return
            self.stop()
        with open(self.log_path) as f:
            pytest.fail("Prometheus did not start:\n" + f.read())

    def _ready(self):
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path, **query):
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def targets(self):
        return {t["labels"]["job"]: t for t in self.api("/api/v1/targets")["activeTargets"]}

    def stop(self):
        stop_process(self.proc, 20)


@pytest.fixture
def prometheus(tmp_path):
    """prometheus(**targets) -> a running Prometheus, stopped when the test ends."""
    started = []

    def start(**targets):
        p = Prometheus(str(tmp_path / ("prometheus-%d" % len(started))), **targets)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def test_prometheus_scrapes_errord(prometheus, upstream, errord, tmp_path):
    up = upstream(by_target({"/ok": [200], "/missing": [404], "/once": [503, 200]}))
    pol = write_policy(tmp_path, 'p[503] = function(req, res) return retry { reason = "flaky" } end',
                       "budget = false, " + FAST)
    e = errord(up.url, "--policy", pol, "--workers", "2")
    guarded = errord(up.url, "--admin-token", TOKEN)
    for path in ("/ok/1", "/ok/2", "/ok/3", "/missing/1", "/missing/2", "/once/1"):
        one_request(e.port, path)
    one_request(guarded.port, "/ok/9")
    expected = settled(e, lambda m: m.value("errord_requests_total") == 6)
    want = {k: v for k, v in expected.by("errord_requests_total", "status", "verdict").items()}
    assert want == {("200", "pass"): 4, ("404", "pass"): 2}, want

    prom = prometheus(errord="127.0.0.1:%d" % e.admin_port,
                      errord_token="127.0.0.1:%d" % guarded.admin_port, token=TOKEN)

    def healths():
        try:
            return {job: t["health"] for job, t in prom.targets().items()}
        except OSError:
            return {}

    wanted = {"errord": "up", "errord-token": "up", "errord-no-token": "down"}
    assert wait_until(lambda: healths() == wanted, timeout=30), prom.targets()
    targets = prom.targets()
    assert targets["errord"]["scrapeUrl"] == "http://127.0.0.1:%d/metrics" % e.admin_port
    assert targets["errord"]["lastError"] == "", targets["errord"]
    assert "401" in targets["errord-no-token"]["lastError"], targets["errord-no-token"]

    def queried():
        try:
            res = prom.api("/api/v1/query", query='errord_requests_total{job="errord"}')["result"]
        except OSError:
            return None
        got = {(s["metric"].get("status"), s["metric"].get("verdict")): float(s["value"][1])
               for s in res}
        return got if got == want else None

    assert wait_until(queried, timeout=30), prom.api("/api/v1/query", query="errord_requests_total")
    res = prom.api("/api/v1/query", query='errord_requests_total{job="errord"}')["result"]
    for s in res:
        assert s["metric"]["instance"] == "127.0.0.1:%d" % e.admin_port, s
        assert s["metric"]["__name__"] == "errord_requests_total", s
    # the other families arrive too: retries by reason, the histogram, the token-guarded errord
    retries = prom.api("/api/v1/query", query='errord_retries_total{job="errord"}')["result"]
    assert [(s["metric"]["reason"], s["value"][1]) for s in retries] == [("flaky", "1")], retries
    counts = prom.api("/api/v1/query",
                      query='errord_request_duration_seconds_count{job="errord"}')["result"]
    assert [s["value"][1] for s in counts] == ["6"], counts
    guarded_reqs = prom.api("/api/v1/query",
                            query='sum(errord_requests_total{job="errord-token"})')["result"]
    assert [s["value"][1] for s in guarded_reqs] == ["1"], guarded_reqs
    up_series = prom.api("/api/v1/query", query="up")["result"]
    assert {s["metric"]["job"]: s["value"][1] for s in up_series} == {
        "errord": "1", "errord-token": "1", "errord-no-token": "0"}, up_series


# ---- redaction --------------------------------------------------------------------------------

AUTH_TOKEN = "tok-7f3a9c2e41b8"
SESSION = "sess-0a1b2c3d4e"
SECRETS = {
    "Authorization": "Bearer " + AUTH_TOKEN,
    "Proxy-Authorization": "Basic cHJveHktc2VjcmV0LTk5",
    "Cookie": 'sid="c00k\\ie-v4lue"; theme=dark-9x',
    "X-Api-Key": "k3y-5566aa77",
    # in settings.secret_headers as X-Session-Token; "Scheme credentials" too
    "X-SESSION-TOKEN": "Token " + SESSION,
}
SET_COOKIE = "srv=set-c00kie-8812; HttpOnly"
# What must never appear: every value, and the credentials of "Scheme credentials".
NEEDLES = list(SECRETS.values()) + [SET_COOKIE, AUTH_TOKEN, "cHJveHktc2VjcmV0LTk5", SESSION]

LEAKY_POLICY = """
local function secrets(req, res)
  local h = req.headers
  local auth = h.authorization or ""
  return {
    auth = auth, token = auth:sub(8), proxy = h["proxy-authorization"],
    proxy_creds = (h["proxy-authorization"] or ""):sub(7),
    cookie = h.cookie, key = h["x-api-key"], session = h["x-session-token"],
    session_creds = (h["x-session-token"] or ""):sub(7),
    set_cookie = res and res.headers["set-cookie"] or nil,
  }
end

local function everything(s)
  return table.concat({ s.auth, s.token, s.proxy, s.proxy_creds, s.cookie, s.key, s.session,
                        s.session_creds, s.set_cookie or "" }, " | ")
end

p[200] = function(req, res)
  local s = secrets(req, res)
  log(s)
  log { note = "all of them: " .. everything(s) }
  print("print: " .. everything(s))
  alert { name = "LeakCheck", severity = "warning", summary = "summary: " .. everything(s),
          labels = { token = s.token, session = s.session_creds, key = s.key } }
  -- The policy reads the real value of a secret header and decides on it.
  if s.session_creds == "%(session)s" then
    return respond { status = 202, headers = { ["x-decided"] = "on-the-secret" },
                     body = "the policy read the secret" }
  end
end

p[500] = function(req, res)
  error("x" .. req.headers.authorization .. " / " .. req.headers["x-session-token"]
        .. " / " .. req.headers["x-session-token"]:sub(7))
end
""" % {"session": SESSION}


def strings_in(v):
    """Every string inside a decoded JSON value (keys included)."""
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield k
            yield from strings_in(x)
    elif isinstance(v, list):
        for x in v:
            yield from strings_in(x)


def assert_no_secret(where, text, decoded=None):
    for needle in NEEDLES:
        escaped = json.dumps(needle)[1:-1]
        assert needle not in text and escaped not in text, \
            "%s holds the secret %r:\n%s" % (where, needle, text[:4000])
        for s in strings_in(decoded):
            assert needle not in s, "%s holds the secret %r in %r" % (where, needle, s)


def test_secret_headers_never_reach_any_output(upstream, errord, tmp_path):
    hook = upstream(lambda req: response(200, b"{}"))
    up = upstream(lambda req: response(500 if req.target.startswith("/boom") else 200,
                                       b"upstream body", [("Set-Cookie", SET_COOKIE)]))
    pol = write_policy(tmp_path, LEAKY_POLICY,
                       'secret_headers = { "X-Session-Token" }, %s, '
                       'alerts = { { kind = "webhook", url = "%s/hook" } }' % (FAST, hook.url))
    e = errord(up.url, "--policy", pol, "--log-level", "debug")
    headers = list(SECRETS.items())
    r = one_request(e.port, "/read", headers)
    assert (r.status, r.body) == (202, b"the policy read the secret"), (r.status, r.body)
    assert r.header("x-decided") == "on-the-secret"
    r = one_request(e.port, "/boom", headers)
    assert r.status == 500  # the handler failed open
    # The upstream got every header as sent: redaction is for output only.
    got = up.requests[0]
    for name, value in SECRETS.items():
        assert got.header(name) == value, (name, got.headers)

    recs = e.wait_access(2)
    assert wait_until(lambda: hook.requests, timeout=5), "the webhook got nothing"
    status, alerts_body = e.admin("/alerts")
    assert status == 200
    metrics_text = scrape(e).text
    e.stop()

    # What errord wrote is there, with the values written "[redacted]".
    read = [x for x in recs if x["path"] == "/read"][0]
    for name in SECRETS:
        assert read["req_headers"].get(name.lower()) == "[redacted]", read["req_headers"]
    seen = read["attempts"][0].get("headers", {})
    assert seen.get("set-cookie") == "[redacted]", read["attempts"]
    logs = e.all(type="log")
    values = [x for x in logs if "auth" in x]
    assert len(values) == 1, logs
    # (token and proxy_creds are substrings of what the policy read: no secret, checked below)
    for k in ("auth", "proxy", "cookie", "key", "session", "session_creds", "set_cookie"):
        assert "[redacted]" in values[0][k], (k, values[0])
    assert values[0]["session_creds"] == "[redacted]", values[0]
    notes = [x for x in logs if "note" in x]
    assert len(notes) == 1 and "[redacted]" in notes[0]["note"], notes
    prints = e.all(msg="policy print")
    assert len(prints) == 1 and "[redacted]" in prints[0]["text"], prints
    fired = e.all(type="alert", name="LeakCheck")
    assert fired and "[redacted]" in json.dumps(fired), fired
    failed = e.all(msg="policy handler failed; passing the response through")
    assert len(failed) == 1 and "[redacted]" in failed[0]["error"], failed
    assert "[redacted]" in json.dumps(alerts_body), alerts_body

    # ...and no secret anywhere.
    assert_no_secret("stdout", "".join(e.lines), e.records)
    assert_no_secret("stderr", "".join(e.stderr))
    assert_no_secret("GET /alerts", json.dumps(alerts_body), alerts_body)
    for q in hook.requests:
        assert_no_secret("the webhook payload", q.body.decode("utf-8", "replace"),
                         json.loads(q.body))
    assert_no_secret("/metrics", metrics_text)


def test_a_policy_can_decide_on_the_builtin_secret_headers(upstream, errord, tmp_path):
    up = upstream(lambda req: response(200, b"upstream body", [("Set-Cookie", SET_COOKIE)]))
    pol = write_policy(tmp_path, """
p[200] = function(req, res)
  local h = req.headers
  local seen = {}
  if h.authorization == "%s" then seen[#seen + 1] = "authorization" end
  if h.authorization and h.authorization:sub(8) == "%s" then seen[#seen + 1] = "token" end
  if h["proxy-authorization"] == "%s" then seen[#seen + 1] = "proxy-authorization" end
  if h["x-api-key"] == "%s" then seen[#seen + 1] = "x-api-key" end
  if res.headers["set-cookie"] == "%s" then seen[#seen + 1] = "set-cookie" end
  log { token = h.authorization and h.authorization:sub(8) }
  return respond { status = 200, body = table.concat(seen, ",") }
end
""" % (SECRETS["Authorization"], AUTH_TOKEN, SECRETS["Proxy-Authorization"],
       SECRETS["X-Api-Key"], SET_COOKIE), FAST)
    e = errord(up.url, "--policy", pol)
    builtin = [(k, v) for k, v in SECRETS.items() if k != "X-SESSION-TOKEN"]
    r = one_request(e.port, "/decide", builtin)
    e.wait_access(1)
    e.stop()
    assert_no_secret("stdout", "".join(e.lines), e.records)
    # the token alone, logged by the policy, is written "[redacted]"
    assert [x["token"] for x in e.all(type="log")] == ["[redacted]"], e.all(type="log")
    assert (r.status, r.body) == (
        200, b"authorization,token,proxy-authorization,x-api-key,set-cookie"), r.body


def test_short_secret_values_are_still_redacted_by_name(upstream, errord, tmp_path):
    """Values under 4 bytes are not searched for in what a policy writes
    (they would match ordinary words), so a policy's log{} of one is not
    required to hide it; the access record's headers are redacted by name
    whatever the length."""
    up = upstream()
    pol = write_policy(tmp_path, "p[200] = function(req, res) log { note = 'seen' } end", FAST)
    e = errord(up.url, "--policy", pol)
    r = one_request(e.port, "/short", [("Authorization", "abc"), ("X-Api-Key", "k1")])
    assert r.status == 200
    rec = e.wait_access(1)[0]
    assert rec["req_headers"]["authorization"] == "[redacted]", rec
    assert rec["req_headers"]["x-api-key"] == "[redacted]", rec


# ---- logs -------------------------------------------------------------------------------------


def test_log_lines_are_json_objects(upstream, errord, tmp_path):
    up = upstream(by_target({"/once": [503, 200]}))
    pol = write_policy(tmp_path, """
p[503] = function(req, res) log { note = "retrying" } print("a print") return retry {} end
""", FAST)
    e = errord(up.url, "--policy", pol)
    assert one_request(e.port, "/once/1").status == 200
    malformed(e.port)
    e.wait_access(1)
    assert wait_until(lambda: e.find(msg="rejected a request"), 5)
    e.stop()
    assert e.lines and len(e.lines) == len(e.records), [l for l in e.lines if not l.startswith("{")]
    for rec in e.records:
        assert rec.get("level") in ("debug", "info", "warn", "error"), rec
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec.get("time", "")), rec


def test_log_level_warn_drops_info_records_but_metrics_count(upstream, errord, tmp_path):
    up = upstream(by_target({"/f": [503]}))
    pol = write_policy(tmp_path, """
p[503] = function(req, res)
  log { note = "an info record" }
  alert { name = "Warned", severity = "warning", summary = "a warn record" }
  return retry { reason = "flaky" }
end
""", "attempts = 2, budget = false, " + FAST)
    port, admin = closed_port(), closed_port()
    e = errord(up.url, "--policy", pol, "--log-level", "warn", "--admin", "127.0.0.1:%d" % admin,
               listen="127.0.0.1:%d" % port, check_start=False)
    e.port, e.admin_port = port, admin

    def healthy():
        try:
            return admin_req(admin, "/healthz")[0] == 200
        except OSError:
            return e.proc.poll() is not None

    assert wait_until(healthy, timeout=10) and e.proc.poll() is None, "".join(e.stderr)
    for i in range(3):
        assert one_request(port, "/ok/%d" % i).status == 200
    assert one_request(port, "/f/1").status == 503
    m = settled(e, lambda m: m.value("errord_requests_total") == 4)
    assert m.by("errord_requests_total", "status", "verdict") == {
        ("200", "pass"): 3, ("503", "retry"): 1}, m.text
    assert m.value("errord_retries_total", reason="flaky") == 1
    assert wait_until(lambda: e.find(type="alert", name="Warned"), 5), e.records
    e.stop()
    assert len(e.lines) == len(e.records), e.lines
    levels = {r["level"] for r in e.records}
    assert levels <= {"warn", "error"}, [r for r in e.records if r["level"] not in ("warn", "error")]
    assert e.access() == [] and e.all(type="log") == [] and e.find(msg="errord started") is None
