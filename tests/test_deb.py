"""The Debian package (debian/, `make deb`, docs/packaging.md).

The first tests are quick and run in the default suite: the unit's answer to a
config the agent refuses, the version and the pinned requirements agreeing with
pyproject.toml, the venv relocation, the maintainer scripts' syntax, install.sh
refusing a board the package owns.

The tests marked `deb` (`make test-deb`; minutes, root, network to Debian and
PyPI) build two revisions of the package for each architecture in
GATE_DEB_ARCHES (default "amd64 arm64"; arm64's is built inside an emulated
root) and try them in fresh Debian 12 roots of that architecture, copies of
the pristine root scripts/debian-root.sh caches (arm64 under qemu-user-static;
there a stand-in python3-lgpio, as Debian 12 has none): `apt-get install ./…deb`
resolves from Debian; the installed agent runs as its user; the unit passes
`systemd-analyze verify --root`; an upgrade keeps the journal, the state and the
edited config; `apt-get remove` keeps them and `purge` deletes them; a board
installed with install.sh moves to the package; lintian passes. systemd does
not run in a chroot: /run/systemd/system and stand-ins for systemctl and
deb-systemd-invoke (which record their calls) let the maintainer scripts take
the path they take on a board, so what they start, restart and stop is checked.
"""
from __future__ import annotations

import base64
import csv
import gettext
import hashlib
import io
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEBIAN = ROOT / "debian"
CACHE = ROOT / ".cache" / "deb"
UNIT = ROOT / "systemd" / "gate-agent.service"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The documented way to upgrade a fleet board (docs/packaging.md): an edited
# config is kept without a question, the new example lands beside it.
KEEP_CONFIG = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
MOCK_CONFIG = """
[site]
id = "school-17"
gate = "main-1"
"""


# --------------------------------------------------------------------------- quick tests


def unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1].strip() for line in UNIT.read_text().splitlines()
            if line.startswith(f"{key}=")]


def test_the_unit_gives_up_restarting_only_on_a_config_the_agent_refuses(tmp_path):
    """A board installed before it is provisioned (the package's example config
    names no gate) must not restart the agent every second forever: the agent
    exits EXIT_CONFIG there, and the unit does not restart on that code, and on
    no other (a crash, the watchdog: Restart=always)."""
    from agent.service import EXIT_CONFIG, EXIT_FAILED

    assert unit_values("Restart") == ["always"]
    assert unit_values("RestartPreventExitStatus") == [str(EXIT_CONFIG)]
    assert EXIT_FAILED != EXIT_CONFIG
    config = tmp_path / "agent.toml"
    shutil.copy(ROOT / "examples" / "agent.toml", config)
    res = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert res.returncode == EXIT_CONFIG, res.stderr[-2000:]
    assert "site" in res.stderr


def changelog_version() -> str:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    m = re.match(r"gate-agent \(([^)]+)\) ", first)
    assert m, first
    return m.group(1)


def test_the_package_version_is_pyprojects_with_a_debian_revision():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    upstream, _, revision = changelog_version().rpartition("-")
    assert upstream == project["version"], "add an entry to debian/changelog for the new version"
    assert re.fullmatch(r"\d[\w.+~]*", revision)
    import agent

    assert agent.__version__ == project["version"]


def pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from a requirements file with --hash lines."""
    text = path.read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req, *opts = line.split()
        name, version = req.split("==")
        out[name] = (version, [o.removeprefix("--hash=sha256:") for o in opts])
    return out


def test_the_lock_pins_every_dependency_of_pyproject_with_hashes():
    """A dependency added to pyproject.toml without running
    debian/lock_requirements.py would be missing on the board."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = pins(DEBIAN / "requirements.txt")
    build = pins(DEBIAN / "requirements-build.txt")
    wanted = [(runtime, r) for r in project["project"]["dependencies"]
              + project["project"]["optional-dependencies"]["osdp"]]
    wanted += [(build, r) for r in project["build-system"]["requires"]]
    for locked, spec in wanted:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in locked, f"{name} is not pinned: run .venv/bin/python debian/lock_requirements.py"
        version, hashes = locked[name]
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} is not {req.specifier}"
    for locked in (runtime, build):
        for name, (version, hashes) in locked.items():
            assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_relocation_rewrites_every_build_path_and_refuses_a_leftover(tmp_path):
    staged = tmp_path / "debian" / "gate-agent" / "opt" / "gate-agent" / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(staged)], check=True, timeout=60)
    site = next(staged.glob("lib/python3*/site-packages"))
    script = staged / "bin" / "gate-agent"
    script.write_text(f"#!{staged}/bin/python\nfrom agent.cli import main\nmain()\n")
    info = site / "gate_agent-0.1.0.dist-info"
    info.mkdir()
    (info / "direct_url.json").write_text(json.dumps({"url": f"file://{tmp_path}/dist/x.whl"}))
    rows = [["../../../bin/gate-agent", record_hash(script.read_bytes()), str(script.stat().st_size)],
            ["gate_agent-0.1.0.dist-info/direct_url.json", "", ""],
            ["gate_agent-0.1.0.dist-info/RECORD", "", ""]]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    (info / "RECORD").write_text(buf.getvalue())
    relocate = [sys.executable, str(DEBIAN / "relocate_venv.py"), str(staged), "/opt/gate-agent/venv",
                "--system-site-packages", "--forbid", str(tmp_path)]

    res = subprocess.run(relocate, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert script.read_text().splitlines()[0] == "#!/opt/gate-agent/venv/bin/python"
    assert str(staged) not in (staged / "bin" / "activate").read_text()
    assert not (info / "direct_url.json").exists()
    record = list(csv.reader(io.StringIO((info / "RECORD").read_text())))
    assert ["../../../bin/gate-agent", record_hash(script.read_bytes()), str(len(script.read_bytes()))] in record
    assert not any(r[0].endswith("direct_url.json") for r in record)
    cfg = (staged / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg and str(tmp_path) not in cfg

    # A file that names the build tree (the source or the staging path) fails the build.
    (site / "leak.pth").write_text(f"{tmp_path}/src\n")
    res = subprocess.run(relocate, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1 and "leak.pth" in res.stderr


def test_the_maintainer_scripts_are_posix_sh_and_hand_over_to_debhelper():
    for name in ("preinst", "postinst", "prerm", "postrm"):
        script = DEBIAN / f"gate-agent.{name}"
        text = script.read_text()
        assert text.startswith("#!/bin/sh\n") and "\nset -e\n" in text, name
        assert text.count("#DEBHELPER#") == 1, name
        res = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False)
        assert res.returncode == 0, res.stderr


def fake_dpkg_status(root: Path, state: str) -> None:
    admin = root / "var" / "lib" / "dpkg"
    (admin / "info").mkdir(parents=True, exist_ok=True)
    (admin / "status").write_text(
        f"Package: gate-agent\nStatus: install ok {state}\nPriority: optional\nSection: misc\n"
        "Maintainer: m <m@example.org>\nArchitecture: amd64\nVersion: 0.1.0-1\nDescription: x\n\n")


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="dpkg-query is needed (Debian)")
def test_install_sh_refuses_a_board_where_the_package_is_installed(tmp_path):
    stage = tmp_path / "stage"
    fake_dpkg_status(stage, "installed")
    res = subprocess.run(["bash", str(ROOT / "install.sh"), "--root", str(stage), "--no-build"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1 and "apt" in res.stderr, res.stderr + res.stdout
    assert not (stage / "opt" / "gate-agent").exists()
    # Removed but not purged (config-files): a source install may go on.
    fake_dpkg_status(stage, "config-files")
    res = subprocess.run(["bash", str(ROOT / "install.sh"), "--root", str(stage), "--no-build"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- the package in a root

def deb(test):
    """Marker `deb`, and time for the builds: an emulated arm64 build of two
    revisions takes many minutes, counted against the first test that needs it."""
    return pytest.mark.timeout(5400)(pytest.mark.deb(test))


def need_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("the package tests make chroots: run them as root (make test-deb)")
    if not Path("/etc/debian_version").exists():
        pytest.skip("the package tests need a Debian machine")


def sh(*cmd: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kw)


ARCHES = os.environ.get("GATE_DEB_ARCHES", "amd64 arm64").split()
HOST_ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                           check=False).stdout.strip() or "amd64"
ROOT_TOOL = ROOT / "scripts" / "debian-root.sh"


def pristine_root(arch: str) -> Path:
    """A Debian 12 minbase root of ARCH, made once and cached by
    scripts/debian-root.sh (arm64 runs under qemu-user-static)."""
    res = sh(str(ROOT_TOOL), "ensure", arch, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    return Path(res.stdout.strip().splitlines()[-1])


LGPIO_STAND_IN = """Package: python3-lgpio
Version: 0.0~stand-in
Architecture: {arch}
Maintainer: gate-agent tests <tests@invalid>
Description: stand-in for Raspberry Pi OS's python3-lgpio (tests only)
 Debian 12 has no python3-lgpio; Raspberry Pi OS's archive has it. The
 package's arm64 install test runs in a plain Debian root, so this empty
 package satisfies the dependency there. The agent runs on mock pins.
"""


def lgpio_stand_in(arch: str, where: Path) -> Path:
    """An empty python3-lgpio .deb for ARCH (dpkg-deb, nothing else)."""
    tree = where / f"lgpio-{arch}"
    (tree / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (tree / "DEBIAN" / "control").write_text(LGPIO_STAND_IN.format(arch=arch))
    out = where / f"python3-lgpio_0.0~stand-in_{arch}.deb"
    res = sh("dpkg-deb", "--root-owner-group", "--build", str(tree), str(out))
    assert res.returncode == 0, res.stderr
    return out


STUB = """#!/bin/sh
# Stand-in for {name} in a chroot where systemd does not run: records the call;
# what works on files alone (systemctl preset, enable, ...) is passed on.
echo "{name} $*" >> /var/log/gate-agent-test-calls
case "$1" in
  is-active|is-failed) exit 3 ;;
  start|stop|restart|try-restart|reload|daemon-reload|daemon-reexec|reset-failed) exit 0 ;;
esac
[ {name} = systemctl ] && exec /usr/bin/systemctl "$@"
exit 0
"""


class DebianRoot:
    """A fresh Debian 12 root from the cached tarball, /proc mounted."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel.lstrip("/")

    def run(self, *cmd: str, stdin: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        env = ["/usr/bin/env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive",
               "HOME=/root"]
        return subprocess.run(["chroot", str(self.path), *env, *cmd], capture_output=True, text=True,
                              input=stdin if stdin is not None else "", timeout=timeout, check=False)

    def ok(self, *cmd: str, **kw) -> str:
        res = self.run(*cmd, **kw)
        assert res.returncode == 0, f"{cmd}: {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        return res.stdout + res.stderr

    def apt(self, *args: str) -> subprocess.CompletedProcess:
        # apt runs dpkg with its own PATH (DPkg::Path): give it ours, stand-ins first.
        return self.run("apt-get", "-o", f"DPkg::Path={PATH}", *args)

    def apt_install(self, deb: Path, *opts: str) -> subprocess.CompletedProcess:
        shutil.copy(deb, self / "tmp")
        return self.apt("install", "-y", "-q", *opts, f"/tmp/{deb.name}")

    def calls(self) -> list[str]:
        log = self / "var/log/gate-agent-test-calls"
        return log.read_text().splitlines() if log.exists() else []

    def fake_systemd(self) -> None:
        """What a running systemd looks like to maintainer scripts."""
        (self / "run/systemd/system").mkdir(parents=True, exist_ok=True)
        for name in ("systemctl", "deb-systemd-invoke"):
            stub = self / f"usr/local/sbin/{name}"
            stub.write_text(STUB.format(name=name))
            stub.chmod(0o755)

    def tree_digest(self, rel: str) -> dict[str, str]:
        base = self / rel
        return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(base.rglob("*")) if p.is_file()}

    def stat(self, rel: str) -> tuple[str, str, str]:
        out = self.ok("stat", "-c", "%a %U %G", rel).split()
        return out[0], out[1], out[2]


@pytest.fixture(scope="module", params=ARCHES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def roots(arch, tmp_path_factory):
    """Fresh roots of ARCH: copies of the cached pristine one, set up as a board
    is (recommends installed, the archive's lists fetched; on arm64 the
    python3-lgpio stand-in installed, as Raspberry Pi OS's archive provides it)."""
    need_root_tools()
    CACHE.mkdir(parents=True, exist_ok=True)
    pristine = pristine_root(arch)
    made: list[DebianRoot] = []

    def make() -> DebianRoot:
        path = tmp_path_factory.mktemp(f"debian-root-{arch}")
        res = sh("cp", "-a", "--reflink=auto", f"{pristine}/.", str(path))
        assert res.returncode == 0, res.stderr
        # debian-root.sh's build setting; a board installs recommends.
        (path / "etc/apt/apt.conf.d/90debian-root").unlink(missing_ok=True)
        (path / "etc/resolv.conf").unlink(missing_ok=True)
        shutil.copy("/etc/resolv.conf", path / "etc/resolv.conf")
        assert sh("mount", "-t", "proc", "proc", str(path / "proc")).returncode == 0
        root = DebianRoot(path)
        made.append(root)
        root.ok("apt-get", "update", "-qq")
        if arch != "amd64":
            stand_in = lgpio_stand_in(arch, path.parent)
            shutil.copy(stand_in, root / "tmp")
            root.ok("dpkg", "-i", f"/tmp/{stand_in.name}")
        return root

    yield make
    for root in made:
        sh("umount", "-l", str(root / "proc"))
        sh("rm", "-rf", "--one-file-system", str(root.path))


@pytest.fixture(scope="module")
def debs(arch, tmp_path_factory):
    """Two revisions of the package for ARCH (arm64's built inside the emulated
    root): 1~test1 from this checkout, 1~test2 from a copy whose example config
    gained a line (as a release that changes it)."""
    need_root_tools()
    out = tmp_path_factory.mktemp(f"debs-{arch}")
    # The copy's make-deb.sh uses this checkout's cached roots, not a new cache of its own.
    env = {**os.environ, "GATE_DEB_CACHE": str(CACHE), "GATE_DEB_OUT": str(out),
           "DEBIAN_ROOT_CACHE": str(ROOT / ".cache" / "roots")}
    build = [str(DEBIAN / "make-deb.sh"), "--arch", arch, "--revision", "1~test1", "--no-lintian"]
    res = sh(*build, env=env, timeout=3600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    tree = tmp_path_factory.mktemp("tree")
    files = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout
    for rel in filter(None, files.split("\0")):
        src, dst = ROOT / rel, tree / rel
        if src.exists() or src.is_symlink():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst, follow_symlinks=False)
    with open(tree / "examples/agent.toml", "a") as f:
        f.write("\n# A line the next release added to the example.\n")
    build[0] = str(tree / "debian/make-deb.sh")
    build[4] = "1~test2"
    res = sh(*build, env=env, timeout=3600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    upstream = changelog_version().rpartition("-")[0]
    found = {rev: out / f"gate-agent_{upstream}-{rev}_{arch}.deb" for rev in ("1~test1", "1~test2")}
    for path in found.values():
        assert path.exists(), sorted(out.iterdir())
    return found


@pytest.fixture(scope="module")
def board(roots):
    root = roots()
    root.fake_systemd()
    return root


def run_agent_until_ready(root: DebianRoot, timeout: float = 120) -> str:
    """`gate-agent run` as the service user (mock pins, offline), stopped with
    SIGTERM once ready; returns its log. chroot, env and setpriv exec, so the
    child's pid is the agent's."""
    cmd = ["chroot", str(root.path), "/usr/bin/env", "-i", f"PATH={PATH}", "LANG=C.UTF-8",
           "setpriv", "--reuid=gate-agent", "--regid=gate-agent", "--init-groups",
           "gate-agent", "run", "--config", "/etc/gate-agent/agent.toml"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
    log, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    break
                log.append(line)
                if " ready: " in line:
                    proc.send_signal(signal.SIGTERM)
                    rest, _ = proc.communicate(timeout=60)
                    log.append(rest)
                    assert proc.returncode == 0, "".join(log)
                    return "".join(log)
        raise AssertionError("the agent did not get ready:\n" + "".join(log))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def journal_stats(root: DebianRoot) -> dict:
    """`gate-agent journal stats --json` inside the root (the installed tool)."""
    res = root.run("gate-agent", "journal", "stats", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@deb
def test_1_apt_installs_the_package_from_debian_and_lays_out_the_board(board, debs):
    res = board.apt_install(debs["1~test1"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    out = res.stdout + res.stderr
    # Dependencies and recommendations came from Debian.
    for pkg in ("python3.11", "systemd", "mosquitto-clients", "sqlite3"):
        assert board.run("dpkg-query", "-W", "-f", "${db:Status-Status}", pkg).stdout == "installed", pkg
    # The example config names no gate: enabled, not started, and told why.
    assert "not started" in out and "gate-agent check-config /etc/gate-agent/agent.toml" in out
    assert not [c for c in board.calls() if "gate-agent" in c and re.search(r"\b(start|restart)\b", c)]
    assert (board / "etc/systemd/system/multi-user.target.wants/gate-agent.service").is_symlink()

    assert board.ok("getent", "group", "gpio")
    groups = board.ok("id", "-nG", "gate-agent").split()
    assert {"gate-agent", "gpio", "dialout"} <= set(groups)
    assert board.stat("/etc/gate-agent") == ("750", "root", "gate-agent")
    assert board.stat("/etc/gate-agent/agent.toml") == ("640", "root", "gate-agent")
    assert board.stat("/var/lib/gate-agent") == ("700", "gate-agent", "gate-agent")
    assert (board / "etc/gate-agent/agent.toml").read_bytes() == (ROOT / "examples/agent.toml").read_bytes()
    assert "/etc/gate-agent/agent.toml" in (board / "var/lib/dpkg/info/gate-agent.conffiles").read_text()
    for rel in ("usr/share/gate-agent/profiles/pi4-relay4.toml", "usr/share/gate-agent/agent.toml.example",
                "lib/udev/rules.d/99-gate-reader.rules", "usr/lib/sysusers.d/gate-agent.conf",
                "usr/lib/tmpfiles.d/gate-agent.conf", "usr/share/doc/gate-agent/configuration.md",
                "usr/share/doc/gate-agent/examples/mosquitto/gate-broker.conf",
                "usr/share/doc/gate-agent/examples/mosquitto/site-broker.conf",
                "usr/share/doc/gate-agent/examples/mosquitto/site-bridge-acl.conf",
                "usr/share/doc/gate-agent/examples/mosquitto/gate_acl.c", "usr/share/man/man1/gate-agent.1.gz"):
        assert (board / rel).exists(), rel
    assert not (board / "etc/mosquitto").exists()  # the broker's files are examples only

    assert "check-config" in board.ok("gate-agent", "--help")
    res = board.run("gate-agent", "check-config", "/etc/gate-agent/agent.toml")
    assert res.returncode == 2 and "site" in res.stdout + res.stderr
    impl = board.ok("env", "GATE_REQUIRE_COMPILED=1", "/opt/gate-agent/venv/bin/python", "-c",
                    "import fastpath; print(fastpath.IMPLEMENTATION, fastpath._compiled.__file__)")
    assert impl.split()[:2] == ["compiled", next(
        str(p).replace(str(board.path), "") for p in (board / "opt/gate-agent/venv").rglob("fastpath/_compiled*.so"))]
    # Byte code compiled at install, checked against the sources' hashes (flags 0b11).
    pyc = next((board / "opt/gate-agent/venv").rglob("agent/__pycache__/cli.cpython-311.pyc"))
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b11
    # The Russian catalogue, compiled by the wheel's build (Babel), is what agent/i18n.py reads.
    po = next((board / "opt/gate-agent/venv").rglob("locale/ru/LC_MESSAGES/gate-agent.po"))
    with po.with_suffix(".mo").open("rb") as f:
        assert gettext.GNUTranslations(f).gettext("no readers configured") != "no readers configured"
    # Nothing names the machine the package was built on.
    leaks = sh("grep", "-rl", "-F", str(ROOT), str(board / "opt/gate-agent"), str(board / "usr/share/gate-agent"))
    assert leaks.stdout == "", leaks.stdout


@deb
def test_2_the_unit_passes_systemd_analyze_verify_against_the_root(board):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    res = sh(tool, "verify", f"--root={board.path}", "/lib/systemd/system/gate-agent.service")
    assert res.returncode == 0, res.stderr
    assert "gate-agent" not in res.stderr, res.stderr


@deb
def test_3_the_installed_agent_runs_as_its_user_with_the_installed_modes(board):
    with open(board / "etc/gate-agent/agent.toml", "a") as f:
        f.write(MOCK_CONFIG)
    text = (board / "etc/gate-agent/agent.toml").read_text()
    (board / "etc/gate-agent/agent.toml").write_text(
        text.replace('#pin_factory = "auto"', 'pin_factory = "mock"  #', 1))
    board.ok("gate-agent", "check-config", "/etc/gate-agent/agent.toml")
    log = run_agent_until_ready(board)
    assert "fastpath compiled" in log
    assert board.stat("/var/lib/gate-agent/journal.db") == ("600", "gate-agent", "gate-agent")
    assert journal_stats(board)["last_seq"] > 0


@deb
def test_4_an_upgrade_keeps_journal_state_and_edited_config_and_restarts(board, debs):
    config = (board / "etc/gate-agent/agent.toml").read_bytes()
    state = board.tree_digest("var/lib/gate-agent")
    before = journal_stats(board)

    res = board.apt_install(debs["1~test2"], *KEEP_CONFIG)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert board.ok("dpkg-query", "-W", "-f", "${Version}", "gate-agent").endswith("1~test2")
    assert (board / "etc/gate-agent/agent.toml").read_bytes() == config
    assert "A line the next release added" in (board / "etc/gate-agent/agent.toml.dpkg-dist").read_text()
    assert board.stat("/etc/gate-agent/agent.toml") == ("640", "root", "gate-agent")
    assert board.tree_digest("var/lib/gate-agent") == state
    # The config names the gate now: the new version was restarted.
    assert "deb-systemd-invoke restart gate-agent.service" in board.calls()
    after = journal_stats(board)
    assert (after["journal"], after["last_seq"]) == (before["journal"], before["last_seq"])
    run_agent_until_ready(board)  # the new version goes on with the old journal
    after = journal_stats(board)
    assert after["journal"] == before["journal"] and after["last_seq"] > before["last_seq"]

    # Without those options a changed example stops apt at dpkg's question; with
    # no one to answer it, the package is left unconfigured, and the command
    # docs/packaging.md gives finishes it, config kept.
    res = board.apt_install(debs["1~test1"], "--allow-downgrades")
    assert res.returncode != 0 and "conffile prompt" in res.stdout + res.stderr
    assert board.ok("dpkg-query", "-W", "-f", "${db:Status-Status}", "gate-agent") == "unpacked"
    board.ok("dpkg", "--force-confdef", "--force-confold", "--configure", "-a")
    assert board.ok("dpkg-query", "-W", "-f", "${db:Status-Status}", "gate-agent") == "installed"
    assert (board / "etc/gate-agent/agent.toml").read_bytes() == config


@deb
def test_5_remove_stops_the_agent_and_keeps_journal_state_and_config(board):
    state = board.tree_digest("var/lib/gate-agent")
    config = (board / "etc/gate-agent/agent.toml").read_bytes()
    res = board.apt("remove", "-y", "-q", "gate-agent")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "deb-systemd-invoke stop gate-agent.service" in board.calls()
    assert board.ok("dpkg-query", "-W", "-f", "${db:Status-Status}", "gate-agent") == "config-files"
    for rel in ("opt/gate-agent", "usr/bin/gate-agent", "lib/systemd/system/gate-agent.service",
                "lib/udev/rules.d/99-gate-reader.rules", "usr/share/gate-agent"):
        assert not (board / rel).exists() and not (board / rel).is_symlink(), rel
    assert board.tree_digest("var/lib/gate-agent") == state
    assert (board / "etc/gate-agent/agent.toml").read_bytes() == config


@deb
def test_6_purge_deletes_journal_state_and_config_and_keeps_the_user(board, debs):
    (board / "run/gate-agent").mkdir(parents=True, exist_ok=True)  # the fallback journal's place
    res = board.apt("purge", "-y", "-q", "gate-agent")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rel in ("var/lib/gate-agent", "etc/gate-agent", "run/gate-agent",
                "etc/systemd/system/multi-user.target.wants/gate-agent.service"):
        assert not (board / rel).exists() and not (board / rel).is_symlink(), rel
    assert "gate-agent" not in board.ok("dpkg-statoverride", "--list")
    assert board.run("dpkg-query", "-W", "-f", "${db:Status-Status}", "gate-agent").stdout in ("", "not-installed")
    # Debian leaves system users (a uid may still own files, in a backup say).
    assert board.ok("getent", "passwd", "gate-agent")
    # And a new install over it starts afresh, the kept user reused.
    res = board.apt_install(debs["1~test2"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "A line the next release added" in (board / "etc/gate-agent/agent.toml").read_text()
    assert board.stat("/var/lib/gate-agent") == ("700", "gate-agent", "gate-agent")


@deb
def test_a_board_installed_with_install_sh_moves_to_the_package(roots, debs):
    root = roots()
    res = sh("bash", str(ROOT / "install.sh"), "--root", str(root.path), "--no-build")
    assert res.returncode == 0, res.stderr
    with open(root / "etc/gate-agent/agent.toml", "a") as f:
        f.write(MOCK_CONFIG)
    config = (root / "etc/gate-agent/agent.toml").read_bytes()
    stale = root / "opt/gate-agent/venv/lib/python3.11/site-packages/stale_module.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("# a package install.sh's venv had\n")
    (root / "var/lib/gate-agent/journal.db").write_bytes(b"the journal")

    res = root.apt_install(debs["1~test1"], *KEEP_CONFIG)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert not stale.exists()
    assert not (root / "etc/systemd/system/gate-agent.service").exists()
    assert (root / "etc/systemd/system/gate-agent.service.install-sh").exists()
    assert (root / "etc/gate-agent/agent.toml").read_bytes() == config
    assert (root / "var/lib/gate-agent/journal.db").read_bytes() == b"the journal"
    assert "check-config" in root.ok("gate-agent", "--help")
    # From now on apt upgrades it, not install.sh.
    res = sh("bash", str(ROOT / "install.sh"), "--root", str(root.path), "--no-build")
    assert res.returncode == 1 and "apt" in res.stderr


@deb
def test_lintian_passes_with_every_override_explained(debs):
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (make deb installs it)")
    res = sh("lintian", "--fail-on", "error,warning", str(debs["1~test1"]))
    assert res.returncode == 0, res.stdout + res.stderr
    overrides = (DEBIAN / "gate-agent.lintian-overrides").read_text().split("\n\n")
    for block in overrides[1:]:
        lines = block.strip().splitlines()
        assert lines[0].startswith("#"), f"an override without its reason: {lines}"
    res = sh("lintian", "-L", ">=info", str(debs["1~test1"]))
    unused = [line for line in res.stdout.splitlines() if "unused-override" in line
              # Only while debian/changelog has one entry; the test builds add a second.
              and "initial-upload-closes-no-bugs" not in line]
    assert unused == [], unused


@deb
def test_the_build_is_reproducible_but_for_its_version(debs, tmp_path):
    """Two builds of one tree differ in the version and the changelog only."""
    trees = []
    for rev in ("1~test1", "1~test2"):
        dest = tmp_path / rev
        assert sh("dpkg-deb", "-x", str(debs[rev]), str(dest)).returncode == 0
        trees.append({str(p.relative_to(dest)): (p.read_bytes() if p.is_file() and not p.is_symlink() else
                                                 os.readlink(p) if p.is_symlink() else None,
                                                 stat.S_IMODE(p.lstat().st_mode))
                      for p in dest.rglob("*")})
    differ = sorted(k for k in trees[0].keys() | trees[1].keys() if trees[0].get(k) != trees[1].get(k))
    # 1~test2's example config has one line more (the tree it was built from).
    assert differ == ["etc/gate-agent/agent.toml", "usr/share/doc/gate-agent/changelog.Debian.gz",
                      "usr/share/gate-agent/agent.toml.example"], differ
