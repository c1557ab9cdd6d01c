"""``gate-agent provision``: the identity goes into the config, the rest of the
file and its comments stay, the certificates land beside it with safe modes."""
from __future__ import annotations

import argparse
import stat
import tomllib
from pathlib import Path

import pytest

from agent.config import load_config
from agent.i18n import set_language
from agent.tools import provision as prov
from agent.tools.provision import ProvisionError, parse_broker, set_toml_values
from tests.pki import TestCA

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "agent.toml"
SITE, GATE = "school-17", "main-1"


@pytest.fixture(autouse=True)
def _english():
    set_language("en")
    yield
    set_language(None)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def ident(ca):
    return ca.issue(f"{SITE}/{GATE}")


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    prov.add_provision_parser(parser.add_subparsers())
    args = parser.parse_args(["provision", *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_a_new_board_gets_a_config_from_the_example_with_its_identity_and_safe_modes(tmp_path, ca, ident, capsys):
    cfg = tmp_path / "etc" / "agent.toml"
    code, out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "mqtt.region.example:8883",
                           "--ca", str(ca.cert_path), "--cert", str(ident.cert), "--key", str(ident.key),
                           "--config", str(cfg)], capsys)
    assert code == 0, err
    doc = tomllib.loads(cfg.read_text())
    assert doc["site"] == {"id": SITE, "gate": GATE}
    assert doc["mqtt"]["host"] == "mqtt.region.example" and doc["mqtt"]["port"] == 8883
    folder = cfg.parent
    assert doc["mqtt"]["tls"] == {"ca_file": str(folder / "ca.pem"), "cert_file": str(folder / "gate.pem"),
                                  "key_file": str(folder / "gate.key")}
    assert (folder / "gate.key").read_bytes() == ident.key.read_bytes()
    assert (folder / "gate.pem").read_bytes() == ident.cert.read_bytes()
    assert (folder / "ca.pem").read_bytes() == ca.cert_path.read_bytes()
    assert _mode(cfg) == 0o640 and _mode(folder / "gate.key") == 0o600
    assert _mode(folder / "gate.pem") == 0o644 and _mode(folder / "ca.pem") == 0o644
    # The checked config the service would load.
    loaded = load_config(cfg)
    assert (loaded.site, loaded.gate_id, loaded.mqtt.host) == (SITE, GATE, "mqtt.region.example")
    assert "OK" in out and "gate-agent doctor" in out


def test_every_comment_and_setting_of_the_example_is_kept(tmp_path, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(EXAMPLE.read_text())
    code, _out, _err = _run(["--site", SITE, "--gate", GATE, "--broker", "broker.lan", "--config", str(cfg)], capsys)
    assert code == 0
    before = EXAMPLE.read_text().splitlines()
    after = cfg.read_text().splitlines()
    assert len(after) == len(before)  # commented keys were uncommented in place, nothing added
    changed = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
    assert {a.split("=")[0].strip() for _b, a in changed} == {"[site]", "id", "gate", "host"}
    for b, a in changed:
        if "#" in b.lstrip("#"):  # a trailing comment survives the new value
            assert b.lstrip("#").split("#", 1)[1] == a.split("#", 1)[1]
    assert (tmp_path / "agent.toml.bak").read_text() == EXAMPLE.read_text()


def test_live_values_are_replaced_where_they_stand(tmp_path, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('# my gate\n[site]\nid = "old"   # from the tender\ngate = "x"\n\n[mqtt]\nhost = "old.host"\n'
                   'window = 7\n')
    code, _out, _err = _run(["--site", SITE, "--gate", GATE, "--broker", "[fd00::1]:1884", "--config", str(cfg)],
                            capsys)
    assert code == 0
    text = cfg.read_text()
    assert 'id = "school-17"   # from the tender' in text and text.startswith("# my gate\n")
    doc = tomllib.loads(text)
    assert doc["mqtt"] == {"host": "fd00::1", "port": 1884, "window": 7}


def test_bad_input_writes_nothing_and_says_what_to_fix(tmp_path, ca, ident, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(EXAMPLE.read_text())
    before = cfg.read_bytes()
    other = ca.issue("school-17/other")
    cases = [
        (["--site", "school 17", "--gate", GATE, "--broker", "b"], "--site"),
        (["--site", SITE, "--gate", "a/b", "--broker", "b"], "--gate"),
        (["--site", SITE, "--gate", GATE, "--broker", "b:99999"], "65535"),
        (["--site", SITE, "--gate", GATE, "--broker", "b", "--cert", str(ident.cert)], "--key"),
        (["--site", SITE, "--gate", GATE, "--broker", "b", "--cert", str(ident.cert), "--key", str(other.key)],
         "does not belong"),
        (["--site", SITE, "--gate", GATE, "--broker", "b", "--ca", str(tmp_path / "none.pem")], "does not exist"),
        (["--site", SITE, "--gate", GATE, "--broker", "b", "--ca", str(cfg)], "PEM"),
        (["--site", SITE, "--gate", GATE, "--broker", "b", "--cert", str(ident.cert), "--key", str(ident.key)],
         "--ca"),
    ]
    for argv, words in cases:
        code, _out, err = _run([*argv, "--config", str(cfg)], capsys)
        assert code == 2, argv
        assert words in err and "nothing was written" in err, err
    assert cfg.read_bytes() == before
    assert not (tmp_path / "gate.key").exists()


def test_a_certificate_for_another_gate_is_pointed_out(tmp_path, ca, capsys):
    wrong = ca.issue("school-17/side")
    code, out, _err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--ca", str(ca.cert_path),
                            "--cert", str(wrong.cert), "--key", str(wrong.key),
                            "--config", str(tmp_path / "agent.toml")], capsys)
    assert code == 0
    assert "school-17/side" in out and f"{SITE}/{GATE}" in out


def test_a_config_still_wrong_elsewhere_is_written_and_its_problems_listed(tmp_path, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[gate]\napb = "sometimes"\n')
    code, _out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--config", str(cfg)], capsys)
    assert code == 1
    assert "gate.apb" in err and "check-config" in err
    assert tomllib.loads(cfg.read_text())["site"]["id"] == SITE


def test_toml_editing_adds_missing_tables_and_quotes_odd_keys():
    text = "[site]\nid = \"a\"\n"
    out = set_toml_values(text, [("commands.trusted_keys", "region 2026", "./keys/r.pub"),
                                 ("mqtt.tls", "ca_file", "ca.pem"), ("site", "id", "b")])
    doc = tomllib.loads(out)
    assert doc["commands"]["trusted_keys"] == {"region 2026": "./keys/r.pub"}
    assert doc["mqtt"]["tls"]["ca_file"] == "ca.pem" and doc["site"]["id"] == "b"


def test_a_hash_inside_a_string_is_not_taken_for_a_comment():
    out = set_toml_values('[mqtt]\npassword_file = "/etc/#odd"  # note\nhost = "x"\n',
                          [("mqtt", "password_file", "/etc/new")])
    assert 'password_file = "/etc/new"  # note' in out


@pytest.mark.parametrize(("text", "want"), [
    ("mqtt.region.example", ("mqtt.region.example", None)),
    ("10.0.0.5:8883", ("10.0.0.5", 8883)),
    ("[::1]:1883", ("::1", 1883)),
    ("fd00::1", ("fd00::1", None)),
])
def test_broker_addresses(text, want):
    assert parse_broker(text) == want


def test_broker_address_errors_say_the_form():
    with pytest.raises(ProvisionError, match="HOST:PORT"):
        parse_broker("a b")


def test_the_key_goes_to_the_service_user_when_it_exists(tmp_path, ca, ident, monkeypatch):
    import os

    calls = []
    monkeypatch.setattr(os, "chown", lambda path, uid, gid: calls.append((Path(path).name, uid, gid)))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(prov, "service_ids", lambda user="gate-agent": (4242, 4343))
    res = prov.provision(tmp_path / "agent.toml", site=SITE, gate=GATE, broker="b", ca=ca.cert_path,
                         cert=ident.cert, key=ident.key)
    owners = {name.split(".tmp-")[0].lstrip("."): (uid, gid) for name, uid, gid in calls}
    assert owners["gate.key"] == (4242, 4343)  # 0600, the service user reads it
    assert owners["agent.toml"] == (0, 4343)  # 0640 root:gate-agent
    assert res.problems == []


def test_messages_in_russian(tmp_path, capsys):
    set_language("ru")
    code, _out, err = _run(["--site", "a b", "--gate", GATE, "--broker", "b", "--config",
                            str(tmp_path / "agent.toml")], capsys)
    assert code == 2 and "ничего не записано" in err
