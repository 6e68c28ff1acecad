"""Test support: the real errord binary, scriptable upstreams and raw HTTP.

Everything binds to 127.0.0.1 on a port the kernel picks, every wait is
bounded, and every process or thread started here is stopped by its fixture.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ERRORD = os.environ.get("ERRORD_BIN") or os.path.join(ROOT, "build", "errord")
# Sanitizer builds and valgrind are slower; waits scale with this.
SLOW = 10.0 if "valgrind" in ERRORD else 3.0 if "asan" in ERRORD else 1.0
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer",
                   "Invalid read", "Invalid write", "uninitialised", "definitely lost")


def stop_process(proc, timeout):
    """Terminates a helper server (Alertmanager, Prometheus...), killing it
    when it has not exited within `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(pred, timeout=5.0, interval=0.01):
    """Polls `pred` until it is true; returns its last value."""
    deadline = time.monotonic() + timeout * SLOW
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def run_script(cmd, timeout):
    """Runs one of the scripts that end with a machine-readable line
    ("RESULT key=value ..."); returns (exit status, its fields, with numbers
    as ints, or None when there was no such line, all its output)."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    output = p.stdout + p.stderr
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert len(lines) <= 1, output
    result = None
    if lines:
        result = {}
        for field in lines[0].split()[1:]:
            key, sep, value = field.partition("=")
            assert sep and key not in result, "bad RESULT line: %r" % lines[0]
            try:
                result[key] = int(value)
            except ValueError:
                result[key] = value
    return p.returncode, result, output


# ---- errord ------------------------------------------------------------------


class Errord:
    """errord running on a free loopback port; its JSON log lines are parsed
    as they arrive."""

    def __init__(self, upstream, *args, env=None, listen="127.0.0.1:0", check_start=True):
        # Without --policy the proxy alone is under test: no policy runs.
        if not any(a == "--policy" or a.startswith("--policy=") for a in args) and \
                "ERRORD_POLICY" not in (env or {}):
            args = ("--policy", "off", *args)
        # The admin port on a free port, unless the test chooses.
        if not any(a == "--admin" or a.startswith("--admin=") for a in args) and \
                "ERRORD_ADMIN" not in (env or {}):
            args = ("--admin", "127.0.0.1:0", *args)
        self.cmd = [ERRORD, "--listen", listen, "--upstream", upstream, *args]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ERRORD_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=full_env)
        self.lines = []       # every stdout line, as text
        self.records = []     # the lines that parsed as JSON objects
        self.stderr = []
        self._lock = threading.Lock()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.port = None
        self.returncode = None
        if check_start:
            started = wait_until(lambda: self.find(msg="errord started") or self.proc.poll() is not None,
                                 timeout=10)
            rec = self.find(msg="errord started")
            if not rec:
                self.stop(check=False)
                raise RuntimeError("errord did not start: %s\n%s" % (started, "".join(self.stderr)))
            self.port = int(rec["listen"].rsplit(":", 1)[1])
            self.admin_port = int(rec["admin"].rsplit(":", 1)[1]) if rec.get("admin", "off") != "off" else None

    def _read(self, pipe, is_stdout):
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace")
            with self._lock:
                if is_stdout:
                    self.lines.append(line)
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict):
                        self.records.append(rec)
                else:
                    self.stderr.append(line)
        pipe.close()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def admin(self, path, method="GET", body=None, headers=None):
        """(status, parsed JSON or text) of an admin-port request."""
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10 * SLOW)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            data = r.read()
            try:
                return r.status, json.loads(data)
            except ValueError:
                return r.status, data.decode("utf-8", "replace")
        finally:
            c.close()

    def find(self, **match):
        """The first log record whose fields equal `match`, or None."""
        with self._lock:
            for rec in self.records:
                if all(rec.get(k) == v for k, v in match.items()):
                    return rec
        return None

    def all(self, **match):
        with self._lock:
            return [r for r in self.records if all(r.get(k) == v for k, v in match.items())]

    def access(self):
        return self.all(type="access")

    def wait_access(self, count, timeout=5.0):
        """Waits until `count` access records exist; returns them."""
        wait_until(lambda: len(self.access()) >= count, timeout)
        recs = self.access()
        assert len(recs) >= count, "expected %d access records, got %r" % (count, recs)
        return recs

    def rss_kib(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=20.0, check=True):
        """Stops errord and returns its exit status. With `check`, a non-zero
        status or a sanitizer report fails the test."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout * SLOW)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                if check:
                    raise AssertionError("errord did not stop within %.0fs" % timeout)
        for t in self._readers:
            t.join(5)
        self.returncode = self.proc.returncode
        if check:
            err = "".join(self.stderr)
            assert not any(m in err for m in SANITIZER_MARKS), err
            assert self.returncode == 0, "errord exited %s\n%s" % (self.returncode, err)
        return self.returncode


# ---- upstreams -----------------------------------------------------------------


class Request:
    """A request as an upstream received it."""

    def __init__(self, method, target, version, headers, body, raw_head):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers    # [(name, value)] in order, names as sent
        self.body = body          # de-chunked
        self.raw_head = raw_head  # bytes, up to and including the empty line

    def header(self, name):
        """The values of header `name` (case-insensitive), joined with ", "."""
        vals = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(vals) if vals else None

    def has(self, name):
        return any(k.lower() == name.lower() for k, _ in self.headers)


def read_head(f):
    """Reads a head (start line + fields) from a binary file; None at EOF."""
    lines = []
    raw = b""
    while True:
        line = f.readline(65536)
        if not line:
            return None
        raw += line
        if line in (b"\r\n", b"\n"):
            if not lines:
                continue
            return lines, raw
        lines.append(line.rstrip(b"\r\n").decode("latin-1"))


def parse_fields(lines):
    out = []
    for line in lines:
        name, _, value = line.partition(":")
        out.append((name, value.strip()))
    return out


def read_chunked(f):
    body = b""
    while True:
        size_line = f.readline()
        if not size_line:
            raise EOFError("connection closed inside a chunked body")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while f.readline() not in (b"\r\n", b"\n", b""):
                pass
            return body
        body += f.read(size)
        f.read(2)


def read_request(f):
    got = read_head(f)
    if got is None:
        return None
    lines, raw = got
    method, target, version = lines[0].split(" ", 2)
    headers = parse_fields(lines[1:])
    req = Request(method, target, version, headers, b"", raw)
    te = req.header("transfer-encoding")
    if te and "chunked" in te.lower():
        req.body = read_chunked(f)
    elif req.header("content-length"):
        req.body = f.read(int(req.header("content-length")))
    return req


def response(status=200, body=b"", headers=None, reason=None, chunked=False, length=True):
    """Raw bytes of a response. `headers` is a list of (name, value)."""
    if isinstance(body, str):
        body = body.encode()
    reason = reason if reason is not None else {200: "OK", 204: "No Content", 404: "Not Found",
                                                  500: "Internal Server Error"}.get(status, "Status")
    out = "HTTP/1.1 %d %s\r\n" % (status, reason)
    for k, v in headers or []:
        out += "%s: %s\r\n" % (k, v)
    if chunked:
        out += "Transfer-Encoding: chunked\r\n\r\n"
        data = out.encode()
        if body:
            data += b"%x\r\n%s\r\n" % (len(body), body)
        return data + b"0\r\n\r\n"
    if length and status not in (204, 304) and status >= 200:
        out += "Content-Length: %d\r\n" % len(body)
    return (out + "\r\n").encode() + body


class Upstream:
    """A scriptable origin on 127.0.0.1, one thread per connection.

    `handler(req)` returns the raw response bytes to send, or a function
    `fn(sock)` that takes over the connection (to stall, send garbage, close
    mid-body...). Returning None closes the connection. Every request is kept
    in `requests`, every accepted connection counted in `connections`."""

    def __init__(self, handler=None):
        self.handler = handler or (lambda req: response(200, b"ok"))
        self.requests = []
        self.connections = 0
        self.raw_received = []   # (connection number, bytes) for raw-mode tests
        self._lock = threading.Lock()
        self._socks = []
        self._stopping = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def _accept(self):
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._socks.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        f = conn.makefile("rb")
        try:
            while not self._stopping:
                req = read_request(f)
                if req is None:
                    return
                with self._lock:
                    self.requests.append(req)
                out = self.handler(req)
                if out is None:
                    return
                if callable(out):
                    out(conn)
                    return
                conn.sendall(out)
        except (OSError, ValueError, EOFError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self):
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        self._thread.join(5)


class RawUpstream(Upstream):
    """An origin that answers every connection with `script(conn, data)`,
    where `data` is what arrived before the first blank line. For upstreams
    that must misbehave at the byte level."""

    def __init__(self, script):
        self.script = script
        super().__init__()

    def _serve(self, conn):
        try:
            data = b""
            conn.settimeout(10)
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            with self._lock:
                self.raw_received.append(data)
            self.script(conn, data)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass


def closed_port():
    """A loopback port with nothing listening on it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- clients -------------------------------------------------------------------


class Response:
    def __init__(self, version, status, reason, headers, body, raw):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.raw = raw

    def header(self, name):
        vals = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(vals) if vals else None

    def has(self, name):
        return any(k.lower() == name.lower() for k, _ in self.headers)

    def json(self):
        return json.loads(self.body)


class Truncated(Exception):
    """The connection ended before the response's framing was complete."""


def read_response(f, method="GET", interim=False):
    """Reads one response from a binary file object. Interim (1xx) responses
    are skipped unless `interim`. Raises Truncated when the body is cut short."""
    while True:
        got = read_head(f)
        if got is None:
            return None
        lines, raw = got
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        status = int(code)
        headers = parse_fields(lines[1:])
        if status < 200 and not interim:
            continue
        break
    resp = Response(version, status, reason, headers, b"", raw)
    if method == "HEAD" or status < 200 or status in (204, 304):
        return resp
    te = resp.header("transfer-encoding")
    if te and "chunked" in te.lower():
        try:
            resp.body = read_chunked(f)
        except (EOFError, ValueError) as e:
            raise Truncated(str(e))
    elif resp.header("content-length") is not None:
        n = int(resp.header("content-length"))
        resp.body = f.read(n)
        if len(resp.body) < n:
            raise Truncated("got %d of %d bytes" % (len(resp.body), n))
    else:
        resp.body = f.read()
    return resp


class Client:
    """One raw TCP connection to errord."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout * SLOW)
        self.f = self.sock.makefile("rb")

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def request(self, method="GET", path="/", headers=None, body=None, version="HTTP/1.1"):
        head = "%s %s %s\r\n" % (method, path, version)
        hdrs = list(headers or [])
        if not any(k.lower() == "host" for k, _ in hdrs) and version == "HTTP/1.1":
            hdrs.insert(0, ("Host", "test"))
        if body is not None and not any(k.lower() in ("content-length", "transfer-encoding")
                                        for k, _ in hdrs):
            hdrs.append(("Content-Length", str(len(body))))
        for k, v in hdrs:
            head += "%s: %s\r\n" % (k, v)
        data = (head + "\r\n").encode() + (body.encode() if isinstance(body, str) else body or b"")
        self.send(data)

    def response(self, method="GET", interim=False):
        return read_response(self.f, method, interim)

    def get(self, path="/", headers=None):
        self.request("GET", path, headers)
        return self.response()

    def read_all(self):
        """Everything until the server closes (bounded by the socket timeout)."""
        out = b""
        while True:
            try:
                chunk = self.f.read1(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out

    def closed(self, timeout=3.0):
        """Whether the server closes the connection within `timeout`."""
        self.sock.settimeout(timeout * SLOW)
        try:
            return self.f.read1(1) == b""
        except (socket.timeout, OSError):
            return False

    def shutdown_write(self):
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self):
        """Leaves for good: the close sends a TCP reset, not a half-close."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self):
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


def exchange(port, data, timeout=5.0):
    """Sends raw bytes on a new connection and returns everything the server
    sends back until it closes (or `timeout`)."""
    c = Client(port, timeout)
    try:
        c.send(data)
        return c.read_all()
    finally:
        c.close()
