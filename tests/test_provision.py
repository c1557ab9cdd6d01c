"""``gate-agent provision``: the identity goes into the config, the rest of the
file and its comments stay, the certificates land beside it with safe modes;
the region's trusted keys go into [commands.trusted_keys], each checked, and a
board that would trust none is refused unless told --no-trusted-keys."""
from __future__ import annotations

import argparse
import base64
import json
import stat
import tomllib
from pathlib import Path

import pytest

from agent.config import load_config
from agent.downlink.signing import generate_keypair, private_key_pem
from agent.i18n import set_language
from agent.tools import provision as prov
from agent.tools import trustedkeys
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


@pytest.fixture(scope="module")
def region():
    """The region's signing key pair: (private key, public key as base64)."""
    return generate_keypair()


@pytest.fixture
def key_arg(region) -> list[str]:
    return ["--trusted-key", f"region-2026={region[1]}"]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    prov.add_provision_parser(parser.add_subparsers())
    args = parser.parse_args(["provision", *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_a_new_board_gets_a_config_from_the_example_with_its_identity_and_safe_modes(tmp_path, ca, ident, region,
                                                                                      capsys):
    cfg = tmp_path / "etc" / "agent.toml"
    code, out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "mqtt.region.example:8883",
                           "--ca", str(ca.cert_path), "--cert", str(ident.cert), "--key", str(ident.key),
                           "--trusted-key", f"region-2026={region[1]}", "--config", str(cfg)], capsys)
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
    assert loaded.commands.trusted_keys == {"region-2026": region[1]}
    assert "OK" in out and "gate-agent doctor" in out and "region-2026" in out


def test_every_comment_and_setting_of_the_example_is_kept(tmp_path, key_arg, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(EXAMPLE.read_text())
    code, _out, _err = _run(["--site", SITE, "--gate", GATE, "--broker", "broker.lan", *key_arg, "--config",
                             str(cfg)], capsys)
    assert code == 0
    before = EXAMPLE.read_text().splitlines()
    after = cfg.read_text().splitlines()
    assert len(after) == len(before)  # commented keys were uncommented in place, nothing added
    changed = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
    # The example's "#[commands.trusted_keys]" and "#region-2026 = ..." lines are filled in where they stand.
    assert {a.split("=")[0].strip() for _b, a in changed} == {"[site]", "id", "gate", "host",
                                                              "[commands.trusted_keys]", "region-2026"}
    for b, a in changed:
        if "#" in b.lstrip("#"):  # a trailing comment survives the new value
            assert b.lstrip("#").split("#", 1)[1] == a.split("#", 1)[1]
    assert (tmp_path / "agent.toml.bak").read_text() == EXAMPLE.read_text()


def test_live_values_are_replaced_where_they_stand(tmp_path, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('# my gate\n[site]\nid = "old"   # from the tender\ngate = "x"\n\n[mqtt]\nhost = "old.host"\n'
                   'window = 7\n')
    code, _out, _err = _run(["--site", SITE, "--gate", GATE, "--broker", "[fd00::1]:1884", "--no-trusted-keys",
                             "--config", str(cfg)], capsys)
    assert code == 0
    text = cfg.read_text()
    assert 'id = "school-17"   # from the tender' in text and text.startswith("# my gate\n")
    doc = tomllib.loads(text)
    assert doc["mqtt"] == {"host": "fd00::1", "port": 1884, "window": 7}


def test_bad_input_writes_nothing_and_says_what_to_fix(tmp_path, ca, ident, key_arg, capsys):
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
        code, _out, err = _run([*argv, *key_arg, "--config", str(cfg)], capsys)
        assert code == 2, argv
        assert words in err and "nothing was written" in err, err
    assert cfg.read_bytes() == before
    assert not (tmp_path / "gate.key").exists()


def test_a_certificate_for_another_gate_is_pointed_out(tmp_path, ca, key_arg, capsys):
    wrong = ca.issue("school-17/side")
    code, out, _err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--ca", str(ca.cert_path),
                            "--cert", str(wrong.cert), "--key", str(wrong.key), *key_arg,
                            "--config", str(tmp_path / "agent.toml")], capsys)
    assert code == 0
    assert "school-17/side" in out and f"{SITE}/{GATE}" in out


def test_a_config_still_wrong_elsewhere_is_written_and_its_problems_listed(tmp_path, key_arg, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[gate]\napb = "sometimes"\n')
    code, _out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", *key_arg, "--config", str(cfg)],
                           capsys)
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


def test_the_key_goes_to_the_service_user_when_it_exists(tmp_path, ca, ident, region, monkeypatch):
    import os

    calls = []
    monkeypatch.setattr(os, "chown", lambda path, uid, gid: calls.append((Path(path).name, uid, gid)))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(prov, "service_ids", lambda user="gate-agent": (4242, 4343))
    res = prov.provision(tmp_path / "agent.toml", site=SITE, gate=GATE, broker="b", ca=ca.cert_path,
                         cert=ident.cert, key=ident.key, trusted_keys={"region-2026": region[1]})
    owners = {name.split(".tmp-")[0].lstrip("."): (uid, gid) for name, uid, gid in calls}
    assert owners["gate.key"] == (4242, 4343)  # 0600, the service user reads it
    assert owners["agent.toml"] == (0, 4343)  # 0640 root:gate-agent
    assert res.problems == []


def test_messages_in_russian(tmp_path, capsys):
    set_language("ru")
    code, _out, err = _run(["--site", "a b", "--gate", GATE, "--broker", "b", "--config",
                            str(tmp_path / "agent.toml")], capsys)
    assert code == 2 and "ничего не записано" in err


# --------------------------------------------------------------------------- trusted keys

P = 2**255 - 19
D = -121665 * pow(121666, -1, P) % P


def not_a_point() -> str:
    """32 bytes whose y has no x on the curve (Euler's criterion: (y²-1)/(dy²+1) is no square)."""
    for y in range(2, 1000):
        x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
        if pow(x2, (P - 1) // 2, P) == P - 1:
            return base64.b64encode(y.to_bytes(32, "little")).decode()
    raise AssertionError("no such y below 1000")


def keygen(folder: Path, key_id: str) -> Path:
    """`gate-agent keygen FILE --key-id ID`, as the region runs it; returns the .pub it wrote."""
    from agent.regional.tools import main

    assert main(["keygen", str(folder / f"{key_id}.key"), "--key-id", key_id]) == 0
    return folder / f"{key_id}.key.pub"


def test_a_board_without_a_trusted_key_is_refused_and_told_what_to_do(tmp_path, capsys):
    cfg = tmp_path / "agent.toml"
    code, _out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--config", str(cfg)], capsys)
    assert code == 2 and not cfg.exists()
    assert "refuse every access list" in err and "--trusted-key NAME=KEY" in err and "--trusted-keys-file" in err
    assert "--no-trusted-keys" in err and "nothing was written" in err
    # Told so, it is made, and says what the board will do.
    code, out, _err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--no-trusted-keys", "--config",
                            str(cfg)], capsys)
    assert code == 0 and "every access list and command will be refused" in out
    assert load_config(cfg).commands.trusted_keys == {}


def test_a_lab_board_taking_unsigned_lists_needs_no_key(tmp_path, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[commands]\nallow_unsigned = true\n")
    code, _out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--config", str(cfg)], capsys)
    assert code == 0, err


def test_keys_already_in_the_config_are_kept_when_none_are_given(tmp_path, region, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[commands.trusted_keys]\nregion-2026 = "{region[1]}"  # from the tender\n')
    code, out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--config", str(cfg)], capsys)
    assert code == 0, err
    assert load_config(cfg).commands.trusted_keys == {"region-2026": region[1]} and "region-2026" in out
    assert "# from the tender" in cfg.read_text()


def test_the_board_trusts_exactly_the_keys_given_and_says_which_it_dropped(tmp_path, region, capsys):
    _old, old_pub = generate_keypair()
    _new, new_pub = generate_keypair()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[commands]\nmax_age_s = 30\n\n[commands.trusted_keys]\nregion-2025 = "{old_pub}"\n'
                   f'region-2026 = "{region[1]}"\n\n[gate]\npulse_s = 0.5\n')
    # A rotation: the current key stays, the new one comes, the old one goes.
    code, out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--trusted-key",
                           f"region-2026={region[1]}", "--trusted-key", f"region-2027={new_pub}",
                           "--config", str(cfg)], capsys)
    assert code == 0, err
    assert load_config(cfg).commands.trusted_keys == {"region-2026": region[1], "region-2027": new_pub}
    text = cfg.read_text()
    assert f'#region-2025 = "{old_pub}"' in text  # commented out where it stood, for the record
    assert "no longer trusted" in out and "region-2025" in out
    assert tomllib.loads(text)["gate"] == {"pulse_s": 0.5} and tomllib.loads(text)["commands"]["max_age_s"] == 30
    # Named again, it comes back where it stood, uncommented.
    code, _out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--trusted-key",
                            f"region-2025={old_pub}", "--config", str(cfg)], capsys)
    assert code == 0, err
    assert load_config(cfg).commands.trusted_keys == {"region-2025": old_pub}
    assert cfg.read_text().count(old_pub) == 1


def test_every_kind_of_bad_key_is_named_and_nothing_is_written(tmp_path, region, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = tmp_path / "region-2026.key"
    private.write_bytes(private_key_pem(region[0]))
    ec_pub = tmp_path / "ec.pem"
    ec_pub.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("hello\n")
    short = base64.b64encode(bytes(range(31))).decode()
    cases = [
        ("r-bad=hello", "r-bad", "neither an Ed25519 public key"),
        (f"r-short={short}", "r-short", "neither an Ed25519 public key"),
        (f"r-curve={not_a_point()}", "r-curve", "not a point of the Ed25519 curve"),
        (f"r-zero={base64.b64encode(bytes(32)).decode()}", "r-zero", "small order"),
        (f"r-private={private}", "r-private", "PRIVATE key"),
        (f"r-ec={ec_pub}", "r-ec", "not an Ed25519 key"),
        (f"r-garbage={garbage}", "r-garbage", "does not hold one base64 key"),
        (f"r-none={tmp_path / 'none.pub'}", "r-none", "neither an Ed25519 public key in base64 nor a file"),
        (f"bad name={region[1]}", "bad name", "not usable"),
        (region[1], region[1][:20], "NAME=KEY"),
    ]
    cfg = tmp_path / "agent.toml"
    for spec, name, words in cases:
        code, _out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--trusted-key",
                                f"good={region[1]}", "--trusted-key", spec, "--config", str(cfg)], capsys)
        assert code == 2, spec
        assert name in err and words in err and "nothing was written" in err, (spec, err)
        assert not cfg.exists()
    # Both ways of giving keys say which one is wrong.
    code, _out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--trusted-key", f"good={region[1]}",
                            "--no-trusted-keys", "--config", str(cfg)], capsys)
    assert code == 2 and "not both" in err


def test_the_key_files_the_region_has_are_read(tmp_path, capsys):
    """keygen's .pub, the lines keygen prints (TOML), a gate's [commands.trusted_keys], NAME=KEY lines."""
    a = keygen(tmp_path, "region-2026a")
    b = keygen(tmp_path, "region-2026b")
    a_b64, b_b64 = a.read_text().strip(), b.read_text().strip()
    printed = tmp_path / "printed.toml"
    printed.write_text(f'# the lines gate-agent keygen printed\n"region-2026a" = "{a_b64}"\n'
                       f'"region-2026b" = "{b_b64}"\n')
    table = tmp_path / "gate.toml"
    table.write_text(f'[commands]\nmax_age_s = 30\n[commands.trusted_keys]\nregion-2026a = "{a_b64}"\n'
                     f'region-2026b = "./{b.name}"\n')
    plain = tmp_path / "keys.txt"
    plain.write_text(f"region-2026a={a_b64}\n\n# rotation\nregion-2026b = {b_b64}\n")
    both = {"region-2026a": a_b64, "region-2026b": b_b64}
    for files, want in (([a], {"region-2026a": a_b64}), ([a, b], both), ([printed], both), ([table], both),
                        ([plain], both)):
        cfg = tmp_path / "cfg" / "agent.toml"
        cfg.unlink(missing_ok=True)
        argv = ["--site", SITE, "--gate", GATE, "--broker", "b", "--config", str(cfg)]
        for f in files:
            argv += ["--trusted-keys-file", str(f)]
        code, _out, err = _run(argv, capsys)
        assert code == 0, (files, err)
        assert load_config(cfg).commands.trusted_keys == want, files
        # The config holds the keys themselves: nothing to copy, nothing to lose.
        assert tomllib.loads(cfg.read_text())["commands"]["trusted_keys"] == want
    # A .pub file as the value of --trusted-key works too.
    assert trustedkeys.trusted_key_arg(f"region-x={a}") == ("region-x", a_b64)


def test_a_keys_file_with_a_bad_line_or_a_name_twice_is_named(tmp_path, region, capsys):
    _k, other = generate_keypair()
    cases = [
        (f"region-2026={region[1]}\nthis is not a key\n", "line 2"),
        (f'"region-2026" = "{region[1]}"\n"region-2027" = "{not_a_point()}"\n', "region-2027"),
        ("# nothing but a comment\n", "holds no key"),
    ]
    cfg = tmp_path / "agent.toml"
    for text, words in cases:
        f = tmp_path / "keys.txt"
        f.write_text(text)
        code, _out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--trusted-keys-file", str(f),
                                "--config", str(cfg)], capsys)
        assert code == 2 and words in err and str(f) in err, (text, err)
    code, _out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--trusted-key",
                            f"region-2026={region[1]}", "--trusted-key", f"region-2026={other}",
                            "--config", str(cfg)], capsys)
    assert code == 2 and "two different keys" in err
    assert not cfg.exists()


def test_a_key_is_checked_as_a_curve_point_not_only_by_its_length(region):
    assert trustedkeys.ed25519_point_problem(base64.b64decode(region[1])) is None
    for _ in range(50):
        assert trustedkeys.ed25519_point_problem(base64.b64decode(generate_keypair()[1])) is None
    assert "not a point" in trustedkeys.ed25519_point_problem(base64.b64decode(not_a_point()))
    # y = p + 1 (not canonical), the identity, and a point of order 4 (y = 0).
    assert "canonical" in trustedkeys.ed25519_point_problem((P + 1).to_bytes(32, "little"))
    assert "small order" in trustedkeys.ed25519_point_problem((1).to_bytes(32, "little"))
    assert "small order" in trustedkeys.ed25519_point_problem(bytes(32))


def test_no_key_message_in_russian(tmp_path, capsys):
    set_language("ru")
    code, _out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", "--config",
                            str(tmp_path / "agent.toml")], capsys)
    assert code == 2 and "--no-trusted-keys" in err and "доверенн" in err


def test_keys_are_written_as_json_strings_a_toml_reader_takes(tmp_path, region):
    out = prov.replace_toml_table('[commands.trusted_keys]\n"odd key" = "x"\n', "commands.trusted_keys",
                                  {"region.2026": region[1]})
    assert tomllib.loads(out)["commands"]["trusted_keys"] == {"region.2026": region[1]}
    assert f'#"odd key" = {json.dumps("x")}' in out


def test_a_provisioned_board_takes_a_list_signed_with_the_key_it_was_given(tmp_path, capsys):
    """The key keygen wrote, given to provision, is the one the board verifies the region's lists with;
    a board made with --no-trusted-keys refuses the same list (what docs/operations.md's steps gave
    before provision took keys)."""
    from agent.downlink.signing import (
        SignatureError,
        load_private_key,
        load_trusted_keys,
        sign_acl,
        verify,
    )

    pub = keygen(tmp_path, "region-2026")
    doc = {"kind": "snapshot", "version": "v1", "site": SITE, "timezone": "UTC", "schedules": {}, "groups": {},
           "people": [], "blocked": []}
    signed = sign_acl(load_private_key(tmp_path / "region-2026.key"), doc, key_id="region-2026", site=SITE,
                      gate=GATE, counter=1)
    keyed, bare = tmp_path / "keyed" / "agent.toml", tmp_path / "bare" / "agent.toml"
    for cfg, extra in ((keyed, ["--trusted-keys-file", str(pub)]), (bare, ["--no-trusted-keys"])):
        code, _out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "b", *extra, "--config", str(cfg)],
                               capsys)
        assert code == 0, err
    assert verify(signed, load_trusted_keys(load_config(keyed).commands.trusted_keys)) == "region-2026"
    with pytest.raises(SignatureError, match="not one of the keys"):
        verify(signed, load_trusted_keys(load_config(bare).commands.trusted_keys))


def test_a_config_given_by_a_relative_path_names_its_files_so_they_resolve_from_its_folder(
        tmp_path, ca, ident, region, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _out, err = _run(["--site", SITE, "--gate", GATE, "--broker", "mqtt.region.example:8883",
                           "--ca", str(ca.cert_path), "--cert", str(ident.cert), "--key", str(ident.key),
                           "--trusted-key", f"region-2026={region[1]}", "--config", "prov/agent.toml"], capsys)
    assert code == 0, err
    # Loaded from elsewhere, the files still resolve to the ones provision copied.
    monkeypatch.chdir("/")
    loaded = load_config(tmp_path / "prov" / "agent.toml")
    tls = loaded.mqtt.tls
    assert Path(tls.ca_file).resolve() == (tmp_path / "prov" / "ca.pem").resolve()
    assert Path(tls.cert_file).read_bytes() == ident.cert.read_bytes()
    assert Path(tls.key_file).read_bytes() == ident.key.read_bytes()
