"""The policy engine, black-box (issue 3; SPEC §2, §4, §6): the real errord
binary running a Lua policy between a raw client and an upstream on loopback.

Each test writes its policy into pytest's tmp_path (or uses the checked-in
lua/default.lua and lua/examples/) and checks what a user would notice: what
the client receives, how many requests the upstream saw (and what they
carried), the access record's attempt ledger, and the "log", "alert",
"retry refused" and policy-error records on stdout.

Policies here use a tiny backoff (settings.backoff = 1..5 ms) except where the
delay itself is under test; every wait is bounded."""

import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest

from support import ERRORD, ROOT, SLOW, Client, closed_port, response, wait_until

DEFAULT_POLICY = os.path.join(ROOT, "lua", "default.lua")
EXAMPLES = os.path.join(ROOT, "lua", "examples")
FAST = "p.settings = { backoff = { base_ms = 1, max_ms = 5 } }\n"


# ---- helpers ------------------------------------------------------------------------


def policy(tmp_path, body, name="policy.lua"):
    """Writes a policy `local p = {} <body> return p` and returns its path."""
    path = tmp_path / name
    path.write_text("local p = {}\n" + body + "\nreturn p\n")
    return str(path)


def line_of(path, marker):
    """The 1-based line of `path` that contains `marker`."""
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if marker in line:
                return i
    raise AssertionError("%s not in %s" % (marker, path))


def flag_ms(ms):
    return "%dms" % int(ms * SLOW)


def access_for(e, path, timeout=5.0):
    """The access record of the request for `path` (waits for it)."""
    wait_until(lambda: e.find(type="access", path=path), timeout)
    rec = e.find(type="access", path=path)
    assert rec is not None, "no access record for %s in %r" % (path, e.records)
    return rec


def ledger(rec):
    """The attempt ledger as comparable tuples: (status or error kind, verdict,
    reason, refused, policy_error)."""
    return [(a.get("status", a.get("error")), a.get("verdict"), a.get("reason"),
             a.get("refused"), a.get("policy_error")) for a in rec["attempts"]]


def refusals(e, request_id):
    return e.all(msg="retry refused", request_id=request_id)


def policy_logs(e, **match):
    return e.all(type="log", **match)


def alerts(e, name):
    return e.all(type="alert", name=name)


def targets(up, prefix):
    return [q.target for q in up.requests if q.target.startswith(prefix)]


def counter_handler(statuses, final=(200, b"ok")):
    """An upstream handler answering the n-th request for a target with
    statuses[n] (status, body), then `final` for every later one."""
    seen = {}
    lock = threading.Lock()

    def handler(req):
        with lock:
            n = seen[req.target] = seen.get(req.target, 0) + 1
        status, body = statuses[n - 1] if n <= len(statuses) else final
        return response(status, body, [("X-Upstream-Try", str(n))])

    return handler


def uniq():
    return uuid.uuid4().hex[:12]


def send_chunked(c, method, path, body, headers=(), piece=1000):
    head = "%s %s HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n" % (method, path)
    for k, v in headers:
        head += "%s: %s\r\n" % (k, v)
    data = (head + "\r\n").encode()
    for i in range(0, len(body), piece):
        part = body[i:i + piece]
        data += b"%x\r\n%s\r\n" % (len(part), part)
    c.send(data + b"0\r\n\r\n")


# ---- verdict: pass ------------------------------------------------------------------


def test_pass_forwards_the_response_unchanged_and_the_handler_sees_the_body(
        upstream, errord, tmp_path):
    body = json.dumps({"message": "all good", "n": 7}).encode()
    up = upstream(lambda req: response(200, body, [("Content-Type", "application/json"),
                                                   ("X-Custom", "kept")]))
    pol = policy(tmp_path, FAST + """
p[200] = function(req, res)
  log { msg = "seen", body_nil = res.body == nil, body_len = res.body and #res.body,
        json_message = res.json and res.json.message, header = res.headers["x-custom"] }
  return pass()
end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    r = c.get("/pass")
    assert r.status == 200
    assert r.body == body
    assert r.header("x-custom") == "kept"
    assert r.header("content-type") == "application/json"
    rec = access_for(e, "/pass")
    assert ledger(rec) == [(200, "pass", None, None, None)]
    wait_until(lambda: policy_logs(e, msg="seen"))
    logs = policy_logs(e, msg="seen")
    assert len(logs) == 1, logs
    log = logs[0]
    assert log["body_nil"] is False
    assert log["body_len"] == len(body)
    assert log["json_message"] == "all good"
    assert log["header"] == "kept"
    # log{} adds the request id, the status and the attempt
    assert log["request_id"] == rec["request_id"]
    assert log["status"] == 200 and log["attempt"] == 1
    assert len(up.requests) == 1
    c.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_pass_of_a_body_over_body_limit_streams_and_the_handler_sees_nil(
        upstream, errord, tmp_path, framing):
    big = os.urandom(300 * 1024)

    def handler(req):
        if framing == "chunked":
            out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            for i in range(0, len(big), 7000):
                part = big[i:i + 7000]
                out += b"%x\r\n%s\r\n" % (len(part), part)
            return out + b"0\r\n\r\n"
        return response(200, big)

    up = upstream(handler)
    pol = policy(tmp_path, """
p.settings = { body_limit = 4096, backoff = { base_ms = 1, max_ms = 5 } }
p[200] = function(req, res)
  log { msg = "seen", body_nil = res.body == nil, json_nil = res.json == nil }
end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    r = c.get("/big")
    assert r.status == 200
    assert len(r.body) == len(big)
    assert hashlib.sha256(r.body).hexdigest() == hashlib.sha256(big).hexdigest()
    rec = access_for(e, "/big")
    assert ledger(rec) == [(200, "pass", None, None, None)]
    assert rec["bytes_out"] == len(big)
    logs = policy_logs(e, msg="seen")
    assert len(logs) == 1, logs
    assert logs[0]["body_nil"] is True
    assert logs[0]["json_nil"] is True
    # the connection is still good for another request
    r = c.get("/big")
    assert r.status == 200 and len(r.body) == len(big)
    c.close()


def test_status_without_a_handler_never_enters_lua(upstream, errord, tmp_path):
    up = upstream(lambda req: response(201, b"created"))
    pol = policy(tmp_path, FAST + """
p[500] = function(req, res) log { msg = "500 handler ran" } end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    r = c.get("/fast")
    assert (r.status, r.body) == (201, b"created")
    rec = access_for(e, "/fast")
    assert ledger(rec) == [(201, "pass", None, None, None)]
    assert policy_logs(e) == []
    c.close()


def test_handler_lookup_exact_then_class_then_default(upstream, errord, tmp_path):
    up = upstream(lambda req: response(int(req.target.split("/")[2]), b"x"))
    pol = policy(tmp_path, FAST + """
p[404] = function(req, res) log { msg = "lookup", key = "404" } end
p["4xx"] = function(req, res) log { msg = "lookup", key = "4xx" } end
p.default = function(req, res) log { msg = "lookup", key = "default" } end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    for code in (404, 418, 503, 200):
        assert c.get("/s/%d" % code).status == code
    e.wait_access(4)
    got = {rec["status"]: rec["key"] for rec in policy_logs(e, msg="lookup")}
    assert got == {404: "404", 418: "4xx", 503: "default", 200: "default"}
    c.close()


# ---- verdict: respond ---------------------------------------------------------------


def test_respond_json_replaces_the_response_and_the_upstream_connection_is_reused(
        upstream, errord, tmp_path):
    up = upstream(lambda req: response(500, b"UPSTREAM-SECRET-BODY",
                                       [("X-Upstream-Header", "no")]))
    pol = policy(tmp_path, FAST + """
p[500] = function(req, res)
  return respond { status = 503, json = { message = "try later", path = req.path } }
end
""")
    e = errord(up.url, "--policy", pol)
    for i in range(2):
        c = Client(e.port)
        r = c.get("/r/%d" % i)
        assert r.status == 503
        assert r.header("content-type") == "application/json"
        assert r.json() == {"message": "try later", "path": "/r/%d" % i}
        assert b"UPSTREAM-SECRET-BODY" not in r.raw + r.body
        assert not r.has("x-upstream-header")
        c.close()
        rec = access_for(e, "/r/%d" % i)
        assert rec["status"] == 503
        assert ledger(rec) == [(500, "respond", None, None, None)]
    assert len(up.requests) == 2
    # the upstream's 500 was read to its end, so its connection went back to the pool
    assert up.connections == 1


def test_respond_body_and_headers(upstream, errord, tmp_path):
    up = upstream(lambda req: response(404, b"UPSTREAM-404-BODY"))
    pol = policy(tmp_path, FAST + """
p[404] = function(req, res)
  return respond { status = 200, body = "plain words",
                   headers = { ["Content-Type"] = "text/plain", ["X-From-Policy"] = "yes" } }
end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    r = c.get("/missing")
    assert r.status == 200
    assert r.body == b"plain words"
    assert r.header("content-type") == "text/plain"
    assert r.header("x-from-policy") == "yes"
    assert r.header("content-length") == str(len(b"plain words"))
    assert b"UPSTREAM-404-BODY" not in r.raw
    # the client connection goes on
    r = c.get("/missing")
    assert r.status == 200 and r.body == b"plain words"
    c.close()


def test_respond_to_a_streaming_body_never_leaks_the_upstream_body(upstream, errord, tmp_path):
    marker = b"UPSTREAM-BIG-BODY-"
    big = marker * 20000
    up = upstream(lambda req: response(502, big))
    pol = policy(tmp_path, """
p.settings = { body_limit = 1024 }
p[502] = function(req, res)
  return respond { status = 503, json = { message = "down", streamed = res.body == nil } }
end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    r = c.get("/big502")
    assert r.status == 503
    assert r.json() == {"message": "down", "streamed": True}
    assert marker not in r.raw + r.body
    r = c.get("/big502")  # errord keeps serving on the same client connection
    assert r.status == 503
    c.close()


# ---- verdict: retry ------------------------------------------------------------------


def test_retry_sends_the_request_again_and_a_later_success_reaches_the_client(
        upstream, errord, tmp_path):
    up = upstream(counter_handler([(500, b"first try failed")], final=(200, b"second try")))
    pol = policy(tmp_path, FAST + """
p[500] = function(req, res) return retry { reason = "server_error" } end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    r = c.get("/again")
    assert r.status == 200
    assert r.body == b"second try"
    assert r.header("x-upstream-try") == "2"
    assert targets(up, "/again") == ["/again", "/again"]
    rec = access_for(e, "/again")
    assert ledger(rec) == [(500, "retry", "server_error", None, None),
                           (200, "pass", None, None, None)]
    assert rec["status"] == 200
    c.close()


def test_retry_after_delays_the_next_attempt(upstream, errord, tmp_path):
    arrivals = []

    def handler(req):
        arrivals.append(time.monotonic())
        return response(503 if len(arrivals) == 1 else 200, b"x")

    up = upstream(handler)
    pol = policy(tmp_path, FAST + """
p[503] = function(req, res) return retry { after = 400 } end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    r = c.get("/later")
    assert r.status == 200
    assert len(arrivals) == 2
    gap = arrivals[1] - arrivals[0]
    assert gap >= 0.400 - 0.005, "retry came %.3fs after the first try; after = 400 ms" % gap
    assert gap < 10 * SLOW
    c.close()


# ---- retry rules ----------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [1, 3, 4])
def test_attempts_bound_the_tries_and_the_last_real_response_goes_out(
        upstream, errord, tmp_path, attempts):
    n = [0]

    def handler(req):
        n[0] += 1
        return response(503, b"real answer %d" % n[0], [("X-Try", str(n[0]))])

    up = upstream(handler)
    pol = policy(tmp_path, """
p.settings = { attempts = %d, backoff = { base_ms = 1, max_ms = 5 } }
p[503] = function(req, res) return retry { reason = "busy" } end
""" % attempts)
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    r = c.get("/bounded")
    assert r.status == 503
    assert r.body == b"real answer %d" % attempts  # never a synthetic 502
    assert r.header("x-try") == str(attempts)
    assert len(up.requests) == attempts
    rec = access_for(e, "/bounded")
    assert rec["status"] == 503
    assert ledger(rec) == ([(503, "retry", "busy", None, None)] * (attempts - 1) +
                           [(503, "retry", "busy", "attempts", None)])
    refused = refusals(e, rec["request_id"])
    assert len(refused) == 1, refused
    assert refused[0]["refused"] == "attempts"
    c.close()


def test_attempts_used_up_on_a_streaming_response_forward_it_whole(upstream, errord, tmp_path):
    """The last try's body is larger than body_limit: the refused retry still
    lets the whole real response through."""
    n = [0]

    def handler(req):
        n[0] += 1
        return response(503, (b"try %d;" % n[0]) * 30000)

    up = upstream(handler)
    pol = policy(tmp_path, """
p.settings = { attempts = 2, body_limit = 2048, backoff = { base_ms = 1, max_ms = 5 } }
p[503] = function(req, res) return retry { reason = "busy" } end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    r = c.get("/stream503")
    assert r.status == 503
    assert r.body == b"try 2;" * 30000
    assert len(up.requests) == 2
    rec = access_for(e, "/stream503")
    assert ledger(rec) == [(503, "retry", "busy", None, None),
                           (503, "retry", "busy", "attempts", None)]
    r = c.get("/stream503")  # the framing held: the connection goes on
    assert r.status == 503 and r.body == b"try 4;" * 30000
    c.close()


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
def test_idempotent_methods_are_retried(upstream, errord, tmp_path, method):
    up = upstream(counter_handler([(503, b"")], final=(200, b"")))
    pol = policy(tmp_path, FAST + """
p[503] = function(req, res) return retry {} end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    c.request(method, "/m", body=b"abc" if method == "PUT" else None)
    r = c.response(method)
    assert r.status == 200
    assert [q.method for q in up.requests] == [method, method]
    rec = access_for(e, "/m")
    assert [a[0] for a in ledger(rec)] == [503, 200]
    c.close()


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_unsafe_methods_are_not_retried(upstream, errord, tmp_path, method):
    up = upstream(lambda req: response(503, b"upstream busy"))
    pol = policy(tmp_path, FAST + """
p[503] = function(req, res) return retry { reason = "busy" } end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    c.request(method, "/write", body=b'{"a":1}')
    r = c.response()
    assert (r.status, r.body) == (503, b"upstream busy")
    assert len(up.requests) == 1
    rec = access_for(e, "/write")
    assert ledger(rec) == [(503, "retry", "busy", "unsafe", None)]
    refused = refusals(e, rec["request_id"])
    assert [x["refused"] for x in refused] == ["unsafe"]
    c.close()


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize("how", ["idempotency-key", "unsafe-verdict"])
def test_unsafe_methods_are_retried_with_a_key_or_unsafe_true(
        upstream, errord, tmp_path, method, how):
    up = upstream(counter_handler([(503, b"busy")], final=(201, b"made")))
    verdict = "retry { unsafe = true }" if how == "unsafe-verdict" else "retry {}"
    pol = policy(tmp_path, FAST + "p[503] = function(req, res) return %s end\n" % verdict)
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    headers = [("Idempotency-Key", uniq())] if how == "idempotency-key" else []
    c.request(method, "/write", headers=headers, body=b'{"a":1}')
    r = c.response()
    assert (r.status, r.body) == (201, b"made")
    assert [q.method for q in up.requests] == [method, method]
    rec = access_for(e, "/write")
    assert [a[0] for a in ledger(rec)] == [503, 201]
    assert refusals(e, rec["request_id"]) == []
    c.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_post_body_is_replayed_byte_for_byte(upstream, errord, tmp_path, framing):
    body = os.urandom(200 * 1024) + b"\r\n0\r\n\r\n" + bytes(range(256))
    up = upstream(counter_handler([(503, b"busy"), (500, b"still busy")], final=(200, b"ok")))
    pol = policy(tmp_path, FAST + """
p["5xx"] = function(req, res) return retry {} end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    key = [("Idempotency-Key", uniq())]
    if framing == "chunked":
        send_chunked(c, "POST", "/upload", body, key, piece=4099)
    else:
        c.request("POST", "/upload", headers=key, body=body)
    r = c.response()
    assert (r.status, r.body) == (200, b"ok")
    assert len(up.requests) == 3
    for q in up.requests:
        assert len(q.body) == len(body)
        assert q.body == body
    rec = access_for(e, "/upload")
    assert [a[0] for a in ledger(rec)] == [503, 500, 200]
    assert rec["bytes_in"] == len(body)
    c.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_over_replay_limit_makes_the_retry_impossible(upstream, errord, tmp_path,
                                                             framing):
    body = os.urandom(8192)
    up = upstream(lambda req: response(503, b"busy, got %d" % len(req.body)))
    pol = policy(tmp_path, """
p.settings = { replay_limit = 1024, backoff = { base_ms = 1, max_ms = 5 } }
p[503] = function(req, res) return retry {} end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    if framing == "chunked":
        send_chunked(c, "PUT", "/big-put", body, piece=1000)
    else:
        c.request("PUT", "/big-put", body=body)
    r = c.response()
    assert (r.status, r.body) == (503, b"busy, got 8192")
    assert len(up.requests) == 1
    assert up.requests[0].body == body
    rec = access_for(e, "/big-put")
    assert ledger(rec) == [(503, "retry", None, "body_too_large", None)]
    assert [x["refused"] for x in refusals(e, rec["request_id"])] == ["body_too_large"]
    c.close()


def test_the_wait_between_tries_holds_no_upstream_connection(upstream, errord, tmp_path):
    """While requests wait for their retry, other traffic is served over the
    upstream connections they let go: the upstream sees no new connection."""
    lock = threading.Lock()
    seen = {}

    def handler(req):
        with lock:
            n = seen[req.target] = seen.get(req.target, 0) + 1
        if req.target.startswith("/wait/") and n == 1:
            return response(503, b"not yet")
        return response(200, b"done " + req.target.encode())

    up = upstream(handler)
    pol = policy(tmp_path, FAST + """
p[503] = function(req, res) return retry { after = 3000 } end
""")
    e = errord(up.url, "--policy", pol)
    n_waiting = 4
    waiting = [Client(e.port, timeout=15) for _ in range(n_waiting)]
    for i, c in enumerate(waiting):
        c.request("GET", "/wait/%d" % i)
    assert wait_until(lambda: len(targets(up, "/wait/")) == n_waiting, 5)
    time.sleep(0.1 * SLOW)  # the 503s reach errord and the retries are scheduled
    conns = up.connections
    assert 1 <= conns <= n_waiting

    other = Client(e.port)
    for i in range(6):
        r = other.get("/other/%d" % i)
        assert (r.status, r.body) == (200, b"done /other/%d" % i)
    # these were all served while the retries were still waiting ...
    assert len(targets(up, "/wait/")) == n_waiting, "the retries came too early to tell"
    # ... and over the connections the waiting requests released
    assert up.connections == conns, (up.connections, conns)
    other.close()

    for i, c in enumerate(waiting):
        r = c.response()
        assert (r.status, r.body) == (200, b"done /wait/%d" % i)
        c.close()
    assert len(targets(up, "/wait/")) == 2 * n_waiting


# ---- failures without a status: the error handler --------------------------------------

ERROR_LOGGER = FAST + """
p.error = function(req, err)
  log { msg = "error seen", seen_kind = err.kind, seen_message = err.message }
end
"""


def stall(conn, data):
    """Takes the request and never answers (until errord hangs up)."""
    conn.settimeout(10 * SLOW)
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


def hang_up(conn, data):
    conn.close()


def reset(conn, data):
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


def garbage(conn, data):
    conn.sendall(b"this is not HTTP at all\r\n\r\n")
    time.sleep(0.2)


@pytest.mark.parametrize("kind,script,status", [
    ("connect", None, 502),
    ("timeout", stall, 504),
    ("reset", hang_up, 502),
    ("reset", reset, 502),
    ("protocol", garbage, 502),
])
def test_failures_reach_the_error_handler_with_their_kind(
        raw_upstream, errord, tmp_path, kind, script, status):
    url = "http://127.0.0.1:%d" % closed_port() if script is None else raw_upstream(script).url
    pol = policy(tmp_path, ERROR_LOGGER)
    e = errord(url, "--policy", pol, "--first-byte-timeout", flag_ms(300))
    c = Client(e.port)
    r = c.get("/fail")
    # the handler passed: errord answers per SPEC §4
    assert r.status == status
    assert r.header("content-type") == "application/json"
    assert isinstance(r.json().get("message"), str) and r.json()["message"]
    wait_until(lambda: policy_logs(e, msg="error seen"))
    logs = policy_logs(e, msg="error seen")
    assert len(logs) == 1, logs
    assert logs[0]["seen_kind"] == kind
    assert isinstance(logs[0]["seen_message"], str) and logs[0]["seen_message"]
    assert logs[0]["error_kind"] == kind and logs[0]["attempt"] == 1
    rec = access_for(e, "/fail")
    assert rec["status"] == status
    assert ledger(rec) == [(kind, "pass", None, None, None)]
    c.close()


@pytest.mark.parametrize("kind,script,status", [
    ("connect", None, 502),
    ("timeout", stall, 504),
    ("reset", hang_up, 502),
    ("protocol", garbage, 502),
])
def test_without_an_error_handler_errord_answers_per_spec(
        raw_upstream, errord, tmp_path, kind, script, status):
    url = "http://127.0.0.1:%d" % closed_port() if script is None else raw_upstream(script).url
    pol = policy(tmp_path, FAST + "p[500] = function(req, res) return retry {} end\n")
    e = errord(url, "--policy", pol, "--first-byte-timeout", flag_ms(300))
    c = Client(e.port)
    r = c.get("/noerr")
    assert r.status == status
    assert r.header("content-type") == "application/json"
    assert isinstance(r.json().get("message"), str) and r.json()["message"]
    rec = access_for(e, "/noerr")
    assert ledger(rec) == [(kind, "pass", None, None, None)]
    c.close()


def one_request_per_connection(*scripts):
    """A raw upstream script: the n-th connection runs scripts[n] (the last
    one for every later connection)."""
    count = [0]
    lock = threading.Lock()

    def script(conn, data):
        with lock:
            count[0] += 1
            n = count[0]
        scripts[min(n, len(scripts)) - 1](conn, data)

    return script


def answer(status, body):
    def script(conn, data):
        conn.sendall(response(status, body, [("Connection", "close")]))
    return script


@pytest.mark.parametrize("kind,first", [("reset", reset), ("timeout", stall),
                                        ("protocol", garbage)])
def test_error_handler_retry_after_a_failure(raw_upstream, errord, tmp_path, kind, first):
    up = raw_upstream(one_request_per_connection(first, answer(200, b"second time lucky")))
    pol = policy(tmp_path, FAST + """
p.error = function(req, err) return retry { reason = err.kind } end
""")
    e = errord(up.url, "--policy", pol, "--first-byte-timeout", flag_ms(300))
    c = Client(e.port)
    r = c.get("/bumpy")
    assert (r.status, r.body) == (200, b"second time lucky")
    assert len(up.raw_received) == 2
    assert all(d.startswith(b"GET /bumpy HTTP/1.1\r\n") for d in up.raw_received)
    rec = access_for(e, "/bumpy")
    assert ledger(rec) == [(kind, "retry", kind, None, None),
                           (200, "pass", None, None, None)]
    c.close()


def test_error_handler_retry_after_a_refused_connection(errord, tmp_path):
    """The upstream refuses the first connection and is listening by the time
    of the retry."""
    port = closed_port()
    pol = policy(tmp_path, FAST + """
p.error = function(req, err) return retry { after = 1500, reason = err.kind } end
""")
    e = errord("http://127.0.0.1:%d" % port, "--policy", pol)
    c = Client(e.port, timeout=15)
    c.request("GET", "/late")
    assert wait_until(lambda: e.find(msg="upstream failed", kind="connect"), 5)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(4)
    srv.settimeout(10 * SLOW)
    got = []

    def serve():
        try:
            conn, _ = srv.accept()
            conn.settimeout(10 * SLOW)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            got.append(data)
            conn.sendall(response(200, b"finally", [("Connection", "close")]))
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = c.response()
        assert (r.status, r.body) == (200, b"finally")
        assert len(got) == 1 and got[0].startswith(b"GET /late ")
        rec = access_for(e, "/late")
        assert ledger(rec) == [("connect", "retry", "connect", None, None),
                               (200, "pass", None, None, None)]
    finally:
        t.join(5)
        srv.close()
        c.close()


@pytest.mark.parametrize("with_error_handler", [False, True])
def test_an_earlier_real_response_wins_over_a_later_failure(
        raw_upstream, errord, tmp_path, with_error_handler):
    up = raw_upstream(one_request_per_connection(answer(503, b"the real 503"), hang_up))
    handlers = "p[503] = function(req, res) return retry { reason = 'busy' } end\n"
    if with_error_handler:
        handlers += "p.error = function(req, err) return retry { reason = 'broke' } end\n"
    pol = policy(tmp_path, FAST + handlers)
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    r = c.get("/earlier")
    assert r.status == 503
    assert r.body == b"the real 503"
    rec = access_for(e, "/earlier")
    assert rec["status"] == 503
    if with_error_handler:
        # 503 -> retry; reset -> retry; reset -> retry refused (attempts = 3)
        assert len(up.raw_received) == 3
        assert ledger(rec) == [(503, "retry", "busy", None, None),
                               ("reset", "retry", "broke", None, None),
                               ("reset", "retry", "broke", "attempts", None)]
    else:
        assert len(up.raw_received) == 2
        assert ledger(rec) == [(503, "retry", "busy", None, None),
                               ("reset", "pass", None, None, None)]
    c.close()


# ---- safety: a failing handler fails open -------------------------------------------

# statement, failure kind, whether the record must point at the statement's own
# line (a loop inside pcall is stopped again on the first line after the pcall,
# which is still a line of the handler)
FAILING = {
    "error": ('error("policy blew up")  -- FAIL HERE', "error", True),
    "loop": ("while true do end  -- FAIL HERE", "timeout", True),
    "memory": ('local mib, t = string.rep("x", 1024):rep(1024), {} '
               "for i = 1, 100000 do t[i] = mib .. i end  -- FAIL HERE", "memory", True),
    "pcall-loop": ("pcall(function() while true do end end)  -- FAIL HERE", "timeout", False),
}


@pytest.mark.parametrize("what", sorted(FAILING))
def test_a_failing_handler_fails_open(upstream, errord, tmp_path, what):
    statement, kind, exact_line = FAILING[what]
    up = upstream(lambda req: response(503 if req.target.startswith("/bad") else 200,
                                       b"upstream body for " + req.target.encode(),
                                       [("X-Upstream", "yes")]))
    pol = policy(tmp_path, """
p.settings = { limits = { memory_mb = 16, time_ms = 5000 }, backoff = { base_ms = 1, max_ms = 5 } }
p[503] = function(req, res)
  %s
  return respond { status = 200, body = "the handler should not get here" }
end
""" % statement)
    line = line_of(pol, "FAIL HERE")
    where = re.compile(r"%s:%s\b" % (re.escape(os.path.basename(pol)),
                                      line if exact_line else r"(%d|%d)" % (line, line + 1)))
    e = errord(up.url, "--policy", pol)
    for i in range(2):  # the state still works after the failure
        c = Client(e.port, timeout=15)
        path = "/bad/%d" % i
        r = c.get(path)
        assert r.status == 503
        assert r.body == b"upstream body for " + path.encode()
        assert r.header("x-upstream") == "yes"
        rec = access_for(e, path)
        assert ledger(rec) == [(503, "pass", None, None, kind)]
        errs = e.all(msg="policy handler failed; passing the response through",
                     request_id=rec["request_id"])
        assert len(errs) == 1, errs
        err = errs[0]
        assert err["level"] == "error"
        assert err["kind"] == kind
        assert where.search(err["error"] + "\n" + err.get("traceback", "")), err
        assert "stack traceback" in err.get("traceback", ""), err
        # errord keeps serving
        r = c.get("/fine")
        assert (r.status, r.body) == (200, b"upstream body for /fine")
        c.close()
    assert len(up.requests) == 4  # fail open: no retry either


def test_pcall_cannot_swallow_the_stop(upstream, errord, tmp_path):
    up = upstream(lambda req: response(503, b"upstream"))
    pol = policy(tmp_path, """
p[503] = function(req, res)
  for i = 1, 100 do pcall(function() while true do end end) end
  return respond { status = 200, body = "swallowed" }
end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port, timeout=15)
    t0 = time.monotonic()
    r = c.get("/spin")
    assert (r.status, r.body) == (503, b"upstream")
    assert time.monotonic() - t0 < 10 * SLOW  # it did not hang (the limit is far lower)
    rec = access_for(e, "/spin")
    assert ledger(rec) == [(503, "pass", None, None, "timeout")]
    c.close()


def test_a_handler_that_keeps_running_out_of_time_is_set_aside(upstream, errord, tmp_path):
    """Each such call holds errord's loop for the handler's limit: after 3
    within 10 s the handler is set aside (its responses pass at once) while
    the other handlers go on; a reload brings it back."""
    up = upstream(lambda req: response(503 if req.target.startswith("/spin") else 502,
                                       b"upstream " + req.target.encode()))
    pol = policy(tmp_path, """
p[503] = function(req, res) while true do end end
p[502] = function(req, res) return respond { status = 200, body = "handled" } end
""")
    e = errord(up.url, "--policy", pol)
    c = Client(e.port, timeout=15)
    for i in range(5):
        r = c.get("/spin/%d" % i)
        assert (r.status, r.body) == (503, b"upstream /spin/%d" % i)
    kinds = [ledger(access_for(e, "/spin/%d" % i))[0][4] for i in range(5)]
    assert kinds == ["timeout"] * 3 + ["set_aside"] * 2, kinds
    rec = wait_until(lambda: e.find(msg="policy handler set aside: its responses pass for a while"))
    assert rec and rec["status"] == 503 and rec["failures"] == 3 and rec["for_ms"] == 30000
    # the other handler is still called
    r = c.get("/other")
    assert (r.status, r.body) == (200, b"handled")
    status, text = e.admin("/metrics")
    assert status == 200
    assert 'errord_policy_errors_total{kind="timeout"} 3\n' in text, text
    assert 'errord_policy_errors_total{kind="set_aside"} 2\n' in text, text
    # a reload is a new policy: the handler is called again
    with open(pol, "a") as f:
        f.write("-- reloaded\n")
    assert e.admin("/reload", method="POST")[0] == 200
    r = c.get("/spin/after-reload")
    assert r.status == 503
    assert ledger(access_for(e, "/spin/after-reload"))[0][4] == "timeout"
    c.close()


def test_broken_handlers_under_concurrent_load_fail_open_and_are_counted(
        upstream, errord, tmp_path):
    """Six clients at once, each cycling through a status whose handler
    raises on every call, one that allocates without end, one that loops
    forever, and a status with no handler: every request gets the
    upstream's own response, each failure is counted by kind, and the
    looping and the allocating handlers are each set aside after their
    third failure (the allocating one runs out of memory, or, on a slow
    machine, out of time first)."""
    statuses = {"/err": 500, "/mem": 503, "/loop": 504, "/ok": 200}
    up = upstream(lambda req: response(statuses[req.target.split("?")[0]],
                                       b"upstream " + req.target.encode()))
    pol = policy(tmp_path, """
p.settings = { limits = { memory_mb = 16 } }
p[500] = function(req, res) error("broken on every call") end
p[503] = function(req, res)
  local mib, t = string.rep("x", 1024):rep(1024), {}
  for i = 1, math.huge do t[i] = mib .. i end
end
p[504] = function(req, res) while true do end end
""")
    e = errord(up.url, "--policy", pol)
    clients, rounds = 6, 5
    sent = {path: 0 for path in statuses}
    lock = threading.Lock()

    def client(n):
        c = Client(e.port, timeout=30 * SLOW)
        got = []
        for i in range(rounds):
            for path in statuses:
                target = "%s?c=%d&i=%d" % (path, n, i)
                r = c.get(target)
                got.append((r.status, r.body) == (statuses[path], b"upstream " + target.encode()))
                with lock:
                    sent[path] += 1
        c.close()
        return got

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients), timeout=120 * SLOW))
    assert all(all(got) for got in results), results
    assert sent == {path: clients * rounds for path in statuses}

    status, text = e.admin("/metrics")
    assert status == 200
    counted = {k: int(float(v)) for k, v in
               re.findall(r'^errord_policy_errors_total\{kind="(\w+)"\} (\S+)$', text, re.M)}
    assert counted.get("error") == clients * rounds, counted
    assert counted.get("memory", 0) + counted.get("timeout", 0) == 2 * 3, counted
    assert counted.get("timeout", 0) >= 3, counted
    assert counted.get("set_aside") == 2 * (clients * rounds - 3), counted
    assert wait_until(lambda: len(e.all(type="access")) == clients * rounds * len(statuses), 5)
    follow = Client(e.port)
    assert follow.get("/ok?after").status == 200
    follow.close()


# ---- start-up ---------------------------------------------------------------------------

BAD_POLICIES = {
    "syntax": ("local p = {}\np[500] = function(req, res)\n  return retry {\nend\nreturn p\n",
               ":4:"),
    "runtime": ("local p = {}\nlocal x = nil\np.n = x.field\nreturn p\n", ":3:"),
    "raises": ("local p = {}\nerror('refusing to load')\nreturn p\n", ":2:"),
    "non-table": ("return 42\n", "table"),
    "string-status-key": ('return { ["500"] = function() end }\n', '"500"'),
    "status-out-of-range": ("return { [700] = function() end }\n", "700"),
    "handler-not-a-function": ('return { [500] = "retry" }\n', "[500]"),
    "failing-test": ("local p = {}\np[500] = function(req, res) end\n"
                     "p.tests = { { name = 'five hundred retries', res = { status = 500 },\n"
                     "              expect = { verdict = 'retry' } } }\nreturn p\n",
                     "five hundred retries"),
}


@pytest.mark.parametrize("what", sorted(BAD_POLICIES))
def test_a_bad_policy_stops_errord_at_start(tmp_path, what):
    src, expect = BAD_POLICIES[what]
    path = tmp_path / ("bad_%s.lua" % what.replace("-", "_"))
    path.write_text(src)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERRORD_")}
    proc = subprocess.Popen([ERRORD, "--listen", "127.0.0.1:0", "--upstream",
                             "http://127.0.0.1:%d" % closed_port(), "--policy", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=10 * SLOW)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("errord kept running with a bad policy: %r" % out)
    out, err = out.decode(), err.decode()
    assert proc.returncode == 2, (proc.returncode, out, err)
    assert "errord started" not in out  # it never listened
    assert expect in err, err
    if expect.startswith(":"):
        # a Lua error: file:line (Lua shortens a long path to ".../tail")
        assert "%s%s" % (path.name, expect) in err, err
    else:
        assert str(path) in err, err


def test_policy_off_runs_without_a_policy(upstream, errord):
    up = upstream(lambda req: response(500, b"broken"))
    e = errord(up.url, "--policy", "off")
    assert e.find(msg="errord started")["policy"] == "off"
    c = Client(e.port)
    r = c.get("/x")
    assert (r.status, r.body) == (500, b"broken")
    assert len(up.requests) == 1  # the default policy would have retried
    rec = access_for(e, "/x")
    assert ledger(rec) == [(500, "pass", None, None, None)]
    c.close()


def test_without_policy_flag_the_default_policy_runs(upstream, errord):
    up = upstream(lambda req: response(500, b'{"message":"Something is broken"}'))
    # An empty ERRORD_POLICY counts as unset; passing it keeps the harness from
    # adding --policy off, so errord runs with no --policy at all.
    e = errord(up.url, env={"ERRORD_POLICY": ""})
    assert "--policy" not in e.cmd
    started = e.find(msg="errord started")
    assert os.path.realpath(started["policy"]) == os.path.realpath(DEFAULT_POLICY)
    c = Client(e.port)
    r = c.get("/x")
    assert r.status == 500
    assert len(up.requests) == 3  # lua/default.lua: 500 is retried, 3 attempts
    rec = access_for(e, "/x")
    # the last attempt's answer is passed on: no retry asked for, none refused
    assert ledger(rec) == [(500, "retry", "server_error", None, None),
                           (500, "retry", "server_error", None, None),
                           (500, "pass", None, None, None)]
    c.close()


def test_the_default_policy_stops_retrying_an_endpoint_that_always_fails(upstream, errord):
    """Retries are for blips: once the first retries of 3 requests to an
    endpoint, and over 80% of them, failed in 10 s, its failures are passed
    on at once instead of each one costing three upstream requests and their
    backoff."""
    up = upstream(lambda req: response(500, b'{"message":"Something is broken"}'))
    e = errord(up.url, "--policy", DEFAULT_POLICY)
    c = Client(e.port)
    attempts = []
    for i in range(10):
        before = len(up.requests)
        assert c.get("/v1/down?i=%d" % i).status == 500
        attempts.append(len(up.requests) - before)
    c.close()
    assert attempts[0] == 3, attempts
    assert attempts[-5:] == [1] * 5, attempts
    assert sum(attempts) <= 3 * 3 + 7, attempts
    # another endpoint is still retried
    c = Client(e.port)
    before = len(up.requests)
    assert c.get("/v1/other").status == 500
    assert len(up.requests) - before == 3
    c.close()


# ---- the default policy against the mock API ------------------------------------------

HOP = ("host", "connection", "keep-alive", "content-length", "transfer-encoding", "te",
       "trailer", "upgrade", "proxy-connection")


def relay_to(base):
    """An upstream handler that forwards each request to the mock API and
    returns the mock's answer, so the test can count what reached the mock."""
    u = urlsplit(base)

    def handler(req):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10 * SLOW)
        try:
            headers = {k: v for k, v in req.headers if k.lower() not in HOP}
            body = req.body if (req.body or req.method in ("POST", "PUT", "PATCH")) else None
            conn.request(req.method, req.target, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            out = "HTTP/1.1 %d %s\r\n" % (r.status, r.reason)
            for k, v in r.getheaders():
                if k.lower() not in HOP:
                    out += "%s: %s\r\n" % (k, v)
            if r.status not in (204, 304):
                length = r.getheader("Content-Length") if req.method == "HEAD" else len(data)
                out += "Content-Length: %s\r\n" % length
            return (out + "\r\n").encode() + data
        finally:
            conn.close()

    return handler


@pytest.fixture
def api(mock_api, upstream, errord):
    """errord running lua/default.lua in front of the mock API (through a
    counting relay); returns (errord, relay)."""
    relay = upstream(relay_to(mock_api))
    e = errord(relay.url, "--policy", DEFAULT_POLICY)
    return e, relay


def test_default_204_passes_with_no_body(api):
    e, relay = api
    c = Client(e.port)
    r = c.get("/v1/updates")
    assert r.status == 204 and r.body == b""
    assert not r.has("transfer-encoding")
    # the framing was right: the connection carries the next request
    r = c.get("/v1/items/1")
    assert r.status == 200 and r.json()["name"] == "alpha"
    assert targets(relay, "/v1/updates") == ["/v1/updates"]
    rec = access_for(e, "/v1/updates")
    assert ledger(rec) == [(204, "pass", None, None, None)]
    assert policy_logs(e) == [] and e.all(type="alert") == []
    c.close()


@pytest.mark.parametrize("method,path,body,status,message", [
    ("GET", "/v1/items/99", None, 404, "Item not found"),
    ("GET", "/status/400", None, 400, "The request was invalid or cannot be otherwise served"),
    ("POST", "/v1/items", b'{"colour": "red"}', 400, "Invalid parameter: name is required"),
    ("POST", "/v1/items", b"{not json", 422, "The JSON body of the request is badly-formed"),
    ("GET", "/status/422", None, 422, "The JSON body of the request is badly-formed"),
])
def test_default_client_errors_are_logged_and_not_retried(api, method, path, body, status,
                                                          message):
    e, relay = api
    c = Client(e.port)
    # an Idempotency-Key: errord would allow a retry, so only the policy stops one
    c.request(method, path, headers=[("Idempotency-Key", uniq()),
                                     ("Content-Type", "application/json")], body=body)
    r = c.response()
    assert r.status == status
    assert r.json() == {"message": message}
    assert targets(relay, path) == [path]
    rec = access_for(e, path)
    assert ledger(rec) == [(status, "pass", None, None, None)]
    logs = policy_logs(e, request_id=rec["request_id"])
    assert len(logs) == 1, logs
    assert logs[0]["status"] == status
    assert logs[0]["message"] == message
    assert logs[0]["path"] == path
    assert e.all(type="alert") == []
    c.close()


def test_default_401_alerts_and_is_not_retried(api):
    e, relay = api
    c = Client(e.port)
    r = c.get("/v1/secure", headers=[("Authorization", "Bearer wrong-token")])
    assert r.status == 401
    assert r.header("www-authenticate") == 'Bearer realm="api"'
    assert targets(relay, "/v1/secure") == ["/v1/secure"]
    rec = access_for(e, "/v1/secure")
    assert ledger(rec) == [(401, "pass", None, None, None)]
    got = alerts(e, "UpstreamCredentialsRejected")
    assert len(got) == 1, e.all(type="alert")
    assert got[0]["severity"] == "critical"
    assert got[0]["request_id"] == rec["request_id"]
    assert "/v1/secure" in got[0]["summary"]
    assert "wrong-token" not in json.dumps(e.records)  # the secret never reaches a record
    # the right token works
    r = c.get("/v1/secure", headers=[("Authorization", "Bearer test-token")])
    assert r.status == 200
    c.close()


def test_default_request_limit_403_is_retried_until_the_window_resets(api, mock_api):
    e, relay = api
    path = "/v1/limited/%s" % uniq()
    target = path + "?limit=1&window_ms=300"
    # use up the window directly at the mock
    u = urlsplit(mock_api)
    direct = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    direct.request("GET", target)
    assert direct.getresponse().status == 200
    direct.close()
    c = Client(e.port, timeout=15)
    t0 = time.monotonic()
    r = c.get(target)
    assert r.status == 200
    assert r.json()["ok"] is True
    assert targets(relay, path) == [target, target]
    # the retry waited for the Retry-After (1 s) the mock sent with its 403
    assert time.monotonic() - t0 >= 1.0 - 0.01
    rec = access_for(e, target)
    assert ledger(rec) == [(403, "retry", "request_limit", None, None),
                           (200, "pass", None, None, None)]
    assert e.all(type="alert") == []
    c.close()


def test_default_request_limit_403_passes_after_three_attempts(api):
    e, relay = api
    path = "/status/403?x=%s" % uniq()
    c = Client(e.port)
    r = c.get(path)
    assert r.status == 403
    assert r.json() == {"message": "Request limit exceeded"}
    assert targets(relay, path) == [path] * 3
    rec = access_for(e, path)
    # the third answer is passed on: the policy asks for no retry errord would refuse
    assert ledger(rec) == [(403, "retry", "request_limit", None, None)] * 2 + \
        [(403, "pass", None, None, None)]
    assert refusals(e, rec["request_id"]) == []
    assert e.all(type="alert") == []
    c.close()


def test_default_forbidden_403_alerts_and_passes(api):
    e, relay = api
    c = Client(e.port)
    r = c.get("/v1/forbidden")
    assert r.status == 403
    assert r.json() == {"message": "Access to this resource is not allowed"}
    assert targets(relay, "/v1/forbidden") == ["/v1/forbidden"]
    rec = access_for(e, "/v1/forbidden")
    assert ledger(rec) == [(403, "pass", None, None, None)]
    got = alerts(e, "UpstreamForbidden")
    assert len(got) == 1, e.all(type="alert")
    assert got[0]["severity"] == "warning"
    assert "/v1/forbidden" in got[0]["summary"]
    c.close()


@pytest.mark.parametrize("code", [500, 504])
def test_default_500_and_504_are_retried(api, code):
    e, relay = api
    path = "/status/%d?x=%s" % (code, uniq())
    c = Client(e.port)
    r = c.get(path)
    assert r.status == code
    assert "try again later" in r.json()["message"].lower()
    assert targets(relay, path) == [path] * 3
    rec = access_for(e, path)
    assert ledger(rec) == [(code, "retry", "server_error", None, None)] * 2 + \
        [(code, "pass", None, None, None)]
    c.close()


def test_default_502_is_retried_and_succeeds_on_the_second_attempt(api):
    e, relay = api
    path = "/flaky?fail=1&key=%s" % uniq()
    c = Client(e.port)
    r = c.get(path)
    assert r.status == 200
    assert r.json()["attempt"] == 2
    assert r.header("x-attempt") == "2"
    assert targets(relay, path) == [path] * 2
    rec = access_for(e, path)
    assert ledger(rec) == [(502, "retry", "upstream_down", None, None),
                           (200, "pass", None, None, None)]
    assert alerts(e, "UpstreamDown") == []
    c.close()


def test_default_raises_upstream_down_past_ten_502s_a_minute(api):
    e, relay = api

    def one(i):
        c = Client(e.port, timeout=15)
        try:
            r = c.get("/flaky?fail=1&key=%s-%d" % (uniq(), i))
            return r.status
        finally:
            c.close()

    # ten 502s (each followed by a successful retry): no alert yet
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        assert list(pool.map(one, range(10))) == [200] * 10
    e.wait_access(10)
    assert len([q for q in relay.requests if q.target.startswith("/flaky")]) == 20
    assert alerts(e, "UpstreamDown") == []
    # the eleventh, a second later: the default policy retries an endpoint at
    # most 10 times a second
    time.sleep(1.1)
    assert one(10) == 200
    wait_until(lambda: alerts(e, "UpstreamDown"))
    got = alerts(e, "UpstreamDown")
    assert len(got) == 1, got
    assert got[0]["severity"] == "critical"
    assert got[0]["status"] == 502


def test_default_retries_a_failure_without_a_status(raw_upstream, errord):
    up = raw_upstream(one_request_per_connection(reset, answer(200, b"back")))
    e = errord(up.url, "--policy", DEFAULT_POLICY)
    c = Client(e.port)
    r = c.get("/v1/items")
    assert (r.status, r.body) == (200, b"back")
    assert len(up.raw_received) == 2
    rec = access_for(e, "/v1/items")
    assert ledger(rec) == [("reset", "retry", "reset", None, None),
                           (200, "pass", None, None, None)]
    c.close()


def test_default_never_repeats_a_post_without_idempotency_key(raw_upstream, errord):
    up = raw_upstream(one_request_per_connection(reset, answer(201, b"made")))
    e = errord(up.url, "--policy", DEFAULT_POLICY)
    c = Client(e.port)
    c.request("POST", "/v1/items", body=b'{"name": "foxtrot"}')
    r = c.response()
    assert r.status == 502
    assert r.header("content-type") == "application/json"
    assert len(up.raw_received) == 1
    rec = access_for(e, "/v1/items")
    assert ledger(rec) == [("reset", "retry", "reset", "unsafe", None)]
    assert [x["refused"] for x in refusals(e, rec["request_id"])] == ["unsafe"]
    c.close()


# ---- lua/examples -------------------------------------------------------------------------


def example(name):
    return os.path.join(EXAMPLES, name)


def test_example_retry_5xx_get_only(mock_api, upstream, errord):
    relay = upstream(relay_to(mock_api))
    e = errord(relay.url, "--policy", example("retry_5xx_get_only.lua"))
    c = Client(e.port, timeout=15)
    get = "/status/503?x=%s" % uniq()
    r = c.get(get)
    assert r.status == 503
    assert targets(relay, get) == [get] * 4  # settings.attempts = 4
    for method in ("PUT", "DELETE"):
        path = "/status/503?x=%s" % uniq()
        c.request(method, path, body=b"{}" if method == "PUT" else None)
        r = c.response()
        assert r.status == 503
        assert [(q.method, q.target) for q in relay.requests if q.target == path] == \
            [(method, path)]
    missing = "/status/404?x=%s" % uniq()
    assert c.get(missing).status == 404
    assert targets(relay, missing) == [missing]
    c.close()


def test_example_limit_403_to_429(mock_api, upstream, errord):
    relay = upstream(relay_to(mock_api))
    e = errord(relay.url, "--policy", example("limit_403_to_429.lua"))
    c = Client(e.port)
    path = "/v1/limited/%s?limit=0&window_ms=5000" % uniq()
    r = c.get(path)
    assert r.status == 429
    assert r.header("retry-after") == "5"
    assert r.header("content-type") == "application/json"
    assert r.json() == {"message": "Request limit exceeded, please slow down"}
    assert targets(relay, path.split("?")[0]) == [path]  # not retried
    rec = access_for(e, path)
    assert ledger(rec) == [(403, "respond", None, None, None)]
    # a real 403 stays a 403
    r = c.get("/v1/forbidden")
    assert r.status == 403
    assert r.json() == {"message": "Access to this resource is not allowed"}
    assert not r.has("retry-after")
    c.close()


def test_example_alert_5xx_spike(mock_api, upstream, errord):
    relay = upstream(relay_to(mock_api))
    e = errord(relay.url, "--policy", example("alert_5xx_spike.lua"))
    c = Client(e.port)
    for i in range(20):
        assert c.get("/status/500?i=%d" % i).status == 500
    e.wait_access(20)
    assert len(relay.requests) == 20  # passed through, never retried
    assert alerts(e, "Upstream5xxSpike") == []
    assert len(policy_logs(e, msg="upstream server error")) == 20
    assert c.get("/status/500?i=20").status == 500
    wait_until(lambda: alerts(e, "Upstream5xxSpike"))
    got = alerts(e, "Upstream5xxSpike")
    assert len(got) == 1, got
    assert got[0]["severity"] == "critical"
    assert got[0]["labels"] == {"status": "500"}
    assert got[0]["count"] == 1
    # it keeps firing as one de-duplicated alert with a growing count
    assert c.get("/status/500?i=21").status == 500
    wait_until(lambda: len(alerts(e, "Upstream5xxSpike")) == 2)
    assert [a["count"] for a in alerts(e, "Upstream5xxSpike")] == [1, 2]
    c.close()


def test_default_sends_a_handful_of_retries_to_an_endpoint_failing_everything(api):
    # 40 requests at once to a route that fails every time and was not
    # retried before: the default policy retries at most 10 of them in a
    # second (20 if the burst straddles a second), not all 40; fewer when
    # the first retries fail before the burst is over (the breaker opens
    # once 3 have failed).
    e, relay = api
    key = uniq()

    def one(i):
        c = Client(e.port, timeout=15)
        try:
            return c.get("/flaky?fail=1000&key=%s-%d" % (key, i)).status
        finally:
            c.close()

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        assert list(pool.map(one, range(40))) == [502] * 40
    e.wait_access(40)
    sent = [q for q in relay.requests if key in q.target]
    retries = len(sent) - 40
    assert 3 <= retries <= 20, retries
