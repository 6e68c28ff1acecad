"""Hot reload, black-box (SPEC §3, §5 GET /policy and POST /reload, §6): the
real errord binary with a Lua policy in pytest's tmp_path, reloaded by
SIGHUP, by POST /reload on the admin port and, with --watch, by a change of
the file, while clients send requests through it.

What a user notices: which policy decided each response (the client sees it,
the access record names it by sha256), what POST /reload and GET /policy
answer, the "policy reloaded" / "policy reload failed" log records, and that
a failed reload changes nothing. Every wait is bounded and scaled by SLOW."""

import hashlib
import http.client
import os
import re
import signal
import threading
import time
import uuid
from datetime import datetime

import pytest

from support import SANITIZER_MARKS, SLOW, Client, Truncated, response, wait_until

FAST = "p.settings = { backoff = { base_ms = 1, max_ms = 5 } }\n"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
RELOADED = "policy reloaded"
FAILED = "policy reload failed; the running policy stays"


# ---- helpers ------------------------------------------------------------------------


def write(path, text):
    """Writes `text` into `path` in place; returns the sha256 of its bytes."""
    with open(path, "w") as f:
        f.write(text)
    return hashlib.sha256(text.encode()).hexdigest()


def line_of(text, marker):
    for i, line in enumerate(text.splitlines(), 1):
        if marker in line:
            return i
    raise AssertionError("%r not in %r" % (marker, text))


def version(name, status):
    """A policy that answers every upstream 500 itself with `status`, an
    X-Policy header and a JSON body naming it, with a test of its own."""
    return ("local p = {}\n" + FAST +
            "p[500] = function(req, res)\n"
            "  return respond { status = %d, headers = { [\"x-policy\"] = \"%s\" },\n"
            "                   json = { policy = \"%s\" } }\n"
            "end\n"
            "p.tests = {\n"
            "  { name = \"500 answered by %s\", res = { status = 500 },\n"
            "    expect = { verdict = \"respond\", status = %d } },\n"
            "}\n"
            "return p\n") % (status, name, name, name, status)


A = version("A", 521)
B = version("B", 522)

# Versions that must not load, each with the marker of the line its first
# problem is reported at.
BROKEN = {
    "syntax": ("local p = {}\n" + FAST +
               "p[500] = function(req, res)\n"
               "  return respond { status = 523\n"
               "end -- BROKEN\n"
               "return p\n"),
    "not_a_function": ("local p = {}\n" + FAST +
                       "p[500] = \"respond\" -- BROKEN\n"
                       "return p\n"),
    "attempts": ("local p = {}\n"
                 "p.settings = {\n"
                 "  attempts = 99, -- BROKEN\n"
                 "}\n"
                 "p[500] = function(req, res) return respond { status = 523 } end\n"
                 "return p\n"),
    "failing_test": ("local p = {}\n" + FAST +
                     "p[500] = function(req, res) return respond { status = 523 } end\n"
                     "p.tests = {\n"
                     "  { name = \"500 is passed on\", -- BROKEN\n"
                     "    res = { status = 500 }, expect = { verdict = \"pass\" } },\n"
                     "}\n"
                     "return p\n"),
}

VERSIONS = {521: "A", 522: "B"}


def upstream_500(upstream):
    return upstream(lambda req: response(500, b'{"message":"Something is broken"}',
                                         [("Content-Type", "application/json")]))


def decided_by(r):
    """Which version decided a response: "A", "B", or a description of a
    response neither would give."""
    name = VERSIONS.get(r.status)
    try:
        body = r.json()
    except ValueError:
        body = r.body
    if name is None or r.header("x-policy") != name or body != {"policy": name}:
        return "neither: %d %r %r" % (r.status, r.header("x-policy"), r.body[:200])
    return name


def get(port, path, request_id=None):
    c = Client(port)
    try:
        headers = [("X-Request-Id", request_id)] if request_id else []
        return c.get(path, headers)
    finally:
        c.close()


def access_by_id(e, request_id, timeout=5.0):
    wait_until(lambda: e.find(type="access", request_id=request_id), timeout)
    rec = e.find(type="access", request_id=request_id)
    assert rec is not None, "no access record for %s" % request_id
    return rec


def policy_state(e):
    status, body = e.admin("/policy")
    assert status == 200, body
    return body


def reload_admin(e):
    return e.admin("/reload", method="POST")


def rfc3339(text):
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$", text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def rid():
    return uuid.uuid4().hex


# ---- POST /reload and GET /policy -----------------------------------------------------


def test_post_reload_swaps_the_policy_and_get_policy_reports_it(upstream, errord, tmp_path):
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")
    sha_a = write(pol, A)
    e = errord(up.url, "--policy", pol)

    state = policy_state(e)
    assert state["path"] == pol
    assert state["sha256"] == sha_a
    assert state["handlers"] == 1 and state["tests"] == 1
    assert state["watch"] is False
    assert state["last_reload"] is None
    assert state["reloads"] == {"reloaded": 0, "unchanged": 0, "failed": 0}
    first_loaded = rfc3339(state["loaded_at"])
    assert e.find(msg="errord started")["policy_sha256"] == sha_a

    id1 = rid()
    assert decided_by(get(e.port, "/before", id1)) == "A"
    assert access_by_id(e, id1)["policy_sha256"] == sha_a

    time.sleep(0.01)  # loaded_at has millisecond resolution
    sha_b = write(pol, B)
    status, body = reload_admin(e)
    assert status == 200, body
    assert body == {"result": "reloaded", "sha256": sha_b, "path": pol}
    assert HEX64.match(body["sha256"])

    id2 = rid()
    assert decided_by(get(e.port, "/after", id2)) == "B"
    assert access_by_id(e, id2)["policy_sha256"] == sha_b

    logs = e.all(msg=RELOADED)
    assert len(logs) == 1, logs
    assert logs[0]["level"] == "info"
    assert logs[0]["trigger"] == "admin"
    assert logs[0]["sha256"] == sha_b
    assert isinstance(logs[0]["took_ms"], (int, float)) and logs[0]["took_ms"] >= 0

    state = policy_state(e)
    assert state["sha256"] == sha_b
    assert state["path"] == pol
    assert rfc3339(state["loaded_at"]) > first_loaded
    last = state["last_reload"]
    assert last["result"] == "reloaded"
    assert last["trigger"] == "admin"
    assert last["error"] is None
    assert "errors" not in last
    rfc3339(last["at"])
    assert state["reloads"] == {"reloaded": 1, "unchanged": 0, "failed": 0}



def test_the_wrong_method_on_reload_and_policy_is_405(upstream, errord, tmp_path):
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")
    write(pol, A)
    e = errord(up.url, "--policy", pol)
    try:
        assert e.admin("/reload") == (405, {"message": "use POST"})
        assert e.admin("/policy", method="POST") == (405, {"message": "use GET, HEAD"})
        for path, method, allow in (("/reload", "GET", "POST"), ("/policy", "DELETE", "GET, HEAD")):
            c = http.client.HTTPConnection("127.0.0.1", e.admin_port, timeout=5 * SLOW)
            c.request(method, path)
            r = c.getresponse()
            r.read()
            c.close()
            assert (r.status, r.getheader("Allow")) == (405, allow)
        assert policy_state(e)["reloads"] == {"reloaded": 0, "unchanged": 0, "failed": 0}
    finally:
        # stopped here, so that a crash fails this test rather than its teardown
        rc = e.stop(check=False)
    assert rc == 0 and not any(m in "".join(e.stderr) for m in SANITIZER_MARKS), e.stderr

def test_reloading_an_identical_file_reports_unchanged_and_does_not_swap(
        upstream, errord, tmp_path):
    # The policy keeps a number in its Lua state: a swap would start it over.
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")
    text = ("local p = {}\n" + FAST + "local n = 0\n"
            "p[500] = function(req, res)\n"
            "  n = n + 1\n"
            "  return respond { status = 200, json = { n = n } }\n"
            "end\n"
            "return p\n")
    sha_1 = write(pol, text)
    e = errord(up.url, "--policy", pol)
    assert get(e.port, "/1").json() == {"n": 1}
    assert get(e.port, "/2").json() == {"n": 2}
    loaded_at = policy_state(e)["loaded_at"]

    write(pol, text)  # written again, same bytes
    status, body = reload_admin(e)
    assert status == 200, body
    assert body == {"result": "unchanged", "sha256": sha_1, "path": pol}
    e.send_signal(signal.SIGHUP)
    wait_until(lambda: policy_state(e)["reloads"]["unchanged"] == 2)
    state = policy_state(e)
    assert state["reloads"] == {"reloaded": 0, "unchanged": 2, "failed": 0}
    assert state["last_reload"]["result"] == "unchanged"
    assert state["last_reload"]["trigger"] == "SIGHUP"
    assert state["last_reload"]["error"] is None
    assert state["loaded_at"] == loaded_at
    assert state["sha256"] == sha_1
    assert get(e.port, "/3").json() == {"n": 3}  # the same Lua state
    assert e.all(msg=RELOADED) == []

    # A real change does swap: the new state starts over.
    sha_2 = write(pol, text.replace("n = n + 1", "n = n + 10"))
    status, body = reload_admin(e)
    assert status == 200 and body["result"] == "reloaded" and body["sha256"] == sha_2
    assert get(e.port, "/4").json() == {"n": 10}


def test_sighup_reloads_the_policy(upstream, errord, tmp_path):
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")
    sha_a = write(pol, A)
    e = errord(up.url, "--policy", pol)
    assert decided_by(get(e.port, "/a")) == "A"

    sha_b = write(pol, B)
    e.send_signal(signal.SIGHUP)
    assert wait_until(lambda: e.find(msg=RELOADED)), e.records
    rec = e.find(msg=RELOADED)
    assert rec["trigger"] == "SIGHUP" and rec["sha256"] == sha_b
    id1 = rid()
    assert decided_by(get(e.port, "/b", id1)) == "B"
    assert access_by_id(e, id1)["policy_sha256"] == sha_b
    state = policy_state(e)
    assert state["sha256"] == sha_b
    assert state["last_reload"]["result"] == "reloaded"
    assert state["last_reload"]["trigger"] == "SIGHUP"
    assert state["reloads"] == {"reloaded": 1, "unchanged": 0, "failed": 0}

    # and back again
    write(pol, A)
    e.send_signal(signal.SIGHUP)
    assert wait_until(lambda: policy_state(e)["sha256"] == sha_a)
    assert decided_by(get(e.port, "/a2")) == "A"
    assert policy_state(e)["reloads"]["reloaded"] == 2


# ---- a failed reload keeps the running policy -----------------------------------------


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_failed_reload_keeps_the_running_policy(upstream, errord, tmp_path, kind):
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")
    sha_a = write(pol, A)
    e = errord(up.url, "--policy", pol)
    loaded_at = policy_state(e)["loaded_at"]

    broken = BROKEN[kind]
    write(pol, broken)
    where = "%s:%d: " % (pol, line_of(broken, "BROKEN"))
    status, body = reload_admin(e)
    assert status == 422, body
    assert set(body) == {"message", "errors", "running_sha256"}
    assert body["running_sha256"] == sha_a
    assert body["errors"] and body["message"] == body["errors"][0]
    assert body["message"].startswith(where), body
    for problem in body["errors"]:
        assert re.match(r"^%s:\d+: \S" % re.escape(pol), problem), problem
    if kind == "failing_test":
        assert 'test "500 is passed on" failed' in body["message"]
    if kind == "not_a_function":
        assert "must be a function" in body["message"]
    if kind == "attempts":
        assert "settings.attempts" in body["message"]

    # traffic is still decided by A
    id1 = rid()
    assert decided_by(get(e.port, "/still-a", id1)) == "A"
    assert access_by_id(e, id1)["policy_sha256"] == sha_a

    state = policy_state(e)
    assert state["sha256"] == sha_a
    assert state["loaded_at"] == loaded_at
    last = state["last_reload"]
    assert last["result"] == "failed" and last["trigger"] == "admin"
    assert last["error"] == body["message"]
    assert last["errors"] == body["errors"]
    assert state["reloads"] == {"reloaded": 0, "unchanged": 0, "failed": 1}

    logs = e.all(msg=FAILED)
    assert len(logs) == 1, logs
    assert logs[0]["level"] == "error"
    assert logs[0]["error"] == body["message"]
    assert logs[0]["errors"] == body["errors"]
    assert logs[0]["running_sha256"] == sha_a
    assert e.all(msg=RELOADED) == []

    # SIGHUP fails the same way; the next good version loads
    e.send_signal(signal.SIGHUP)
    assert wait_until(lambda: len(e.all(msg=FAILED)) == 2)
    last = policy_state(e)["last_reload"]
    assert last["result"] == "failed" and last["trigger"] == "SIGHUP"
    assert last["error"] == body["message"]
    assert decided_by(get(e.port, "/still-a-2")) == "A"

    sha_b = write(pol, B)
    status, body = reload_admin(e)
    assert status == 200 and body["sha256"] == sha_b, body
    assert decided_by(get(e.port, "/b")) == "B"
    state = policy_state(e)
    assert state["last_reload"]["result"] == "reloaded"
    assert state["last_reload"]["error"] is None and "errors" not in state["last_reload"]
    assert state["reloads"] == {"reloaded": 1, "unchanged": 0, "failed": 2}


def test_a_failed_reload_reports_every_problem_with_its_line(upstream, errord, tmp_path):
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")
    sha_a = write(pol, A)
    e = errord(up.url, "--policy", pol)
    broken = ("local p = {}\n"
              "p.settings = {\n"
              "  attempts = 99,\n"
              "  body_limit = -1,\n"
              "  deadline_ms = \"soon\",\n"
              "}\n"
              "return p\n")
    write(pol, broken)
    status, body = reload_admin(e)
    assert status == 422, body
    expected = {"%s:%d: settings.%s" % (pol, line_of(broken, key), key)
                for key in ("attempts", "body_limit", "deadline_ms")}
    got = {problem.split(" must ")[0] for problem in body["errors"]}
    assert got == expected, body["errors"]
    assert body["running_sha256"] == sha_a
    assert decided_by(get(e.port, "/still-a")) == "A"


def test_reload_with_the_file_gone_keeps_the_running_policy(upstream, errord, tmp_path):
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")
    sha_a = write(pol, A)
    e = errord(up.url, "--policy", pol)
    os.unlink(pol)
    status, body = reload_admin(e)
    assert status == 422, body
    assert pol in body["message"]
    assert body["running_sha256"] == sha_a
    assert decided_by(get(e.port, "/still-a")) == "A"
    assert policy_state(e)["reloads"]["failed"] == 1


# ---- without a policy ---------------------------------------------------------------


def test_without_a_policy_there_is_nothing_to_reload(upstream, errord):
    up = upstream_500(upstream)
    e = errord(up.url)  # --policy off
    status, body = reload_admin(e)
    assert status == 409, body
    assert isinstance(body, dict) and body.get("message")
    state = policy_state(e)
    assert state["path"] is None and state["sha256"] is None
    e.send_signal(signal.SIGHUP)  # not a crash, not a reload
    id1 = rid()
    r = get(e.port, "/x", id1)
    assert r.status == 500  # no policy: passed on
    rec = access_by_id(e, id1)
    assert "policy_sha256" not in rec
    assert e.all(msg=RELOADED) == [] and e.all(msg=FAILED) == []
    assert e.proc.poll() is None


# ---- --watch --------------------------------------------------------------------------


def wait_reloads(e, **counts):
    """Waits until GET /policy's reload counters reach `counts`."""
    wait_until(lambda: all(policy_state(e)["reloads"][k] >= v for k, v in counts.items()),
               timeout=5.0, interval=0.05)
    got = policy_state(e)["reloads"]
    assert all(got[k] == v for k, v in counts.items()), (got, counts)
    return got


def test_watch_reloads_on_an_in_place_write_and_on_an_editor_rename(upstream, errord, tmp_path):
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")
    sha_a = write(pol, A)
    e = errord(up.url, "--policy", pol, "--watch")
    assert policy_state(e)["watch"] is True
    assert decided_by(get(e.port, "/a")) == "A"

    # in place
    sha_b = write(pol, B)
    wait_reloads(e, reloaded=1)
    state = policy_state(e)
    assert state["sha256"] == sha_b
    assert state["last_reload"]["trigger"] == "watch"
    assert state["last_reload"]["result"] == "reloaded"
    # the log line may reach stdout a moment after GET /policy shows the swap
    rec = wait_until(lambda: e.find(msg=RELOADED))
    assert rec and rec["trigger"] == "watch" and rec["sha256"] == sha_b
    id1 = rid()
    assert decided_by(get(e.port, "/b", id1)) == "B"
    assert access_by_id(e, id1)["policy_sha256"] == sha_b

    # an editor: a new file in the same directory, renamed over the policy
    tmp = str(tmp_path / ".policy.lua.swp")
    write(tmp, A)
    os.rename(tmp, pol)
    wait_reloads(e, reloaded=2)
    assert policy_state(e)["sha256"] == sha_a
    assert decided_by(get(e.port, "/a-again")) == "A"

    # a broken save keeps A, the fix after it loads
    write(pol, BROKEN["syntax"])
    wait_reloads(e, reloaded=2, failed=1)
    state = policy_state(e)
    assert state["sha256"] == sha_a
    assert state["last_reload"]["result"] == "failed"
    assert state["last_reload"]["trigger"] == "watch"
    assert state["last_reload"]["error"].startswith(pol + ":")
    failed = wait_until(lambda: e.find(msg=FAILED))
    assert failed and failed["running_sha256"] == sha_a
    assert decided_by(get(e.port, "/a-still")) == "A"
    tmp = str(tmp_path / "policy.lua.new")
    write(tmp, B)
    os.rename(tmp, pol)
    wait_reloads(e, reloaded=3, failed=1)
    assert policy_state(e)["sha256"] == sha_b
    assert decided_by(get(e.port, "/b-again")) == "B"
    assert policy_state(e)["reloads"]["unchanged"] == 0


def test_watch_ignores_other_files_in_the_directory(upstream, errord, tmp_path):
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")
    sha_a = write(pol, A)
    e = errord(up.url, "--policy", pol, "--watch")
    before = policy_state(e)

    other = tmp_path / "other.lua"
    write(str(other), B)
    with open(str(other), "a") as f:
        f.write("-- more\n")
    write(str(tmp_path / "notes.txt"), "hello\n")
    os.rename(str(other), str(tmp_path / "renamed.lua"))
    os.unlink(str(tmp_path / "notes.txt"))
    time.sleep(0.8 * SLOW ** 0.5)  # well past the 200 ms debounce
    state = policy_state(e)
    assert state["reloads"] == {"reloaded": 0, "unchanged": 0, "failed": 0}
    assert state["last_reload"] is None
    assert state["sha256"] == sha_a and state["loaded_at"] == before["loaded_at"]
    assert decided_by(get(e.port, "/a")) == "A"

    # the watch still works afterwards
    write(pol, B)
    wait_reloads(e, reloaded=1)
    assert decided_by(get(e.port, "/b")) == "B"



def test_watch_follows_a_swapped_symlink(upstream, errord, tmp_path):
    # How Kubernetes updates a mounted ConfigMap: policy.lua -> ..data/policy.lua,
    # and ..data, a symlink to a versioned directory, is replaced by a rename.
    up = upstream_500(upstream)
    for name, text in (("..v1", A), ("..v2", B)):
        os.mkdir(str(tmp_path / name))
        write(str(tmp_path / name / "policy.lua"), text)
    os.symlink("..v1", str(tmp_path / "..data"))
    pol = str(tmp_path / "policy.lua")
    os.symlink("..data/policy.lua", pol)
    e = errord(up.url, "--policy", pol, "--watch")
    assert decided_by(get(e.port, "/a")) == "A"

    os.symlink("..v2", str(tmp_path / "..data_tmp"))
    os.rename(str(tmp_path / "..data_tmp"), str(tmp_path / "..data"))
    wait_reloads(e, reloaded=1)
    state = policy_state(e)
    assert state["sha256"] == hashlib.sha256(B.encode()).hexdigest()
    assert state["path"] == pol
    assert decided_by(get(e.port, "/b")) == "B"

# ---- reload under load ------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_under_load_loses_no_request_and_each_is_decided_by_one_version(
        upstream, errord, tmp_path, workers):
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")
    sha_of = {"A": write(pol, A), "B": hashlib.sha256(B.encode()).hexdigest()}
    bad_shas = {hashlib.sha256(t.encode()).hexdigest() for t in BROKEN.values()}
    e = errord(up.url, "--policy", pol, "--workers", str(workers))

    stop = threading.Event()
    lock = threading.Lock()
    seen = {}       # request id -> the version the client saw
    failures = []   # what went wrong on the client side

    def client(n):
        c = None
        i = 0
        deadline = time.monotonic() + 30 * SLOW
        try:
            while not stop.is_set() and i < 20000 and time.monotonic() < deadline:
                i += 1
                if c is None or i % 50 == 0:  # mostly keep-alive, some new connections
                    if c is not None:
                        c.close()
                    c = Client(e.port)
                request_id = "load-%d-%d-%s" % (n, i, uuid.uuid4().hex[:8])
                try:
                    r = c.get("/load/%d/%d" % (n, i), [("X-Request-Id", request_id)])
                except (OSError, Truncated, ValueError) as exc:
                    with lock:
                        failures.append("%s: %r" % (request_id, exc))
                    c.close()
                    c = None
                    continue
                if r is None:
                    with lock:
                        failures.append("%s: connection closed with no response" % request_id)
                    c.close()
                    c = None
                    continue
                with lock:
                    seen[request_id] = decided_by(r)
                if r.header("connection") and "close" in r.header("connection").lower():
                    c.close()
                    c = None
        finally:
            if c is not None:
                c.close()

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()

    # 36 swaps between A and B, by POST /reload and SIGHUP, with a broken
    # version tried before every third one.
    broken = sorted(BROKEN.values())
    n_reloaded = n_failed = 0
    current = "A"
    try:
        wait_until(lambda: len(seen) >= 20, timeout=5.0)
        for i in range(36):
            if i % 3 == 0:
                write(pol, broken[(i // 3) % len(broken)])
                status, body = reload_admin(e)
                assert status == 422, body
                assert body["running_sha256"] == sha_of[current]
                n_failed += 1
            current = "B" if current == "A" else "A"
            write(pol, A if current == "A" else B)
            if i % 4 == 1:
                e.send_signal(signal.SIGHUP)
                assert wait_until(lambda: policy_state(e)["reloads"]["reloaded"] == n_reloaded + 1)
            else:
                status, body = reload_admin(e)
                assert status == 200, body
                assert body == {"result": "reloaded", "sha256": sha_of[current], "path": pol}
            n_reloaded += 1
            time.sleep(0.06)
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(30 * SLOW)
    assert not any(t.is_alive() for t in threads)

    assert failures == [], failures[:10]
    assert len(seen) > 40, len(seen)
    odd = {k: v for k, v in seen.items() if v not in ("A", "B")}
    assert odd == {}, list(odd.items())[:10]
    assert set(seen.values()) == {"A", "B"}

    state = policy_state(e)
    assert state["reloads"] == {"reloaded": n_reloaded, "unchanged": 0, "failed": n_failed}
    assert state["sha256"] == sha_of[current]
    assert len(e.all(msg=RELOADED)) == n_reloaded
    assert len(e.all(msg=FAILED)) == n_failed

    # every access record names A or B, and the one that decided what the client saw
    wait_until(lambda: sum(1 for r in e.access() if r["request_id"] in seen) >= len(seen),
               timeout=10.0, interval=0.05)
    records = {r["request_id"]: r for r in e.access() if r["request_id"] in seen}
    assert len(records) == len(seen)
    by_sha = {v: k for k, v in sha_of.items()}
    mismatched = []
    for request_id, name in seen.items():
        rec_sha = records[request_id]["policy_sha256"]
        assert rec_sha not in bad_shas
        if by_sha.get(rec_sha) != name:
            mismatched.append((request_id, name, rec_sha))
    assert mismatched == [], mismatched[:10]
    # and after the last swap, every request is decided by the last version
    assert decided_by(get(e.port, "/after")) == current


# ---- requests in flight --------------------------------------------------------------------


def test_a_request_in_flight_finishes_under_the_policy_it_started_with(
        upstream, errord, tmp_path):
    release = threading.Event()
    arrived = threading.Event()

    def handler(req):
        if req.target.startswith("/slow"):
            arrived.set()
            release.wait(10 * SLOW)
        return response(500, b'{"message":"Something is broken"}')

    up = upstream(handler)
    pol = str(tmp_path / "policy.lua")
    sha_a = write(pol, A)
    e = errord(up.url, "--policy", pol)

    slow = Client(e.port)
    slow_id = rid()
    slow.request("GET", "/slow", [("X-Request-Id", slow_id)])
    try:
        assert arrived.wait(5 * SLOW), "the upstream never got /slow"
        sha_b = write(pol, B)
        status, body = reload_admin(e)
        assert status == 200 and body["sha256"] == sha_b, body

        fast_id = rid()
        assert decided_by(get(e.port, "/fast", fast_id)) == "B"
        assert access_by_id(e, fast_id)["policy_sha256"] == sha_b
        assert e.find(type="access", request_id=slow_id) is None  # still in flight
    finally:
        release.set()
    r = slow.response()
    slow.close()
    assert decided_by(r) == "A"
    assert access_by_id(e, slow_id)["policy_sha256"] == sha_a


def test_a_retrying_request_keeps_its_policy_across_a_reload(upstream, errord, tmp_path):
    # A request between two attempts (waiting out its backoff) keeps the
    # policy it started with for its later attempts too.
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")
    wait_ms = int(1000 * SLOW)  # long enough for the reload to happen meanwhile
    retrying = ("local p = {}\n"
                "p.settings = { attempts = 2, budget = false, deadline_ms = 600000 }\n"
                "p[500] = function(req, res)\n"
                "  if req.attempt == 1 then return retry { after = %d, reason = \"again\" } end\n"
                "  return respond { status = 521, headers = { [\"x-policy\"] = \"A\" },\n"
                "                   json = { policy = \"A\" } }\n"
                "end\n"
                "return p\n") % wait_ms
    sha_r = write(pol, retrying)
    e = errord(up.url, "--policy", pol)
    c = Client(e.port)
    request_id = rid()
    c.request("GET", "/retrying", [("X-Request-Id", request_id)])
    try:
        assert wait_until(lambda: len(up.requests) >= 1)
        sha_b = write(pol, B)
        status, body = reload_admin(e)
        assert status == 200 and body["sha256"] == sha_b, body
        r = c.response()
    finally:
        c.close()
    assert decided_by(r) == "A"
    rec = access_by_id(e, request_id)
    assert rec["policy_sha256"] == sha_r
    assert [a.get("verdict") for a in rec["attempts"]] == ["retry", "respond"]
    assert decided_by(get(e.port, "/new")) == "B"


# ---- state that survives a reload ----------------------------------------------------------


def test_count_windows_survive_a_reload(upstream, errord, tmp_path):
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")

    def counting(v):
        return ("local p = {}\n" + FAST +
                "p[500] = function(req, res)\n"
                "  return respond { status = 200, json = { n = errord.count(\"k\", 60), v = %d } }\n"
                "end\n"
                "return p\n") % v

    write(pol, counting(1))
    e = errord(up.url, "--policy", pol)
    assert [get(e.port, "/c%d" % i).json() for i in range(3)] == \
        [{"n": 1, "v": 1}, {"n": 2, "v": 1}, {"n": 3, "v": 1}]
    write(pol, counting(2))
    status, body = reload_admin(e)
    assert status == 200 and body["result"] == "reloaded", body
    assert get(e.port, "/c3").json() == {"n": 4, "v": 2}
    e.send_signal(signal.SIGHUP)  # an unchanged reload changes nothing either
    assert wait_until(lambda: policy_state(e)["reloads"]["unchanged"] == 1)
    assert get(e.port, "/c4").json() == {"n": 5, "v": 2}


def test_firing_alerts_survive_a_reload(upstream, errord, tmp_path):
    up = upstream_500(upstream)
    pol = str(tmp_path / "policy.lua")

    def alerting(v):
        return ("local p = {}\n" + FAST +
                "p[500] = function(req, res)\n"
                "  alert { name = \"Boom\", severity = \"warning\", summary = \"upstream 500\" }\n"
                "  return respond { status = 200, json = { v = %d } }\n"
                "end\n"
                "return p\n") % v

    def firing():
        status, body = e.admin("/alerts")
        assert status == 200, body
        return {a["name"]: a for a in body["alerts"]}

    write(pol, alerting(1))
    e = errord(up.url, "--policy", pol)
    assert get(e.port, "/1").json() == {"v": 1}
    assert wait_until(lambda: "Boom" in firing())
    before = firing()["Boom"]
    assert before["state"] == "firing" and before["count"] == 1

    write(pol, alerting(2))
    status, body = reload_admin(e)
    assert status == 200 and body["result"] == "reloaded", body
    after = firing()
    assert "Boom" in after, after
    assert after["Boom"]["count"] == 1
    assert after["Boom"]["first_seen"] == before["first_seen"]

    assert get(e.port, "/2").json() == {"v": 2}
    assert wait_until(lambda: firing()["Boom"]["count"] == 2)
    assert firing()["Boom"]["first_seen"] == before["first_seen"]
