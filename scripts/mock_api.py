#!/usr/bin/env python3
"""Mock of the upstream API that errord is tested against.

It behaves like the API in shared/reference/upstream-api-errors.md: errors are
JSON bodies {"message": "..."}, request limits are signalled with 403 (plus
Retry-After), 500/504 mean "try again later", 502 "down or being upgraded",
204 "no new data". Python standard library only.

Usage: python3 scripts/mock_api.py [--host 127.0.0.1] [--port 8081] [--quiet]
Prints "mock_api listening on http://HOST:PORT" once ready (port 0 picks a free
port), logs one line per request on stderr, exits 0 on SIGTERM/SIGINT.

Endpoints (HEAD works wherever GET does; request bodies may use Content-Length
or chunked; POST/PUT/PATCH successes report the body's length and sha256):
  GET  /v1/items               200, a list of five items
  GET  /v1/items/<id>          200 for ids 1..5, else 404 "Item not found"
  POST /v1/items               201 for JSON with a "name"; 422 bad JSON, 400 no name
  GET  /v1/updates             204, no new data
  GET  /v1/secure              401 unless "Authorization: Bearer test-token"
  *    /v1/forbidden           403, a permanent refusal
  *    /v1/limited[/...]       fixed window per path (?limit=5&window_ms=1000);
                               over the limit: 403 "Request limit exceeded..."
  *    /status/<code>          that status, reference wording (?retry_after=V adds
                               Retry-After); a 1xx is sent as interim before a 200
  *    /flaky?p=0.3            500/502/504 with probability p, else 200
                               (&code=502: that status only)
  *    /flaky?fail=N&key=K     the first N requests for key K get 502, then 200
  *    /slow?ms=N              waits N ms (at most 60000), then 200
  *    /echo                   200, echoes method, path, headers and body digest
  GET  /bytes?n=N[&chunked=1]  200 with N bytes where byte i is i % 256
  anything else                404 "The URI requested is invalid"
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MESSAGES = {  # the reference API's wording
    400: "The request was invalid or cannot be otherwise served",
    401: "Missing or incorrect authentication credentials",
    403: "Request limit exceeded",
    404: "The URI requested is invalid",
    422: "The JSON body of the request is badly-formed",
    500: "Something is broken. This is usually a temporary error, try again later",
    502: "The service is down or is being upgraded",
    504: "The servers are up, but the request could not be serviced "
         "due to a failure within the internal stack. Try again later",
}
ITEMS = {str(i): {"id": i, "name": name}
         for i, name in enumerate(("alpha", "bravo", "charlie", "delta", "echo"), 1)}
PIECE = 64 * 1024
PATTERN = bytes(range(256)) * (PIECE // 256)
KEEP_BODY = 1 << 20  # request bodies up to this size are kept for JSON parsing
READ = frozenset(("GET", "HEAD"))
ALL = READ | {"POST", "PUT", "PATCH", "DELETE"}
NO_CONTENT_LENGTH = (101, 204, 304)


class ApiError(Exception):
    """An error answer; close=True also drops the connection (broken framing)."""

    def __init__(self, status, message, headers=(), close=False):
        super().__init__(message)
        self.status, self.message = status, message
        self.headers, self.close = list(headers), close


class Counters:
    """The only mutable state: rate-limit windows, flaky keys, new item ids."""

    def __init__(self):
        self.lock = threading.Lock()
        self.windows = {}  # path -> [window start (monotonic seconds), count]
        self.keys = {}     # flaky key -> requests seen
        self.next_id = len(ITEMS) + 1

    def hit_window(self, path, window_s):
        """Counts a request on path; returns (count in window, seconds left)."""
        now = time.monotonic()
        with self.lock:
            window = self.windows.get(path)
            if window is None or now >= window[0] + window_s:
                window = self.windows[path] = [now, 0]
            window[1] += 1
            return window[1], window[0] + window_s - now

    def hit_key(self, key):
        with self.lock:
            self.keys[key] = self.keys.get(key, 0) + 1
            return self.keys[key]

    def new_id(self):
        with self.lock:
            self.next_id += 1
            return self.next_id - 1


def message_for(status):
    if status in MESSAGES:
        return MESSAGES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"Unexpected status {status}"


def int_param(query, name, default, low, high):
    raw = query.get(name, [None])[-1]
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not low <= int(raw) <= high:
        raise ApiError(400, f"Invalid parameter: {name} must be an integer "
                            f"between {low} and {high}")
    return int(raw)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # status lines even on garbage input
    timeout = 60  # idle keep-alive connections are closed after this
    disable_nagle_algorithm = True  # head and body are separate writes

    ROUTES = [(re.compile(pattern), methods, name) for pattern, methods, name in (
        (r"/v1/items", READ | {"POST"}, "items"),
        (r"/v1/items/([^/]+)", READ, "item"),
        (r"/v1/updates", READ, "updates"),
        (r"/v1/secure", READ, "secure"),
        (r"/v1/forbidden", ALL, "forbidden"),
        (r"/v1/limited(?:/.*)?", ALL, "limited"),
        (r"/status/([^/]*)", ALL, "status"),
        (r"/flaky", ALL, "flaky"),
        (r"/slow", ALL, "slow"),
        (r"/echo", ALL, "echo"),
        (r"/bytes", READ, "bytes"),
    )]

    def handle_any(self):
        """Reads the body, then answers from the matching route_* method."""
        self.url = urlsplit(self.path)
        query = parse_qs(self.url.query, keep_blank_values=True)
        try:
            self.read_body()
            for pattern, methods, name in self.ROUTES:
                match = pattern.fullmatch(self.url.path)
                if match and self.command not in methods:
                    raise ApiError(405, f"The {self.command} method is not allowed here",
                                   [("Allow", ", ".join(sorted(methods)))])
                if match:
                    return getattr(self, "route_" + name)(query, *match.groups())
            raise ApiError(404, MESSAGES[404])
        except ApiError as err:
            self.close_connection = self.close_connection or err.close
            self.send_json(err.status, {"message": err.message}, err.headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

    def read_body(self):
        """Hashes the whole body; keeps it in self.body unless it is large."""
        digest, length, kept = hashlib.sha256(), 0, []
        for piece in self.body_pieces():
            digest.update(piece)
            length += len(piece)
            if length <= KEEP_BODY:
                kept.append(piece)
        self.body = b"".join(kept) if length <= KEEP_BODY else None
        self.body_info = {"length": length, "sha256": digest.hexdigest()}

    def body_pieces(self):
        coding = self.headers.get("Transfer-Encoding")
        lengths = self.headers.get_all("Content-Length") or []
        if coding is not None and lengths:
            raise ApiError(400, "Content-Length and Transfer-Encoding must not "
                                "both be present", close=True)
        if coding is not None:
            if coding.strip().lower() != "chunked":
                raise ApiError(501, f"Transfer-Encoding {coding!r} is not supported", close=True)
            yield from self.chunked_pieces()
        elif lengths:
            if len(set(lengths)) > 1 or not re.fullmatch(r"[0-9]{1,19}", lengths[0]):
                raise ApiError(400, "Invalid Content-Length header", close=True)
            yield from self.exact_pieces(int(lengths[0]))

    def exact_pieces(self, size):
        while size > 0:
            piece = self.rfile.read(min(size, PIECE))
            if not piece:
                raise ApiError(400, "The request body ended early", close=True)
            size -= len(piece)
            yield piece

    def chunked_pieces(self):
        while True:
            size = self.rfile.readline(1024).split(b";")[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size):
                raise ApiError(400, "Invalid chunk size in the request body", close=True)
            if int(size, 16) == 0:
                break
            yield from self.exact_pieces(int(size, 16))
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise ApiError(400, "Invalid chunk in the request body", close=True)
        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields are ignored

    def send_json(self, status, doc, headers=()):
        """Sends a complete response; doc None means an empty body."""
        body = b"" if doc is None else json.dumps(doc).encode() + b"\n"
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if doc is not None:
            self.send_header("Content-Type", "application/json")
        if status not in NO_CONTENT_LENGTH:
            self.send_header("Content-Length", str(len(body)))
        self.finish_head()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def ok(self, doc, status=200, headers=()):
        """A success; POST/PUT/PATCH ones report the request body's digest."""
        if doc is not None and self.command in ("POST", "PUT", "PATCH"):
            doc = {**doc, "request_body": self.body_info}
        self.send_json(status, doc, headers)

    def finish_head(self):
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")
        self.end_headers()

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, unknown method) as JSON."""
        self.close_connection = True
        self.send_json(code, {"message": message or message_for(code)})

    def version_string(self):
        return "mock_api/1.0"

    def log_request(self, code="-", size="-"):
        self.log_message("%s -> %s", self.requestline, getattr(code, "value", code))

    def log_message(self, fmt, *args):
        if not self.server.quiet:  # os.write: no stderr lock held at shutdown
            os.write(2, f"mock_api: {fmt % args}\n".encode(errors="replace"))

    def route_items(self, query):
        if self.command != "POST":
            return self.ok({"items": list(ITEMS.values()), "count": len(ITEMS)})
        if self.body is None:
            raise ApiError(413, "The request body is too large")
        try:
            doc = json.loads(self.body)
        except ValueError:
            raise ApiError(422, MESSAGES[422]) from None
        if not isinstance(doc, dict):
            raise ApiError(422, MESSAGES[422])
        if not isinstance(doc.get("name"), str) or not doc["name"].strip():
            raise ApiError(400, "Invalid parameter: name is required")
        item_id = self.server.counters.new_id()
        self.ok({"id": item_id, "name": doc["name"]}, 201,
                [("Location", f"/v1/items/{item_id}")])

    def route_item(self, query, item_id):
        if item_id not in ITEMS:
            raise ApiError(404, "Item not found")
        self.ok(ITEMS[item_id])

    def route_updates(self, query):
        self.send_json(204, None)

    def route_secure(self, query):
        if self.headers.get("Authorization") != "Bearer test-token":
            raise ApiError(401, MESSAGES[401], [("WWW-Authenticate", 'Bearer realm="api"')])
        self.ok({"authenticated": True, "subject": "test"})

    def route_forbidden(self, query):
        raise ApiError(403, "Access to this resource is not allowed")

    def route_limited(self, query):
        limit = int_param(query, "limit", 5, 0, 10**9)
        window_ms = int_param(query, "window_ms", 1000, 1, 86_400_000)
        count, left = self.server.counters.hit_window(self.url.path, window_ms / 1000)
        headers = [("X-RateLimit-Limit", str(limit)),
                   ("X-RateLimit-Remaining", str(max(limit - count, 0)))]
        if count > limit:
            headers.append(("Retry-After", str(max(1, math.ceil(left)))))
            raise ApiError(403, "Request limit exceeded, please slow down", headers)
        self.ok({"ok": True, "count": count, "limit": limit, "window_ms": window_ms},
                headers=headers)

    def route_status(self, query, code):
        if not re.fullmatch(r"[1-5][0-9][0-9]", code):
            raise ApiError(400, "Invalid parameter: code must be between 100 and 599")
        status, headers = int(code), []
        if "retry_after" in query:
            if not re.fullmatch(r"[ -~]+", query["retry_after"][-1]):
                raise ApiError(400, "Invalid parameter: retry_after")
            headers.append(("Retry-After", query["retry_after"][-1]))
        if status == 101:  # the connection now speaks "mock", which just ends it
            self.send_json(101, None, [("Connection", "upgrade"), ("Upgrade", "mock")])
            self.close_connection = True
            return
        if status < 200:  # an interim response, then a real one
            self.send_response_only(status)
            self.end_headers()
            return self.ok({"message": f"Final response after {status}"}, 200, headers)
        if status >= 400:
            raise ApiError(status, message_for(status), headers)
        no_body = status in (204, 205, 304)
        self.ok(None if no_body else {"message": message_for(status)}, status, headers)

    def route_flaky(self, query):
        if "fail" in query:
            fail = int_param(query, "fail", 0, 0, 10**9)
            seen = self.server.counters.hit_key(query.get("key", [""])[-1])
            headers = [("X-Attempt", str(seen))]
            if seen <= fail:
                raise ApiError(502, MESSAGES[502], headers)
            return self.ok({"ok": True, "attempt": seen}, headers=headers)
        try:
            p = float(query.get("p", ["0.3"])[-1])
        except ValueError:
            p = -1.0
        if not 0 <= p <= 1:
            raise ApiError(400, "Invalid parameter: p must be a number between 0 and 1")
        if random.random() < p:
            codes = (500, 502, 504)
            if "code" in query:
                codes = (int_param(query, "code", 502, 500, 599),)
            status = random.choice(codes)
            raise ApiError(status, MESSAGES.get(status, message_for(status)))
        self.ok({"ok": True})

    def route_slow(self, query):
        ms = min(int_param(query, "ms", 1000, 0, 10**12), 60000)
        time.sleep(ms / 1000)
        self.ok({"ok": True, "waited_ms": ms})

    def route_echo(self, query):
        headers = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.send_json(200, {"method": self.command, "path": self.path,
                             "headers": headers, "body": self.body_info})

    def route_bytes(self, query):
        size = int_param(query, "n", 1024, 0, 2**31)
        chunked = (query.get("chunked", [""])[-1] == "1"
                   and self.request_version != "HTTP/1.0")  # 1.0 clients never get chunks
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self.finish_head()
        if self.command == "HEAD":
            return
        for offset in range(0, size, PIECE):
            piece = PATTERN if size - offset >= PIECE else PATTERN[:size - offset]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


class MockServer(ThreadingHTTPServer):
    daemon_threads = True
    # errord opens upstream connections in bursts; past socketserver's
    # backlog of 5 the kernel drops them and requests wait for a timeout.
    request_queue_size = 1024
    block_on_close = False  # else server_close() waits for idle keep-alive clients

    def __init__(self, address, quiet):
        self.quiet = quiet
        self.counters = Counters()
        super().__init__(address, Handler)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # clients hanging up are normal


def main():
    parser = argparse.ArgumentParser(description="Mock of errord's upstream API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port")
    parser.add_argument("--quiet", action="store_true", help="no request log on stderr")
    args = parser.parse_args()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: sys.exit(0))
    try:
        server = MockServer((args.host, args.port), args.quiet)
    except OSError as err:
        parser.exit(1, f"mock_api: cannot listen on {args.host}:{args.port}: {err}\n")
    host, port = server.server_address[:2]
    print(f"mock_api listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
