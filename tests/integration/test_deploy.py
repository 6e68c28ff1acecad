"""errord as a service: what systemd hears from it (Type=notify)."""

import os
import signal
import socket

import pytest

from support import SLOW, response, wait_until


@pytest.mark.parametrize("where", ["path", "abstract"])
def test_the_service_manager_hears_ready_reloading_and_stopping(upstream, errord, tmp_path,
                                                                 where):
    """Through $NOTIFY_SOCKET, as systemd's Type=notify expects: READY=1 once
    errord listens, RELOADING=1 then READY=1 around every reload (whatever
    triggered it, and whether it took), STOPPING=1 when it starts draining."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if where == "path":
        name = str(tmp_path / "notify")
        sock.bind(name)
    else:
        name = "@errord-test-%d-%s" % (os.getpid(), tmp_path.name)
        sock.bind("\0" + name[1:])
    sock.settimeout(10 * SLOW)
    up = upstream(lambda req: response(200, b"ok"))
    pol = tmp_path / "policy.lua"
    pol.write_text("return { [500] = function() return pass() end }\n")
    try:
        e = errord(up.url, "--policy", str(pol), env={"NOTIFY_SOCKET": name})
        assert sock.recv(4096) == b"READY=1"

        pol.write_text("return { [502] = function() return pass() end }\n")
        e.send_signal(signal.SIGHUP)
        assert [sock.recv(4096), sock.recv(4096)] == [b"RELOADING=1", b"READY=1"]

        pol.write_text("return { [502] = function( end }\n")  # broken: the old one stays
        assert e.admin("/reload", method="POST")[0] == 422
        assert [sock.recv(4096), sock.recv(4096)] == [b"RELOADING=1", b"READY=1"]

        e.stop()
        assert e.returncode == 0
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        sock.close()


def test_an_unusable_notify_socket_is_reported_and_errord_serves(upstream, errord, tmp_path):
    up = upstream(lambda req: response(200, b"ok"))
    e = errord(up.url, "--policy", "off",
               env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens-here")})
    warn = wait_until(lambda: e.find(level="warn"))
    assert warn and "could not tell the service manager" in warn["msg"], e.records
    status, _ = e.admin("/healthz")
    assert status == 200
