"""install.sh and uninstall.sh, staged into tmp_path with --root: the host is
never touched (no apt-get, no user, no chown, no systemctl: those are printed
as "would: ..."). The tree is checked file by file."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "install.sh"
UNINSTALL = ROOT / "uninstall.sh"

# path in the staged tree -> (mode, source in the repository or None for a directory)
EXPECTED = {
    "opt/gate-agent": (0o755, None),
    "etc/systemd/system/gate-agent.service": (0o644, "systemd/gate-agent.service"),
    "etc/systemd/system/gate-agent-console.service": (0o644, "systemd/gate-agent-console.service"),
    "usr/lib/sysusers.d/gate-agent.conf": (0o644, "systemd/gate-agent.sysusers.conf"),
    "usr/lib/tmpfiles.d/gate-agent.conf": (0o644, "systemd/gate-agent.tmpfiles.conf"),
    "usr/share/gate-agent/profiles/pi4-relay4.toml": (0o644, "hardware/profiles/pi4-relay4.toml"),
    "usr/share/gate-agent/profiles/pi-opto.toml": (0o644, "hardware/profiles/pi-opto.toml"),
    "usr/share/gate-agent/agent.toml.example": (0o644, "examples/agent.toml"),
    "usr/share/doc/gate-agent/configuration.md": (0o644, "docs/configuration.md"),
    "usr/share/doc/gate-agent/console.md": (0o644, "docs/console.md"),
    "etc/udev/rules.d/99-gate-reader.rules": (0o644, "hardware/99-gate-reader.rules"),
    "etc/gate-agent": (0o750, None),
    "etc/gate-agent/agent.toml": (0o640, "examples/agent.toml"),
    "var/lib/gate-agent": (0o700, None),
    "usr/local/bin": (0o755, None),
}
# path in the staged tree -> where the symbolic link points
LINKS = {"usr/local/bin/gate-agent": "/opt/gate-agent/venv/bin/gate-agent"}


def run(script: Path, *args: str) -> subprocess.CompletedProcess:
    # PATH without sudo tricks; a non-root user may stage too.
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60, check=False)


def install(stage: Path, *extra: str) -> subprocess.CompletedProcess:
    res = run(INSTALL, "--root", str(stage), "--no-build", *extra)
    assert res.returncode == 0, res.stderr + res.stdout
    return res


def snapshot(stage: Path) -> dict[str, tuple]:
    """Every path with its mode, size, mtime and content: what a rerun must not change."""
    out = {}
    for p in sorted(stage.rglob("*")):
        st = p.lstat()
        content = p.read_bytes() if p.is_file() else None
        out[str(p.relative_to(stage))] = (stat.S_IMODE(st.st_mode), st.st_mtime_ns, content)
    return out


@pytest.fixture
def stage(tmp_path: Path) -> Path:
    return tmp_path / "stage"


def test_staged_install_puts_every_file_with_its_mode(stage):
    res = install(stage)
    for rel, (mode, source) in EXPECTED.items():
        path = stage / rel
        assert path.exists(), f"{rel} missing; output:\n{res.stdout}"
        assert stat.S_IMODE(path.stat().st_mode) == mode, f"{rel}: mode {oct(path.stat().st_mode)}"
        if source is not None:
            assert path.read_bytes() == (ROOT / source).read_bytes(), rel
        else:
            assert path.is_dir(), rel
    # Nothing else but the parents of those paths.
    parents = {str(Path(rel).parents[i]) for rel in EXPECTED for i in range(len(Path(rel).parents) - 1)}
    for rel, target in LINKS.items():
        assert os.readlink(stage / rel) == target, rel
    extra = [str(p.relative_to(stage)) for p in stage.rglob("*")
             if str(p.relative_to(stage)) not in EXPECTED | LINKS and str(p.relative_to(stage)) not in parents]
    assert extra == []


def test_staging_records_what_it_would_do_on_the_host_instead_of_doing_it(stage):
    out = install(stage).stdout
    would = [line for line in out.splitlines() if line.startswith("would: ")]
    assert any("sysusers" in w and "gate-agent" in w for w in would)
    assert any(w == "would: chown gate-agent:gate-agent /var/lib/gate-agent" for w in would)
    assert any(w == "would: chown root:gate-agent /etc/gate-agent/agent.toml" for w in would)
    assert any("systemctl" in w and "enable gate-agent" in w for w in would)
    # Owned by whoever ran the staging, never chowned to a user the host may not have.
    assert (stage / "var/lib/gate-agent").stat().st_uid == os.getuid()


def test_the_unit_runs_the_installed_venv_with_the_installed_config(stage):
    install(stage)
    unit = (stage / "etc/systemd/system/gate-agent.service").read_text()
    assert "ExecStart=/opt/gate-agent/venv/bin/gate-agent run --config /etc/gate-agent/agent.toml" in unit
    assert "User=gate-agent" in unit and "StateDirectory=gate-agent" in unit


def test_a_second_run_changes_nothing_and_keeps_an_edited_config(stage):
    install(stage)
    config = stage / "etc/gate-agent/agent.toml"
    config.write_text('[site]\nid = "school-17"\ngate = "main-1"\n')
    config.chmod(0o640)
    before = snapshot(stage)
    res = install(stage)
    assert "kept /etc/gate-agent/agent.toml" in res.stdout
    assert "installed" not in res.stdout and "created" not in res.stdout
    assert snapshot(stage) == before


def test_an_upgrade_replaces_a_changed_unit_but_not_the_config(stage):
    install(stage)
    unit = stage / "etc/systemd/system/gate-agent.service"
    unit.write_text("[Service]\nExecStart=/bin/false\n")
    (stage / "var/lib/gate-agent/journal.db").write_bytes(b"events")
    install(stage)
    assert unit.read_bytes() == (ROOT / "systemd/gate-agent.service").read_bytes()
    assert (stage / "var/lib/gate-agent/journal.db").read_bytes() == b"events"


def test_a_mode_loosened_by_hand_is_tightened_again(stage):
    install(stage)
    (stage / "var/lib/gate-agent").chmod(0o755)
    install(stage)
    assert stat.S_IMODE((stage / "var/lib/gate-agent").stat().st_mode) == 0o700


def test_the_installed_config_tells_what_to_fill_in_and_its_defaults_are_the_real_ones(stage, tmp_path):
    """The default config parses, says [site] is missing, and every default it
    shows (commented) is the default the schema applies."""
    from agent.config import ConfigError, load_config, parse_config, schema

    install(stage)
    installed = stage / "etc/gate-agent/agent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(installed)
    assert [p for p, _ in info.value.errors] == ["site"]

    # Uncomment the "key = value" lines of the main sections: the result must
    # equal the schema's defaults.
    text = installed.read_text()
    uncommented, section = [], None
    for line in text.splitlines():
        if line.startswith("["):
            section = line
            uncommented.append(line)
        elif line.startswith("#") and "=" in line and section in (
                "[gate]", "[hardware]", "[journal]", "[service]") and not line.startswith("#["):
            body = line[1:].split(" #", 1)[0].strip()
            if not body.startswith(("name", "type", "format", "port", "baudrate", "repeat", "address",
                                    "scbk")):
                uncommented.append(body)
    doc = tomllib.loads("\n".join(uncommented))
    defaults = schema()["properties"]
    for sec in ("gate", "hardware", "journal", "service"):
        for key, value in doc[sec].items():
            assert defaults[sec]["properties"][key].get("default") == value, f"{sec}.{key}"
    doc["site"] = {"id": "s", "gate": "g"}
    doc["hardware"]["pin_factory"] = "mock"
    parse_config(doc, base_dir=tmp_path)


def test_uninstall_keeps_journal_and_config_unless_purged(stage):
    install(stage)
    (stage / "var/lib/gate-agent/journal.db").write_bytes(b"events")
    res = run(UNINSTALL, "--root", str(stage))
    assert res.returncode == 0, res.stderr
    for rel in ("opt/gate-agent", "etc/systemd/system/gate-agent.service",
                "etc/systemd/system/gate-agent-console.service", "usr/lib/sysusers.d/gate-agent.conf",
                "usr/lib/tmpfiles.d/gate-agent.conf", "usr/share/gate-agent"):
        assert not (stage / rel).exists(), rel
    assert not (stage / "usr/local/bin/gate-agent").is_symlink()
    assert (stage / "var/lib/gate-agent/journal.db").read_bytes() == b"events"
    assert (stage / "etc/gate-agent/agent.toml").exists()
    assert "would: systemctl disable --now gate-agent" in res.stdout

    res = run(UNINSTALL, "--root", str(stage), "--purge")
    assert res.returncode == 0, res.stderr
    assert not (stage / "var/lib/gate-agent").exists() and not (stage / "etc/gate-agent").exists()
    assert "would: userdel gate-agent" in res.stdout


def test_uninstall_keeps_a_udev_rule_edited_by_the_technician(stage):
    install(stage)
    rule = stage / "etc/udev/rules.d/99-gate-reader.rules"
    rule.write_text('SUBSYSTEM=="tty", KERNEL=="ttyUSB0", SYMLINK+="gate-reader"\n')
    assert run(UNINSTALL, "--root", str(stage)).returncode == 0
    assert rule.exists()
    install(stage)  # and a reinstall keeps it too
    assert "ttyUSB0" in rule.read_text()


def test_bad_options_say_what_is_allowed():
    res = run(INSTALL, "--frobnicate")
    assert res.returncode == 2 and "--help" in res.stderr
    res = run(UNINSTALL, "--root")
    assert res.returncode == 2 and "needs a directory" in res.stderr


@pytest.mark.parametrize("script", [INSTALL, UNINSTALL], ids=["install", "uninstall"])
def test_help_prints_the_whole_header_and_no_code(script):
    # The header is the comment block after the #! line, up to the first line of code.
    header = []
    for line in script.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line[2:] if line.startswith("# ") else line[1:])
    res = run(script, "--help")
    assert res.returncode == 0, res.stderr
    assert header and res.stdout.startswith("\n".join(header) + "\n"), res.stdout
    assert "set -euo pipefail" not in res.stdout
    for option in ("--root", "-h/--help"):
        assert option in res.stdout


@pytest.mark.soak
@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the compiled fastpath")
def test_a_full_staged_build_gives_a_venv_with_the_compiled_fastpath(stage, tmp_path):
    """Builds the agent from the repository (pip, Cython, gcc; needs PyPI): slow."""
    res = run(INSTALL, "--root", str(stage))
    if res.returncode != 0 and "network" in res.stderr:
        pytest.skip(f"no package index reachable: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-2000:]
    python = stage / "opt/gate-agent/venv/bin/python"
    out = subprocess.run([str(python), "-c", "import fastpath; print(fastpath.IMPLEMENTATION)"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False)
    assert out.stdout.strip() == "compiled", out.stderr
    assert (stage / "opt/gate-agent/venv/bin/gate-agent").exists()
    assert sys.version_info >= (3, 11)
