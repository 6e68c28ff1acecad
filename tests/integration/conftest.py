"""Fixtures: errord, upstreams and the mock of the reference API, each
stopped when the test ends (errord's stop also checks that it exited 0 with
no sanitizer report)."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from support import ROOT, Errord, RawUpstream, Upstream  # noqa: E402


@pytest.fixture
def upstream():
    """upstream(handler) -> a running Upstream; see support.Upstream."""
    servers = []

    def make(handler=None):
        s = Upstream(handler)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def raw_upstream():
    """raw_upstream(script) -> a running RawUpstream; see support.RawUpstream."""
    servers = []

    def make(script):
        s = RawUpstream(script)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def errord():
    """errord(upstream_url, *flags, env=None) -> a running Errord."""
    procs = []

    def start(upstream_url, *args, **kw):
        e = Errord(upstream_url, *args, **kw)
        procs.append(e)
        return e

    yield start
    for p in procs:
        if p.returncode is None:
            p.stop()


@pytest.fixture(scope="session")
def mock_api():
    """The bundled mock of the reference API, as a base URL."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "mock_api.py"),
                             "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proc.stdout.readline().decode()
    assert line.startswith("mock_api listening on "), line
    yield line.split()[-1].strip()
    proc.terminate()
    proc.wait(10)
