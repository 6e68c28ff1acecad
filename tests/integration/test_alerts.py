"""Alert delivery, black-box (issue 5; SPEC §2 settings.alerts, §5 GET /alerts).

The real errord binary runs a policy written into tmp_path whose 403 handler
raises alert{}; the policy's settings.alerts names the sinks. They are:

- a real Alertmanager (Debian's prometheus-alertmanager, config in
  tests/alertmanager/), started here on a free loopback port with its storage
  in tmp_path and no clustering, and read back through its own
  GET /api/v2/alerts;
- recording HTTP servers (the `upstream` fixture: every request is kept with
  its body) that answer 200, 500 then 200, 400, slowly, or never, and a
  closed port.

errord looks at its alert table every 200 ms, so a first delivery takes up to
about that long; retries back off from 1 s. Timings here are a few hundred ms
(resolve_after_ms, repeat_ms) and every wait is bounded. Figures (proxied p99
with a healthy and a dead sink, alerts delivered per second) are printed:
run with `pytest -s` to see them."""

import datetime
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest

from support import ERRORD, ROOT, SLOW, Client, closed_port, response, stop_process, wait_until

AM_BIN = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
AM_CONFIG = os.path.join(ROOT, "tests", "alertmanager", "alertmanager.yml")
FORBIDDEN = response(403, b'{"message":"forbidden"}', [("Content-Type", "application/json")])
NAME = "UpstreamForbidden"
SINK_FIELDS = {"kind", "url", "state", "queued", "sent", "failed", "dropped", "last_status",
               "last_error"}
PD_SEVERITIES = {"critical", "error", "warning", "info"}
_names = itertools.count()


# ---- helpers ----------------------------------------------------------------------------


def lua(v):
    """A Python value as a Lua constructor (strings, numbers, lists, dicts)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # ASCII only here: JSON's escapes are Lua's
    if isinstance(v, dict):
        return "{ " + ", ".join("[%s] = %s" % (lua(k), lua(x)) for k, x in v.items()) + " }"
    return "{ " + ", ".join(lua(x) for x in v) + " }"


# The 403 handler: the alert's name, severity, summary and team label can be
# chosen per request (X-Alert, X-Severity, X-Summary, X-Team); its labels are
# the request's path and the team.
HANDLER = """
p[403] = function(req, res)
  alert { name = req.headers["x-alert"] or "UpstreamForbidden",
          severity = req.headers["x-severity"] or "warning",
          summary = req.headers["x-summary"]
                    or ("upstream refused " .. req.method .. " " .. req.path),
          labels = { path = req.path, team = req.headers["x-team"] or "payments" } }
end
"""


def alert_policy(tmp_path, sinks, **settings):
    """Writes a policy with settings.alerts = `sinks` (a list of dicts) plus
    `settings`, and the 403 handler above; returns its path."""
    settings["alerts"] = sinks
    path = tmp_path / ("alerts_%d.lua" % next(_names))
    path.write_text("local p = {}\np.settings = %s\n%s\nreturn p\n" % (lua(settings), HANDLER))
    return str(path)


def fire(e, paths, headers=None):
    """Sends GET `path` for each of `paths` through errord (the upstream
    answers 403, so each raises an alert); returns each request's latency."""
    c = Client(e.port)
    took = []
    try:
        for p in paths:
            t = time.perf_counter()
            r = c.get(p, headers)
            took.append(time.perf_counter() - t)
            assert r.status == 403, (p, r.status, r.body)
    finally:
        c.close()
    return took


def alerts_doc(e):
    status, doc = e.admin("/alerts")
    assert status == 200, (status, doc)
    return doc


def sink_state(e, url):
    """The delivery state of the sink configured with `url`."""
    doc = alerts_doc(e)
    for s in doc["sinks"]:
        if s["url"] == url:
            return s
    raise AssertionError("no sink %s in %r" % (url, doc["sinks"]))


def ts(text):
    """An RFC 3339 timestamp as epoch seconds (any number of fraction digits)."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    assert m, "not an RFC 3339 timestamp: %r" % text
    base = datetime.datetime.fromisoformat(m.group(1) + (m.group(3).replace("Z", "+00:00")))
    return base.timestamp() + float("0." + (m.group(2) or "0"))


def p99(samples):
    s = sorted(samples)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def p50(samples):
    s = sorted(samples)
    return s[len(s) // 2]


class Sink:
    """A recording HTTP server: every POST is kept as (monotonic time, Request)
    and answered with `answer(req, n)` (n counts from 1): raw response bytes,
    or a function taking over the socket (see support.Upstream)."""

    def __init__(self, upstream, answer=None):
        self.posts = []
        self.lock = threading.Lock()
        self.answer = answer or (lambda req, n: response(200, b"{}"))
        self.server = upstream(self._handle)
        self.url = self.server.url

    def _handle(self, req):
        with self.lock:
            self.posts.append((time.monotonic(), req))
            n = len(self.posts)
        return self.answer(req, n)

    def got(self, target=None):
        """[(time, Request)] of the requests to `target` (or all)."""
        with self.lock:
            return [(t, r) for t, r in self.posts if target is None or r.target == target]

    def bodies(self, target=None):
        return [json.loads(r.body) for _, r in self.got(target)]


def stall(req, n):
    """Accepts the request and never answers (until errord gives up)."""
    def hold(conn):
        conn.settimeout(30)
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass
    return hold


def answer_after(seconds, status=200):
    def answer(req, n):
        def late(conn):
            time.sleep(seconds)
            conn.sendall(response(status, b"{}"))
        return late
    return answer


# ---- Alertmanager -----------------------------------------------------------------------


class Alertmanager:
    """prometheus-alertmanager on a free loopback port, storage in `workdir`."""

    def __init__(self, workdir):
        if not os.access(AM_BIN, os.X_OK):
            pytest.fail("%s is missing: run scripts/setup (it installs prometheus-alertmanager)"
                        % AM_BIN)
        os.makedirs(workdir, exist_ok=True)
        self.proc = None
        self.log_path = os.path.join(workdir, "alertmanager.log")
        for _ in range(3):  # another process may take the free port first
            self.port = closed_port()
            self.url = "http://127.0.0.1:%d" % self.port
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [AM_BIN, "--config.file=" + AM_CONFIG,
                     "--storage.path=" + os.path.join(workdir, "data"),
                     "--web.listen-address=127.0.0.1:%d" % self.port,
                     "--cluster.listen-address=", "--log.level=warn"],
                    stdout=log, stderr=log)
            if wait_until(lambda: self.proc.poll() is not None or self._ready(), timeout=15) \
                    and self.proc.poll() is None:
                return
            self.stop()
        with open(self.log_path) as f:
            pytest.fail("Alertmanager did not start:\n" + f.read())

    def _ready(self):
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def alerts(self, query=""):
        with urllib.request.urlopen(self.url + "/api/v2/alerts" + query, timeout=5) as r:
            return json.loads(r.read())

    def ours(self, query=""):
        return [a for a in self.alerts(query) if a["labels"].get("alertname") == NAME]

    def stop(self):
        stop_process(self.proc, 10)


@pytest.fixture
def alertmanager(tmp_path):
    """alertmanager() -> a running Alertmanager, stopped when the test ends."""
    started = []

    def start():
        am = Alertmanager(str(tmp_path / ("alertmanager-%d" % len(started))))
        started.append(am)
        return am

    yield start
    for am in started:
        am.stop()


def resolved_in(am):
    """Whether Alertmanager no longer has our alert active: gone from its
    list (what 0.25 does with a resolved alert) or with endsAt passed."""
    now = time.time()
    return all(ts(a["endsAt"]) <= now for a in am.ours())


# ---- a real Alertmanager ------------------------------------------------------------------


def test_alertmanager_shows_the_alert_and_resolves_it(alertmanager, upstream, errord, tmp_path):
    am = alertmanager()
    up = upstream(lambda req: FORBIDDEN)
    pol = alert_policy(tmp_path, [{"kind": "alertmanager", "url": am.url}],
                       resolve_after_ms=1500, repeat_ms=500)
    e = errord(up.url, "--policy", pol)
    before = time.time()
    fire(e, ["/v1/orders?id=7"] * 3)
    last_event = time.monotonic()
    after = time.time()

    # The first delivery may carry count 1 or 2; the re-sends every repeat_ms
    # bring Alertmanager up to date.
    wait_until(lambda: any(a["annotations"].get("count") == "3" for a in am.ours()), timeout=5)
    got = am.ours()
    assert len(got) == 1, got
    a = got[0]
    assert a["labels"] == {"alertname": NAME, "severity": "warning", "upstream": up.url,
                           "path": "/v1/orders?id=7", "team": "payments"}, a
    assert a["annotations"]["summary"] == "upstream refused GET /v1/orders?id=7", a
    assert a["annotations"]["count"] == "3", a
    assert before - 1 <= ts(a["startsAt"]) <= after + 1, (a["startsAt"], before, after)
    assert a["status"]["state"] == "active", a
    assert ts(a["endsAt"]) > time.time() + 10, a  # open-ended while it fires
    assert a["generatorURL"] == "http://127.0.0.1:%d/alerts" % e.admin_port, a
    with urllib.request.urlopen(a["generatorURL"], timeout=5) as r:  # the link works
        linked = json.loads(r.read())
    assert [x["name"] for x in linked["alerts"]] == [NAME], linked

    # Still firing well inside resolve_after_ms of quiet...
    time.sleep(max(0.0, last_event + 1.0 - time.monotonic()))
    assert len(am.ours("?active=true")) == 1, am.alerts()
    # ...resolved there once it has passed.
    assert wait_until(lambda: resolved_in(am), timeout=6), am.alerts()
    quiet = time.monotonic() - last_event
    assert quiet >= 1.5 - 0.1, "resolved after %.2fs of quiet, resolve_after_ms is 1500" % quiet
    assert am.ours("?active=true") == [], am.alerts()
    assert alerts_doc(e)["alerts"] == []
    state = sink_state(e, am.url)
    assert state["state"] == "ok" and state["failed"] == 0 and state["dropped"] == 0, state
    print("Alertmanager resolved the alert %.2fs after the last event (resolve_after_ms 1500)"
          % quiet)


def test_every_alertmanager_url_gets_the_alert_and_replicas_are_one_alert(
        alertmanager, upstream, errord, tmp_path):
    am1, am2 = alertmanager(), alertmanager()
    up = upstream(lambda req: FORBIDDEN)
    pol = alert_policy(tmp_path, [{"kind": "alertmanager", "url": am1.url},
                                  {"kind": "alertmanager", "url": am2.url + "/"}],
                       resolve_after_ms=1000)
    # Two errord replicas in front of the same upstream raise the same alert.
    e1 = errord(up.url, "--policy", pol)
    e2 = errord(up.url, "--policy", pol)
    fire(e1, ["/v1/users"])
    fire(e2, ["/v1/users"])
    assert wait_until(lambda: am1.ours() and am2.ours(), timeout=5), (am1.alerts(), am2.alerts())
    time.sleep(0.5)  # both replicas' deliveries are in by now
    for am in (am1, am2):
        got = am.ours()
        assert len(got) == 1, got  # one alert, whichever replica said it
        assert got[0]["labels"]["path"] == "/v1/users", got
    for e in (e1, e2):
        states = alerts_doc(e)["sinks"]
        assert [s["sent"] for s in states] == [1, 1], states
    assert wait_until(lambda: resolved_in(am1) and resolved_in(am2), timeout=6), \
        (am1.alerts(), am2.alerts())


# ---- payload shapes against a recording server --------------------------------------------------


def test_alertmanager_payload_is_re_sent_every_repeat_ms_then_resolved(upstream, errord, tmp_path):
    rec = Sink(upstream)
    up = upstream(lambda req: FORBIDDEN)
    pol = alert_policy(tmp_path, [{"kind": "alertmanager", "url": rec.url + "/am/"},
                                  {"kind": "webhook", "url": rec.url + "/hook"}],
                       resolve_after_ms=1600, repeat_ms=400)
    e = errord(up.url, "--policy", pol)
    fire(e, ["/v1/items"])
    last_event = time.monotonic()

    def resolved_posts():
        return [b for b in rec.bodies("/am/api/v2/alerts") if "endsAt" in b[0]]

    assert wait_until(resolved_posts, timeout=6), rec.bodies()
    time.sleep(0.6)  # nothing more comes after the resolve
    posts = rec.got("/am/api/v2/alerts")
    other = [r.target for _, r in rec.got() if r.target not in ("/am/api/v2/alerts", "/hook")]
    assert other == [], other  # the path is {url}/api/v2/alerts, the slash not doubled
    for _, r in posts:
        assert r.method == "POST", r.method
        assert r.header("content-type").startswith("application/json"), r.headers
    bodies = [json.loads(r.body) for _, r in posts]
    assert all(isinstance(b, list) and len(b) == 1 for b in bodies), bodies
    alerts = [b[0] for b in bodies]
    firing = [(t, a) for (t, _), a in zip(posts, alerts) if "endsAt" not in a]
    resolved = [a for a in alerts if "endsAt" in a]
    assert len(resolved) == 1 and "endsAt" in alerts[-1], alerts  # one resolve, the last
    # Re-sent every repeat_ms (400) while firing: about 1600 / 400 times.
    assert 3 <= len(firing) <= 6, [round(t - last_event, 2) for t, _ in firing]
    # Measured where they arrive: the first delivery is the first use of the
    # sink's client (under valgrind it arrives up to 0.25 s late), so only
    # the later gaps show the schedule; the count above bounds the first.
    gaps = [b[0] - a[0] for a, b in zip(firing, firing[1:])]
    assert all(g >= 0.4 - 0.05 for g in gaps[1:]), gaps
    first = firing[0][1]
    assert first["labels"] == {"alertname": NAME, "severity": "warning", "upstream": up.url,
                               "path": "/v1/items", "team": "payments"}, first
    assert first["annotations"] == {"summary": "upstream refused GET /v1/items", "count": "1"}
    assert first["generatorURL"] == "http://127.0.0.1:%d/alerts" % e.admin_port, first
    assert all(a["startsAt"] == first["startsAt"] and a["labels"] == first["labels"]
               for _, a in firing), alerts
    end = resolved[0]
    assert end["labels"] == first["labels"] and end["startsAt"] == first["startsAt"], end
    assert ts(end["endsAt"]) >= ts(first["startsAt"]) + 1.6 - 0.05, end
    # The webhook is told once that it fires, and once that it is resolved.
    assert [b["status"] for b in rec.bodies("/hook")] == ["firing", "resolved"], rec.bodies("/hook")


def test_webhook_slack_and_pagerduty_shapes(upstream, errord, tmp_path):
    rec = Sink(upstream)
    up = upstream(lambda req: FORBIDDEN)
    hook, slack, pd = rec.url + "/hook?via=errord", rec.url + "/services/T0/B0/XYZ", \
        rec.url + "/v2/enqueue"
    pol = alert_policy(tmp_path, [
        {"kind": "webhook", "url": hook,
         "headers": {"X-Errord-Token": "s3cret", "X-Team": "payments"}},
        {"kind": "slack", "url": slack},
        {"kind": "pagerduty", "url": pd, "routing_key": "R0UT1NGKEY"},
    ], resolve_after_ms=1000)
    e = errord(up.url, "--policy", pol)
    severity = {"/a": "critical", "/b": "info", "/c": "error", "/d": "page"}
    before = time.time()
    for path, sev in severity.items():
        fire(e, [path], [("X-Severity", sev)])
    # /a once more after its trigger went out: the same alert, counted (its
    # resolve has count 2, its trigger count 1, and both the same dedup_key).
    assert wait_until(lambda: any("GET /a" in json.loads(r.body).get("payload", {})
                                  .get("summary", "") for _, r in rec.got("/v2/enqueue")),
                      timeout=3), rec.bodies("/v2/enqueue")
    fire(e, ["/a"], [("X-Severity", "critical")])
    after = time.time()

    def done(target, n):
        return lambda: len(rec.got(target)) >= n

    # 4 alerts: a firing and a resolved notice each, on every sink.
    assert wait_until(lambda: all(done(t, 8)() for t in ("/hook?via=errord",
                                                         "/services/T0/B0/XYZ", "/v2/enqueue")),
                      timeout=6), [(r.target, r.body) for _, r in rec.got()]
    # The same alert (name + labels) again after it resolved: a new trigger.
    fire(e, ["/a"], [("X-Severity", "critical")])
    assert wait_until(done("/v2/enqueue", 9), timeout=3), rec.bodies("/v2/enqueue")

    # Webhook: the alert record as JSON, with the configured headers.
    for _, r in rec.got("/hook?via=errord"):
        assert r.method == "POST"
        assert r.header("x-errord-token") == "s3cret", r.headers
        assert r.header("x-team") == "payments", r.headers
        assert r.header("content-type").startswith("application/json"), r.headers
    notices = rec.bodies("/hook?via=errord")
    assert [n["status"] for n in notices[:8]].count("firing") == 4, notices
    a = [n for n in notices if n["labels"].get("path") == "/a"]
    assert [n["status"] for n in a[:2]] == ["firing", "resolved"], a
    fired = a[0]
    assert {"status", "name", "severity", "summary", "labels", "count", "first_seen",
            "last_seen", "upstream"} <= set(fired), fired
    assert (fired["name"], fired["severity"], fired["summary"], fired["count"], fired["upstream"]) \
        == (NAME, "critical", "upstream refused GET /a", 1, up.url), fired
    assert fired["labels"] == {"path": "/a", "team": "payments"}, fired
    assert before - 1 <= ts(fired["first_seen"]) <= ts(fired["last_seen"]) <= after + 1, fired
    assert a[1]["count"] == 2 and a[1]["labels"] == fired["labels"], a[1]
    assert ts(a[1]["first_seen"]) < ts(a[1]["last_seen"]) <= after + 1, a[1]

    # Slack: {"text": ...}, FIRING then RESOLVED.
    texts = rec.bodies("/services/T0/B0/XYZ")
    assert all(set(t) == {"text"} and isinstance(t["text"], str) for t in texts), texts
    ta = [t["text"] for t in texts if "GET /a" in t["text"]]
    assert len(ta) >= 2 and "FIRING" in ta[0] and NAME in ta[0], ta
    assert "RESOLVED" in ta[1] and NAME in ta[1] and "FIRING" not in ta[1], ta

    # PagerDuty: Events API v2.
    events = rec.bodies("/v2/enqueue")
    assert all(ev["routing_key"] == "R0UT1NGKEY" for ev in events), events
    triggers = [ev for ev in events if ev["event_action"] == "trigger"]
    resolves = [ev for ev in events if ev["event_action"] == "resolve"]
    assert (len(triggers), len(resolves)) == (5, 4), events
    key = {}
    for ev in triggers[:4]:
        path = re.search(r"GET (/\w)", ev["payload"]["summary"]).group(1)
        key[path] = ev["dedup_key"]
        assert "upstream refused GET %s" % path in ev["payload"]["summary"], ev
        assert ev["payload"]["source"] == up.url, ev
        if severity[path] in PD_SEVERITIES:
            assert ev["payload"]["severity"] == severity[path], ev
        else:
            assert ev["payload"]["severity"] in PD_SEVERITIES, ev
    assert sorted(key) == ["/a", "/b", "/c", "/d"], triggers
    assert len(set(key.values())) == 4, key  # different labels, different keys
    assert sorted(ev["dedup_key"] for ev in resolves) == sorted(key.values()), resolves
    assert triggers[4]["dedup_key"] == key["/a"], triggers[4]  # stable for the same alert
    assert all(isinstance(k, str) and 0 < len(k) <= 255 for k in key.values()), key


# ---- de-duplication, retries, queues, rate limit -----------------------------------------------


def test_text_is_escaped_in_every_payload(upstream, errord, tmp_path):
    rec = Sink(upstream)
    up = upstream(lambda req: FORBIDDEN)
    pol = alert_policy(tmp_path, [{"kind": "webhook", "url": rec.url + "/hook"},
                                  {"kind": "slack", "url": rec.url + "/slack"},
                                  {"kind": "pagerduty", "url": rec.url + "/pd", "routing_key": "K"},
                                  {"kind": "alertmanager", "url": rec.url}])
    e = errord(up.url, "--policy", pol)
    summary = 'said "no" \\ back\tslash {}, <b>&amp; \u00fcber \u2713'
    team = 'a "team"\\x'
    c = Client(e.port)
    try:
        head = ("GET /esc HTTP/1.1\r\nHost: t\r\nX-Summary: %s\r\nX-Team: %s\r\n\r\n"
                % (summary, team)).encode("utf-8")
        c.send(head)
        assert c.response().status == 403
    finally:
        c.close()
    assert wait_until(lambda: len(rec.got()) >= 4, timeout=3), rec.bodies()
    by = {r.target: json.loads(r.body.decode("utf-8")) for _, r in rec.got()}
    assert by["/hook"]["summary"] == summary and by["/hook"]["labels"]["team"] == team, by["/hook"]
    assert summary in by["/slack"]["text"], by["/slack"]
    assert summary in by["/pd"]["payload"]["summary"], by["/pd"]
    am = by["/api/v2/alerts"][0]
    assert am["annotations"]["summary"] == summary and am["labels"]["team"] == team, am
    doc = alerts_doc(e)
    assert doc["alerts"][0]["summary"] == summary, doc


def test_the_same_alert_in_a_burst_is_one_alert_with_a_count(upstream, errord, tmp_path):
    rec = Sink(upstream)
    up = upstream(lambda req: FORBIDDEN)
    pol = alert_policy(tmp_path, [{"kind": "webhook", "url": rec.url + "/hook"}],
                       resolve_after_ms=1000)
    e = errord(up.url, "--policy", pol)
    fire(e, ["/v1/burst"] * 50)
    doc = alerts_doc(e)
    assert len(doc["alerts"]) == 1, doc
    assert (doc["alerts"][0]["name"], doc["alerts"][0]["count"]) == (NAME, 50), doc
    # each event is still logged (the log may trail the responses a little)
    assert wait_until(lambda: len(e.all(type="alert")) == 50, timeout=3), len(e.all(type="alert"))
    assert wait_until(lambda: len(rec.got()) >= 2, timeout=5), rec.bodies()
    time.sleep(0.3)
    notices = rec.bodies()
    assert [n["status"] for n in notices] == ["firing", "resolved"], notices
    assert notices[1]["count"] == 50, notices[1]


def test_a_5xx_is_retried_and_a_4xx_is_not(upstream, errord, tmp_path):
    flaky = Sink(upstream, lambda req, n: response(500 if n == 1 else 200, b"{}"))
    refusing = Sink(upstream, lambda req, n: response(400, b'{"error":"bad payload"}'))
    up = upstream(lambda req: FORBIDDEN)
    pol = alert_policy(tmp_path, [{"kind": "webhook", "url": flaky.url + "/hook"},
                                  {"kind": "webhook", "url": refusing.url + "/hook"}])
    e = errord(up.url, "--policy", pol)
    fire(e, ["/v1/retry"])
    assert wait_until(lambda: len(flaky.got()) >= 2, timeout=6), flaky.bodies()
    (t1, r1), (t2, r2) = flaky.got()[:2]
    assert r1.body == r2.body, (r1.body, r2.body)  # the same notice again
    assert t2 - t1 >= 0.2, "retried after %.3fs, with no backoff" % (t2 - t1)
    assert wait_until(lambda: sink_state(e, flaky.url + "/hook")["sent"] == 1, timeout=3)
    s = sink_state(e, flaky.url + "/hook")
    assert (s["state"], s["sent"], s["failed"], s["queued"], s["last_status"]) == \
        ("ok", 1, 1, 0, 200), s
    # The 400 is final: nothing more within a few retry periods.
    assert wait_until(lambda: refusing.got(), timeout=3)
    time.sleep(max(0.0, refusing.got()[0][0] + 2.5 - time.monotonic()))
    assert len(refusing.got()) == 1, [r.body for _, r in refusing.got()]
    s = sink_state(e, refusing.url + "/hook")
    assert (s["sent"], s["failed"], s["queued"], s["last_status"]) == (0, 1, 0, 400), s
    assert s["state"] != "ok", s


def test_any_2xx_is_a_delivery_and_a_sink_may_be_named_by_host_name(upstream, errord, tmp_path):
    no_content = Sink(upstream, lambda req, n: response(204))
    accepted = Sink(upstream, lambda req, n: response(
        202, b'{"status":"success","message":"Event processed","dedup_key":"x"}',
        [("Content-Type", "application/json")]))
    up = upstream(lambda req: FORBIDDEN)
    hook = "http://localhost:%d/hook" % no_content.server.port
    pd = accepted.url + "/v2/enqueue"
    pol = alert_policy(tmp_path, [{"kind": "webhook", "url": hook},
                                  {"kind": "pagerduty", "url": pd, "routing_key": "K"}])
    e = errord(up.url, "--policy", pol)
    fire(e, ["/v1/2xx"])
    assert wait_until(lambda: sink_state(e, hook)["sent"] == 1 and sink_state(e, pd)["sent"] == 1,
                      timeout=3), alerts_doc(e)
    time.sleep(1.2)  # a retry would come after 1 s
    assert (len(no_content.got()), len(accepted.got())) == (1, 1)
    assert no_content.got()[0][1].header("host") == "localhost:%d" % no_content.server.port
    for url, status in ((hook, 204), (pd, 202)):
        s = sink_state(e, url)
        assert (s["state"], s["sent"], s["failed"], s["last_status"]) == ("ok", 1, 0, status), s


def test_a_dead_sink_never_delays_proxied_traffic(upstream, errord, tmp_path):
    healthy = Sink(upstream)
    dead = Sink(upstream, stall)  # accepts, reads the request, never answers
    refused = "http://127.0.0.1:%d" % closed_port()
    up = upstream(lambda req: FORBIDDEN)
    fast = {"rate_per_min": 100000, "queue": 1000}
    # The same three kinds of sink for both errords. For D they are dead: one
    # times out after 500 ms (and is retried a second later), one keeps its
    # first delivery hanging all along, one is a closed port.
    pol_h = alert_policy(tmp_path, [dict(fast, kind="webhook", url=healthy.url + "/hook"),
                                    dict(fast, kind="alertmanager", url=healthy.url),
                                    dict(fast, kind="slack", url=healthy.url + "/slack")])
    pol_d = alert_policy(tmp_path, [dict(fast, kind="webhook", url=dead.url + "/hook",
                                         timeout_ms=500),
                                    dict(fast, kind="alertmanager", url=dead.url),
                                    dict(fast, kind="slack", url=refused + "/slack")])
    eh = errord(up.url, "--policy", pol_h, "--drain-timeout", "1s")
    ed = errord(up.url, "--policy", pol_d, "--drain-timeout", "1s")
    # Warm-up, until every dead sink is being delivered to (and failing).
    fire(eh, ["/warm/%d" % i for i in range(20)])
    fire(ed, ["/warm/%d" % i for i in range(20)])
    assert wait_until(lambda: dead.got("/hook") and dead.got("/api/v2/alerts")
                      and sink_state(ed, refused + "/slack")["failed"] >= 1, timeout=3), \
        alerts_doc(ed)

    def retried():  # the hanging webhook has timed out twice: its retry is over
        return sink_state(ed, dead.url + "/hook")["failed"] >= 2

    ch, cd = Client(eh.port), Client(ed.port)
    lat_h, lat_d = [], []
    t0 = time.monotonic()
    i, done = 0, False
    try:
        # A few hundred requests, on until the dead sinks have been retried
        # under the load (about 2 s), each raising a new alert.
        while not done:
            assert time.monotonic() - t0 < 6 * SLOW, "the dead webhook was not retried in time"
            for c, lat in ((ch, lat_h), (cd, lat_d)):  # interleaved: the same machine for both
                t = time.perf_counter()
                r = c.get("/r/%d" % i)
                lat.append(time.perf_counter() - t)
                assert r.status == 403, r.status
            time.sleep(0.002)
            i += 1
            done = i >= 300 and i % 50 == 0 and retried()
    finally:
        ch.close()
        cd.close()
    spent = time.monotonic() - t0
    ph, pd = p99(lat_h) * 1000, p99(lat_d) * 1000
    mh, md = max(lat_h) * 1000, max(lat_d) * 1000
    print("proxied latency, %d requests each raising an alert (%.1fs): healthy sinks p50 %.2f ms "
          "p99 %.2f ms max %.1f ms; dead sinks (no answer, timeouts, closed port) p50 %.2f ms "
          "p99 %.2f ms max %.1f ms" % (i, spent, p50(lat_h) * 1000, ph, mh, p50(lat_d) * 1000,
                                        pd, md))
    # The dead sinks kept failing meanwhile; the healthy ones delivered.
    doc = alerts_doc(ed)
    s = sink_state(ed, dead.url)  # its first delivery hung all along
    assert (s["sent"], s["failed"]) == (0, 0) and len(dead.got("/api/v2/alerts")) == 1, s
    s = sink_state(ed, dead.url + "/hook")
    assert (s["state"], s["sent"], s["last_status"]) == ("failing", 0, 0), s
    assert "time" in s["last_error"] and len(dead.got("/hook")) == 2, s
    s = sink_state(ed, refused + "/slack")
    assert (s["state"], s["sent"], s["last_status"]) == ("failing", 0, 0) and s["last_error"], s
    assert s["failed"] >= 2, s  # a network error is retried too
    assert all(sink_state(eh, u)["sent"] >= 1 and sink_state(eh, u)["failed"] == 0
               for u in (healthy.url + "/hook", healthy.url, healthy.url + "/slack"))
    assert pd < 2 * ph + 20, "p99 %.2f ms with dead sinks, %.2f ms with healthy ones" % (pd, ph)
    # A delivery that waited for the dead sink would have held one request
    # for the whole 500 ms timeout.
    assert md < mh + 300, "slowest request %.1f ms with dead sinks, %.1f ms with healthy ones" \
        % (md, mh)
    # Their pending alerts hold a SIGTERM no longer than the (bounded) flush.
    t = time.monotonic()
    assert ed.stop(timeout=10) == 0
    took = time.monotonic() - t
    print("SIGTERM with %d alerts queued for dead sinks: exited after %.2fs (drain-timeout 1s)"
          % (sum(x["queued"] for x in doc["sinks"]), took))
    assert took < 1 + 1.5, took


def test_a_full_queue_drops_the_oldest_and_counts_it(upstream, errord, tmp_path):
    release = threading.Event()

    def answer(req, n):
        if n > 1:
            return response(200, b"{}")

        def held(conn):  # the first delivery hangs until the test lets it go
            release.wait(10)
            conn.sendall(response(200, b"{}"))
        return held

    rec = Sink(upstream, answer)
    up = upstream(lambda req: FORBIDDEN)
    url = rec.url + "/hook"
    pol = alert_policy(tmp_path, [{"kind": "webhook", "url": url, "queue": 5,
                                   "rate_per_min": 100000, "timeout_ms": 15000}])
    e = errord(up.url, "--policy", pol)
    try:
        fire(e, ["/q/0"])
        assert wait_until(lambda: rec.got(), timeout=3)
        fire(e, ["/q/%d" % i for i in range(1, 21)])
        assert wait_until(lambda: sink_state(e, url)["dropped"] == 16, timeout=3), \
            sink_state(e, url)
        fire(e, ["/q/%d" % i for i in range(21, 30)])  # newer than every queued one
        assert wait_until(lambda: sink_state(e, url)["dropped"] == 25, timeout=3), \
            sink_state(e, url)
        s = sink_state(e, url)
        assert s["queued"] <= 5 and s["dropped"] > 0, s
        assert (s["queued"], s["dropped"], s["sent"]) == (5, 25, 0), s
    finally:
        release.set()
    assert wait_until(lambda: sink_state(e, url)["sent"] == 5, timeout=5), sink_state(e, url)
    time.sleep(0.3)
    paths = [b["labels"]["path"] for b in rec.bodies()]
    assert len(paths) == 5, paths
    assert paths[0] == "/q/0", paths  # the one in flight is kept
    assert all(int(p.rsplit("/", 1)[1]) >= 21 for p in paths[1:]), paths  # the newest are kept
    s = sink_state(e, url)
    assert (s["queued"], s["dropped"], s["sent"]) == (0, 25, 5), s


def test_rate_per_min_spaces_the_deliveries(upstream, errord, tmp_path):
    rec = Sink(upstream)
    up = upstream(lambda req: FORBIDDEN)
    url = rec.url + "/hook"
    pol = alert_policy(tmp_path, [{"kind": "webhook", "url": url, "rate_per_min": 60}])
    e = errord(up.url, "--policy", pol)
    fire(e, ["/rate/%d" % i for i in range(9)])
    assert wait_until(lambda: len(rec.got()) >= 9, timeout=12), len(rec.got())
    times = [t for t, _ in rec.got()]
    start = times[0]
    print("rate_per_min 60: deliveries at %s s" % [round(t - start, 2) for t in times])
    # Some burst is allowed; then no faster than one a second.
    in_2s = sum(1 for t in times if t - start < 2.0)
    assert in_2s <= 8, times
    burst = max(i for i in range(1, len(times) + 1)
                if times[i - 1] - start < 0.5)  # the first ones, at once
    # Paced ones only: the burst's own arrivals may trail (0.2 s under
    # valgrind) while the bucket refills from when it was emptied.
    tail = times[burst:]
    gaps = [b - a for a, b in zip(tail, tail[1:])]
    assert gaps and all(g >= 1.0 - 0.2 for g in gaps), gaps
    s = sink_state(e, url)
    assert (s["sent"], s["dropped"], s["queued"]) == (9, 0, 0), s


# ---- https, shutdown, the admin port ----------------------------------------------------------


def test_an_unreachable_https_sink_fails_without_holding_up_the_others(upstream, errord,
                                                                         tmp_path):
    rec = Sink(upstream)
    up = upstream(lambda req: FORBIDDEN)
    dead = "https://127.0.0.1:%d/hook" % closed_port()
    pol = alert_policy(tmp_path, [{"kind": "webhook", "url": dead},
                                  {"kind": "webhook", "url": rec.url + "/hook"}])
    e = errord(up.url, "--policy", pol)
    assert sink_state(e, dead)["state"] != "undeliverable"  # https is delivered to
    fire(e, ["/v1/tls"])
    assert wait_until(lambda: rec.got(), timeout=3)  # the http sink still works
    assert wait_until(lambda: sink_state(e, dead)["last_error"], timeout=3), sink_state(e, dead)
    s = sink_state(e, dead)
    assert s["sent"] == 0 and "refused" in s["last_error"].lower(), s


def test_sigterm_flushes_a_pending_alert(upstream, errord, tmp_path):
    rec = Sink(upstream, answer_after(0.5))
    up = upstream(lambda req: FORBIDDEN)
    pol = alert_policy(tmp_path, [{"kind": "webhook", "url": rec.url + "/hook"}])
    e = errord(up.url, "--policy", pol)
    fire(e, ["/v1/last-words"])
    t = time.monotonic()
    assert e.stop(timeout=10) == 0  # SIGTERM; stop() also checks the exit status
    took = time.monotonic() - t
    print("SIGTERM with an alert pending for a sink answering in 0.5 s: exited after %.2fs" % took)
    notices = rec.bodies()
    assert len(notices) == 1, notices
    assert (notices[0]["status"], notices[0]["labels"]["path"]) == ("firing", "/v1/last-words")
    assert took >= 0.5 - 0.05, "exited after %.2fs, before the sink answered" % took
    assert not e.all(msg="alert delivery failed"), e.all(msg="alert delivery failed")


def test_admin_alerts_lists_firing_alerts_and_each_sinks_state(upstream, errord, tmp_path):
    rec = Sink(upstream)
    up = upstream(lambda req: FORBIDDEN)
    refused = "http://127.0.0.1:%d" % closed_port()
    hook = rec.url + "/hook"
    pol = alert_policy(tmp_path, [{"kind": "webhook", "url": hook},
                                  {"kind": "alertmanager", "url": refused}],
                       resolve_after_ms=1500)
    e = errord(up.url, "--policy", pol)
    before = time.time()
    fire(e, ["/x"])
    time.sleep(0.1)
    fire(e, ["/x", "/y"])
    after = time.time()
    assert wait_until(lambda: sink_state(e, hook)["sent"] == 2 and
                      sink_state(e, refused)["failed"] >= 1, timeout=3), alerts_doc(e)
    doc = alerts_doc(e)
    alerts = {a["labels"]["path"]: a for a in doc["alerts"]}
    assert sorted(alerts) == ["/x", "/y"], doc
    x = alerts["/x"]
    assert (x["name"], x["severity"], x["summary"], x["count"]) == \
        (NAME, "warning", "upstream refused GET /x", 2), x
    assert x["labels"] == {"path": "/x", "team": "payments"}, x
    assert before - 1 <= ts(x["first_seen"]) < ts(x["last_seen"]) <= after + 1, x
    assert ts(x["last_seen"]) - ts(x["first_seen"]) >= 0.1 - 0.01, x
    assert alerts["/y"]["count"] == 1 and x.get("state", "firing") == "firing", doc
    sinks = {s["url"]: s for s in doc["sinks"]}
    assert sorted(sinks) == sorted([hook, refused]), doc["sinks"]
    for s in doc["sinks"]:
        assert SINK_FIELDS <= set(s), s
        assert all(isinstance(s[k], int) for k in ("queued", "sent", "failed", "dropped",
                                                     "last_status")), s
    w, a = sinks[hook], sinks[refused]
    assert (w["kind"], w["state"], w["sent"], w["failed"], w["dropped"], w["queued"],
            w["last_status"], w["last_error"]) == ("webhook", "ok", 2, 0, 0, 0, 200, ""), w
    assert (a["kind"], a["state"], a["sent"], a["last_status"]) == \
        ("alertmanager", "failing", 0, 0), a
    assert a["failed"] >= 1 and a["last_error"], a
    # Resolved after resolve_after_ms of quiet: no longer listed.
    assert wait_until(lambda: alerts_doc(e)["alerts"] == [], timeout=5), alerts_doc(e)
    assert wait_until(lambda: sink_state(e, hook)["sent"] == 4, timeout=3)  # + 2 resolves


BAD_SINKS = {
    "unknown-kind": ([{"kind": "email", "url": "http://127.0.0.1:1"}],
                     "settings.alerts[1].kind"),
    "missing-url": ([{"kind": "webhook"}], "settings.alerts[1].url"),
    "not-http": ([{"kind": "webhook", "url": "ftp://127.0.0.1/x"}], "settings.alerts[1].url"),
    "pagerduty-without-routing-key": ([{"kind": "webhook", "url": "http://127.0.0.1:1"},
                                       {"kind": "pagerduty", "url": "http://127.0.0.1:1"}],
                                      "settings.alerts[2]: a pagerduty sink needs routing_key"),
    "unknown-key": ([{"kind": "webhook", "url": "http://127.0.0.1:1", "uri": "http://x"}],
                    "settings.alerts[1]: unknown key 'uri'"),
    "bad-queue": ([{"kind": "webhook", "url": "http://127.0.0.1:1", "queue": 0}],
                  "settings.alerts[1].queue"),
}


@pytest.mark.parametrize("what", sorted(BAD_SINKS))
def test_bad_alert_settings_stop_errord_at_start(tmp_path, what):
    sinks, expect = BAD_SINKS[what]
    path = alert_policy(tmp_path, sinks)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERRORD_")}
    proc = subprocess.Popen([ERRORD, "--listen", "127.0.0.1:0", "--admin", "off", "--upstream",
                             "http://127.0.0.1:%d" % closed_port(), "--policy", path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=10 * SLOW)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("errord kept running with bad settings.alerts: %r" % out)
    out, err = out.decode(), err.decode()
    assert proc.returncode == 2, (proc.returncode, out, err)
    assert "errord started" not in out
    assert expect in err, err
    assert path in err, err  # which file


# ---- figures ---------------------------------------------------------------------------------


def test_alerts_delivered_per_second(upstream, errord, tmp_path):
    rec = Sink(upstream)
    up = upstream(lambda req: FORBIDDEN)
    url = rec.url + "/hook"
    pol = alert_policy(tmp_path, [{"kind": "webhook", "url": url, "rate_per_min": 100000,
                                   "queue": 1000}])
    e = errord(up.url, "--policy", pol)
    n = 400
    t0 = time.monotonic()
    fire(e, ["/many/%d" % i for i in range(n)])
    assert wait_until(lambda: len(rec.got()) >= n, timeout=20), len(rec.got())
    times = [t for t, _ in rec.got()]
    span = times[-1] - times[0]
    rate = (n - 1) / span if span > 0 else float("inf")
    print("alerts delivered: %d distinct alerts to one webhook in %.2fs (%.2fs from the first "
          "request): %.0f delivered per second" % (n, span, times[-1] - t0, rate))
    paths = sorted(b["labels"]["path"] for b in rec.bodies())
    assert paths == sorted("/many/%d" % i for i in range(n))  # each exactly once
    s = sink_state(e, url)
    assert (s["sent"], s["dropped"], s["failed"], s["queued"]) == (n, 0, 0, 0), s
    # One delivery after the other, not one per 200 ms tick.
    assert rate > 50, rate
