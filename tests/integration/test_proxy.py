"""errord's forwarding semantics, black-box: the real binary between a raw
client and an upstream on loopback (issue 2, "The proxy"; SPEC §1, §6, §7).

Every assertion is something a user of the proxy would notice: what the
client receives, what the upstream receives, how many connections the
upstream saw, what the access log says, how the command line behaves."""

import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid

import pytest

from support import ERRORD, SLOW, Client, closed_port, response, wait_until

HTTP_DATE = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
                       r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
                       r"\d\d:\d\d:\d\d GMT$")


def echo(req):
    """Answers with the method, target and body the upstream received; a
    HEAD gets the same head with no body."""
    body = ("%s %s|" % (req.method, req.target)).encode() + req.body
    if req.method == "HEAD":
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    return response(200, body)


def chunked(body, size=37, head_fields=b""):
    """A 200 response carrying `body` in chunks of `size` bytes."""
    out = b"HTTP/1.1 200 OK\r\n" + head_fields + b"Transfer-Encoding: chunked\r\n\r\n"
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n\r\n"


def values(msg, name):
    """Every value of field `name` in a Request or Response, one per line."""
    return [v for k, v in msg.headers if k.lower() == name.lower()]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERRORD_")}
    env.update(extra)
    return env


# ---- keep-alive and the upstream pool -----------------------------------------------


def test_many_requests_on_one_client_connection(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    c = Client(e.port)
    for i in range(20):
        r = c.get("/item/%d" % i)
        assert r.status == 200
        assert r.body == b"GET /item/%d|" % i
        assert "close" not in (r.header("connection") or "").lower()
    assert [q.target for q in up.requests] == ["/item/%d" % i for i in range(20)]
    # one upstream connection carried them all (two at most, never one each)
    assert up.connections <= 2
    recs = e.wait_access(20)
    assert len({rec["request_id"] for rec in recs}) == 20
    c.close()


def test_upstream_connections_pooled_across_client_connections(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    for i in range(10):  # one request per client connection
        c = Client(e.port)
        r = c.get("/seq/%d" % i)
        assert r.status == 200 and r.body == b"GET /seq/%d|" % i
        c.close()
    clients = [Client(e.port) for _ in range(3)]  # several open, used in turn
    for i in range(12):
        r = clients[i % 3].get("/turn/%d" % i)
        assert r.status == 200 and r.body == b"GET /turn/%d|" % i
    for c in clients:
        c.close()
    assert len(up.requests) == 22
    assert up.connections <= 2, "%d upstream connections for 22 requests" % up.connections


def test_client_connection_close_is_honoured(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    c = Client(e.port)
    r = c.get("/last", headers=[("Connection", "close")])
    assert r.status == 200 and r.body == b"GET /last|"
    assert "close" in (r.header("connection") or "").lower()
    assert c.closed()
    c.close()


def test_upstream_connection_close_is_not_pooled_client_keeps_alive(upstream, errord):
    up = upstream(lambda req: response(200, req.target.encode(), [("Connection", "close")]))
    e = errord(up.url)
    c = Client(e.port)
    for i in range(3):
        r = c.get("/bye/%d" % i)
        assert r.status == 200 and r.body == b"/bye/%d" % i
        # the upstream's Connection: close is about its own hop, not the client's
        assert "close" not in (r.header("connection") or "").lower()
    assert up.connections == 3
    recs = e.wait_access(3)
    assert all(len(rec["attempts"]) == 1 for rec in recs)
    c.close()


def test_pooled_connection_closed_by_upstream_is_not_reused(upstream, errord):
    def handler(req):
        def answer_then_close(sock):  # a keep-alive answer, then the upstream hangs up
            sock.sendall(response(200, req.target.encode()))
        return answer_then_close

    up = upstream(handler)
    e = errord(up.url, "--log-level", "debug")
    c = Client(e.port)
    r = c.get("/first")
    assert r.status == 200 and r.body == b"/first"
    # give errord the moment it needs to see the idle connection end
    wait_until(lambda: e.find(msg="pooled upstream connection closed"), timeout=2)
    r = c.get("/second")
    assert r.status == 200 and r.body == b"/second"
    assert up.connections == 2
    rec = e.wait_access(2)[1]
    assert rec["path"] == "/second" and rec["status"] == 200
    # the dead connection was dropped from the pool, not tried and retried
    assert len(rec["attempts"]) == 1 and rec["attempts"][0]["status"] == 200
    c.close()


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_request_on_connection_upstream_just_closed_is_retried(upstream, errord, how):
    seen = []

    def handler(req):
        seen.append(req.target)
        if len(seen) != 2:
            return response(200, req.target.encode())

        def hang_up(sock):  # the kept-alive connection ends as the request arrives
            if how == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return hang_up

    up = upstream(handler)
    e = errord(up.url)
    c = Client(e.port)
    assert c.get("/one").body == b"/one"
    r = c.get("/two")
    assert r.status == 200 and r.body == b"/two"
    assert seen == ["/one", "/two", "/two"]
    assert up.connections == 2
    rec = e.wait_access(2)[1]
    assert rec["path"] == "/two" and rec["status"] == 200 and rec["upstream_status"] == 200
    first, second = rec["attempts"]
    assert not first.get("status") and first.get("error")
    assert first.get("verdict") == "retry" and first.get("reason") == "stale_connection"
    assert second["status"] == 200
    # the record's count of retries agrees with its ledger (and the metric)
    assert rec["retries"] == 1
    c.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_retried_request_carries_its_whole_body(upstream, errord, framing):
    body = os.urandom(100_000)
    seen = []

    def handler(req):
        seen.append((req.method, req.target, req.body))
        if len(seen) == 2:
            return None  # the pooled connection ends as the PUT arrives
        return response(200, hashlib.sha256(req.body).hexdigest())

    up = upstream(handler)
    e = errord(up.url)
    c = Client(e.port)
    assert c.get("/warm").status == 200
    if framing == "chunked":
        c.send(b"PUT /doc HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(body), 30_000):
            piece = body[i:i + 30_000]
            c.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        c.send(b"0\r\n\r\n")
    else:
        c.request("PUT", "/doc", body=body)
    r = c.response()
    assert r.status == 200 and r.body == hashlib.sha256(body).hexdigest().encode()
    assert [(m, t) for m, t, _ in seen] == [("GET", "/warm"), ("PUT", "/doc"), ("PUT", "/doc")]
    assert seen[2][2] == body
    assert len(e.wait_access(2)[1]["attempts"]) == 2
    c.close()


def test_non_idempotent_request_is_not_replayed(upstream, errord):
    # RFC 9112 9.3.1: a proxy MUST NOT automatically retry non-idempotent
    # requests; the upstream may have acted on this POST before it hung up.
    seen = []

    def handler(req):
        seen.append((req.method, req.target))
        if len(seen) == 2:
            return None
        return response(200, b"ok")

    up = upstream(handler)
    e = errord(up.url)
    c = Client(e.port)
    assert c.get("/warm").status == 200
    c.request("POST", "/orders", body=b'{"buy": 1}')
    r = c.response()
    assert seen.count(("POST", "/orders")) == 1, seen
    assert r.status == 502
    assert r.header("content-type") == "application/json" and r.json()["message"]
    c.close()


# ---- pipelining ---------------------------------------------------------------------


def test_pipelined_requests_answered_in_order(upstream, errord):
    def handler(req):
        if req.target == "/p/1":
            time.sleep(0.05)  # the first answer is the slowest
        if req.target == "/p/4":
            return chunked(b"fourth, in chunks " * 10)
        return echo(req)

    up = upstream(handler)
    e = errord(up.url)
    c = Client(e.port)
    c.send(b"GET /p/1 HTTP/1.1\r\nHost: t\r\n\r\n"
           b"POST /p/2 HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world"
           b"POST /p/3 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
           b"GET /p/4 HTTP/1.1\r\nHost: t\r\n\r\n"
           b"HEAD /p/5 HTTP/1.1\r\nHost: t\r\n\r\n"
           b"GET /p/6 HTTP/1.1\r\nHost: t\r\n\r\n")
    bodies = []
    for method in ("GET", "POST", "POST", "GET", "HEAD", "GET"):
        r = c.response(method)
        assert r is not None and r.status == 200
        bodies.append(r.body)
    assert bodies == [b"GET /p/1|", b"POST /p/2|hello world", b"POST /p/3|abcdefg",
                      b"fourth, in chunks " * 10, b"", b"GET /p/6|"]
    assert [q.target for q in up.requests] == ["/p/%d" % i for i in range(1, 7)]
    recs = e.wait_access(6)
    assert [rec["path"] for rec in recs] == ["/p/%d" % i for i in range(1, 7)]
    # and the connection is still good for more
    assert c.get("/p/7").body == b"GET /p/7|"
    c.close()


# ---- HTTP/1.0 clients -----------------------------------------------------------------


BIG = b"".join(b"piece %04d;" % i for i in range(500))


def test_http10_client_never_gets_chunked(upstream, errord):
    up = upstream(lambda req: chunked(BIG))
    e = errord(up.url)
    c = Client(e.port, timeout=5)
    c.send(b"GET /old HTTP/1.0\r\n\r\n")
    r = c.response()
    assert r.status == 200
    assert not r.has("transfer-encoding")
    assert b"\r\n0\r\n" not in r.raw
    assert r.body == BIG
    assert c.closed()  # 1.0 without keep-alive: closed after the answer
    rec = e.wait_access(1)[0]
    assert rec["bytes_out"] == len(BIG)
    c.close()


def test_http10_keep_alive_with_unknown_length_ends_by_close(upstream, errord):
    up = upstream(lambda req: chunked(BIG))
    e = errord(up.url)
    c = Client(e.port, timeout=5)
    c.send(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = c.response()
    assert r.status == 200
    assert not r.has("transfer-encoding")
    assert r.body == BIG
    if r.header("content-length") is None:
        # the close is what ends the body: it must not promise more
        assert "keep-alive" not in (r.header("connection") or "").lower()
        assert c.closed()
    c.close()


def test_http10_connection_closed_unless_asked(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    c = Client(e.port, timeout=5)
    c.request("GET", "/a", version="HTTP/1.0")
    r = c.response()
    assert r.status == 200 and r.body == b"GET /a|"
    assert "keep-alive" not in (r.header("connection") or "").lower()
    assert c.closed()
    c.close()


def test_http10_keep_alive_when_asked_and_length_known(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    c = Client(e.port, timeout=5)
    for path in ("/a", "/b"):
        c.request("GET", path, headers=[("Connection", "keep-alive")], version="HTTP/1.0")
        r = c.response()
        assert r.status == 200 and r.body == b"GET %s|" % path.encode()
        assert r.header("content-length") == str(len(r.body))
        assert (r.header("connection") or "").lower() == "keep-alive"
    # a request that does not ask again ends the connection
    c.request("GET", "/c", version="HTTP/1.0")
    r = c.response()
    assert r.status == 200 and r.body == b"GET /c|"
    assert c.closed()
    assert up.connections == 1
    c.close()


# ---- bodies: Content-Length and chunked, both directions -------------------------------------


def test_chunked_request_body_reaches_upstream_intact(upstream, errord):
    up = upstream(lambda req: response(200, hashlib.sha256(req.body).hexdigest()))
    e = errord(up.url)
    c = Client(e.port)
    pieces = [b"hello ", bytes(range(256)), b"\r\n0\r\n\r\n", b"x" * 70000, b"!"]
    c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    for p in pieces:
        c.send(b"%x;note=1\r\n%s\r\n" % (len(p), p))
    c.send(b"0\r\n\r\n")
    want = b"".join(pieces)
    r = c.response()
    assert r.status == 200
    assert r.body == hashlib.sha256(want).hexdigest().encode()
    req = up.requests[0]
    assert req.body == want
    te, cl = req.header("transfer-encoding"), req.header("content-length")
    assert (te is not None and te.lower() == "chunked" and cl is None) or \
        (te is None and cl == str(len(want))), (te, cl)
    rec = e.wait_access(1)[0]
    assert rec["bytes_in"] == len(want)
    c.close()


def test_content_length_request_body_reaches_upstream_intact(upstream, errord):
    up = upstream(lambda req: response(200, hashlib.sha256(req.body).hexdigest()))
    e = errord(up.url)
    c = Client(e.port)
    body = bytes(range(256)) * 300 + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n\x00"
    c.request("PUT", "/blob", body=body)
    r = c.response()
    assert r.status == 200 and r.body == hashlib.sha256(body).hexdigest().encode()
    req = up.requests[0]
    assert req.header("content-length") == str(len(body))
    assert not req.has("transfer-encoding")
    assert req.body == body
    assert len(up.requests) == 1  # the body's bytes were not taken for a request
    assert e.wait_access(1)[0]["bytes_in"] == len(body)
    c.close()


def test_chunked_response_reaches_http11_client_intact(upstream, errord):
    body = os.urandom(300_000)

    def handler(req):
        if req.target == "/big":
            return chunked(body, size=7000,
                           head_fields=b"Content-Type: application/octet-stream\r\n")
        return echo(req)

    up = upstream(handler)
    e = errord(up.url)
    c = Client(e.port)
    r = c.get("/big")
    assert r.status == 200
    assert r.header("content-type") == "application/octet-stream"
    assert hashlib.sha256(r.body).hexdigest() == hashlib.sha256(body).hexdigest()
    assert c.get("/after").body == b"GET /after|"  # the framing ended where it should
    rec = e.wait_access(1)[0]
    assert rec["bytes_out"] == len(body)
    c.close()


def test_chunked_response_with_extensions_and_trailer(upstream, errord):
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=\"x\"\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n")
    up = upstream(lambda req: raw if req.target == "/t" else echo(req))
    e = errord(up.url)
    c = Client(e.port)
    r = c.get("/t")
    assert r.status == 200 and r.body == b"hello world"
    assert c.get("/after").body == b"GET /after|"
    c.close()


def test_close_delimited_upstream_response_reaches_http11_client(upstream, errord):
    body = b"no length, ends with the connection " * 100

    def handler(req):
        if req.target != "/eof":
            return echo(req)

        def send(sock):  # no Content-Length, no chunked: the close ends it
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
        return send

    up = upstream(handler)
    e = errord(up.url)
    c = Client(e.port, timeout=5)
    r = c.get("/eof")
    assert r.status == 200 and r.body == body
    if r.header("transfer-encoding") is not None:  # chunked: the connection goes on
        assert c.get("/after").body == b"GET /after|"
    else:
        assert c.closed()
    c.close()


def test_head_response_has_no_body_and_keeps_content_length(upstream, errord):
    def handler(req):
        if req.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1234\r\n\r\n"
        return echo(req)

    up = upstream(handler)
    e = errord(up.url)
    c = Client(e.port)
    c.request("HEAD", "/doc")
    r = c.response("HEAD")
    assert r.status == 200
    assert r.header("content-length") == "1234"
    assert r.header("content-type") == "text/plain"
    assert not r.has("transfer-encoding")
    # nothing followed the head: the next answer starts right there
    assert c.get("/next").body == b"GET /next|"
    rec = e.wait_access(1)[0]
    assert rec["method"] == "HEAD" and rec["bytes_out"] == 0
    c.close()


def test_head_response_of_chunked_resource_has_no_body(upstream, errord):
    def handler(req):
        if req.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        return echo(req)

    up = upstream(handler)
    e = errord(up.url)
    c = Client(e.port)
    c.request("HEAD", "/stream")
    r = c.response("HEAD")
    assert r.status == 200
    assert c.get("/next").body == b"GET /next|"
    c.close()


@pytest.mark.parametrize("status,raw", [
    (204, b"HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n"),
    (304, b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nX-Kind: none\r\n\r\n"),
    (304, b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 42\r\nX-Kind: none\r\n\r\n"),
])
def test_204_and_304_carry_no_body(upstream, errord, status, raw):
    up = upstream(lambda req: raw if req.target == "/nb" else echo(req))
    e = errord(up.url)
    c = Client(e.port)
    r = c.get("/nb", headers=[("If-None-Match", '"v1"')])
    assert r.status == status
    assert r.header("x-kind") == "none"
    assert not r.has("transfer-encoding")
    if status == 204:
        assert not r.has("content-length")
    else:
        assert r.header("etag") == '"v1"'
    # the next response is parsed right after the head: no body bytes were sent
    assert c.get("/next").body == b"GET /next|"
    assert up.requests[0].header("if-none-match") == '"v1"'
    c.close()


def test_expect_100_continue(upstream, errord):
    up = upstream(lambda req: response(200, b"got %d" % len(req.body)))
    e = errord(up.url)
    c = Client(e.port, timeout=3)
    body = b"z" * 5000
    c.send(b"PUT /up HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body))
    interim = c.response(interim=True)  # before any of the body is sent
    assert interim is not None
    assert interim.version == "HTTP/1.1" and interim.status == 100
    c.send(body)
    r = c.response()
    assert r.status == 200 and r.body == b"got 5000"
    req = up.requests[0]
    assert not req.has("expect")
    assert req.body == body
    c.close()


def test_expect_100_continue_ignored_for_http10(upstream, errord):
    # RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request is
    # ignored; an HTTP/1.0 client cannot parse a 1xx response.
    up = upstream(lambda req: response(200, b"got %d" % len(req.body)))
    e = errord(up.url)
    c = Client(e.port, timeout=3)
    c.send(b"PUT /up HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nabcd")
    r = c.response(interim=True)
    assert r.status == 200 and r.body == b"got 4"
    assert b"100 Continue" not in r.raw
    c.close()


# ---- header rewriting ------------------------------------------------------------------------


def test_hop_by_hop_request_headers_not_forwarded(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    c = Client(e.port)
    r = c.get("/h", headers=[("Connection", "keep-alive, X-Hop-A, x-hop-b"),
                              ("X-Hop-A", "1"), ("X-Hop-B", "2"),
                              ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
                              ("Trailer", "X-Checksum"), ("Proxy-Connection", "keep-alive"),
                              ("X-End-To-End", "kept")])
    assert r.status == 200
    req = up.requests[0]
    for name in ("x-hop-a", "x-hop-b", "keep-alive", "te", "trailer", "proxy-connection"):
        assert not req.has(name), "%s reached the upstream" % name
    assert "x-hop" not in (req.header("connection") or "").lower()
    assert req.header("x-end-to-end") == "kept"
    c.close()


def test_upgrade_request_forwarded_as_plain_http(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    c = Client(e.port)
    r = c.get("/ws", headers=[("Connection", "Upgrade"), ("Upgrade", "websocket"),
                               ("Sec-WebSocket-Version", "13")])
    assert r.status == 200 and r.body == b"GET /ws|"
    req = up.requests[0]
    assert not req.has("upgrade")
    assert "upgrade" not in (req.header("connection") or "").lower()
    assert c.get("/next").body == b"GET /next|"  # still plain HTTP on this connection
    c.close()


def test_hop_by_hop_response_headers_not_forwarded(upstream, errord):
    hop = [("Connection", "X-Resp-Hop"), ("X-Resp-Hop", "1"),
           ("Keep-Alive", "timeout=5, max=100"), ("Trailer", "X-Sum"), ("Upgrade", "h2c"),
           ("Proxy-Connection", "keep-alive"), ("TE", "trailers"), ("X-Kept", "yes")]
    up = upstream(lambda req: response(200, b"body", hop) if req.target == "/r" else echo(req))
    e = errord(up.url)
    c = Client(e.port)
    r = c.get("/r")
    assert r.status == 200 and r.body == b"body"
    for name in ("x-resp-hop", "keep-alive", "trailer", "upgrade", "proxy-connection", "te"):
        assert not r.has(name), "%s reached the client" % name
    assert "x-resp-hop" not in (r.header("connection") or "").lower()
    assert r.header("x-kept") == "yes"
    assert c.get("/next").body == b"GET /next|"
    c.close()


def test_x_forwarded_for_and_proto(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    c = Client(e.port)
    c.get("/a")
    c.get("/b", headers=[("X-Forwarded-For", "203.0.113.7")])
    c.get("/c", headers=[("X-Forwarded-For", "203.0.113.7, 198.51.100.2")])
    c.get("/d", headers=[("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "10.0.0.1")])
    # Fields after and between X-Forwarded-For fields arrive whole.
    c.get("/e", headers=[("X-Forwarded-For", "203.0.113.7"), ("X-After", "kept"),
                         ("X-Forwarded-For", "10.0.0.1"), ("Accept", "*/*")])
    c.get("/f", headers=[("X-Forwarded-For", ""), ("X-After", "kept")])
    a, b, cc, d, e, f = up.requests
    assert a.header("x-forwarded-for") == "127.0.0.1"
    assert b.header("x-forwarded-for") == "203.0.113.7, 127.0.0.1"
    assert cc.header("x-forwarded-for") == "203.0.113.7, 198.51.100.2, 127.0.0.1"
    assert d.header("x-forwarded-for") == "203.0.113.7, 10.0.0.1, 127.0.0.1"
    assert values(e, "x-forwarded-for") == ["203.0.113.7, 10.0.0.1, 127.0.0.1"]
    assert values(e, "x-after") == ["kept"] and values(e, "accept") == ["*/*"]
    assert values(f, "x-forwarded-for") == ["127.0.0.1"] and values(f, "x-after") == ["kept"]
    for req in up.requests:
        assert values(req, "x-forwarded-proto") == ["http"]
    c.close()


def test_request_id_generated_when_absent(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    c = Client(e.port)
    r1, r2 = c.get("/a"), c.get("/b")
    id1, id2 = r1.header("x-request-id"), r2.header("x-request-id")
    assert id1 and re.fullmatch(r"[0-9a-fA-F]{32}", id1), id1
    assert id2 and re.fullmatch(r"[0-9a-fA-F]{32}", id2), id2
    assert id1 != id2
    assert values(up.requests[0], "x-request-id") == [id1]
    assert values(up.requests[1], "x-request-id") == [id2]
    recs = e.wait_access(2)
    assert [rec["request_id"] for rec in recs] == [id1, id2]
    c.close()


def test_request_id_from_client_passed_through(upstream, errord):
    # the upstream sending its own id must not replace the client's
    up = upstream(lambda req: response(200, b"ok", [("X-Request-Id", "upstream-made")]))
    e = errord(up.url)
    c = Client(e.port)
    r = c.get("/a", headers=[("X-Request-Id", "client-chosen-42")])
    assert values(r, "x-request-id") == ["client-chosen-42"]
    assert values(up.requests[0], "x-request-id") == ["client-chosen-42"]
    assert e.wait_access(1)[0]["request_id"] == "client-chosen-42"
    c.close()


def test_host_becomes_upstream_authority(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    c = Client(e.port)
    assert c.get("/h", headers=[("Host", "client.example:8443")]).status == 200
    assert values(up.requests[0], "host") == ["127.0.0.1:%d" % up.port]
    c.close()


def test_preserve_host_keeps_client_host(upstream, errord):
    up = upstream(echo)
    e = errord(up.url, "--preserve-host")
    c = Client(e.port)
    assert c.get("/h", headers=[("Host", "client.example:8443")]).status == 200
    assert values(up.requests[0], "host") == ["client.example:8443"]
    c.close()


def test_preserve_host_with_absolute_form_uses_target_authority(upstream, errord):
    up = upstream(echo)
    e = errord(up.url, "--preserve-host")
    c = Client(e.port)
    c.send(b"GET http://abs.example:8000/x HTTP/1.1\r\nHost: abs.example:8000\r\n\r\n")
    r = c.response()
    assert r.status == 200
    assert up.requests[0].target == "/x"
    assert values(up.requests[0], "host") == ["abs.example:8000"]
    c.close()


def test_date_header_in_responses(upstream, errord):
    fixed = "Sun, 06 Nov 1994 08:49:37 GMT"
    up = upstream(lambda req: response(200, b"ok", [("Date", fixed)] if req.target == "/dated"
                                       else []))
    e = errord(up.url)
    c = Client(e.port)
    r = c.get("/undated")
    dates = values(r, "date")
    assert len(dates) == 1 and HTTP_DATE.match(dates[0]), dates
    r = c.get("/dated")
    assert values(r, "date") == [fixed]  # the origin's own Date is kept, not doubled
    c.close()


@pytest.mark.parametrize("target,origin", [
    ("http://example.com/abs/path?q=1", "/abs/path?q=1"),
    ("http://example.com", "/"),
    ("http://example.com:8080?x=1", "/?x=1"),
])
def test_absolute_form_target_reaches_upstream_in_origin_form(upstream, errord, target, origin):
    up = upstream(echo)
    e = errord(up.url)
    c = Client(e.port)
    c.send("GET %s HTTP/1.1\r\nHost: example.com\r\n\r\n" % target)
    r = c.response()
    assert r.status == 200
    req = up.requests[0]
    assert req.target == origin
    assert values(req, "host") == ["127.0.0.1:%d" % up.port]
    c.close()


# ---- the access log (SPEC §6) ---------------------------------------------------------------


def test_access_record_fields(upstream, errord):
    up = upstream(lambda req: response(201, b"created: " + req.body,
                                       [("Content-Type", "text/plain")]))
    e = errord(up.url)
    c = Client(e.port)
    body = b'{"name":"widget"}'
    c.request("POST", "/v1/items?dry=1", body=body)
    r = c.response()
    assert r.status == 201 and r.body == b"created: " + body
    rec = e.wait_access(1)[0]
    assert isinstance(rec["time"], str) and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", rec["time"])
    assert rec["request_id"] == r.header("x-request-id")
    assert rec["method"] == "POST"
    assert rec["path"] == "/v1/items?dry=1"
    assert rec["status"] == 201
    assert rec["upstream_status"] == 201
    assert rec["bytes_in"] == len(body)
    assert rec["bytes_out"] == len(r.body)
    assert isinstance(rec["duration_ms"], (int, float)) and rec["duration_ms"] >= 0
    attempts = rec["attempts"]
    assert isinstance(attempts, list) and len(attempts) == 1
    assert attempts[0]["status"] == 201
    assert isinstance(attempts[0]["duration_ms"], (int, float))
    assert 0 <= attempts[0]["duration_ms"] <= rec["duration_ms"] + 0.01
    c.close()


def test_one_access_record_per_request(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    c = Client(e.port)
    ids = [c.get("/n/%d" % i).header("x-request-id") for i in range(5)]
    c.close()
    c = Client(e.port)
    c.request("GET", "/n/last", version="HTTP/1.0")
    ids.append(c.response().header("x-request-id"))
    c.close()
    recs = e.wait_access(6)
    assert [rec["request_id"] for rec in recs] == ids
    assert [rec["path"] for rec in recs] == ["/n/%d" % i for i in range(5)] + ["/n/last"]


def test_access_record_for_unreachable_upstream(errord):
    e = errord("http://127.0.0.1:%d" % closed_port())
    c = Client(e.port)
    r = c.get("/down")
    assert r.status == 502
    assert r.header("content-type") == "application/json"
    assert isinstance(r.json().get("message"), str) and r.json()["message"]
    rec = e.wait_access(1)[0]
    assert rec["status"] == 502 and rec["upstream_status"] is None
    assert rec["request_id"] == r.header("x-request-id")
    assert len(rec["attempts"]) >= 1
    assert all(not a.get("status") and a.get("error") for a in rec["attempts"])
    c.close()


def test_access_log_never_holds_secrets(upstream, errord):
    up = upstream(lambda req: response(200, b"ok", [("Set-Cookie", "sid=set-c00kie-value")]))
    e = errord(up.url)
    c = Client(e.port)
    r = c.get("/s", headers=[("Authorization", "Bearer s3cr3t-token-value"),
                              ("Proxy-Authorization", "Basic cHJveHktc2VjcmV0"),
                              ("Cookie", "session=c00kie-value"),
                              ("X-Api-Key", "k3y-value")])
    assert r.status == 200
    assert up.requests[0].header("authorization") == "Bearer s3cr3t-token-value"
    e.wait_access(1)
    c.close()
    e.stop()
    out = "".join(e.lines)
    for secret in ("s3cr3t-token-value", "cHJveHktc2VjcmV0", "c00kie-value", "k3y-value"):
        assert secret not in out


# ---- half-close --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_half_closed_client_gets_whole_response(upstream, errord, version):
    body = os.urandom(200_000)

    def handler(req):
        time.sleep(0.05)  # the client's FIN reaches errord before the answer does
        return response(200, body)

    up = upstream(handler)
    e = errord(up.url)
    c = Client(e.port, timeout=5)
    c.request("GET", "/big", version=version)
    c.shutdown_write()
    r = c.response()
    assert r.status == 200
    assert hashlib.sha256(r.body).digest() == hashlib.sha256(body).digest()
    assert c.closed()
    rec = e.wait_access(1)[0]
    assert rec["status"] == 200 and rec["bytes_out"] == len(body)
    c.close()


def test_half_closed_client_gets_every_pipelined_response(upstream, errord):
    up = upstream(echo)
    e = errord(up.url)
    c = Client(e.port, timeout=5)
    c.send(b"GET /hc/1 HTTP/1.1\r\nHost: t\r\n\r\n"
           b"GET /hc/2 HTTP/1.1\r\nHost: t\r\n\r\n")
    c.shutdown_write()
    r1 = c.response()
    assert r1 is not None and r1.body == b"GET /hc/1|"
    r2 = c.response()
    assert r2 is not None and r2.body == b"GET /hc/2|"
    assert c.closed()
    c.close()


# ---- the command line and the environment -----------------------------------------------------


def run_errord(*args, env=None):
    return subprocess.run([ERRORD, *args], capture_output=True, timeout=10 * SLOW,
                          env=clean_env(**(env or {})))


def test_help_prints_usage():
    p = run_errord("--help")
    assert p.returncode == 0
    out = p.stdout.decode()
    assert "usage" in out.lower()
    for flag in ("--listen", "--upstream", "--workers", "--log-level", "--preserve-host",
                 "ERRORD_UPSTREAM"):
        assert flag in out


def test_version_prints_version():
    p = run_errord("--version")
    assert p.returncode == 0
    out = p.stdout.decode()
    assert re.match(r"errord \d+\.\d+", out), out


@pytest.mark.parametrize("args,needle", [
    ((), "--upstream"),
    (("--listen", "127.0.0.1:0"), "--upstream"),
    (("--upstream", "http://127.0.0.1:1", "--workers", "abc"), "--workers"),
    (("--upstream", "http://127.0.0.1:1", "--listen", "nowhere"), "--listen"),
    (("--upstream", "http://127.0.0.1:1", "--connect-timeout", "soon"), "--connect-timeout"),
    (("--upstream", "http://127.0.0.1:1", "--log-level", "loud"), "--log-level"),
    (("--upstream", "http://127.0.0.1:1", "--no-such-flag"), "--no-such-flag"),
    (("--upstream", "https://127.0.0.1:1/api"), "--upstream"),
    (("--upstream", "ftp://127.0.0.1:1"), "--upstream"),
    (("--upstream", "http://127.0.0.1:1", "--upstream-insecure"), "https"),
    (("--upstream", "https://127.0.0.1:1", "--upstream-ca", "/nonexistent/ca.pem"),
     "/nonexistent/ca.pem"),
    (("--upstream", "http://127.0.0.1:1/api"), "--upstream"),
])
def test_bad_command_line_exits_2(args, needle):
    p = run_errord(*args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    err = p.stderr.decode()
    assert needle in err, err
    assert b"errord started" not in p.stdout


def test_bad_environment_value_exits_2():
    p = run_errord(env={"ERRORD_UPSTREAM": "http://127.0.0.1:1", "ERRORD_WORKERS": "lots"})
    assert p.returncode == 2
    assert "ERRORD_WORKERS" in p.stderr.decode() or "lots" in p.stderr.decode()


class EnvOnlyErrord:
    """errord started with no flags at all, configured by ERRORD_* only."""

    def __init__(self, env):
        self.proc = subprocess.Popen([ERRORD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=clean_env(**env))
        self.records = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in iter(self.proc.stdout.readline, b""):
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            with self._lock:
                self.records.append(rec)

    def find(self, msg):
        with self._lock:
            return next((r for r in self.records if r.get("msg") == msg), None)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10 * SLOW)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode


def test_environment_variables_configure_errord(upstream):
    up = upstream(echo)
    e = EnvOnlyErrord({"ERRORD_UPSTREAM": up.url, "ERRORD_LISTEN": "127.0.0.1:0",
                       "ERRORD_PRESERVE_HOST": "1", "ERRORD_WORKERS": "2"})
    try:
        started = wait_until(lambda: e.find("errord started") or e.proc.poll() is not None,
                             timeout=10)
        rec = e.find("errord started")
        assert rec, "errord did not start: %r" % started
        assert rec["workers"] == 2
        port = int(rec["listen"].rsplit(":", 1)[1])
        c = Client(port)
        r = c.get("/env", headers=[("Host", "from-client.example")])
        assert r.status == 200 and r.body == b"GET /env|"
        assert values(up.requests[0], "host") == ["from-client.example"]
        c.close()
    finally:
        assert e.stop() == 0


def test_flags_beat_environment(upstream, errord):
    up = upstream(echo)
    e = errord(up.url, "--preserve-host=0",
               env={"ERRORD_UPSTREAM": "http://127.0.0.1:%d" % closed_port(),
                    "ERRORD_PRESERVE_HOST": "1", "ERRORD_LISTEN": "nowhere"})
    c = Client(e.port)
    r = c.get("/f", headers=[("Host", "from-client.example")])
    assert r.status == 200 and r.body == b"GET /f|"
    assert values(up.requests[0], "host") == ["127.0.0.1:%d" % up.port]
    c.close()


def test_two_workers_serve_requests(upstream, errord):
    up = upstream(echo)
    e = errord(up.url, "--workers", "2")
    assert e.find(msg="errord started")["workers"] == 2
    clients = [Client(e.port) for _ in range(8)]
    for round_ in range(2):
        for i, c in enumerate(clients):
            r = c.get("/w/%d/%d" % (round_, i))
            assert r.status == 200 and r.body == b"GET /w/%d/%d|" % (round_, i)
    for c in clients:
        c.close()
    assert len(e.wait_access(16)) == 16
    assert e.stop() == 0


# ---- the mock of the reference API through errord ------------------------------------------------


def test_mock_api_answers_through_errord(mock_api, errord):
    e = errord(mock_api)
    c = Client(e.port)

    r = c.get("/v1/items")
    assert r.status == 200 and r.header("content-type") == "application/json"
    assert r.json()["count"] == 5 and len(r.json()["items"]) == 5

    c.request("HEAD", "/v1/items")
    h = c.response("HEAD")
    assert h.status == 200 and h.header("content-length") == str(len(r.body))

    r = c.get("/v1/updates")
    assert r.status == 204 and r.body == b""
    assert not r.has("transfer-encoding") and not r.has("content-length")

    r = c.get("/v1/secure")
    assert r.status == 401
    assert r.json() == {"message": "Missing or incorrect authentication credentials"}
    assert r.header("www-authenticate") == 'Bearer realm="api"'
    r = c.get("/v1/secure", headers=[("Authorization", "Bearer test-token")])
    assert r.status == 200 and r.json()["authenticated"] is True

    r = c.get("/v1/forbidden")
    assert r.status == 403
    assert r.header("content-type") == "application/json"
    assert r.json() == {"message": "Access to this resource is not allowed"}

    doc = b'{"name": "zulu"}'
    c.send(b"POST /v1/items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(doc), doc))
    r = c.response()
    assert r.status == 201 and r.json()["name"] == "zulu"
    assert r.json()["request_body"] == {"length": len(doc),
                                        "sha256": hashlib.sha256(doc).hexdigest()}
    assert r.header("location") == "/v1/items/%d" % r.json()["id"]

    recs = e.wait_access(7)
    assert [rec["status"] for rec in recs] == [200, 200, 204, 401, 200, 403, 201]
    assert [rec["upstream_status"] for rec in recs] == [200, 200, 204, 401, 200, 403, 201]
    c.close()


def test_mock_api_request_limit_403(mock_api, errord):
    e = errord(mock_api)
    c = Client(e.port)
    path = "/v1/limited/proxy-%s?limit=2&window_ms=60000" % uuid.uuid4().hex
    statuses = []
    for _ in range(3):
        r = c.get(path)
        statuses.append(r.status)
    assert statuses == [200, 200, 403]
    assert "limit" in r.json()["message"].lower()
    assert r.header("retry-after") is not None and int(r.header("retry-after")) >= 1
    assert r.header("x-ratelimit-remaining") == "0"
    c.close()


def test_mock_api_echo_sees_what_errord_sends(mock_api, errord):
    e = errord(mock_api)
    c = Client(e.port)
    r = c.get("/echo?x=1", headers=[("X-Request-Id", "echo-id-1"), ("Connection", "X-Gone"),
                                     ("X-Gone", "1"), ("TE", "trailers")])
    assert r.status == 200
    doc = r.json()
    seen = doc["headers"]
    assert doc["path"] == "/echo?x=1"
    assert seen["host"] == mock_api.split("//", 1)[1]
    assert seen["x-request-id"] == "echo-id-1"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert "x-gone" not in seen and "te" not in seen
    c.close()


def test_mock_api_chunked_download_to_http10_and_http11(mock_api, errord):
    n = 300_000
    want = hashlib.sha256((bytes(range(256)) * (n // 256 + 1))[:n]).hexdigest()
    e = errord(mock_api)
    c = Client(e.port)
    r = c.get("/bytes?n=%d&chunked=1" % n)
    assert r.status == 200 and hashlib.sha256(r.body).hexdigest() == want
    c.close()
    c = Client(e.port, timeout=5)
    c.request("GET", "/bytes?n=%d&chunked=1" % n, version="HTTP/1.0")
    r = c.response()
    assert r.status == 200 and not r.has("transfer-encoding")
    assert hashlib.sha256(r.body).hexdigest() == want
    c.close()
