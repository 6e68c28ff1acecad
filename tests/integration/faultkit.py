"""Helpers for the fault, limit and streaming tests: origins whose listening
socket the test controls, large deterministic streams with checksums, and an
RSS sampler for errord.

Like support.py: loopback only, kernel-picked ports, every wait bounded."""

import hashlib
import json
import os
import random
import socket
import struct
import threading
import time

import pytest

from support import SLOW, read_request, wait_until

MIB = 1024 * 1024
GIB = 1024 * MIB
BLOCK = 256 * 1024


def flag_ms(ms):
    """A duration flag for errord, stretched like the harness's waits."""
    return "%dms" % int(ms * SLOW)


def secs(s):
    """A wait in seconds, stretched like the harness's waits."""
    return s * SLOW


# ---- origins ---------------------------------------------------------------------


def http_script(handler):
    """A connection script answering requests like support.Upstream does:
    `handler(req)` returns response bytes, or None to close."""

    def script(conn):
        f = conn.makefile("rb")
        try:
            while True:
                req = read_request(f)
                if req is None:
                    return
                out = handler(req)
                if out is None:
                    return
                conn.sendall(out)
        except (OSError, ValueError, EOFError):
            pass

    return script


class Origin:
    """A loopback origin whose listening socket the test controls.

    With `listen=False` the port is bound but not listening, so connections
    to it are refused (nothing else can take the port meanwhile); `start()`
    then begins listening. Each accepted connection runs `script(conn)` in
    its own thread; the connection is closed when the script returns."""

    def __init__(self, script=None, listen=True, backlog=64):
        self.script = script
        self.connections = 0
        self._lock = threading.Lock()
        self._conns = []
        self._fillers = []
        self._stopping = False
        self._thread = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        if listen:
            self.start(script, backlog)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def listen_only(self, backlog=0):
        """Listens without accepting anything (yet)."""
        self.sock.listen(backlog)

    def fill_backlog(self, tries=4):
        """With `listen_only(0)`: makes connections nobody accepts until one
        no longer completes, so the kernel drops further SYNs. Returns whether
        the accept queue is full."""
        for _ in range(tries):
            s = socket.socket()
            s.settimeout(0.3)
            try:
                s.connect(("127.0.0.1", self.port))
            except (socket.timeout, OSError):
                s.close()
                return True
            self._fillers.append(s)
        return False

    def start(self, script=None, backlog=64):
        """Listens (again, with a new backlog) and accepts connections."""
        if script is not None:
            self.script = script
        self.sock.listen(backlog)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        for s in self._fillers:  # they were only holding the queue
            s.close()
        self._fillers = []

    def _accept(self):
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self.script(conn)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self):
        self._stopping = True
        for s in self._fillers:
            s.close()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            for s in self._conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        if self._thread is not None:
            self._thread.join(5)


@pytest.fixture
def origin():
    """A fixture (import it into a test module): origin(script=None,
    listen=True, backlog=64) -> a running Origin, closed after the test."""
    made = []

    def make(*args, **kw):
        o = Origin(*args, **kw)
        made.append(o)
        return o

    yield make
    for o in made:
        o.close()


def wait_peer_close(conn, timeout):
    """Reads and discards until the peer closes or `timeout` passes; returns
    whether the peer closed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if conn.recv(65536) == b"":
                return True
        except socket.timeout:
            return False
        except OSError:
            return True
    return False


# ---- big streams -----------------------------------------------------------------


class Pattern:
    """`total` bytes of a cheap deterministic pattern: a fixed pseudo-random
    block with its index stamped into its first 8 bytes, so reordered,
    repeated or dropped blocks change the checksum."""

    def __init__(self, total, block=BLOCK, seed=1):
        self.total = total
        self.block = block
        self.buf = bytearray(random.Random(seed).randbytes(block))

    def blocks(self):
        """Yields memoryviews into one reused buffer: use each before the next."""
        done = 0
        i = 0
        view = memoryview(self.buf)
        while done < self.total:
            n = min(self.block, self.total - done)
            struct.pack_into(">Q", self.buf, 0, i)
            yield view[:n]
            done += n
            i += 1


class Meter:
    """What one end of a stream did: bytes and the sha256 of them."""

    def __init__(self):
        self.bytes = 0
        self.sha = hashlib.sha256()
        self.error = None
        self.done = threading.Event()
        self.result = None  # anything the end wants to report

    def add(self, data):
        self.sha.update(data)
        self.bytes += len(data)

    def hexdigest(self):
        return self.sha.hexdigest()


def send_pattern(sock, pattern, meter, chunked=False, pace=None):
    """Sends the pattern (chunk-encoded when `chunked`) and measures it.
    `pace(meter)` is called before each block; it may sleep or raise to stop."""
    for blk in pattern.blocks():
        if pace is not None:
            pace(meter)
        if chunked:
            sock.sendall(b"%x\r\n" % len(blk))
            sock.sendall(blk)
            sock.sendall(b"\r\n")
        else:
            sock.sendall(blk)
        meter.add(blk)
    if chunked:
        sock.sendall(b"0\r\n\r\n")


class Incomplete(Exception):
    """A stream ended before its framing said it would."""


def read_body_length(f, n, meter, pace=None, bufsize=BLOCK):
    """Reads exactly `n` body bytes from binary file `f` into `meter`."""
    buf = bytearray(bufsize)
    view = memoryview(buf)
    left = n
    while left > 0:
        if pace is not None:
            pace(meter)
        got = f.readinto(view[:min(bufsize, left)])
        if not got:
            raise Incomplete("got %d of %d bytes" % (n - left, n))
        meter.add(view[:got])
        left -= got


def read_body_chunked(f, meter, pace=None):
    """Reads a chunked body from binary file `f` into `meter`, streaming.
    Returns the number of chunks."""
    chunks = 0
    while True:
        if pace is not None:
            pace(meter)
        line = f.readline(1024)
        if not line.endswith(b"\n"):
            raise Incomplete("connection closed in a chunk size line after %d bytes" % meter.bytes)
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            while True:
                trailer = f.readline(65536)
                if trailer in (b"\r\n", b"\n"):
                    return chunks
                if not trailer:
                    raise Incomplete("connection closed in the trailer section")
        left = size
        while left > 0:
            data = f.read(min(left, BLOCK))
            if not data:
                raise Incomplete("connection closed inside a chunk after %d bytes" % meter.bytes)
            meter.add(data)
            left -= len(data)
        if f.read(2) not in (b"\r\n",):
            raise Incomplete("chunk not followed by CRLF")
        chunks += 1


def read_head(f):
    """Reads a head from binary file `f`: (start line, {lower-case name: value})."""
    lines = []
    while True:
        line = f.readline(65536)
        if not line:
            raise Incomplete("connection closed in the head")
        if line in (b"\r\n", b"\n"):
            if lines:
                break
            continue
        lines.append(line.rstrip(b"\r\n").decode("latin-1"))
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return lines[0], fields


def upload_receiver(meter, pace=None):
    """A connection script: reads one request with a big body (either
    framing) into `meter`, then answers 200 with the count and sha256 as
    JSON. Stops early if `pace` raises."""

    def script(conn):
        f = conn.makefile("rb")
        try:
            start, fields = read_head(f)
            meter.result = (start, fields)
            if "chunked" in fields.get("transfer-encoding", "").lower():
                read_body_chunked(f, meter, pace)
            else:
                read_body_length(f, int(fields["content-length"]), meter, pace)
            body = json.dumps({"bytes": meter.bytes, "sha256": meter.hexdigest()}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except (OSError, ValueError, Incomplete) as e:
            meter.error = e
        finally:
            meter.done.set()
            f.close()

    return script


def download_sender(meter, total, chunked=False, pace=None):
    """A connection script: reads one request, then answers 200 with `total`
    pattern bytes in the framing asked for, measuring what it sent."""

    def script(conn):
        f = conn.makefile("rb")
        try:
            read_head(f)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Content-Length: %d\r\n\r\n" % total
            conn.sendall(head)
            send_pattern(conn, Pattern(total), meter, chunked=chunked, pace=pace)
        except (OSError, Incomplete, Stop) as e:
            meter.error = e
        finally:
            meter.done.set()
            f.close()

    return script


class Stop(Exception):
    """Raised by a pace function to end a stream early."""


# ---- errord's memory ----------------------------------------------------------------


def rss_env():
    """Environment for an errord whose RSS is measured. Under a sanitizer
    build, AddressSanitizer's quarantine keeps freed memory (up to 256 MiB)
    resident, which would read as growth; a small quarantine measures
    errord's own use. Valgrind's memcheck does the same with its queue of
    freed blocks (20 MB by default)."""
    if SLOW == 1.0:
        return None
    opts = os.environ.get("ASAN_OPTIONS", "")
    vg = os.environ.get("VALGRIND_OPTS", "")
    return {"ASAN_OPTIONS": (opts + ":" if opts else "") + "quarantine_size_mb=4",
            "VALGRIND_OPTS": (vg + " " if vg else "") + "--freelist-vol=4000000"}


class RssSampler:
    """Samples errord's RSS (KiB) in a thread until stopped."""

    def __init__(self, errord, interval=0.01):
        self.errord = errord
        self.interval = interval
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self.errord.rss_kib())
            except OSError:
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        return False

    @property
    def peak(self):
        return max(self.samples) if self.samples else 0


def settle_rss(errord, timeout=2.0):
    """errord's RSS once it stops changing (bounded)."""
    last = [errord.rss_kib()]

    def steady():
        time.sleep(0.05)
        now = errord.rss_kib()
        same = abs(now - last[0]) < 64
        last[0] = now
        return same

    wait_until(steady, timeout)
    return last[0]
