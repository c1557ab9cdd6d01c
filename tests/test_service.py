# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
"""The service end to end: the real Service on simulated hardware (gpiozero's
MockFactory), a temp state directory, a real mosquitto and the reference
ingest; systemd's notify socket is a datagram socket bound in tmp_path.

In-process tests reach the mock pins (a card through the Wiegand adapter
opens the relay); subprocess tests run ``python -m agent.cli run`` as systemd would
(READY=1, WATCHDOG=1, STATUS=, SIGTERM, exit codes). Every wait is on a
condition; nothing asserts how long something took.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.core import events as ev
from agent.core.cards import encode_w26
from agent.downlink.signing import generate_keypair, sign_acl
from agent.logsetup import JournalFormatter as _JournalFormatter
from agent.sdnotify import Notifier, watchdog_interval
from agent.service import Service
from agent.statefile import StateFile
from tests.agentproc import journal_records
from tests.broker import Observer, broker, ingest_at, make_broker, wait_until  # noqa: F401
from tests.twins import one_twin  # noqa: F401 (the fp fixture: one twin)

ROOT = Path(__file__).resolve().parent.parent
SITE, GATE = "school7", "gate1"
CARD = (100, 60179)  # "100,60179"
PERSON = "p-1"
ALWAYS = {d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def acl_snapshot(version: str = "t.1") -> dict:
    return {
        "kind": "snapshot",
        "version": version,
        "site": SITE,
        "timezone": "UTC",
        "schedules": {"always": {"week": ALWAYS}},
        "groups": {"pupils": {"entry": "always", "exit": "always"}},
        "people": [{"id": PERSON, "cards": [f"{CARD[0]},{CARD[1]}"], "groups": ["pupils"]}],
    }


def write_config(tmp_path: Path, *, broker=None, keys: dict | None = None, extra: str = "") -> Path:
    """A config for simulated hardware with everything under tmp_path."""
    lines = [
        "[site]", f'id = "{SITE}"', f'gate = "{GATE}"',
        "[hardware]", 'pin_factory = "mock"',
        "[journal]", 'path = "data/journal.db"', "sync_interval_s = 0.2",
        "[service]", 'state_dir = "state"',
    ]
    if broker is not None:
        lines += ["[mqtt]", f'host = "{broker.host}"', f"port = {broker.port}",
                  "backoff_max_s = 1", "telemetry_interval_s = 1"]
    if keys:
        lines += ["[commands.trusted_keys]", *(f'{k} = "{v}"' for k, v in keys.items())]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


class NotifySocket:
    """What systemd listens on: a datagram socket; collects the notifications."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.extend(data.decode().splitlines())

    def lines(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [m for m in self.messages if m.startswith(prefix)]

    def count(self, line: str) -> int:
        with self._lock:
            return self.messages.count(line)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path):
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()




def w26_edges(bits: str, t0: float, rng: random.Random) -> list[tuple[float, int, int]]:
    """A frame as (t, line, level) edges: 50 us low pulses, 2 ms apart (docs/design.md#wiegand)."""
    edges, t = [], t0
    for b in bits:
        edges += [(t, int(b), 0), (t + 50e-6 + rng.uniform(0, 20e-6), int(b), 1)]
        t += 2e-3
    return edges


def pin_history(svc: Service, line: str) -> list[bool]:
    """Whether the output line was active, at each state change of its mock pin since
    the device claimed it (the first entry is the mock pin's own default level)."""
    spec = svc.config.hardware.board.outputs[line]
    return [s.state == spec.active_high for s in svc.factory.pin(f"GPIO{spec.pin}").states[1:]]


def line_active(svc: Service, line: str) -> bool:
    spec = svc.config.hardware.board.outputs[line]
    return svc.factory.pin(f"GPIO{spec.pin}").state == spec.active_high


def drive_input(svc: Service, name: str, asserted: bool) -> None:
    spec = svc.config.hardware.board.inputs[name]
    pin = svc.factory.pin(f"GPIO{spec.pin}")
    (pin.drive_high if asserted == spec.active_high else pin.drive_low)()


# --- in process: the whole chain ---------------------------------------------------------


def test_card_on_the_wiegand_lines_opens_the_relay_and_the_events_reach_the_ingest(
        tmp_path, broker, ingest_at, services):
    signer, public = generate_keypair()
    ingest = ingest_at(broker)
    svc = services(write_config(tmp_path, broker=broker, keys={"k1": public}))
    wait_until(lambda: svc.uplink.connected, what="the uplink connected")

    # The server sends a signed list over MQTT; the downlink applies it.
    envelope = sign_acl(signer, acl_snapshot(), key_id="k1", site=SITE, gate=GATE, counter=1)
    with Observer(broker, f"gate/v1/{SITE}/{GATE}/#") as obs:
        obs.publish(f"gate/v1/{SITE}/{GATE}/acl", json.dumps(envelope))
        wait_until(lambda: getattr(svc.gate.table, "version", "") == "t.1", what="the list applied")

        # A card on the entry reader's D0/D1 lines (explicit edge times, see docs/design.md#testing-wiegand-on-mock-pins).
        assert not any(pin_history(svc, "unlock_a"))  # never pulsed at start
        svc.readers["entry"].feed_edges(w26_edges(encode_w26(*CARD), time.monotonic(), random.Random(1)))
        wait_until(lambda: any(pin_history(svc, "unlock_a")), what="unlock A driven")
        drive_input(svc, "pass_a", True)  # the arm turns
        drive_input(svc, "pass_a", False)

        def stored(rtype):
            return [e for e in ingest.events(SITE, GATE) if e["type"] == rtype]

        wait_until(lambda: stored("passage"), timeout=15, what="the passage at the ingest")
        granted = stored("access.granted")
        assert granted and granted[0]["person"] == PERSON
        assert stored("passage")[0]["direction"] == "in"
        assert stored("acl.applied")[0]["version"] == "t.1"
        # Telemetry flows too.
        wait_until(lambda: obs.records(f"gate/v1/{SITE}/{GATE}/telemetry"), what="telemetry")
    assert not line_active(svc, "unlock_a")  # a pulse, not a held line


def test_stop_leaves_every_output_inactive_and_keeps_the_state(tmp_path, services):
    svc = services(write_config(tmp_path))
    svc.runtime.submit(ev.SetMode("lockdown", by="command"))
    wait_until(lambda: line_active(svc, "stop"), what="Stop driven in lockdown")
    outputs = svc.config.hardware.board.outputs
    pins = {line: svc.factory.pin(f"GPIO{o.pin}") for line, o in outputs.items()}
    svc.stop()
    for line, o in outputs.items():
        assert pins[line].state != o.active_high, f"{line} left active"
    state = tmp_path / "state" / "gate-state.json"
    assert state.exists() and state.stat().st_mode & 0o777 == 0o600
    records = journal_records(tmp_path / "data" / "journal.db")
    assert [r["to"] for r in records if r["type"] == "mode.changed"][-1] == "lockdown"


def test_a_remote_lockdown_holds_across_a_restart(tmp_path, services):
    config = write_config(tmp_path)
    svc = services(config)
    svc.runtime.submit(ev.SetMode("lockdown", by="command", request_id="r-1"))
    wait_until(lambda: line_active(svc, "stop"), what="Stop driven in lockdown")
    svc.stop()
    again = services(config)
    assert again.gate.mode == "lockdown"
    wait_until(lambda: line_active(again, "stop"), what="Stop driven again after the restart")
    again.runtime.submit(ev.SetMode("normal", by="command", request_id="r-2"))
    wait_until(lambda: not line_active(again, "stop"), what="Stop released by the next command")
    again.stop()
    third = services(config)
    assert third.gate.mode == "normal"


def test_a_fire_latch_survives_a_restart_and_only_the_reset_ends_it(tmp_path, services):
    config = write_config(tmp_path)
    svc = services(config)
    drive_input(svc, "fire_loop", True)
    wait_until(lambda: line_active(svc, "fire_release"), what="the release driven by the fire loop")
    drive_input(svc, "fire_loop", False)  # the alarm is over; nobody reset the release yet
    assert svc.runtime.wait_idle(10)
    assert svc.gate.mode == "fire"
    svc.stop()

    again = services(config)
    assert again.gate.mode == "fire"
    wait_until(lambda: line_active(again, "fire_release"), what="the release driven at once after the restart")
    assert not any(pin_history(again, "unlock_a")) and not any(pin_history(again, "unlock_b"))
    drive_input(again, "fire_reset", True)  # the guard turns the reset key
    drive_input(again, "fire_reset", False)
    wait_until(lambda: not line_active(again, "fire_release"), what="the release dropped by the reset")
    assert again.gate.mode == "normal"
    again.stop()

    records = journal_records(tmp_path / "data" / "journal.db")
    changes = [(r["from"], r["to"], r["by"]) for r in records if r["type"] == "mode.changed"]
    assert changes == [("normal", "fire", "fire_loop"), ("normal", "fire", "restored"),
                       ("fire", "normal", "fire_reset")]
    third = services(config)
    assert third.gate.mode == "normal" and not line_active(third, "fire_release")


def test_an_unusable_broker_setting_leaves_the_gate_working_and_raises_an_alarm(tmp_path, services):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    config = write_config(tmp_path, extra=f'[mqtt]\nhost = "127.0.0.1"\nport = 1\n[mqtt.tls]\nca_file = "{ca}"\n')
    svc = services(config)
    assert svc.uplink is None
    svc.runtime.submit(ev.Button("in"))
    wait_until(lambda: line_active(svc, "unlock_a"), what="the button opens with no uplink")
    svc.stop()
    alarms = [r for r in journal_records(tmp_path / "data" / "journal.db") if r["type"] == "alarm"]
    assert any(a["kind"] == "uplink_config" and a["active"] for a in alarms), alarms


def test_the_gate_thread_hands_the_state_to_a_writer_and_never_fsyncs(tmp_path, fp, monkeypatch):
    fsyncs: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(threading.current_thread().name),
                                                 real_fsync(fd))[1])
    state = fp.GateState()
    state.record_passage("p-1", 0, 1_790_000_000, 20_000, False)
    sf = StateFile(tmp_path / "gate-state.json", fp, interval_s=5.0)
    assert sf.maybe_save(state, 100.0, "lockdown")
    sf.close()
    assert fsyncs and threading.current_thread().name not in fsyncs, fsyncs
    loaded = StateFile(tmp_path / "gate-state.json", fp)
    assert loaded.load().to_dict() == state.to_dict()
    assert loaded.mode == "lockdown"


def test_the_watchdog_comes_from_the_gate_thread_and_stops_when_it_is_stuck(tmp_path, notify, services):
    notifier = Notifier({"NOTIFY_SOCKET": str(notify.path)})
    svc = services(write_config(tmp_path), notifier=notifier, env={"WATCHDOG_USEC": "200000"})
    wait_until(lambda: notify.count("READY=1") == 1, what="READY=1")
    wait_until(lambda: notify.count("WATCHDOG=1") >= 3, what="keep-alives")

    release = threading.Event()
    real_handle = svc.gate.handle

    def stuck(event, now):
        release.wait(10)
        return real_handle(event, now)

    svc.gate.handle = stuck
    svc.runtime.submit(ev.Tick())
    # Give a healthy thread room for several keep-alives (0.1 s apart): a stuck one sends none.
    stuck_at = notify.count("WATCHDOG=1")
    time.sleep(1.0)
    assert notify.count("WATCHDOG=1") <= stuck_at + 1
    release.set()
    svc.gate.handle = real_handle
    wait_until(lambda: notify.count("WATCHDOG=1") >= stuck_at + 3, what="keep-alives again")


def test_a_damaged_state_file_is_moved_aside_and_the_gate_still_starts(tmp_path, services):
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "gate-state.json").write_text("{not json")
    svc = services(write_config(tmp_path))
    assert svc.ready.is_set()
    assert list((tmp_path / "state").glob("gate-state.json.corrupt-*"))


# --- subprocess: as systemd runs it -------------------------------------------------------


def run_agent(config: Path, tmp_path: Path, *, notify: NotifySocket | None = None,
              env_extra: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                               "JOURNAL_STREAM", "GATE_PUREPYTHON")}
    env["PYTHONPATH"] = str(ROOT)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
        env["WATCHDOG_USEC"] = "400000"
    env.update(env_extra or {})
    if env.get("GATE_PUREPYTHON") == "1":
        env.pop("GATE_REQUIRE_COMPILED", None)  # CI requires the compiled twin; this run asks for the pure one
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 20) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the agent did not exit; stderr:\n{err}") from None
    return proc.returncode, err


def test_new_board_is_ready_keeps_the_watchdog_fed_and_stops_cleanly_on_sigterm(tmp_path, broker, notify):
    with Observer(broker, f"gate/v1/{SITE}/{GATE}/#") as obs:
        proc = run_agent(write_config(tmp_path, broker=broker), tmp_path, notify=notify)
        try:
            wait_until(lambda: notify.count("READY=1") == 1 or proc.poll() is not None, timeout=20,
                       what="READY=1")
            assert proc.poll() is None, finish(proc)[1]
            wait_until(lambda: notify.count("WATCHDOG=1") >= 3, what="WATCHDOG=1 again and again")
            wait_until(lambda: any("broker connected" in s for s in notify.lines("STATUS=")),
                       what="a STATUS= line with the broker state")
            status_line = notify.lines("STATUS=")[-1]
            assert "mode normal" in status_line and "backlog" in status_line and "acl none" in status_line

            def alarms():
                return [r for r in obs.records(f"gate/v1/{SITE}/{GATE}/events") if r["type"] == "alarm"]

            # A new board: no list, so the core raises acl_missing (and asks for a snapshot).
            wait_until(lambda: any(a["kind"] == "acl_missing" and a["active"] for a in alarms()),
                       what="alarm acl_missing published")
        finally:
            proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
        assert code == 0, err
        assert "STOPPING=1" in notify.lines("STOPPING")

    # The retained status now says offline (published by the agent, not the will).
    with Observer(broker, f"gate/v1/{SITE}/{GATE}/status") as late:
        wait_until(lambda: late.all(), what="the retained status")
        _, payload, retained = late.all()[-1]
        assert retained and json.loads(payload) == {"v": 1, "state": "offline", "boot": json.loads(payload)["boot"],
                                                    "reason": "shutdown"}
    # Journal flushed and closed: no WAL left behind, every record readable.
    db = tmp_path / "data" / "journal.db"
    assert not (tmp_path / "data" / "journal.db-wal").exists() or \
        (tmp_path / "data" / "journal.db-wal").stat().st_size == 0
    types = [r["type"] for r in journal_records(db)]
    assert types[0] == "agent.started" and "acl.requested" in types
    assert "fastpath" in err  # the twin in use is logged at start


def test_a_broken_config_exits_2_naming_every_problem(tmp_path):
    config = write_config(tmp_path, extra="[gate]\npulse_s = 0.05\napb = \"sometimes\"\n"
                                          "[mqtt]\nhost = \"x\"\nwindow = 0\n")
    code, err = finish(run_agent(config, tmp_path))
    assert code == 2
    for key in ("gate.pulse_s", "gate.apb", "mqtt.window"):
        assert key in err, err
    assert "0.05 is below 0.1" in err


def test_require_compiled_refuses_the_pure_twin(tmp_path):
    config = write_config(tmp_path, extra="")
    text = config.read_text().replace("[service]", "[service]\nrequire_compiled = true")
    config.write_text(text)
    code, err = finish(run_agent(config, tmp_path, env_extra={"GATE_PUREPYTHON": "1"}))
    assert code == 1
    assert "require_compiled" in err and "pure" in err
    assert not (tmp_path / "data" / "journal.db").exists()  # refused before anything was opened


# --- the small parts --------------------------------------------------------------------------


def test_sdnotify_is_a_no_op_without_the_socket_and_reaches_an_abstract_one():
    assert not Notifier({}).ready()
    name = f"gate-agent-test-{os.getpid()}-{random.getrandbits(32)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready("mode normal;\nbacklog 0")
        assert s.recv(1024).decode().splitlines() == ["READY=1", "STATUS=mode normal; backlog 0"]
        n.close()


def test_watchdog_interval_is_half_the_timeout_and_only_for_the_watched_pid():
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, pid=2) is None


def test_statefile_round_trips_both_twins_atomically_and_privately(tmp_path, fp):
    state = fp.GateState()
    state.record_passage("p-1", 0, 1_790_000_000, 20_000, False)
    sf = StateFile(tmp_path / "gate-state.json", fp)
    assert sf.save(state, 0.0)
    assert not sf.save(state, 1.0)  # unchanged: not written again
    assert (tmp_path / "gate-state.json").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["gate-state.json"]  # no temp file left
    loaded = StateFile(tmp_path / "gate-state.json", fp).load()
    assert loaded.to_dict() == state.to_dict()
    assert not sf.maybe_save(state, 2.0)  # within the interval


def test_statefile_keeps_the_fire_latch_and_saves_a_new_mode_or_latch_at_once(tmp_path, fp):
    state = fp.GateState()
    sf = StateFile(tmp_path / "gate-state.json", fp, interval_s=60.0)
    assert sf.maybe_save(state, 100.0, "normal")
    assert not sf.maybe_save(state, 101.0, "normal")  # within the interval, nothing new
    assert sf.maybe_save(state, 102.0, "normal", fire=True)  # the latch: at once, whatever the interval
    sf.close()
    loaded = StateFile(tmp_path / "gate-state.json", fp)
    loaded.load()
    assert (loaded.mode, loaded.fire) == ("normal", True)
    assert loaded.save(state, 103.0, "normal", fire=False)
    again = StateFile(tmp_path / "gate-state.json", fp)
    again.load()
    assert (again.mode, again.fire) == ("normal", False)
    assert "fire" not in json.loads((tmp_path / "gate-state.json").read_text())  # as earlier versions wrote


def test_journald_lines_carry_the_priority_and_stay_on_one_line():
    import logging

    fmt = _JournalFormatter(prefix=True)
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("agent", logging.ERROR, __file__, 1, "failed\nsecond line", None,
                                sys.exc_info())
    text = fmt.format(rec)
    assert text.startswith("<3>agent: failed") and "\n" not in text and "ValueError: boom" in text
    warn = logging.LogRecord("agent", logging.WARNING, __file__, 1, "w", None, None)
    assert fmt.format(warn).startswith("<4>")
    assert not _JournalFormatter(prefix=False).format(warn).startswith("<")


def test_telemetry_and_status_say_whether_the_access_list_is_stale(tmp_path, services):
    from agent.contract import validate

    svc = services(write_config(tmp_path))
    tel = svc.telemetry()
    assert tel["acl_stale"] is False
    assert validate("telemetry", tel) == []
    assert svc._status_fields()["acl_stale"] is False
    # A list past its maximum age (the downlink's verdict) shows in telemetry.
    svc.downlink.status = lambda: {"acl_version": "v1", "acl_age_s": 9e6, "acl_stale": True}
    tel = svc.telemetry()
    assert tel["acl_stale"] is True and tel["acl_age_s"] == 9e6
    assert validate("telemetry", tel) == []


def test_telemetry_shows_each_queue_lane_and_what_it_dropped(tmp_path, services):
    from agent.contract import validate
    from agent.core.events import Report

    svc = services(write_config(tmp_path))
    svc.runtime._limits["downlink"] = 0  # a full downlink lane: every report is refused
    assert svc.runtime.submit(Report("alarm", {"kind": "x", "active": True})) is False
    tel = svc.telemetry()
    assert validate("telemetry", tel) == []
    assert tel["queues"]["dropped"] == {"hardware": 0, "downlink": 1, "site": 0}
    assert set(tel["queues"]["depth"]) == {"fire", "hardware", "downlink", "site"}


def test_telemetry_carries_the_downlink_guard_and_the_gate_clock_respects_the_time_floor(
        tmp_path, services):
    from agent.contract import validate

    svc = services(write_config(tmp_path))
    tel = svc.telemetry()
    assert validate("telemetry", tel) == []
    assert tel["downlink"]["cmd"]["received"] == 0 and tel["downlink"]["time_floor"] is None
    # A floor an hour ahead of this machine's clock (a Pi after a power cut, no NTP):
    ahead = time.time() + 3600
    svc.downlink.wall_floor = lambda: ahead
    assert svc.runtime.clock.now().wall >= ahead
    assert svc._max_packet_bytes() > svc.config.acl.max_list_bytes


def test_a_clean_stop_journals_the_flood_guards_last_summary(tmp_path, services):
    svc = services(write_config(tmp_path))
    cmd = svc.downlink.topics["cmd"]
    for i in range(500):  # junk on the cmd topic, all within one window
        svc.downlink.on_message(cmd, json.dumps({"junk": i}).encode(), {"message_expiry_interval": 30})
    svc.stop()
    records = journal_records(tmp_path / "data" / "journal.db")
    floods = [r for r in records if r["type"] == "alarm" and r["kind"] == "downlink_flood"]
    assert floods and floods[0]["active"] is True
    assert sum(1 for r in records if r["type"] == "command.result") <= 10


def test_the_retained_status_carries_the_list_version_pushed_with_acl_push(tmp_path, services, broker):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from agent.downlink.signing import generate_keypair, private_key_pem
    from agent.regional.tools import main as regional

    key, pub = generate_keypair()
    svc = services(write_config(tmp_path, broker=broker, keys={"region-1": pub}))
    status_topic = f"gate/v1/{SITE}/{GATE}/status"
    wait_until(lambda: svc.uplink.connected, what="the uplink")
    with Observer(broker, status_topic) as first:
        wait_until(lambda: first.records(status_topic), what="the birth status")
        assert first.records(status_topic)[-1]["acl_version"] is None  # a new board: no list yet
    (tmp_path / "region.key").write_bytes(private_key_pem(key))
    acl = {"kind": "snapshot", "version": "2026-12-05.1", "site": SITE, "timezone": "UTC",
           "schedules": {"always": {"week": {d: ["00:00-24:00"] for d in
                                             ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}}},
           "groups": {"pupils": {"entry": "always", "exit": "always"}},
           "people": [{"id": "p-1", "cards": ["100,60179"], "groups": ["pupils"]}]}
    (tmp_path / "school.json").write_text(json.dumps(acl))
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = regional(["acl", "push", str(tmp_path / "school.json"), "--site", SITE, "--gate", GATE,
                         "--host", broker.host, "--port", str(broker.port),
                         "--key", str(tmp_path / "region.key"), "--key-id", "region-1", "--wait", "20"])
    assert code == 0, out.getvalue()

    def retained_version():
        # A new subscriber gets the retained status first; a live one the agent
        # publishes meanwhile may follow it (not retained when delivered): skip those.
        with Observer(broker, status_topic) as late:
            wait_until(lambda: [m for m in late.all() if m[2]], what="the retained status")
            _topic, payload, _retained = next(m for m in late.all() if m[2])
        return json.loads(payload)["acl_version"]

    wait_until(lambda: retained_version() == "2026-12-05.1", 10, "the retained status to name the list")
