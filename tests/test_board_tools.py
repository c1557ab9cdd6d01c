"""The bench tools read the board's own config (issue 11, "tools read the board").

``gate-agent io-test``, ``gate-agent enroll`` and ``gate-agent doctor
--wait-card`` take the hardware profile, the pin factory, the readers
(Wiegand, serial, OSDP) and the key width from the config file (default
/etc/gate-agent/agent.toml, or --config), so the docs' bare commands work on
a board; a config that cannot be used is one line saying what to do, exit 2.
Readers are real: an RDM6300 frame through a pty, libosdp's own peripheral
device over a pty with Secure Channel; pins are gpiozero's MockFactory.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.cli import main
from agent.i18n import set_language
from agent.tools import EXIT_OK, EXIT_USAGE
from tests.test_tools import EXAMPLE_FRAME  # an RDM6300 frame of card 142,51091 (docs/readers.md)

ROOT = Path(__file__).resolve().parent.parent
KEY_HEX = "8b1f3c00d2a94e57a0b6c1d2e3f40516"
ADDRESS = 101


@pytest.fixture(autouse=True)
def _english():
    set_language("en")
    yield
    set_language(None)




def write_config(tmp_path: Path, body: str, *, site: bool = True) -> Path:
    """A board config: [site] (unless an unprovisioned board), state under tmp_path, mock pins."""
    head = '[site]\nid = "school-17"\ngate = "main-1"\n\n' if site else ""
    state = tmp_path / "state"
    text = (head + body + f'\n[journal]\npath = "{state}/journal.db"\n'
            f'\n[service]\nstate_dir = "{state}"\n')
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# --- io-test ------------------------------------------------------------------------------


def test_iotest_takes_profile_and_pin_factory_from_the_config(tmp_path, capsys):
    # pi-opto, not the default pi4-relay4: the profile shown can only come from the file.
    cfg = write_config(tmp_path, '[gate]\nreaders = { entry = "in" }\n\n'
                       '[hardware]\nprofile = "pi-opto"\npin_factory = "mock"\n', site=False)
    code, out, err = run_cli(["io-test", "--config", str(cfg), "-c", "show"], capsys)
    assert code == EXIT_OK, err
    assert "io-test on profile pi-opto" in out
    from agent.hw.profiles import load_profile

    pin = load_profile("pi-opto").outputs["unlock_a"].pin
    assert f"unlock_a      GPIO{pin:<2}" in out


def test_iotest_explicit_profile_still_overrides_the_config(tmp_path, capsys):
    cfg = write_config(tmp_path, '[hardware]\nprofile = "pi-opto"\npin_factory = "mock"\n')
    code, out, err = run_cli(["io-test", "--config", str(cfg), "--profile", "pi4-relay4", "-c", "show"], capsys)
    assert code == EXIT_OK, err
    assert "io-test on profile pi4-relay4" in out  # and the config's mock pins (no GPIO here)


@pytest.mark.parametrize("tool", [["io-test"], ["enroll"]])
def test_a_missing_config_is_one_line_with_what_to_do_and_exit_2(tool, tmp_path):
    missing = tmp_path / "nowhere" / "agent.toml"
    res = subprocess.run([sys.executable, "-m", "agent.cli", *tool, "--config", str(missing)],
                         check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "LANG": "C.UTF-8", "LC_ALL": "", "LANGUAGE": ""})
    assert res.returncode == EXIT_USAGE
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(missing) in lines[0] and "does not exist" in lines[0]
    assert "--config" in lines[0] and "--profile" in lines[0]


@pytest.mark.parametrize("body, says", [
    ('[hardware]\nprofile = "no-such-board"\npin_factory = "mock"\n', "hardware.profile"),
    ('[hardware\nprofile = "pi4-relay4"\n', "not valid TOML"),
    (('[hardware]\nprofile = "pi4-relay4"\npin_factory = "mock"\n[[hardware.readers]]\nname = "entry"\n'
     'type = "wiegand"\nd0 = 4\nd1 = 21\n[gate]\nreaders = { entry = "in" }\n'), "BCM 4 is already used"),
])
def test_an_unusable_hardware_section_says_what_is_wrong(body, says, tmp_path, capsys):
    cfg = write_config(tmp_path, body)
    for tool in (["io-test", "-c", "show"], ["enroll", "--timeout", "0.1"]):
        code, out, err = run_cli([tool[0], "--config", str(cfg), *tool[1:]], capsys)
        assert code == EXIT_USAGE, (tool, out, err)
        assert says in err and "--profile" in err and len(err.strip().splitlines()) == 1


# --- enroll -------------------------------------------------------------------------------


def test_enroll_without_options_reads_the_configs_serial_reader(pty_pair, tmp_path, capsys):
    master, port = pty_pair
    cfg = write_config(tmp_path, '[gate]\nreaders = { exit = "out" }\n\n[hardware]\nprofile = "pi4-relay4"\n'
                       f'pin_factory = "mock"\n\n[[hardware.readers]]\nname = "exit"\ntype = "rdm6300"\n'
                       f'port = "{port}"\n', site=False)  # an unprovisioned board: no [site] yet
    feeder = threading.Timer(1.0, os.write, (master, EXAMPLE_FRAME))
    feeder.start()
    try:
        code, out, err = run_cli(["enroll", "--config", str(cfg), "--count", "1", "--timeout", "20"], capsys)
    finally:
        feeder.cancel()
    assert code == EXIT_OK, err
    assert f"exit: rdm6300 on {port}" in out
    assert "card 1: facility,card 142,51091" in out and "print 0009357203" in out


def test_enroll_reader_by_name_takes_its_pins_from_the_config(tmp_path):
    from agent.cli import build_parser
    from agent.tools.enroll import WiegandSource, _source_from_args

    cfg = write_config(tmp_path, '[gate]\nreaders = { entry = "in", side = "out" }\n\n[hardware]\n'
                       'profile = "pi4-relay4"\npin_factory = "mock"\n\n[site]\nkey_width = 32\n'
                       '[[hardware.readers]]\nname = "entry"\ntype = "wiegand"\n\n'
                       '[[hardware.readers]]\nname = "side"\ntype = "wiegand"\nd0 = 2\nd1 = 3\nformat = 34\n',
                       site=False)
    args = build_parser().parse_args(["enroll", "--config", str(cfg), "--reader", "side"])
    sources, key_width = _source_from_args(args)
    assert key_width == 32
    assert len(sources) == 1 and isinstance(sources[0], WiegandSource)
    assert (sources[0].d0, sources[0].d1, sources[0].fixed_bits, sources[0].name) == (2, 3, 34, "side")
    args = build_parser().parse_args(["enroll", "--config", str(cfg)])
    sources, _ = _source_from_args(args)
    assert [s.name for s in sources] == ["entry", "side"]
    assert sources[0].factory is sources[1].factory  # one pin factory for the board's pins


def test_enroll_unknown_reader_names_the_configs_readers(tmp_path, capsys):
    cfg = write_config(tmp_path, '[hardware]\nprofile = "pi4-relay4"\npin_factory = "mock"\n')
    code, _out, err = run_cli(["enroll", "--config", str(cfg), "--reader", "lobby"], capsys)
    assert code == EXIT_USAGE
    assert "'lobby'" in err and "entry, exit" in err


# --- OSDP: libosdp's own reader on a pty ------------------------------------------------------

@pytest.fixture
def osdp_board(pty_pair, tmp_path):
    """(config path, present): a board whose reader "entry" is OSDP on a pty, libosdp's PD
    at the other end with the key in scbk_file; present() makes the PD send a W26 card."""
    osdp_mod = pytest.importorskip("osdp", reason="libosdp is not installed (pip install 'gate-agent[osdp]')")

    from tests.test_osdp_reader import MasterChannel  # the PD's end of the pty (osdp is there)

    master, port = pty_pair
    key = tmp_path / "entry.scbk"
    key.write_text(KEY_HEX + "\n")
    key.chmod(0o600)
    cfg = write_config(tmp_path, '[gate]\nreaders = { entry = "in" }\n\n[hardware]\nprofile = "pi4-relay4"\n'
                       'pin_factory = "mock"\n\n[[hardware.readers]]\nname = "entry"\ntype = "osdp"\n'
                       f'port = "{port}"\naddress = {ADDRESS}\nscbk_file = "entry.scbk"\n')
    pd = osdp_mod.PeripheralDevice(
        osdp_mod.PDInfo(ADDRESS, MasterChannel(master), scbk=bytes.fromhex(KEY_HEX),
                        flags=[osdp_mod.LibFlag.EnforceSecure]),
        osdp_mod.PDCapabilities([(osdp_mod.Capability.LEDControl, 1, 1)]),
        log_level=osdp_mod.LogLevel.Emergency,
    )
    pd.start()
    stop = threading.Event()

    def present() -> None:
        from agent.core.cards import encode_w26

        bits = encode_w26(142, 51091)
        padded = bits + "0" * (-len(bits) % 8)
        event = {"event": osdp_mod.Event.CardRead, "reader_no": 0, "direction": 0,
                 "format": osdp_mod.CardFormat.Wiegand, "length": len(bits),
                 "data": int(padded, 2).to_bytes(len(padded) // 8, "big")}

        def keep_presenting() -> None:
            # Until the panel has the Secure Channel up, a card is not taken: offer it again.
            while not stop.wait(0.5):
                pd.submit_event(event)

        threading.Thread(target=keep_presenting, daemon=True).start()

    try:
        yield cfg, present
    finally:
        stop.set()
        pd.teardown()


def test_enroll_reads_an_osdp_reader_of_the_config_over_secure_channel(osdp_board, capsys):
    cfg, present = osdp_board
    present()
    code, out, err = run_cli(["enroll", "--config", str(cfg), "--count", "1", "--timeout", "30"], capsys)
    assert code == EXIT_OK, err
    assert f"entry: osdp address {ADDRESS}" in out
    assert "card 1: facility,card 142,51091" in out


def test_doctor_wait_card_hears_an_osdp_reader(osdp_board):
    import io

    from agent.tools.doctor import OK, Doctor

    cfg, present = osdp_board
    present()
    doctor = Doctor(cfg, wait_card_s=30, out=io.StringIO())
    assert doctor.check_config().status == OK
    doctor.service_running = False
    checks = doctor.check_readers()
    assert [(c.status, c.name) for c in checks] == [(OK, "reader entry")], checks
    assert "142,51091" in checks[0].summary


def test_the_config_messages_are_in_russian_under_a_russian_locale(tmp_path):
    missing = tmp_path / "agent.toml"
    for tool in ("io-test", "enroll"):
        res = subprocess.run([sys.executable, "-m", "agent.cli", tool, "--config", str(missing)],
                             check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env={**os.environ, "LANG": "ru_RU.UTF-8", "LC_ALL": "", "LC_MESSAGES": "", "LANGUAGE": ""})
        assert res.returncode == EXIT_USAGE
        assert f"файла {missing} нет" in res.stderr and "укажите файл конфигурации" in res.stderr, res.stderr
        assert "does not exist" not in res.stderr


def test_explicit_hardware_still_takes_the_configs_pin_factory_and_key_width(tmp_path, capsys):
    # --reader with --profile names the pins; the config (mock pins, 32-bit keys) gives the rest,
    # so this runs on a machine without GPIO, as the config says it should.
    cfg = write_config(tmp_path, '[hardware]\nprofile = "pi4-relay4"\npin_factory = "mock"\n\n'
                       '[site]\nkey_width = 32\n', site=False)
    code, out, err = run_cli(["enroll", "--config", str(cfg), "--reader", "entry", "--profile", "pi4-relay4",
                              "--count", "1", "--timeout", "0.2"], capsys)
    assert code == 1 and "0 of 1" in err, err  # ran, and nobody presented a card
    assert "entry: wiegand on D0=GPIO20 D1=GPIO21 (key width 32)" in out


def test_the_doc_runner_never_points_a_board_tool_at_this_machines_etc():
    from tests.test_doc_commands import touches_the_real_board, with_config

    staged = Path("/tmp/x/etc/gate-agent/agent.toml")
    for line in ("gate-agent doctor", "gate-agent provision --site s --gate g --broker b:1",
                 "gate-agent journal export --pending > p.jsonl", "gate-agent check-config /etc/gate-agent/agent.toml"):
        assert not touches_the_real_board(with_config(line, staged)), line
        assert str(staged) in with_config(line, staged)
    assert touches_the_real_board("gate-agent doctor")
    assert touches_the_real_board("gate-agent check-config /etc/gate-agent/agent.toml")
    assert not touches_the_real_board(with_config("gate-agent monitor --broker h:1 --site s --gate g", staged))


def test_iotest_dry_run_on_mock_pins_starts_with_the_inputs_at_rest(tmp_path, capsys):
    # As the service's simulated hardware: no fire alarm, no open arm, the turnstile ready.
    cfg = write_config(tmp_path, '[hardware]\nprofile = "pi4-relay4"\npin_factory = "mock"\n', site=False)
    code, out, err = run_cli(["io-test", "--config", str(cfg), "-c", "show"], capsys)
    assert code == EXIT_OK, err
    inputs = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "GPIO" in line}
    assert "ASSERTED" in inputs["ready"]
    for name in ("pass_a", "pass_b", "fire_loop", "tamper", "button_in"):
        assert " rest " in inputs[name], inputs[name]
