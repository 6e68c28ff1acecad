"""Bodies stream through errord with backpressure, and it holds up under many
clients at once.

Each big transfer is checked with a sha256 computed on both ends, while
errord's RSS is sampled: it must stay flat (peak minus the RSS before the
transfer under RSS_BUDGET_KIB). Run with `pytest -s` to see the figures."""

import hashlib
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from faultkit import origin  # noqa: F401 (a fixture)
from faultkit import (GIB, MIB, Incomplete, Meter, Pattern, RssSampler,
                      download_sender, flag_ms, read_body_chunked, read_body_length, read_head,
                      rss_env, secs, send_pattern, settle_rss, upload_receiver)
from support import Client, response, wait_until

# Every big transfer moves a full GiB; the environment can shrink them for a
# quick run (the RSS and checksum assertions stay the same).
BIG = int(os.environ.get("ERRORD_TEST_BIG_BYTES", GIB))
CHUNKED_BIG = int(os.environ.get("ERRORD_TEST_CHUNKED_BYTES", GIB))
RSS_BUDGET_KIB = 32 * 1024
# How long the slow readers dawdle, and how slowly (bytes a second).
SLOW_PHASE_S = 3.0
SLOW_RATE = 4 * MIB
# Bytes allowed between what one end wrote and the other read while a side
# is slow: socket buffers (loopback autotuning goes up to 32 MiB a socket
# here) plus errord's own high-water mark. Far below the 1 GiB on offer.
IN_FLIGHT_LIMIT = 64 * MIB


def connect(port, rcvbuf=None, sndbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    s.settimeout(secs(20))
    s.connect(("127.0.0.1", port))
    return s


def report(what, size, seconds, before, peak, after):
    print("\n%s: %d MiB in %.2fs = %.0f MB/s; errord RSS before %.1f MiB, peak %.1f MiB "
          "(+%.1f), after %.1f MiB"
          % (what, size // MIB, seconds, size / seconds / 1e6, before / 1024, peak / 1024,
             (peak - before) / 1024, after / 1024))


def pace_for(until, rate, block):
    """A pace function: reading `block` bytes at `rate` bytes/s until `until`."""
    def pace(meter):
        if time.monotonic() < until[0]:
            time.sleep(block / rate)
    return pace


# ---- big downloads and uploads ---------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_big_download_streams_with_flat_rss(framing, origin, errord):
    chunked = framing == "chunked"
    size = CHUNKED_BIG if chunked else BIG
    sent = Meter()
    o = origin(download_sender(sent, size, chunked=chunked))
    e = errord(o.url, env=rss_env())
    before = settle_rss(e)
    got = Meter()
    s = connect(e.port)
    f = s.makefile("rb", buffering=256 * 1024)
    with RssSampler(e) as rss:
        t0 = time.monotonic()
        s.sendall(b"GET /download HTTP/1.1\r\nHost: test\r\n\r\n")
        start, fields = read_head(f)
        assert start.startswith("HTTP/1.1 200 "), start
        if chunked:
            assert fields.get("transfer-encoding", "").lower() == "chunked", fields
            assert "content-length" not in fields
            read_body_chunked(f, got)
        else:
            assert fields.get("content-length") == str(size), fields
            read_body_length(f, size, got)
        seconds = time.monotonic() - t0
    assert sent.done.wait(secs(10)) and sent.error is None, sent.error
    f.close()
    s.close()
    after = settle_rss(e)
    report("download (%s)" % framing, size, seconds, before, rss.peak, after)
    assert sent.bytes == size and got.bytes == size, (sent.bytes, got.bytes)
    assert got.hexdigest() == sent.hexdigest(), "the bytes changed on the way"
    assert rss.peak - before < RSS_BUDGET_KIB, "errord's RSS grew by %d KiB" % (rss.peak - before)
    rec = e.wait_access(1)[0]
    assert rec["status"] == 200 and rec["bytes_out"] == size, rec


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_big_upload_streams_with_flat_rss(framing, origin, errord):
    chunked = framing == "chunked"
    size = CHUNKED_BIG if chunked else BIG
    received = Meter()
    o = origin(upload_receiver(received))
    e = errord(o.url, env=rss_env())
    before = settle_rss(e)
    sent = Meter()
    s = connect(e.port)
    f = s.makefile("rb")
    with RssSampler(e) as rss:
        t0 = time.monotonic()
        framing_field = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: test\r\n%s\r\n\r\n" % framing_field)
        send_pattern(s, Pattern(size, seed=2), sent, chunked=chunked)
        start, fields = read_head(f)
        body = f.read(int(fields["content-length"]))
        seconds = time.monotonic() - t0
    assert received.done.wait(secs(10)) and received.error is None, received.error
    f.close()
    s.close()
    after = settle_rss(e)
    report("upload (%s)" % framing, size, seconds, before, rss.peak, after)
    assert start.startswith("HTTP/1.1 200 "), start
    answer = json.loads(body)
    assert answer == {"bytes": size, "sha256": sent.hexdigest()}, "the bytes changed on the way"
    assert received.hexdigest() == sent.hexdigest() and received.bytes == sent.bytes == size
    # The upstream got the framing errord was asked for.
    up_fields = received.result[1]
    if chunked:
        assert up_fields.get("transfer-encoding", "").lower() == "chunked", up_fields
    else:
        assert up_fields.get("content-length") == str(size), up_fields
    assert rss.peak - before < RSS_BUDGET_KIB, "errord's RSS grew by %d KiB" % (rss.peak - before)
    rec = e.wait_access(1)[0]
    assert rec["status"] == 200 and rec["bytes_in"] == size, rec


# ---- backpressure ----------------------------------------------------------------------


def test_slow_client_reader_holds_back_the_upstream(origin, errord):
    """The client reads a 1 GiB download slowly for a while: errord must
    stop reading the upstream rather than buffer, then resume intact."""
    sent = Meter()
    o = origin(download_sender(sent, BIG))
    e = errord(o.url, env=rss_env())
    before = settle_rss(e)
    got = Meter()
    s = connect(e.port, rcvbuf=256 * 1024)
    f = s.makefile("rb", buffering=64 * 1024)
    until = [0.0]
    with RssSampler(e) as rss:
        s.sendall(b"GET /download HTTP/1.1\r\nHost: test\r\n\r\n")
        start, fields = read_head(f)
        assert start.startswith("HTTP/1.1 200 ") and fields["content-length"] == str(BIG)
        until[0] = time.monotonic() + SLOW_PHASE_S
        reader_done = threading.Event()
        errors = []

        def read():
            try:
                read_body_length(f, BIG, got, pace=pace_for(until, SLOW_RATE, 64 * 1024),
                                 bufsize=64 * 1024)
            except Exception as exc:  # reported by the main thread
                errors.append(exc)
            finally:
                reader_done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(max(0.0, until[0] - time.monotonic() - 0.2))
        slow_up, slow_client = sent.bytes, got.bytes
        slow_peak = rss.peak
        assert reader_done.wait(secs(60)), "the download did not finish"
    reader.join(5)
    assert not errors, errors
    assert sent.done.wait(secs(10)) and sent.error is None, sent.error
    f.close()
    s.close()
    after = settle_rss(e)
    print("\nslow client reader: after %.1fs the upstream had sent %.1f MiB, the client read "
          "%.1f MiB; errord RSS before %.1f MiB, peak while slow %.1f MiB, peak %.1f MiB, after %.1f MiB"
          % (SLOW_PHASE_S, slow_up / MIB, slow_client / MIB, before / 1024, slow_peak / 1024,
             rss.peak / 1024, after / 1024))
    assert slow_up - slow_client < IN_FLIGHT_LIMIT, "errord kept reading a stream nobody took"
    assert slow_peak - before < RSS_BUDGET_KIB
    assert rss.peak - before < RSS_BUDGET_KIB
    assert got.bytes == sent.bytes == BIG and got.hexdigest() == sent.hexdigest()


def test_slow_upstream_reader_holds_back_the_client(origin, errord):
    """The upstream reads a 1 GiB upload slowly for a while: errord must
    stop reading the client rather than buffer, then resume intact."""
    until = [time.monotonic() + 3600]  # set when the upload starts
    received = Meter()
    o = origin(upload_receiver(received, pace=pace_for(until, SLOW_RATE, 256 * 1024)))
    e = errord(o.url, env=rss_env())
    before = settle_rss(e)
    sent = Meter()
    s = connect(e.port, sndbuf=256 * 1024)
    f = s.makefile("rb")
    errors = []
    sender_done = threading.Event()

    def send():
        try:
            s.sendall(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % BIG)
            send_pattern(s, Pattern(BIG, seed=3), sent)
        except Exception as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            sender_done.set()

    with RssSampler(e) as rss:
        until[0] = time.monotonic() + SLOW_PHASE_S
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(max(0.0, until[0] - time.monotonic() - 0.2))
        slow_client, slow_up = sent.bytes, received.bytes
        slow_peak = rss.peak
        assert sender_done.wait(secs(60)), "the upload did not finish"
        start, fields = read_head(f)
        body = f.read(int(fields["content-length"]))
    sender.join(5)
    assert not errors, errors
    assert received.done.wait(secs(10)) and received.error is None, received.error
    f.close()
    s.close()
    after = settle_rss(e)
    print("\nslow upstream reader: after %.1fs the client had sent %.1f MiB, the upstream read "
          "%.1f MiB; errord RSS before %.1f MiB, peak while slow %.1f MiB, peak %.1f MiB, after %.1f MiB"
          % (SLOW_PHASE_S, slow_client / MIB, slow_up / MIB, before / 1024, slow_peak / 1024,
             rss.peak / 1024, after / 1024))
    assert slow_client - slow_up < IN_FLIGHT_LIMIT, "errord kept reading a body nobody took"
    assert slow_peak - before < RSS_BUDGET_KIB
    assert rss.peak - before < RSS_BUDGET_KIB
    assert start.startswith("HTTP/1.1 200 "), start
    assert json.loads(body) == {"bytes": BIG, "sha256": sent.hexdigest()}


def test_slow_client_is_not_blamed_on_the_upstream(origin, errord):
    """While errord holds the upstream back because the client is not
    reading, the upstream is not idle: --upstream-idle-timeout must not cut
    the download."""
    size = 64 * MIB
    sent = Meter()
    o = origin(download_sender(sent, size))
    e = errord(o.url, "--upstream-idle-timeout", flag_ms(500), env=rss_env())
    s = connect(e.port, rcvbuf=256 * 1024)
    f = s.makefile("rb")
    s.sendall(b"GET /download HTTP/1.1\r\nHost: test\r\n\r\n")
    start, fields = read_head(f)
    assert start.startswith("HTTP/1.1 200 ")
    pause = secs(1.5)
    time.sleep(pause)  # the client reads nothing for three idle timeouts
    held_back = sent.bytes
    got = Meter()
    try:
        read_body_length(f, size, got)
        outcome = None
    except Incomplete as exc:
        outcome = exc
    f.close()
    s.close()
    print("\nclient paused %.1fs: upstream held at %.1f MiB of %d; then %s"
          % (pause, held_back / MIB, size // MIB, outcome or "the whole body arrived"))
    assert held_back < size, "the pause did not hold the upstream back; the test proves nothing"
    assert outcome is None, "errord cut the download: %s (%r)" % (outcome, e.access())
    assert got.bytes == size and got.hexdigest() == sent.hexdigest()
    rec = e.wait_access(1)[0]
    assert rec["status"] == 200 and "error" not in rec, rec


def test_slow_upstream_reader_is_not_blamed_on_the_client(origin, errord):
    """While errord stops reading the client's body because the upstream is
    not taking it, the client is not idle: --client-idle-timeout must not
    cut the upload."""
    size = 64 * MIB
    stall = secs(1.5)
    stalled = []

    def pace(meter):
        if not stalled:  # the upstream reads the head, then nothing for a while
            time.sleep(stall)
            stalled.append(sent.bytes)

    received = Meter()
    o = origin(upload_receiver(received, pace=pace))
    e = errord(o.url, "--client-idle-timeout", flag_ms(500), env=rss_env())
    sent = Meter()
    s = connect(e.port, sndbuf=256 * 1024)
    f = s.makefile("rb")
    errors = []

    def send():
        try:
            s.sendall(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % size)
            send_pattern(s, Pattern(size, seed=4), sent)
        except OSError as exc:
            errors.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        start, fields = read_head(f)
        body = f.read(int(fields.get("content-length", "0")))
    except Incomplete as exc:
        start, body = "closed: %s" % exc, b""
    sender.join(secs(20))
    f.close()
    s.close()
    wait_until(lambda: stalled, stall + secs(2))
    print("\nupstream paused %.1fs: client held at %s MiB of %d; answer %r %r"
          % (stall, stalled and "%.1f" % (stalled[0] / MIB), size // MIB, start, body[:120]))
    assert start.startswith("HTTP/1.1 200 "), "errord cut the upload: %s %r" % (start, body[:200])
    assert stalled and stalled[0] < size, "the pause did not hold the client back; the test proves nothing"
    assert not errors, errors
    assert json.loads(body) == {"bytes": size, "sha256": sent.hexdigest()}


def test_client_leaving_mid_download_releases_the_upstream(origin, errord):
    """A client that goes away mid-download: errord stops the upstream
    transfer (closes that connection) and keeps serving."""
    sent = Meter()
    o = origin(download_sender(sent, BIG))
    e = errord(o.url, env=rss_env())
    s = connect(e.port, rcvbuf=256 * 1024)
    f = s.makefile("rb")
    s.sendall(b"GET /download HTTP/1.1\r\nHost: test\r\n\r\n")
    read_head(f)
    got = Meter()
    read_body_length(f, 4 * MIB, got)
    f.close()
    s.close()
    assert sent.done.wait(secs(10)), "errord kept pulling the download for a client that left"
    assert sent.error is not None and sent.bytes < BIG
    rec = e.wait_access(1)[0]
    assert rec["bytes_out"] < BIG


# ---- many clients ------------------------------------------------------------------------


def test_many_concurrent_clients_share_few_upstream_connections(upstream, errord):
    clients, per_client = 50, 20

    def handler(req):
        body = b"%s %s %s" % (req.method.encode(), req.target.encode(),
                              hashlib.sha256(req.body).hexdigest().encode())
        return response(200, body)

    up = upstream(handler)
    e = errord(up.url)
    start = threading.Barrier(clients, timeout=secs(10))

    def client(i):
        c = Client(e.port, timeout=20)
        try:
            start.wait()
            for j in range(per_client):
                path = "/c%d/r%d" % (i, j)
                if j % 2:
                    body = (b"%d-%d;" % (i, j)) * (j * 50 + 1)
                    c.request("POST", path, body=body)
                else:
                    body = b""
                    c.request("GET", path)
                r = c.response()
                want = b"%s %s %s" % (b"POST" if j % 2 else b"GET", path.encode(),
                                      hashlib.sha256(body).hexdigest().encode())
                assert r.status == 200 and r.body == want, (path, r.status, r.body)
            return per_client
        finally:
            c.close()

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        done = [fut.result(timeout=secs(60)) for fut in futures]
    seconds = time.monotonic() - t0
    total = clients * per_client
    print("\n%d clients x %d requests: %.2fs (%.0f req/s), %d upstream connections"
          % (clients, per_client, seconds, total / seconds, up.connections))
    assert sum(done) == total
    assert len(up.requests) == total
    # Pooled and reused: at most one upstream connection per concurrent client.
    assert up.connections <= clients, up.connections
    recs = e.wait_access(total, timeout=10)
    assert len(recs) == total and all(r["status"] == 200 for r in recs)
