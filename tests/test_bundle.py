"""``gate-agent bundle`` and its first-boot installer: a bundle made offline
(--no-download) is checked file by file, then its firstrun.sh installs into a
staging root from a fake boot partition: the secrets land with their modes in
/etc/gate-agent and are gone from the boot partition; the region's trusted
keys are in the config; the board profile's boot line is in config.txt once,
under [all], with a backup, and the doctor finds it there. A certificate
made out to another gate, or a gate that would trust no key, makes no
bundle."""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.config import load_config
from agent.downlink.signing import generate_keypair
from agent.i18n import set_language
from agent.tools import bundle as bundle_mod
from agent.tools.bundle import add_bundle_parser
from agent.tools.doctor import FAIL, OK, Doctor, DoctorEnv
from tests.pki import TestCA

ROOT = Path(__file__).resolve().parent.parent
SITE, GATE = "school-17", "main-1"
BOOT_LINE = "console=serial0,115200 console=tty1 root=PARTUUID=1234-02 rootfstype=ext4 fsck.repair=yes rootwait"
# Raspberry Pi OS bookworm's config.txt, shortened; it ends under a [cm5] filter, as shipped.
CONFIG_TXT = """# For more options and information see
# http://rptl.io/configtxt
dtparam=audio=on
camera_auto_detect=1
dtoverlay=vc4-kms-v3d
arm_64bit=1

[cm4]
otg_mode=1

[cm5]
dtoverlay=dwc2,dr_mode=host
"""
BEGIN = "# >>> gate-agent:"


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
        *(() if "--no-trusted-keys" in extra else ("--trusted-key", f"region-2026={inputs['pub']}")),
        "--broker", "mqtt.region.example:8883", "--out", str(out), "--no-download", *extra])
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
    (part / "config.txt").write_text(CONFIG_TXT)
    return part


def firstrun(part: Path, stage: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(["bash", str(part / "gate-agent" / "firstrun.sh"), "--root", str(stage), "--no-build",
                           *extra], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def copy_again(made: Path, part: Path) -> None:
    """What a technician does after a failed first start: the bundle copied onto the card again."""
    shutil.rmtree(part / "gate-agent")
    shutil.copytree(made / "gate-agent", part / "gate-agent")


def boot_check(config: Path, *boot_dirs: Path):
    doctor = Doctor(config, env=DoctorEnv(gpio_chips=list, service_active=lambda: None, boot_dirs=boot_dirs,
                                          boot_time=lambda: None))
    doctor.check_config()
    return doctor.check_boot()


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# --------------------------------------------------------------------------- the bundle


def test_the_bundle_holds_exactly_what_the_card_needs(made):
    files = sorted(p.relative_to(made).as_posix() for p in made.rglob("*") if p.is_file())
    assert files == sorted([
        "gate-agent/user-data",  # not at the top: a copy of the whole folder never replaces Imager's
        "gate-agent/README.txt",
        "gate-agent/firstrun.sh",
        "gate-agent/boot-config.txt",
        "gate-agent/cmdline.txt.append",
        "gate-agent/user-data.snippet",
        "gate-agent/MANIFEST.sha256",
        "gate-agent/src/gate-agent-0.1.0.tar.gz",
        "gate-agent/wheels/MISSING.txt",
        "gate-agent/gate/agent.toml",
        "gate-agent/gate/ca.pem",
        "gate-agent/gate/gate.pem",
        "gate-agent/gate/gate.key",
    ])


def test_the_gate_files_are_the_given_ones_and_the_key_is_private(made, inputs):
    gate = made / "gate-agent" / "gate"
    assert (gate / "gate.key").read_bytes() == inputs["key"].read_bytes() and mode(gate / "gate.key") == 0o600
    assert (gate / "gate.pem").read_bytes() == inputs["cert"].read_bytes()
    assert (gate / "ca.pem").read_bytes() == inputs["ca"].read_bytes()
    assert mode(gate) == 0o700 and mode(made) == 0o700


def test_the_config_carries_the_identity_and_loads_as_it_will_on_the_board(made, inputs):
    path = made / "gate-agent" / "gate" / "agent.toml"
    doc = tomllib.loads(path.read_text())
    assert doc["site"] == {"id": SITE, "gate": GATE}
    assert (doc["mqtt"]["host"], doc["mqtt"]["port"]) == ("mqtt.region.example", 8883)
    # Relative paths: the same file works here and in /etc/gate-agent.
    assert doc["mqtt"]["tls"] == {"ca_file": "ca.pem", "cert_file": "gate.pem", "key_file": "gate.key"}
    # The key itself, checked, in the config: no file to copy or lose.
    assert doc["commands"]["trusted_keys"] == {"region-2026": inputs["pub_b64"]}
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
    user_data = (ga / "user-data").read_text()
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
        "--cert", str(inputs["cert"]), "--key", str(inputs["key"]), "--trusted-keys-file", str(inputs["pub"]),
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
        ({"pub": tmp_path / "none.pub"}, "nor a file"),
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
    # Owners, which a staging run cannot set, are what it would set.
    assert "would: chown gate-agent:gate-agent /etc/gate-agent/gate.key" in res.stdout
    assert "would: chown root:gate-agent /etc/gate-agent/agent.toml" in res.stdout
    # The installed config is the one the service will load.
    cfg = load_config(etc / "agent.toml")
    assert (cfg.site, cfg.gate_id) == (SITE, GATE) and cfg.mqtt.tls.key_file == str(etc / "gate.key")
    assert cfg.commands.trusted_keys == {"region-2026": inputs["pub_b64"]}
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


# --------------------------------------------------------------------------- trusted keys, certificate


def test_a_gate_that_would_trust_no_key_makes_no_bundle_unless_told(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    add_bundle_parser(parser.add_subparsers())
    base = ["bundle", "--site", SITE, "--gate", GATE, "--config", str(inputs["template"]), "--ca", str(inputs["ca"]),
            "--cert", str(inputs["cert"]), "--key", str(inputs["key"]), "--out", str(out), "--no-download"]
    args = parser.parse_args(base)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "refuse every access list" in err and "--trusted-key" in err and "--no-trusted-keys" in err
    assert "no bundle was made" in err and not out.exists()
    assert run_bundle(inputs, out, "--no-trusted-keys") == 0
    assert "every access list and command will be refused" in capsys.readouterr().out
    assert load_config(out / "gate-agent" / "gate" / "agent.toml").commands.trusted_keys == {}


def test_the_templates_own_keys_serve_when_none_are_given_and_given_ones_replace_them(inputs, tmp_path, capsys):
    _k, old = generate_keypair()
    template = tmp_path / "region.toml"
    template.write_text(inputs["template"].read_text() + f'\n[commands.trusted_keys]\nregion-2025 = "{old}"\n')
    parser = argparse.ArgumentParser()
    add_bundle_parser(parser.add_subparsers())
    base = ["bundle", "--site", SITE, "--gate", GATE, "--config", str(template), "--ca", str(inputs["ca"]),
            "--cert", str(inputs["cert"]), "--key", str(inputs["key"]), "--no-download"]
    args = parser.parse_args([*base, "--out", str(tmp_path / "a")])
    assert args.func(args) == 0
    assert load_config(tmp_path / "a" / "gate-agent" / "gate" / "agent.toml").commands.trusted_keys == {
        "region-2025": old}
    args = parser.parse_args([*base, "--out", str(tmp_path / "b"), "--trusted-key", f"region-2026={inputs['pub_b64']}"])
    assert args.func(args) == 0
    assert load_config(tmp_path / "b" / "gate-agent" / "gate" / "agent.toml").commands.trusted_keys == {
        "region-2026": inputs["pub_b64"]}
    assert "region-2026" in capsys.readouterr().out


def test_a_bad_key_is_named_and_makes_no_bundle(inputs, tmp_path, capsys):
    private = tmp_path / "region.key"
    from agent.downlink.signing import private_key_pem

    private.write_bytes(private_key_pem(generate_keypair()[0]))
    for pub, words in ((private, "PRIVATE key"), (f"{'A' * 43}=", "small order")):
        out = tmp_path / "out"
        assert run_bundle({**inputs, "pub": pub}, out) == 2
        err = capsys.readouterr().err
        assert "region-2026" in err and words in err and "no bundle was made" in err, err
        assert not out.exists()


def test_the_first_form_of_the_keys_option_still_works(inputs, tmp_path):
    parser = argparse.ArgumentParser()
    add_bundle_parser(parser.add_subparsers())
    args = parser.parse_args([
        "bundle", "--site", SITE, "--gate", GATE, "--config", str(inputs["template"]), "--ca", str(inputs["ca"]),
        "--cert", str(inputs["cert"]), "--key", str(inputs["key"]), "--no-download", "--out", str(tmp_path / "b"),
        "--trusted-keys", f"region-2026={inputs['pub']}", str(inputs["pub"])])
    assert args.func(args) == 0
    keys = load_config(tmp_path / "b" / "gate-agent" / "gate" / "agent.toml").commands.trusted_keys
    assert keys == {"region-2026": inputs["pub_b64"]}  # the bare file is named after itself: region-2026


@pytest.mark.parametrize("cn", ["school-17/side", "school-17", None])
def test_a_certificate_made_out_to_another_gate_makes_no_bundle(inputs, tmp_path, capsys, cn):
    ca = inputs["ca_obj"]
    other = ca.issue(cn) if cn is not None else ca.issue("no-cn", common_names=[])
    out = tmp_path / "out"
    assert run_bundle({**inputs, "cert": other.cert, "key": other.key}, out) == 2
    err = capsys.readouterr().err
    assert f"{SITE}/{GATE}" in err and "no bundle was made" in err, err
    assert (cn in err) if cn else ("no CN" in err)
    assert not out.exists()


# --------------------------------------------------------------------------- config.txt at first boot


def test_first_boot_puts_the_profiles_boot_line_in_config_txt_once_with_a_backup(made, boot, tmp_path):
    stage = tmp_path / "stage"
    assert (made / "gate-agent" / "boot-config.txt").read_text().splitlines()[1:] == ["gpio=4-7=op,dh"]
    res = firstrun(boot, stage)
    assert res.returncode == 0, res.stdout + res.stderr
    text = (boot / "config.txt").read_text()
    # The original first, untouched, then our block under [all]: the shipped file ends under [cm5],
    # which would otherwise keep the line from every Pi 4.
    assert text.startswith(CONFIG_TXT)
    block = text[len(CONFIG_TXT):].strip().splitlines()
    assert block[0].startswith(BEGIN) and block[1] == "[all]" and "gpio=4-7=op,dh" in block
    assert block[-1] == "# <<< gate-agent <<<"
    assert (boot / "config.txt.gate-agent.bak").read_text() == CONFIG_TXT
    # bookworm: systemd.run reboots the board when firstrun succeeds, so the line applies then.
    assert "config.txt changed" in res.stdout and "restarts by itself" in res.stdout
    # The doctor, on the installed config, finds the line; on the original file, it would not.
    config = stage / "etc" / "gate-agent" / "agent.toml"
    assert boot_check(config, boot).status == OK
    original = tmp_path / "original"
    original.mkdir()
    (original / "config.txt").write_text(CONFIG_TXT)
    assert boot_check(config, original).status == FAIL

    # Run again (the bundle copied again after a failed start): nothing added twice, the backup stays.
    copy_again(made, boot)
    again = firstrun(boot, stage)
    assert again.returncode == 0, again.stdout
    assert (boot / "config.txt").read_text() == text
    assert (boot / "config.txt").read_text().count("gpio=4-7=op,dh") == 1
    assert "unchanged, no reboot needed" in again.stdout and "config.txt changed" not in again.stdout
    assert (boot / "config.txt.gate-agent.bak").read_text() == CONFIG_TXT


def test_a_board_moved_to_another_profile_gets_its_block_replaced_not_a_second_one(made, boot, inputs, tmp_path):
    stage = tmp_path / "stage"
    assert firstrun(boot, stage).returncode == 0
    template = tmp_path / "opto.toml"
    template.write_text(inputs["template"].read_text().replace('#profile = "pi4-relay4"', 'profile = "pi-opto"'))
    opto = tmp_path / "opto"
    assert run_bundle({**inputs, "template": template}, opto) == 0
    copy_again(opto, boot)
    (boot / "config.txt").write_text((boot / "config.txt").read_text() + "# the technician's own line\nhdmi_blanking=1\n")
    res = firstrun(boot, stage)
    assert res.returncode == 0, res.stdout
    text = (boot / "config.txt").read_text()
    assert text.count(BEGIN) == 1 and "gpio=4-7=op,dh" not in text and "gpio=17,22,23,27=op,dl" in text
    assert "hdmi_blanking=1" in text and text.startswith(CONFIG_TXT)
    assert (boot / "config.txt.gate-agent.bak").read_text() == CONFIG_TXT  # still the first original
    # Not started by systemd.run this time (its entry is gone): a reboot applies it, not needed now.
    assert "a reboot applies it" in res.stdout and "No reboot is needed now" in res.stdout
    assert boot_check(stage / "etc" / "gate-agent" / "agent.toml", boot).status == OK


def test_a_config_txt_with_windows_line_ends_keeps_them(boot, tmp_path):
    crlf = CONFIG_TXT.replace("\n", "\r\n").encode()
    (boot / "config.txt").write_bytes(crlf)
    assert firstrun(boot, tmp_path / "stage").returncode == 0
    data = (boot / "config.txt").read_bytes()
    assert data.startswith(crlf) and data.count(b"gpio=4-7=op,dh") == 1


def test_a_marker_without_its_pair_is_left_alone_and_said(boot, tmp_path):
    broken = CONFIG_TXT + "# >>> gate-agent: relays off (someone cut the rest)\n[all]\ndtparam=spi=on\n"
    (boot / "config.txt").write_text(broken)
    res = firstrun(boot, tmp_path / "stage")
    assert res.returncode == 0  # the agent is installed all the same; the doctor keeps saying it
    assert (boot / "config.txt").read_text() == broken
    assert "WARNING" in res.stdout and "gpio=4-7=op,dh" in res.stdout


@pytest.mark.parametrize("layout", ["bookworm", "older", "told"])
def test_config_txt_is_found_where_the_release_keeps_it(made, tmp_path, layout):
    """The bundle copied somewhere without config.txt beside it: the staged root's /boot/firmware
    (bookworm and later; /boot/config.txt is then a stub saying so), /boot (older), or --boot."""
    part = tmp_path / "elsewhere"
    shutil.copytree(made, part)
    stage = tmp_path / "stage"
    firmware, old = stage / "boot" / "firmware", stage / "boot"
    firmware.mkdir(parents=True)
    stub = "DO NOT EDIT THIS FILE\n\nThe file you are looking for has moved to /boot/firmware/config.txt\n"
    extra: tuple[str, ...] = ()
    env = None
    if layout == "bookworm":
        (firmware / "config.txt").write_text(CONFIG_TXT)
        (old / "config.txt").write_text(stub)
        want = firmware / "config.txt"
    elif layout == "older":
        (old / "config.txt").write_text(CONFIG_TXT)
        want = old / "config.txt"
    else:
        told = tmp_path / "card"
        told.mkdir()
        (told / "config.txt").write_text(CONFIG_TXT)
        (firmware / "config.txt").write_text(CONFIG_TXT)
        env = {"GATE_AGENT_BOOT": str(told)}
        want = told / "config.txt"
    res = firstrun(part, stage, *extra, env=env)
    assert res.returncode == 0, res.stdout
    assert want.read_text().count("gpio=4-7=op,dh") == 1, res.stdout
    for other in (firmware / "config.txt", old / "config.txt"):
        if other != want and other.exists():
            assert "gpio=" not in other.read_text()
    config = stage / "etc" / "gate-agent" / "agent.toml"
    assert boot_check(config, firmware, old).status == (OK if layout != "told" else FAIL)


def test_no_config_txt_anywhere_installs_all_the_same_and_says_what_to_add(made, tmp_path):
    part = tmp_path / "elsewhere"
    shutil.copytree(made, part)
    res = firstrun(part, tmp_path / "stage")
    assert res.returncode == 0
    assert "WARNING: config.txt not found" in res.stdout and "gpio=4-7=op,dh" in res.stdout
    assert (tmp_path / "stage" / "etc" / "gate-agent" / "agent.toml").is_file()


@contextmanager
def small_partition(mountpoint: Path, size_mb: int = 4) -> Iterator[Path]:
    """A small ext4 filesystem on a loop device at ``mountpoint`` (root and mount needed, else skip)."""
    import os

    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("a small partition needs root, mount and mkfs.ext4")
    mountpoint.mkdir(parents=True, exist_ok=True)
    image = mountpoint.with_name(mountpoint.name + ".img")
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    assert subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, check=False).returncode == 0
    got = subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True, text=True,
                         check=False)
    if got.returncode:
        pytest.skip(f"cannot mount a loop device here: {got.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
        image.unlink(missing_ok=True)


def fill(path: Path) -> None:
    """Write until the filesystem has not one byte left."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 1024, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_full_boot_partition_keeps_its_config_txt_whole(made, tmp_path):
    part = tmp_path / "elsewhere"
    shutil.copytree(made, part)
    with small_partition(tmp_path / "card") as card:
        (card / "config.txt").write_text(CONFIG_TXT * 20)
        (card / "config.txt.gate-agent.bak").write_text(CONFIG_TXT)  # an earlier run's
        fill(card / "filler")
        res = firstrun(part, tmp_path / "stage", "--boot", str(card))
        assert res.returncode == 0, res.stdout  # the agent is installed all the same
        assert "WARNING: cannot write" in res.stdout
        assert (card / "config.txt").read_text() == CONFIG_TXT * 20
        assert not (card / "config.txt.gate-agent.new").exists()


def test_a_read_only_boot_partition_is_said_and_the_install_goes_on(made, tmp_path):
    from tests.readonly import read_only

    part = tmp_path / "elsewhere"
    shutil.copytree(made, part)
    card = tmp_path / "card"
    card.mkdir()
    (card / "config.txt").write_text(CONFIG_TXT)
    with read_only(card):
        res = firstrun(part, tmp_path / "stage", "--boot", str(card))
        assert res.returncode == 0, res.stdout
        assert "WARNING" in res.stdout and "not changed" in res.stdout
        assert (card / "config.txt").read_text() == CONFIG_TXT
    assert (tmp_path / "stage" / "etc" / "gate-agent" / "agent.toml").is_file()


def _tiny_clone(tmp_path: Path) -> Path:
    """A git clone (of a small repository with the installer in it)."""
    origin = tmp_path / "origin"
    origin.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    (origin / "install.sh").write_text("echo committed\n")
    for cmd in (["init", "-q"], ["add", "install.sh"], ["commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(origin), *cmd], check=True, env=env, capture_output=True)
    subprocess.run(["git", "clone", "-q", str(origin), str(tmp_path / "clone")], check=True, env=env,
                   capture_output=True)
    return tmp_path / "clone"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is needed")
def test_a_clone_owned_by_another_user_is_archived_from_git_not_called_not_a_checkout(tmp_path, monkeypatch):
    clone = _tiny_clone(tmp_path)
    (clone / "install.sh").write_text("echo uncommitted\n")
    # What git does for a checkout owned by someone else (a clone used with sudo): it refuses it.
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # no safe.directory of the machine's own
    dest = tmp_path / "src.tar.gz"
    note = bundle_mod._source_archive(clone, dest)
    assert "git commit" in note and "not a git checkout" not in note, note
    assert "uncommitted changes" in note
    with tarfile.open(dest) as tar:
        member = tar.extractfile(f"gate-agent-{bundle_mod.__version__}/install.sh")
        assert member is not None and member.read() == b"echo committed\n"


def test_without_git_the_note_says_so_rather_than_not_a_checkout(tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    (clone / "install.sh").write_text("echo x\n")
    monkeypatch.setattr(bundle_mod.shutil, "which", lambda name: None)
    note = bundle_mod._source_archive(clone, tmp_path / "src.tar.gz")
    assert "git is not installed" in note and "not a git checkout" not in note, note


# --------------------------------------------------------------------------- the card's user-data

IMAGER_USER_DATA = """#cloud-config
manage_resolv_conf: false
hostname: kpp-1
manage_etc_hosts: true
packages:
- avahi-daemon
timezone: 'Asia/Novosibirsk'
users:
- name: tech
  groups: users,adm,dialout,gpio,sudo
  shell: /bin/bash
  lock_passwd: false
  passwd: $5$abc$def
ssh_pwauth: true
enable_ssh: true
runcmd:
- [ sh, -c, "echo regdomain" ]
- echo two

# a comment Imager does not write, kept
rpi:
  interfaces:
    serial: true
"""


def _card(tmp_path: Path, user_data: str | None) -> Path:
    card = tmp_path / "bootfs"
    card.mkdir(parents=True)
    (card / "config.txt").write_text(CONFIG_TXT)
    (card / "cmdline.txt").write_text(BOOT_LINE + "\n")
    if user_data is not None:
        (card / "user-data").write_text(user_data)
    return card


FIRSTRUN_ENTRY = ["bash", "/boot/firmware/gate-agent/firstrun.sh"]


def _yaml_load(text: str):
    """Parse as cloud-init does on the board: with PyYAML (this venv's, else the system's)."""
    try:
        import yaml
    except ImportError:
        import json

        system = shutil.which("python3", path="/usr/bin:/bin")
        probe = system and subprocess.run([system, "-c", "import yaml"], capture_output=True, check=False)
        if not probe or probe.returncode != 0:
            pytest.skip("PyYAML is needed to read user-data as cloud-init does")
        res = subprocess.run([system, "-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"],
                             input=text, capture_output=True, text=True, check=True)
        return json.loads(res.stdout)
    return yaml.safe_load(text)


def test_card_merges_the_installer_into_imagers_user_data_keeping_user_ssh_and_its_runcmd(inputs, tmp_path,
                                                                                         capsys):
    card = _card(tmp_path, IMAGER_USER_DATA)
    assert run_bundle(inputs, tmp_path / "out", "--card", str(card)) == 0
    out = capsys.readouterr().out
    merged = _yaml_load((card / "user-data").read_text())
    before = _yaml_load(IMAGER_USER_DATA)
    assert merged["runcmd"] == [*before["runcmd"], FIRSTRUN_ENTRY]
    assert {k: v for k, v in merged.items() if k != "runcmd"} == {k: v for k, v in before.items() if k != "runcmd"}
    assert (card / "user-data").read_text().count("runcmd:") == 1
    assert (card / "user-data.gate-agent.bak").read_text() == IMAGER_USER_DATA
    assert (card / "gate-agent" / "firstrun.sh").is_file() and (card / "gate-agent" / "MANIFEST.sha256").is_file()
    assert "kept" in out
    # Again (the bundle copied once more): the line is not added a second time.
    assert run_bundle(inputs, tmp_path / "out", "--card", str(card)) == 0
    assert _yaml_load((card / "user-data").read_text())["runcmd"].count(FIRSTRUN_ENTRY) == 1


def test_card_without_runcmd_or_without_user_data(inputs, tmp_path):
    card = _card(tmp_path, "#cloud-config\r\nusers:\r\n- name: tech\r\n")
    assert run_bundle(inputs, tmp_path / "out", "--card", str(card)) == 0
    text = (card / "user-data").read_bytes().decode()
    assert "\r\n" in text and "\n" not in text.replace("\r\n", "")  # its line ends kept
    doc = _yaml_load(text)
    assert doc["users"] == [{"name": "tech"}] and doc["runcmd"] == [FIRSTRUN_ENTRY]
    assert doc["hostname"] == f"gate-{SITE}-{GATE}"
    bare = _card(tmp_path / "2", None)
    assert run_bundle(inputs, tmp_path / "out2", "--card", str(bare)) == 0
    assert (bare / "user-data").read_text() == (tmp_path / "out2" / "gate-agent" / "user-data").read_text()


@pytest.mark.parametrize("user_data,why", [
    ("hostname: x\nruncmd:\n- echo\n", "#cloud-config"),
    ("#cloud-config\nruncmd: [[echo, hi]]\n", "one line"),
    ("#cloud-config\nruncmd:\n- a\nruncmd:\n- b\n", "twice"),
])
def test_a_user_data_that_cannot_be_merged_safely_is_refused_and_the_card_untouched(inputs, tmp_path, capsys,
                                                                                    user_data, why):
    card = _card(tmp_path, user_data)
    before = {p.name: p.read_bytes() for p in card.iterdir()}
    assert run_bundle(inputs, tmp_path / "out", "--card", str(card)) == 2
    err = capsys.readouterr().err
    assert why in err and "nothing was written to the card" in err
    assert {p.name: p.read_bytes() for p in card.iterdir()} == before


def test_out_on_a_boot_partition_is_refused_not_wiped(inputs, tmp_path, capsys):
    card = _card(tmp_path, IMAGER_USER_DATA)
    assert run_bundle(inputs, card) == 2
    assert "--card" in capsys.readouterr().err
    assert (card / "user-data").read_text() == IMAGER_USER_DATA and (card / "config.txt").is_file()


def test_without_card_the_user_data_warning_is_the_last_thing_said(inputs, tmp_path, capsys):
    assert run_bundle(inputs, tmp_path / "out") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "user-data" in err[-1] and "--card" in err[-1] and "NOT replace" in err[-1]
    readme = (tmp_path / "out" / "gate-agent" / "README.txt").read_text()
    assert readme.startswith("IMPORTANT: user-data")
