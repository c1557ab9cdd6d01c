"""The config file: schema, semantic checks, every error at once with its key,
secrets from files or the environment and never shown, check-config."""
from __future__ import annotations

import argparse
import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import ConfigError, add_check_config_parser, load_config, parse_config, schema
from agent.core.gateconfig import GateConfig

SECRET = "s3cret-Pa55word"
SCBK = "00112233445566778899AABBCCDDEEFF"


def base(**sections) -> dict:
    doc = {"site": {"id": "school7", "gate": "gate1"}, "hardware": {"pin_factory": "mock"}}
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return doc


def errors_of(doc: dict, tmp_path: Path, env: dict | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir=tmp_path, env=env or {})
    return dict(info.value.errors)


def secret_file(tmp_path: Path, name: str, text: str, mode: int = 0o640) -> Path:
    p = tmp_path / name
    p.write_text(text + "\n")
    p.chmod(mode)
    return p


def public_key_b64() -> tuple[Ed25519PrivateKey, str]:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, base64.b64encode(raw).decode()


# --- defaults -----------------------------------------------------------------------------


def test_a_minimal_config_gets_every_default(tmp_path):
    cfg = parse_config(base(), base_dir=tmp_path, env={})
    assert cfg.site == "school7" and cfg.gate_id == "gate1" and cfg.key_width == 24
    assert cfg.gate == GateConfig(site="school7", gate="gate1")
    assert cfg.journal.path == Path("/var/lib/gate-agent/journal.db")
    assert cfg.service.state_dir == Path("/var/lib/gate-agent")
    assert not cfg.mqtt.enabled and cfg.mqtt.port == 1883
    assert cfg.commands.max_age_s == 30 and not cfg.commands.allow_unsigned
    assert cfg.acl.max_age_s is None
    # One Wiegand reader per gate reader, on the profile's pins.
    board = cfg.hardware.board
    assert [(r.name, r.type, r.d0, r.d1) for r in cfg.hardware.readers] == [
        (n, "wiegand", board.readers[n].d0, board.readers[n].d1) for n in ("entry", "exit")]


def test_the_schema_defaults_are_the_cores_own():
    props = schema()["properties"]["gate"]["properties"]
    defaults = GateConfig()
    for name in GateConfig.field_names():
        if name in ("site", "gate"):
            continue
        value = getattr(defaults, name)
        assert props[name]["default"] == (dict(value) if name == "readers" else value), name


def test_relative_paths_are_taken_from_the_config_files_directory(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "agent.toml"
    path.write_text('[site]\nid = "s"\ngate = "g"\n[hardware]\npin_factory = "mock"\n'
                    '[journal]\npath = "data/j.db"\n[service]\nstate_dir = "../state"\n')
    cfg = load_config(path)
    assert cfg.journal.path == tmp_path / "conf" / "data" / "j.db"
    assert cfg.service.state_dir.resolve() == (tmp_path / "state").resolve()


# --- every error at once --------------------------------------------------------------------


def test_every_problem_is_reported_at_once_with_its_key_and_what_is_allowed(tmp_path):
    doc = base(gate={"pulse_s": 0.05, "apb": "sometimes", "timezone": "Mars/Olympus"},
               journal={"capacity_events": 10},
               mqtt={"host": "broker", "window": 0, "colour": "blue"})
    doc["site"]["gate"] = "gate 1"
    errs = errors_of(doc, tmp_path)
    assert errs["gate.pulse_s"] == "0.05 is below 0.1 (the turnstile needs at least 100 ms)"
    assert '"off", "soft", "hard", "timed"' in errs["gate.apb"]
    assert "Mars/Olympus" in errs["gate.timezone"] and "IANA" in errs["gate.timezone"]
    assert "below 1000" in errs["journal.capacity_events"]
    assert "below 1" in errs["mqtt.window"]
    assert "unknown key \"colour\"" in errs["mqtt.colour"] and "\"keepalive\"" in errs["mqtt.colour"]
    assert "MQTT topic level" in errs["site.gate"]
    assert len(errs) == 7


def test_rules_across_fields_are_checked_too(tmp_path):
    errs = errors_of(base(gate={"pulse_s": 6.0, "wait_s": 5.0, "apb": "timed"}), tmp_path)
    assert "longer than wait_s" in errs["gate.pulse_s"]
    assert "at least 1 minute" in errs["gate.apb_window_min"]


def test_a_missing_site_says_what_it_is(tmp_path):
    doc = base()
    del doc["site"]
    errs = errors_of(doc, tmp_path)
    assert list(errs) == ["site"] and "required" in errs["site"]


def test_a_toml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[site]\nid = "s"\ngate = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 3" in str(info.value)


def test_a_missing_file_says_where_to_get_one(tmp_path):
    with pytest.raises(ConfigError, match="examples/agent.toml"):
        load_config(tmp_path / "nope.toml")


def test_the_journal_budget_must_hold_its_capacity(tmp_path):
    errs = errors_of(base(journal={"capacity_events": 1_000_000, "disk_budget_mb": 100}), tmp_path)
    assert "cannot hold capacity_events" in errs["journal.disk_budget_mb"]


# --- readers -----------------------------------------------------------------------------------


def test_readers_must_match_the_gates_directions_and_the_board(tmp_path):
    doc = base(gate={"readers": {"entry": "in", "exit": "out"}})
    doc["hardware"]["readers"] = [
        {"name": "entry", "type": "wiegand", "d0": 4, "d1": 21},     # BCM 4 is a relay
        {"name": "side", "type": "wiegand"},                          # no direction, not wired
        {"name": "entry2", "type": "rdm6300", "port": "/dev/ttyUSB0", "format": 26},
    ]
    errs = errors_of(doc, tmp_path)
    assert "does not apply to a reader of type rdm6300" in errs["hardware.readers[2].format"]
    assert "unlock_a" in errs["hardware.readers[0].d0"]
    assert "no direction" in errs["hardware.readers[1].name"]
    assert "no reader named 'exit'" in errs["gate.readers.exit"]


def test_serial_and_osdp_readers(tmp_path):
    key = secret_file(tmp_path, "exit.scbk", SCBK)
    doc = base(gate={"readers": {"entry": "in", "exit": "out", "side": "out"}})
    doc["hardware"]["readers"] = [
        {"name": "entry", "type": "rdm6300", "port": "/dev/gate-reader"},
        {"name": "exit", "type": "osdp", "port": "/dev/ttyUSB0", "address": 1, "scbk_file": "exit.scbk"},
        {"name": "side", "type": "osdp", "port": "/dev/ttyUSB0", "address": 2, "scbk_file": str(key)},
    ]
    cfg = parse_config(doc, base_dir=tmp_path, env={})
    by = {r.name: r for r in cfg.hardware.readers}
    assert by["entry"].port == "/dev/gate-reader" and by["entry"].repeat_window_s == 1.5
    assert by["exit"].scbk == SCBK and by["exit"].scbk_file == str(key)  # relative to the config dir
    # Two OSDP readers on one bus with one address: refused.
    doc["hardware"]["readers"][2]["address"] = 1
    errs = errors_of(doc, tmp_path)
    assert "already used by reader exit" in errs["hardware.readers[2].address"]
    # A serial reader on the OSDP bus: refused.
    doc["hardware"]["readers"][2]["address"] = 2
    doc["hardware"]["readers"][0]["port"] = "/dev/ttyUSB0"
    errs = errors_of(doc, tmp_path)
    assert "own port" in errs["hardware.readers[1].port"]


def test_osdp_keys_must_be_private_real_and_not_the_install_key(tmp_path):
    doc = base(gate={"readers": {"a": "in", "b": "out", "c": "in"}})
    secret_file(tmp_path, "a.scbk", SCBK, mode=0o644)
    secret_file(tmp_path, "b.scbk", "not hex at all")
    secret_file(tmp_path, "c.scbk", bytes(range(0x30, 0x40)).hex())
    doc["hardware"]["readers"] = [
        {"name": n, "type": "osdp", "port": "/dev/ttyUSB0", "address": i, "scbk_file": f"{n}.scbk"}
        for i, n in enumerate("abc")]
    errs = errors_of(doc, tmp_path)
    assert "chmod 0640" in errs["hardware.readers[0].scbk_file"]
    assert "32 hex digits" in errs["hardware.readers[1].scbk_file"]
    assert "SCBK-D" in errs["hardware.readers[2].scbk_file"]
    assert all(SCBK not in m for m in errs.values())
    del doc["hardware"]["readers"][0]["scbk_file"]
    assert "required" in errors_of(doc, tmp_path)["hardware.readers[0].scbk_file"]


def test_an_unknown_profile_lists_the_known_ones(tmp_path):
    errs = errors_of(base(hardware={"profile": "pi9-laser"}), tmp_path)
    assert "pi4-relay4" in errs["hardware.profile"]


# --- secrets -----------------------------------------------------------------------------------


def test_the_password_comes_from_a_file_and_is_never_shown(tmp_path):
    secret_file(tmp_path, "mqtt-password", SECRET)
    cfg = parse_config(base(mqtt={"host": "broker", "username": "gate1", "password_file": "mqtt-password"}),
                       base_dir=tmp_path, env={})
    assert cfg.mqtt.password == SECRET
    assert SECRET not in json.dumps(cfg.redacted()) and SECRET not in repr(cfg)
    assert cfg.redacted()["mqtt"]["password_set"] is True


def test_the_password_comes_from_the_environment(tmp_path):
    doc = base(mqtt={"host": "${BROKER}", "username": "gate1", "password": "${MQTT_PASSWORD}",
                     "client_id": "literal-$${NOT_EXPANDED}"})
    cfg = parse_config(doc, base_dir=tmp_path, env={"BROKER": "mqtt.example", "MQTT_PASSWORD": SECRET})
    assert cfg.mqtt.host == "mqtt.example" and cfg.mqtt.password == SECRET
    assert cfg.mqtt.client_id == "literal-${NOT_EXPANDED}"
    assert cfg.redacted()["mqtt"]["password"] == "<redacted>"
    errs = errors_of(doc, tmp_path, env={"BROKER": "x"})
    assert "MQTT_PASSWORD is not set" in errs["mqtt.password"]


def test_secret_mistakes_are_explained_without_quoting_the_secret(tmp_path):
    secret_file(tmp_path, "open-password", SECRET, mode=0o644)
    errs = errors_of(base(mqtt={"host": "b", "password_file": "open-password"}), tmp_path)
    assert "every user can read it" in errs["mqtt.password_file"]
    assert "a password needs a username" in errs["mqtt.username"]
    errs = errors_of(base(mqtt={"host": "b", "username": "u", "password": 12345678}), tmp_path)
    assert "12345678" not in errs["mqtt.password"] and "a string" in errs["mqtt.password"]
    errs = errors_of(base(mqtt={"host": "b", "username": "u", "password": SECRET,
                                "password_file": "open-password"}), tmp_path)
    assert "not both" in errs["mqtt.password_file"]
    assert all(SECRET not in m for m in errs.values())


def test_tls_files_must_exist_pair_up_and_keep_the_key_private(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    secret_file(tmp_path, "gate.key", "k", mode=0o644)
    errs = errors_of(base(mqtt={"host": "b", "tls": {"ca_file": "ca.pem", "key_file": "gate.key",
                                                      "cert_file": "missing.pem"}}), tmp_path)
    assert "does not exist" in errs["mqtt.tls.cert_file"]
    assert "chmod 0640" in errs["mqtt.tls.key_file"]
    (tmp_path / "gate.key").chmod(0o600)
    errs = errors_of(base(mqtt={"host": "b", "tls": {"ca_file": "ca.pem", "key_file": "gate.key"}}), tmp_path)
    assert "both cert_file and key_file" in errs["mqtt.tls"]
    cfg = parse_config(base(mqtt={"host": "b", "tls": {"ca_file": "ca.pem"}}), base_dir=tmp_path, env={})
    assert cfg.mqtt.port == 8883 and cfg.mqtt.tls.ca_file == str(tmp_path / "ca.pem")


def test_trusted_keys_from_base64_or_files(tmp_path):
    key, b64 = public_key_b64()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "k2.pem").write_bytes(pem)
    (tmp_path / "k3.pub").write_text(b64 + "\n")
    cfg = parse_config(base(commands={"trusted_keys": {"k1": b64, "k2": "./k2.pem",
                                                       "k3": str(tmp_path / "k3.pub")}}),
                       base_dir=tmp_path, env={})
    assert cfg.commands.trusted_keys == {"k1": b64, "k2": b64, "k3": b64}
    shown = cfg.redacted()["commands"]["trusted_keys"]
    assert shown["k1"] == shown["k2"] and shown["k1"].startswith("ed25519:")
    errs = errors_of(base(commands={"trusted_keys": {"bad": "bm90IGEga2V5", "gone": "/nonexistent.pub"}}),
                     tmp_path)
    assert "not an Ed25519 public key" in errs["commands.trusted_keys.bad"]
    assert "does not exist" in errs["commands.trusted_keys.gone"]


def test_a_base64_key_starting_with_a_slash_is_a_key_not_a_path(tmp_path):
    raw = b"\xff" + bytes(31)  # base64 "/wAA..."
    b64 = base64.b64encode(raw).decode()
    assert b64.startswith("/")
    cfg = parse_config(base(commands={"trusted_keys": {"k1": b64}}), base_dir=tmp_path, env={})
    assert cfg.commands.trusted_keys == {"k1": b64}


def test_warnings_point_at_risky_but_working_settings(tmp_path):
    cfg = parse_config(base(commands={"allow_unsigned": True}), base_dir=tmp_path, env={})
    text = " ".join(cfg.warnings())
    assert "runs offline" in text and "lab only" in text and "simulated hardware" in text


def test_a_password_written_in_the_file_is_a_warning_saying_what_to_do(tmp_path):
    def warned(password: str, env: dict | None = None) -> bool:
        doc = base(mqtt={"host": "b", "username": "u", "password": password})
        cfg = parse_config(doc, base_dir=tmp_path, env=env or {"P": SECRET, "Q": "x"})
        return any("mqtt.password" in w for w in cfg.warnings())

    assert warned(SECRET)
    assert warned("pre-${P}")  # part of it in the file
    assert warned("$${P}")  # "$${" is a literal "${": the file holds the text
    assert not warned("${P}") and not warned("${P}${Q}")
    # The other ways give no warning.
    secret_file(tmp_path, "mqtt-password", SECRET)
    cfg = parse_config(base(mqtt={"host": "b", "username": "u", "password_file": "mqtt-password"}),
                       base_dir=tmp_path, env={})
    assert not any("mqtt.password" in w for w in cfg.warnings())
    # The warning says what to do, and never quotes the password.
    cfg = parse_config(base(mqtt={"host": "b", "username": "u", "password": SECRET}), base_dir=tmp_path, env={})
    text = " ".join(cfg.warnings())
    assert "clear text" in text and "client certificate" in text and "mqtt.password_file" in text
    assert "${ENV_NAME}" in text and SECRET not in text


def test_the_password_warning_has_a_russian_translation():
    from agent import i18n
    from agent.config import PASSWORD_IN_FILE

    i18n.set_language("ru")
    try:
        russian = i18n._(PASSWORD_IN_FILE)
    finally:
        i18n.set_language(None)
    assert russian != PASSWORD_IN_FILE and "открытым текстом" in russian
    for kept in ("mqtt.password_file", "chmod 0640", "${ENV_NAME}", "[mqtt.tls]"):
        assert kept in russian


def test_doctor_shows_the_password_warning_in_the_technician_s_language(tmp_path):
    from agent import i18n
    from agent.tools.doctor import Doctor, DoctorEnv

    (tmp_path / "state").mkdir(mode=0o700)
    path = tmp_path / "agent.toml"
    path.write_text(f'[site]\nid = "s"\ngate = "g"\n[hardware]\npin_factory = "mock"\n'
                    f'[service]\nstate_dir = "{tmp_path / "state"}"\n'
                    f'[journal]\npath = "{tmp_path / "state" / "journal.db"}"\n'
                    f'[mqtt]\nusername = "u"\npassword = "{SECRET}"\n')
    env = DoctorEnv(gpio_chips=list, service_active=lambda: None, clock_synced=lambda: True,
                    implementation=lambda: "compiled")
    for lang, text in (("en", "clear text"), ("ru", "открытым текстом")):
        i18n.set_language(lang)
        try:
            config = next(c for c in Doctor(path, env=env).run() if c.name == "config")
        finally:
            i18n.set_language(None)
        assert any(text in h for h in config.hints), (lang, config.hints)
        assert not any(SECRET in h for h in config.hints)


# --- check-config ------------------------------------------------------------------------------


def run_check(path: Path, capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="gate-agent")
    add_check_config_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["check-config", str(path)])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_config_prints_ok_and_a_redacted_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEST_MQTT_PASSWORD", SECRET)
    path = tmp_path / "agent.toml"
    path.write_text('[site]\nid = "s"\ngate = "g"\n[hardware]\npin_factory = "mock"\n'
                    '[mqtt]\nhost = "b"\nusername = "u"\npassword = "${TEST_MQTT_PASSWORD}"\n')
    code, out, err = run_check(path, capsys)
    assert code == 0, err
    assert out.startswith(f"OK: {path}")
    assert SECRET not in out
    assert "warning: mqtt.password" not in out  # it comes from the environment
    summary = json.loads(out[out.index("{"):])
    assert summary["mqtt"]["host"] == "b" and summary["gate"]["wait_s"] == 5.0


def test_check_config_warns_of_a_password_in_clear_text(tmp_path, capsys):
    path = tmp_path / "agent.toml"
    path.write_text('[site]\nid = "s"\ngate = "g"\n[hardware]\npin_factory = "mock"\n'
                    f'[mqtt]\nhost = "b"\nusername = "u"\npassword = "{SECRET}"\n')
    code, out, err = run_check(path, capsys)
    assert code == 0, err  # it works: a warning, not an error
    assert "warning: mqtt.password is written in the config file in clear text" in out
    assert SECRET not in out


def test_check_config_lists_every_problem_and_exits_2(tmp_path, capsys):
    path = tmp_path / "agent.toml"
    path.write_text('[site]\nid = "s"\ngate = "g"\n[gate]\npulse_s = 0.05\nwait_s = 99\n')
    code, out, err = run_check(path, capsys)
    assert code == 2 and out == ""
    assert "gate.pulse_s: 0.05 is below 0.1" in err and "gate.wait_s: 99 is above 60" in err
    assert "2 problem(s)" in err


def test_the_example_config_in_the_repository_is_checked(tmp_path, capsys):
    example = Path(__file__).resolve().parent.parent / "examples" / "agent.toml"
    text = example.read_text().replace("#[site]", "[site]").replace('#id = "school-17"', 'id = "school-17"') \
        .replace('#gate = "main-1"', 'gate = "main-1"').replace('#pin_factory = "auto"', 'pin_factory = "mock"')
    path = tmp_path / "agent.toml"
    path.write_text(text)
    code, _, err = run_check(path, capsys)
    assert code == 0, err


def test_every_key_is_documented():
    """docs/configuration.md names every key of the schema."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    props = schema()["properties"]
    missing = []
    for section, node in props.items():
        for key, sub in node.get("properties", {}).items():
            keys = [f"{key}.{k}" for k in sub.get("properties", {})] or [key]  # [mqtt.tls]: its keys
            missing += [f"{section}.{k}" for k in keys if f"`{section}.{k}`" not in doc]
    reader = schema()["$defs"]["reader"]["properties"]
    missing += [f"readers[].{k}" for k in reader if f"`{k}`" not in doc]
    assert missing == []
    assert os.path.exists(Path(__file__).resolve().parent.parent / "examples" / "agent.toml")


def test_the_wiegand_lag_bound_defaults_to_the_readers_own_and_has_limits(tmp_path):
    from agent.hw.wiegand_gpio import DEFAULT_MAX_LAG_S

    assert parse_config(base(), base_dir=tmp_path, env={}).hardware.wiegand_max_lag_s == DEFAULT_MAX_LAG_S
    cfg = parse_config(base(hardware={"wiegand_max_lag_s": 0.3}), base_dir=tmp_path, env={})
    assert cfg.hardware.wiegand_max_lag_s == 0.3
    for bad in (0, 5, "fast"):
        assert "hardware.wiegand_max_lag_s" in errors_of(base(hardware={"wiegand_max_lag_s": bad}), tmp_path)


def test_a_fire_release_the_board_does_not_wire_is_an_error(tmp_path):
    """Else fire and free mode would drive no line at all and the gate would stay locked."""
    src = Path(__file__).resolve().parent.parent / "hardware" / "profiles" / "pi4-relay4.toml"
    lines = [ln for ln in src.read_text().splitlines() if not ln.startswith("fire_release")]
    board = tmp_path / "no-release.toml"
    board.write_text("\n".join(lines) + "\n")
    errs = errors_of(base(hardware={"profile": str(board)}), tmp_path)
    assert "no fire_release output" in errs["gate.fire_release"]
    # Said false, the core holds both unlock lines in fire and free mode instead.
    cfg = parse_config(base(hardware={"profile": str(board)}, gate={"fire_release": False}),
                       base_dir=tmp_path, env={})
    assert cfg.gate.fire_release is False


def test_every_input_error_is_one_problems_error_with_its_problems_listed(tmp_path):
    """Config, gate settings, profile and scenario errors share one form (agent.core.problems)."""
    from agent.core.gateconfig import GateConfig, GateConfigError
    from agent.core.problems import ProblemsError
    from agent.hw.profiles import ProfileError
    from agent.simulator import ScenarioError, load_scenario

    bad = tmp_path / "agent.toml"
    bad.write_text('[site]\nid = "s"\ngate = "g"\n[gate]\napb = "sometimes"\npulse_s = 0.05\n')
    errors = []
    for build in (lambda: load_config(bad), lambda: GateConfig(pulse_s=-1), lambda: load_scenario(tmp_path / "none.toml")):
        with pytest.raises(ProblemsError) as exc:
            build()
        errors.append(exc.value)
    assert isinstance(errors[0], ConfigError) and isinstance(errors[1], GateConfigError)
    assert isinstance(errors[2], ScenarioError) and issubclass(ProfileError, ProblemsError)
    for e in errors:
        assert e.problems, e
        assert str(e).splitlines()[1:] == [f"  - {p}" for p in e.problems]
    assert any("gate.apb" in p for p in errors[0].problems) and any("gate.pulse_s" in p for p in errors[0].problems)
