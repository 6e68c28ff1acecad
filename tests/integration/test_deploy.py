"""errord as a service and a package: what systemd hears from it
(Type=notify), what `make install` lays out, the systemd unit (verified and
scored by systemd-analyze), errord without privileges, the man page, luacheck
on the shipped policies, and the container and Kubernetes examples."""

import json
import os
import re
import signal
import socket
import subprocess
import tempfile

import pytest

from support import ERRORD, ROOT, SLOW, Client, response, wait_until


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


# ---- make install, and the systemd unit ---------------------------------------------------

def make_env():
    """The environment without what a surrounding make passes down (make asan
    runs the tests with BUILD and OPT set for its own build)."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """errord installed by `make install PREFIX=<a temporary directory>`,
    built in a directory of its own."""
    top = tmp_path_factory.mktemp("install")
    prefix = top / "inst"
    r = subprocess.run(["make", "-s", "-j2", "install", "BUILD=%s" % (top / "build"),
                        "PREFIX=%s" % prefix], cwd=ROOT, env=make_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout
    return prefix


def test_make_install_lays_out_errord(installed):
    files = sorted(str(p.relative_to(installed)) for p in installed.rglob("*") if p.is_file())
    examples = sorted("share/errord/examples/" + name
                      for name in os.listdir(os.path.join(ROOT, "lua", "examples")))
    assert files == sorted(["bin/errord", "lib/systemd/system/errord.service",
                            "share/errord/default.lua", "share/errord/errord.env",
                            "share/errord/luacheckrc", "share/man/man8/errord.8"] + examples)
    assert os.access(installed / "bin" / "errord", os.X_OK)
    unit = (installed / "lib" / "systemd" / "system" / "errord.service").read_text()
    assert "ExecStart=%s/bin/errord\n" % installed in unit
    # Without --policy, the installed binary runs the installed default policy.
    proc = subprocess.Popen([str(installed / "bin" / "errord"), "--upstream", "http://127.0.0.1:9",
                             "--listen", "127.0.0.1:0", "--admin", "off"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        started = json.loads(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10 * SLOW)
    assert started["msg"] == "errord started", started
    assert started["policy"] == str(installed / "share" / "errord" / "default.lua")
    assert proc.returncode == 0


def test_the_installed_unit_passes_systemd_analyze_verify(installed):
    unit = installed / "lib" / "systemd" / "system" / "errord.service"
    # verify also checks that ExecStart is there and that man:errord(8) opens
    r = subprocess.run(["systemd-analyze", "verify", str(unit)],
                       env=dict(os.environ, MANPATH=str(installed / "share" / "man")),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "")


def test_the_unit_runs_errord_unprivileged_and_hardened(installed):
    unit = installed / "lib" / "systemd" / "system" / "errord.service"
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
    checks = {line.split()[1]: line[0] for line in r.stdout.splitlines()
              if line[:1] in ("✓", "✗") and len(line.split()) > 1}
    for setting in ("User=/DynamicUser=", "NoNewPrivileges=", "ProtectSystem=",
                    "ProtectHome=", "CapabilityBoundingSet=~CAP_SYS_ADMIN", "PrivateDevices=",
                    "RestrictSUIDSGID="):
        assert checks.get(setting) == "✓", (setting, r.stdout)
    level = re.search(r"Overall exposure level for errord.service: ([\d.]+) (\w+)", r.stdout)
    assert level and float(level.group(1)) < 2.0, r.stdout  # systemd calls it "OK"


def test_the_unit_reads_the_environment_file_errord_ships(installed):
    """The README copies deploy/errord.env to /etc/errord/errord.env: the
    unit reads it from there, and every variable in it, set or commented
    out, is one errord reads."""
    unit = (installed / "lib" / "systemd" / "system" / "errord.service").read_text()
    assert "EnvironmentFile=-/etc/errord/errord.env" in unit.splitlines()
    helptext = subprocess.run([ERRORD, "--help"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True).stdout
    known = set(re.findall(r"ERRORD_[A-Z_]+", helptext))
    shipped = (installed / "share" / "errord" / "errord.env").read_text()
    named = re.findall(r"^#?(ERRORD_[A-Z_]+)=", shipped, re.M)
    assert "ERRORD_UPSTREAM" in named and set(named) <= known, set(named) - known


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_errord_needs_no_privileges(upstream):
    """As the service's dynamic user would: no capabilities, no groups, a uid
    of nobody's; it starts, proxies, reloads and stops as usual."""
    up = upstream(lambda req: response(200, b"served"))
    with tempfile.TemporaryDirectory(prefix="errord-nobody-") as d:  # pytest's are 0700
        os.chmod(d, 0o755)
        pol = os.path.join(d, "policy.lua")
        with open(pol, "w") as f:
            f.write("return { [500] = function() return pass() end }\n")
        os.chmod(pol, 0o644)
        run_as_nobody(up, pol)


def run_as_nobody(up, pol):
    proc = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
                             ERRORD, "--upstream", up.url, "--listen", "127.0.0.1:0",
                             "--admin", "off", "--policy", pol],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        started = json.loads(proc.stdout.readline())
        assert started["msg"] == "errord started", started
        with open("/proc/%d/status" % proc.pid) as f:
            status = f.read()
        assert re.search(r"^Uid:\s+65534\s+65534", status, re.M), status
        assert re.search(r"^CapEff:\s+0+$", status, re.M), status
        host, port = started["listen"].rsplit(":", 1)
        c = Client(int(port))
        assert c.get("/x").body == b"served"
        c.close()
        with open(pol, "a") as f:
            f.write("-- changed\n")
        proc.send_signal(signal.SIGHUP)
        records = [json.loads(proc.stdout.readline()) for _ in range(2)]  # access, reload
        assert records[1]["msg"] == "policy reloaded", records
    finally:
        proc.terminate()
        proc.wait(10 * SLOW)
    assert proc.returncode == 0


# ---- the man page -------------------------------------------------------------------------------

def test_the_man_page_renders_without_warnings_and_names_every_flag():
    page = os.path.join(ROOT, "docs", "errord.8")
    r = subprocess.run(["man", "--warnings", "-l", page], env=dict(os.environ, MANWIDTH="80",
                       LC_ALL="C.UTF-8"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    text = re.sub(r"\s+", " ", r.stdout.replace("\u2010", "-"))
    help_text = subprocess.run([ERRORD, "--help"], stdout=subprocess.PIPE, text=True).stdout
    flags = set(re.findall(r"^\s+(--[a-z-]+)", help_text, re.M))
    envs = set(re.findall(r"\benv (ERRORD_[A-Z_]+)", help_text))
    assert len(flags) > 20 and len(envs) == len(flags)
    missing = sorted(x for x in flags | envs if x not in text)
    assert not missing, missing
    for command in ("errord check", "errord test", "errord replay", "SIGHUP", "/healthz",
                    "/readyz", "/metrics", "/reload", "NOTIFY_SOCKET"):
        assert command in text, command


# ---- luacheck -------------------------------------------------------------------------------

SHIPPED = [os.path.join("lua", "default.lua")] + sorted(
    os.path.join("lua", "examples", name) for name in os.listdir(os.path.join(ROOT, "lua", "examples")))


def luacheck(*paths, cwd=ROOT):
    return subprocess.run(["luacheck", "--no-color", "--config", os.path.join(ROOT, ".luacheckrc"),
                           *paths], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=60)


def test_luacheck_passes_the_shipped_policies():
    r = luacheck(*SHIPPED)
    assert r.returncode == 0, r.stdout
    assert "0 warnings / 0 errors in %d files" % len(SHIPPED) in r.stdout, r.stdout


def test_luacheckrc_knows_what_the_sandbox_offers_and_flags_what_it_does_not(
        upstream, errord, tmp_path):
    """The names a policy can reach, listed by a policy running in errord,
    pass luacheck; the ways out of the sandbox, and a misspelt verdict, do
    not."""
    pol = tmp_path / "list.lua"
    pol.write_text("""
local p = {}
p[500] = function(req, res)
  local names = {}
  for k, v in pairs(_G) do
    names[#names + 1] = k
    if type(v) == "table" and k ~= "_G" then
      for f, w in pairs(v) do
        names[#names + 1] = k .. "." .. f
        if type(w) == "table" then
          for g in pairs(w) do names[#names + 1] = k .. "." .. f .. "." .. g end
        end
      end
    end
  end
  table.sort(names)
  return respond { status = 200, body = table.concat(names, "\\n") }
end
return p
""")
    up = upstream(lambda req: response(500, b"x"))
    e = errord(up.url, "--policy", str(pol))
    names = Client(e.port).get("/").body.decode().split("\n")
    assert "pass" in names and "errord.json.decode" in names and "string.format" in names
    assert "io" not in names and "string.dump" not in names
    offered = tmp_path / "offered.lua"
    offered.write_text("".join("local _ = %s\n" % name for name in names))
    r = luacheck(str(offered))
    assert r.returncode == 0, r.stdout

    ways_out = ["io.open", "require", "dofile", "loadfile", "collectgarbage", "debug.getinfo",
                "package.loadlib", "string.dump", "os.getenv", "os.execute", "os.exit",
                "retrry", "errord.sleep"]
    outside = tmp_path / "outside.lua"
    outside.write_text("".join("local _ = %s\n" % name for name in ways_out))
    r = luacheck(str(outside))
    warned = {int(n) for n in re.findall(r"outside\.lua:(\d+):\d+: accessing undefined", r.stdout)}
    assert warned == set(range(1, len(ways_out) + 1)), r.stdout


# ---- the container image and the Kubernetes example -------------------------------------------

DOCKERFILE = os.path.join(ROOT, "deploy", "Dockerfile")
KUBERNETES = os.path.join(ROOT, "deploy", "kubernetes.yaml")


def dockerfile_instructions():
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    with open(DOCKERFILE) as f:
        text = re.sub(r"\\\n", " ", f.read())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def test_dockerfile_builds_from_the_tree_and_runs_unprivileged_with_a_health_check():
    steps = dockerfile_instructions()
    stages = [args for op, args in steps if op == "FROM"]
    assert all(s.startswith("debian:12") for s in stages), stages
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    # what it copies from the build context exists, so the build can start
    for op, args in steps:
        if op == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert os.path.exists(os.path.join(ROOT, src)), src
    # the build runs the project's own setup and install
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "scripts/setup --build" in runs and "make install PREFIX=/usr" in runs
    # not root
    user = [args for op, args in final if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root"), user
    # the health check asks the admin port errord listens on
    env = " ".join(args for op, args in final if op == "ENV")
    admin_port = re.search(r"ERRORD_ADMIN=[\d.]+:(\d+)", env).group(1)
    check = [args for op, args in final if op == "HEALTHCHECK"]
    assert check and "http://127.0.0.1:%s/healthz" % admin_port in check[0], check
    assert [args for op, args in final if op == "ENTRYPOINT"] == ['["/usr/bin/errord"]']


def library_packages(binary):
    """The Debian packages that own the shared libraries `binary` loads."""
    out = subprocess.run(["ldd", binary], stdout=subprocess.PIPE, text=True, check=True).stdout
    packages = {}
    for path in re.findall(r"=> (/\S+)", out):
        owner = subprocess.run(["dpkg", "-S", os.path.realpath(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        if owner.returncode != 0:
            owner = subprocess.run(["dpkg", "-S", path], stdout=subprocess.PIPE, text=True)
        packages[owner.stdout.split(":")[0]] = path
    return packages


def test_the_image_installs_every_library_errord_links_against():
    binary = ERRORD
    with open(binary, "rb") as f:
        if f.read(4) != b"\x7fELF":  # a wrapper (make valgrind's) runs the build's
            binary = os.path.join(ROOT, "build", "errord")
    packages = library_packages(binary)
    # A sanitizer build (make asan) also loads the sanitizer runtimes and
    # what they need; the image's build has no sanitizers.
    for name, path in list(packages.items()):
        if re.match(r"lib(asan|ubsan|lsan|tsan)\d", name):
            for dep in library_packages(path):
                packages.pop(dep, None)
            packages.pop(name, None)
    packages.pop("libc6", None)  # in every Debian image
    steps = dockerfile_instructions()
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    installed = set(" ".join(args for op, args in final if op == "RUN").split())
    assert packages and set(packages) <= installed, set(packages) - installed


def k8s_documents():
    yaml = pytest.importorskip("yaml")
    with open(KUBERNETES) as f:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(f)}


def test_the_kubernetes_policy_passes_errord_check(tmp_path):
    docs = k8s_documents()
    pol = tmp_path / "policy.lua"
    pol.write_text(docs["ConfigMap"]["data"]["policy.lua"])
    r = subprocess.run([ERRORD, "check", str(pol)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
    assert luacheck(str(pol)).returncode == 0


def test_the_kubernetes_sidecar_is_wired_to_what_errord_answers(upstream, errord, tmp_path):
    docs = k8s_documents()
    pod = docs["Deployment"]["spec"]["template"]
    side = next(c for c in pod["spec"]["containers"] if c["name"] == "errord")
    # its flags are errord's
    help_text = subprocess.run([ERRORD, "--help"], stdout=subprocess.PIPE, text=True).stdout
    for arg in side["args"]:
        if arg.startswith("--"):
            assert re.search(r"^\s+%s\b" % re.escape(arg), help_text, re.M), arg
    # the policy comes from the ConfigMap, mounted as a directory (a subPath
    # mount never sees an update)
    policy = side["args"][side["args"].index("--policy") + 1]
    mount = next(m for m in side["volumeMounts"] if policy.startswith(m["mountPath"] + "/"))
    assert "subPath" not in mount and "--watch" in side["args"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert os.path.basename(policy) in docs["ConfigMap"]["data"]
    # probes and scraping go to the admin port, on routes errord answers 200
    port = next(p["containerPort"] for p in side["ports"] if p["name"] == "admin")
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    with open(DOCKERFILE) as f:
        assert "ERRORD_ADMIN=0.0.0.0:%d" % port in f.read()
    up = upstream(lambda req: response(200, b"ok"))
    e = errord(up.url)
    for path in (side["livenessProbe"]["httpGet"]["path"], side["readinessProbe"]["httpGet"]["path"],
                 annotations["prometheus.io/path"]):
        assert e.admin(path)[0] == 200, path
