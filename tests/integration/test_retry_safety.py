"""Retry safety, black-box (issue 4; SPEC §2 "What a handler returns", §4):
the request deadline (settings.deadline_ms and X-Request-Timeout), the
per-try timeout (settings.try_timeout_ms), Retry-After (delta-seconds and
HTTP-date, capped by settings.retry_after_max_ms and by the deadline), the
retry budget (settings.budget, shared by all workers), the upstream cooldown
(errord.cooldown(ms) and retry{ cooldown = true }) with its 429 for a request
that cannot wait, and the attempt ledger of the access record.

The real errord binary runs a policy written into tmp_path (or lua/default.lua
against the mock API) between raw clients and upstreams on loopback. Timings
are tens or hundreds of milliseconds, except where a whole-second Retry-After
is itself under test. Lower time bounds are exact (minus a few ms for clock
granularity); upper bounds are generous and only there to tell "answered at
once" from "waited for something it should not have". Every wait is bounded."""

import concurrent.futures
import email.utils
import http.client
import math
import os
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest

from support import ROOT, SLOW, Client, response, wait_until

DEFAULT_POLICY = os.path.join(ROOT, "lua", "default.lua")
# A tiny backoff, so that only the delay under test costs time.
FAST = "backoff = { base_ms = 1, max_ms = 5 }"
# Clock granularity: errord's timers and clocks count whole milliseconds.
TICK = 0.02


# ---- helpers ----------------------------------------------------------------------------


def policy(tmp_path, settings, body, name="policy.lua"):
    """Writes `local p = {} p.settings = { <settings> } <body> return p`."""
    path = tmp_path / name
    path.write_text("local p = {}\np.settings = { %s }\n%s\nreturn p\n" % (settings, body))
    return str(path)


def uniq():
    return uuid.uuid4().hex[:12]


def access_for(e, path, timeout=5.0):
    """The access record of the request for `path` (waits for it)."""
    wait_until(lambda: e.find(type="access", path=path), timeout)
    rec = e.find(type="access", path=path)
    assert rec is not None, "no access record for %s in %r" % (path, e.records)
    return rec


def ledger(rec):
    """The ledger as comparable tuples: (status or error kind, verdict, reason,
    refused, policy_error)."""
    return [(a.get("status", a.get("error")), a.get("verdict"), a.get("reason"),
             a.get("refused"), a.get("policy_error")) for a in rec["attempts"]]


def check_ledger(rec):
    """What every access record's ledger must satisfy, whatever happened:
    attempts numbered from 1, each with a status or an error kind, a duration
    and a verdict; delay_ms only after a retry that was made; `retries`
    counts those; `waited_ms` is the sum of the delays and holds."""
    attempts = rec["attempts"]
    assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1)), attempts
    for a in attempts:
        assert ("status" in a) != ("error" in a), a
        assert isinstance(a["duration_ms"], (int, float)) and a["duration_ms"] >= 0, a
        assert a["verdict"] in ("pass", "retry", "respond"), a
        if "delay_ms" in a:
            assert a["verdict"] == "retry" and "refused" not in a, a
        if "refused" in a:
            assert a["verdict"] == "retry", a
        assert a.get("held_ms", 0) >= 0 and a.get("delay_ms", 0) >= 0, a
    made = [a for a in attempts if a["verdict"] == "retry" and "refused" not in a]
    assert rec["retries"] == len(made), rec
    assert all("delay_ms" in a for a in made), attempts
    assert rec["waited_ms"] == sum(a.get("delay_ms", 0) + a.get("held_ms", 0)
                                   for a in attempts), rec


def refusals(e, request_id):
    return [r["refused"] for r in e.all(msg="retry refused", request_id=request_id)]


def stall(closed=None):
    """An upstream answer (for support.Upstream) that takes the request and
    never responds; notes when errord hangs up."""
    def fn(sock):
        sock.settimeout(10 * SLOW)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
        if closed is not None:
            closed.append(time.monotonic())
    return fn


class Script:
    """An upstream handler answering the n-th request for a path (the target
    without its query) with answers[n-1] (the last one for every later
    request), noting when each request arrived (monotonic and wall clock).
    An answer is response bytes, a callable taking over the connection, or a
    function req -> either of those."""

    def __init__(self, answers, default=None):
        self.answers = answers
        self.default = default or (lambda req: response(200, b"ok"))
        self.lock = threading.Lock()
        self.seen = {}      # path -> [monotonic arrival]
        self.wall = {}      # path -> [wall-clock arrival]
        self.answered = {}  # path -> [monotonic time the answer was handed over]

    def __call__(self, req):
        path = req.target.split("?")[0]
        with self.lock:
            self.seen.setdefault(path, []).append(time.monotonic())
            self.wall.setdefault(path, []).append(time.time())
            n = len(self.seen[path])
        answers = self.answers.get(path)
        if answers is None:
            out = self.default(req)
        else:
            out = answers[min(n, len(answers)) - 1]
            if callable(out) and getattr(out, "takes_req", False):
                out = out(req)
        with self.lock:
            self.answered.setdefault(path, []).append(time.monotonic())
        return out

    def arrivals(self, path):
        with self.lock:
            return list(self.seen.get(path, []))

    def count(self, path):
        return len(self.arrivals(path))


def get_many(port, paths, headers=()):
    """Sends GET `path` for each path, each on its own connection, all at once;
    returns [(response, seconds from send to answer)] in order."""
    def one(path):
        c = Client(port, timeout=15)
        try:
            t0 = time.monotonic()
            r = c.get(path, headers=list(headers))
            return r, time.monotonic() - t0
        finally:
            c.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(paths)) as pool:
        return list(pool.map(one, paths))


def timed_get(port, path, headers=()):
    c = Client(port, timeout=15)
    try:
        t0 = time.monotonic()
        r = c.get(path, headers=list(headers))
        return r, time.monotonic() - t0
    finally:
        c.close()


def assert_json_error(r, status):
    assert r is not None, "no response (wanted %d)" % status
    assert r.status == status, (r.status, r.body)
    assert r.header("content-type") == "application/json", r.headers
    msg = r.json().get("message")
    assert isinstance(msg, str) and msg, r.body


# ---- Retry-After ---------------------------------------------------------------------------

RETRY_503 = 'p[503] = function(req, res) return retry { reason = "busy" } end'


def test_retry_after_delta_seconds_is_waited_instead_of_the_backoff(upstream, errord, tmp_path):
    script = Script({"/ra": [response(503, b"busy", [("Retry-After", "1")]),
                             response(200, b"done")]})
    up = upstream(script)
    e = errord(up.url, "--policy", policy(tmp_path, FAST, RETRY_503))
    r, elapsed = timed_get(e.port, "/ra")
    assert (r.status, r.body) == (200, b"done")
    first, second = script.arrivals("/ra")
    assert second - first >= 0.95, "retried %.3fs after a 503 with Retry-After: 1" % (
        second - first)
    rec = access_for(e, "/ra")
    check_ledger(rec)
    assert ledger(rec) == [(503, "retry", "busy", None, None), (200, "pass", None, None, None)]
    assert rec["attempts"][0]["delay_ms"] == 1000
    assert rec["retries"] == 1 and rec["waited_ms"] == 1000


def test_retry_after_http_date_is_waited(upstream, errord, tmp_path):
    target = []  # the wall-clock second the upstream names

    def busy_until(req):
        target.append(math.ceil(time.time() + 1.5))  # 1.5 to 2.5 s ahead
        return response(503, b"busy", [("Retry-After",
                                        email.utils.formatdate(target[0], usegmt=True))])
    busy_until.takes_req = True

    script = Script({"/date": [busy_until, response(200, b"done")]})
    up = upstream(script)
    e = errord(up.url, "--policy", policy(tmp_path, FAST, RETRY_503))
    r, _ = timed_get(e.port, "/date")
    assert (r.status, r.body) == (200, b"done")
    first, second = script.arrivals("/date")
    assert second - first >= 1.4, "retried %.3fs after a Retry-After 1.5-2.5 s ahead" % (
        second - first)
    retry_wall = script.wall["/date"][1]
    assert retry_wall >= target[0] - TICK, "retried %.3fs before the date Retry-After named" % (
        target[0] - retry_wall)
    rec = access_for(e, "/date")
    check_ledger(rec)
    assert ledger(rec) == [(503, "retry", "busy", None, None), (200, "pass", None, None, None)]
    assert 1400 <= rec["attempts"][0]["delay_ms"] <= 2600


def test_after_in_the_verdict_beats_retry_after(upstream, errord, tmp_path):
    script = Script({"/after": [response(503, b"busy", [("Retry-After", "5")]),
                                response(200, b"done")]})
    up = upstream(script)
    e = errord(up.url, "--policy", policy(tmp_path, FAST, """
p[503] = function(req, res) return retry { after = 50, reason = "busy" } end"""))
    r, elapsed = timed_get(e.port, "/after")
    assert (r.status, r.body) == (200, b"done")
    first, second = script.arrivals("/after")
    assert second - first >= 0.05 - TICK
    assert second - first < 3.0 * SLOW, "waited the Retry-After (5 s), not after = 50"
    rec = access_for(e, "/after")
    check_ledger(rec)
    assert rec["attempts"][0]["delay_ms"] == 50


def http_date_in(seconds):
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


@pytest.mark.parametrize("form", ["delta-seconds", "http-date"])
def test_retry_after_past_the_deadline_is_refused_and_forwarded(upstream, errord, tmp_path,
                                                                form):
    value = "5" if form == "delta-seconds" else None

    def busy(req):
        return response(503, b"come back later",
                        [("Retry-After", value or http_date_in(6))])
    busy.takes_req = True

    script = Script({"/late": [busy, response(200, b"too late")]})
    up = upstream(script)
    # deadline 2 s: waiting it out would take 2 s, refusing is immediate
    e = errord(up.url, "--policy", policy(tmp_path, FAST + ", deadline_ms = 2000", RETRY_503))
    r, elapsed = timed_get(e.port, "/late")
    assert (r.status, r.body) == (503, b"come back later")
    ra = r.header("retry-after")
    assert ra is not None, "the upstream's Retry-After must reach the client"
    if value is not None:
        assert ra == value
    else:
        assert email.utils.parsedate_to_datetime(ra) is not None
    assert elapsed < 1.5 * SLOW, "took %.3fs: the retry was waited for, not refused" % elapsed
    assert script.count("/late") == 1
    rec = access_for(e, "/late")
    check_ledger(rec)
    assert ledger(rec) == [(503, "retry", "busy", "deadline", None)]
    assert "delay_ms" not in rec["attempts"][0]
    assert rec["retries"] == 0 and rec["status"] == 503
    assert refusals(e, rec["request_id"]) == ["deadline"]


def test_retry_after_beyond_retry_after_max_is_refused(upstream, errord, tmp_path):
    script = Script({"/max": [response(503, b"much later", [("Retry-After", "3")]),
                              response(200, b"no")]})
    up = upstream(script)
    e = errord(up.url, "--policy",
               policy(tmp_path, FAST + ", retry_after_max_ms = 1000", RETRY_503))
    r, elapsed = timed_get(e.port, "/max")
    assert (r.status, r.body) == (503, b"much later")
    assert r.header("retry-after") == "3"
    assert elapsed < 2.0 * SLOW, "took %.3fs: the Retry-After was waited for" % elapsed
    assert script.count("/max") == 1
    rec = access_for(e, "/max")
    check_ledger(rec)
    assert ledger(rec) == [(503, "retry", "busy", "retry_after", None)]
    assert refusals(e, rec["request_id"]) == ["retry_after"]


# ---- the deadline --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["setting", "header-300", "header-300ms", "header-0.3s"])
def test_deadline_abandons_an_attempt_that_never_answers_with_504(upstream, errord, tmp_path,
                                                                  how):
    closed = []
    script = Script({"/hang": [stall(closed)]})
    up = upstream(script)
    headers = []
    if how == "setting":
        settings = FAST + ", deadline_ms = 300"
    else:
        settings = FAST + ", deadline_ms = 10000"  # the header lowers it
        headers = [("X-Request-Timeout", how.split("-", 1)[1])]
    e = errord(up.url, "--policy", policy(tmp_path, settings, RETRY_503),
               "--first-byte-timeout", "10s")
    r, elapsed = timed_get(e.port, "/hang", headers)
    assert_json_error(r, 504)
    assert elapsed >= 0.3 - TICK, "504 after %.3fs, before the 300 ms deadline" % elapsed
    assert elapsed < 3.0 * SLOW, "504 after %.3fs: not at the deadline" % elapsed
    # the attempt in flight was abandoned: errord hung up on the upstream
    assert wait_until(lambda: closed, 3), "errord kept the abandoned attempt's connection"
    rec = access_for(e, "/hang")
    check_ledger(rec)
    assert rec["status"] == 504 and rec["upstream_status"] is None
    assert len(rec["attempts"]) == 1 and "error" in rec["attempts"][0]


def test_x_request_timeout_raises_the_deadline(upstream, errord, tmp_path):
    def slow(req):
        time.sleep(0.5)
        return response(200, b"slow but fine")
    up = upstream(slow)
    e = errord(up.url, "--policy", policy(tmp_path, FAST + ", deadline_ms = 200", RETRY_503),
               "--first-byte-timeout", "10s")
    # without the header: the setting's 200 ms
    r, elapsed = timed_get(e.port, "/slow-a")
    assert_json_error(r, 504)
    # with it: 2 s for this request
    r, elapsed = timed_get(e.port, "/slow-b", [("X-Request-Timeout", "2s")])
    assert (r.status, r.body) == (200, b"slow but fine")
    assert elapsed >= 0.5 - TICK
    rec = access_for(e, "/slow-b")
    check_ledger(rec)
    assert ledger(rec) == [(200, "pass", None, None, None)]


def test_deadline_forwards_an_earlier_real_response_instead_of_504(upstream, errord, tmp_path):
    closed = []
    script = Script({"/earlier": [response(503, b"the real 503", [("X-Real", "yes")]),
                                  stall(closed)]})
    up = upstream(script)
    e = errord(up.url, "--policy", policy(tmp_path, FAST + ", deadline_ms = 400", """
p[503] = function(req, res) return retry { after = 10, reason = "busy" } end"""),
               "--first-byte-timeout", "10s")
    r, elapsed = timed_get(e.port, "/earlier")
    assert (r.status, r.body) == (503, b"the real 503")
    assert r.header("x-real") == "yes"
    assert elapsed >= 0.4 - TICK, "answered after %.3fs, before the deadline" % elapsed
    assert elapsed < 3.0 * SLOW
    assert script.count("/earlier") == 2
    assert wait_until(lambda: closed, 3), "errord kept the abandoned attempt's connection"
    rec = access_for(e, "/earlier")
    check_ledger(rec)
    assert rec["status"] == 503
    assert ledger(rec)[0] == (503, "retry", "busy", None, None)
    assert len(rec["attempts"]) == 2 and "error" in rec["attempts"][1]
    assert rec["attempts"][0]["delay_ms"] == 10 and rec["retries"] == 1


@pytest.mark.parametrize("delay", ["backoff", "after"])
def test_a_retry_whose_delay_would_pass_the_deadline_is_refused(upstream, errord, tmp_path,
                                                                delay):
    if delay == "backoff":
        # full jitter over an hour: the chance of a draw under the ~300 ms
        # left is below 1e-4
        settings = "backoff = { base_ms = 3600000, max_ms = 3600000 }, deadline_ms = 300"
        handler = RETRY_503
    else:
        settings = FAST + ", deadline_ms = 300"
        handler = 'p[503] = function(req, res) return retry { after = 500, reason = "busy" } end'
    script = Script({"/past": [response(503, b"busy"), response(200, b"no")]})
    up = upstream(script)
    e = errord(up.url, "--policy", policy(tmp_path, settings, handler))
    r, elapsed = timed_get(e.port, "/past")
    assert (r.status, r.body) == (503, b"busy")
    assert elapsed < 0.3 * SLOW, "the 503 came after %.3fs: the retry was not refused at once" % (
        elapsed)
    assert script.count("/past") == 1
    rec = access_for(e, "/past")
    check_ledger(rec)
    assert ledger(rec) == [(503, "retry", "busy", "deadline", None)]
    assert refusals(e, rec["request_id"]) == ["deadline"]


@pytest.mark.parametrize("handled", [False, True])
def test_a_response_already_streaming_is_not_cut_by_the_deadline(upstream, errord, tmp_path,
                                                                 handled):
    def slow_body(sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        time.sleep(0.6)
        sock.sendall(b"world")
        time.sleep(0.2)

    up = upstream(lambda req: slow_body)
    settings = FAST + ", deadline_ms = 300"
    body = ""
    if handled:
        # the handler decides on the first 5 bytes (over body_limit), then it streams
        settings += ", body_limit = 4"
        body = "p[200] = function(req, res) return pass() end"
    e = errord(up.url, "--policy", policy(tmp_path, settings, body))
    r, elapsed = timed_get(e.port, "/stream")
    assert (r.status, r.body) == (200, b"helloworld")
    assert elapsed >= 0.6 - TICK
    rec = access_for(e, "/stream")
    assert rec["status"] == 200
    assert ledger(rec) == [(200, "pass", None, None, None)]


# ---- the per-try timeout -------------------------------------------------------------------


def test_try_timeout_is_an_error_of_kind_timeout_and_can_be_retried(upstream, errord, tmp_path):
    closed = []
    script = Script({"/try": [stall(closed), response(200, b"second try")]})
    up = upstream(script)
    e = errord(up.url, "--policy", policy(tmp_path, FAST + ", try_timeout_ms = 200", """
p.error = function(req, err)
  log { msg = "error seen", seen_kind = err.kind }
  return retry { reason = err.kind }
end"""), "--first-byte-timeout", "10s")
    r, elapsed = timed_get(e.port, "/try")
    assert (r.status, r.body) == (200, b"second try")
    assert elapsed >= 0.2 - TICK
    assert elapsed < 5.0 * SLOW, "took %.3fs: try_timeout_ms did not end the try" % elapsed
    assert script.count("/try") == 2
    first, second = script.arrivals("/try")
    assert second - first >= 0.2 - TICK
    rec = access_for(e, "/try")  # written after the handler's log record
    logs = e.all(type="log", msg="error seen")
    assert [x["seen_kind"] for x in logs] == ["timeout"]
    check_ledger(rec)
    assert ledger(rec) == [("timeout", "retry", "timeout", None, None),
                           (200, "pass", None, None, None)]
    assert rec["attempts"][0]["duration_ms"] >= 190


# ---- the retry budget ----------------------------------------------------------------------

ALWAYS_503 = """
p[503] = function(req, res) return retry { reason = "busy" } end"""


def burst(e, n, tag):
    paths = ["/%s/%d" % (tag, i) for i in range(n)]
    got = get_many(e.port, paths)
    assert all(r.status == 503 for r, _ in got), [r.status for r, _ in got]
    return e.wait_access(n, timeout=15)


def test_budget_bounds_the_retries_of_a_burst_across_workers(upstream, errord, tmp_path):
    n, ratio, min_per_s = 60, 0.1, 1
    up = upstream(lambda req: response(503, b"down"))
    pol = policy(tmp_path, FAST + ", attempts = 3, budget = { ratio = 0.1, min_per_s = 1 }",
                 ALWAYS_503)
    # four workers: a budget kept per worker would allow four times as much
    e = errord(up.url, "--policy", pol, "--workers", "4")
    recs = burst(e, n, "burst")
    hits = len(up.requests)
    # the whole burst fits in one 10 s window: no slot leaves it, so no slack
    allowed = n + math.floor(ratio * n + min_per_s * 10)
    assert hits <= allowed, "%d upstream requests for %d client requests (budget: %d)" % (
        hits, n, allowed)
    # min_per_s × 10 retries are always there
    assert hits >= n + min_per_s * 10, hits
    assert sum(r["retries"] for r in recs) == hits - n
    for rec in recs:
        check_ledger(rec)
    refused = [x["refused"] for x in e.all(msg="retry refused")]
    assert refused.count("budget") >= 1, refused
    assert refused.count("budget") + refused.count("attempts") == n
    assert sum(1 for rec in recs for a in rec["attempts"] if a.get("refused") == "budget") \
        == refused.count("budget")


def test_budget_ratio_counts_requests(upstream, errord, tmp_path):
    """min_per_s = 0: only the ratio gives retries; one retry per two requests."""
    up = upstream(lambda req: response(503, b"down"))
    pol = policy(tmp_path, FAST + ", attempts = 2, budget = { ratio = 0.5, min_per_s = 0 }",
                 ALWAYS_503)
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    for i in range(20):
        assert c.get("/ratio/%d" % i).status == 503
    c.close()
    e.wait_access(20)
    hits = len(up.requests)
    assert hits <= 20 + 10, hits
    assert hits >= 20 + 5, "the ratio gave only %d retries for 20 requests" % (hits - 20)
    assert [x["refused"] for x in e.all(msg="retry refused")].count("budget") >= 1


def test_budget_false_gives_every_request_its_attempts(upstream, errord, tmp_path):
    # 40 requests want 80 retries: more than the default budget allows (0.2 × 40 + 50)
    n = 40
    up = upstream(lambda req: response(503, b"down"))
    pol = policy(tmp_path, FAST + ", attempts = 3, budget = false", ALWAYS_503)
    e = errord(up.url, "--policy", pol, "--workers", "2")
    recs = burst(e, n, "free")
    assert len(up.requests) == 3 * n
    for rec in recs:
        check_ledger(rec)
        assert ledger(rec) == [(503, "retry", "busy", None, None)] * 2 + \
            [(503, "retry", "busy", "attempts", None)]
    assert "budget" not in [x["refused"] for x in e.all(msg="retry refused")]


# ---- the cooldown --------------------------------------------------------------------------


def trigger(e, path="/trigger"):
    """Sends the request whose 403 starts the cooldown; returns when its answer arrived."""
    r, _ = timed_get(e.port, path)
    assert r.status == 403
    return time.monotonic()


def test_cooldown_holds_new_requests_and_releases_them_together(upstream, errord, tmp_path):
    script = Script({"/trigger": [response(403, b'{"message":"slow down"}')]})
    up = upstream(script)
    e = errord(up.url, "--policy", policy(tmp_path, FAST, """
p[403] = function(req, res) errord.cooldown(400) end"""), "--workers", "2")
    trigger(e)
    answered = script.answered["/trigger"][0]  # the cooldown starts after this
    paths = ["/held/%d" % i for i in range(5)]
    got = get_many(e.port, paths)
    sent_by = time.monotonic()
    assert all((r.status, r.body) == (200, b"ok") for r, _ in got), [r.status for r, _ in got]
    arrivals = [script.arrivals(p)[0] for p in paths]
    assert all(len(script.arrivals(p)) == 1 for p in paths)
    # held: none reached the upstream before the cooldown ended...
    early = [round(a - answered, 3) for a in arrivals if a < answered + 0.4 - TICK]
    assert not early, "sent upstream %rs into a 400 ms cooldown" % early
    # ...and released together
    spread = max(arrivals) - min(arrivals)
    assert spread <= 0.1 * SLOW, "released over %.3fs, not together" % spread
    assert sent_by - answered >= 0.4 - TICK
    for p in paths:
        rec = access_for(e, p)
        check_ledger(rec)
        assert rec["attempts"][0].get("held_ms", 0) >= 100, rec["attempts"]
        assert rec["waited_ms"] == rec["attempts"][0]["held_ms"]
    # after the cooldown, nothing is held
    r, _ = timed_get(e.port, "/after")
    assert r.status == 200
    assert "held_ms" not in access_for(e, "/after")["attempts"][0]


def test_a_request_that_cannot_wait_for_the_cooldown_gets_429(upstream, errord, tmp_path):
    script = Script({"/trigger": [response(403, b'{"message":"slow down"}')]})
    up = upstream(script)
    e = errord(up.url, "--policy", policy(tmp_path, FAST, """
p[403] = function(req, res) errord.cooldown(1500) end"""))
    trigger(e)
    answered = script.answered["/trigger"][0]
    received = time.monotonic()
    c = Client(e.port)
    sent = time.monotonic()
    r = c.get("/impatient", headers=[("X-Request-Timeout", "200ms")])
    got = time.monotonic()
    assert_json_error(r, 429)
    assert got < answered + 1.5, "the 429 came only after the cooldown ended"
    ra = r.header("retry-after")
    assert ra is not None and ra.isdigit(), r.headers
    # whole seconds, rounded up, of the cooldown left when the request came
    assert math.ceil(answered + 1.5 - got) <= int(ra) <= math.ceil(received + 1.5 - sent), ra
    assert script.count("/impatient") == 0
    rec = access_for(e, "/impatient")
    assert rec["status"] == 429 and rec["upstream_status"] is None
    assert rec["attempts"] == []
    c.close()


def test_a_held_retry_whose_deadline_comes_first_gets_the_real_response(upstream, errord,
                                                                         tmp_path):
    script = Script({"/held-retry": [response(503, b"the real 503"), response(200, b"no")]})
    up = upstream(script)
    e = errord(up.url, "--policy", policy(tmp_path, FAST + ", deadline_ms = 500", """
p[503] = function(req, res)
  errord.cooldown(1500)
  return retry { after = 10, reason = "busy" }
end"""))
    r, elapsed = timed_get(e.port, "/held-retry")
    assert (r.status, r.body) == (503, b"the real 503"), (r.status, r.body)
    assert elapsed < 1.5, "answered after %.3fs: the cooldown was waited out" % elapsed
    assert script.count("/held-retry") == 1
    rec = access_for(e, "/held-retry")
    check_ledger(rec)
    assert rec["status"] == 503


def test_retry_with_cooldown_holds_every_request_for_its_delay(upstream, errord, tmp_path):
    script = Script({"/first": [response(503, b"busy"), response(200, b"first, again")]})
    up = upstream(script)
    e = errord(up.url, "--policy", policy(tmp_path, FAST, """
p[503] = function(req, res) return retry { after = 400, cooldown = true, reason = "busy" } end"""))
    box = {}

    def first():
        box["first"] = timed_get(e.port, "/first")

    t = threading.Thread(target=first, daemon=True)
    t.start()
    assert wait_until(lambda: script.answered.get("/first"), 5)
    answered = script.answered["/first"][0]
    paths = ["/other/%d" % i for i in range(3)]
    got = get_many(e.port, paths)
    t.join(10 * SLOW)
    assert all(r.status == 200 for r, _ in got)
    r, _ = box["first"]
    assert (r.status, r.body) == (200, b"first, again")
    arrivals = [script.arrivals(p)[0] for p in paths] + [script.arrivals("/first")[1]]
    early = [round(a - answered, 3) for a in arrivals if a < answered + 0.4 - TICK]
    assert not early, "sent upstream %rs into the retry's 400 ms cooldown" % early
    spread = max(arrivals) - min(arrivals)
    assert spread <= 0.1 * SLOW, "released over %.3fs, not together" % spread
    rec = access_for(e, "/first")
    check_ledger(rec)
    assert ledger(rec) == [(503, "retry", "busy", None, None), (200, "pass", None, None, None)]
    assert rec["attempts"][0]["delay_ms"] == 400
    for p in paths:
        assert access_for(e, p)["attempts"][0].get("held_ms", 0) > 0


# ---- the attempt ledger --------------------------------------------------------------------


def test_the_ledger_of_two_retries_a_hold_and_a_refusal(upstream, errord, tmp_path):
    closed = []
    script = Script({
        "/ledger": [response(503, b"busy"), stall(closed), response(502, b"the real 502")],
        "/ledger-bad": [response(500, b"handler fails")],
    })
    up = upstream(script)
    e = errord(up.url, "--policy", policy(
        tmp_path, FAST + ", attempts = 4, deadline_ms = 4000, try_timeout_ms = 200", """
p[503] = function(req, res) return retry { after = 100, reason = "busy" } end
p.error = function(req, err)
  errord.cooldown(300)           -- the next attempt waits 50 ms, then is held ~250 ms
  return retry { after = 50, reason = err.kind }
end
p[502] = function(req, res) return retry { after = 10000, reason = "down" } end
p[500] = function(req, res) error("handler blew up") end"""), "--first-byte-timeout", "10s")
    r, elapsed = timed_get(e.port, "/ledger")
    assert (r.status, r.body) == (502, b"the real 502")
    assert script.count("/ledger") == 3
    rec = access_for(e, "/ledger")
    check_ledger(rec)
    a1, a2, a3 = rec["attempts"]
    assert ledger(rec) == [(503, "retry", "busy", None, None),
                           ("timeout", "retry", "timeout", None, None),
                           (502, "retry", "down", "deadline", None)]
    assert a1["delay_ms"] == 100 and "held_ms" not in a1
    assert a2["delay_ms"] == 50 and "held_ms" not in a2 and a2["duration_ms"] >= 190
    assert "delay_ms" not in a3
    assert 150 <= a3["held_ms"] <= 1000, a3
    assert rec["retries"] == 2
    assert rec["waited_ms"] == 100 + 50 + a3["held_ms"]
    # the whole request took at least its tries and its waits
    assert rec["duration_ms"] >= sum(a["duration_ms"] for a in rec["attempts"]) + \
        rec["waited_ms"] - 5
    assert rec["status"] == 502 and rec["upstream_status"] == 502
    got = e.all(msg="retry refused", request_id=rec["request_id"])
    assert len(got) == 1, got
    assert (got[0]["refused"], got[0]["attempt"], got[0]["status"]) == ("deadline", 3, 502)
    # a handler that fails: the attempt says so, and the response goes through
    r, _ = timed_get(e.port, "/ledger-bad")
    assert (r.status, r.body) == (500, b"handler fails")
    rec = access_for(e, "/ledger-bad")
    check_ledger(rec)
    assert ledger(rec) == [(500, "pass", None, None, "error")]
    assert rec["retries"] == 0 and rec["waited_ms"] == 0


# ---- the default policy against the mock API ------------------------------------------------

HOP = ("host", "connection", "keep-alive", "content-length", "transfer-encoding", "te",
       "trailer", "upgrade", "proxy-connection")


def relay_to(base):
    """An upstream handler that forwards each request to the mock API and
    returns its answer, so that arrivals can be timed (see Script)."""
    u = urlsplit(base)

    def handler(req):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10 * SLOW)
        try:
            headers = {k: v for k, v in req.headers if k.lower() not in HOP}
            conn.request(req.method, req.target, headers=headers)
            r = conn.getresponse()
            data = r.read()
            out = "HTTP/1.1 %d %s\r\n" % (r.status, r.reason)
            for k, v in r.getheaders():
                if k.lower() not in HOP:
                    out += "%s: %s\r\n" % (k, v)
            if r.status not in (204, 304):
                out += "Content-Length: %d\r\n" % len(data)
            return (out + "\r\n").encode() + data
        finally:
            conn.close()

    handler.takes_req = True
    return handler


def test_default_policy_request_limit_403_holds_everyone_and_the_retry_succeeds(
        mock_api, upstream, errord):
    relay = relay_to(mock_api)
    script = Script({}, default=relay)
    up = upstream(script)
    e = errord(up.url, "--policy", DEFAULT_POLICY)
    path = "/v1/limited/%s" % uniq()
    target = path + "?limit=1&window_ms=1000"
    # the first request uses up the window
    r, _ = timed_get(e.port, target)
    assert r.status == 200
    box = {}

    def limited():
        box["r"] = timed_get(e.port, target)

    t = threading.Thread(target=limited, daemon=True)
    t.start()
    # its 403 (with Retry-After: 1) went back to errord at `answered`
    assert wait_until(lambda: len(script.answered.get(path, [])) >= 2, 5)
    answered = script.answered[path][1]
    others = ["/v1/items/%d" % i for i in (1, 2, 3)]
    got = get_many(e.port, others)
    t.join(15 * SLOW)
    assert all(r.status == 200 for r, _ in got), [(r.status, r.body) for r, _ in got]
    r, elapsed = box["r"]
    assert r.status == 200 and r.json()["ok"] is True, (r.status, r.body)
    assert elapsed >= 0.95, "the retried request came back after %.3fs" % elapsed
    first_try, retry = script.arrivals(path)[1:]
    assert retry - first_try >= 0.95
    # the other requests were held by the cooldown, then went with the retry
    arrivals = [script.arrivals(p)[0] for p in others] + [retry]
    early = [round(a - answered, 3) for a in arrivals if a < answered + 1.0 - TICK]
    assert not early, "sent upstream %rs into the 1 s cooldown" % early
    assert max(arrivals) - min(arrivals) <= 0.1 * SLOW
    assert wait_until(lambda: len(e.all(type="access", path=target)) >= 2, 5)
    recs = [x for x in e.all(type="access", path=target) if len(x["attempts"]) == 2]
    assert len(recs) == 1, e.all(type="access", path=target)
    rec = recs[0]
    check_ledger(rec)
    assert ledger(rec) == [(403, "retry", "request_limit", None, None),
                           (200, "pass", None, None, None)]
    assert rec["attempts"][0]["delay_ms"] == 1000
    for p in others:
        held = access_for(e, p)
        check_ledger(held)
        assert held["attempts"][0].get("held_ms", 0) >= 500, held
