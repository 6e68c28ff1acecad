"""errord's offline tools (SPEC §1): `errord check`, `errord test` and
`errord replay`, run as the real binary in a subprocess.

check and test are fed policies written into pytest's tmp_path and the case
files in tests/reload/; replay is fed a real access log, recorded by running
errord with lua/default.lua in front of the bundled mock API."""

import glob
import hashlib
import json
import os
import re
import subprocess
import threading
import uuid

import pytest

from support import ERRORD, ROOT, SLOW, Client, Errord, closed_port

DEFAULT_POLICY = os.path.join(ROOT, "lua", "default.lua")
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "lua", "examples", "*.lua")) +
                  glob.glob(os.path.join(ROOT, "examples", "*.lua")))
FIXTURES = os.path.join(ROOT, "tests", "reload")
CASES_POLICY = os.path.join(FIXTURES, "cases_policy.lua")


# ---- helpers ------------------------------------------------------------------------


def run(*args, cwd=None, timeout=30.0):
    """Runs `errord ARGS...`; returns (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERRORD_")}
    p = subprocess.run([ERRORD, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout * SLOW)
    return p.returncode, p.stdout, p.stderr


def policy(tmp_path, text, name="policy.lua"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def line_of(text, marker, nth=1):
    """The 1-based line of the nth line of `text` containing `marker`."""
    found = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    assert len(found) >= nth, "%r not %d times in %r" % (marker, nth, text)
    return found[nth - 1]


def problems(stderr, path):
    """The problem lines of a failed check, and the count its last line gives."""
    lines = stderr.splitlines()
    assert lines, "nothing on stderr"
    m = re.match(r"^errord: %s: (\d+) problems?$" % re.escape(path), lines[-1])
    assert m, "no summary line: %r" % stderr
    return lines[:-1], int(m.group(1))


def check_fails(tmp_path, text, n_problems=1):
    """Runs `errord check` on a policy that must fail; returns (path, its
    problem lines), each checked to be "PATH:LINE: message"."""
    path = policy(tmp_path, text)
    rc, out, err = run("check", path)
    assert rc == 1, (rc, out, err)
    assert out == ""
    lines, n = problems(err, path)
    assert n == len(lines) == n_problems, err
    return path, lines


def sha12(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def count_handlers(text):
    return len(re.findall(r'^p(?:\[(?:\d{3}|"\dxx")\]|\.(?:default|error))\s*=', text, re.M))


def names_of_tests(text):
    """The names of the tests in a policy's p.tests, in order."""
    tests = text[text.index("p.tests = {"):] if "p.tests = {" in text else ""
    return re.findall(r'(?<!alert )\{\s*name\s*=\s*"([^"]*)"', tests)



# ---- errord check: good policies ------------------------------------------------------


@pytest.mark.parametrize("path", [DEFAULT_POLICY] + EXAMPLES,
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_check_accepts_the_bundled_policies(path):
    rel = os.path.relpath(path, ROOT)
    rc, out, err = run("check", rel, cwd=ROOT)
    assert rc == 0, (out, err)
    assert err == ""
    with open(path) as f:
        text = f.read()
    m = re.match(r"^errord: (\S+) is ok: (\d+) handlers?, (\d+) tests? passed, sha256 ([0-9a-f]{12})\n$",
                 out)
    assert m, out
    assert m.group(1) == rel
    assert int(m.group(2)) == count_handlers(text)
    assert int(m.group(3)) == len(names_of_tests(text)) > 0
    assert m.group(4) == sha12(path)


def test_check_of_a_policy_without_tests(tmp_path):
    path = policy(tmp_path, "local p = {}\np[500] = function(req, res) return retry {} end\n"
                            "p.error = function(req, err) end\nreturn p\n")
    rc, out, err = run("check", path)
    assert rc == 0, err
    assert out == "errord: %s is ok: 2 handlers, 0 tests passed, sha256 %s\n" % (path, sha12(path))


def test_check_of_a_missing_file(tmp_path):
    path = str(tmp_path / "nope.lua")
    rc, out, err = run("check", path)
    assert rc == 1
    assert path in err and out == ""


# ---- errord check: every problem, with its line ------------------------------------------


def test_check_reports_a_syntax_error_with_its_line(tmp_path):
    text = ("local p = {}\n"
            "p[500] = function(req, res)\n"
            "  return retry { reason = \"x\"\n"
            "end\n"
            "return p\n")
    path, lines = check_fails(tmp_path, text)
    assert lines[0].startswith("%s:%d: " % (path, line_of(text, "end"))), lines


def test_check_reports_a_runtime_error_in_the_chunk(tmp_path):
    text = ("local p = {}\n"
            "local t = nil\n"
            "p[500] = t.handler\n"
            "return p\n")
    path, lines = check_fails(tmp_path, text)
    assert lines[0].startswith("%s:3: " % path), lines
    assert "attempt to index a nil value" in lines[0]


def test_check_reports_a_chunk_that_does_not_return_a_table(tmp_path):
    path, lines = check_fails(tmp_path, "local p = {}\nreturn 42\n")
    assert lines[0].startswith(path + ":"), lines
    assert "must return a table" in lines[0] and "number" in lines[0]


def test_check_reports_a_status_key_written_as_a_string(tmp_path):
    text = ("local p = {}\n"
            "p[\"403\"] = function(req, res) return pass() end\n"
            "return p\n")
    path, lines = check_fails(tmp_path, text)
    assert lines[0].startswith("%s:2: " % path), lines
    assert "write [403]" in lines[0]


def test_check_reports_a_handler_that_is_not_a_function(tmp_path):
    text = ("local p = {}\n"
            "p[404] = function(req, res) end\n"
            "p[500] = \"retry\"\n"
            "return p\n")
    path, lines = check_fails(tmp_path, text)
    assert lines == ["%s:3: handler [500] must be a function, not a string" % path]


def test_check_reports_every_setting_out_of_range_with_its_line(tmp_path):
    text = ("local p = {}\n"
            "p.settings = {\n"
            "  attempts = 99,\n"
            "  backoff = { base_ms = -5, max_ms = 5000 },\n"
            "  deadline_ms = \"soon\",\n"
            "  body_limit = -1,\n"
            "  limits = { time_ms = 0 },\n"
            "}\n"
            "p[500] = function(req, res) return retry {} end\n"
            "return p\n")
    path, lines = check_fails(tmp_path, text, n_problems=5)
    expected = {
        (line_of(text, "attempts ="), "settings.attempts"),
        (line_of(text, "base_ms"), "settings.backoff.base_ms"),
        (line_of(text, "deadline_ms"), "settings.deadline_ms"),
        (line_of(text, "body_limit"), "settings.body_limit"),
        (line_of(text, "time_ms"), "settings.limits.time_ms"),
    }
    got = set()
    for line in lines:
        m = re.match(r"^%s:(\d+): (settings\.[a-z_.]+) must be" % re.escape(path), line)
        assert m, line
        got.add((int(m.group(1)), m.group(2)))
    assert got == expected, lines


def test_check_counts_an_unknown_key_as_a_problem(tmp_path):
    text = ("local p = {}\n"
            "p[500] = function(req, res) return retry {} end\n"
            "p.defualt = function(req, res) return pass() end\n"
            "return p\n")
    path, lines = check_fails(tmp_path, text)
    assert lines[0].startswith("%s:3: warning: unknown key 'defualt' ignored" % path), lines


def test_check_reports_errors_and_warnings_together(tmp_path):
    text = ("local p = {}\n"
            "p.settings = { atempts = 3 }\n"
            "p[500] = 5\n"
            "p.defualt = function(req, res) return pass() end\n"
            "return p\n")
    path, lines = check_fails(tmp_path, text, n_problems=3)
    assert "%s:3: handler [500] must be a function, not a number" % path in lines
    assert any(l.startswith("%s:2: warning: " % path) and "atempts" in l for l in lines), lines
    assert any(l.startswith("%s:4: warning: unknown key 'defualt'" % path) for l in lines), lines


def test_check_reports_a_handler_that_returns_a_string_in_its_tests(tmp_path):
    text = ("local p = {}\n"
            "p[500] = function(req, res) return \"retry\" end\n"
            "p.tests = {\n"
            "  { name = \"500 is retried\",\n"
            "    res = { status = 500 }, expect = { verdict = \"retry\" } },\n"
            "}\n"
            "return p\n")
    path, lines = check_fails(tmp_path, text)
    assert lines[0].startswith('%s:4: test "500 is retried" failed: ' % path), lines
    assert "handler returned a string, not a verdict" in lines[0]


def test_check_reports_every_failing_test_at_the_line_of_its_name(tmp_path):
    text = ("local p = {}\n"
            "p[500] = function(req, res) return retry { reason = \"server_error\" } end\n"
            "p[404] = function(req, res) return pass() end\n"
            "p.tests = {\n"
            "  { name = \"404 passes\", res = { status = 404 }, expect = { verdict = \"pass\" } },\n"
            "  {\n"
            "    name = \"500 passes\",\n"
            "    res = { status = 500 },\n"
            "    expect = { verdict = \"pass\" },\n"
            "  },\n"
            "  {\n"
            "    name = \"404 is answered 410\",\n"
            "    res = { status = 404 },\n"
            "    expect = { verdict = \"respond\", status = 410 },\n"
            "  },\n"
            "}\n"
            "return p\n")
    path, lines = check_fails(tmp_path, text, n_problems=2)
    assert lines[0] == '%s:7: test "500 passes" failed: expected verdict pass, got retry' % path
    assert lines[1].startswith('%s:12: test "404 is answered 410" failed: ' % path), lines


def test_check_reports_a_setting_at_its_own_line_when_the_name_is_used_earlier(tmp_path):
    text = ("local p = {}\n"
            "p[500] = function(req, res)\n"
            "  local attempts = req.attempt\n"
            "  if attempts > 1 then return pass() end\n"
            "  return retry {}\n"
            "end\n"
            "p.settings = {\n"
            "  attempts = 99,\n"
            "}\n"
            "return p\n")
    path, lines = check_fails(tmp_path, text)
    assert lines[0].startswith("%s:8: settings.attempts" % path), lines


def test_check_reports_a_failing_test_at_its_name_when_the_name_appears_earlier(tmp_path):
    text = ("local p = {}\n"
            "p[500] = function(req, res)\n"
            "  log { msg = \"500 passes\" }\n"
            "  return retry {}\n"
            "end\n"
            "p.tests = {\n"
            "  { name = \"500 passes\",\n"
            "    res = { status = 500 }, expect = { verdict = \"pass\" } },\n"
            "}\n"
            "return p\n")
    path, lines = check_fails(tmp_path, text)
    assert lines[0].startswith('%s:7: test "500 passes" failed' % path), lines


def test_check_reports_two_failing_tests_of_the_same_name_at_their_own_lines(tmp_path):
    text = ("local p = {}\n"
            "p[500] = function(req, res) return retry {} end\n"
            "p.tests = {\n"
            "  { name = \"500 passes\",\n"
            "    res = { status = 500 }, expect = { verdict = \"pass\" } },\n"
            "  { name = \"500 passes\",\n"
            "    res = { status = 500 }, expect = { verdict = \"pass\" } },\n"
            "}\n"
            "return p\n")
    path, lines = check_fails(tmp_path, text, n_problems=2)
    assert [l.split(": test")[0] for l in lines] == ["%s:4" % path, "%s:6" % path], lines


# ---- errord test ------------------------------------------------------------------------


def report(out):
    """(case lines as (ok, name, why), passed, failed) of an `errord test` report."""
    lines = out.splitlines()
    m = re.match(r"^(\d+) passed, (\d+) failed$", lines[-1])
    assert m, out
    cases = []
    for line in lines[:-1]:
        ok = re.match(r"^ok    (.+)$", line)
        fail = re.match(r"^FAIL  (.+?): (.+)$", line)
        assert ok or fail, line
        cases.append((True, ok.group(1), None) if ok else (False, fail.group(1), fail.group(2)))
    return cases, int(m.group(1)), int(m.group(2))


def test_test_runs_the_policys_own_tests():
    rc, out, err = run("test", DEFAULT_POLICY)
    assert rc == 0, (out, err)
    with open(DEFAULT_POLICY) as f:
        names = names_of_tests(f.read())
    cases, passed, failed = report(out)
    assert cases == [(True, n, None) for n in names]
    assert (passed, failed) == (len(names), 0)


def test_test_runs_a_passing_case_file():
    path = os.path.join(FIXTURES, "cases_pass.json")
    with open(path) as f:
        names = [c["name"] for c in json.load(f)]
    rc, out, err = run("test", CASES_POLICY, path)
    assert rc == 0, (out, err)
    cases, passed, failed = report(out)
    assert cases == [(True, n, None) for n in names]
    assert (passed, failed) == (len(names), 0)


def test_test_reports_each_failing_case_and_exits_1():
    rc, out, err = run("test", CASES_POLICY, os.path.join(FIXTURES, "cases_fail.json"))
    assert rc == 1, (out, err)
    cases, passed, failed = report(out)
    assert (passed, failed) == (1, 5)
    by_name = {name: (ok, why) for ok, name, why in cases}
    assert by_name["right one"] == (True, None)
    assert by_name["wrong verdict"][0] is False
    assert "pass" in by_name["wrong verdict"][1] and "retry" in by_name["wrong verdict"][1]
    assert "502" in by_name["wrong status"][1] and "503" in by_name["wrong status"][1]
    assert "connect" in by_name["wrong reason"][1] and "reset" in by_name["wrong reason"][1]
    assert "Many500" in by_name["missing alert"][1]
    assert by_name["unexpected alert"][0] is False
    assert [name for _, name, _ in cases] == ["wrong verdict", "right one", "wrong status",
                                              "wrong reason", "missing alert", "unexpected alert"]


def test_test_fails_a_case_with_an_unknown_key():
    rc, out, err = run("test", CASES_POLICY, os.path.join(FIXTURES, "cases_unknown_key.json"))
    assert rc == 1, (out, err)
    cases, passed, failed = report(out)
    assert (passed, failed) == (1, 1)
    assert cases[0] == (True, "fine", None)
    assert cases[1][:2] == (False, "misspelt expect")
    assert "exepct" in cases[1][2]


def test_test_rejects_a_case_file_that_is_not_a_list():
    path = os.path.join(FIXTURES, "cases_not_a_list.json")
    rc, out, err = run("test", CASES_POLICY, path)
    assert rc == 1, (out, err)
    assert path in err and "array" in err
    assert report(out)[1:] == (0, 0)


def test_test_rejects_a_case_file_that_is_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"name": "x", "res": {"status": 500}')
    rc, out, err = run("test", CASES_POLICY, str(path))
    assert rc == 1, (out, err)
    assert str(path) in err
    rc, out, err = run("test", CASES_POLICY, str(tmp_path / "missing.json"))
    assert rc == 1 and str(tmp_path / "missing.json") in err


def test_test_reports_the_policys_own_failing_tests(tmp_path):
    text = ("local p = {}\n"
            "p[500] = function(req, res) return pass() end\n"
            "p.tests = {\n"
            "  { name = \"500 passes\", res = { status = 500 }, expect = { verdict = \"pass\" } },\n"
            "  { name = \"500 retries\",\n"
            "    res = { status = 500 }, expect = { verdict = \"retry\" } },\n"
            "}\n"
            "return p\n")
    path = policy(tmp_path, text)
    rc, out, err = run("test", path)
    assert rc == 1
    cases, passed, failed = report(out)
    assert cases[0] == (True, "500 passes", None)
    assert cases[1][:2] == (False, "500 retries")
    assert (passed, failed) == (1, 1)
    assert '%s:5: test "500 retries" failed' % path in err


def test_test_of_a_policy_that_does_not_load(tmp_path):
    path = policy(tmp_path, "local p = {}\np[500] = 1\nreturn p\n")
    rc, out, err = run("test", path)
    assert rc == 1
    assert "%s:2: " % path in err


# ---- errord replay -----------------------------------------------------------------------

# Statuses lua/default.lua has a handler for, and the error kinds it is asked about.
DEFAULT_HANDLES = {400, 401, 403, 404, 422, 500, 502, 504}
ERROR_KINDS = {"connect", "timeout", "reset", "protocol"}
SECRET_AUTH = "Bearer s3cret-" + uuid.uuid4().hex
SECRET_KEY = "k3y-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def recording(mock_api, tmp_path_factory):
    """A real access log: errord with lua/default.lua in front of the mock
    API, then in front of a closed port; every stdout line of both runs."""
    log = tmp_path_factory.mktemp("replay") / "access.jsonl"
    e = Errord(mock_api, "--policy", DEFAULT_POLICY)
    auth = [("Authorization", SECRET_AUTH), ("X-Api-Key", SECRET_KEY)]
    failures = []

    def client(paths):
        # One client per group of routes: each route's requests go one after
        # the other, so the log has them in the order they were decided.
        c = Client(e.port)
        try:
            for method, path in paths:
                body = b'{"name": ' if method == "POST" else None
                c.request(method, path, auth, body)
                if c.response(method) is None:
                    failures.append(path)
                    c.close()
                    c = Client(e.port)
        finally:
            c.close()

    key = uuid.uuid4().hex
    groups = [
        [("GET", "/flaky?p=0.5")] * 14 +
        [("GET", "/flaky?fail=1&key=%s-%d" % (key, i)) for i in range(3)],
        [("GET", "/status/403"), ("GET", "/status/403"), ("GET", "/status/500"),
         ("GET", "/v1/forbidden"), ("GET", "/v1/secure")],
        [("GET", "/v1/items"), ("GET", "/v1/items/2"), ("GET", "/v1/items/9"),
         ("GET", "/v1/updates"), ("POST", "/v1/items"), ("GET", "/status/400")],
    ]
    try:
        threads = [threading.Thread(target=client, args=(g,), daemon=True) for g in groups]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60 * SLOW)
        assert not any(t.is_alive() for t in threads)
        n_requests = sum(len(g) for g in groups)
        e.wait_access(n_requests, timeout=10)
    finally:
        e.stop()
    assert failures == []

    # connection failures: what the error handler decides
    down = Errord("http://127.0.0.1:%d" % closed_port(), "--policy", DEFAULT_POLICY)
    try:
        c = Client(down.port)
        try:
            assert c.get("/down", [("X-Api-Key", SECRET_KEY)]).status == 502
        finally:
            c.close()
        down.wait_access(1)
    finally:
        down.stop()

    with open(str(log), "w") as f:
        f.writelines(e.lines + down.lines)
    records = [json.loads(line) for line in e.lines + down.lines
               if line.strip() and json.loads(line).get("type") == "access"]
    assert len(records) == n_requests + 1
    return str(log), records, e.lines + down.lines


def decisions(records):
    """Every recorded attempt a default-policy handler decided, as
    (record, attempt number, what, verdict in words)."""
    out = []
    for rec in records:
        for n, a in enumerate(rec["attempts"], 1):
            what = a.get("status", a.get("error"))
            if what not in DEFAULT_HANDLES and what not in ERROR_KINDS:
                continue
            words = a["verdict"] + (" (%s)" % a["reason"] if a.get("reason") else "")
            out.append((rec, n, str(what), words))
    return out


def summary_line(out):
    m = re.search(r"^(\d+) transactions, (\d+) decisions, (\d+) differ from (.+); "
                  r"(\d+) responses no handler looked at$", out, re.M)
    assert m, out
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4), int(m.group(5))


def decision_lines(out):
    return [l for l in out.splitlines() if re.match(r"^\S+ [A-Z]+ \S+ #\d+ \S+: ", l)]


def test_the_recording_has_what_replay_needs(recording):
    _, records, _ = recording
    whats = {str(w) for _, _, w, _ in decisions(records)}
    # retried 5xx, the request limit, a refusal, client errors, connection errors
    assert {"403", "404", "401", "400", "422", "connect"} <= whats, whats
    assert whats & {"500", "502", "504"}
    assert any(words.startswith("retry") for _, _, w, words in decisions(records)
               if w in ("500", "502", "504"))


def test_replay_with_the_recording_policy_decides_as_recorded(recording):
    log, records, lines = recording
    rc, out, err = run("replay", DEFAULT_POLICY, log)
    assert rc == 0, (out, err)
    expected = ["%s %s %s #%d %s: recorded %s, replayed %s" %
                (rec["request_id"], rec["method"], rec["path"], n, what, words, words)
                for rec, n, what, words in decisions(records)]
    assert decision_lines(out) == expected
    assert "differs" not in out
    n_attempts = sum(len(r["attempts"]) for r in records)
    assert summary_line(out) == (len(records), len(expected), 0, "the recording",
                                 n_attempts - len(expected))
    # errord's own records on the same stdout are passed over without a word
    own = [l for l in lines if l.strip() and json.loads(l).get("type") != "access"]
    assert own and all({"time", "level"} <= set(json.loads(l)) for l in own)
    assert "not access records" not in out, out


def test_replay_against_the_old_policy_shows_only_what_differs(recording, tmp_path):
    log, records, _ = recording
    with open(DEFAULT_POLICY) as f:
        text = f.read()
    assert text.rstrip().endswith("return p")
    # the new policy passes every 5xx on
    new = policy(tmp_path, text.rstrip()[:-len("return p")] +
                 "p[500] = function(req, res) return pass() end\n"
                 "p[502] = p[500]\n"
                 "p[504] = p[500]\n"
                 "p.tests = nil\n"
                 "return p\n", name="no_5xx_retries.lua")
    rc, out, err = run("replay", new, log, "--against", DEFAULT_POLICY)
    assert rc == 0, (out, err)
    expected = ["%s %s %s #%d %s: old %s, new pass  <- differs" %
                (rec["request_id"], rec["method"], rec["path"], n, what, words)
                for rec, n, what, words in decisions(records)
                if what in ("500", "502", "504") and words != "pass"]
    assert expected
    assert decision_lines(out) == expected
    n_attempts = sum(len(r["attempts"]) for r in records)
    n_decisions = len(decisions(records))
    assert summary_line(out) == (len(records), n_decisions, len(expected), DEFAULT_POLICY,
                                 n_attempts - n_decisions)

    # --against=OLD is the same
    rc, out2, _ = run("replay", new, log, "--against=" + DEFAULT_POLICY)
    assert rc == 0 and out2 == out


def test_replay_of_two_policies_that_decide_alike(recording, tmp_path):
    log, records, _ = recording
    with open(DEFAULT_POLICY) as f:
        same = policy(tmp_path, "-- a copy\n" + f.read(), name="copy.lua")
    rc, out, err = run("replay", same, log, "--against", DEFAULT_POLICY)
    assert rc == 0, (out, err)
    assert decision_lines(out) == []
    assert "the two policies decide every recorded response alike" in out
    assert summary_line(out)[2] == 0



def test_replay_marks_decisions_on_responses_no_handler_saw(recording, tmp_path):
    # The recording has no headers or body for a response no handler looked
    # at (a 204 here): a policy that now handles it is told so.
    log, records, _ = recording
    new = policy(tmp_path, "local p = {}\n"
                           "p[204] = function(req, res) return respond { status = 200 } end\n"
                           "return p\n", name="handles_204.lua")
    rc, out, err = run("replay", new, log)
    assert rc == 0, (out, err)
    updates = [r for r in records if r["path"] == "/v1/updates"]
    assert len(updates) == 1 and updates[0]["attempts"][0]["status"] == 204
    line = ("%s GET /v1/updates #1 204: recorded pass, replayed respond 200  <- differs"
            "  (status only: no headers or body were recorded)" % updates[0]["request_id"])
    assert line in decision_lines(out), out

def test_secret_request_headers_never_reach_the_access_log(recording):
    _, records, lines = recording
    text = "".join(lines)
    assert SECRET_AUTH not in text and SECRET_AUTH.split()[1] not in text
    assert SECRET_KEY not in text
    seen = [r for r in records if "req_headers" in r]
    assert seen, "no record shows the request headers a handler saw"
    for rec in seen:
        assert rec["req_headers"].get("x-api-key") == "[redacted]", rec
        if rec["path"] != "/down":
            assert rec["req_headers"].get("authorization") == "[redacted]", rec


def test_replay_skips_lines_that_are_not_access_records(recording, tmp_path):
    _, records, _ = recording
    rec = next(r for r in records if any(a.get("status") == 404 for a in r["attempts"]))
    log = tmp_path / "mixed.jsonl"
    log.write_text("not json at all\n" + json.dumps({"time": "2026-01-01T00:00:00.000Z", "level": "info", "msg": "hello"}) + "\n"
                   "\n" + json.dumps(rec) + "\n" + "[1, 2, 3]\n")
    rc, out, err = run("replay", DEFAULT_POLICY, str(log))
    assert rc == 0, (out, err)
    assert summary_line(out)[:3] == (1, 1, 0)
    # the errord record and the empty line are not counted
    assert re.search(r"^2 lines were not access records$", out, re.M), out


@pytest.mark.parametrize("args", [
    ("replay",),
    ("replay", "lua/default.lua"),
    ("replay", "lua/default.lua", "a.jsonl", "b.jsonl"),
    ("check",),
    ("check", "lua/default.lua", "extra"),
    ("test",),
    ("test", "lua/default.lua", "a.json", "b.json"),
])
def test_bad_usage_exits_2(args):
    rc, out, err = run(*args, cwd=ROOT)
    assert rc == 2, (out, err)
    assert "usage" in err and out == ""


def test_replay_of_a_missing_log_or_a_broken_policy_exits_1(recording, tmp_path):
    log, _, _ = recording
    rc, out, err = run("replay", DEFAULT_POLICY, str(tmp_path / "none.jsonl"))
    assert rc == 1 and str(tmp_path / "none.jsonl") in err
    broken = policy(tmp_path, "local p = {}\np[500] = 1\nreturn p\n")
    rc, out, err = run("replay", broken, log)
    assert rc == 1 and "%s:2: " % broken in err
    rc, out, err = run("replay", DEFAULT_POLICY, log, "--against", broken)
    assert rc == 1 and "%s:2: " % broken in err
