# ruff: noqa: F811 - pytest fixtures imported from tests.broker and tests.pki, used as arguments
"""``gate-agent doctor``: one line per check, what is wrong and what to do; exit 1
when anything FAILs. The machine's answers (GPIO chips, service state, clock,
fastpath) are injected where a test needs a given answer; the no-GPIO case
runs on this very machine."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.core.events import Now
from agent.core.records import make_record
from agent.i18n import set_language
from agent.tools.doctor import FAIL, OK, SKIP, WARN, Doctor, DoctorEnv, run_doctor
from agent.uplink.journal import Journal
from tests.broker import broker, make_broker  # noqa: F401
from tests.pki import GATE_A, SITE, gate_broker, pki  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _english():
    set_language("en")
    yield
    set_language(None)


def write_config(folder: Path, *, site: str = "s1", gate: str = "g1", pin_factory: str = "mock",
                 extra: str = "", readers: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state").mkdir(mode=0o700, exist_ok=True)
    cfg = folder / "agent.toml"
    cfg.write_text(
        f'[site]\nid = "{site}"\ngate = "{gate}"\n{readers}'
        f'[hardware]\npin_factory = "{pin_factory}"\n'
        f'[journal]\npath = "{folder / "state" / "journal.db"}"\n'
        f'[service]\nstate_dir = "{folder / "state"}"\n{extra}')
    return cfg


def quiet_env(**overrides) -> DoctorEnv:
    """A machine where everything answers well; tests change one answer at a time."""
    base = {"gpio_chips": list, "service_active": lambda: None, "clock_synced": lambda: True,
                "wall": time.time, "implementation": lambda: "compiled", "boot_dirs": (), "boot_time": lambda: None}
    base.update(overrides)
    return DoctorEnv(**base)


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def write_acl(state: Path, *, age_s: float = 60.0, version: str = "v-1") -> None:
    doc = {"format": 1, "applied_at": time.time() - age_s, "kind": "snapshot", "base": None,
           "list": {"version": version, "people": [{"id": "p-1"}, {"id": "p-2"}]}}
    (state / "acl.json").write_text(json.dumps(doc))


def fill_journal(path: Path, n: int, age_s: float = 0.0) -> None:
    with Journal(path, boot="b") as j:
        now = time.time() - age_s
        j.commit([make_record("access.granted", Now(1.0 + i, now + i, True), "b", reader="entry", direction="in",
                              card=1, format="w26", person="p-1") for i in range(n)])


# --------------------------------------------------------------------------- this machine


@pytest.mark.skipif(bool(glob.glob("/dev/gpiochip*")), reason="this machine has GPIO")
def test_on_a_machine_without_gpio_the_doctor_says_so_and_exits_non_zero(tmp_path):
    cfg = write_config(tmp_path, pin_factory="auto")
    code = "import sys; from agent.tools.doctor import run_doctor; sys.exit(run_doctor(sys.argv[1]))"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LC_")}, "LANG": "C.UTF-8"}
    res = subprocess.run([sys.executable, "-c", code, str(cfg)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    gpio = [line for line in res.stdout.splitlines() if line.split()[1:2] == ["gpio"]]
    assert gpio and gpio[0].startswith("FAIL") and "no GPIO on this machine" in gpio[0]
    assert "/dev/gpiochip" in gpio[0] and 'pin_factory = "mock"' in res.stdout  # and what to do
    # One line per check, each with its verdict.
    names = [line.split()[1] for line in res.stdout.splitlines() if line[:4] in ("OK  ", "WARN", "FAIL", "--  ")]
    for name in ("config", "gpio", "readers", "serial", "broker", "clock", "disk", "journal", "fastpath", "acl"):
        assert name in names


# --------------------------------------------------------------------------- whole runs


def test_nothing_failing_means_exit_zero(tmp_path, capsys):
    cfg = write_config(tmp_path)
    fill_journal(tmp_path / "state" / "journal.db", 3)
    write_acl(tmp_path / "state")
    assert run_doctor(cfg, env=quiet_env()) == 0
    out = capsys.readouterr().out
    assert "FAIL " not in out and "OK: " in out


def test_a_broken_config_fails_with_every_problem_and_the_command_to_recheck(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[site]\nid = "s 1"\n[gate]\napb = "sometimes"\n')
    checks = Doctor(cfg, env=quiet_env()).run()
    c = by_name(checks)["config"]
    assert c.status == FAIL
    hints = " ".join(c.hints)
    assert "site.gate" in hints and "gate.apb" in hints and f"check-config {cfg}" in hints
    assert by_name(checks)["broker"].status == SKIP  # depends on the config: said, not guessed


def test_a_check_that_crashes_is_a_fail_line_not_a_crash(tmp_path):
    cfg = write_config(tmp_path)

    def boom() -> bool:
        raise RuntimeError("adjtimex exploded")

    checks = by_name(Doctor(cfg, env=quiet_env(clock_synced=boom)).run())
    assert checks["clock"].status == FAIL and "adjtimex exploded" in checks["clock"].summary
    assert checks["fastpath"].status == OK  # the others still ran


# --------------------------------------------------------------------------- gpio


def test_mock_pins_are_a_warning_not_a_pass(tmp_path):
    checks = by_name(Doctor(write_config(tmp_path), env=quiet_env()).run())
    assert checks["gpio"].status == WARN and "mock" in checks["gpio"].summary


def test_free_pins_are_claimed_at_rest_with_the_configured_factory_and_released(tmp_path):
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    cfg = write_config(tmp_path, pin_factory="auto")
    env = quiet_env(gpio_chips=lambda: ["/dev/null"], service_active=lambda: False,
                    pin_factory=lambda name: factory)
    checks = by_name(Doctor(cfg, env=env).run())
    assert checks["gpio"].status == OK, checks["gpio"]
    # Every relay output was driven only to its inactive level (high on the active-low board).
    from agent.hw.profiles import load_profile

    board = load_profile("pi4-relay4")
    for name, spec in board.outputs.items():
        states = [s.state for s in factory.pin(f"GPIO{spec.pin}").states]
        assert bool(spec.active_high) not in states[1:], (name, states)
    factory.reset()


def test_pins_held_by_another_program_are_a_fail_saying_to_stop_it(tmp_path):
    from gpiozero import DigitalOutputDevice
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    holder = DigitalOutputDevice(4, pin_factory=factory)  # BCM 4: unlock_a on pi4-relay4
    cfg = write_config(tmp_path, pin_factory="auto")
    env = quiet_env(gpio_chips=lambda: ["/dev/null"], service_active=lambda: False,
                    pin_factory=lambda name: factory)
    gpio = by_name(Doctor(cfg, env=env).run())["gpio"]
    assert gpio.status == FAIL and "busy" in gpio.summary and "stop it" in " ".join(gpio.hints)
    holder.close()
    factory.reset()


def test_while_the_service_runs_the_pins_are_not_touched(tmp_path):
    def no_factory(name):
        raise AssertionError("the doctor must not claim pins the service holds")

    cfg = write_config(tmp_path, pin_factory="auto")
    env = quiet_env(gpio_chips=lambda: ["/dev/null"], service_active=lambda: True, pin_factory=no_factory)
    checks = by_name(Doctor(cfg, env=env, wait_card_s=5).run())
    assert checks["gpio"].status == OK and "running service" in checks["gpio"].summary
    assert checks["readers"].status == WARN and "systemctl stop" in " ".join(checks["readers"].hints)


# --------------------------------------------------------------------------- readers, serial


def test_wait_card_reads_a_card_from_a_serial_reader(tmp_path):
    master, slave = os.openpty()
    port = os.ttyname(slave)
    readers = ('[gate]\nreaders = { entry = "in" }\n'
               f'[[hardware.readers]]\nname = "entry"\ntype = "rdm6300"\nport = "{port}"\n')
    cfg = write_config(tmp_path, readers=readers)
    done = threading.Event()

    def card_holder() -> None:  # a card held in the field: the reader repeats its frame
        while not done.wait(0.2):
            os.write(master, b"\x02" + b"14008EC793" + b"CE" + b"\x03")

    t = threading.Thread(target=card_holder, daemon=True)
    t.start()
    try:
        checks = by_name(Doctor(cfg, env=quiet_env(service_active=lambda: False), wait_card_s=10).run())
    finally:
        done.set()
        t.join()
        os.close(master)
        os.close(slave)
    entry = checks["reader entry"]
    assert entry.status == OK and "142,51091" in entry.summary  # the RDM6300 example of docs/design.md#em-marine-cards-and-the-rdm6300
    assert checks[f"serial {port}"].status == OK


def test_a_missing_serial_port_fails_with_the_udev_hint(tmp_path):
    readers = ('[gate]\nreaders = { entry = "in" }\n'
               '[[hardware.readers]]\nname = "entry"\ntype = "rdm6300"\nport = "/dev/gate-reader-none"\n')
    checks = by_name(Doctor(write_config(tmp_path, readers=readers), env=quiet_env()).run())
    c = checks["serial /dev/gate-reader-none"]
    assert c.status == FAIL and "udev" in " ".join(c.hints)


def test_readers_are_not_tested_unless_asked(tmp_path):
    checks = by_name(Doctor(write_config(tmp_path), env=quiet_env()).run())
    assert checks["readers"].status == SKIP and "--wait-card" in " ".join(checks["readers"].hints)


# --------------------------------------------------------------------------- broker


def _broker_config(tmp_path: Path, pki_: object, port: int, ident: object) -> Path:
    extra = (f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n[mqtt.tls]\nca_file = "{pki_.ca_file}"\n'
             f'cert_file = "{ident.cert}"\nkey_file = "{ident.key}"\n')
    return write_config(tmp_path, site=SITE, gate=GATE_A, extra=extra)


def test_the_broker_is_reached_with_tls_and_the_certificate_days_are_shown(tmp_path, pki, gate_broker):
    cfg = _broker_config(tmp_path, pki, gate_broker.port, pki.gate_a)
    c = by_name(Doctor(cfg, env=quiet_env()).run())["broker"]
    assert "MQTT accepted" in c.summary and "TLS" in c.summary and "days left" in c.summary
    # The test CA issues one-day certificates: that is a warning with the date.
    assert c.status == WARN and "expires on" in " ".join(c.hints)


def test_a_revoked_certificate_is_a_fail(tmp_path, pki, gate_broker):
    cfg = _broker_config(tmp_path, pki, gate_broker.port, pki.revoked)
    c = by_name(Doctor(cfg, env=quiet_env()).run())["broker"]
    assert c.status == FAIL
    hints = " ".join(c.hints)
    assert "revoked" in hints and "school-17/stolen" in hints  # and it is not this gate's certificate


def test_an_unreachable_broker_is_a_fail_naming_host_and_port(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens once closed
    cfg = write_config(tmp_path, extra=f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n')
    c = by_name(Doctor(cfg, env=quiet_env()).run())["broker"]
    assert c.status == FAIL and f"127.0.0.1:{port}" in c.summary and "firewall" in " ".join(c.hints)


def test_the_mqtt_probe_gets_a_connack_from_a_real_broker(broker):
    from agent.mqttclient import probe_connect

    assert probe_connect(broker.host, broker.port, "doctor-probe") == 0


def test_no_broker_configured_is_a_warning(tmp_path):
    c = by_name(Doctor(write_config(tmp_path), env=quiet_env()).run())["broker"]
    assert c.status == WARN and "provision" in " ".join(c.hints)


# --------------------------------------------------------------------------- clock, disk, journal, fastpath, acl


def test_the_clock(tmp_path):
    cfg = write_config(tmp_path)
    assert by_name(Doctor(cfg, env=quiet_env()).run())["clock"].status == OK
    unsynced = by_name(Doctor(cfg, env=quiet_env(clock_synced=lambda: False)).run())["clock"]
    assert unsynced.status == WARN and "timedatectl" in " ".join(unsynced.hints)
    fake_1970 = by_name(Doctor(cfg, env=quiet_env(wall=lambda: 86400.0 * 365)).run())["clock"]
    assert fake_1970.status == FAIL and "RTC" in " ".join(fake_1970.hints)


def test_a_nearly_full_disk_fails(tmp_path, monkeypatch):
    import shutil

    from agent.tools.doctor import storage

    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    c = by_name(Doctor(write_config(tmp_path), env=quiet_env()).run())["disk"]
    assert c.status == FAIL and "journalctl --vacuum-size" in " ".join(c.hints)


def test_the_journal_backlog_and_integrity(tmp_path):
    cfg = write_config(tmp_path)
    journal = tmp_path / "state" / "journal.db"
    assert by_name(Doctor(cfg, env=quiet_env()).run())["journal"].status == WARN  # none yet
    fill_journal(journal, 4)
    c = by_name(Doctor(cfg, env=quiet_env()).run())["journal"]
    assert c.status == OK and "4" in c.summary
    for p in tmp_path.glob("state/journal.db*"):
        p.unlink()
    fill_journal(journal, 4, age_s=3 * 3600)  # three hours of events the server never confirmed
    c = by_name(Doctor(cfg, env=quiet_env()).run())["journal"]
    assert c.status == WARN and "broker" in " ".join(c.hints)
    journal.write_bytes(b"garbage" * 1000)
    c = by_name(Doctor(cfg, env=quiet_env()).run())["journal"]
    assert c.status == FAIL


def test_the_pure_fastpath_warns_and_fails_when_the_config_requires_the_compiled_one(tmp_path):
    env = quiet_env(implementation=lambda: "pure")
    assert by_name(Doctor(write_config(tmp_path / "a"), env=env).run())["fastpath"].status == WARN
    strict = write_config(tmp_path / "b", extra="require_compiled = true\n")
    c = by_name(Doctor(strict, env=env).run())["fastpath"]
    assert c.status == FAIL and "install.sh" in " ".join(c.hints)


def test_the_access_list_age(tmp_path):
    cfg = write_config(tmp_path, extra="[acl]\nmax_age_h = 1\n")
    state = tmp_path / "state"
    missing = by_name(Doctor(cfg, env=quiet_env()).run())["acl"]
    assert missing.status == WARN and "refused" in missing.summary
    write_acl(state, age_s=600, version="2026-09-01.1")
    fresh = by_name(Doctor(cfg, env=quiet_env()).run())["acl"]
    assert fresh.status == OK and "2026-09-01.1" in fresh.summary
    write_acl(state, age_s=3 * 3600)
    stale = by_name(Doctor(cfg, env=quiet_env()).run())["acl"]
    assert stale.status == WARN and "max_age_h" in " ".join(stale.hints)
    (state / "acl.json").write_text("{broken")
    assert by_name(Doctor(cfg, env=quiet_env()).run())["acl"].status == FAIL


def test_the_checklist_in_russian(tmp_path, capsys):
    set_language("ru")
    run_doctor(write_config(tmp_path), env=quiet_env(gpio_chips=list))
    out = capsys.readouterr().out
    assert "последовательные считыватели не настроены" in out


def test_a_read_only_card_is_a_fail_saying_what_is_wrong_and_what_to_do(tmp_path):
    from agent.uplink.failover import FailoverJournal
    from tests.readonly import read_only

    cfg = write_config(tmp_path)
    state, run = tmp_path / "state", tmp_path / "run"
    fill_journal(state / "journal.db", 3)
    with read_only(state):
        fj = FailoverJournal(state / "journal.db", fallback_dir=run, boot="b")  # as the service does
        try:
            fj.commit([make_record("access.granted", Now(1.0, time.time(), True), "b", reader="entry",
                                   direction="in", card=1, format="w26", person="p-1")])
            checks = Doctor(cfg, env=quiet_env(runtime_dir=run)).run()
        finally:
            fj.close()
    c = by_name(checks)
    disk = c["disk"]
    assert disk.status == FAIL and "read-only" in disk.summary and "SD card" in disk.summary
    hints = " ".join(disk.hints)
    assert "dmesg" in hints and f"findmnt -no OPTIONS -T {state}" in hints and "replace the SD card" in hints
    fallback = c["fallback"]
    assert fallback.status == WARN and "waiting for the server: 2" in fallback.summary  # the alarm and the card
    assert "power cut" in " ".join(fallback.hints)
    # The commands the hints quote run here.
    got = subprocess.run(["findmnt", "-no", "OPTIONS", "-T", str(tmp_path)], capture_output=True, text=True,
                         check=False)
    assert got.returncode == 0 and got.stdout.strip()


def test_the_read_only_card_in_russian(tmp_path, capsys):
    from tests.readonly import read_only

    cfg = write_config(tmp_path)
    set_language("ru")
    with read_only(tmp_path / "state"):
        run_doctor(cfg, env=quiet_env(runtime_dir=tmp_path / "run"))
    out = capsys.readouterr().out
    assert "SD-карта выходит из строя" in out and "dmesg" in out


# --------------------------------------------------------------------------- boot (config.txt)


def boot_env(*dirs: Path, **overrides) -> DoctorEnv:
    return quiet_env(boot_dirs=dirs, **overrides)


def _config_with_profile(tmp_path: Path, profile: str) -> Path:
    cfg = write_config(tmp_path / "etc")
    cfg.write_text(cfg.read_text().replace('[hardware]\n', f'[hardware]\nprofile = "{profile}"\n'))
    return cfg


def firmware(tmp_path: Path, text: str | None, where: str = "firmware") -> Path:
    d = tmp_path / "boot" / where if where else tmp_path / "boot"
    d.mkdir(parents=True, exist_ok=True)
    if text is not None:
        (d / "config.txt").write_text(text)
    return d


@pytest.mark.parametrize(("text", "status", "words"), [
    ("dtparam=audio=on\n[all]\ngpio=4-7=op,dh\n", OK, "relays stay off"),
    ("gpio=4,5,6,7=op,dh\n", OK, "relays stay off"),  # before any section: every board
    ("dtparam=audio=on\n", FAIL, "no line drives BCM 4, BCM 5, BCM 6, BCM 7"),
    ("[all]\ngpio=4-7=op,dl\n", FAIL, "drives BCM 4 low"),  # active-low relays ON at every start
    ("gpio=4-7=op,dh\ngpio=6=ip\n", FAIL, "no line drives BCM 6"),  # a later line undoes it
    ("[cm4]\ngpio=4-7=op,dh\n", FAIL, "section filter"),
])
def test_the_boot_line_of_the_profile_must_be_in_config_txt(tmp_path, text, status, words):
    cfg = _config_with_profile(tmp_path, "pi4-relay4")
    c = by_name(Doctor(cfg, env=boot_env(firmware(tmp_path, text))).run())["boot"]
    assert c.status == status, c
    assert words in c.summary + " ".join(c.hints), c
    if status == FAIL:
        hints = " ".join(c.hints)
        assert "gpio=4-7=op,dh" in hints and "[all]" in hints and "reboot" in hints
        assert "sudo tee -a" in hints or "remove that gpio= line" in hints


def test_the_fix_the_doctor_gives_makes_the_check_pass(tmp_path):
    cfg = _config_with_profile(tmp_path, "pi-opto")
    boot = firmware(tmp_path, "dtparam=audio=on\n[cm5]\ndtoverlay=dwc2,dr_mode=host")  # no final newline
    c = by_name(Doctor(cfg, env=boot_env(boot)).run())["boot"]
    assert c.status == FAIL and "gpio=17,22,23,27=op,dl" in c.summary
    command = next(h for h in c.hints if "printf" in h).split("run: ", 1)[1]
    command = command.replace("sudo ", "")
    subprocess.run(["bash", "-c", command + " >/dev/null"], check=True, timeout=10)
    assert by_name(Doctor(cfg, env=boot_env(boot)).run())["boot"].status == OK


def test_bookworm_reads_boot_firmware_not_the_stub_in_boot(tmp_path):
    cfg = _config_with_profile(tmp_path, "pi4-relay4")
    fw = firmware(tmp_path, "dtparam=audio=on\n")
    # The technician followed an old guide and wrote the line into the bookworm stub.
    old = firmware(tmp_path, "DO NOT EDIT THIS FILE\n\nThe file you are looking for has moved to "
                   "/boot/firmware/config.txt\ngpio=4-7=op,dh\n", where="")
    c = by_name(Doctor(cfg, env=boot_env(fw, old)).run())["boot"]
    assert c.status == FAIL and str(fw / "config.txt") in c.summary
    assert any(str(old / "config.txt") in h and "does not read" in h for h in c.hints), c.hints
    # An older release: only /boot/config.txt, and it is the real one.
    (fw / "config.txt").unlink()
    (old / "config.txt").write_text("[all]\ngpio=4-7=op,dh\n")
    c = by_name(Doctor(cfg, env=boot_env(fw, old)).run())["boot"]
    assert c.status == OK and str(old / "config.txt") in c.summary


def test_a_line_written_since_this_start_says_the_next_start_applies_it(tmp_path):
    cfg = _config_with_profile(tmp_path, "pi4-relay4")
    fw = firmware(tmp_path, "gpio=4-7=op,dh\n")
    before = by_name(Doctor(cfg, env=boot_env(fw, boot_time=lambda: time.time() + 60)).run())["boot"]
    assert before.status == OK and not before.hints  # written before this start: in force
    after = by_name(Doctor(cfg, env=boot_env(fw, boot_time=lambda: time.time() - 60)).run())["boot"]
    assert after.status == OK and "next start" in " ".join(after.hints)


def test_no_boot_partition_is_skipped_on_a_laptop_and_a_warning_on_a_pi(tmp_path):
    cfg = _config_with_profile(tmp_path, "pi4-relay4")
    empty = tmp_path / "nothing"
    assert by_name(Doctor(cfg, env=boot_env(empty)).run())["boot"].status == SKIP  # mock pins, no GPIO
    real = write_config(tmp_path / "pi", pin_factory="auto")
    real.write_text(real.read_text().replace('[hardware]\n', '[hardware]\nprofile = "pi4-relay4"\n'))
    env = boot_env(empty, gpio_chips=lambda: ["/dev/null"], service_active=lambda: True)
    c = by_name(Doctor(real, env=env).run())["boot"]
    assert c.status == WARN and "mount" in " ".join(c.hints)


def test_a_profile_without_boot_lines_needs_none(tmp_path):
    profile = tmp_path / "quiet.toml"
    text = (ROOT / "hardware" / "profiles" / "pi4-relay4.toml").read_text()
    profile.write_text(text.replace('boot_config = ["gpio=4-7=op,dh"]', "").replace('name = "pi4-relay4"',
                                                                                    'name = "quiet"'))
    cfg = _config_with_profile(tmp_path, str(profile))
    c = by_name(Doctor(cfg, env=boot_env(firmware(tmp_path, "dtparam=audio=on\n"))).run())["boot"]
    assert c.status == SKIP and "quiet" in c.summary


def test_the_boot_check_speaks_russian(tmp_path):
    set_language("ru")
    cfg = _config_with_profile(tmp_path, "pi4-relay4")
    c = by_name(Doctor(cfg, env=boot_env(firmware(tmp_path, "dtparam=audio=on\n"))).run())["boot"]
    assert c.status == FAIL and "реле" in c.summary and "перезагрузите" in " ".join(c.hints)


def test_doctor_never_takes_over_the_running_agents_broker_session(tmp_path, pki, gate_broker):
    # The running agent holds gate A's session (the client id is the certificate's identity).
    from agent.uplink.journal import Journal
    from agent.uplink.mqtt import Uplink

    journal = Journal(tmp_path / "journal.db")
    up = Uplink(journal, site=SITE, gate=GATE_A, host=gate_broker.host, port=gate_broker.port,
                tls=pki.gate_a.tls(pki.ca_file), backoff_min_s=0.1, backoff_max_s=0.5).start()
    try:
        deadline = time.monotonic() + 10
        while not up.connected:
            assert time.monotonic() < deadline, "the agent's uplink did not connect"
            time.sleep(0.02)
        cfg = _broker_config(tmp_path, pki, gate_broker.port, pki.gate_a)
        env = quiet_env(service_active=lambda: True,
                        service_status=lambda: "mode normal; backlog 0; broker connected; acl v-1")
        c = by_name(Doctor(cfg, env=env).run())["broker"]
        time.sleep(0.5)  # a takeover would have dropped the agent's session by now
        assert up.connected and up.stats()["reconnects"] == 0, "doctor took the agent's session"
        assert c.status in (OK, WARN) and "TLS accepted" in c.summary and "connected" in c.summary
        # An agent that lost its broker is a FAIL saying where to look.
        env = quiet_env(service_active=lambda: True,
                        service_status=lambda: "mode normal; backlog 40; broker disconnected; acl v-1")
        c = by_name(Doctor(cfg, env=env).run())["broker"]
        assert c.status == FAIL and "journalctl" in " ".join(c.hints)
    finally:
        up.stop()
        journal.close()


def test_a_broker_refusing_the_gates_account_is_a_fail_with_the_reason(tmp_path):
    """The MQTT stage of the broker check: the network and the port answer, but the broker's
    CONNACK refuses the account, and doctor says so with what to do."""
    import subprocess

    from tests.broker import Mosquitto

    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "gate", "right"], check=True)
    passwords.chmod(0o644)  # mosquitto, switched to this user, must read it
    broker = Mosquitto(tmp_path / "mq", extra_conf=f"password_file {passwords}").start()
    try:
        secret = tmp_path / "mqtt.pass"
        secret.write_text("wrong\n")
        secret.chmod(0o600)
        extra = (f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "gate"\n'
                 f'password_file = "{secret}"\n')
        c = by_name(Doctor(write_config(tmp_path / "cfg", extra=extra), env=quiet_env()).run())["broker"]
        assert c.status == FAIL and "0x87" in c.summary and "not authorised" in c.summary  # mosquitto 2: bad password
        assert any("regional office" in h for h in c.hints)
        secret.write_text("right\n")
        c = by_name(Doctor(write_config(tmp_path / "cfg", extra=extra), env=quiet_env()).run())["broker"]
        assert "MQTT accepted" in c.summary
    finally:
        broker.stop()
