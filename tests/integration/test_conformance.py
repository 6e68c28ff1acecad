"""HTTP/1.1 conformance and request smuggling, black-box (SPEC §4, §7).

The request cases of tests/cases/requests.txt go raw over a socket to the
real errord in front of a recording upstream. A case errord must reject is
answered with errord's own JSON error and the connection closed, and nothing
of it reaches the upstream: after each rejection a sentinel request on a new
connection is the barrier, and the upstream must then have seen that one
request on that one connection and nothing else. An `ok` case reaches the
upstream as exactly one request with the case's method, target and body.

The response side uses upstreams that misbehave at the byte level: whatever
breaks the rules becomes a 502 JSON answer, interim responses are never taken
for the final one, and hop-by-hop fields are not copied either way."""

import io
import time

import pytest

import cases as casefile
from support import SLOW, Client, Truncated, read_response, response

CASES = casefile.load("requests.txt")
SENTINEL = b"GET /__sentinel HTTP/1.1\r\nHost: sentinel\r\nConnection: close\r\n\r\n"
UPSTREAM_BODY = b"from-upstream"
# Short upstream timeouts: a response errord wrongly waits on fails the test
# in seconds (as a 504) instead of hanging.
FAST = ("--first-byte-timeout", "3s", "--upstream-idle-timeout", "3s")


def values(msg, name):
    """Every value of field `name` of a Request or Response, one per field line."""
    return [v for k, v in msg.headers if k.lower() == name.lower()]


def tokens(msg, name):
    """The comma-separated elements of every `name` field, lower-cased."""
    out = []
    for v in values(msg, name):
        out += [t.strip().lower() for t in v.split(",") if t.strip()]
    return out


def assert_json_error(r, status):
    """`r` is errord's own error answer (SPEC §4) with this status."""
    assert r is not None, "the connection closed without an answer"
    assert r.status == status, "got %d %s: %r" % (r.status, r.reason, r.body)
    assert (r.header("content-type") or "").split(";")[0].strip() == "application/json"
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]


class Received:
    """What a client read until errord closed: the complete responses
    (interim ones included), whether the last one was cut short, and any
    bytes after them."""

    def __init__(self, raw, method="GET"):
        self.responses = []
        self.truncated = False
        f = io.BytesIO(raw)
        for _ in range(10):
            pos = f.tell()
            try:
                r = read_response(f, method, interim=True)
            except Truncated:
                self.truncated = True
                break
            if r is None:
                f.seek(pos)
                break
            self.responses.append(r)
        self.rest = f.read()

    def describe(self):
        return "%r truncated=%s rest=%r" % ([(r.status, r.body[:60]) for r in self.responses],
                                             self.truncated, self.rest[:60])


def send(c, data):
    """Sends everything it can: errord may answer and close before a large
    request is all sent."""
    try:
        c.send(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def sentinel(e, up):
    """Sends the sentinel request on a new connection and returns what the
    upstream received before it. errord handles a connection's leftover
    bytes as soon as the request before them is answered, so anything it
    would send upstream has been sent by then."""
    s = Client(e.port)
    try:
        s.send(SENTINEL)
        r = s.response()
    finally:
        s.close()
    assert r is not None and r.status == 200, "the sentinel request failed"
    seen = ["%s %s" % (q.method, q.target) for q in up.requests]
    assert seen.count("GET /__sentinel") == 1, seen
    return [q for q in up.requests if q.target != "/__sentinel"]


def assert_upstream_saw_only_sentinel(e, up):
    """After the sentinel, the upstream must have seen it and nothing else,
    on one connection: no request, and no bytes, of what came before."""
    before = sentinel(e, up)
    assert before == [], "the upstream received %r" % [(q.method, q.target) for q in before]
    assert up.connections == 1, "the upstream saw %d connections" % up.connections


# ---- the request cases ------------------------------------------------------------


def test_case_file_is_sane():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) and len(CASES) >= 100
    assert {c.expect for c in CASES} >= {"ok", 400, 414, 417, 431, 501, 505}
    assert casefile.unescape(r"a\r\n\t\0\\\x7f\*3{b\r}") == b"a\r\n\t\0\\\x7fb\rb\rb\r"
    for bad in (r"\q", r"\x4", r"\*2{\*2{a}}", "a\\"):
        with pytest.raises(casefile.CaseError):
            casefile.unescape(bad)
    with pytest.raises(casefile.CaseError):
        casefile.parse("case x\nexpect 400\n> GET / HTTP/1.1 \n")  # trailing space


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_request_case(case, upstream, errord):
    up = upstream(lambda req: response(200, UPSTREAM_BODY))
    e = errord(up.url)
    c = Client(e.port)
    try:
        send(c, case.data)
        if case.ok:
            r = c.response(case.method)
            assert r is not None, "errord closed the connection without an answer"
            assert r.status == 200, "errord answered %d: %r" % (r.status, r.body)
            assert r.body == UPSTREAM_BODY
        else:
            r = c.response()
            assert_json_error(r, case.expect)
            assert "close" in tokens(r, "connection"), "no Connection: close on the rejection"
            assert c.closed(), "errord kept the connection open after rejecting the request"
    finally:
        c.close()
    if not case.ok:
        assert_upstream_saw_only_sentinel(e, up)
        return
    got = sentinel(e, up)
    assert len(got) == 1, "the upstream got %r" % [(q.method, q.target) for q in got]
    got = got[0]
    assert (got.method, got.target) == (case.method, case.target)
    assert got.body == case.body
    for name, value in case.headers:
        assert got.header(name) == value.decode("latin-1"), name


def test_pipelined_bad_request_after_a_good_one(upstream, errord):
    """The good request is answered, the bad one rejected, and only the good
    one reaches the upstream."""
    up = upstream(lambda req: response(200, UPSTREAM_BODY))
    e = errord(up.url)
    c = Client(e.port)
    try:
        c.send(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
               b"POST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        first = c.response()
        assert first is not None and first.status == 200 and first.body == UPSTREAM_BODY
        second = c.response()
        assert_json_error(second, 400)
        assert c.closed()
    finally:
        c.close()
    assert [(q.method, q.target) for q in up.requests] == [("GET", "/first")]


def test_upgrade_request_is_not_a_tunnel(upstream, errord):
    """errord does not switch protocols: after a request asking for an
    Upgrade, the next bytes are the next request, checked like any other,
    never passed through raw."""
    up = upstream(lambda req: response(200, UPSTREAM_BODY))
    e = errord(up.url)
    c = Client(e.port)
    try:
        c.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
               b"POST /smuggled HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        first = c.response()
        assert first is not None and first.status == 200 and first.body == UPSTREAM_BODY
        assert_json_error(c.response(), 400)
        assert c.closed()
    finally:
        c.close()
    assert [(q.method, q.target) for q in up.requests] == [("GET", "/ws")]
    assert not up.requests[0].has("upgrade")
    assert up.connections == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_over_max_body_size_is_413(framing, upstream, errord):
    up = upstream(lambda req: response(200, UPSTREAM_BODY))
    e = errord(up.url, "--max-body-size", "10")
    body = b"x" * 11
    if framing == "chunked":
        data = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"b\r\n" + body + b"\r\n0\r\n\r\n")
    else:
        data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n" + body
    c = Client(e.port)
    try:
        send(c, data)
        r = c.response()
        assert_json_error(r, 413)
        assert c.closed()
    finally:
        c.close()
    assert_upstream_saw_only_sentinel(e, up)


# ---- responses that break the rules -------------------------------------------------


def hold(conn):
    """Keeps the upstream connection open until errord closes it, so that a
    502 comes from what was sent, not from the end of the connection."""
    conn.settimeout(8 * SLOW)
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


def sends(*parts, pause=0.0):
    """A RawUpstream script: sends `parts` (pausing between them), then holds."""
    def script(conn, data):
        for i, part in enumerate(parts):
            if i and pause:
                time.sleep(pause)
            conn.sendall(part)
        hold(conn)
    return script


def through(raw_upstream, errord, script, request=None, method="GET"):
    """One client request (Connection: close) through errord to a raw
    upstream; returns what the client received until errord closed."""
    up = raw_upstream(script)
    e = errord(up.url, *FAST)
    c = Client(e.port)
    try:
        c.send(request or b"GET /r HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        raw = c.read_all()
    finally:
        c.close()
    return Received(raw, method)


GARBAGE = bytes((i * 37 + 11) % 256 for i in range(512))

BAD_RESPONSES = [
    ("status-not-three-digits", b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nhi"),
    ("status-four-digits", b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nhi"),
    ("status-missing", b"HTTP/1.1 OK\r\nContent-Length: 2\r\n\r\nhi"),
    ("status-not-digits", b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nhi"),
    ("version-http2", b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
    ("version-http20", b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
    ("version-lowercase", b"http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
    ("version-icy", b"ICY 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
    ("status-600", b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nhi"),
    ("status-099", b"HTTP/1.1 099 Before\r\nContent-Length: 2\r\n\r\nhi"),
    ("bare-lf-everywhere", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi"),
    ("bare-lf-status-line", b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nhi"),
    ("bare-lf-field-line", b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nhi"),
    ("bare-cr", b"HTTP/1.1 200 OK\rContent-Length: 2\r\n\r\nhi"),
    ("content-length-and-chunked",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\nhi\r\n0\r\n\r\n"),
    ("chunked-and-content-length",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
     b"2\r\nhi\r\n0\r\n\r\n"),
    ("content-length-differing",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\nhi"),
    ("content-length-duplicate",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi"),
    ("content-length-list", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nhi"),
    ("content-length-plus", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nhi"),
    ("chunked-not-last",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
    ("oversized-head",
     b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 70000 + b"\r\nContent-Length: 2\r\n\r\nhi"),
    ("oversized-head-many-fields",
     b"HTTP/1.1 200 OK\r\n" + b"X-Pad: 0123456789012345678901234567890123456789\r\n" * 2000
     + b"Content-Length: 2\r\n\r\nhi"),
    ("binary-garbage", GARBAGE),
    ("tls-handshake", b"\x16\x03\x03\x00\x5d\x02\x00\x00\x59\x03\x03" + GARBAGE[:80]),
    ("html-without-head", b"<html><body>not HTTP</body></html>\r\n\r\n"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 2\r\n\r\nhi"),
    ("obs-fold-htab", b"HTTP/1.1 200 OK\r\nX-A: one\r\n\ttwo\r\nContent-Length: 2\r\n\r\nhi"),
    ("space-before-colon", b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nhi"),
    ("nul-in-value", b"HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 2\r\n\r\nhi"),
    ("switching-protocols-unasked",
     b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
]


@pytest.mark.parametrize("raw", [r for _, r in BAD_RESPONSES], ids=[n for n, _ in BAD_RESPONSES])
def test_invalid_upstream_response_is_502(raw, raw_upstream, errord):
    got = through(raw_upstream, errord, sends(raw))
    assert len(got.responses) == 1 and not got.truncated and got.rest == b"", got.describe()
    assert_json_error(got.responses[0], 502)


def test_invalid_chunk_after_head_is_a_broken_response(raw_upstream, errord):
    """Once the head is out a 502 is too late: the client must see the body
    cut short, never a complete-looking response (SPEC §7)."""
    got = through(raw_upstream, errord, sends(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\nzz\r\n"))
    if got.responses and got.responses[0].status == 502:
        assert_json_error(got.responses[0], 502)  # caught before the head went out: fine too
    else:
        assert got.truncated and not got.responses, got.describe()


NO_BODY = [
    ("204", "GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
    ("304", "GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: \"e\"\r\n\r\n"),
    ("head", "HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
]


@pytest.mark.parametrize("status,method,head", NO_BODY, ids=[n for n, _, _ in NO_BODY])
def test_no_body_response_carries_no_body(status, method, head, raw_upstream, errord):
    """Bytes an upstream sends after a response that has no body (204, 304,
    an answer to HEAD) are not a body and must not reach the client."""
    req = ("%s /r HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % method).encode()
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
    got = through(raw_upstream, errord, sends(head + smuggled), request=req, method=method)
    assert len(got.responses) == 1 and not got.truncated, got.describe()
    assert got.responses[0].status == int(status if status != "head" else 200)
    assert got.responses[0].body == b""
    assert b"smuggled" not in got.rest, got.describe()


# ---- interim responses ------------------------------------------------------------------

INTERIM = (b"HTTP/1.1 100 Continue\r\n\r\n",
           b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal"


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["one-write", "separate-writes"])
def test_interim_responses_are_not_final(pause, raw_upstream, errord):
    got = through(raw_upstream, errord, sends(*INTERIM, FINAL, pause=pause))
    assert got.responses and not got.truncated and got.rest == b"", got.describe()
    *interim, final = got.responses
    assert all(r.status in (100, 103) for r in interim), got.describe()
    assert final.status == 200 and final.body == b"final" and final.header("x-final") == "yes"


def test_interim_response_for_expect_100_continue(raw_upstream, errord):
    """A 100 from the upstream after errord already sent its own must not
    end the request's answer either."""
    req = (b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n"
           b"Connection: close\r\n\r\nabc")
    got = through(raw_upstream, errord, sends(INTERIM[0], FINAL), request=req)
    assert got.responses and not got.truncated and got.rest == b"", got.describe()
    *interim, final = got.responses
    assert all(r.status == 100 for r in interim), got.describe()
    assert final.status == 200 and final.body == b"final"


# ---- hop-by-hop fields -----------------------------------------------------------------

HOP_NAMES = ("x-hop-a", "x-hop-b", "keep-alive", "proxy-connection", "te", "trailer", "upgrade")


def test_hop_by_hop_fields_not_forwarded_upstream(upstream, errord):
    up = upstream(lambda req: response(200, UPSTREAM_BODY))
    e = errord(up.url)
    c = Client(e.port)
    try:
        c.send(b"POST /hop HTTP/1.1\r\n"
               b"Host: a\r\n"
               b"Connection: X-Hop-A, x-hop-b\r\n"
               b"X-Hop-A: secret-a\r\n"
               b"X-HOP-B: secret-b\r\n"
               b"Keep-Alive: timeout=5\r\n"
               b"Proxy-Connection: keep-alive\r\n"
               b"TE: trailers\r\n"
               b"Trailer: X-Checksum\r\n"
               b"Upgrade: websocket\r\n"
               b"X-End-To-End: kept\r\n"
               b"Transfer-Encoding: chunked\r\n"
               b"\r\n"
               b"5\r\nhello\r\n0\r\n\r\n")
        r = c.response()
        assert r is not None and r.status == 200
    finally:
        c.close()
    assert len(up.requests) == 1
    got = up.requests[0]
    assert got.body == b"hello"
    assert got.header("x-end-to-end") == "kept"
    leaked = [n for n in HOP_NAMES if got.has(n)]
    assert not leaked, "hop-by-hop fields reached the upstream: %r" % leaked
    assert not {"x-hop-a", "x-hop-b"} & set(tokens(got, "connection"))
    # errord frames the body itself: one Transfer-Encoding line of its own at most
    assert len(values(got, "transfer-encoding")) <= 1
    assert b"secret" not in got.raw_head


def hop_response(conn, data):
    conn.sendall(b"HTTP/1.1 200 OK\r\n"
                 b"Connection: X-Hop-A, x-hop-b\r\n"
                 b"X-Hop-A: secret-a\r\n"
                 b"X-HOP-B: secret-b\r\n"
                 b"Keep-Alive: timeout=5, max=100\r\n"
                 b"Proxy-Connection: keep-alive\r\n"
                 b"TE: trailers\r\n"
                 b"Trailer: X-Checksum\r\n"
                 b"Upgrade: h2c\r\n"
                 b"X-End-To-End: kept\r\n"
                 b"Transfer-Encoding: chunked\r\n"
                 b"\r\n"
                 b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n")
    hold(conn)


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_hop_by_hop_fields_not_forwarded_to_client(version, raw_upstream, errord):
    req = ("GET /hop %s\r\nHost: a\r\nConnection: close\r\n\r\n" % version).encode()
    got = through(raw_upstream, errord, hop_response, request=req)
    assert len(got.responses) == 1 and not got.truncated and got.rest == b"", got.describe()
    r = got.responses[0]
    assert r.status == 200 and r.body == b"hello"
    assert r.header("x-end-to-end") == "kept"
    leaked = [n for n in HOP_NAMES if r.has(n)]
    assert not leaked, "hop-by-hop fields reached the client: %r" % leaked
    assert not {"x-hop-a", "x-hop-b"} & set(tokens(r, "connection"))
    assert b"secret" not in r.raw
    te = values(r, "transfer-encoding")
    if version == "HTTP/1.0":
        assert te == [], "an HTTP/1.0 client got Transfer-Encoding %r" % te
    else:
        assert len(te) <= 1 and tokens(r, "transfer-encoding") in ([], ["chunked"])
