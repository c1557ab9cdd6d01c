"""`gate-agent sim` (agent/simctl.py): the simulated hardware driven from outside.

Through the real service on gpiozero's MockFactory (in process) and through
the documented command line (``python -m agent.cli sim ...`` against
``python -m agent.cli run``): what is checked is what the gate recorded (its
journal), what its mock pins did, and what the socket answered. Every wait is
on a condition; nothing asserts how long something took.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import main as cli_main
from agent.config import ReaderSettings
from agent.core.acl import AccessList
from agent.core.events import Button
from agent.downlink.aclfiles import ACL_FILE, store_list
from agent.hw.profiles import load_profile
from agent.linesock import MAX_BAD_REQUESTS
from agent.service import Service
from agent.simctl import (
    MAX_REQUEST_BYTES,
    SimServer,
    SimServerError,
    request,
    socket_path,
)
from tests.agentproc import RawClient, journal_records
from tests.broker import wait_until

ROOT = Path(__file__).resolve().parent.parent
CARD = "100,60179"
UNKNOWN = "7,7"
ALWAYS = {d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def acl_doc() -> dict:
    return {
        "kind": "snapshot", "version": "sim.1", "site": "s1", "timezone": "UTC",
        "schedules": {"always": {"week": ALWAYS}},
        "groups": {"pupils": {"entry": "always", "exit": "always"}},
        "people": [{"id": "p-1", "cards": [CARD], "groups": ["pupils"]}],
    }


def make_agent(base: Path, *, pin_factory: str = "mock", extra: str = "") -> Path:
    """A config with everything under base, and an access list already on the board."""
    base.mkdir(parents=True, exist_ok=True)
    config = base / "agent.toml"
    config.write_text(
        '[site]\nid = "s1"\ngate = "g1"\n'
        f'[hardware]\npin_factory = "{pin_factory}"\n'
        '[journal]\npath = "data/journal.db"\nsync_interval_s = 0.1\n'
        '[service]\nstate_dir = "state"\n' + extra)
    state = base / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    store_list(state / ACL_FILE, AccessList.from_snapshot(acl_doc()), applied_at=time.time())
    return config




def line_active(svc: Service, line: str) -> bool:
    spec = svc.config.hardware.board.outputs[line]
    return svc.factory.pin(f"GPIO{spec.pin}").state == spec.active_high


def pulses(svc: Service, line: str) -> int:
    """How many times the output line went active since its device claimed it."""
    spec = svc.config.hardware.board.outputs[line]
    states = [s.state == spec.active_high for s in svc.factory.pin(f"GPIO{spec.pin}").states[1:]]
    return sum(1 for before, now in zip([False, *states], states, strict=False) if now and not before)


def sim(svc: Service, **doc) -> dict:
    if doc.get("op") == "card":
        doc.setdefault("wait", 10)  # the reply comes with the decision; a slow machine just takes longer
    return request(socket_path(svc.config.service.state_dir), doc, timeout=30)


# --- in process: the real service on mock pins --------------------------------------------


def test_a_sim_card_is_decided_and_a_grant_pulses_the_unlock_relay(tmp_path, services):
    svc = services(make_agent(tmp_path))
    assert pulses(svc, "unlock_a") == 0
    reply = sim(svc, op="card", reader="entry", card=CARD)
    assert reply["ok"] and reply["wiegand"] == "00110010011101011000100111"  # W26 of 100,60179
    decision = reply["decision"]
    assert (decision["type"], decision["person"], decision["direction"]) == ("access.granted", "p-1", "in")
    wait_until(lambda: pulses(svc, "unlock_a") == 1, what="unlock A pulsed")
    wait_until(lambda: not line_active(svc, "unlock_a"), what="the pulse over")

    refused = sim(svc, op="card", reader="exit", card=UNKNOWN)
    assert refused["decision"]["type"] == "access.denied"
    assert refused["decision"]["reason"] in ("unknown_card", "gate_busy")
    assert pulses(svc, "unlock_b") == 0
    # The record the reply names is the one in the journal: the card took the reader's path.
    by_id = {r["id"]: r for r in journal_records(tmp_path / "data" / "journal.db")}
    assert by_id[decision["id"]]["format"] == "w26" and by_id[decision["id"]]["card"] == reply["key"]


def test_sim_pass_after_a_grant_is_the_granted_persons_passage(tmp_path, services):
    svc = services(make_agent(tmp_path))
    assert sim(svc, op="card", reader="entry", card=CARD)["decision"]["type"] == "access.granted"
    assert sim(svc, op="pass", side="A") == {"ok": True, "op": "pass", "side": "A"}
    assert svc.runtime.wait_idle(10)
    passages = [r for r in journal_records(tmp_path / "data" / "journal.db") if r["type"] == "passage"]
    assert [(p["direction"], p["source"], p["person"]) for p in passages] == [("in", "card", "p-1")]
    # With no grant, the same sensor is a forced passage: the sensor really went through the gate.
    sim(svc, op="pass", side="B")
    assert svc.runtime.wait_idle(10)
    assert [r["direction"] for r in journal_records(tmp_path / "data" / "journal.db")
            if r["type"] == "passage.forced"] == ["out"]


def test_sim_fire_frees_the_gate_and_closed_plus_reset_returns_it(tmp_path, services):
    svc = services(make_agent(tmp_path))
    assert sim(svc, op="fire", loop="open")["ok"]
    wait_until(lambda: line_active(svc, "fire_release"), what="the fire release driven")
    assert svc.gate.mode == "fire"
    # A card during the alarm is recorded unchecked: who evacuated.
    assert sim(svc, op="card", reader="exit", card=UNKNOWN)["decision"]["check"] == "none"
    sim(svc, op="fire", loop="closed")
    assert svc.runtime.wait_idle(10)
    assert svc.gate.mode == "fire" and line_active(svc, "fire_release")  # latched until the reset
    assert sim(svc, op="fire-reset") == {"ok": True, "op": "fire-reset"}
    wait_until(lambda: not line_active(svc, "fire_release"), what="the release dropped by the reset")
    assert svc.gate.mode == "normal"
    changes = [(r["to"], r["by"]) for r in journal_records(tmp_path / "data" / "journal.db")
               if r["type"] == "mode.changed"]
    assert changes == [("fire", "fire_loop"), ("normal", "fire_reset")]


def test_sim_buttons_ready_and_tamper_reach_the_gate_as_inputs(tmp_path, services):
    svc = services(make_agent(tmp_path))
    assert sim(svc, op="button", direction="out")["ok"]
    wait_until(lambda: pulses(svc, "unlock_b") == 1, what="the exit button opened B")
    sim(svc, op="ready", value=False)
    sim(svc, op="tamper", value=True)
    sim(svc, op="tamper", value=False)
    sim(svc, op="ready", value=True)
    assert svc.runtime.wait_idle(10)
    got = [(r["type"], r.get("kind"), r.get("active")) for r in journal_records(tmp_path / "data" / "journal.db")
           if r["type"] in ("turnstile.fault", "turnstile.ready") or r.get("kind") == "tamper"]
    assert got == [("turnstile.fault", "ready_lost", None), ("alarm", "tamper", True),
                   ("alarm", "tamper", False), ("turnstile.ready", "ready_restored", None)]


def test_a_serial_reader_gets_its_card_as_bytes_through_its_decoder(tmp_path, services):
    master, slave = os.openpty()
    try:
        config = make_agent(tmp_path, extra=(
            '[[hardware.readers]]\nname = "entry"\ntype = "wiegand"\n'
            f'[[hardware.readers]]\nname = "exit"\ntype = "rdm6300"\nport = "{os.ttyname(slave)}"\n'
            "repeat_window_s = 10\n"))
        svc = services(config)
        reply = sim(svc, op="card", reader="exit", card=CARD)
        assert bytes.fromhex(reply["serial"]) == b"\x02000064EB139C\x03"  # 0x02, the tag (6613779), XOR 9C, 0x03
        assert (reply["decision"]["type"], reply["decision"]["person"]) == ("access.granted", "p-1")
        wait_until(lambda: pulses(svc, "unlock_b") == 1, what="unlock B pulsed")
        # The reader's own repeat filter applies: the same card at once is the card still in the field.
        again = sim(svc, op="card", reader="exit", card=CARD, wait=0.5)
        assert again["decision"] is None and again["repeat"] is True
        assert svc.readers["exit"].counters["cards"] == 1
    finally:
        os.close(master)
        os.close(slave)


def test_garbage_floods_and_silence_are_refused_and_the_gate_keeps_deciding(tmp_path, services):
    svc = services(make_agent(tmp_path))
    path = socket_path(svc.config.service.state_dir)
    silent = RawClient(path)  # connects and never says anything
    bad = RawClient(path)
    cases = [
        (b"hello\n", "bad_json"),
        (b"[1, 2]\n", "bad_json"),
        (b"\xff\xfe\n", "bad_json"),
        (b"[" * 2000 + b"]" * 2000 + b"\n", "bad_json"),  # nested past the parser's recursion limit
        (b'{"op": "launch"}\n', "unknown_op"),
        (b'{"op": "card", "reader": "entry"}\n', "bad_card"),
        (b'{"op": "card", "reader": "roof", "card": "1"}\n', "unknown_reader"),
        (b'{"op": "card", "reader": "entry", "card": "1", "wait": 99}\n', "bad_arg"),
        (b'{"op": "pass", "side": "C"}\n', "bad_arg"),
        (b'{"op": "ready", "value": "yes"}\n', "bad_arg"),
    ]
    for data, code in cases:
        bad.send(data)
        reply = bad.reply()
        assert reply is not None and not reply["ok"] and reply["error"] == code, (data, reply)
        assert reply["message"]
    # The gate decided nothing from all that, and still decides.
    assert sim(svc, op="card", reader="entry", card=CARD)["decision"]["type"] == "access.granted"
    # The last refusal used up the connection's budget: it is closed, the others go on.
    assert bad.reply() is None
    assert len(cases) == MAX_BAD_REQUESTS
    # An endless line is cut at the size limit.
    big = RawClient(path)
    big.send(b"{" + b" " * (MAX_REQUEST_BYTES + 10))
    assert big.reply()["error"] == "too_long"
    assert big.reply() is None
    # A flood of requests on one connection: refused once over the budget, the connection closed.
    flood = RawClient(path)
    flood.send(b'{"op": "ping"}\n' * 500)
    replies = []
    while (r := flood.reply()) is not None:
        replies.append(r)
    assert replies[0]["ok"] and sum(not r["ok"] for r in replies) == MAX_BAD_REQUESTS
    assert {r["error"] for r in replies if not r["ok"]} == {"busy"}
    time.sleep(1.1)  # the rate budget refills (a second's worth)
    assert sim(svc, op="card", reader="exit", card=UNKNOWN)["decision"]["type"] == "access.denied"
    silent.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        silent.sock.recv(1)  # still connected, still ignored: it held nothing up
    for c in (silent, bad, big, flood):
        c.close()
    assert svc.runtime.counters["core_errors"] == 0 and not svc.gate.faulted


def test_more_clients_than_allowed_are_told_busy_and_the_slot_frees(tmp_path, services):
    svc = services(make_agent(tmp_path))
    path = socket_path(svc.config.service.state_dir)
    held = [RawClient(path) for _ in range(svc.simctl.max_clients)]
    wait_until(lambda: len(svc.simctl._clients) == len(held), what="every client accepted")
    extra = RawClient(path)
    assert extra.reply()["error"] == "busy"
    assert extra.reply() is None
    held.pop().close()
    wait_until(lambda: len(svc.simctl._clients) < svc.simctl.max_clients, what="a slot freed")
    assert sim(svc, op="ping")["ok"]
    for c in held:
        c.close()


def test_the_socket_is_private_replaces_a_stale_one_and_goes_at_stop(tmp_path, services):
    config = make_agent(tmp_path)
    path = tmp_path / "state" / "sim.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # what an agent killed with -9 leaves: a socket nobody listens on
    stale.close()
    svc = services(config)
    st = path.stat()
    assert (st.st_mode & 0o777) == 0o600
    assert sim(svc, op="ping")["readers"] == {"entry": "wiegand", "exit": "wiegand"}
    svc.stop()
    assert not path.exists()
    assert [p.name for p in (tmp_path / "state").iterdir() if "sim" in p.name] == []


def test_a_second_agent_on_the_same_state_directory_leaves_the_first_ones_socket(tmp_path, services):
    svc = services(make_agent(tmp_path))
    path = socket_path(svc.config.service.state_dir)
    other = SimServer(path, factory=svc.factory, profile=svc.config.hardware.board, readers={},
                      reader_settings=[])
    with pytest.raises(SimServerError, match="another agent"):
        other.start()
    assert sim(svc, op="ping")["ok"]


def test_a_file_in_the_sockets_place_is_kept_and_the_gate_still_starts(tmp_path, services):
    config = make_agent(tmp_path)
    path = tmp_path / "state" / "sim.sock"
    path.write_text("not mine")
    svc = services(config)
    assert svc.ready.is_set() and svc.simctl is None
    assert path.read_text() == "not mine"
    svc.runtime.submit(Button("in"))
    wait_until(lambda: pulses(svc, "unlock_a") == 1, what="the gate works without its sim socket")


def test_a_deep_state_directory_still_gets_its_socket(tmp_path, services):
    base = tmp_path / ("d" * 60) / ("e" * 60)
    svc = services(make_agent(base))
    assert len(str(socket_path(svc.config.service.state_dir))) > 108
    assert sim(svc, op="card", reader="entry", card=CARD)["decision"]["type"] == "access.granted"


def test_real_pins_never_open_the_socket(tmp_path, services):
    from gpiozero.pins.mock import MockFactory

    # A config for real pins, run here on mock pins handed in: the config decides.
    svc = services(make_agent(tmp_path, pin_factory="lgpio"), factory=MockFactory())
    assert svc.ready.is_set() and svc.simctl is None
    assert not (tmp_path / "state" / "sim.sock").exists()


def test_an_osdp_reader_is_refused_with_the_reason():
    server = SimServer("/nonexistent/sim.sock", factory=None, profile=load_profile("pi4-relay4"),
                       readers={}, reader_settings=[ReaderSettings("entry", "osdp", port="/dev/x")])
    reply = server._reply(b'{"op": "card", "reader": "entry", "card": "100,60179"}')
    assert (reply["ok"], reply["error"]) == (False, "unsupported_reader")
    assert "OSDP" in reply["message"]


# --- the documented command line --------------------------------------------------------


def cli_env(lang: str = "C.UTF-8") -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM", "LC_ALL", "LC_MESSAGES")}
    env["PYTHONPATH"] = str(ROOT)
    env["LANG"] = lang
    return env


def gate_agent(*args: str, cwd: Path, lang: str = "C.UTF-8") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=cwd, env=cli_env(lang),
                          capture_output=True, text=True, timeout=60, check=False)


def run_agent(config: Path, cwd: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=cwd,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sock = cwd / "state" / "sim.sock"

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the agent exited {proc.returncode}: {proc.stderr.read()}")
        try:
            return request(sock, {"op": "ping"}, timeout=5)["ok"]
        except OSError:
            return False

    wait_until(answers, timeout=30, what="the agent's sim socket")
    return proc


def test_the_documented_command_line_drives_an_agent_and_a_fire_latch_survives_kill_9(tmp_path, capsys):
    config = make_agent(tmp_path)
    journal = tmp_path / "data" / "journal.db"
    agent = run_agent(config, tmp_path)
    try:
        out = gate_agent("sim", "--config", str(config), "card", "entry", CARD, "--wait", "10", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "access granted" in out.stdout and "p-1" in out.stdout
        out = gate_agent("sim", "card", "exit", UNKNOWN, "--config", str(config), "--json", "--wait", "10",
                         cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["decision"]["type"] == "access.denied"
        # A refusal: exit 1, the reason in the technician's language.
        out = gate_agent("sim", "--config", str(config), "card", "roof", CARD, cwd=tmp_path, lang="ru_RU.UTF-8")
        assert out.returncode == 1 and "считывател" in out.stderr and "entry" in out.stderr, out.stderr
        # Every other command docs/operations.md quotes (the same parser and client, in this process).
        for args in (("pass", "A"), ("button", "in"), ("ready", "false"), ("ready", "true"),
                     ("tamper", "true"), ("tamper", "false"), ("ping",)):
            assert cli_main(["sim", "--config", str(config), *args]) == 0, args
            assert capsys.readouterr().out.strip()
        for args in (("fire", "open"), ("fire", "closed")):
            out = gate_agent("sim", "--config", str(config), *args, cwd=tmp_path)
            assert out.returncode == 0, out.stderr

        def latched() -> bool:
            state = json.loads((tmp_path / "state" / "gate-state.json").read_text())
            return state.get("fire") is True
        wait_until(latched, what="the fire latch saved")
        agent.send_signal(signal.SIGKILL)  # no clean stop: the socket and the latch stay behind
        agent.wait(10)
        assert (tmp_path / "state" / "sim.sock").exists()
        out = gate_agent("sim", "--config", str(config), "ping", cwd=tmp_path)
        assert out.returncode == 3 and "gate-agent run" in out.stderr

        agent = run_agent(config, tmp_path)  # the stale socket is replaced
        out = gate_agent("sim", "--config", str(config), "card", "exit", UNKNOWN, "--json", "--wait", "10",
                         cwd=tmp_path)
        assert json.loads(out.stdout)["decision"]["check"] == "none"  # still fire mode: free, unchecked
        out = gate_agent("sim", "--config", str(config), "fire-reset", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        wait_until(lambda: [r["by"] for r in journal_records(journal) if r["type"] == "mode.changed"][-1:]
                   == ["fire_reset"], what="the reset recorded")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert not (tmp_path / "state" / "sim.sock").exists()
    changes = [(r["from"], r["to"], r["by"]) for r in journal_records(journal) if r["type"] == "mode.changed"]
    assert changes == [("normal", "fire", "fire_loop"), ("normal", "fire", "restored"),
                       ("fire", "normal", "fire_reset")]


def test_sim_on_a_real_pins_config_says_so_and_fails(tmp_path):
    config = make_agent(tmp_path, pin_factory="lgpio")
    out = gate_agent("sim", "--config", str(config), "fire", "open", cwd=tmp_path)
    assert out.returncode == 2
    assert 'pin_factory = "lgpio"' in out.stderr and 'pin_factory = "mock"' in out.stderr
    out = gate_agent("sim", "--config", str(config), "fire", "open", cwd=tmp_path, lang="ru_RU.UTF-8")
    assert out.returncode == 2 and "pin_factory" in out.stderr
    assert any("а" <= ch <= "я" for ch in out.stderr), out.stderr


def test_sim_with_no_agent_running_says_how_to_start_one(tmp_path):
    config = make_agent(tmp_path)
    out = gate_agent("sim", "--config", str(config), "pass", "A", cwd=tmp_path)
    assert out.returncode == 3
    assert f"gate-agent run --config {config}" in out.stderr
