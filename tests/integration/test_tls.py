"""TLS to the upstream and to alert sinks, black-box: the real errord binary
in front of an HTTP/1.1 origin that speaks TLS (tlskit.TlsUpstream: Python's
ssl module over support.Upstream), with certificates the `openssl` command
line makes once per session (tlskit.Certs: a test CA, leaves for localhost +
127.0.0.1, for other.example, an expired one, and a second, unrelated CA).

- `--upstream https://HOST:PORT`: verified against `--upstream-ca` (or the
  system store, which knows none of these CAs), the host name checked
  against DNS SANs and an IP literal against IP SANs, SNI sent for a name
  and not for an IP literal; `--upstream-insecure` verifies nothing and
  warns at start.
- A failed handshake or verification: 502 with errord's JSON error naming
  OpenSSL's reason, `"error": "tls"` in the attempt ledger, `err.kind ==
  "tls"` in the policy's error handler, errord_upstream_errors_total{kind="tls"};
  the default policy alerts UpstreamTLSFailed and does not retry. A peer
  that is not TLS is a tls error; a stalled handshake runs into
  --connect-timeout (504).
- Pooling: keep-alive TLS connections reused within and across client
  connections and workers; an idle one the upstream ended (close_notify,
  bare FIN, reset) is not reused; new connections resume the TLS session
  (1.2 and 1.3), counted in errord_upstream_tls_handshakes_total.
- Bodies over TLS: 8 MiB both ways, Content-Length and chunked; a response
  in one-byte records; a body cut short reaches the client cut short;
  backpressure both ways (a stalled client, a slow upstream) with flat RSS.
- https alert sinks (by name and by IP): verified against the system store,
  which SSL_CERT_FILE points at the test CA; an unknown CA, a wrong name or
  an expired certificate is a failed delivery, with its reason on /alerts,
  that never holds up traffic.
- `--upstream-ca` may be a bundle; it and `--upstream-insecure` may come
  from the environment; a bad one stops errord at start with exit status 2.
- Plain http upstreams work as before.

Every server binds 127.0.0.1 on a free port and is stopped by its fixture;
every wait is bounded and scaled by SLOW."""

import hashlib
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

import tlskit
from faultkit import RssSampler, rss_env, settle_rss
from support import ERRORD, ROOT, SLOW, Client, Truncated, Upstream, response, wait_until

MIB = 1024 * 1024
BIG = 8 * MIB
# Backpressure: a side that takes nothing for STALL_S while the other offers
# HELD_BYTES; errord's RSS may grow by RSS_BUDGET_KIB at most meanwhile.
HELD_BYTES = 64 * MIB
STALL_S = 1.0
RSS_BUDGET_KIB = 16 * 1024
FAST = "backoff = { base_ms = 1, max_ms = 5 }"

LOCAL_ISSUER = "unable to get local issuer certificate"
DEFAULT_POLICY = os.path.join(ROOT, "lua", "default.lua")


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """Every certificate of tlskit.Certs, made once."""
    return tlskit.Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_upstream(certs):
    """tls_upstream(handler, cert="good") -> a running tlskit.TlsUpstream
    presenting the certificate `cert` (good, other, expired, foreign)."""
    servers = []

    def make(handler=None, cert="good", **kw):
        s = tlskit.TlsUpstream(handler, certs.leaf(cert), **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


# ---- helpers --------------------------------------------------------------------------------


def echo(req):
    """Answers with the request's method, target and body's sha256."""
    return response(200, b"%s %s %s" % (req.method.encode(), req.target.encode(),
                                        hashlib.sha256(req.body).hexdigest().encode()))


def write_policy(tmp_path, body, settings=FAST, name="policy.lua"):
    path = tmp_path / name
    path.write_text("local p = {}\np.settings = { %s }\n%s\nreturn p\n" % (settings, body))
    return str(path)


ERROR_LOGGER = """
p.error = function(req, err)
  log { msg = "error seen", seen_kind = err.kind, seen_message = err.message }
end
"""


def get(port, path, headers=None):
    """GET `path` on a connection of its own."""
    c = Client(port)
    try:
        return c.get(path, headers)
    finally:
        c.close()


def error_message(r):
    """The message of errord's own JSON error response."""
    assert r.header("content-type") == "application/json", r.headers
    msg = r.json().get("message")
    assert isinstance(msg, str) and msg, r.body
    return msg


def access_for(e, path, timeout=5.0):
    wait_until(lambda: e.find(type="access", path=path), timeout)
    rec = e.find(type="access", path=path)
    assert rec is not None, "no access record for %s in %r" % (path, e.records)
    return rec


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric(e, name, **labels):
    """The sum of the samples of `name` whose labels include `labels`."""
    status, text = e.admin("/metrics")
    assert status == 200, (status, text)
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            total += float(m.group(3))
    return total


def chunked_body(data, size=64 * 1024):
    out = bytearray()
    for i in range(0, len(data), size):
        piece = data[i:i + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


class PlainTalker(Upstream):
    """An origin that does not speak TLS: whatever arrives, it answers a
    plain HTTP/1.1 400 and closes."""

    def _serve(self, conn):
        try:
            conn.settimeout(5 * SLOW)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
        except OSError:
            pass
        finally:
            conn.close()


# ---- verification -------------------------------------------------------------------------


def test_https_upstream_verified_with_upstream_ca_answers_and_gets_sni(
        tls_upstream, errord, certs):
    up = tls_upstream(echo)
    e = errord(up.url, "--upstream-ca", certs.ca.cert)
    c = Client(e.port)
    try:
        r = c.get("/v1/items?x=1")
        assert (r.status, r.body) == (200, b"GET /v1/items?x=1 " +
                                      hashlib.sha256(b"").hexdigest().encode()), r.body
        c.request("POST", "/v1/items", [("Content-Type", "application/json")], b'{"a":1}')
        r = c.response()
        assert (r.status, r.body) == (200, b"POST /v1/items " +
                                      hashlib.sha256(b'{"a":1}').hexdigest().encode()), r.body
    finally:
        c.close()
    assert [q.target for q in up.requests] == ["/v1/items?x=1", "/v1/items"]
    assert up.requests[0].header("host") == "localhost:%d" % up.port, up.requests[0].headers
    assert up.sni == ["localhost"], up.sni
    assert up.stats() == (1, 1, 0), up.stats()  # one TLS connection carried both
    assert up.failed == [], up.failed
    rec = access_for(e, "/v1/items?x=1")
    assert rec["status"] == 200 and [a.get("status") for a in rec["attempts"]] == [200], rec


@pytest.mark.parametrize("how", ["flag", "env"])
def test_upstream_ca_may_be_a_bundle_and_come_from_the_environment(
        tls_upstream, errord, certs, tmp_path, how):
    bundle = tmp_path / "bundle.pem"  # the unrelated CA first, then the test CA
    with open(certs.ca2.cert) as a, open(certs.ca.cert) as b:
        bundle.write_text(a.read() + b.read())
    up = tls_upstream(echo)
    if how == "flag":
        e = errord(up.url, "--upstream-ca", str(bundle))
    else:
        e = errord(up.url, env={"ERRORD_UPSTREAM_CA": str(bundle)})
    r = get(e.port, "/bundle")
    assert r.status == 200 and r.body.startswith(b"GET /bundle "), (r.status, r.body)


def test_upstream_insecure_may_come_from_the_environment(tls_upstream, errord):
    up = tls_upstream(echo, cert="expired")
    e = errord(up.url, env={"ERRORD_UPSTREAM_INSECURE": "1"})
    r = get(e.port, "/insecure-env")
    assert r.status == 200, (r.status, r.body)
    assert wait_until(lambda: any("insecure" in str(x.get("msg", ""))
                                  for x in e.all(level="warn")), timeout=2), e.records


def test_an_ip_literal_upstream_is_verified_by_its_ip_san_and_gets_no_sni(
        tls_upstream, errord, certs):
    up = tls_upstream(echo)
    e = errord(up.ip_url, "--upstream-ca", certs.ca.cert)
    r = get(e.port, "/ip")
    assert r.status == 200 and r.body.startswith(b"GET /ip "), (r.status, r.body)
    assert up.sni == [None], "an IP literal was sent as SNI: %r" % up.sni
    assert up.requests[0].header("host") == "127.0.0.1:%d" % up.port, up.requests[0].headers


@pytest.mark.parametrize("cert,trust", [
    ("good", None),         # the system store does not know the test CA
    ("good", "ca2"),        # trusting an unrelated CA instead
    ("foreign", "ca"),      # a leaf of the unrelated CA, trusting the test CA
])
def test_an_unknown_ca_is_a_502_tls_error_that_the_error_handler_sees(
        tls_upstream, errord, certs, tmp_path, cert, trust):
    up = tls_upstream(echo, cert=cert)
    pol = write_policy(tmp_path, ERROR_LOGGER)
    args = ["--policy", pol]
    if trust:
        args += ["--upstream-ca", getattr(certs, trust).cert]
    e = errord(up.url, *args)
    r = get(e.port, "/unknown-ca")
    assert r.status == 502, (r.status, r.body)
    msg = error_message(r)
    assert LOCAL_ISSUER in msg, msg
    rec = access_for(e, "/unknown-ca")
    assert rec["status"] == 502 and rec["upstream_status"] is None, rec
    assert [a.get("error") for a in rec["attempts"]] == ["tls"], rec["attempts"]
    assert wait_until(lambda: e.all(type="log", msg="error seen"))
    logs = e.all(type="log", msg="error seen")
    assert [x["seen_kind"] for x in logs] == ["tls"], logs
    assert LOCAL_ISSUER in logs[0]["seen_message"], logs[0]
    # errord refused the certificate: nothing was sent over the connection
    assert up.requests == [], [q.target for q in up.requests]
    assert wait_until(lambda: up.failed), "the upstream saw no failed handshake"
    assert up.handshakes == 0, up.stats()


def test_the_default_policy_alerts_on_a_tls_failure_and_does_not_retry_it(
        tls_upstream, errord, certs):
    up = tls_upstream(echo, cert="expired")
    e = errord(up.url, "--policy", DEFAULT_POLICY, "--upstream-ca", certs.ca.cert)
    r = get(e.port, "/default")
    assert r.status == 502 and "certificate has expired" in error_message(r), r.body
    rec = access_for(e, "/default")
    assert [(a.get("error"), a.get("verdict")) for a in rec["attempts"]] == [("tls", "pass")], rec
    assert wait_until(lambda: e.find(type="alert", name="UpstreamTLSFailed"))
    alert = e.find(type="alert", name="UpstreamTLSFailed")
    assert "certificate has expired" in alert["summary"], alert
    assert wait_until(lambda: up.failed) and len(up.failed) == 1, up.failed  # one handshake


@pytest.mark.parametrize("url,reason", [
    ("url", "hostname mismatch"),        # https://localhost:PORT, a leaf for other.example
    ("ip_url", "IP address mismatch"),   # https://127.0.0.1:PORT, the same leaf
], ids=["hostname", "ip"])
def test_a_certificate_for_another_name_is_a_502_naming_the_mismatch(
        tls_upstream, errord, certs, url, reason):
    up = tls_upstream(echo, cert="other")
    e = errord(getattr(up, url), "--upstream-ca", certs.ca.cert)
    r = get(e.port, "/mismatch")
    assert r.status == 502, (r.status, r.body)
    msg = error_message(r)
    assert reason in msg, msg
    rec = access_for(e, "/mismatch")
    assert [a.get("error") for a in rec["attempts"]] == ["tls"], rec["attempts"]
    assert up.requests == []


def test_an_expired_certificate_is_a_502_saying_it_expired(tls_upstream, errord, certs):
    up = tls_upstream(echo, cert="expired")
    e = errord(up.url, "--upstream-ca", certs.ca.cert)
    r = get(e.port, "/expired")
    assert r.status == 502, (r.status, r.body)
    msg = error_message(r)
    assert "certificate has expired" in msg, msg
    rec = access_for(e, "/expired")
    assert [a.get("error") for a in rec["attempts"]] == ["tls"], rec["attempts"]
    assert up.requests == []


@pytest.mark.parametrize("cert", ["good", "expired", "other"])
def test_upstream_insecure_accepts_any_certificate_and_warns_at_start(
        tls_upstream, errord, cert):
    up = tls_upstream(echo, cert=cert)
    e = errord(up.url, "--upstream-insecure")

    def warnings():
        return [r for r in e.all(level="warn") if "insecure" in str(r.get("msg", ""))]

    assert wait_until(warnings, timeout=2), \
        "no warning record about --upstream-insecure: %r" % e.records
    assert len(warnings()) == 1, warnings()
    r = get(e.port, "/insecure")
    assert r.status == 200 and r.body.startswith(b"GET /insecure "), (r.status, r.body)
    assert [q.target for q in up.requests] == ["/insecure"]
    assert up.sni == ["localhost"], up.sni


def test_an_upstream_that_does_not_speak_tls_is_a_502_tls_error(errord, certs):
    plain = PlainTalker()
    try:
        e = errord("https://127.0.0.1:%d" % plain.port, "--upstream-ca", certs.ca.cert)
        r = get(e.port, "/plain")
        assert r.status == 502, (r.status, r.body)
        error_message(r)
        rec = access_for(e, "/plain")
        assert [a.get("error") for a in rec["attempts"]] == ["tls"], rec["attempts"]
    finally:
        plain.close()


def test_a_stalled_handshake_counts_against_the_connect_timeout(raw_upstream, errord, certs):
    def stall(conn, data):  # takes the ClientHello, never answers it
        conn.settimeout(10 * SLOW)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    up = raw_upstream(stall)
    timeout = 0.3 * SLOW
    e = errord("https://127.0.0.1:%d" % up.port, "--upstream-ca", certs.ca.cert,
               "--connect-timeout", "%dms" % (timeout * 1000), "--first-byte-timeout", "10s")
    t = time.monotonic()
    r = get(e.port, "/stalled")
    took = time.monotonic() - t
    assert r.status == 504, (r.status, r.body)
    error_message(r)
    assert timeout - 0.02 <= took < timeout + 1.0 * SLOW, \
        "answered after %.2fs with a %.2fs connect timeout" % (took, timeout)
    rec = access_for(e, "/stalled")
    assert len(rec["attempts"]) == 1 and rec["attempts"][0].get("error") in \
        ("connect", "tls", "timeout"), rec["attempts"]


# ---- metrics --------------------------------------------------------------------------------


def test_tls_failures_are_counted_as_upstream_errors_of_kind_tls(tls_upstream, errord):
    up = tls_upstream(echo)
    e = errord(up.url)  # the system store does not know the test CA
    for i in range(3):
        assert get(e.port, "/m/%d" % i).status == 502
    e.wait_access(3)
    assert wait_until(lambda: metric(e, "errord_upstream_errors_total", kind="tls") == 3), \
        metric(e, "errord_upstream_errors_total", kind="tls")
    assert metric(e, "errord_upstream_errors_total") == 3  # no other kind counted
    assert metric(e, "errord_requests_total", status="502") == 3


# ---- connections: pooling and resumption ------------------------------------------------------


def test_twenty_requests_on_one_client_connection_use_one_tls_connection(
        tls_upstream, errord, certs):
    up = tls_upstream(echo)
    e = errord(up.url, "--upstream-ca", certs.ca.cert)
    c = Client(e.port)
    try:
        for i in range(20):
            r = c.get("/k/%d" % i)
            assert r.status == 200 and r.body.startswith(b"GET /k/%d " % i), (i, r.body)
    finally:
        c.close()
    assert len(up.requests) == 20
    assert up.stats() == (1, 1, 0), "connections, handshakes, resumed: %r" % (up.stats(),)
    assert all(len(rec["attempts"]) == 1 for rec in e.wait_access(20))


def test_the_pool_reuses_a_tls_connection_across_client_connections(
        tls_upstream, errord, certs):
    up = tls_upstream(echo)
    e = errord(up.url, "--upstream-ca", certs.ca.cert)
    for i in range(5):
        r = get(e.port, "/client/%d" % i)
        assert r.status == 200, (i, r.status, r.body)
    assert up.stats() == (1, 1, 0), up.stats()


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_new_tls_connections_resume_the_session(tls_upstream, errord, certs, version):
    v = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}[version]
    # Every response ends its connection: each request needs a new one.
    up = tls_upstream(lambda req: response(200, b"closing " + req.target.encode(),
                                           [("Connection", "close")]),
                      min_version=v, max_version=v)
    e = errord(up.url, "--upstream-ca", certs.ca.cert)
    c = Client(e.port)
    n = 6
    try:
        for i in range(n):
            r = c.get("/r/%d" % i)
            assert (r.status, r.body) == (200, b"closing /r/%d" % i), (i, r.status, r.body)
    finally:
        c.close()
    conns, handshakes, resumed = up.stats()
    print("%s: %d connections, %d handshakes, %d resumed" % (version, conns, handshakes, resumed))
    assert (conns, handshakes) == (n, n), up.stats()
    assert set(up.versions) == {version}, up.versions
    # every connection after the first offers the session the previous one left
    assert resumed == n - 1, "%d of %d new connections resumed the TLS session" % (resumed, n - 1)
    assert (metric(e, "errord_upstream_tls_handshakes_total", session="new"),
            metric(e, "errord_upstream_tls_handshakes_total", session="resumed")) == (1, n - 1)
    # a connection that said close was never reused: one attempt each
    assert all(len(rec["attempts"]) == 1 for rec in e.wait_access(n)), e.access()


def test_a_connection_errord_closed_when_idle_is_followed_by_a_resumed_one(
        tls_upstream, errord, certs):
    up = tls_upstream(echo)
    e = errord(up.url, "--upstream-ca", certs.ca.cert, "--upstream-keepalive-timeout", "100ms")
    assert get(e.port, "/before").status == 200
    # errord closes its idle pooled connection after 100 ms
    assert wait_until(lambda: metric(e, "errord_upstream_connections", state="idle") == 0
                      and metric(e, "errord_upstream_connections", state="active") == 0,
                      timeout=3), "the idle upstream connection was not closed"
    assert get(e.port, "/after").status == 200
    assert up.stats() == (2, 2, 1), "connections, handshakes, resumed: %r" % (up.stats(),)


def hang_up(how):
    """Ends a server-side TLS connection: with close_notify, with a bare FIN
    (no close_notify), or with a TCP reset."""
    def close(sock):
        if how == "close_notify":
            tlskit.tls_close(sock)
            return
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return close


@pytest.mark.parametrize("how", ["close_notify", "fin", "reset"])
def test_an_idle_tls_connection_the_upstream_closed_is_not_reused(
        tls_upstream, errord, certs, how):
    closed = []
    go = threading.Event()

    def handler(req):
        out = response(200, b"once " + req.target.encode())

        if req.target != "/first":
            return out

        def answer_then_close(sock):  # a keep-alive response, then the server hangs up
            sock.sendall(out)
            go.wait(10 * SLOW)  # once the client has the response (a reset would lose it)
            hang_up(how)(sock)
            closed.append(req.target)
        return answer_then_close

    up = tls_upstream(handler)
    e = errord(up.url, "--upstream-ca", certs.ca.cert)
    c = Client(e.port)
    try:
        r = c.get("/first")
        assert (r.status, r.body) == (200, b"once /first")
        go.set()
        assert wait_until(lambda: closed == ["/first"])
        r = c.get("/second")
        assert (r.status, r.body) == (200, b"once /second"), (r.status, r.body)
    finally:
        go.set()
        c.close()
    assert [q.target for q in up.requests] == ["/first", "/second"]
    assert up.stats()[:2] == (2, 2), up.stats()


def test_a_response_in_one_byte_tls_records_arrives_whole(tls_upstream, errord, certs):
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (b"tiny ", b"tls ", b"records"))
    raw = b"HTTP/1.1 200 OK\r\nX-Tiny: yes\r\nTransfer-Encoding: chunked\r\n\r\n" + body + \
        b"0\r\n\r\n"

    def handler(req):
        if req.target != "/tiny":
            return echo(req)

        def dribble(sock):  # every byte its own TLS record
            for i in range(len(raw)):
                sock.sendall(raw[i:i + 1])
        return dribble

    up = tls_upstream(handler)
    e = errord(up.url, "--upstream-ca", certs.ca.cert)
    c = Client(e.port)
    try:
        r = c.get("/tiny")
        assert (r.status, r.header("x-tiny"), r.body) == (200, "yes", b"tiny tls records"), r.raw
    finally:
        c.close()


def test_a_tls_upstream_that_breaks_mid_body_cuts_the_client_short(tls_upstream, errord, certs):
    def handler(req):
        def half_then_gone(sock):  # half the announced body, then no close_notify
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 100000)
            sock.close()
        return half_then_gone

    up = tls_upstream(handler)
    e = errord(up.url, "--upstream-ca", certs.ca.cert)
    c = Client(e.port)
    try:
        c.request("GET", "/cut")
        with pytest.raises(Truncated):
            c.response()
    finally:
        c.close()
    rec = access_for(e, "/cut")
    assert rec["status"] == 200 and rec["bytes_out"] < 200000, rec


# ---- large bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_8_mib_request_body_reaches_the_tls_upstream_intact(
        tls_upstream, errord, certs, framing):
    up = tls_upstream(echo)
    e = errord(up.url, "--upstream-ca", certs.ca.cert)
    body = os.urandom(BIG)
    c = Client(e.port, timeout=30)
    try:
        if framing == "chunked":
            c.request("POST", "/upload", [("Transfer-Encoding", "chunked")], chunked_body(body))
        else:
            c.request("POST", "/upload", body=body)
        r = c.response()
        assert (r.status, r.body) == (200, b"POST /upload " +
                                      hashlib.sha256(body).hexdigest().encode()), r.body
        r = c.get("/after")  # the TLS connection is still in step
        assert r.status == 200 and r.body.startswith(b"GET /after "), r.body
    finally:
        c.close()
    assert len(up.requests[0].body) == BIG
    assert up.stats() == (1, 1, 0), up.stats()
    rec = access_for(e, "/upload")
    assert rec["bytes_in"] == BIG, rec


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_8_mib_response_from_the_tls_upstream_reaches_the_client_intact(
        tls_upstream, errord, certs, framing):
    body = os.urandom(BIG)
    big = response(200, body, chunked=(framing == "chunked"))
    up = tls_upstream(lambda req: big if req.target == "/download" else echo(req))
    e = errord(up.url, "--upstream-ca", certs.ca.cert)
    c = Client(e.port, timeout=30)
    try:
        r = c.get("/download")
        assert r.status == 200 and len(r.body) == BIG, (r.status, len(r.body))
        assert hashlib.sha256(r.body).digest() == hashlib.sha256(body).digest()
        r = c.get("/after")
        assert r.status == 200 and r.body.startswith(b"GET /after "), r.body
    finally:
        c.close()
    assert up.stats() == (1, 1, 0), up.stats()
    assert access_for(e, "/download")["bytes_out"] == BIG


def test_a_stalled_client_holds_back_a_tls_download_with_flat_rss(tls_upstream, errord, certs):
    block = os.urandom(256 * 1024)
    n = HELD_BYTES // len(block)
    sent = [0]

    def handler(req):
        def stream(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % HELD_BYTES)
            for _ in range(n):
                sock.sendall(block)
                sent[0] += len(block)
            tlskit.tls_close(sock)
        return stream

    up = tls_upstream(handler)
    e = errord(up.url, "--upstream-ca", certs.ca.cert, env=rss_env())
    before = settle_rss(e)
    c = Client(e.port, timeout=30)
    try:
        with RssSampler(e) as rss:
            c.request("GET", "/held")
            time.sleep(STALL_S)  # the client takes nothing meanwhile
            during = sent[0]
            r = c.response()
    finally:
        c.close()
    print("\nTLS download, client stalled %.1fs: the upstream got %.1f of %d MiB out meanwhile; "
          "errord RSS +%.1f MiB" % (STALL_S, during / MIB, HELD_BYTES // MIB,
                                    (rss.peak - before) / 1024))
    assert r.status == 200 and len(r.body) == HELD_BYTES, (r.status, len(r.body))
    assert hashlib.sha256(r.body).digest() == hashlib.sha256(block * n).digest()
    assert during < HELD_BYTES, "errord took the whole body while its client read nothing"
    assert rss.peak - before < RSS_BUDGET_KIB, "errord's RSS grew by %d KiB" % (rss.peak - before)


def test_a_slow_tls_upstream_holds_back_an_upload_with_flat_rss(tls_upstream, errord, certs):
    up = tls_upstream(echo, serve_delay=STALL_S)  # reads nothing for a while
    e = errord(up.url, "--upstream-ca", certs.ca.cert, env=rss_env())
    before = settle_rss(e)
    body = os.urandom(HELD_BYTES)
    c = Client(e.port, timeout=30)
    try:
        with RssSampler(e) as rss:
            t = time.monotonic()
            c.request("POST", "/held", body=body)
            took = time.monotonic() - t
            r = c.response()
    finally:
        c.close()
    print("\nTLS upload to an upstream reading nothing for %.1fs: sent in %.2fs; errord RSS "
          "+%.1f MiB" % (STALL_S, took, (rss.peak - before) / 1024))
    assert (r.status, r.body) == (200, b"POST /held " + hashlib.sha256(body).hexdigest().encode())
    assert rss.peak - before < RSS_BUDGET_KIB, "errord's RSS grew by %d KiB" % (rss.peak - before)


def test_two_workers_serve_concurrent_clients_over_pooled_tls_connections(
        tls_upstream, errord, certs):
    up = tls_upstream(echo)
    e = errord(up.url, "--upstream-ca", certs.ca.cert, "--workers", "2")
    clients, each = 8, 10
    bad = []

    def run(k):
        c = Client(e.port)
        try:
            for i in range(each):
                r = c.get("/w/%d/%d" % (k, i))
                if r is None or r.status != 200 or not r.body.startswith(b"GET /w/%d/%d " % (k, i)):
                    bad.append((k, i, r and r.status, r and r.body))
        except OSError as err:
            bad.append((k, "error", err))
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30 * SLOW)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert bad == [], bad
    assert len(up.requests) == clients * each
    conns, handshakes, resumed = up.stats()
    # never more TLS connections than requests at once, and none failed
    assert 1 <= handshakes == conns <= clients, up.stats()
    assert up.failed == [], up.failed


# ---- https alert sinks ------------------------------------------------------------------------


FORBIDDEN = response(403, b'{"message":"forbidden"}', [("Content-Type", "application/json")])
ALERTING = """
p[403] = function(req, res)
  alert { name = "TlsSinkTest", severity = "warning", summary = "refused " .. req.path,
          labels = { path = req.path } }
end
"""


def sink_policy(tmp_path, url):
    return write_policy(tmp_path, ALERTING, FAST + ', alerts = { { kind = "webhook", url = %s, '
                        'rate_per_min = 100000 } }' % json.dumps(url))


def sink_state(e, url):
    status, doc = e.admin("/alerts")
    assert status == 200, (status, doc)
    for s in doc["sinks"]:
        if s["url"] == url:
            return s
    raise AssertionError("no sink %s in %r" % (url, doc["sinks"]))


@pytest.mark.parametrize("url,sni", [("url", "localhost"), ("ip_url", None)],
                         ids=["hostname", "ip"])
def test_an_https_webhook_sink_gets_the_alert(
        tls_upstream, upstream, errord, certs, tmp_path, url, sni):
    sink = tls_upstream(lambda req: response(200, b"{}"))
    up = upstream(lambda req: FORBIDDEN)
    hook = getattr(sink, url) + "/hook"
    e = errord(up.url, "--policy", sink_policy(tmp_path, hook),
               env={"SSL_CERT_FILE": certs.ca.cert})
    assert get(e.port, "/v1/secret-thing").status == 403
    assert wait_until(lambda: sink.requests, timeout=5), sink_state(e, hook)
    post = sink.requests[0]
    assert (post.method, post.target) == ("POST", "/hook")
    notice = json.loads(post.body)
    assert (notice["status"], notice["name"], notice["labels"]) == \
        ("firing", "TlsSinkTest", {"path": "/v1/secret-thing"}), notice
    assert sink.sni == [sni], sink.sni
    assert wait_until(lambda: sink_state(e, hook)["sent"] == 1), sink_state(e, hook)
    s = sink_state(e, hook)
    assert (s["state"], s["failed"], s["last_status"]) == ("ok", 0, 200), s
    assert metric(e, "errord_alert_deliveries_total", result="sent") == 1


@pytest.mark.parametrize("cert,trusted,reason", [
    ("good", False, LOCAL_ISSUER),                # the system store does not know the CA
    ("other", True, "hostname mismatch"),         # trusted CA, a leaf for other.example
    ("expired", True, "certificate has expired"),
], ids=["unknown-ca", "name-mismatch", "expired"])
def test_an_https_sink_with_a_bad_certificate_fails_without_blocking_traffic(
        tls_upstream, upstream, errord, certs, tmp_path, cert, trusted, reason):
    sink = tls_upstream(lambda req: response(200, b"{}"), cert=cert)
    up = upstream(lambda req: FORBIDDEN)
    hook = sink.url + "/hook"
    # the short drain bounds the flush of the failing delivery at the end
    e = errord(up.url, "--policy", sink_policy(tmp_path, hook), "--drain-timeout", "500ms",
               env={"SSL_CERT_FILE": certs.ca.cert} if trusted else None)
    c = Client(e.port)
    took = []
    try:
        for i in range(20):
            t = time.monotonic()
            r = c.get("/t/%d" % i)
            took.append(time.monotonic() - t)
            assert r.status == 403, (i, r.status)
        assert wait_until(lambda: metric(e, "errord_alert_deliveries_total",
                                         result="failed") >= 1, timeout=5), sink_state(e, hook)
        # traffic still flows while the sink keeps failing
        t = time.monotonic()
        r = c.get("/t/after")
        took.append(time.monotonic() - t)
        assert r.status == 403
    finally:
        c.close()
    assert max(took) < 1.0 * SLOW, "a request took %.3fs" % max(took)
    assert sink.requests == [], "the sink got a delivery over an unverified connection"
    assert wait_until(lambda: sink.failed), "the sink saw no failed handshake"
    s = sink_state(e, hook)
    assert s["sent"] == 0 and s["failed"] >= 1 and s["state"] != "ok", s
    assert reason in s["last_error"], s  # the handshake's reason
    assert metric(e, "errord_alert_deliveries_total", result="sent") == 0


# ---- the command line -------------------------------------------------------------------------


def test_plain_http_upstream_still_works(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    r = get(e.port, "/plain")
    assert r.status == 200 and r.body.startswith(b"GET /plain "), r.body


@pytest.mark.parametrize("what", ["missing", "not-pem"])
def test_a_bad_upstream_ca_stops_errord_with_exit_status_2(tls_upstream, tmp_path, what):
    up = tls_upstream(echo)
    path = tmp_path / "ca.pem"
    if what == "not-pem":
        path.write_text("this is not a certificate\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERRORD_")}
    cmd = [ERRORD, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--policy", "off",
           "--upstream", up.url, "--upstream-ca", str(path)]
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=10 * SLOW, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("errord started with a %s --upstream-ca" % what)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 2, (p.returncode, err, p.stdout)
    assert "upstream-ca" in err and str(path) in err, err
    assert b"errord started" not in p.stdout, p.stdout
