"""errord under faults, timeouts, limits and shutdown, seen from outside.

Every case checks what a user would notice (status, JSON body, timing, a
connection that closes, a response that is visibly broken), that errord's
access record names what went wrong, and that errord keeps serving after.
Durations given to errord are stretched by SLOW under sanitizer builds, like
the harness's own waits."""

import io
import random
import re
import select
import signal
import socket
import struct
import threading
import time

import pytest

from faultkit import flag_ms, http_script, secs, wait_peer_close
from faultkit import origin  # noqa: F401 (a fixture)
from support import SLOW, Client, Truncated, read_response, response, wait_until

OK_BODY = b"ok"


def ok_handler(req):
    return response(200, OK_BODY)


def assert_json_error(r, status):
    """errord's own answer (SPEC §4): the status, JSON, a message."""
    assert r is not None, "connection closed without a response (wanted %d)" % status
    assert r.status == status, (r.status, r.body)
    assert r.header("content-type") == "application/json", r.headers
    msg = r.json().get("message")
    assert isinstance(msg, str) and msg, r.body


def follow_up_ok(e, path="/ok"):
    """A new client gets a normal answer: errord is still serving."""
    c = Client(e.port)
    try:
        r = c.get(path)
        assert r.status == 200 and r.body == OK_BODY, (r.status, r.body)
    finally:
        c.close()


def attempt_errors(rec):
    return [a.get("error") for a in rec["attempts"]]


def timed(fn, *args):
    t0 = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t0


def access_for(e, path, timeout=5.0):
    wait_until(lambda: e.find(type="access", path=path), timeout)
    rec = e.find(type="access", path=path)
    assert rec is not None, "no access record for %s: %r" % (path, e.access())
    return rec


# ---- the upstream cannot be reached -----------------------------------------------------


def test_refused_connection_is_502_within_a_second(origin, errord):
    # The port is bound but nothing listens: every connect is refused.
    held = origin(listen=False)
    e = errord(held.url)
    c = Client(e.port)
    r, elapsed = timed(c.get, "/refused")
    print("refused -> %d in %.3fs" % (r.status, elapsed))
    assert_json_error(r, 502)
    assert elapsed < 1.0, "502 took %.3fs, the contract says within a second" % elapsed
    rec = access_for(e, "/refused")
    assert rec["status"] == 502 and rec["upstream_status"] is None
    assert rec["attempts"] and set(attempt_errors(rec)) == {"connect"}, rec

    # Still refused on the same connection: errord answers again, promptly.
    r, elapsed = timed(c.get, "/refused-again")
    assert_json_error(r, 502)
    assert elapsed < 1.0
    # The upstream comes up: the same client connection is now served.
    held.start(http_script(ok_handler))
    r = c.get("/ok")
    assert r.status == 200 and r.body == OK_BODY
    c.close()
    follow_up_ok(e)


def test_silent_upstream_is_504_when_first_byte_timeout_fires(upstream, errord):
    closed_by_errord = []

    def handler(req):
        if req.target == "/silent":
            return lambda sock: closed_by_errord.append(wait_peer_close(sock, secs(10)))
        return ok_handler(req)

    up = upstream(handler)
    timeout = 0.3 * SLOW
    e = errord(up.url, "--first-byte-timeout", flag_ms(300))
    c = Client(e.port)
    r, elapsed = timed(c.get, "/silent")
    print("silent upstream -> %d after %.3fs (timeout %.3fs)" % (r.status, elapsed, timeout))
    assert_json_error(r, 504)
    assert timeout - 0.02 <= elapsed < timeout + secs(1.0)
    rec = access_for(e, "/silent")
    assert rec["status"] == 504 and attempt_errors(rec) == ["timeout"], rec
    # errord gave up the silent connection instead of keeping it.
    assert wait_until(lambda: closed_by_errord, 3) == [True]
    # The client connection goes on, and so does errord.
    r = c.get("/ok")
    assert r.status == 200 and r.body == OK_BODY
    c.close()
    follow_up_ok(e)


def test_unresolvable_upstream_host_is_502_and_errord_keeps_running(errord):
    e = errord("http://no-such-host.invalid:80")
    for i in range(3):
        c = Client(e.port)
        r = c.get("/nxdomain/%d" % i)
        assert_json_error(r, 502)
        # The client connection survives errord's own error.
        assert_json_error(c.get("/nxdomain/%d/again" % i), 502)
        c.close()
        assert e.proc.poll() is None, "errord died"
    rec = access_for(e, "/nxdomain/0")
    assert rec["status"] == 502 and set(attempt_errors(rec)) == {"connect"}, rec
    assert len(e.wait_access(6)) == 6


def test_connect_timeout_is_504(origin, errord):
    # No address on this machine drops SYNs (every outside address answers
    # at once here), so the upstream is a loopback listener whose accept
    # queue is full: the kernel drops the SYNs of further connects.
    o = origin(listen=False)
    o.listen_only(0)
    assert o.fill_backlog(), "could not fill the accept queue of the upstream"
    timeout = 0.3 * SLOW
    e = errord(o.url, "--connect-timeout", flag_ms(300))
    c = Client(e.port)
    r, elapsed = timed(c.get, "/connect")
    print("connect timeout -> %d after %.3fs (timeout %.3fs)" % (r.status, elapsed, timeout))
    assert_json_error(r, 504)
    assert timeout - 0.02 <= elapsed < timeout + secs(1.0)
    rec = access_for(e, "/connect")
    assert rec["status"] == 504 and set(attempt_errors(rec)) == {"connect"}, rec
    # The upstream starts accepting: errord serves again.
    o.start(http_script(ok_handler))
    r = c.get("/ok")
    assert r.status == 200 and r.body == OK_BODY
    c.close()
    follow_up_ok(e)


# ---- the upstream misbehaves -----------------------------------------------------------

GARBAGE = {
    "ssh-banner": b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    "tls-record": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(64)),
    "text": b"hello, this is not http\r\n\r\n",
    "bad-status": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
}
CUT_LENGTH = 100000
CUT_SENT = 40000


class Misbehaving:
    """A raw upstream that misbehaves according to the request path, and
    answers /ok normally (closing after it, so nothing is pooled)."""

    def __init__(self):
        self.peer_closed = {}  # path -> whether errord closed the connection

    def __call__(self, conn, data):
        path = data.split(b" ", 2)[1].decode() if b" " in data else ""
        if path.startswith("/garbage/"):
            conn.sendall(GARBAGE[path.split("/")[2]])
            self.peer_closed[path] = wait_peer_close(conn, secs(10))
        elif path == "/close-at-once":
            return
        elif path == "/close-mid-head":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
        elif path == "/cut-length":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % CUT_LENGTH)
            conn.sendall(b"x" * CUT_SENT)
        elif path == "/cut-chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            conn.sendall(b"4000\r\n" + b"a" * 0x4000 + b"\r\n")
            conn.sendall(b"4000\r\n" + b"b" * 0x2000)  # dies inside the second chunk
        elif path == "/cut-chunked-boundary":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            conn.sendall(b"10\r\n" + b"c" * 16 + b"\r\n")  # dies between chunks
        elif path == "/stall":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % CUT_LENGTH)
            conn.sendall(b"s" * 1000)
            self.peer_closed[path] = wait_peer_close(conn, secs(10))
        else:
            conn.sendall(response(200, OK_BODY, [("Connection", "close")]))


@pytest.fixture
def misbehaving(raw_upstream):
    m = Misbehaving()
    up = raw_upstream(m)
    return m, up


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_from_upstream_is_502(kind, misbehaving, errord):
    m, up = misbehaving
    # A short first-byte timeout: waiting for more garbage would show as 504.
    e = errord(up.url, "--first-byte-timeout", flag_ms(2000))
    c = Client(e.port)
    path = "/garbage/" + kind
    r, elapsed = timed(c.get, path)
    assert_json_error(r, 502)
    assert elapsed < secs(1.5), "502 for garbage took %.3fs" % elapsed
    rec = access_for(e, path)
    assert rec["status"] == 502 and attempt_errors(rec) == ["protocol"], rec
    # errord dropped the connection that spoke garbage.
    assert wait_until(lambda: path in m.peer_closed, 3) and m.peer_closed[path] is True
    r = c.get("/ok")
    assert r.status == 200 and r.body == OK_BODY
    c.close()
    follow_up_ok(e)


@pytest.mark.parametrize("path", ["/close-at-once", "/close-mid-head"])
def test_upstream_closing_before_answering_is_502(path, misbehaving, errord):
    m, up = misbehaving
    e = errord(up.url)
    c = Client(e.port)
    r = c.get(path)
    assert_json_error(r, 502)
    rec = access_for(e, path)
    assert rec["status"] == 502 and rec["upstream_status"] is None
    assert rec["attempts"] and set(attempt_errors(rec)) == {"reset"}, rec
    r = c.get("/ok")
    assert r.status == 200 and r.body == OK_BODY
    c.close()
    follow_up_ok(e)


def test_upstream_dying_mid_body_with_content_length_truncates(misbehaving, errord):
    m, up = misbehaving
    e = errord(up.url)
    c = Client(e.port)
    c.request("GET", "/cut-length")
    with pytest.raises(Truncated) as exc:
        c.response()
    # The client was promised CUT_LENGTH bytes and saw the connection end
    # after what the upstream really sent.
    assert "got %d of %d" % (CUT_SENT, CUT_LENGTH) in str(exc.value)
    assert c.closed(1.0)
    c.close()
    rec = access_for(e, "/cut-length")
    assert attempt_errors(rec) == ["reset"], rec
    assert rec["bytes_out"] == CUT_SENT
    follow_up_ok(e)


@pytest.mark.parametrize("path", ["/cut-chunked", "/cut-chunked-boundary"])
def test_upstream_dying_mid_chunked_body_never_ends_the_body(path, misbehaving, errord):
    m, up = misbehaving
    e = errord(up.url)
    c = Client(e.port)
    c.request("GET", path)
    got = read_response_raw(c)
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    assert c.closed(1.0), "errord kept the connection of a broken response open"
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"chunked" in head.lower()
    # No last chunk reached the client: the body is visibly broken.
    assert not body.endswith(b"0\r\n\r\n"), body[-40:]
    with pytest.raises(Truncated):
        read_response(io.BytesIO(got))
    c.close()
    rec = access_for(e, path)
    assert attempt_errors(rec) == ["reset"], rec
    follow_up_ok(e)


def read_response_raw(c, limit=secs(5)):
    """Everything the server sends until it closes (bounded)."""
    out = b""
    deadline = time.monotonic() + limit
    c.sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = c.sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def test_upstream_stalling_mid_body_is_cut_off_by_idle_timeout(misbehaving, errord):
    m, up = misbehaving
    timeout = 0.3 * SLOW
    e = errord(up.url, "--upstream-idle-timeout", flag_ms(300))
    c = Client(e.port)
    c.request("GET", "/stall")
    t0 = time.monotonic()
    with pytest.raises(Truncated) as exc:
        c.response()
    elapsed = time.monotonic() - t0
    print("stalled upstream body cut after %.3fs (timeout %.3fs)" % (elapsed, timeout))
    assert "got 1000 of %d" % CUT_LENGTH in str(exc.value)
    assert timeout - 0.02 <= elapsed < timeout + secs(1.0)
    c.close()
    rec = access_for(e, "/stall")
    assert attempt_errors(rec) == ["timeout"], rec
    assert wait_until(lambda: "/stall" in m.peer_closed, 3) and m.peer_closed["/stall"] is True
    follow_up_ok(e)


def test_upstream_not_taking_the_request_body_is_504_after_idle_timeout(origin, errord):
    # The upstream reads the request head and then nothing more.
    closed_by_errord = []
    answered = threading.Event()

    def script(conn):
        f = conn.makefile("rb")
        first = f.readline(65536)
        while f.readline(65536) not in (b"\r\n", b""):
            pass
        if not first.startswith(b"PUT /stuck "):
            conn.sendall(response(200, OK_BODY, [("Connection", "close")]))
            return
        # Reads nothing until the client has its answer; then drains what
        # errord had sent, to see whether errord let the connection go.
        answered.wait(secs(10))
        closed_by_errord.append(wait_peer_close(conn, secs(3)))

    o = origin(script)
    timeout = 0.5 * SLOW
    e = errord(o.url, "--upstream-idle-timeout", flag_ms(500))
    c = Client(e.port)
    size = 64 * 1024 * 1024
    c.send(b"PUT /stuck HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % size)
    sent = [0]
    stop = threading.Event()

    def send():
        block = b"p" * 65536
        try:
            while sent[0] < size and not stop.is_set():
                c.sock.sendall(block)
                sent[0] += len(block)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    t0 = time.monotonic()
    sender.start()
    c.sock.settimeout(secs(5))
    try:
        r = c.response()
    finally:
        elapsed = time.monotonic() - t0
        stop.set()
        answered.set()
    print("upstream not reading the body -> %s after %.3fs, %.1f MiB sent"
          % (r and r.status, elapsed, sent[0] / 1048576))
    assert sent[0] < size, "the whole body went through; the test proves nothing"
    assert_json_error(r, 504)
    assert timeout - 0.05 <= elapsed < timeout + secs(2.0)
    c.close()
    sender.join(5)
    rec = access_for(e, "/stuck")
    assert attempt_errors(rec) == ["timeout"], rec
    assert wait_until(lambda: closed_by_errord, 3) == [True]
    follow_up_ok(e)


# ---- the client misbehaves --------------------------------------------------------------


@pytest.mark.parametrize("reused", [False, True], ids=["new-connection", "keep-alive-connection"])
def test_client_trickling_its_head_is_cut_off_with_408(reused, upstream, errord):
    up = upstream(ok_handler)
    timeout = 0.5 * SLOW
    e = errord(up.url, "--client-header-timeout", flag_ms(500))
    c = Client(e.port)
    if reused:  # the next request on a kept-alive connection is held to the same limit
        assert c.get("/first").status == 200
    head = b"GET /trickle HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
    t0 = time.monotonic()
    sent = 0
    answered = None
    for i in range(len(head)):  # one byte every 200 ms, until errord answers
        try:
            c.sock.sendall(head[i:i + 1])
        except OSError:
            break
        sent += 1
        readable, _, _ = select.select([c.sock], [], [], 0.2)
        if readable:
            answered = time.monotonic() - t0
            break
    print("trickling client: answered after %s s, %d of %d bytes sent" % (answered, sent, len(head)))
    assert answered is not None, "errord let a client trickle its whole head"
    assert sent < len(head)
    assert timeout - 0.05 <= answered < timeout + secs(1.0)
    c.sock.settimeout(secs(3))
    r = c.response()
    assert_json_error(r, 408)
    assert c.closed(1.0)
    c.close()
    assert [q.target for q in up.requests] == (["/first"] if reused else [])
    follow_up_ok(e)


def test_client_sending_its_head_slowly_within_the_timeout_is_served(upstream, errord):
    up = upstream(ok_handler)
    e = errord(up.url, "--client-header-timeout", flag_ms(500))
    c = Client(e.port)
    head = b"GET /slow-head HTTP/1.1\r\nHost: test\r\nX-Slow: yes\r\n\r\n"
    pieces = [head[i:i + 14] for i in range(0, len(head), 14)]
    assert len(pieces) == 4
    for i, piece in enumerate(pieces):  # 300 ms for the whole head
        if i:
            time.sleep(0.1)
        c.send(piece)
    r = c.response()
    assert r.status == 200 and r.body == OK_BODY
    assert [q.target for q in up.requests] == ["/slow-head"]
    c.close()


def test_client_sending_its_body_slowly_but_steadily_is_served(upstream, errord):
    up = upstream(lambda req: response(200, b"%d" % len(req.body)))
    timeout = 0.3 * SLOW
    e = errord(up.url, "--client-idle-timeout", flag_ms(300))
    c = Client(e.port)
    c.send(b"POST /steady HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(10):  # progress every timeout/3, for 3 timeouts and more
        time.sleep(timeout / 3)
        c.send(b"s" * 100)
    r = c.response()
    assert r.status == 200 and r.body == b"1000", (r.status, r.body)
    assert [len(q.body) for q in up.requests] == [1000]
    c.close()


def test_client_timeouts_do_not_cut_a_slow_response(upstream, errord):
    timeout = 0.3 * SLOW

    def handler(req):
        if req.target == "/slow":
            time.sleep(timeout * 3)
            return response(200, b"slow")
        return ok_handler(req)

    up = upstream(handler)
    e = errord(up.url, "--client-header-timeout", flag_ms(300), "--client-idle-timeout", flag_ms(300))
    c = Client(e.port)
    r = c.get("/slow")  # the client waits quietly, as clients do
    assert r.status == 200 and r.body == b"slow", (r.status, r.body)
    r = c.get("/ok")
    assert r.status == 200 and r.body == OK_BODY
    c.close()


def test_idle_keep_alive_connection_is_closed_after_client_idle_timeout(upstream, errord):
    up = upstream(ok_handler)
    timeout = 0.4 * SLOW
    e = errord(up.url, "--client-idle-timeout", flag_ms(400))
    c = Client(e.port)
    # Gaps shorter than the timeout keep the connection: it is per idle period.
    for i in range(3):
        if i:
            time.sleep(timeout * 0.6)
        r = c.get("/ka/%d" % i)
        assert r.status == 200 and r.body == OK_BODY
    t0 = time.monotonic()
    assert c.closed(3.0), "idle connection not closed"
    elapsed = time.monotonic() - t0
    print("idle keep-alive closed after %.3fs (timeout %.3fs)" % (elapsed, timeout))
    assert timeout - 0.05 <= elapsed < timeout + secs(1.0)
    c.close()
    follow_up_ok(e)


def test_client_stalling_mid_body_is_cut_off(upstream, errord):
    up = upstream(ok_handler)
    timeout = 0.4 * SLOW
    e = errord(up.url, "--client-idle-timeout", flag_ms(400))
    c = Client(e.port)
    c.send(b"POST /stalled-body HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n" + b"b" * 100)
    t0 = time.monotonic()
    c.sock.settimeout(secs(5))
    try:
        r = c.response()
    except ConnectionResetError:
        r = None
    elapsed = time.monotonic() - t0
    print("stalled request body: %s after %.3fs" % (r and r.status, elapsed))
    # Cut off: a 408 or a bare close, never an upstream answer.
    if r is not None:
        assert_json_error(r, 408)
    assert c.closed(1.0)
    assert timeout - 0.05 <= elapsed < timeout + secs(1.0)
    c.close()
    # The upstream never got the whole request body.
    wait_until(lambda: up.requests, 1)
    assert all(len(q.body) < 1000 for q in up.requests), [len(q.body) for q in up.requests]
    follow_up_ok(e)


# ---- limits -----------------------------------------------------------------------------


def test_max_header_size_is_431(upstream, errord):
    up = upstream(ok_handler)
    e = errord(up.url, "--max-request-line", "1KiB", "--max-header-size", "4KiB")
    c = Client(e.port)
    r = c.get("/under", [("X-Big", "a" * 3000)])
    assert r.status == 200
    c.close()
    for headers in ([("X-Big", "a" * 5000)], [("X-Many-%d" % i, "v" * 40) for i in range(120)]):
        c = Client(e.port)
        r = c.get("/over", headers)
        assert_json_error(r, 431)
        assert c.closed(1.0)
        c.close()
    assert [q.target for q in up.requests] == ["/under"]
    follow_up_ok(e)


def test_max_request_line_is_414(upstream, errord):
    up = upstream(ok_handler)
    e = errord(up.url, "--max-request-line", "1KiB")
    c = Client(e.port)
    assert c.get("/" + "a" * 900).status == 200
    c.close()
    c = Client(e.port)
    r = c.get("/" + "a" * 2000)
    assert_json_error(r, 414)
    assert c.closed(1.0)
    c.close()
    assert [q.target for q in up.requests] == ["/" + "a" * 900]
    follow_up_ok(e)


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100-continue"])
def test_max_body_size_with_content_length_is_413_before_the_body(expect, upstream, errord):
    up = upstream(lambda req: response(200, b"%d" % len(req.body)))
    e = errord(up.url, "--max-body-size", "1000")
    c = Client(e.port)
    # Only the head: errord must answer without waiting for the body (and,
    # to a client that asked, without inviting it with 100 Continue).
    c.send(b"POST /too-big HTTP/1.1\r\nHost: test\r\nContent-Length: 5000\r\n%s\r\n"
           % (b"Expect: 100-continue\r\n" if expect else b""))
    c.sock.settimeout(secs(3))
    r = c.response(interim=True)
    assert_json_error(r, 413)
    assert c.closed(1.0)
    c.close()
    assert up.connections == 0 and up.requests == [], "the request reached the upstream"
    c = Client(e.port)
    c.request("POST", "/just-fits", body=b"j" * 1000)
    r = c.response()
    assert r.status == 200 and r.body == b"1000"
    c.close()
    assert [q.target for q in up.requests] == ["/just-fits"]


def test_max_body_size_with_chunked_body_is_413(upstream, errord):
    up = upstream(lambda req: response(200, b"%d" % len(req.body)))
    e = errord(up.url, "--max-body-size", "1000")
    c = Client(e.port)
    c.request("POST", "/chunked-fits", [("Transfer-Encoding", "chunked")],
              b"190\r\n" + b"f" * 400 + b"\r\n190\r\n" + b"g" * 400 + b"\r\n0\r\n\r\n")
    r = c.response()
    assert r.status == 200 and r.body == b"800"
    c.close()

    c = Client(e.port)
    c.send(b"POST /chunked-too-big HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):  # 1536 bytes, no last chunk
        c.send(b"200\r\n" + b"x" * 512 + b"\r\n")
    c.sock.settimeout(secs(3))
    r = c.response()
    assert_json_error(r, 413)
    assert c.closed(1.0)
    c.close()
    time.sleep(0.1)
    assert [q.target for q in up.requests] == ["/chunked-fits"], "an oversized body reached the upstream"
    c = Client(e.port)
    r = c.get("/after")
    assert r.status == 200 and r.body == b"0"
    c.close()


def test_max_connections_refuses_the_extra_connection_with_503(upstream, errord):
    up = upstream(ok_handler)
    e = errord(up.url, "--max-connections", "3")
    held = [Client(e.port) for _ in range(3)]
    for i, c in enumerate(held):
        assert c.get("/held/%d" % i).status == 200
    extra = Client(e.port)
    try:
        extra.request("GET", "/extra")
    except OSError:
        pass  # errord may have closed already; its answer is still to be read
    r = extra.response()
    assert_json_error(r, 503)
    assert extra.closed(1.0)
    extra.close()
    assert not any(q.target == "/extra" for q in up.requests)
    # The three existing connections keep working.
    for i, c in enumerate(held):
        r = c.get("/held/%d/again" % i)
        assert r.status == 200 and r.body == OK_BODY
    # Once one goes away, a new client is served again.
    held.pop().close()

    def served():
        c = Client(e.port)
        try:
            r = c.get("/after")
            return r is not None and r.status == 200
        except OSError:
            return False
        finally:
            c.close()

    assert wait_until(served, 3, interval=0.05)
    for c in held:
        c.close()


# ---- shutdown ---------------------------------------------------------------------------


def connect_refused(port):
    """Whether a new connection to `port` is refused. A connection queued
    just as the listener closes is reset instead: that is not yet a refusal."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=1)
    except ConnectionRefusedError:
        return True
    except (ConnectionResetError, socket.timeout):
        return False
    s.close()
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_requests_and_exits_0(sig, upstream, errord):
    delay = secs(1.0)
    finished = []

    def handler(req):
        if req.target == "/slow":
            time.sleep(delay)
            finished.append(time.monotonic())
            return response(200, b"slow done")
        return ok_handler(req)

    up = upstream(handler)
    e = errord(up.url)
    idle = Client(e.port)
    assert idle.get("/ok").status == 200
    busy = Client(e.port)
    busy.request("GET", "/slow")
    assert wait_until(lambda: any(q.target == "/slow" for q in up.requests), 3)
    t0 = time.monotonic()
    e.send_signal(sig)

    # It stops accepting while the slow request is still in flight.
    assert wait_until(lambda: connect_refused(e.port), delay / SLOW * 0.8, interval=0.02)
    refused_at = time.monotonic()
    # Idle keep-alive connections are closed.
    assert idle.closed(delay / SLOW * 0.8)
    idle.close()
    # The in-flight request completes, and its connection then closes.
    r = busy.response()
    assert r.status == 200 and r.body == b"slow done"
    assert r.header("connection") == "close"
    assert finished and refused_at < finished[0]
    assert busy.closed(1.0)
    busy.close()  # as a client does once told the connection ends
    try:
        e.proc.wait(secs(5))
    except Exception:
        pass
    exited = time.monotonic() - t0
    print("%s: refused new connections after %.3fs, exited after %.3fs"
          % (sig.name, refused_at - t0, exited))
    assert e.proc.returncode is not None, "errord still running after the drain"
    assert e.stop() == 0
    # Well before the default 10 s drain limit: it left when the work was done.
    assert exited < delay + secs(1.0)
    rec = access_for(e, "/slow")
    assert rec["status"] == 200


def test_drain_timeout_bounds_shutdown_when_upstream_never_answers(upstream, errord):
    closed_by_errord = []

    def handler(req):
        if req.target == "/hang":
            return lambda sock: closed_by_errord.append(wait_peer_close(sock, secs(10)))
        return ok_handler(req)

    up = upstream(handler)
    drain = 0.3 * SLOW
    e = errord(up.url, "--drain-timeout", flag_ms(300))
    c = Client(e.port)
    c.request("GET", "/hang")
    assert wait_until(lambda: any(q.target == "/hang" for q in up.requests), 3)
    t0 = time.monotonic()
    e.send_signal(signal.SIGTERM)
    try:
        e.proc.wait(secs(5))
    except Exception:
        pass
    elapsed = time.monotonic() - t0
    print("drain with a hung upstream: exited after %.3fs (drain %.3fs)" % (elapsed, drain))
    assert e.proc.returncode is not None, "errord did not exit after its drain time"
    assert e.stop() == 0
    assert drain - 0.05 <= elapsed < drain + secs(1.5)
    # The client is not handed a fake success.
    c.sock.settimeout(secs(2))
    try:
        r = c.response()
    except (ConnectionResetError, Truncated):
        r = None
    assert r is None or r.status >= 500, (r.status, r.body)
    c.close()
    assert wait_until(lambda: closed_by_errord, 3) == [True]


def test_a_crowd_of_bad_clients_does_not_stop_errord_serving_the_others(upstream, errord):
    """At once: 300 connections opened and left silent, 40 clients sending
    random garbage, 40 vanishing halfway through their head and 40 halfway
    through a 256 KiB response (each with a reset). A well-behaved client
    meanwhile gets every answer; afterwards errord holds none of their
    connections and still serves."""
    big = bytes(range(256)) * 1024
    up = upstream(lambda req: response(200, big if req.target.startswith("/big") else OK_BODY))
    e = errord(up.url, "--max-connections", "2000")
    rng = random.Random(7)

    def reset(s):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    def connect():
        return socket.create_connection(("127.0.0.1", e.port), timeout=10 * SLOW)

    def garbage(i):
        s = connect()
        try:
            s.sendall(bytes(rng.randrange(256) for _ in range(300)))
            deadline = time.monotonic() + 10 * SLOW
            while time.monotonic() < deadline and s.recv(65536):
                pass  # errord answers 400 (or closes) and hangs up
        except OSError:
            pass
        finally:
            s.close()

    def vanish_mid_head(i):
        s = connect()
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: t\r\nX-Half: ")
        time.sleep(0.05)
        reset(s)

    def vanish_mid_response(i):
        s = connect()
        s.sendall(b"GET /big/%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
        got = 0
        while got < 20000:
            data = s.recv(65536)
            if not data:
                break
            got += len(data)
        reset(s)

    silent = [connect() for _ in range(300)]
    bad = [threading.Thread(target=f, args=(i,), daemon=True)
           for f in (garbage, vanish_mid_head, vanish_mid_response) for i in range(40)]
    for t in bad:
        t.start()
    good = Client(e.port, timeout=10)
    for i in range(50):
        r = good.get("/ok?i=%d" % i)
        assert (r.status, r.body) == (200, OK_BODY), i
    for t in bad:
        t.join(30 * SLOW)
        assert not t.is_alive()
    for s in silent:
        s.close()
    good.close()

    def open_clients():
        status, text = e.admin("/metrics")
        assert status == 200
        return int(re.search(r"^errord_client_connections (\d+)$", text, re.M).group(1))

    # the crowd is gone: errord holds none of its connections (the scrape
    # itself is on the admin port, not counted)
    assert wait_until(lambda: open_clients() == 0, timeout=10), open_clients()
    follow_up_ok(e)
