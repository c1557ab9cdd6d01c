"""``gate-agent bundle`` and its first-boot installer: a bundle made offline
(--no-download) is checked file by file, then its firstrun.sh installs into a
staging root from a fake boot partition: the secrets land with their modes in
/etc/gate-agent and are gone from the boot partition."""
from __future__ import annotations

import argparse
import hashlib
import shutil
import stat
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest

from agent.config import load_config
from agent.downlink.signing import generate_keypair
from agent.i18n import set_language
from agent.tools import bundle as bundle_mod
from agent.tools.bundle import add_bundle_parser
from tests.pki import TestCA

ROOT = Path(__file__).resolve().parent.parent
SITE, GATE = "school-17", "main-1"
BOOT_LINE = "console=serial0,115200 console=tty1 root=PARTUUID=1234-02 rootfstype=ext4 fsck.repair=yes rootwait"


@pytest.fixture(autouse=True)
def _english():
    set_language("en")
    yield
    set_language(None)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("region")
    ca = TestCA(folder / "ca")
    ident = ca.issue(f"{SITE}/{GATE}")
    _key, pub = generate_keypair()
    (folder / "region-2026.pub").write_text(pub + "\n")
    template = folder / "region.toml"
    template.write_text((ROOT / "examples" / "agent.toml").read_text())
    return {"ca": ca.cert_path, "cert": ident.cert, "key": ident.key, "pub": folder / "region-2026.pub",
            "pub_b64": pub, "template": template, "ca_obj": ca}


def run_bundle(inputs: dict, out: Path, *extra: str, capsys=None) -> int:
    parser = argparse.ArgumentParser()
    add_bundle_parser(parser.add_subparsers())
    args = parser.parse_args([
        "bundle", "--site", SITE, "--gate", GATE, "--config", str(inputs["template"]),
        "--ca", str(inputs["ca"]), "--cert", str(inputs["cert"]), "--key", str(inputs["key"]),
        "--trusted-keys", f"region-2026={inputs['pub']}", "--broker", "mqtt.region.example:8883",
        "--out", str(out), "--no-download", *extra])
    return args.func(args)


@pytest.fixture(scope="module")
def made(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("made") / "boot"
    assert run_bundle(inputs, out) == 0
    return out


@pytest.fixture
def boot(made, tmp_path):
    """A fake boot partition: the bundle copied onto it, cmdline.txt with the bookworm entry."""
    part = tmp_path / "bootfs"
    shutil.copytree(made, part)
    (part / "cmdline.txt").write_text(BOOT_LINE + (made / "gate-agent" / "cmdline.txt.append").read_text())
    return part


def firstrun(part: Path, stage: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(part / "gate-agent" / "firstrun.sh"), "--root", str(stage), "--no-build"],
                          capture_output=True, text=True, timeout=120, check=False)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# --------------------------------------------------------------------------- the bundle


def test_the_bundle_holds_exactly_what_the_card_needs(made):
    files = sorted(p.relative_to(made).as_posix() for p in made.rglob("*") if p.is_file())
    assert files == sorted([
        "user-data",
        "gate-agent/README.txt",
        "gate-agent/firstrun.sh",
        "gate-agent/cmdline.txt.append",
        "gate-agent/user-data.snippet",
        "gate-agent/MANIFEST.sha256",
        "gate-agent/src/gate-agent-0.1.0.tar.gz",
        "gate-agent/wheels/MISSING.txt",
        "gate-agent/gate/agent.toml",
        "gate-agent/gate/ca.pem",
        "gate-agent/gate/gate.pem",
        "gate-agent/gate/gate.key",
        "gate-agent/gate/keys/region-2026.pub",
    ])


def test_the_gate_files_are_the_given_ones_and_the_key_is_private(made, inputs):
    gate = made / "gate-agent" / "gate"
    assert (gate / "gate.key").read_bytes() == inputs["key"].read_bytes() and mode(gate / "gate.key") == 0o600
    assert (gate / "gate.pem").read_bytes() == inputs["cert"].read_bytes()
    assert (gate / "ca.pem").read_bytes() == inputs["ca"].read_bytes()
    assert (gate / "keys" / "region-2026.pub").read_text().strip() == inputs["pub_b64"]
    assert mode(gate) == 0o700 and mode(made) == 0o700


def test_the_config_carries_the_identity_and_loads_as_it_will_on_the_board(made, inputs):
    path = made / "gate-agent" / "gate" / "agent.toml"
    doc = tomllib.loads(path.read_text())
    assert doc["site"] == {"id": SITE, "gate": GATE}
    assert (doc["mqtt"]["host"], doc["mqtt"]["port"]) == ("mqtt.region.example", 8883)
    # Relative paths: the same file works here and in /etc/gate-agent.
    assert doc["mqtt"]["tls"] == {"ca_file": "ca.pem", "cert_file": "gate.pem", "key_file": "gate.key"}
    assert doc["commands"]["trusted_keys"] == {"region-2026": "./keys/region-2026.pub"}
    cfg = load_config(path)
    assert cfg.commands.trusted_keys == {"region-2026": inputs["pub_b64"]}
    # The rest of the region's template is kept, comments included.
    assert "# --- the local journal of events" in path.read_text()


def test_the_manifest_covers_every_file_with_its_checksum(made):
    ga = made / "gate-agent"
    lines = (ga / "MANIFEST.sha256").read_text().splitlines()
    listed = {}
    for line in lines:
        digest, name = line.split("  ", 1)
        listed[name] = digest
    files = {p.relative_to(ga).as_posix() for p in ga.rglob("*") if p.is_file()} - {"MANIFEST.sha256"}
    assert set(listed) == files
    for name, digest in listed.items():
        assert hashlib.sha256((ga / name).read_bytes()).hexdigest() == digest, name


def test_the_source_archive_holds_the_installer_and_the_agent(made):
    with tarfile.open(made / "gate-agent" / "src" / "gate-agent-0.1.0.tar.gz") as tar:
        names = set(tar.getnames())
    for rel in ("install.sh", "setup.py", "pyproject.toml", "agent/service.py", "fastpath/_pure.py",
                "systemd/gate-agent.service", "examples/agent.toml"):
        assert f"gate-agent-0.1.0/{rel}" in names, rel
    assert not any("__pycache__" in n or n.endswith(".so") for n in names)


def test_the_first_boot_hooks_point_at_the_installer(made):
    ga = made / "gate-agent"
    assert (ga / "firstrun.sh").read_bytes() == (ROOT / "bundle" / "firstrun.sh").read_bytes()
    assert mode(ga / "firstrun.sh") & 0o111
    user_data = (made / "user-data").read_text()
    assert user_data.startswith("#cloud-config\n")
    assert "/boot/firmware/gate-agent/firstrun.sh" in user_data and f"gate-{SITE}-{GATE}" in user_data
    assert "/boot/firmware/gate-agent/firstrun.sh" in (ga / "user-data.snippet").read_text()
    append = (ga / "cmdline.txt.append").read_text()
    assert append.startswith(" ") and "\n" not in append.rstrip("\n")  # one line, appended to cmdline.txt
    assert "systemd.run=/boot/firmware/gate-agent/firstrun.sh" in append


def test_the_readme_says_the_board_needs_network_without_wheels(made):
    readme = (made / "gate-agent" / "README.txt").read_text()
    assert f"{SITE}/{GATE}" in readme and "--no-download" in readme and "doctor" in readme
    assert "firstrun.log" in readme


def test_wheels_that_could_not_be_fetched_are_listed(inputs, tmp_path, monkeypatch, capsys):
    def fake_download(dest, versions):
        (dest / "paho_mqtt-2.1.0-py3-none-any.whl").write_bytes(b"wheel")
        return ["jsonschema-rs (Python 3.13): no matching distribution"]

    monkeypatch.setattr(bundle_mod, "download_wheels", fake_download)
    parser = argparse.ArgumentParser()
    add_bundle_parser(parser.add_subparsers())
    args = parser.parse_args([
        "bundle", "--site", SITE, "--gate", GATE, "--config", str(inputs["template"]), "--ca", str(inputs["ca"]),
        "--cert", str(inputs["cert"]), "--key", str(inputs["key"]), "--trusted-keys", str(inputs["pub"]),
        "--out", str(tmp_path / "b")])
    assert args.func(args) == 1
    missing = (tmp_path / "b" / "gate-agent" / "wheels" / "MISSING.txt").read_text()
    assert "jsonschema-rs" in missing and "jsonschema-rs" in capsys.readouterr().err
    assert "network" in (tmp_path / "b" / "gate-agent" / "README.txt").read_text()


def test_bad_input_makes_no_bundle(inputs, tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    broken.write_text('[gate]\napb = "sometimes"\n')
    other = inputs["ca_obj"].issue("school-17/other")
    cases = [
        ({"template": broken}, "gate.apb"),
        ({"pub": tmp_path / "none.pub"}, "does not exist"),
        ({"key": other.key}, "does not belong"),
    ]
    for change, words in cases:
        out = tmp_path / "out"
        assert run_bundle({**inputs, **change}, out) == 2
        err = capsys.readouterr().err
        assert words in err and "no bundle was made" in err, err
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]  # no half-made folder left


# --------------------------------------------------------------------------- first boot


def test_first_boot_installs_the_gate_files_with_their_modes_and_erases_the_secrets(boot, inputs, tmp_path):
    stage = tmp_path / "stage"
    res = firstrun(boot, stage)
    assert res.returncode == 0, res.stdout + res.stderr
    etc = stage / "etc" / "gate-agent"
    assert mode(etc) == 0o750
    assert mode(etc / "agent.toml") == 0o640
    assert (etc / "gate.key").read_bytes() == inputs["key"].read_bytes() and mode(etc / "gate.key") == 0o600
    assert mode(etc / "gate.pem") == 0o644 and mode(etc / "ca.pem") == 0o644
    assert mode(etc / "keys" / "region-2026.pub") == 0o644
    # Owners, which a staging run cannot set, are what it would set.
    assert "would: chown gate-agent:gate-agent /etc/gate-agent/gate.key" in res.stdout
    assert "would: chown root:gate-agent /etc/gate-agent/agent.toml" in res.stdout
    # The installed config is the one the service will load.
    cfg = load_config(etc / "agent.toml")
    assert (cfg.site, cfg.gate_id) == (SITE, GATE) and cfg.mqtt.tls.key_file == str(etc / "gate.key")
    # No secret is left on the boot partition: not the folder, not the key's bytes, not its checksum.
    assert not (boot / "gate-agent" / "gate").exists()
    key = inputs["key"].read_bytes()
    for p in boot.rglob("*"):
        if p.is_file():
            assert key not in p.read_bytes(), p
    assert "gate/" not in (boot / "gate-agent" / "MANIFEST.sha256").read_text()
    # The installer ran against the same root, and the first-boot entry is gone from cmdline.txt.
    assert (stage / "etc" / "systemd" / "system" / "gate-agent.service").is_file()
    assert (stage / "opt" / "gate-agent" / "src" / "install.sh").is_file()
    assert (boot / "cmdline.txt").read_text().strip() == BOOT_LINE
    log = (boot / "gate-agent" / "firstrun.log").read_text()
    assert "secrets erased" in log and "done" in log
    assert (stage / "var" / "log" / "gate-agent-firstrun.log").read_text() == log


def test_first_boot_runs_once(boot, tmp_path):
    stage = tmp_path / "stage"
    assert firstrun(boot, stage).returncode == 0
    (stage / "etc" / "gate-agent" / "agent.toml").write_text("# edited by the technician\n")
    again = firstrun(boot, stage)
    assert again.returncode == 0 and "already installed" in again.stdout
    assert (stage / "etc" / "gate-agent" / "agent.toml").read_text() == "# edited by the technician\n"


def test_a_damaged_copy_installs_nothing_and_says_so(boot, tmp_path):
    src = boot / "gate-agent" / "src" / "gate-agent-0.1.0.tar.gz"
    src.write_bytes(src.read_bytes()[:-100])  # a copy cut short
    stage = tmp_path / "stage"
    res = firstrun(boot, stage)
    assert res.returncode == 1
    assert "damaged" in res.stdout and "copy the bundle again" in res.stdout
    assert not (stage / "etc" / "gate-agent").exists()
    assert (boot / "gate-agent" / "gate" / "gate.key").exists()  # nothing moved: a fresh copy can try again
    assert "FAILED" in (boot / "gate-agent" / "firstrun.log").read_text()


def test_messages_in_russian(inputs, tmp_path, capsys):
    set_language("ru")
    assert run_bundle({**inputs, "pub": tmp_path / "none.pub"}, tmp_path / "out") == 2
    assert "комплект не создан" in capsys.readouterr().err
