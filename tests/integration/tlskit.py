"""TLS test support: certificates made with the `openssl` command line, and
an upstream that speaks HTTP/1.1 over TLS.

Certs(workdir) makes, once, in `workdir`:

- `ca`, a test CA (`ca.pem`), and `ca2`, a second CA unrelated to it;
- leaves signed by `ca` (EC P-256, serverAuth), each a Leaf(cert, key):
  `good` for DNS:localhost and IP:127.0.0.1, `other` for DNS:other.example
  only, `expired` for localhost/127.0.0.1 but valid only in 2020;
- `foreign`, a leaf for localhost/127.0.0.1 signed by `ca2`.

Leaves are signed with `openssl ca` and an explicit -startdate/-enddate
(OpenSSL 3.0's `x509 -req` has no -not_before/-not_after), so an expired
certificate is as easy to make as a valid one. A server sends only its
leaf, never the CA: a client that does not trust the CA fails with
"unable to get local issuer certificate".

TlsUpstream is support.Upstream with every accepted socket wrapped by a
server-side ssl context: the same handler interface, requests read and
answered by Upstream._serve (keep-alive HTTP/1.1), plus what a TLS test
wants to see: full handshakes and resumed ones, the SNI each handshake
carried, and handshakes that failed (errord refused the certificate). A
response whose head says `Connection: close` is followed by a TLS
close_notify and the end of the connection, as a real server does."""

import collections
import datetime
import os
import re
import ssl
import subprocess
import threading
import time

from support import SLOW, Upstream

OPENSSL = os.environ.get("OPENSSL", "openssl")

Leaf = collections.namedtuple("Leaf", "cert key")

LOCALHOST_SANS = ("DNS:localhost", "IP:127.0.0.1")

_CONFIG = """\
[ ca ]
default_ca = this_ca

[ this_ca ]
dir              = {dir}
database         = $dir/index.txt
new_certs_dir    = $dir/issued
serial           = $dir/serial
default_md       = sha256
policy           = policy_any
unique_subject   = no
copy_extensions  = none
email_in_dn      = no

[ policy_any ]
commonName = supplied

[ req ]
distinguished_name = dn
prompt             = no

[ dn ]
CN = unused

[ v3_ca ]
basicConstraints       = critical, CA:TRUE
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
"""

_LEAF_EXT = """\
[ leaf ]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature
extendedKeyUsage       = serverAuth
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
subjectAltName         = {sans}
"""


def openssl(*args, cwd=None):
    """Runs `openssl args...`; fails with its output when it exits non-zero."""
    p = subprocess.run([OPENSSL, *args], capture_output=True, cwd=cwd, timeout=30)
    if p.returncode != 0:
        raise RuntimeError("openssl %s exited %d:\n%s%s" % (
            " ".join(args), p.returncode, p.stdout.decode(errors="replace"),
            p.stderr.decode(errors="replace")))
    return p.stdout.decode(errors="replace")


def asn1_time(dt):
    """A datetime as openssl ca's -startdate/-enddate (YYYYMMDDHHMMSSZ, UTC)."""
    return dt.astimezone(datetime.timezone.utc).strftime("%Y%m%d%H%M%SZ")


class CA:
    """A certificate authority in its own directory (key, self-signed
    certificate, `openssl ca` database)."""

    def __init__(self, workdir, name, cn):
        self.dir = os.path.join(workdir, name)
        os.makedirs(os.path.join(self.dir, "issued"), exist_ok=True)
        self.config = os.path.join(self.dir, "openssl.cnf")
        with open(self.config, "w") as f:
            f.write(_CONFIG.format(dir=self.dir))
        open(os.path.join(self.dir, "index.txt"), "w").close()
        with open(os.path.join(self.dir, "serial"), "w") as f:
            f.write("1000\n")
        self.key = os.path.join(self.dir, "ca.key")
        self.cert = os.path.join(self.dir, "ca.pem")
        openssl("req", "-config", self.config, "-x509", "-new", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", self.key,
                "-out", self.cert, "-days", "3650", "-subj", "/CN=" + cn,
                "-extensions", "v3_ca")

    def leaf(self, name, cn, sans, start=None, end=None):
        """A server certificate for `sans` (a list of "DNS:x" / "IP:x"), valid
        from `start` to `end` (datetimes; default: an hour ago to 30 days on)."""
        now = datetime.datetime.now(datetime.timezone.utc)
        start = start or now - datetime.timedelta(hours=1)
        end = end or now + datetime.timedelta(days=30)
        key = os.path.join(self.dir, name + ".key")
        csr = os.path.join(self.dir, name + ".csr")
        cert = os.path.join(self.dir, name + ".pem")
        ext = os.path.join(self.dir, name + ".ext")
        with open(ext, "w") as f:
            f.write(_LEAF_EXT.format(sans=", ".join(sans)))
        openssl("req", "-config", self.config, "-new", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key,
                "-out", csr, "-subj", "/CN=" + cn)
        openssl("ca", "-config", self.config, "-batch", "-notext", "-in", csr, "-out", cert,
                "-cert", self.cert, "-keyfile", self.key, "-extfile", ext, "-extensions", "leaf",
                "-startdate", asn1_time(start), "-enddate", asn1_time(end))
        return Leaf(cert, key)


class Certs:
    """Every certificate the TLS tests use (see the module's docstring)."""

    def __init__(self, workdir):
        self.dir = str(workdir)
        self.ca = CA(self.dir, "ca", "errord test CA")
        self.ca2 = CA(self.dir, "ca2", "errord unrelated test CA")
        self.good = self.ca.leaf("good", "localhost", LOCALHOST_SANS)
        self.other = self.ca.leaf("other", "other.example", ["DNS:other.example"])
        self.expired = self.ca.leaf(
            "expired", "localhost", LOCALHOST_SANS,
            start=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
            end=datetime.datetime(2021, 1, 1, tzinfo=datetime.timezone.utc))
        self.foreign = self.ca2.leaf("foreign", "localhost", LOCALHOST_SANS)

    def leaf(self, name):
        """The Leaf called `name` ("good", "other", "expired", "foreign")."""
        leaf = getattr(self, name, None)
        if not isinstance(leaf, Leaf):
            raise KeyError("no certificate %r" % name)
        return leaf


# ---- the TLS upstream ---------------------------------------------------------------------


_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close[ \t]*\r\n", re.IGNORECASE)


def says_close(data):
    """Whether raw response bytes have `Connection: close` in their head."""
    head = data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    return bool(_CONNECTION_CLOSE.search(head))


def tls_close(sock):
    """Sends close_notify without waiting for the peer's, then closes."""
    try:
        sock.setblocking(False)
        sock.unwrap()
    except (ssl.SSLError, OSError, ValueError):
        pass  # SSLWantReadError: our close_notify went out, the peer's has not come
    try:
        sock.close()
    except OSError:
        pass


class TlsUpstream(Upstream):
    """support.Upstream over TLS with `leaf` (a Leaf) as its certificate.

    Besides Upstream's `requests` and `connections` (TCP accepts):
    `handshakes` (completed, full or resumed), `resumed` (of those, how many
    resumed a session), `sni` (the server name of each handshake's
    ClientHello, None when it had none), `failed` (the error of each
    handshake that did not complete), `versions` (the TLS version of each).
    `serve_delay` holds each connection that long after its handshake before
    reading anything: a slow reader, for backpressure."""

    def __init__(self, handler=None, leaf=None, min_version=None, max_version=None,
                 serve_delay=0.0):
        if leaf is None:
            raise ValueError("TlsUpstream needs a certificate (a tlskit.Leaf)")
        self.leaf = leaf
        self.serve_delay = serve_delay  # seconds between the handshake and reading a request
        self.handshakes = 0
        self.resumed = 0
        self.sni = []
        self.failed = []
        self.versions = []
        self._tls_lock = threading.Lock()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(leaf.cert, leaf.key)
        if min_version is not None:
            self.ctx.minimum_version = min_version
        if max_version is not None:
            self.ctx.maximum_version = max_version
        self.ctx.sni_callback = self._on_sni
        inner = handler or (lambda req: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        def handle(req):
            out = inner(req)
            if isinstance(out, (bytes, bytearray)) and says_close(out):
                def send_and_close(sock):
                    sock.sendall(out)
                    tls_close(sock)
                return send_and_close
            return out

        super().__init__(handle)

    @property
    def url(self):
        return "https://localhost:%d" % self.port

    @property
    def ip_url(self):
        return "https://127.0.0.1:%d" % self.port

    def _on_sni(self, sslobj, server_name, ctx):
        with self._tls_lock:
            self.sni.append(server_name)
        return None

    def _serve(self, conn):
        conn.settimeout(10 * SLOW)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as e:
            with self._tls_lock:
                self.failed.append(e)
            try:
                conn.close()
            except OSError:
                pass
            return
        with self._lock:
            self._socks.append(tls)  # close() shuts it down too
        with self._tls_lock:
            self.handshakes += 1
            self.resumed += 1 if tls.session_reused else 0
            self.versions.append(tls.version())
        tls.settimeout(30 * SLOW)
        if self.serve_delay:
            time.sleep(self.serve_delay)  # lets what the peer sends pile up
        super()._serve(tls)

    def stats(self):
        """(connections, handshakes, resumed) now."""
        with self._tls_lock:
            return self.connections, self.handshakes, self.resumed
